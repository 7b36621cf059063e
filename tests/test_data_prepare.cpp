// dsv3 data prepare (train/data_prepare.h): the validation split falls on a line boundary at the requested
// share, the shards decode back to exactly the text (train + validation = corpus), val.txt holds the
// validation bytes, and bad input gives one-line errors and no output.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "core/error.h"
#include "text_data_util.h"
#include "tokenizer/bpe_train.h"
#include "tokenizer/tokenizer.h"
#include "train/data_prepare.h"
#include "train/token_shard.h"

namespace dsv3::train {
namespace {

using test::ScratchDir;

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

std::string golden_tokenizer() { return std::string(DSV3_SHARED_DIR) + "/golden/tokenizer/tokenizer.json"; }

std::string decode(const Tokenizer& tok, const TokenShard& s) {
  return tok.decode(std::vector<int32_t>(s.data(), s.data() + s.size()));
}

TEST(DataPrepare, ValidationCutIsTheNextLineStart) {
  const std::string text = "aaaa\nbbbb\ncccc\ndddd\n";  // 20 bytes, lines start at 0, 5, 10, 15
  EXPECT_EQ(validation_cut(text, 0.25), 15u);  // target 15 is a line start
  EXPECT_EQ(validation_cut(text, 0.3), 15u);   // target 14 -> next line start
  EXPECT_EQ(validation_cut(text, 0.5), 10u);
  EXPECT_EQ(validation_cut(text, 0.01), 20u);  // no line left: validation would be empty
  EXPECT_EQ(validation_cut("no newline at all", 0.5), 17u);
  EXPECT_EQ(validation_cut("x\ny", 0.5), 2u);  // the last line needs no '\n'
}

TEST(DataPrepare, ShardsDecodeToTheSplitText) {
  ScratchDir dir;
  const std::string text = test::synthetic_text(60'000, 5);
  const size_t half = text.find('\n', 30'000) + 1;  // two files, split between lines
  test::spit(dir / "a.txt", text.substr(0, half));
  test::spit(dir / "b.txt", text.substr(half));
  const PrepareResult r = prepare_data({golden_tokenizer(), {dir / "a.txt", dir / "b.txt"}, dir / "out/data", 0.1});
  const size_t cut = validation_cut(text, 0.1);
  ASSERT_GT(cut, 0u);
  ASSERT_LT(cut, text.size());
  EXPECT_EQ(text[cut - 1], '\n');
  EXPECT_NEAR(double(text.size() - cut), 0.1 * double(text.size()), 200.0);  // within a line of the share

  const Tokenizer tok = Tokenizer::load(golden_tokenizer());
  const TokenShard train = TokenShard::open(dir / "out/data/train.bin");
  const TokenShard val = TokenShard::open(dir / "out/data/val.bin");
  EXPECT_EQ(decode(tok, train), text.substr(0, cut));
  EXPECT_EQ(decode(tok, val), text.substr(cut));
  EXPECT_EQ(test::slurp(dir / "out/data/val.txt"), text.substr(cut));
  // Tokenized as plain documents: no BOS or other special token.
  EXPECT_EQ(std::count_if(train.data(), train.data() + train.size(), [&](uint32_t id) { return tok.is_special(int32_t(id)); }), 0);
  for (const auto& [shard, info, bytes] : {std::tuple{&train, r.train, cut}, std::tuple{&val, r.val, text.size() - cut}}) {
    EXPECT_EQ(shard->info().vocab_size, uint32_t(tok.vocab_size()));
    EXPECT_EQ(shard->info().n_bytes, bytes);
    EXPECT_EQ(info.n_bytes, bytes);
    EXPECT_EQ(info.n_tokens, shard->info().n_tokens);
    EXPECT_EQ(info.vocab_size, shard->info().vocab_size);
  }
}

// The demo's path: train a tokenizer on the corpus, then prepare the data with it, both through the CLI.
TEST(DataPrepare, CliEndToEndWithATrainedTokenizer) {
  ScratchDir dir;
  const std::string text = test::synthetic_text(80'000, 6);
  test::spit(dir / "corpus.txt", text);
  test::RunResult r = test::run_dsv3(
      "tokenizer train --input " + dir / "corpus.txt" + " --vocab-size 700 --output " + dir / "tok/tokenizer.json",
      dir.path);
  ASSERT_EQ(r.status, 0) << r.err;
  r = test::run_dsv3("data prepare --tokenizer " + dir / "tok/tokenizer.json" + " --input " + dir / "corpus.txt" +
                         " --output " + dir / "data" + " --val-fraction 0.2",
                     dir.path);
  ASSERT_EQ(r.status, 0) << r.err;
  const TokenShard train = TokenShard::open(dir / "data/train.bin"), val = TokenShard::open(dir / "data/val.bin");
  EXPECT_NE(r.out.find("train.bin: " + std::to_string(train.size()) + " tokens"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("val.bin: " + std::to_string(val.size()) + " tokens"), std::string::npos) << r.out;
  EXPECT_EQ(train.info().vocab_size, 700u);
  const Tokenizer tok = Tokenizer::load(dir / "tok/tokenizer.json");
  EXPECT_EQ(decode(tok, train) + decode(tok, val), text);
  EXPECT_EQ(test::slurp(dir / "data/val.txt"), decode(tok, val));
  EXPECT_LT(train.size() + val.size(), int64_t(text.size()) / 2);  // the trained merges compress
}

TEST(DataPrepare, RejectsBadInputWithoutWritingAnything) {
  ScratchDir dir;
  test::spit(dir / "empty.txt", "");
  test::spit(dir / "one_line.txt", "a single line, so nothing is left for validation\n");
  test::spit(dir / "two_lines.txt", "a\nb\n");
  test::spit(dir / "bad.txt", "line one\nline \xC0\xAF two\n");
  test::spit(dir / "ok.txt", test::synthetic_text(2000, 7));
  struct Case {
    std::string inputs, extra, expect;
  };
  const std::string tok = golden_tokenizer();  // a case's extra "--tokenizer" replaces it
  const std::vector<Case> cases = {
      {dir / "empty.txt", "", "corpus is empty"},
      {dir / "one_line.txt", "", "no line is left for validation"},
      {dir / "two_lines.txt", " --val-fraction 0.95", "the training part is empty"},
      {dir / "ok.txt " + dir / "bad.txt", "", dir / "bad.txt" + ": invalid UTF-8 at byte 14"},
      {dir / "missing.txt", "", dir / "missing.txt" + ": no such file"},
      {dir / "ok.txt", " --val-fraction 1.5", "--val-fraction 1.5 must be between 0 and 1"},
      {dir / "ok.txt", " --tokenizer " + dir / "nope.json", dir / "nope.json" + ": cannot open"},
  };
  for (const Case& c : cases) {
    const bool own_tok = c.extra.find("--tokenizer") != std::string::npos;
    const std::string args = "data prepare" + (own_tok ? "" : " --tokenizer " + tok) + " --input " + c.inputs +
                             " --output " + dir / "out" + c.extra;
    const test::RunResult r = test::run_dsv3(args, dir.path);
    EXPECT_EQ(r.status, 1) << args;
    EXPECT_NE(r.err.find(c.expect), std::string::npos) << args << "\n" << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_FALSE(std::filesystem::exists(dir / "out")) << args;
  }
  // The library reports the same.
  const std::string e = error_of([&] { prepare_data({tok, {dir / "empty.txt"}, dir / "out", 0.05}); });
  EXPECT_NE(e.find("corpus is empty"), std::string::npos) << e;
}

}  // namespace
}  // namespace dsv3::train
