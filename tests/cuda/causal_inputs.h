// Shared setup of the causal prefill attention tests (test_cuda_attention.cpp, test_flash_prefill.cpp): random q, k, v
// on the host and the device, in the layouts the model passes, and the CPU twin's output.
#pragma once
#include <cmath>
#include <random>
#include <vector>

#include "core/tensor.h"
#include "cuda_test_util.h"
#include "kernels/cuda/infer_ops.h"
#include "kernels/ops.h"

namespace dsv3::cuda::test {

inline std::vector<float> vec(const Tensor& t) {
  Tensor c = t.contiguous();
  return std::vector<float>(c.f32(), c.f32() + c.numel());
}

struct CausalInputs {
  Tensor o;  // ops::attention_causal on the same inputs, [B, T, H, Dv]
  float scale = 0.0f;
  DeviceBuffer<float> all, q, k, v;
  const float* pq = nullptr;
  const float* pk = nullptr;
  const float* pv = nullptr;
  Strides3 sq, sk, sv;
};

// packed: q, k, v are slices of one [B, T, H, D + D + Dv + pad] buffer (strided views, as a fused projection
// gives; an odd pad puts rows off 16 bytes); else three contiguous tensors.
inline CausalInputs causal_inputs(int64_t B, int64_t T, int64_t H, int64_t D, int64_t Dv, bool packed, int64_t pad,
                                  std::mt19937_64& rng) {
  CausalInputs c;
  Tensor q, k, v;
  if (packed) {
    const int64_t row = D + D + Dv + pad;
    const std::vector<float> qkv = randn(size_t(B * T * H * row), rng);
    Tensor all = Tensor::from_vector(qkv, {B, T, H, row});
    q = all.slice(3, 0, D);
    k = all.slice(3, D, 2 * D);
    v = all.slice(3, 2 * D, 2 * D + Dv);
    c.sq = c.sk = c.sv = Strides3{T * H * row, H * row, row};
    c.all = upload(qkv);
    c.pq = c.all.get();
    c.pk = c.all.get() + D;
    c.pv = c.all.get() + 2 * D;
  } else {
    const std::vector<float> qh = randn(size_t(B * T * H * D), rng), kh = randn(size_t(B * T * H * D), rng),
                             vh = randn(size_t(B * T * H * Dv), rng);
    q = Tensor::from_vector(qh, {B, T, H, D});
    k = Tensor::from_vector(kh, {B, T, H, D});
    v = Tensor::from_vector(vh, {B, T, H, Dv});
    c.sq = c.sk = Strides3{T * H * D, H * D, D};
    c.sv = Strides3{T * H * Dv, H * Dv, Dv};
    c.q = upload(qh);
    c.k = upload(kh);
    c.v = upload(vh);
    c.pq = c.q.get();
    c.pk = c.k.get();
    c.pv = c.v.get();
  }
  c.scale = 1.0f / std::sqrt(float(D)) * 1.7f;
  c.o = Tensor::empty(DType::F32, {B, T, H, Dv});
  ops::attention_causal(q, k, v, c.scale, c.o);
  return c;
}

}  // namespace dsv3::cuda::test
