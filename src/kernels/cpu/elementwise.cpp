// Row-wise CPU ops: RMSNorm, embedding gather, SwiGLU, RoPE.
#include <cmath>
#include <cstring>

#include "kernels/ops.h"

namespace dsv3::ops {

namespace {
// gamma (any float dtype) as f32; norm weights are small, so a converted copy per call is cheap.
std::vector<float> to_f32_vector(const Tensor& t) {
  Tensor c = t.contiguous();
  std::vector<float> v(size_t(c.numel()));
  convert_to_f32(c.dtype(), c.raw(), v.data(), v.size());
  return v;
}
}  // namespace

void rmsnorm(const Tensor& x, const Tensor& gamma, float eps, Tensor& y) {
  const int64_t M = x.dim(0), D = x.dim(1);
  DSV3_CHECK(gamma.numel() == D, "rmsnorm: weight has {} values for rows of {}", gamma.numel(), D);
  DSV3_CHECK(y.dim(0) == M && y.dim(1) == D, "rmsnorm: output shape {}", shape_str(y.shape()));
  const std::vector<float> g = to_f32_vector(gamma);
  const int64_t ldx = x.strides()[0], ldy = y.strides()[0];
  const float* xp = x.f32();
  float* yp = y.f32();
#pragma omp parallel for schedule(static) if (M * D > 16384)
  for (int64_t i = 0; i < M; ++i) {
    const float* xr = xp + i * ldx;
    float* yr = yp + i * ldy;
    float ss = 0.0f;
    for (int64_t j = 0; j < D; ++j) ss += xr[j] * xr[j];
    const float r = 1.0f / std::sqrt(ss / float(D) + eps);
    for (int64_t j = 0; j < D; ++j) yr[j] = g[size_t(j)] * (xr[j] * r);
  }
}

void embedding(const Tensor& ids, const Tensor& table, Tensor& y) {
  const int64_t V = table.dim(0), D = table.dim(1), M = ids.numel();
  DSV3_CHECK(y.dim(0) == M && y.dim(1) == D, "embedding: output shape {}", shape_str(y.shape()));
  Tensor idc = ids.contiguous();
  const size_t es = dtype_size(table.dtype());
  for (int64_t i = 0; i < M; ++i) {
    const int64_t id = idc.dtype() == DType::I64 ? idc.data<int64_t>()[i] : int64_t(idc.data<int32_t>()[i]);
    DSV3_CHECK(id >= 0 && id < V, "token id {} at position {} is out of range [0, {})", id, i, V);
    convert_to_f32(table.dtype(), static_cast<const char*>(table.raw()) + size_t(id * D) * es,
                   y.f32() + i * y.strides()[0], size_t(D));
  }
}

void silu_mul(const Tensor& gu, Tensor& out) {
  const int64_t M = gu.dim(0), I = gu.dim(1) / 2;
  DSV3_CHECK(out.dim(0) == M && out.dim(1) == I, "silu_mul: output shape {}", shape_str(out.shape()));
  const int64_t ldg = gu.strides()[0], ldo = out.strides()[0];
#pragma omp parallel for schedule(static) if (M * I > 16384)
  for (int64_t i = 0; i < M; ++i) {
    const float* g = gu.f32() + i * ldg;
    const float* u = g + I;
    float* o = out.f32() + i * ldo;
    for (int64_t j = 0; j < I; ++j) o[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
  }
}

void rope(Tensor& x, const std::vector<int64_t>& positions, const RopeTable& table) {
  const int64_t M = x.dim(0), H = x.dim(1), R = x.dim(2), half = R / 2;
  DSV3_CHECK(int64_t(positions.size()) == M, "rope: {} positions for {} rows", positions.size(), M);
  DSV3_CHECK(int64_t(table.inv_freq.size()) == half && x.strides()[2] == 1, "rope: table/layout mismatch");
  const int64_t s0 = x.strides()[0], s1 = x.strides()[1];
  float* base = x.f32();
#pragma omp parallel for schedule(static) if (M * H * R > 16384)
  for (int64_t m = 0; m < M; ++m) {
    // Angles in float32 as the reference computes them (pos · inv_freq rounded to f32, then cos/sin).
    float c[256], s[256];
    for (int64_t i = 0; i < half; ++i) {
      const float a = float(positions[size_t(m)]) * table.inv_freq[size_t(i)];
      c[i] = std::cos(a) * table.attention_factor;
      s[i] = std::sin(a) * table.attention_factor;
    }
    for (int64_t h = 0; h < H; ++h) {
      float* v = base + m * s0 + h * s1;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[2 * i], b = v[2 * i + 1];
        v[2 * i] = a * c[i] - b * s[i];
        v[2 * i + 1] = b * c[i] + a * s[i];
      }
    }
  }
}

}  // namespace dsv3::ops
