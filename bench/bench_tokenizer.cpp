// Tokenizer throughput: single-thread encode of a large text, in MB/s. By default the text is ~20 MB built from
// the golden encodings (prose, code, CJK, emoji, special tokens) interleaved with generated English-like text.
// The first pass starts with an empty BPE word cache, the later ones reuse it.
// Usage: bench_tokenizer [tokenizer.json] [text file]
#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "tokenizer/tokenizer.h"

using namespace dsv3;

namespace {
std::string make_text(const std::string& golden_dir, size_t target) {
  std::vector<std::string> samples;
  for (const auto& c : nlohmann::json::parse(std::ifstream(golden_dir + "/encodings.json")))
    samples.push_back(c["text"]);
  // Zipf-ish word choice over a few hundred syllable-built words, so the cache sees both hits and misses.
  static const char* syl[] = {"th", "e",  "an", "re", "in", "on", "at", "er",  "st", "ing", "ou", "ed",   "al",  "or",
                              "ti", "ve", "co", "de", "ra", "li", "ma", "pro", "ex", "un",  "ly", "tion", "ment"};
  std::mt19937 rng(42);
  std::vector<std::string> words;
  for (int i = 0; i < 5000; ++i) {
    std::string w;
    for (int k = 1 + int(rng() % 4); k--;) w += syl[rng() % 27];
    words.push_back(w);
  }
  std::string text;
  while (text.size() < target) {
    if (rng() % 8 == 0) {
      text += samples[rng() % samples.size()];
      text += '\n';
      continue;
    }
    for (int n = 20 + int(rng() % 80); n--;) {
      const double u = std::uniform_real_distribution<double>(0, 1)(rng);
      std::string w = words[size_t(double(words.size()) * u * u * u)];
      if (rng() % 10 == 0) w[0] = char(std::toupper(uint8_t(w[0])));
      text += w;
      const uint32_t r = rng() % 40;
      text += r == 0 ? ". " : r == 1 ? ", " : r == 2 ? std::to_string(rng() % 2000) + " " : r == 3 ? "\n" : " ";
    }
    text += "\n\n";
  }
  return text;
}
}  // namespace

int main(int argc, char** argv) {
  const std::string golden = std::string(DSV3_SOURCE_DIR) + "/../shared/golden/tokenizer";
  const std::string tok_path = argc > 1 ? argv[1] : golden + "/tokenizer.json";
  std::string text;
  if (argc > 2) {
    std::ifstream f(argv[2], std::ios::binary);
    text.assign(std::istreambuf_iterator<char>(f), {});
  } else {
    text = make_text(golden, size_t(20) << 20);
  }
  auto t0 = std::chrono::steady_clock::now();
  const Tokenizer tok = Tokenizer::load(tok_path);
  auto t1 = std::chrono::steady_clock::now();
  std::printf("load %s: %.1f ms, vocab %d\n", tok_path.c_str(),
              std::chrono::duration<double, std::milli>(t1 - t0).count(), tok.vocab_size());
  std::vector<int32_t> ids;
  for (const char* pass : {"cold cache", "warm cache", "warm cache", "warm cache"}) {
    t0 = std::chrono::steady_clock::now();
    ids = tok.encode(text);
    t1 = std::chrono::steady_clock::now();
    const double s = std::chrono::duration<double>(t1 - t0).count();
    std::printf("encode %.1f MB -> %zu tokens (%.2f bytes/token), %s: %.3f s, %.1f MB/s\n", double(text.size()) / 1e6,
                ids.size(), double(text.size()) / double(ids.size()), pass, s, double(text.size()) / 1e6 / s);
  }
  t0 = std::chrono::steady_clock::now();
  const bool same = tok.decode(ids) == text;
  t1 = std::chrono::steady_clock::now();
  std::printf("decode: %.1f MB/s, round trip %s\n",
              double(text.size()) / 1e6 / std::chrono::duration<double>(t1 - t0).count(), same ? "exact" : "MISMATCH");
  return same ? 0 : 1;
}
