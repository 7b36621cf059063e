#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <thread>

#include "core/error.h"
#include "tokenizer/tokenizer.h"

using namespace dsv3;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

std::string tok_path(const char* name = "tokenizer.json") {
  return std::string(DSV3_SHARED_DIR) + "/golden/tokenizer/" + name;
}
const Tokenizer& tok() {
  static const Tokenizer t = Tokenizer::load(tok_path());
  return t;
}
json read_json(const std::string& path) {
  std::ifstream f(path);
  return json::parse(f);
}
std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}
void write_file(const std::string& path, const std::string& s) { std::ofstream(path, std::ios::binary) << s; }

fs::path temp_dir() {
  fs::path d = fs::temp_directory_path() / ("dsv3_tok_test_" + std::to_string(::getpid()));
  fs::create_directories(d);
  return d;
}

// Independent of the library's validator: decode each sequence and reject overlongs, surrogates, > U+10FFFF.
bool valid_utf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const auto c = uint8_t(s[i]);
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (!n || i + n > s.size()) return false;
    uint32_t cp = n == 1 ? c : c & (0x7F >> n);
    for (size_t k = 1; k < n; ++k) {
      if ((uint8_t(s[i + k]) & 0xC0) != 0x80) return false;
      cp = cp << 6 | (uint8_t(s[i + k]) & 0x3F);
    }
    const uint32_t min[] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < min[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n;
  }
  return true;
}

void put(std::string& s, uint32_t cp) {  // UTF-8 encode
  const int n = cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
  const uint8_t lead[] = {0, 0, 0xC0, 0xE0, 0xF0};
  s += char(n == 1 ? cp : lead[n] | cp >> (6 * (n - 1)));
  for (int k = n - 2; k >= 0; --k) s += char(0x80 | (cp >> (6 * k) & 0x3F));
}

// Random valid UTF-8 mixing the character classes the pre-tokenizer treats differently.
std::string random_text(std::mt19937& rng) {
  static const char* ws[] = {" ", "  ", "\t", "\n", "\r\n", "\n\n", "   ", "\xC2\xA0", "\xE3\x80\x80", " \n "};
  static const char* special[] = {"<｜begin▁of▁sentence｜>", "<｜User｜>",     "<｜Assistant｜>", "<think>", "</think>",
                                  "<｜end▁of▁sentence｜>",   "<｜fim▁hole｜>", "<thin",           "<｜User"};
  static const char* words[] = {"the", "Hello",   "world", "CamelCase",        "snake_case", "don't", "I'm", "naïve",
                                "x",   "ALLCAPS", "a1b2",  "http://x.y/z?q=1", "++i",        "->",    "...", "!?"};
  auto pick = [&](int n) { return int(rng() % uint32_t(n)); };
  auto run = [&](int n, uint32_t first, int count) {  // up to n random code points from [first, first+count)
    std::string r;
    for (int k = pick(n) + 1; k--;) put(r, first + uint32_t(pick(count)));
    return r;
  };
  auto any = [&] {  // any scalar value, including controls and unassigned ones
    uint32_t cp;
    do cp = pick(4) ? uint32_t(pick(0x3000)) : uint32_t(pick(0x110000));
    while (cp >= 0xD800 && cp <= 0xDFFF);
    return run(1, cp, 1);
  };
  const std::function<std::string()> gen[] = {
      [&] { return std::string(words[pick(16)]); },
      [&] { return std::string(ws[pick(10)]); },
      [&] { return run(7, '0', 10); },                                              // digits
      [&] { return run(5, 0x4E00, 0x9FA5 - 0x4E00); },                              // CJK
      [&] { return run(4, 0x3040, 0xC0); },                                         // kana
      [&] { return run(1, 0x1F600, 0x50) + (pick(2) ? run(1, 0x1F3FB, 5) : ""); },  // emoji, skin tone
      [&] { return run(1, 'a', 26) + run(1, 0x300, 0x70); },                        // combining mark
      [&] { return std::string(special[pick(9)]); },
      [&] { return run(3, '!', 15) + run(2, '[', 6); },  // ASCII punctuation
      [&] { return run(6, 0x410, 0x40); },               // Cyrillic
      any,
  };
  std::string s;
  for (int p = pick(12); p--;) s += gen[pick(11)]();
  return s;
}

// The id of the single-byte token for byte b (all 256 are in the vocab).
int32_t byte_token(uint8_t b) {
  static const std::vector<int32_t> ids = [] {
    std::vector<int32_t> v(256, -1);
    for (int32_t id = 0; id < tok().vocab_size(); ++id)
      if (!tok().is_special(id) && tok().token_bytes(id).size() == 1) v[uint8_t(tok().token_bytes(id)[0])] = id;
    return v;
  }();
  return ids[b];
}

void expect_stream_matches(const std::vector<int32_t>& ids) {
  StreamDecoder sd(tok());
  std::string all;
  for (int32_t id : ids) {
    const std::string chunk = sd.push(id);
    EXPECT_TRUE(valid_utf8(chunk));
    all += chunk;
  }
  const std::string last = sd.flush();
  EXPECT_TRUE(valid_utf8(last));
  EXPECT_EQ(all + last, tok().decode(ids));
}

int run_shell(const std::string& cmd) {
  const int st = std::system(cmd.c_str());
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

}  // namespace

TEST(TokenizerGolden, EncodingsMatchForBothMergeLayouts) {
  const json cases = read_json(tok_path("encodings.json"));
  ASSERT_GT(cases.size(), 30u);
  for (const char* file : {"tokenizer.json", "tokenizer_legacy_merges.json"}) {
    SCOPED_TRACE(file);
    const Tokenizer t = Tokenizer::load(tok_path(file));
    for (const json& c : cases) {
      const std::string text = c["text"];
      SCOPED_TRACE(text.substr(0, 80));
      const std::vector<int32_t> ids = t.encode(text);
      EXPECT_EQ(ids, c["ids"].get<std::vector<int32_t>>());
      std::vector<std::string> tokens;
      for (int32_t id : ids) tokens.push_back(t.token_text(id));
      EXPECT_EQ(tokens, c["tokens"].get<std::vector<std::string>>());
      EXPECT_EQ(t.decode(c["ids"].get<std::vector<int32_t>>()), c["decoded"].get<std::string>());
    }
  }
}

TEST(TokenizerBasics, VocabAndSpecialTokens) {
  EXPECT_EQ(tok().vocab_size(), 8000);
  EXPECT_EQ(tok().bos_id(), 0);
  EXPECT_EQ(tok().eos_id(), 1);
  EXPECT_TRUE(tok().is_special(0));
  EXPECT_FALSE(tok().is_special(2020));
  EXPECT_EQ(tok().token_id("Ġworld"), 2020);
  EXPECT_EQ(tok().token_text(2020), "Ġworld");
  EXPECT_EQ(tok().token_bytes(2020), " world");
  EXPECT_FALSE(tok().token_id("no such token").has_value());
  EXPECT_EQ(tok().encode("<｜User｜>"), std::vector<int32_t>{3});
  EXPECT_EQ(tok().decode({3, 1}), "<｜User｜><｜end▁of▁sentence｜>");
  EXPECT_TRUE(tok().encode("").empty());
  EXPECT_THROW(tok().decode({8000}), Error);
  EXPECT_THROW(tok().decode({-1}), Error);
  EXPECT_THROW(tok().token_text(123456), Error);
}

TEST(TokenizerCache, ThreadsAndTokenizersDoNotShareWords) {
  // A second tokenizer without merges encodes every word byte by byte; alternating the two on one thread must
  // not let one reuse the other's cached words.
  const fs::path dir = temp_dir();
  json j = read_json(tok_path());
  j["model"]["merges"] = json::array();
  write_file((dir / "bytes.json").string(), j.dump());
  const Tokenizer bytes = Tokenizer::load((dir / "bytes.json").string());
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(tok().encode("Hello world"), (std::vector<int32_t>{49, 806, 88, 2020}));
    EXPECT_EQ(bytes.encode("Hello world").size(), 11u);
  }
  // Concurrent encodes (each thread has its own cache) give the golden ids.
  const json cases = read_json(tok_path("encodings.json"));
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int rep = 0; rep < 20; ++rep)
        for (const json& c : cases) mismatches += tok().encode(c["text"].get<std::string>()) != c["ids"];
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(mismatches, 0);
  fs::remove_all(dir);
}

TEST(TokenizerRoundTrip, RandomValidUtf8) {
  std::mt19937 rng(1234);
  for (int i = 0; i < 3000; ++i) {
    const std::string s = random_text(rng);
    ASSERT_TRUE(valid_utf8(s));
    const std::vector<int32_t> ids = tok().encode(s);
    ASSERT_EQ(tok().decode(ids), s) << "case " << i;
  }
}

TEST(TokenizerStream, MatchesFullDecodeAndEmitsOnlyWholeCharacters) {
  std::mt19937 rng(99);
  for (int i = 0; i < 500; ++i) expect_stream_matches(tok().encode(random_text(rng)));
  for (const json& c : read_json(tok_path("encodings.json"))) expect_stream_matches(c["ids"]);
  // Byte by byte through a 4-byte and a 3-byte character: nothing comes out until each is complete.
  StreamDecoder sd(tok());
  const std::string s = "😀€a";
  std::vector<std::string> chunks;
  for (char c : s) chunks.push_back(sd.push(byte_token(uint8_t(c))));
  EXPECT_EQ(chunks, (std::vector<std::string>{"", "", "", "😀", "", "", "€", "a"}));
  EXPECT_EQ(sd.flush(), "");
}

TEST(TokenizerStream, IllFormedBytesBecomeReplacementCharacters) {
  const std::string fffd = "\xEF\xBF\xBD";
  // A truncated 4-byte sequence followed by ASCII, a lone continuation byte, and a sequence cut by the end.
  const std::vector<int32_t> ids = {byte_token(0xF0), byte_token(0x9F), byte_token('a'), byte_token(0x80),
                                    byte_token('b'),  byte_token(0xE2), byte_token(0x82)};
  EXPECT_EQ(tok().decode(ids), fffd + "a" + fffd + "b" + fffd);
  expect_stream_matches(ids);
  // Random byte tokens: the stream still agrees with the full decode and never emits ill-formed text.
  std::mt19937 rng(7);
  for (int i = 0; i < 300; ++i) {
    std::vector<int32_t> r;
    for (int k = int(rng() % 12); k--;) r.push_back(byte_token(uint8_t(rng() % 2 ? 0x80 + rng() % 0x80 : rng() % 256)));
    expect_stream_matches(r);
  }
}

TEST(TokenizerUtf8, InvalidInputThrowsWithOffset) {
  const std::pair<std::string, size_t> bad[] = {
      {"ab\xFF", 2},          {"\x80", 0},
      {"x\xC0\x80", 1},                                 // stray byte, continuation, overlong
      {"ok \xED\xA0\x80", 3}, {"\xF4\x90\x80\x80", 0},  // surrogate, above U+10FFFF
      {"abc\xE2\x82", 3},     {"é\xE2x", 2},            // truncated at end / in the middle
  };
  for (const auto& [s, at] : bad) {
    try {
      tok().encode(s);
      ADD_FAILURE() << "no error for byte " << at;
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()), "invalid UTF-8 at byte " + std::to_string(at));
    }
  }
  EXPECT_NO_THROW(tok().encode(std::string("nul\0inside", 10)));
}

TEST(TokenizerLoad, MalformedFilesGiveOneLineErrorsNamingTheFile) {
  const fs::path dir = temp_dir();
  const json good = read_json(tok_path());
  auto expect_error = [&](const std::string& name, const std::string& contents, const std::string& needle) {
    const std::string path = (dir / name).string();
    write_file(path, contents);
    try {
      Tokenizer::load(path);
      ADD_FAILURE() << name << ": loaded";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(path), std::string::npos) << msg;
      EXPECT_NE(msg.find(needle), std::string::npos) << msg;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
  };
  auto edited = [&](auto edit) {
    json j = good;
    edit(j);
    return j.dump();
  };
  EXPECT_THROW(Tokenizer::load((dir / "missing.json").string()), Error);
  expect_error("bad.json", "{\"model\": ", "parse");
  expect_error("array.json", "[1, 2]", "not a tokenizer.json");
  expect_error("no_model.json", edited([](json& j) { j.erase("model"); }), "model");
  expect_error("no_vocab.json", edited([](json& j) { j["model"].erase("vocab"); }), "vocab");
  expect_error("no_merges.json", edited([](json& j) { j["model"].erase("merges"); }), "merges");
  expect_error("wordpiece.json", edited([](json& j) { j["model"]["type"] = "WordPiece"; }), "WordPiece");
  expect_error("pretok.json", edited([](json& j) { j["pre_tokenizer"] = {{"type", "Whitespace"}}; }), "Whitespace");
  expect_error("merge.json", edited([](json& j) { j["model"]["merges"][5] = {"Ġ", "zzzq"}; }), "zzzq");
  expect_error("legacy.json", edited([](json& j) { j["model"]["merges"][0] = "a b c"; }), "merge 0");
  expect_error("regex.json", edited([](json& j) { j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(x"; }),
               "regex");
  expect_error("vocab_id.json", edited([](json& j) { j["model"]["vocab"]["Ġworld"] = "x"; }), "Ġworld");
  fs::remove_all(dir);
}

TEST(TokenizerCli, EncodesDecodesAndRejectsMalformedLines) {
  const fs::path dir = temp_dir();
  const std::string in = (dir / "in.jsonl").string(), out = (dir / "out.jsonl").string(),
                    err = (dir / "err.txt").string();
  const std::string cmd = std::string(DSV3_BIN) + " tokenize --tokenizer " + tok_path();
  write_file(in, "{\"text\": \"Hello world\"}\n\n{\"text\": \"<｜User｜>hi 深度\"}\n");
  ASSERT_EQ(run_shell(cmd + " < " + in + " > " + out + " 2> " + err), 0) << read_file(err);
  std::istringstream lines(read_file(out));
  std::string l1, l2, extra;
  std::getline(lines, l1), std::getline(lines, l2);
  EXPECT_FALSE(std::getline(lines, extra));
  EXPECT_EQ(json::parse(l1)["ids"].get<std::vector<int32_t>>(), (std::vector<int32_t>{49, 806, 88, 2020}));
  const auto ids2 = json::parse(l2)["ids"].get<std::vector<int32_t>>();
  EXPECT_EQ(ids2, tok().encode("<｜User｜>hi 深度"));

  write_file(in, json{{"ids", ids2}}.dump() + "\n");
  ASSERT_EQ(run_shell(cmd + " --decode < " + in + " > " + out + " 2> " + err), 0) << read_file(err);
  EXPECT_EQ(json::parse(read_file(out))["text"], "<｜User｜>hi 深度");

  write_file(in, "{\"text\": \"ok\"}\n{\"text\": 5}\n");
  EXPECT_EQ(run_shell(cmd + " < " + in + " > " + out + " 2> " + err), 1);
  EXPECT_NE(read_file(err).find("line 2"), std::string::npos) << read_file(err);
  write_file(in, "{\"ids\": [1, 2]}\nnot json\n");
  EXPECT_EQ(run_shell(cmd + " --decode < " + in + " > " + out + " 2> " + err), 1);
  EXPECT_NE(read_file(err).find("line 2"), std::string::npos) << read_file(err);
  fs::remove_all(dir);
}
