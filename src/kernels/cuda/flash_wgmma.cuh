// Causal flash attention on Hopper's warpgroup MMA (FlashAttention-3's data flow without its warp specialisation),
// for MLA's prefill head dims: q·k over D = 64 or 96 (k_nope | k_rope), v of 64. One block per (128 query rows,
// head, sequence), two warpgroups of 64 rows; Q stays in shared memory for the block's life and each key tile of NK
// rows (K and V double-buffered by cp.async) goes through
//   S = Q·Kᵀ   wgmma m64nNKk16, both operands from shared memory (K-major: Q's and K's rows are their d),
//   online softmax on S in registers (a row in the 4 threads of a quad, as mma.sync's C fragments),
//   O += P·V   wgmma m64n64k16 with P from registers (two adjacent n8 tiles of S are one k16 A fragment) and V
//              N-major from shared memory (V's rows are the keys: the product's K).
// A d row of 96 is two panels: d 0..63 in the 128-byte swizzle, d 64..95 in the 64-byte swizzle. Precision as the
// mma.sync kernel: q, k, v and P in bf16, f32 accumulation (online_softmax, flash_softmax.cuh).
#pragma once
#include <cstdint>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/flash_softmax.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace dsv3::cuda::dev {

// ST: K/V stages.
template <int D, int NK, int ST = 2>
struct FlashWg {
  static constexpr int BQ = 128, DV = 64, THREADS = 256;
  static constexpr int P1 = D - 64;  // dims in the second panel
  static_assert(D == 64 || D == 96, "q·k over 64 or 96 dims");
  static_assert(NK == 64 || NK == 128, "key tiles of 64 or 128");
  // Bytes from the 1024-aligned base: Q's panels, then two stages of [K panel 0 | K panel 1 | V]; every piece a
  // multiple of 1024 bytes, so each starts on its swizzle atom (1024 / 512 bytes) as the descriptors assume.
  static constexpr uint32_t Q0 = BQ * 128, Q1 = BQ * P1 * 2, K0 = NK * 128, K1 = NK * P1 * 2, V = NK * 128;
  static constexpr uint32_t STAGE = K0 + K1 + V;
  static constexpr size_t smem = size_t(Q0 + Q1 + ST * STAGE) + 1024;
  static_assert(Q1 % 1024 == 0 && K1 % 1024 == 0, "pieces on 1024-byte boundaries");
};

// Where a tensor's rows are: panel 0 (dims 0..63) and panel 1 (dims 64..D-1), each a bf16 pointer with sequence,
// head and row strides in elements (all multiples of 8: whole 16-byte chunks). The packed copies of
// attention_causal_flash ([B, H, T, D]) and the projections' own bf16 outputs (MLA: q_b's rows, kv_b's k_nope and
// v inside one row, the shared k_rope with a head stride of 0) are both such panels.
struct WgPanel {
  const uint16_t* p;
  int64_t sb, sh, st;
};
struct WgArgs {
  WgPanel q0, q1, k0, k1, v;
  Strides3 so;
  int T, H;
  float sl2;
};

// Rows r0 .. r0 + ROWS - 1 (W = 64 or 96 dims) of a tensor's two panels (p0, p1: this sequence's and head's row 0,
// row strides ld0, ld1) into the swizzled shared panels at smem (dims 0..63, 128-byte swizzle) and smem + p1_off
// (dims 64..95, 64-byte swizzle). Four threads a row, thread j its chunks j, j + 4 (and j of panel 1): a warp's copy is
// 8 rows x 64 contiguous bytes, and a thread's addresses are one row pointer a panel plus constants. Rows >= T are
// zero-filled (masked scores; V rows must be finite, 0 · NaN would poison O).
template <int W, int ROWS>
__device__ __forceinline__ void wg_load_tile(unsigned char* smem, uint32_t p1_off, const uint16_t* p0, int64_t ld0, const uint16_t* p1,
                                             int64_t ld1, int r0, int T) {
  static_assert(W == 64 || W == 96, "rows of 64 or 96 dims");
  static_assert(ROWS % 64 == 0, "whole passes of the block's 64 rows");
  const int j = int(threadIdx.x) & 3, rr = int(threadIdx.x) >> 2;
#pragma unroll
  for (int rp = 0; rp < ROWS / 64; ++rp) {
    const int row = rr + 64 * rp, r = r0 + row;
    const bool valid = r < T;
    const int64_t rs = valid ? r : 0;
    const uint16_t* s0 = p0 + rs * ld0 + j * 8;
    cp_async16(smem + swizzle128(row, j), s0, valid);
    cp_async16(smem + swizzle128(row, j + 4), s0 + 32, valid);
    if constexpr (W == 96) cp_async16(smem + p1_off + swizzle64(row, j), p1 + rs * ld1 + j * 8, valid);
  }
}

// S (+)= Q·Kᵀ for NK keys: d NK / 2 floats.
template <int NK>
__device__ __forceinline__ void wg_qk(float (&s)[NK / 2], uint64_t da, uint64_t db, bool acc) {
  if constexpr (NK == 128)
    wgmma_m64n128k16_bf16(s, da, db, acc);
  else
    wgmma_m64n64k16_bf16(s, da, db, acc);
}

// Two blocks an SM (key tiles of 64: 113 registers, no spills; of 128: S alone is 64 registers, a few spill).
// (FlashAttention-3's intra-warpgroup overlap, tile j's S = Q·Kᵀ issued with tile j - 1's P·V and three K/V stages,
// measured slower on an H200, 468,630-491,165 vs 504,703-508,767 tokens/s at T 4096: commit c496139 has it.)
template <int D, int NK, class O>
__global__ void __launch_bounds__(256, 2) k_flash_wgmma(WgArgs a, O* __restrict__ out) {
  using F = FlashWg<D, NK>;
  constexpr int BQ = F::BQ, NS = NK / 8, KQ = D / 16;
  extern __shared__ __align__(16) unsigned char smraw[];
  const uint32_t base = (smem_u32(smraw) + 1023u) & ~1023u;
  unsigned char* const bp = smraw + (base - smem_u32(smraw));
  const int T = a.T;
  const float sl2 = a.sl2;
  // Heads along x, query tiles in reverse along y: the longest blocks start first (as k_flash_causal).
  const int qt = int(gridDim.y) - 1 - int(blockIdx.y), h = blockIdx.x, b = blockIdx.z;
  const int q0 = qt * BQ, ntiles = (min(q0 + BQ, T) + NK - 1) / NK;
  const int t = threadIdx.x, lane = t & 31, w = t >> 5, wg = w >> 2, g = lane >> 2, tq = lane & 3;
  auto at = [&](const WgPanel& p) { return p.p + b * p.sb + h * p.sh; };
  const uint16_t *k0h = at(a.k0), *k1h = at(a.k1), *vh = at(a.v);
  auto stage = [&](int st) { return F::Q0 + F::Q1 + uint32_t(st) * F::STAGE; };
  auto load_kv = [&](int tile, int st) {
    unsigned char* k0 = bp + stage(st);
    wg_load_tile<D, NK>(k0, F::K0, k0h, a.k0.st, k1h, a.k1.st, tile * NK, T);
    wg_load_tile<64, NK>(k0 + F::K0 + F::K1, 0, vh, a.v.st, vh, a.v.st, tile * NK, T);
    cp_async_commit();
  };
  wg_load_tile<D, BQ>(bp, F::Q0, at(a.q0), a.q0.st, at(a.q1), a.q1.st, q0, T);
  load_kv(0, 0);

  float o[8][4];  // wgmma's d for P·V
  auto& od = reinterpret_cast<float(&)[32]>(o);
#pragma unroll
  for (int i = 0; i < 32; ++i) od[i] = 0.0f;
  // This thread's rows i0 = wrow0 + g (C elements 0, 1 of each n8 tile) and i1 = i0 + 8 (elements 2, 3); m and l
  // as online_softmax keeps them.
  const int wrow0 = q0 + 64 * wg + 16 * (w & 3), wg_last = q0 + 64 * wg + 63;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
  // Descriptors: a k16 step or a stage further is the start address plus its offset >> 4 (the sum stays inside the
  // 14-bit field: shared memory ends below 2^18 bytes).
  const uint64_t dq0 = wgmma_desc_k128(base + uint32_t(wg) * 64 * 128), dq1 = wgmma_desc_k64(base + F::Q0 + uint32_t(wg) * 64 * (F::P1 * 2));
  const uint64_t dk0 = wgmma_desc_k128(base + stage(0)), dk1 = wgmma_desc_k64(base + stage(0) + F::K0);
  const uint64_t dv = wgmma_desc_mn128(base + stage(0) + F::K0 + F::K1, F::V);
  for (int it = 0; it < ntiles; ++it) {
    const int st = it & 1, j0 = it * NK;
    cp_async_wait<0>();
    fence_proxy_async_smem();  // this thread's copies, visible to wgmma's reads
    __syncthreads();           // everyone's; and tile it - 1's products (stage st ^ 1) are complete in every warpgroup
    if (it + 1 < ntiles) load_kv(it + 1, st ^ 1);
    if (j0 > wg_last) continue;  // every key past every row of this warpgroup (warpgroup-uniform)
    const uint64_t soff = uint64_t(st * (F::STAGE >> 4));
    float s[NS][4];  // wgmma's d: n8 tile n in s[n]
    auto& sd = reinterpret_cast<float(&)[NK / 2]>(s);
#pragma unroll
    for (int i = 0; i < NK / 2; ++i) sd[i] = 0.0f;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KQ; ++kk) {
      if (kk < 4)
        wg_qk<NK>(sd, dq0 + 2 * kk, dk0 + soff + 2 * kk, kk > 0);
      else
        wg_qk<NK>(sd, dq1 + 2 * (kk - 4), dk1 + soff + 2 * (kk - 4), true);
    }
    wgmma_commit();
    wgmma_wait<0>();
    // The key tiles reaching this warp's rows are masked (j > i, j >= T).
    uint32_t pf[NS / 2][4];
    if (j0 + NK > wrow0)
      online_softmax<true>(s, o, pf, m0, m1, l0, l1, wrow0 + g, j0, T, sl2);
    else
      online_softmax<false>(s, o, pf, m0, m1, l0, l1, wrow0 + g, j0, T, sl2);
    wgmma_fence();  // o and pf were written by this thread: ordered before the products that read them
#pragma unroll
    for (int kk = 0; kk < NS / 2; ++kk) wgmma_m64n64k16_bf16_rs_nmajor(od, pf[kk], dv + soff + 128 * kk);
    wgmma_commit();
    wgmma_wait<0>();
  }
  cp_async_wait<0>();
  store_rows(o, l0, l1, out + int64_t(b) * a.so.b + int64_t(h) * a.so.h + 2 * tq, a.so.t, wrow0 + g, T);
}

}  // namespace dsv3::cuda::dev
