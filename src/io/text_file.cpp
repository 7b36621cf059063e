#include "io/text_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace dsv3::io {

std::string read_utf8_files(const std::vector<std::string>& paths) {
  std::string out;
  for (const std::string& path : paths) {
    std::error_code ec;
    DSV3_CHECK(std::filesystem::exists(path, ec), "{}: no such file", path);
    DSV3_CHECK(std::filesystem::is_regular_file(path, ec), "{}: not a regular file", path);
    std::ifstream f(path, std::ios::binary);
    DSV3_CHECK(f, "{}: cannot open: {}", path, std::strerror(errno));
    std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    DSV3_CHECK(!f.bad(), "{}: read failed", path);
    const size_t bad = utf8::find_invalid(text);
    DSV3_CHECK(bad == std::string::npos, "{}: invalid UTF-8 at byte {}", path, bad);
    if (!out.empty() && out.back() != '\n') out += '\n';
    out += text;
  }
  return out;
}

void write_file_atomically(const std::string& path, std::string_view data) {
  std::string tmp = path + ".tmp.XXXXXX";
  const int fd = mkstemp(tmp.data());
  DSV3_CHECK(fd >= 0, "{}: cannot create a temporary file: {}", path, std::strerror(errno));
  fchmod(fd, 0644);  // mkstemp's 0600 would hide the output from other users
  auto give_up = [&](bool close_fd) {
    const std::string why = std::strerror(errno);
    if (close_fd) ::close(fd);
    ::unlink(tmp.c_str());
    fail("{}: write failed: {}", path, why);
  };
  for (size_t done = 0; done < data.size();) {
    const ssize_t w = ::write(fd, data.data() + done, data.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) give_up(true);
    done += size_t(w);
  }
  if (fsync(fd) != 0) give_up(true);
  if (::close(fd) != 0) give_up(false);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) give_up(false);
}

}  // namespace dsv3::io
