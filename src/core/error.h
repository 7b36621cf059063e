// Errors: every failure on bad input is a dsv3::Error carrying one line that names the file/field and the
// problem. Callers at the edge (the CLI) print it and exit non-zero; nothing below them catches it.
#pragma once
#include <fmt/format.h>
#include <stdexcept>
#include <string>
#include <utility>

namespace dsv3 {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <class... Args>
[[noreturn]] void fail(fmt::format_string<Args...> f, Args&&... args) {
  throw Error(fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace dsv3

#define DSV3_CHECK(cond, ...)                     \
  do {                                            \
    if (!(cond)) ::dsv3::fail(__VA_ARGS__);       \
  } while (0)
