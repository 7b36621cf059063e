#include "train/token_shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "core/error.h"

namespace dsv3::train {

// The format is little-endian and both sides copy host-order words.
static_assert(std::endian::native == std::endian::little, "token shards assume a little-endian host");

namespace {
constexpr char kMagic[8] = {'D', 'S', 'V', '3', 'T', 'O', 'K', '1'};
constexpr uint32_t kVersion = 1;
constexpr size_t kHeader = 8 + 4 + 4 + 8 + 8;
}  // namespace

void write_token_shard(const std::string& path, const std::vector<uint32_t>& tokens, uint32_t vocab_size, uint64_t n_bytes) {
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  DSV3_CHECK(f, "{}: cannot create: {}", tmp, std::strerror(errno));
  const uint64_t n = tokens.size();
  bool ok = std::fwrite(kMagic, 1, 8, f) == 8 && std::fwrite(&kVersion, 4, 1, f) == 1 &&
            std::fwrite(&vocab_size, 4, 1, f) == 1 && std::fwrite(&n, 8, 1, f) == 1 && std::fwrite(&n_bytes, 8, 1, f) == 1 &&
            std::fwrite(tokens.data(), 4, tokens.size(), f) == tokens.size();
  ok = std::fflush(f) == 0 && ok;
  ok = fsync(fileno(f)) == 0 && ok;
  ok = std::fclose(f) == 0 && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    fail("{}: write failed: {}", path, std::strerror(errno));
  }
}

TokenShard TokenShard::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  DSV3_CHECK(fd >= 0, "{}: cannot open: {}", path, std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    fail("{}: cannot stat", path);
  }
  const uint64_t size = uint64_t(st.st_size);
  if (size < kHeader) {
    ::close(fd);
    fail("{}: {} bytes, shorter than the {}-byte token shard header", path, size, kHeader);
  }
  void* p = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  DSV3_CHECK(p != MAP_FAILED, "{}: mmap failed: {}", path, std::strerror(errno));
  TokenShard s;
  s.mapping_ = std::shared_ptr<void>(p, [size](void* q) { munmap(q, size); });
  const auto* b = static_cast<const uint8_t*>(p);
  DSV3_CHECK(std::memcmp(b, kMagic, 8) == 0, "{}: not a dsv3 token shard (bad magic)", path);
  uint32_t version = 0;
  std::memcpy(&version, b + 8, 4);
  DSV3_CHECK(version == kVersion, "{}: token shard version {}, this build reads {}", path, version, kVersion);
  std::memcpy(&s.info_.vocab_size, b + 12, 4);
  std::memcpy(&s.info_.n_tokens, b + 16, 8);
  std::memcpy(&s.info_.n_bytes, b + 24, 8);
  DSV3_CHECK(s.info_.n_tokens <= (size - kHeader) / 4 && size == kHeader + 4 * s.info_.n_tokens,
             "{}: header says {} tokens but the file has {} bytes (truncated or corrupt)", path, s.info_.n_tokens, size);
  s.data_ = reinterpret_cast<const uint32_t*>(b + kHeader);
  for (uint64_t i = 0; i < s.info_.n_tokens; ++i)
    DSV3_CHECK(s.data_[i] < s.info_.vocab_size, "{}: token {} is id {}, outside the vocabulary of {}", path, i, s.data_[i],
               s.info_.vocab_size);
  return s;
}

}  // namespace dsv3::train
