// Token shards: a corpus tokenized once, memory-mapped by the trainer. Layout (little-endian):
// 8-byte magic "DSV3TOK1", u32 version (1), u32 vocab_size, u64 n_tokens, u64 n_bytes (UTF-8 bytes of the
// source text, for bits per byte), then n_tokens u32 token ids.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dsv3::train {

struct ShardInfo {
  uint32_t vocab_size = 0;
  uint64_t n_tokens = 0;
  uint64_t n_bytes = 0;
};

// Atomic (temporary file + rename).
void write_token_shard(const std::string& path, const std::vector<uint32_t>& tokens, uint32_t vocab_size, uint64_t n_bytes);

class TokenShard {
 public:
  // mmap; validates magic, version, file size, and every id < vocab_size. Errors name the file (and the
  // index of a bad token).
  static TokenShard open(const std::string& path);
  const ShardInfo& info() const { return info_; }
  const uint32_t* data() const { return data_; }
  int64_t size() const { return int64_t(info_.n_tokens); }

 private:
  ShardInfo info_;
  std::shared_ptr<void> mapping_;
  const uint32_t* data_ = nullptr;
};

}  // namespace dsv3::train
