// Absorbed-MLA decode attention for few query heads per latent row (≤ 16 per block: DeepSeek-V3 decoding one
// token with its heads split over GPUs, small.json's 16): the cache is read once and the work per byte is small
// (~30 flop/B), so the kernel's job is to keep enough of the cache in flight to run at HBM speed.
//
// Per block: one query token, 16 heads, one contiguous range of rows (a split; the partials are merged by
// k_latent_combine). One warp streams 32-row tiles into a ring of stages (6 for W = 576, 8 for 288) with bulk
// asynchronous copies — one `cp.async.bulk` of a row's W bf16 values per lane, into rows padded to W + 8 so the
// ldmatrix reads are conflict-free — each stage completing on its mbarrier; a tile's products run while the
// next stages are in flight (what sets the rate: a 4-stage ring gave 2,255 GB/s at batch 64 on an H200).
// S = Q·Kᵀ with the 8 warps as (8 keys × half of W) units, each warp's q fragments held in registers for the
// whole range; the online softmax on S in shared memory; O += P·V with each warp owning R/8 output columns.
// q and P are rounded to bf16 for the products (f32 accumulation; l sums the rounded P), as k_latent_mma.
//
// Splits are chosen so the grid is one wave of one block per SM (225 KB of shared memory each for W = 576), or of
// two (BPS = 2: 97 KB each, q read from shared memory, a 2-stage ring) when every split still has >= 256 rows:
// one block's barrier waits were half of its stalls (ncu), and a second block fills them.
#pragma once
#include "kernels/cuda/common.cuh"

namespace dsv3::cuda {

struct DecodeArgs {
  const float* q;
  const void* pool;
  const int32_t* block_table;
  const int32_t* positions;
  float* part;  // [nq, H, splits, R]
  float* ml;    // [nq, H, splits, 2]
  int H, W, R, s_q, bs, max_blocks, splits, chunk;
  float scale;
};

// BPS: blocks resident per SM. 1: q fragments in registers (184 of them for W = 576) and a deep ring. 2: two
// blocks share the SM, so one block's barrier waits (half of its stalls in ncu at BPS 1) overlap the other's
// products; q goes to shared memory (ldmatrix per tile) to fit 128 registers, and the ring is shorter.
template <int W, int R, int BPS = 1>
struct LatentStream {
  static constexpr bool q_smem = BPS > 1;
  static constexpr int rows = 32, heads = 16, threads = 256;
  static constexpr int stages = BPS > 1 ? (W > 320 ? 2 : 4) : (W > 320 ? 6 : 8);
  static constexpr int stride = W + 8, p_stride = rows + 8, s_stride = rows + 4;
  static constexpr size_t bar_bytes = 64;  // one mbarrier per stage
  static constexpr size_t smem_bytes = bar_bytes + size_t(stages * rows * stride + heads * p_stride + (q_smem ? heads * stride : 0)) * 2 +
                                       size_t(2 * heads * s_stride + 3 * heads) * 4;
  static_assert(stages * 8 <= bar_bytes && BPS * (smem_bytes + 1024) <= 233472, "barriers and ring fit the SM's shared memory");
  static_assert(W % 32 == 0 && R % 128 == 0 && R <= W, "W splits into two halves of 16-wide k steps; R into 8 warps of 16 columns");
  static_assert((W * 2) % 16 == 0 && (stride * 2) % 16 == 0, "bulk copies move 16-byte multiples to 16-byte aligned rows");
};

template <int W, int R, int BPS = 1>
__global__ void __launch_bounds__(256, BPS) k_latent_stream(DecodeArgs a) {
  using dev::ldsm_x2;
  using dev::ldsm_x4;
  using dev::ldsm_x4_t;
  using dev::mma_bf16;
  using L = LatentStream<W, R, BPS>;
  constexpr int BR = L::rows, NST = L::stages, HM = L::heads, STR = L::stride, PS = L::p_stride, SS = L::s_stride;
  constexpr int KH = W / 32;      // 16-wide k steps in each half of W
  constexpr int NP = R / 128;     // pairs of 8-column tiles per warp in P·V
  dev::dependent_kernel_begin();  // the cache row of this step and q come from the kernel before
  extern __shared__ __align__(128) unsigned char smraw[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smraw);
  uint16_t* kbuf = reinterpret_cast<uint16_t*>(smraw + L::bar_bytes);  // [NST][BR][STR]
  uint16_t* pbuf = kbuf + NST * BR * STR;                                 // [HM][PS]
  uint16_t* qbuf = pbuf + HM * PS;                                        // [HM][STR] (q_smem)
  float* sbuf = reinterpret_cast<float*>(qbuf + (L::q_smem ? HM * STR : 0));  // [2 halves of W][HM][SS]
  float* m_s = sbuf + 2 * HM * SS;
  float* l_s = m_s + HM;
  float* al_s = l_s + HM;
  const int split = blockIdx.x, qt = blockIdx.y, h0 = blockIdx.z * HM;
  const int b = qt / a.s_q;
  const int t = threadIdx.x, lane = t & 31, w = t >> 5, g = lane >> 2, tq = lane & 3;
  const int last = a.positions[qt];
  const int r0 = split * a.chunk, r1 = min(last + 1, r0 + a.chunk);
  const int ntiles = r1 > r0 ? (r1 - r0 + BR - 1) / BR : 0;
  const uint16_t* pool = static_cast<const uint16_t*>(a.pool);

  if (t == 0) {
    for (int s = 0; s < NST; ++s) dev::mbar_init(&full[s], 1);
    dev::mbar_init_fence();
  }
  __syncthreads();
  // Warp 0, one row per lane. Rows past the end repeat the last visible row (finite data; masked in the softmax),
  // so every stage receives the same byte count.
  auto issue = [&](int it) {
    const int s = it % NST, row = min(r0 + it * BR + lane, r1 - 1);
    const int64_t phys =
        a.block_table ? int64_t(a.block_table[int64_t(b) * a.max_blocks + row / a.bs]) * a.bs + row % a.bs : int64_t(row);
    if (lane == 0) dev::mbar_arrive_expect_tx(&full[s], uint32_t(BR * W * 2));
    __syncwarp();
    dev::bulk_copy_g2s(kbuf + (s * BR + lane) * STR, pool + phys * W, uint32_t(W * 2), &full[s]);
  };
  if (w == 0)
    for (int it = 0; it < min(NST, ntiles); ++it) issue(it);

  // This warp's q fragments (heads g and g + 8, half w >> 2 of W) as mma A operands: in registers, straight from
  // global memory, or (q_smem) the block's q in shared memory as bf16, read by ldmatrix per tile.
  uint32_t qf[L::q_smem ? 1 : KH][4];
  if constexpr (L::q_smem) {
    for (int i = t; i < HM * (W / 2); i += L::threads) {
      const int hh = i / (W / 2), d = 2 * (i % (W / 2));
      uint32_t v = 0u;
      if (h0 + hh < a.H) {
        const float2 f = *reinterpret_cast<const float2*>(a.q + (int64_t(qt) * a.H + h0 + hh) * W + d);
        v = uint32_t(dev::f32_to_bf16(f.x)) | (uint32_t(dev::f32_to_bf16(f.y)) << 16);
      }
      *reinterpret_cast<uint32_t*>(qbuf + hh * STR + d) = v;
    }
  } else {
    const int kh = w >> 2;
    auto pair = [&](int hh, int d) -> uint32_t {
      if (h0 + hh >= a.H) return 0u;
      const float2 v = *reinterpret_cast<const float2*>(a.q + (int64_t(qt) * a.H + h0 + hh) * W + d);
      return uint32_t(dev::f32_to_bf16(v.x)) | (uint32_t(dev::f32_to_bf16(v.y)) << 16);
    };
#pragma unroll
    for (int k = 0; k < KH; ++k) {
      const int d = (kh * KH + k) * 16 + 2 * tq;
      qf[k][0] = pair(g, d);
      qf[k][1] = pair(g + 8, d);
      qf[k][2] = pair(g, d + 8);
      qf[k][3] = pair(g + 8, d + 8);
    }
  }
  if (t < HM) {
    m_s[t] = -INFINITY;
    l_s[t] = 0.0f;
  }
  float acc[2 * NP][4];
#pragma unroll
  for (int n = 0; n < 2 * NP; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
  __syncthreads();

  for (int it = 0; it < ntiles; ++it) {
    const int s = it % NST, j0 = r0 + it * BR;
    dev::mbar_wait_parity(&full[s], uint32_t((it / NST) & 1));
    const uint16_t* ks = kbuf + s * BR * STR;
    {  // S partial: warp w scores keys 8 (w & 3).. over half (w >> 2) of W; two accumulators halve the mma chain
      const int nt = w & 3, kh = w >> 2;
      float c0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, c1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      const uint16_t* kb = ks + (nt * 8 + (lane & 7)) * STR + 8 * ((lane >> 3) & 1) + kh * KH * 16;
      [[maybe_unused]] const uint16_t* qa = qbuf + (lane & 15) * STR + 8 * (lane >> 4) + kh * KH * 16;
#pragma unroll
      for (int k = 0; k < KH; ++k) {
        uint32_t b0, b1;
        ldsm_x2(b0, b1, kb + k * 16);
        uint32_t(&af)[4] = qf[L::q_smem ? 0 : k];
        if constexpr (L::q_smem) ldsm_x4(af, qa + k * 16);
        if (k & 1)
          mma_bf16(c1, af, b0, b1);
        else
          mma_bf16(c0, af, b0, b1);
      }
      float* s0 = sbuf + (kh * HM + g) * SS + nt * 8 + 2 * tq;
      s0[0] = c0[0] + c1[0];
      s0[1] = c0[1] + c1[1];
      s0[8 * SS] = c0[2] + c1[2];
      s0[8 * SS + 1] = c0[3] + c1[3];
    }
    __syncthreads();
    {  // online softmax: 16 threads per head, 2 keys each
      constexpr int TPH = L::threads / HM, SPT = BR / TPH;
      const int hh = t / TPH, sub = t % TPH;
      float sv[SPT];
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < SPT; ++i) {
        const int j = sub * SPT + i;
        sv[i] = j0 + j < r1 ? (sbuf[hh * SS + j] + sbuf[(HM + hh) * SS + j]) * a.scale : -INFINITY;
        mx = fmaxf(mx, sv[i]);
      }
#pragma unroll
      for (int o = TPH / 2; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_old = m_s[hh], m_new = fmaxf(m_old, mx);
      const float alpha = expf(m_old - m_new);
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < SPT; ++i) {
        const int j = sub * SPT + i;
        const uint16_t pb = dev::f32_to_bf16(j0 + j < r1 ? expf(sv[i] - m_new) : 0.0f);
        pbuf[hh * PS + j] = pb;
        sum += dev::bf16_to_f32(pb);
      }
#pragma unroll
      for (int o = TPH / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      __syncwarp();  // every lane of the head has read m_s/l_s before lane `sub == 0` rewrites them
      if (sub == 0) {
        m_s[hh] = m_new;
        l_s[hh] = l_s[hh] * alpha + sum;
        al_s[hh] = alpha;
      }
    }
    __syncthreads();
    {  // O = O·alpha + P·V, warp w owns columns [w R/8, (w + 1) R/8)
      const float f0 = al_s[g], f1 = al_s[g + 8];
#pragma unroll
      for (int n = 0; n < 2 * NP; ++n) {
        acc[n][0] *= f0;
        acc[n][1] *= f0;
        acc[n][2] *= f1;
        acc[n][3] *= f1;
      }
#pragma unroll
      for (int k16 = 0; k16 < BR / 16; ++k16) {
        uint32_t pa[4];
        ldsm_x4(pa, pbuf + ((lane & 7) + 8 * ((lane >> 3) & 1)) * PS + k16 * 16 + 8 * (lane >> 4));
#pragma unroll
        for (int np = 0; np < NP; ++np) {
          uint32_t bf[4];
          ldsm_x4_t(bf, ks + (k16 * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * STR + w * (R / 8) + np * 16 + 8 * (lane >> 4));
          mma_bf16(acc[2 * np], pa, bf[0], bf[1]);
          mma_bf16(acc[2 * np + 1], pa, bf[2], bf[3]);
        }
      }
    }
    __syncthreads();  // stage s, S and P are free again
    if (w == 0 && it + NST < ntiles) {
      dev::fence_proxy_async_smem();
      issue(it + NST);
    }
  }
  const int64_t base = int64_t(qt) * a.H;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int h = h0 + g + 8 * half;
    if (h >= a.H) continue;
    float* o = a.part + ((base + h) * a.splits + split) * R + w * (R / 8) + 2 * tq;
#pragma unroll
    for (int n = 0; n < 2 * NP; ++n) *reinterpret_cast<float2*>(o + n * 8) = make_float2(acc[n][2 * half], acc[n][2 * half + 1]);
  }
  if (t < HM && h0 + t < a.H) {
    float* p = a.ml + ((base + h0 + t) * a.splits + split) * 2;
    p[0] = m_s[t];
    p[1] = l_s[t];
  }
}

}  // namespace dsv3::cuda
