#include "tokenizer/bpe_train.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "core/error.h"
#include "io/text_file.h"
#include "tokenizer/tokenizer.h"

namespace dsv3::bpe {

namespace {

// The DeepSeek-V3 pre-tokenizer's Split regexes exactly as the official tokenizer.json spells them (Oniguruma
// syntax; \r and \n are the raw characters there too).
constexpr std::string_view kSplitRegexes[] = {
    R"(\p{N}{1,3})",
    "[\u4E00-\u9FA5\u3040-\u309F\u30A0-\u30FF]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| "
    "?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
};

// For PCRE2 these patterns need one change (Tokenizer's loader does the general translation; the test
// BpeTrain.SegmentationMatchesTokenizer checks that both split alike): Oniguruma's \s is exactly Unicode
// White_Space, PCRE2's adds U+180E. Both \s and \S occur only outside [...] here.
std::string to_pcre2(std::string_view re) {
  constexpr std::string_view ws =
      "\\t-\\r\\x20\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}";
  std::string out;
  for (size_t i = 0; i < re.size(); ++i) {
    if (re[i] == '\\' && i + 1 < re.size()) {
      const char e = re[++i];
      if (e == 's' || e == 'S') {
        out += e == 's' ? "[" : "[^", out += ws, out += "]";
      } else {
        out += '\\', out += e;
      }
      continue;
    }
    out += re[i];
  }
  return out;
}

struct CodeFree {
  void operator()(pcre2_code* c) const { pcre2_code_free(c); }
};
struct MatchDataFree {
  void operator()(pcre2_match_data* m) const { pcre2_match_data_free(m); }
};

class PreTokenizer {
 public:
  PreTokenizer() {
    for (std::string_view re : kSplitRegexes) {
      const std::string p = to_pcre2(re);
      int err = 0;
      PCRE2_SIZE off = 0;
      pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(p.data()), p.size(),
                                       PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE, &err, &off, nullptr);
      DSV3_CHECK(code, "bpe: cannot compile pre-tokenizer regex '{}' (error {} at {})", re, err, off);
      codes_.emplace_back(code);
      jitted_.push_back(pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0);
    }
  }

  // Calls emit(piece) for every non-empty piece of s, in order.
  template <class Emit>
  void split(std::string_view s, Emit&& emit) const {
    split_level(0, s, emit);
  }

 private:
  // Split `level` keeps both its matches and the gaps between them and hands each to the next level (empty
  // pieces are dropped, each piece is a subject of its own): the semantics of HF's Split with Isolated.
  template <class Emit>
  void split_level(size_t level, std::string_view s, Emit& emit) const {
    if (level == codes_.size()) return emit(s);
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
    size_t prev = 0, pos = 0;
    while (pos <= s.size()) {
      pcre2_code* code = codes_[level].get();
      const int rc = jitted_[level] ? pcre2_jit_match(code, subject, s.size(), pos, 0, md_.get(), nullptr)
                                    : pcre2_match(code, subject, s.size(), pos, PCRE2_NO_UTF_CHECK, md_.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      DSV3_CHECK(rc >= 0, "bpe: pre-tokenizer regex failed (PCRE2 error {})", rc);
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md_.get());
      const size_t a = ov[0], b = ov[1];  // read before recursing: nested levels reuse the match data
      if (a > prev) split_level(level + 1, s.substr(prev, a - prev), emit);
      if (b > a) split_level(level + 1, s.substr(a, b - a), emit);
      prev = b;
      if (b > a) {
        pos = b;
      } else {  // empty match: step over one character
        if (b == s.size()) break;
        pos = b + 1;
        while (pos < s.size() && (uint8_t(s[pos]) & 0xC0) == 0x80) ++pos;
      }
    }
    if (prev < s.size()) split_level(level + 1, s.substr(prev), emit);
  }

  std::vector<std::unique_ptr<pcre2_code, CodeFree>> codes_;
  std::vector<uint8_t> jitted_;
  // The default JIT stack (32 KiB) suffices: these patterns have no nested quantifiers that backtrack deeply.
  std::unique_ptr<pcre2_match_data, MatchDataFree> md_{pcre2_match_data_create(1, nullptr)};
};

// Calls gap(text) for the text between occurrences of special tokens (which the Tokenizer cuts out before
// pre-tokenizing, so training must not see them either).
template <class Gap>
void cut_specials(std::string_view s, Gap&& gap) {
  constexpr std::string_view lead = "<\xEF\xBD\x9C";  // "<｜", how every special token starts
  size_t start = 0;
  for (size_t i = s.find(lead); i != std::string_view::npos; i = s.find(lead, i + 1)) {
    for (std::string_view sp : kSpecialTokens) {
      if (i < start || s.substr(i, sp.size()) != sp) continue;
      if (i > start) gap(s.substr(start, i - start));
      start = i + sp.size();
    }
  }
  if (start < s.size()) gap(s.substr(start));
}

// GPT-2's byte -> printable code point map (ByteLevel): printable Latin-1 bytes map to themselves, the other 68
// to U+0100.. in byte order.
std::array<uint32_t, 256> byte_level_map() {
  std::array<uint32_t, 256> cp{};
  uint32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    cp[b] = printable ? uint32_t(b) : next++;
  }
  return cp;
}

std::string utf8_of(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += char(cp);
  } else {  // the byte-level alphabet stays below U+0800
    s += char(0xC0 | (cp >> 6)), s += char(0x80 | (cp & 0x3F));
  }
  return s;
}

uint64_t pair_key(uint32_t a, uint32_t b) { return uint64_t(a) << 32 | b; }

struct Word {
  std::vector<uint32_t> sym;
  int64_t count = 0;
};

struct HeapEntry {
  int64_t count;
  uint64_t pair;
  // std heaps are max-heaps: the most frequent pair on top, then the smallest (left, right).
  bool operator<(const HeapEntry& o) const { return count != o.count ? count < o.count : pair > o.pair; }
};

// Progress on stderr, at most about once a second.
class Progress {
 public:
  Progress(bool on, int64_t total) : on_(on), total_(total) {}
  void tick(int64_t done) {
    if (!on_ || (done & 63) != 0) return;
    const double t = seconds();
    if (t - last_ < 1.0) return;
    last_ = t;
    std::fprintf(stderr, "bpe: %lld/%lld merges, %.0f merges/s\n", (long long)done, (long long)total_, double(done) / t);
  }
  void done(int64_t n) const {
    if (on_) std::fprintf(stderr, "bpe: %lld merges in %.2f s (%.0f merges/s)\n", (long long)n, seconds(),
                          double(n) / std::max(seconds(), 1e-9));
  }

 private:
  double seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count(); }
  bool on_;
  int64_t total_;
  std::chrono::steady_clock::time_point t0_ = std::chrono::steady_clock::now();
  double last_ = 0;
};

}  // namespace

std::vector<std::string_view> pretokenize(std::string_view text) {
  const PreTokenizer pre;
  std::vector<std::string_view> pieces;
  cut_specials(text, [&](std::string_view gap) { pre.split(gap, [&](std::string_view p) { pieces.push_back(p); }); });
  return pieces;
}

Trained train(std::string_view text, const TrainOptions& o) {
  DSV3_CHECK(!text.empty(), "bpe: the corpus is empty");
  DSV3_CHECK(o.vocab_size >= kMinVocab, "bpe: vocab size {} is below the minimum {} (256 bytes + {} special tokens)",
             o.vocab_size, kMinVocab, kSpecialTokens.size());
  DSV3_CHECK(o.vocab_size <= (int64_t(1) << 30), "bpe: vocab size {} is too large", o.vocab_size);
  const size_t bad = utf8::find_invalid(text);
  DSV3_CHECK(bad == std::string_view::npos, "bpe: the corpus has invalid UTF-8 at byte {}", bad);

  Trained t;
  for (std::string_view s : kSpecialTokens) t.vocab.emplace_back(s);
  // Byte tokens in code point order of their byte-level characters.
  const std::array<uint32_t, 256> cp = byte_level_map();
  std::array<int, 256> order{};
  for (int b = 0; b < 256; ++b) order[b] = b;
  std::sort(order.begin(), order.end(), [&](int x, int y) { return cp[x] < cp[y]; });
  std::array<uint32_t, 256> byte_id{};
  for (int b : order) byte_id[b] = uint32_t(t.vocab.size()), t.vocab.push_back(utf8_of(cp[b]));
  std::unordered_map<std::string, uint32_t> id_of;
  for (size_t i = 0; i < t.vocab.size(); ++i) id_of.emplace(t.vocab[i], uint32_t(i));

  // Distinct words and their counts, in order of first appearance (deterministic).
  std::vector<Word> words;
  {
    std::unordered_map<std::string_view, uint32_t> index;
    for (std::string_view p : pretokenize(text)) {
      ++t.n_words;
      auto [it, fresh] = index.try_emplace(p, uint32_t(words.size()));
      if (fresh) {
        Word w;
        for (char c : p) w.sym.push_back(byte_id[uint8_t(c)]);
        words.push_back(std::move(w));
      }
      ++words[it->second].count;
    }
  }
  t.n_distinct_words = int64_t(words.size());
  DSV3_CHECK(!words.empty(), "bpe: the corpus has no text to train on");

  // Pair counts and, per pair, the words holding it (ascending, may hold words that lost the pair since).
  std::unordered_map<uint64_t, int64_t> count;
  std::unordered_map<uint64_t, std::vector<uint32_t>> where;
  for (uint32_t w = 0; w < words.size(); ++w) {
    const auto& s = words[w].sym;
    for (size_t i = 0; i + 1 < s.size(); ++i) {
      const uint64_t p = pair_key(s[i], s[i + 1]);
      count[p] += words[w].count;
      auto& v = where[p];
      if (v.empty() || v.back() != w) v.push_back(w);
    }
  }
  std::vector<HeapEntry> heap;
  heap.reserve(count.size());
  for (const auto& [p, c] : count) heap.push_back({c, p});
  std::make_heap(heap.begin(), heap.end());

  const int64_t target = o.vocab_size;
  Progress progress(o.progress, target - int64_t(t.vocab.size()));
  std::vector<uint64_t> grown;  // pairs whose count rose during this merge
  while (int64_t(t.vocab.size()) < target) {
    DSV3_CHECK(!heap.empty(),
               "bpe: the corpus is too small for vocab size {}: no pair left to merge at {} tokens ({} merges)",
               target, t.vocab.size(), t.merges.size());
    std::pop_heap(heap.begin(), heap.end());
    const HeapEntry top = heap.back();
    heap.pop_back();
    const auto cit = count.find(top.pair);
    const int64_t cur = cit == count.end() ? 0 : cit->second;
    if (cur != top.count) {  // stale: counts only fall between pushes, so re-queue at the true count
      if (cur > 0) heap.push_back({cur, top.pair}), std::push_heap(heap.begin(), heap.end());
      continue;
    }
    const auto a = uint32_t(top.pair >> 32), b = uint32_t(top.pair);
    std::string merged = t.vocab[a] + t.vocab[b];
    auto [it, fresh] = id_of.try_emplace(merged, uint32_t(t.vocab.size()));
    const uint32_t rep = it->second;
    if (fresh) t.vocab.push_back(std::move(merged));
    t.merges.emplace_back(t.vocab[a], t.vocab[b]);

    std::vector<uint32_t> hits = std::move(where[top.pair]);
    where.erase(top.pair);
    std::sort(hits.begin(), hits.end());
    hits.erase(std::unique(hits.begin(), hits.end()), hits.end());
    grown.clear();
    for (uint32_t w : hits) {
      auto& s = words[w].sym;
      const int64_t n = words[w].count;
      auto add = [&](uint32_t x, uint32_t y, int64_t delta) {
        const uint64_t p = pair_key(x, y);
        count[p] += delta * n;
        if (delta > 0) {
          auto& v = where[p];
          if (v.empty() || v.back() != w) v.push_back(w);
          grown.push_back(p);
        }
      };
      // Merge left to right, non-overlapping; the neighbours' pairs change as in HF's Word::merge.
      size_t out = 0;
      for (size_t i = 0; i < s.size();) {
        if (i + 1 < s.size() && s[i] == a && s[i + 1] == b) {
          if (out > 0) add(s[out - 1], a, -1), add(s[out - 1], rep, +1);
          if (i + 2 < s.size()) add(b, s[i + 2], -1), add(rep, s[i + 2], +1);
          s[out++] = rep, i += 2;
        } else {
          s[out++] = s[i++];
        }
      }
      s.resize(out);
    }
    count.erase(top.pair);  // every occurrence is merged (an overlapping "aaa" decremented it on the way)
    std::sort(grown.begin(), grown.end());
    grown.erase(std::unique(grown.begin(), grown.end()), grown.end());
    for (uint64_t p : grown)
      if (auto g = count.find(p); g != count.end() && g->second > 0)
        heap.push_back({g->second, p}), std::push_heap(heap.begin(), heap.end());
    progress.tick(int64_t(t.merges.size()));
  }
  progress.done(int64_t(t.merges.size()));
  return t;
}

std::string tokenizer_json(const Trained& t) {
  using json = nlohmann::ordered_json;
  json added = json::array();
  for (size_t i = 0; i < kSpecialTokens.size(); ++i)
    added.push_back({{"id", i},
                     {"content", kSpecialTokens[i]},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  json splits = json::array();
  for (std::string_view re : kSplitRegexes)
    splits.push_back(
        {{"type", "Split"}, {"pattern", {{"Regex", re}}}, {"behavior", "Isolated"}, {"invert", false}});
  splits.push_back({{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", false}});
  // In id order, as HF writes it. Appended through ordered_map's vector base: its operator[] searches linearly,
  // quadratic over a large vocab (the keys are distinct by construction).
  json vocab = json::object();
  auto& entries = vocab.get_ref<json::object_t&>();
  entries.reserve(t.vocab.size());
  for (size_t i = 0; i < t.vocab.size(); ++i) entries.Container::emplace_back(t.vocab[i], i);
  json merges = json::array();
  for (const auto& [a, b] : t.merges) merges.push_back({a, b});
  json j = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "Sequence"}, {"pretokenizers", splits}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"ignore_merges", false},
        {"vocab", vocab},
        {"merges", merges}}},
  };
  return j.dump(2) + "\n";
}

std::string tokenizer_config_json() {
  nlohmann::ordered_json j = {
      {"add_bos_token", true},
      {"add_eos_token", false},
      {"bos_token", kSpecialTokens[0]},
      {"eos_token", kSpecialTokens[1]},
      {"pad_token", kSpecialTokens[2]},
      {"unk_token", nullptr},
      {"clean_up_tokenization_spaces", false},
      {"legacy", true},
      {"model_max_length", 16384},
      {"tokenizer_class", "LlamaTokenizerFast"},
  };
  return j.dump(2) + "\n";
}

void save(const Trained& t, const std::string& path) {
  const std::filesystem::path dir = std::filesystem::path(path).parent_path();
  std::error_code ec;
  if (!dir.empty()) std::filesystem::create_directories(dir, ec);
  DSV3_CHECK(dir.empty() || std::filesystem::is_directory(dir), "{}: cannot create the folder: {}", dir.string(),
             ec.message());
  io::write_file_atomically(path, tokenizer_json(t));
  const std::filesystem::path config = dir / "tokenizer_config.json";
  io::write_file_atomically(config.string(), tokenizer_config_json());
}

}  // namespace dsv3::bpe
