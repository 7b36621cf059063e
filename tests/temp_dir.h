// A scratch folder per test, removed with everything in it when the test ends: `prefix_<test>_<pid>_<n>` under
// the system's temp folder. `create` false leaves only the (cleared) path, for code that must create it itself.
#pragma once
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <iterator>
#include <string>

namespace dsv3::test {

struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& prefix = "dsv3", bool create = true) {
    static int counter = 0;
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path = std::filesystem::temp_directory_path() / (prefix + "_" + std::string(info ? info->name() : "x") + "_" +
                                                     std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
    if (create) std::filesystem::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& name) const { return (path / name).string(); }
  size_t count() const {
    return size_t(std::distance(std::filesystem::directory_iterator(path), std::filesystem::directory_iterator()));
  }
};

}  // namespace dsv3::test
