// Helpers for the CUDA kernel tests: skip without a GPU, host<->device vectors, random data, relative L2.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "kernels/cuda/cuda_ops.h"

// Every GPU test starts with this: a machine without a GPU (CI) skips with the runtime's reason.
#define DSV3_REQUIRE_GPU()                                                                           \
  do {                                                                                               \
    if (::dsv3::cuda::device_count() == 0) GTEST_SKIP() << "no CUDA GPU: " << ::dsv3::cuda::no_device_reason(); \
  } while (0)

namespace dsv3::cuda::test {

template <class T>
DeviceBuffer<T> upload(const std::vector<T>& v) {
  DeviceBuffer<T> d(v.size());
  copy_to_device(d.get(), v.data(), v.size() * sizeof(T));
  return d;
}
template <class T>
std::vector<T> download(const DeviceBuffer<T>& d, size_t n = size_t(-1)) {
  if (n == size_t(-1)) n = d.size();
  std::vector<T> v(n);
  synchronize();
  copy_to_host(v.data(), d.get(), n * sizeof(T));
  return v;
}
// Output poisoning: every byte 0xff (a NaN for f32 and bf16), so unwritten elements fail the finiteness check.
template <class T>
DeviceBuffer<T> poisoned(size_t n) {
  DeviceBuffer<T> d(n);
  memset_device(d.get(), 0xff, n * sizeof(T));
  return d;
}

inline std::vector<float> randn(size_t n, std::mt19937_64& rng, float sd = 1.0f, float mean = 0.0f) {
  std::normal_distribution<float> nd(mean, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}
inline std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = f32_to_bf16(v[i]);
  return o;
}
inline std::vector<float> from_bf16(const std::vector<uint16_t>& v) {
  std::vector<float> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = bf16_to_f32(v[i]);
  return o;
}
inline std::vector<float> round_bf16(const std::vector<float>& v) { return from_bf16(to_bf16(v)); }

inline bool all_finite(const std::vector<float>& v) {
  for (float x : v)
    if (!std::isfinite(x)) return false;
  return true;
}
// ‖a − b‖ / ‖b‖ in double; NaN anywhere gives NaN (which fails every `<` check).
inline double rel_l2(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    const double d = double(a[i]) - double(b[i]);
    num += d * d;
    den += double(b[i]) * double(b[i]);
  }
  return std::sqrt(num / (den > 0 ? den : 1.0));
}

}  // namespace dsv3::cuda::test
