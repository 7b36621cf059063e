// The online softmax step of the flash attention kernels (mma.sync and wgmma): one m16 tile of scores in the
// tensor cores' C-fragment layout (n8 tile n, element e: row i0 = g or i1 = g + 8 for e < 2 / e >= 2, key
// 8 n + 2 (lane % 4) + e % 2) becomes P in bf16 A fragments of the k16 steps of P·V, with the rows' running max m
// and sum l updated and the output accumulators rescaled (FlashAttention-2's online softmax).
#pragma once
#include <cstdint>

#include "kernels/cuda/common.cuh"

namespace dsv3::cuda::dev {

// 2^x on the SFU, subnormal results flushed to 0 (P below 2^-126 of the row's max adds nothing to a bf16 P·V);
// exp2f's subnormal handling costs ALU work on every score.
__device__ __forceinline__ float ex2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// MASK: the tile reaches the rows (keys j > i, and j >= T, to -inf); the others skip the per-score compares (two
// code paths, not a select on every score: the mask's compares were most of the kernel's ALU work). m: the running
// max of the raw scores (quad-uniform; sl2 > 0, the scale in log2 units, applied inside exp2's argument, one fma a
// score). l: this thread's part of the row sum of P in f32 (reduced over the quad at the end; the rescaling by alpha
// is quad-uniform, so the parts stay consistent). al0 / al1: the factors the rows' output accumulators take for the
// new max (rescale_rows), applied by the caller once nothing else writes them.
template <bool MASK, int NS>
__device__ __forceinline__ void softmax_tile(float (&s)[NS][4], uint32_t (&pf)[NS / 2][4], float& m0, float& m1, float& l0, float& l1,
                                             int i0, int j0, int T, float sl2, float& al0, float& al1) {
  const int i1 = i0 + 8, jt = j0 + 2 * (int(threadIdx.x) & 3);
  float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
  for (int n = 0; n < NS; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if constexpr (MASK) {
        const int j = jt + 8 * n + (e & 1);
        if (j > (e < 2 ? i0 : i1) || j >= T) s[n][e] = -INFINITY;
      }
      if (e < 2)
        mx0 = fmaxf(mx0, s[n][e]);
      else
        mx1 = fmaxf(mx1, s[n][e]);
    }
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
  // Every row sees key 0 in tile 0, so m is finite after it; the -inf guards are for robustness only.
  const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
  const float mu0 = mn0 == -INFINITY ? 0.0f : mn0, mu1 = mn1 == -INFINITY ? 0.0f : mn1;  // no -inf - -inf
  al0 = ex2_ftz((m0 - mu0) * sl2), al1 = ex2_ftz((m1 - mu1) * sl2);                      // 0 while m was -inf
  const float nb0 = -mu0 * sl2, nb1 = -mu1 * sl2;
  m0 = mn0;
  m1 = mn1;
  l0 *= al0;
  l1 *= al1;
  // Step kk of P·V takes n8 tiles 2 kk (k 0..7) and 2 kk + 1 (k 8..15); {c0, c1} is (row g, k 2 (lane % 4) ..),
  // {c2, c3} row g + 8.
#pragma unroll
  for (int n = 0; n < NS; ++n) {
    const float p0 = ex2_ftz(fmaf(s[n][0], sl2, nb0)), p1 = ex2_ftz(fmaf(s[n][1], sl2, nb0));
    const float p2 = ex2_ftz(fmaf(s[n][2], sl2, nb1)), p3 = ex2_ftz(fmaf(s[n][3], sl2, nb1));
    l0 += p0 + p1;
    l1 += p2 + p3;
    pf[n >> 1][2 * (n & 1)] = pack_bf16x2(p0, p1);
    pf[n >> 1][2 * (n & 1) + 1] = pack_bf16x2(p2, p3);
  }
}

template <int NO>
__device__ __forceinline__ void rescale_rows(float (&o)[NO][4], float al0, float al1) {
#pragma unroll
  for (int n = 0; n < NO; ++n) {
    o[n][0] *= al0;
    o[n][1] *= al0;
    o[n][2] *= al1;
    o[n][3] *= al1;
  }
}

// One tile's step with the rescaling of o folded in (the kernels that wait for P·V before the next tile's scores).
template <bool MASK, int NS, int NO>
__device__ __forceinline__ void online_softmax(float (&s)[NS][4], float (&o)[NO][4], uint32_t (&pf)[NS / 2][4], float& m0, float& m1,
                                               float& l0, float& l1, int i0, int j0, int T, float sl2) {
  float al0, al1;
  softmax_tile<MASK>(s, pf, m0, m1, l0, l1, i0, j0, T, sl2, al0, al1);
  rescale_rows(o, al0, al1);
}

// The end of a row pair: l summed over the quad and O / l written for rows i0 and i0 + 8 below T, f32 or bf16 pairs
// (the output's rows and columns are even: 4-byte aligned). ob: the output at this (sequence, head) and this
// thread's columns 2 (lane % 4) ..; ldo its row stride. l >= 1 for every row < T: its max key contributes exp2(0) = 1.
template <int NO, class O>
__device__ __forceinline__ void store_rows(const float (&o)[NO][4], float l0, float l1, O* ob, int64_t ldo, int i0, int T) {
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv[2] = {1.0f / l0, 1.0f / l1};
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int i = i0 + 8 * half;
    if (i >= T) continue;
    O* r = ob + int64_t(i) * ldo;
#pragma unroll
    for (int n = 0; n < NO; ++n) {
      const float x = o[n][2 * half] * inv[half], y = o[n][2 * half + 1] * inv[half];
      if constexpr (sizeof(O) == 4) {
        r[8 * n] = x;
        r[8 * n + 1] = y;
      } else {
        *reinterpret_cast<uint32_t*>(r + 8 * n) = pack_bf16x2(x, y);
      }
    }
  }
}

}  // namespace dsv3::cuda::dev
