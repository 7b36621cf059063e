// Token shards (train/token_shard.h): the documented byte layout, round trip through mmap, and a one-line
// error naming the file for every kind of damage.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "core/error.h"
#include "text_data_util.h"
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

template <class T>
void put(std::string& s, size_t at, T v) {
  std::memcpy(s.data() + at, &v, sizeof v);
}

TEST(TokenShard, RoundTripsWithTheDocumentedLayout) {
  ScratchDir dir;
  const std::vector<uint32_t> tokens = {0, 7, 4095, 12, 0x01020304 % 4096, 1};
  write_token_shard(dir / "s.bin", tokens, 4096, 1234);
  // Header by hand: magic, u32 version, u32 vocab, u64 n_tokens, u64 n_bytes, then u32 ids, little-endian.
  const std::string raw = test::slurp(dir / "s.bin");
  ASSERT_EQ(raw.size(), 32 + 4 * tokens.size());
  EXPECT_EQ(raw.substr(0, 8), "DSV3TOK1");
  EXPECT_EQ(raw.substr(8, 8), std::string("\x01\x00\x00\x00\x00\x10\x00\x00", 8));
  EXPECT_EQ(raw.substr(16, 16), std::string("\x06\0\0\0\0\0\0\0\xD2\x04\0\0\0\0\0\0", 16));
  EXPECT_EQ(raw.substr(36, 4), std::string("\x07\0\0\0", 4));
  const TokenShard s = TokenShard::open(dir / "s.bin");
  EXPECT_EQ(s.info().vocab_size, 4096u);
  EXPECT_EQ(s.info().n_tokens, tokens.size());
  EXPECT_EQ(s.info().n_bytes, 1234u);
  ASSERT_EQ(s.size(), int64_t(tokens.size()));
  EXPECT_EQ(std::vector<uint32_t>(s.data(), s.data() + s.size()), tokens);
  // Overwriting is atomic and leaves no temporary behind.
  write_token_shard(dir / "s.bin", {3, 2, 1}, 8, 3);
  EXPECT_EQ(TokenShard::open(dir / "s.bin").size(), 3);
  int files = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator(dir.path)) ++files;
  EXPECT_EQ(files, 1);
}

TEST(TokenShard, EmptyShardIsValid) {
  ScratchDir dir;
  write_token_shard(dir / "e.bin", {}, 100, 0);
  const TokenShard s = TokenShard::open(dir / "e.bin");
  EXPECT_EQ(s.size(), 0);
  EXPECT_EQ(s.info().vocab_size, 100u);
  EXPECT_EQ(test::slurp(dir / "e.bin").size(), 32u);
}

TEST(TokenShard, RejectsTruncatedFiles) {
  ScratchDir dir;
  write_token_shard(dir / "t.bin", {1, 2, 3, 4}, 10, 4);
  const std::string raw = test::slurp(dir / "t.bin");
  test::spit(dir / "body.bin", raw.substr(0, raw.size() - 2));  // half of the last id gone
  const std::string e1 = error_of([&] { TokenShard::open(dir / "body.bin"); });
  EXPECT_NE(e1.find(dir / "body.bin"), std::string::npos) << e1;
  EXPECT_NE(e1.find("truncated"), std::string::npos) << e1;
  test::spit(dir / "head.bin", raw.substr(0, 20));  // not even a header
  const std::string e2 = error_of([&] { TokenShard::open(dir / "head.bin"); });
  EXPECT_NE(e2.find(dir / "head.bin"), std::string::npos) << e2;
  EXPECT_NE(e2.find("header"), std::string::npos) << e2;
  test::spit(dir / "long.bin", raw + "xx");  // trailing bytes are damage too
  EXPECT_NE(error_of([&] { TokenShard::open(dir / "long.bin"); }).find("corrupt"), std::string::npos);
}

TEST(TokenShard, RejectsBadMagicAndVersion) {
  ScratchDir dir;
  write_token_shard(dir / "m.bin", {1}, 10, 1);
  std::string raw = test::slurp(dir / "m.bin");
  raw[7] = '2';
  test::spit(dir / "magic.bin", raw);
  EXPECT_EQ(error_of([&] { TokenShard::open(dir / "magic.bin"); }), dir / "magic.bin" + ": not a dsv3 token shard (bad magic)");
  raw[7] = '1';
  put<uint32_t>(raw, 8, 2);
  test::spit(dir / "version.bin", raw);
  const std::string e = error_of([&] { TokenShard::open(dir / "version.bin"); });
  EXPECT_NE(e.find(dir / "version.bin"), std::string::npos) << e;
  EXPECT_NE(e.find("version 2"), std::string::npos) << e;
  EXPECT_NE(error_of([&] { TokenShard::open(dir / "missing.bin"); }).find(dir / "missing.bin"), std::string::npos);
}

TEST(TokenShard, RejectsIdsOutsideTheVocabularyNamingTheIndex) {
  ScratchDir dir;
  write_token_shard(dir / "v.bin", {0, 9, 10, 3}, 10, 4);  // id 10 at index 2: vocab is 10
  EXPECT_EQ(error_of([&] { TokenShard::open(dir / "v.bin"); }),
            dir / "v.bin" + ": token 2 is id 10, outside the vocabulary of 10");
  write_token_shard(dir / "ok.bin", {0, 9, 9, 3}, 10, 4);
  EXPECT_EQ(TokenShard::open(dir / "ok.bin").data()[1], 9u);
}

}  // namespace
}  // namespace dsv3::train
