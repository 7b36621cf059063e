// Helpers for the training-data tests (BPE training, token shards, data prepare): a scratch folder, file
// I/O, running the dsv3 binary, and a deterministic synthetic corpus.
#pragma once
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

namespace dsv3::test {

// A fresh folder per test, removed afterwards.
struct ScratchDir {
  std::filesystem::path path;
  ScratchDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path = std::filesystem::temp_directory_path() /
           ("dsv3_data_" + std::string(info ? info->test_suite_name() : "x") + "_" +
            std::string(info ? info->name() : "x") + "_" + std::to_string(::getpid()));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

inline std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}
inline void spit(const std::string& path, const std::string& s) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << s;
}

struct RunResult {
  int status = -1;  // exit status
  std::string out, err;
};

// Runs `dsv3 ARGS` (args already shell-quoted where needed), capturing stdout and stderr.
inline RunResult run_dsv3(const std::string& args, const std::filesystem::path& scratch) {
  const std::string out = (scratch / "stdout.txt").string(), err = (scratch / "stderr.txt").string();
  const std::string cmd = std::string("OMP_WAIT_POLICY=PASSIVE ") + DSV3_BIN + " " + args + " >" + out + " 2>" + err;
  const int st = std::system(cmd.c_str());
  RunResult r;
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  r.out = slurp(out), r.err = slurp(err);
  return r;
}

// Deterministic text with what a pre-tokenizer must handle: words (some capitalised, some contracted),
// punctuation runs, digit runs, CJK and other non-ASCII letters, emoji, tabs, double spaces, CRLF and blank
// lines. Uses only mt19937's raw output, which the standard fixes across platforms.
inline std::string synthetic_text(size_t bytes, uint32_t seed) {
  static const char* syl[] = {"the", "and", "of", "be", "ing", "tion", "un", "re", "ta", "lo", "mi", "ka",
                              "st", "er", "ou", "ph", "qu", "zz", "ar", "el", "on", "is", "th", "ch"};
  static const char* odd[] = {"café", "naïve", "日本語", "テスト", "Ωmega", "🎉", "straße", "ﬁne", "中文字", "ひらがな",
                              "über", "Ελλάδα", "\u00A0", "\u3000", "\u180E", "—", "“quoted”", "…"};
  static const char* punct[] = {",", ".", ";", ":", "!", "?", "'s", "'", "\"", "(", ")", "...", "-", "?!", "#"};
  std::mt19937 rng(seed);
  auto pick = [&](size_t n) { return size_t(rng() % n); };
  std::string s;
  while (s.size() < bytes) {
    const size_t words = 3 + pick(14);
    for (size_t w = 0; w < words; ++w) {
      if (w) s += pick(25) == 0 ? "  " : pick(40) == 0 ? "\t" : " ";
      const size_t r = pick(100);
      if (r < 6) {
        s += odd[pick(std::size(odd))];
      } else if (r < 12) {
        s += std::to_string(rng() % (pick(2) ? 100000 : 100));
      } else {
        std::string word;
        for (size_t k = 0, n = 1 + pick(4); k < n; ++k) word += syl[pick(std::size(syl))];
        if (pick(6) == 0) word[0] = char(word[0] - 'a' + 'A');
        s += word;
      }
      if (pick(6) == 0) s += punct[pick(std::size(punct))];
    }
    s += pick(15) == 0 ? "\r\n" : pick(12) == 0 ? "\n\n" : "\n";
  }
  return s;
}

}  // namespace dsv3::test
