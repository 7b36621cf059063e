#include "io/atomic_dir.h"

#include <filesystem>

#include "core/error.h"

namespace dsv3::io {
namespace fs = std::filesystem;

namespace {
fs::path sibling(const std::string& target, const char* suffix) {
  fs::path p(target);
  if (p.filename().empty()) p = p.parent_path();  // "dir/" names the same folder as "dir"
  return p.string() + suffix;
}
}  // namespace

void recover_dir(const std::string& target) {
  const fs::path old = sibling(target, ".old"), tmp = sibling(target, ".tmp");
  std::error_code ec;
  if (!fs::exists(target, ec) && fs::is_directory(old, ec)) fs::rename(old, target);
  fs::remove_all(tmp, ec);
  if (fs::exists(target, ec)) fs::remove_all(old, ec);
}

void replace_dir_atomically(const std::string& target, const std::function<void(const std::string& tmp)>& fill) {
  recover_dir(target);
  const fs::path old = sibling(target, ".old"), tmp = sibling(target, ".tmp");
  std::error_code ec;
  if (!fs::path(target).parent_path().empty()) fs::create_directories(fs::path(target).parent_path(), ec);
  fs::create_directories(tmp, ec);
  if (ec) fail("{}: cannot create folder: {}", tmp.string(), ec.message());
  try {
    fill(tmp.string());
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  if (fs::exists(target)) fs::rename(target, old);
  fs::rename(tmp, target);
  fs::remove_all(old, ec);
}

}  // namespace dsv3::io
