// BPE training (tokenizer/bpe_train.h): the trained tokenizer.json loads in our Tokenizer with exactly the
// requested vocabulary, round-trips unseen text, reaches every token, splits words exactly as the Tokenizer's
// pre-tokenizer does, breaks ties deterministically; and bad input gives one-line errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/text_file.h"
#include "text_data_util.h"
#include "tokenizer/bpe_train.h"
#include "tokenizer/tokenizer.h"

namespace dsv3 {
namespace {

using test::ScratchDir;
using json = nlohmann::json;

std::string corpus() {
  static const std::string c = test::synthetic_text(150'000, 1);
  return c;
}

// Trains on `text`, saves into `dir` and loads the result.
Tokenizer train_and_load(const std::string& text, int64_t vocab, const ScratchDir& dir) {
  bpe::save(bpe::train(text, {.vocab_size = vocab}), dir / "tokenizer.json");
  return Tokenizer::load(dir / "tokenizer.json");
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(BpeTrain, VocabIsExactAndLoadsWithSpecialTokensFirst) {
  ScratchDir dir;
  const bpe::Trained t = bpe::train(corpus(), {.vocab_size = 1200});
  ASSERT_EQ(t.vocab.size(), 1200u);
  EXPECT_GE(t.merges.size(), 1200u - 261u);  // more only when two merges spell the same token
  bpe::save(t, dir / "tokenizer.json");
  const Tokenizer tok = Tokenizer::load(dir / "tokenizer.json");
  EXPECT_EQ(tok.vocab_size(), 1200);
  for (size_t i = 0; i < bpe::kSpecialTokens.size(); ++i) {
    EXPECT_EQ(tok.token_id(bpe::kSpecialTokens[i]), int32_t(i));
    EXPECT_TRUE(tok.is_special(int32_t(i)));
  }
  EXPECT_EQ(tok.bos_id(), 0);
  EXPECT_EQ(tok.eos_id(), 1);
  EXPECT_FALSE(tok.is_special(5));
  // The byte tokens follow in code point order of the byte-level alphabet: '!' first, 'Ġ' (space) later.
  EXPECT_EQ(tok.token_text(5), "!");
  // 188 printable bytes map to themselves; then the 68 remapped ones from U+0100 on: byte 0 first, space (32) at +32.
  EXPECT_EQ(tok.token_bytes(5 + 188), std::string(1, '\0'));
  EXPECT_EQ(tok.token_text(5 + 188 + 32), "Ġ");
  const json config = json::parse(test::slurp(dir / "tokenizer_config.json"));
  EXPECT_EQ(config["bos_token"], bpe::kSpecialTokens[0]);
  EXPECT_EQ(config["eos_token"], bpe::kSpecialTokens[1]);
  // The pre-tokenizer and decoder sections are the official DeepSeek-V3 ones, verbatim.
  const json ours = json::parse(test::slurp(dir / "tokenizer.json"));
  const json official = json::parse(test::slurp(std::string(DSV3_SHARED_DIR) + "/golden/tokenizer/tokenizer.json"));
  EXPECT_EQ(ours["pre_tokenizer"], official["pre_tokenizer"]);
  EXPECT_EQ(ours["decoder"], official["decoder"]);
  EXPECT_EQ(ours["normalizer"], official["normalizer"]);
  EXPECT_EQ(ours["model"]["byte_fallback"], false);
  EXPECT_TRUE(ours["model"]["merges"][0].is_array());
}

TEST(BpeTrain, RoundTripsHeldOutText) {
  ScratchDir dir;
  const Tokenizer tok = train_and_load(corpus(), 1500, dir);
  std::vector<std::string> held_out = {
      test::synthetic_text(20'000, 2),
      "",
      "never seen: Zyxwvut 987654321 ØÆÅ ŝ ǅ ℌ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🧪🧬 عربي हिन्दी",
      "  lead\r\n\r\n\t\ttrail  \n",
      "<｜User｜>Hello<｜Assistant｜>Hi<｜end▁of▁sentence｜>",
      "a'b'c\"d\"(e)[f]{g}",
  };
  for (const std::string& s : held_out) {
    const std::vector<int32_t> ids = tok.encode(s);
    EXPECT_EQ(tok.decode(ids), s) << s.substr(0, 80);
  }
  // It has learnt something: unseen text of the same kind takes well under one token per byte.
  EXPECT_LT(tok.encode(held_out[0]).size(), held_out[0].size() / 2);
}

// Every token that is whole characters is what encoding its own text gives. Tokens that are part of a character
// (a lone byte >= 0x80, or a merge of a character's first bytes) have no text of their own; those that a later
// merge always absorbs (as HF's trainer leaves them too) are reachable from no text at all, so they are left out.
TEST(BpeTrain, EveryWholeCharacterTokenIsReachable) {
  ScratchDir dir;
  const Tokenizer tok = train_and_load(corpus(), 1500, dir);
  int checked = 0;
  for (int32_t id = 0; id < tok.vocab_size(); ++id) {
    const std::string& bytes = tok.token_bytes(id);
    if (utf8::find_invalid(bytes) != std::string::npos) continue;
    EXPECT_EQ(tok.encode(bytes), std::vector<int32_t>{id}) << "token " << id << " '" << tok.token_text(id) << "'";
    ++checked;
  }
  EXPECT_GT(checked, 1300);  // all but the 128 bytes >= 0x80 and a few dozen partial merges
}

// Trained to the largest vocabulary the text allows, every distinct word is one token. So encoding the text
// with the loaded Tokenizer gives one token per piece of the trainer's pre-tokenizer exactly when both split
// alike: on digits, CJK, whitespace runs, U+180E (where Oniguruma's \s and PCRE2's differ), CRLF, specials.
TEST(BpeTrain, SegmentationMatchesTokenizer) {
  ScratchDir dir;
  const std::string text = test::synthetic_text(3000, 3) +
                           "x \u180E y\u180E\u00A0 z 1234567 12 日本語の文 a  \n\n  b\r\n\t<｜User｜>q <｜▁pad▁｜>";
  const std::string err = error_of([&] { bpe::train(text, {.vocab_size = 1 << 20}); });
  const size_t at = err.find("no pair left to merge at ");
  ASSERT_NE(at, std::string::npos) << err;
  const int64_t max_vocab = std::stoll(err.substr(at + 25));
  const Tokenizer tok = train_and_load(text, max_vocab, dir);
  const std::vector<std::string_view> pieces = bpe::pretokenize(text);
  std::vector<std::string> expected;
  for (std::string_view p : pieces) expected.emplace_back(p);
  std::vector<std::string> got;
  for (int32_t id : tok.encode(text))
    if (!tok.is_special(id)) got.push_back(tok.token_bytes(id));
  EXPECT_EQ(got, expected);
}

TEST(BpeTrain, TiesGoToTheSmallestPairAndCountsAreWeightedByFrequency) {
  // Pairs: (a,b) 3; (Ġ,a), (Ġ,c), (c,d) 2 each. After "ab": (Ġ,ab), (Ġ,c), (c,d) tie at 2 and 'c' has a
  // smaller id than 'Ġ' (U+0120); after "cd": (Ġ,ab) before (Ġ,cd) since "ab" is the older token.
  const bpe::Trained t = bpe::train("ab ab ab cd cd", {.vocab_size = 265});
  using P = std::pair<std::string, std::string>;
  EXPECT_EQ(t.merges, (std::vector<P>{{"a", "b"}, {"c", "d"}, {"Ġ", "ab"}, {"Ġ", "cd"}}));
  EXPECT_EQ(t.n_words, 5);
  EXPECT_EQ(t.n_distinct_words, 3);
  // Overlapping pairs merge left to right: "aaaa" -> "aa aa" -> "aaaa", then nothing is left.
  EXPECT_EQ(bpe::train("aaaa", {.vocab_size = 263}).merges, (std::vector<P>{{"a", "a"}, {"aa", "aa"}}));
  EXPECT_NE(error_of([] { bpe::train("aaaa", {.vocab_size = 264}); }).find("too small"), std::string::npos);
}

TEST(BpeTrain, IsDeterministic) {
  const std::string text = corpus().substr(0, 40'000);
  EXPECT_EQ(bpe::tokenizer_json(bpe::train(text, {.vocab_size = 700})),
            bpe::tokenizer_json(bpe::train(text, {.vocab_size = 700})));
}

TEST(BpeTrain, RejectsBadInput) {
  EXPECT_NE(error_of([] { bpe::train("", {.vocab_size = 300}); }).find("empty"), std::string::npos);
  // Only specials: nothing left to learn from.
  EXPECT_NE(error_of([] { bpe::train("<｜User｜>", {.vocab_size = 300}); }).find("no text"), std::string::npos);
  const std::string low = error_of([] { bpe::train("hello", {.vocab_size = 260}); });
  EXPECT_NE(low.find("vocab size 260 is below the minimum 261"), std::string::npos) << low;
  EXPECT_EQ(bpe::train("hello", {.vocab_size = 261}).merges.size(), 0u);  // bytes + specials only
  EXPECT_NE(error_of([] { bpe::train("ok \xC3\x28", {.vocab_size = 300}); }).find("invalid UTF-8 at byte 3"),
            std::string::npos);
}

TEST(BpeTrainCorpus, ReadsFilesAndNamesTheBadOne) {
  ScratchDir dir;
  test::spit(dir / "a.txt", "first line\nno newline at end");
  test::spit(dir / "b.txt", "second file\n");
  test::spit(dir / "bad.txt", "good\nbad \xFF here");
  EXPECT_EQ(io::read_utf8_files({dir / "a.txt", dir / "b.txt"}), "first line\nno newline at end\nsecond file\n");
  EXPECT_EQ(error_of([&] { io::read_utf8_files({dir / "a.txt", dir / "bad.txt"}); }),
            dir / "bad.txt" + ": invalid UTF-8 at byte 9");
  EXPECT_EQ(error_of([&] { io::read_utf8_files({dir / "missing.txt"}); }), dir / "missing.txt" + ": no such file");
}

TEST(BpeTrainCli, TrainsAndRejectsBadInputWithOneLineErrors) {
  ScratchDir dir;
  test::spit(dir / "corpus.txt", corpus());
  const std::string out = dir / "out/tokenizer.json";
  test::RunResult r =
      test::run_dsv3("tokenizer train --input " + dir / "corpus.txt" + " --vocab-size 800 --output " + out, dir.path);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("merges/s"), std::string::npos) << r.err;  // progress
  EXPECT_EQ(Tokenizer::load(out).vocab_size(), 800);
  EXPECT_TRUE(std::filesystem::exists(dir / "out/tokenizer_config.json"));

  test::spit(dir / "empty.txt", "");
  test::spit(dir / "bad.txt", "fine\n\xE2\x82 broken");
  struct Case {
    std::string args, expect;
  };
  const std::vector<Case> cases = {
      {"--input " + dir / "missing.txt" + " --vocab-size 300", dir / "missing.txt" + ": no such file"},
      {"--input " + dir / "bad.txt" + " --vocab-size 300", dir / "bad.txt" + ": invalid UTF-8 at byte 5"},
      {"--input " + dir / "empty.txt" + " --vocab-size 300", "corpus is empty"},
      {"--input " + dir / "corpus.txt" + " --vocab-size 100", "below the minimum 261"},
  };
  for (const Case& c : cases) {
    r = test::run_dsv3("tokenizer train " + c.args + " --output " + dir / "new.json", dir.path);
    EXPECT_EQ(r.status, 1) << c.args;
    EXPECT_NE(r.err.find(c.expect), std::string::npos) << c.args << ": " << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    EXPECT_FALSE(std::filesystem::exists(dir / "new.json"));
  }
}

}  // namespace
}  // namespace dsv3
