#pragma once
#include <cmath>
#include <cstdlib>
#include <string>

#include "core/tensor.h"

namespace dsv3::test {

// ../shared beside the checkout (fixed at configure time); DSV3_SHARED_DIR in the environment overrides it, for
// binaries run on another machine (the GPU tests).
inline std::string shared_dir() {
  const char* env = std::getenv("DSV3_SHARED_DIR");
  return env && *env ? env : DSV3_SHARED_DIR;
}
inline std::string golden_dir(const std::string& c) { return shared_dir() + "/golden/" + c; }

// ‖a − b‖ / ‖b‖ over all elements (both converted to float64).
inline double rel_l2(const Tensor& a, const Tensor& b) {
  DSV3_CHECK(a.shape() == b.shape(), "rel_l2: shapes {} vs {}", shape_str(a.shape()), shape_str(b.shape()));
  Tensor x = a.to(DType::F32), y = b.to(DType::F32);
  double num = 0, den = 0;
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double d = double(x.f32()[i]) - double(y.f32()[i]);
    num += d * d;
    den += double(y.f32()[i]) * double(y.f32()[i]);
  }
  return std::sqrt(num / (den > 0 ? den : 1.0));
}

}  // namespace dsv3::test
