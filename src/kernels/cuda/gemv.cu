// Decode-sized products (see gemv in cuda_ops.h). For FP8, cuBLASLt's block-scaled GEMM wants M padded to 16 and
// activations quantized by a kernel of their own, four launches for one row; for bf16 its GEMV is one launch but
// cannot start before the previous kernel ends. This kernel is launched as a programmatic dependent of the kernel
// before it: it prefetches its weight rows into L2 while that kernel finishes (weights do not depend on it), then
// waits for it (griddepcontrol.wait) before reading the activations.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace dsv3::cuda {

namespace {
using namespace dev;

constexpr int kWarps = 8;  // kRows (template): weight rows per warp, independent load streams (2; 4 measured no faster on the
                           // 32000-row head, 2026-12-03)

__device__ __forceinline__ void load16(const float* p, float (&v)[16]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p) + i);
    v[4 * i] = a.x, v[4 * i + 1] = a.y, v[4 * i + 2] = a.z, v[4 * i + 3] = a.w;
  }
}
__device__ __forceinline__ void load16(const uint16_t* p, float (&v)[16]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint4 a = __ldg(reinterpret_cast<const uint4*>(p) + i);
    const uint32_t u[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      v[8 * i + 2 * j] = __uint_as_float(u[j] << 16);
      v[8 * i + 2 * j + 1] = __uint_as_float(u[j] & 0xffff0000u);
    }
  }
}

// Warp = kRows consecutive output columns n; lane = 16 consecutive k per step of 512 (inside one 128-wide scale
// block for FP8). Per-lane partial sums meet by warp shuffles; every output is one warp's fixed-order sum.
template <class W, class X, int kRows>
__global__ void __launch_bounds__(kWarps * 32) k_gemv(const X* __restrict__ x, int64_t ldx, int M, const W* __restrict__ w,
                                                      const float* __restrict__ sc, int split, int N, int K,
                                                      float* __restrict__ y, int64_t ldy) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = (blockIdx.x * kWarps + warp) * kRows;
  int rn[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) rn[r] = min(n0 + r, N - 1);
  // Before the wait: this warp's rows into L2 (128-byte lines), independent of the kernel still running.
  if (n0 < N) {
    const int64_t row_bytes = int64_t(K) * int64_t(sizeof(W));
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      for (int64_t b = int64_t(lane) * 128; b < row_bytes; b += 32 * 128)
        prefetch_l2(reinterpret_cast<const char*>(w + int64_t(rn[r]) * K) + b);
  }
  grid_dependency_wait();
  grid_dependents_launch();
  if (n0 >= N) return;
  const int kb = (K + 127) / 128;
  int srow[kRows];  // scale row of each weight row (two stacked FP8 weights: the second's grid follows the first's)
#pragma unroll
  for (int r = 0; r < kRows; ++r) srow[r] = rn[r] < split ? rn[r] / 128 : (split + 127) / 128 + (rn[r] - split) / 128;
  float acc[kGemvMaxM][kRows];
#pragma unroll
  for (int t = 0; t < kGemvMaxM; ++t)
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[t][r] = 0.0f;
  for (int k0 = lane * 16; k0 < K; k0 += 512) {
    Raw<W> f[kRows][2];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const W* row = w + int64_t(rn[r]) * K;
      fetch(row, k0, f[r][0]);
      fetch(row, k0 + 8, f[r][1]);
    }
    float wv[kRows][16];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float s = sc ? __ldg(sc + srow[r] * kb + k0 / 128) : 1.0f;
      float a[8], b[8];
      unpack(f[r][0], s, a);
      unpack(f[r][1], s, b);
#pragma unroll
      for (int i = 0; i < 8; ++i) wv[r][i] = a[i], wv[r][8 + i] = b[i];
    }
#pragma unroll
    for (int t = 0; t < kGemvMaxM; ++t) {
      if (t < M) {
        float xv[16];
        load16(x + int64_t(t) * ldx + k0, xv);
#pragma unroll
        for (int r = 0; r < kRows; ++r)
#pragma unroll
          for (int i = 0; i < 16; ++i) acc[t][r] = fmaf(wv[r][i], xv[i], acc[t][r]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kGemvMaxM; ++t) {
    if (t < M) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float v = warp_sum(acc[t][r]);
        if (lane == 0 && n0 + r < N) y[int64_t(t) * ldy + n0 + r] = v;
      }
    }
  }
}

template <class W, class X, int kRows>
void launch_rows(const void* x, int64_t ldx, int64_t M, const void* w, const float* sc, int64_t split, float* y, int64_t ldy,
                 int64_t N, int64_t K, cudaStream_t s) {
  launch_dependent(k_gemv<W, X, kRows>, dim3(unsigned(ceil_div(N, kWarps * kRows))), dim3(kWarps * 32), 0, s, static_cast<const X*>(x),
                   ldx, int(M), static_cast<const W*>(w), sc, int(split), int(N), int(K), y, ldy);
}
template <class W, class X>
void launch(const void* x, int64_t ldx, int64_t M, const void* w, const float* sc, int64_t split, float* y, int64_t ldy, int64_t N,
            int64_t K, cudaStream_t s) {
  launch_rows<W, X, 2>(x, ldx, M, w, sc, split, y, ldy, N, K, s);
}
}  // namespace

bool gemv_supported(DType xt, const void* x, int64_t ldx, int64_t M, int64_t K) {
  return (xt == DType::BF16 || xt == DType::F32) && M >= 1 && M <= kGemvMaxM && K % 16 == 0 && ldx % 8 == 0 &&
         (reinterpret_cast<uintptr_t>(x) & 15) == 0;
}

void gemv(DType wt, DType xt, const void* x, int64_t ldx, int64_t M, const void* w, const float* w_scale_inv, float* y, int64_t ldy,
          int64_t N, int64_t K, cudaStream_t s, int64_t scale_split) {
  DSV3_CHECK(gemv_supported(xt, x, ldx, M, K),
             "gemv: x {} with {} rows (at most {}), K {} (multiple of 16), ldx {} (multiple of 8, 16-byte aligned rows)",
             dtype_name(xt), M, kGemvMaxM, K, ldx);
  DSV3_CHECK((wt == DType::BF16 && (reinterpret_cast<uintptr_t>(w) & 15) == 0) ||
                 (wt == DType::F8_E4M3 && w_scale_inv && (reinterpret_cast<uintptr_t>(w) & 7) == 0),
             "gemv: weights must be BF16 (16-byte aligned) or F8_E4M3 with scales (8-byte aligned), not {}", dtype_name(wt));
  if (N <= 0) return;
  const int64_t split = scale_split > 0 && scale_split < N ? scale_split : N;
  if (wt == DType::BF16) {
    if (xt == DType::BF16) launch<uint16_t, uint16_t>(x, ldx, M, w, nullptr, split, y, ldy, N, K, s);
    else launch<uint16_t, float>(x, ldx, M, w, nullptr, split, y, ldy, N, K, s);
  } else {
    if (xt == DType::BF16) launch<uint8_t, uint16_t>(x, ldx, M, w, w_scale_inv, split, y, ldy, N, K, s);
    else launch<uint8_t, float>(x, ldx, M, w, w_scale_inv, split, y, ldy, N, K, s);
  }
  DSV3_CUDA_CHECK_LAUNCH("gemv kernel");
}

}  // namespace dsv3::cuda
