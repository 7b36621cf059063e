// The batch-1 decode step as one persistent kernel (see persistent_ops.h for what and why).
//
// Pipeline: every stage's weights go to shared memory by bulk copies (TMA, one mbarrier phase per fill) into one
// of two buffers while the stage before computes and while the block waits at the grid barrier (a stage issues
// the next stage's copies before its wait), so a stage starts with its operands on chip. The routed experts are
// known only once the router's logits are in: every block routes the token itself (route_block, the same choices
// as the router kernels), then copies its gate|up rows and the next stage's down rows at once.
//
// Data written by one block and read by another inside the launch is read with ld.global.cg (L2, never a stale
// L1 line) after a grid barrier: __syncthreads, then thread 0 fences and adds to a global counter, and waits with
// acquire loads until every block has added.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/persistent_ops.h"
#include "kernels/cuda/route_warp.cuh"

// Compile-time A/B variants, off by default (CMake DSV3_PERSIST_DEFS, or bench/cuda/persist_variant.sh). Measured
// slower and removed (2026-12-03): the routing by one warp (route_warp) instead of route_block's rank sweeps
// (0.613 vs 0.558 ms per token), the absorbed-query copies issued after stage 1's barrier (0.562 vs 0.558), every
// head split applying W_UV to its own partial so the merge only sums dv-wide vectors (0.523 vs 0.517).
// DSV3_PERSIST_ATT_MARKS=1: layer 1's attention stage stamps its steps for the trace (DSV3_PERSISTENT_TRACE=1);
// compiled out by default (the marks cost the kernel a register spill).
// DSV3_PERSIST_HEAD (on; =0 off): the kernel computes the bf16 head's logits after the final norm (every block its
// share of the vocabulary rows, streamed through the two weight buffers; the first two chunks copied in while the
// last layer's blocks meet at the final barrier), instead of a GEMV launch after it: H200, small.json, batch 1,
// 0.513 vs 0.517 ms per token (graph 0.499 vs 0.505).
#ifndef DSV3_PERSIST_HEAD
#define DSV3_PERSIST_HEAD 1
#endif
#ifndef DSV3_PERSIST_ATT_MARKS
#define DSV3_PERSIST_ATT_MARKS 0
#endif

namespace dsv3::cuda {

using namespace dev;

namespace {
constexpr int kT = 256, kW = kT / 32;
constexpr bool kAttMarks = DSV3_PERSIST_ATT_MARKS != 0;
constexpr bool kHeadFold = DSV3_PERSIST_HEAD != 0;
constexpr int kMaxH = 16;       // heads a block's attention accumulators hold
constexpr int kTile = 64;       // cache rows staged at a time
constexpr int kPad = 8;         // bf16 padding per staged cache row (odd 16-byte stride: conflict-free row reads)
constexpr int kSplitRows = 16;  // context rows per block before the context is split over fewer, longer pieces
                                // (DSV3_PERSISTENT_SPLIT_ROWS overrides it, for benchmarks)
// Default context limit of stage 3's head split (DSV3_PERSISTENT_HEAD_SPLIT). H200, small.json, batch 1, ms per token
// with / without: contexts 64-128 0.577 / 0.594, 160-224 0.580 / 0.594, 224-288 0.592 / 0.601; 448-512 0.636 / 0.633
// and 960-1024 0.740 / 0.671 (a head's splits grow with the context: only nb / H of them). Since the one-head scores
// and value sums (a warp per row, four chains): 448 0.567 / 0.603, 960 0.642 / 0.644. The limit is the longest
// context measured no slower.
constexpr int kHeadSplitMax = 1024;
constexpr int kMaxSplitsPerLane = 8;  // the merge's warp holds the split statistics: at most 256 blocks
static_assert(2 + kMaxH <= kDecodePersistentBarrierWords, "the head-split counters follow the grid barrier's two words");

struct Work {
  float *r1, *r2, *ffn, *att, *qkv, *qc, *o, *logits, *act, *ml, *part;  // logits: the router's two terms, [2][E]
};
struct Args {
  PersistentShape s;
  const PersistentLayer* layers;
  PersistentIO io;
  Work w;
  uint32_t* bar;
  unsigned long long* trace;  // null, or [gridDim.x][kTraceEvents] globaltimer stamps (DSV3_PERSISTENT_TRACE=1)
  int flags;  // DSV3_PERSISTENT_FLAGS (experiments): 1 barrier arrive by red.release, 2 down rows copied after gate|up,
             // 4 (with the trace) layer 1's routing run twice, 8 (FP8) the FFN's scale grids staged with the rows by
             // bulk copies (the default reads them from global memory in the products: 16 copies less a MoE layer,
             // H200 graph 0.607 vs 0.637 ms), 16 (with DSV3_PERSIST_ATT_MARKS=1 and the trace) layer 1's attention
             // scores and values run twice
  int wb;    // bytes of one weight buffer
  int xmax;  // floats of the input-vector buffer
  int split_rows;
  int scf;  // floats of one FP8 scale-grid area (PersistentShape::scale_floats)
  // Shape constants computed on the host (in_rows_bytes, o_rows_bytes, qc_chunk_rows): their 64-bit divisions were
  // ~5 KB of the kernel's machine code, fetched into the instruction cache again in every layer.
  int in_rb, o_rb, qcr;
  int hs_max;  // contexts up to this many rows split the attention by head (see the kernel's stage 3); 0: never
};

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
// Stage 2: the absorbed query rows go to every block but the last, which appends the new latent row meanwhile.
__host__ __device__ inline int qc_blocks(int nb) { return nb > 1 ? nb - 1 : 1; }
// Its rows staged in shared memory: a block's whole share unless that passes 64 KB (small grids; the rest is read
// from global memory).
inline int64_t qc_chunk_rows(const PersistentShape& s, int nb) {
  const int64_t share = (s.H * (s.kvr + s.dr) + qc_blocks(nb) - 1) / qc_blocks(nb), fit = (int64_t(1) << 16) / (s.nq * 4);
  return share < fit ? share : (fit > 8 ? fit : 8);
}
// Stage 1's buffer: a block's [q_a | kv_a] rows, then (16-byte aligned) its rows of the router's residual weight.
inline int64_t in_rows_bytes(const PersistentShape& s, int nb) {
  return ((s.nq + s.kvr + s.dr + nb - 1) / nb * s.D * (s.fp8 ? 1 : 2) + 15) / 16 * 16;
}
// Stage 5's buffer: a block's o_proj rows, then (aligned) its rows of the router folded into o_proj.
inline int64_t o_rows_bytes(const PersistentShape& s, int nb) {
  return ((s.D + nb - 1) / nb * s.H * s.dv * (s.fp8 ? 1 : 2) + 15) / 16 * 16;
}

// Shared-memory plan, the same on host and device.
struct Plan {
  int64_t wb = 0, xmax = 0, misc = 0, smem = 0;
};
Plan plan_of(const PersistentShape& s, int nb) {
  const int64_t W = s.kvr + s.dr;
  const int64_t es = s.fp8 ? 1 : 2;  // bytes of a projection weight (W_UK, W_UV and the cache stay bf16)
  int64_t wb = 0;
  auto at_least = [&](int64_t b) { wb = std::max(wb, b); };
  at_least(in_rows_bytes(s, nb) + cdiv(s.E, nb) * s.D * 4);
  at_least(qc_chunk_rows(s, nb) * s.nq * 4);
  at_least(kTile * (W + kPad) * 2 + s.H * W * 4 + s.H * kTile * 4);
  at_least(s.kvr * s.dv * 2);
  at_least(o_rows_bytes(s, nb) + cdiv(s.E, nb) * s.H * s.dv * 4);
  at_least(2 * cdiv(s.max_units, nb) * s.D * es);
  at_least(cdiv(s.D, nb) * s.max_units * es);
  Plan p;
  p.wb = (wb + 15) / 16 * 16;
  p.xmax = std::max({s.D, s.nq + W, s.H * s.dv, s.max_units, s.kvr + kT});
  p.xmax = (p.xmax + 3) / 4 * 4;
  p.misc = 32 + 3 * kMaxH + 32 + 32 + 8 + 2 * (4 * s.E + 132) + 4 * s.E + s.router.n_group + nb + 4 + 3 * s.scale_floats;
  p.smem = 2 * p.wb + 4 * (p.xmax + p.misc);
  return p;
}

constexpr int kTraceEvents = 512, kTraceSub = 496;  // barrier events, then 16 sub-stage marks
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long v;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(v));
  return v;
}
struct GridBarrier {
  uint32_t* ctr;
  unsigned long long* trace;
  int flags;
  uint32_t target = 0;
  int ev = 0;

  __device__ __noinline__ void stamp() {
    if (trace && threadIdx.x == 0 && ev < kTraceSub) trace[blockIdx.x * kTraceEvents + ev] = global_ns();
    ++ev;
  }
  // Points inside one stage of one layer (trace only): kTraceSub + k, read by the report as sub-stage times.
  __device__ __noinline__ void mark(int k) {
    if (trace && threadIdx.x == 0) trace[blockIdx.x * kTraceEvents + kTraceSub + k] = global_ns();
  }
  // This block's writes so far are visible to every block that has waited past the matching wait().
  __device__ __noinline__ void arrive() {
    __syncthreads();
    stamp();
    target += gridDim.x;
    if (threadIdx.x == 0) {
      if (flags & 1) {
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(ctr) : "memory");
      } else {
        __threadfence();
        atomicAdd(ctr, 1u);
      }
    }
  }
  __device__ __noinline__ void wait() {
    if (threadIdx.x == 0) {
      uint32_t v;
      do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(ctr) : "memory");
      } while (v < target);
    }
    stamp();
    __syncthreads();
  }
};

// This block's share [r0, r1) of n items.
// 32-bit division (the host checks n·nb < 2^31): a 64-bit one is a ~1 KB subroutine call at each of its sites; and
// one out-of-line copy (returned in registers) instead of ~250 bytes at each of ~20 sites.
__device__ __noinline__ int2 share_of(uint32_t n, uint32_t b, uint32_t nb) { return make_int2(int(n * b / nb), int(n * (b + 1) / nb)); }
__device__ __forceinline__ void share(int64_t n, int b, int nb, int64_t& r0, int64_t& r1) {
  const int2 r = share_of(uint32_t(n), uint32_t(b), uint32_t(nb));
  r0 = r.x, r1 = r.y;
}
__device__ __forceinline__ float round_bf16(float v) { return bf16_to_f32(f32_to_bf16(v)); }
__device__ __forceinline__ float dot8(const uint4 w, const float* x) {
  const float4 a = *reinterpret_cast<const float4*>(x), b = *reinterpret_cast<const float4*>(x + 4);
  float s = __uint_as_float(w.x << 16) * a.x;
  s = fmaf(__uint_as_float(w.x & 0xffff0000u), a.y, s);
  s = fmaf(__uint_as_float(w.y << 16), a.z, s);
  s = fmaf(__uint_as_float(w.y & 0xffff0000u), a.w, s);
  s = fmaf(__uint_as_float(w.z << 16), b.x, s);
  s = fmaf(__uint_as_float(w.z & 0xffff0000u), b.y, s);
  s = fmaf(__uint_as_float(w.w << 16), b.z, s);
  s = fmaf(__uint_as_float(w.w & 0xffff0000u), b.w, s);
  return s;
}
// 4 bf16 weights (8 bytes) times 4 f32 values.
__device__ __forceinline__ float dot4(const uint2 w, const float4 a, float s) {
  s = fmaf(__uint_as_float(w.x << 16), a.x, s);
  s = fmaf(__uint_as_float(w.x & 0xffff0000u), a.y, s);
  s = fmaf(__uint_as_float(w.y << 16), a.z, s);
  return fmaf(__uint_as_float(w.y & 0xffff0000u), a.w, s);
}
// Σ row[k]·x[k] over a warp (row bf16, x f32, both in shared memory, K % 4 == 0); every lane gets the sum. A lane
// takes 4 consecutive values per step, so the warp's x and row reads are contiguous (no bank conflicts).
// `sr` (FP8 rows only): the row's block scales, one per 128 columns; ignored for bf16.
__device__ __forceinline__ float warp_dot_part(const uint16_t* row, const float* x, int K, float acc, const float* sr = nullptr) {
  (void)sr;
  for (int c = threadIdx.x & 31; c < K / 4; c += 32)
    acc = dot4(*reinterpret_cast<const uint2*>(row + c * 4), *reinterpret_cast<const float4*>(x + c * 4), acc);
  return acc;
}
// 4 e4m3 weights (4 bytes) times 4 f32 values.
__device__ __forceinline__ float dot4(const uint32_t w, const float4 a) {
  const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(w & 0xffffu), __NV_E4M3);
  const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(w >> 16), __NV_E4M3);
  const float2 p = __half22float2(__half2(lo)), q = __half22float2(__half2(hi));
  return fmaf(q.y, a.w, fmaf(q.x, a.z, fmaf(p.y, a.y, p.x * a.x)));
}
// The same for an e4m3 row: a warp step covers 128 columns, one scale block, so step i's scale is sr[i].
__device__ __forceinline__ float warp_dot_part(const uint8_t* row, const float* x, int K, float acc, const float* sr) {
  for (int c = threadIdx.x & 31, i = 0; c < K / 4; c += 32, ++i)
    acc = fmaf(sr[i], dot4(*reinterpret_cast<const uint32_t*>(row + c * 4), *reinterpret_cast<const float4*>(x + c * 4)), acc);
  return acc;
}
// The same for an f32 row (the folded weights).
__device__ __forceinline__ float warp_dot_part(const float* row, const float* x, int K, float acc, const float* = nullptr) {
  for (int c = threadIdx.x & 31; c < K / 4; c += 32) {
    const float4 w = *reinterpret_cast<const float4*>(row + c * 4), v = *reinterpret_cast<const float4*>(x + c * 4);
    acc = fmaf(w.x, v.x, fmaf(w.y, v.y, fmaf(w.z, v.z, fmaf(w.w, v.w, acc))));
  }
  return acc;
}
template <class WT>
__device__ __forceinline__ float warp_dot(const WT* row, const float* x, int K, const float* sr = nullptr) {
  return warp_sum(warp_dot_part(row, x, K, 0.0f, sr));
}
// Two rows against the same x (gate and up): x read once.
__device__ __forceinline__ float2 warp_dot2(const uint16_t* r0, const uint16_t* r1, const float* x, int K, const float*, const float*) {
  float a0 = 0.0f, a1 = 0.0f;
  for (int c = threadIdx.x & 31; c < K / 4; c += 32) {
    const float4 v = *reinterpret_cast<const float4*>(x + c * 4);
    a0 = dot4(*reinterpret_cast<const uint2*>(r0 + c * 4), v, a0);
    a1 = dot4(*reinterpret_cast<const uint2*>(r1 + c * 4), v, a1);
  }
  return make_float2(warp_sum(a0), warp_sum(a1));
}
__device__ __forceinline__ float2 warp_dot2(const uint8_t* r0, const uint8_t* r1, const float* x, int K, const float* s0, const float* s1) {
  float a0 = 0.0f, a1 = 0.0f;
  for (int c = threadIdx.x & 31, i = 0; c < K / 4; c += 32, ++i) {
    const float4 v = *reinterpret_cast<const float4*>(x + c * 4);
    a0 = fmaf(s0[i], dot4(*reinterpret_cast<const uint32_t*>(r0 + c * 4), v), a0);
    a1 = fmaf(s1[i], dot4(*reinterpret_cast<const uint32_t*>(r1 + c * 4), v), a1);
  }
  return make_float2(warp_sum(a0), warp_sum(a1));
}
// The block-scale row of row r of an FP8 weight whose first `split` rows (0: none) are one stacked weight with its
// own scale rows (cuda_model.cpp's Lin::split; gate | up of an expert).
__device__ __forceinline__ int scale_row(int r, int split) { return split > 0 && r >= split ? (split + 127) / 128 + (r - split) / 128 : r / 128; }
// xs[0, n) = gamma · (xs · r), r = 1 / sqrt(mean(xs²) + eps) (rmsnorm_to's order), optionally rounded to bf16. Each
// thread touches the indices t, t + kT, ... it wrote itself. Returns r.
__device__ __noinline__ float norm_in_place(float* xs, int n, const float* gamma, float eps, bool round, float* red) {
  constexpr int U = 8;  // gamma's loads of a thread issued together (one round trip, not one per element)
  float g[U];
  auto load_gamma = [&](int base) {
#pragma unroll
    for (int i = 0; i < U; ++i) {
      const int j = base + threadIdx.x + i * kT;
      g[i] = j < n ? __ldg(gamma + j) : 0.0f;
    }
  };
  load_gamma(0);  // in flight while the sum of squares is reduced
  float ss = 0.0f;
  for (int j = threadIdx.x; j < n; j += kT) ss += xs[j] * xs[j];
  ss = block_sum(ss, red);
  const float r = 1.0f / sqrtf(ss / float(n) + eps);
  for (int base = 0; base < n; base += U * kT) {
    if (base > 0) load_gamma(base);
#pragma unroll
    for (int i = 0; i < U; ++i) {
      const int j = base + threadIdx.x + i * kT;
      if (j < n) {
        const float y = g[i] * (xs[j] * r);
        xs[j] = round ? round_bf16(y) : y;
      }
    }
  }
  __syncthreads();
  return r;
}

// A piece of the FFN's concatenated units: the fixed expert first, then the routed ones in the router's order.
struct Seg {
  const void* gu;
  const void* dn;
  int64_t I, start;
};
__device__ __forceinline__ int seg_count(const PersistentLayer& L, int top_k) { return (L.fix_I > 0 ? 1 : 0) + (L.gate ? top_k : 0); }
// seg_gu / seg_dn: the chosen experts' weights in the router's order (shared memory, filled after routing).
__device__ __forceinline__ Seg seg_at(const PersistentLayer& L, int i, const void* const* seg_gu, const void* const* seg_dn) {
  if (L.fix_I > 0) {
    if (i == 0) return {L.fix_gu, L.fix_dn, L.fix_I, 0};
    --i;
  }
  return {seg_gu[i], seg_dn[i], L.exp_I, L.fix_I + i * L.exp_I};
}

// dst[i] = a[i] (+ b[i]) for i < n (n % 4 == 0, all 16-byte aligned), read from L2 (written by other blocks of the
// launch); `also` (global, or null) gets the same values. Every load of a thread is issued before its first store
// (one L2 round trip, not one per element); ends with __syncthreads.
__device__ __noinline__ void load_vec(float* dst, const float* a, const float* b, int n, float* also = nullptr) {
  constexpr int U = 8;  // 8 float4 a thread: the attention stage's q (H·W floats, 4608 for small.json) in one trip
  const int n4 = n / 4;
  for (int base = 0; base < n4; base += U * kT) {
    float4 va[U], vb[U];
#pragma unroll
    for (int i = 0; i < U; ++i) {
      const int c = base + threadIdx.x + i * kT;
      if (c < n4) {
        va[i] = __ldcg(reinterpret_cast<const float4*>(a) + c);
        if (b) vb[i] = __ldcg(reinterpret_cast<const float4*>(b) + c);
      }
    }
#pragma unroll
    for (int i = 0; i < U; ++i) {
      const int c = base + threadIdx.x + i * kT;
      if (c < n4) {
        float4 v = va[i];
        if (b) v.x += vb[i].x, v.y += vb[i].y, v.z += vb[i].z, v.w += vb[i].w;
        reinterpret_cast<float4*>(dst)[c] = v;
        if (also) reinterpret_cast<float4*>(also)[c] = v;
      }
    }
  }
  __syncthreads();
}

// dst[0, n) = the bf16 row as f32 (n % 8 == 0, 16-byte aligned); `also` (global, or null) gets the same values.
// Ends with __syncthreads.
__device__ __noinline__ void embed_row(float* dst, const uint16_t* row, int n, float* also) {
  for (int c = threadIdx.x; c < n / 8; c += kT) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(row) + c);
    const float4 a = make_float4(__uint_as_float(v.x << 16), __uint_as_float(v.x & 0xffff0000u), __uint_as_float(v.y << 16),
                                 __uint_as_float(v.y & 0xffff0000u));
    const float4 b = make_float4(__uint_as_float(v.z << 16), __uint_as_float(v.z & 0xffff0000u), __uint_as_float(v.w << 16),
                                 __uint_as_float(v.w & 0xffff0000u));
    reinterpret_cast<float4*>(dst)[2 * c] = a;
    reinterpret_cast<float4*>(dst)[2 * c + 1] = b;
    if (also) reinterpret_cast<float4*>(also)[2 * c] = a, reinterpret_cast<float4*>(also)[2 * c + 1] = b;
  }
  __syncthreads();
}

// Why so many helpers are __noinline__: the kernel runs each stage's code once per layer, and inlined it was 329 KB
// of machine code, far past the instruction caches; shared copies of the helpers stay cached across stages.

constexpr int64_t kPiece = 1 << 19;  // bytes per bulk copy (few, large copies: the copy queue is short)
// A fill of several pieces: fill_piece per piece (the last warp's lanes take turns), then fill_close. k: the
// running piece count of this fill.
__device__ __noinline__ void fill_piece(uint64_t* bar, void* dst, const void* src, int64_t bytes, int& k) {
  if ((threadIdx.x >> 5) != kW - 1) return;
  const int lane = threadIdx.x & 31;
  if (k == 0) fence_proxy_async_smem();
  for (int64_t off = 0; off < bytes; off += kPiece, ++k) {
    if ((k & 31) != lane) continue;
    const uint32_t n = uint32_t(min(kPiece, bytes - off));
    mbar_expect_tx(bar, n);
    bulk_copy_g2s(static_cast<char*>(dst) + off, static_cast<const char*>(src) + off, n, bar);
  }
}
__device__ __noinline__ void fill_close(uint64_t* bar, int k) {
  if ((threadIdx.x >> 5) != kW - 1) return;
  if (k == 0) fence_proxy_async_smem();
  __syncwarp();
  if ((threadIdx.x & 31) == 0) mbar_arrive(bar);
}
// Cache rows [c0, c0 + n) of a paged pool (W bf16 each) into rows of KS at dst, one bulk copy per row issued by the
// last warp's lanes, completing one phase of `bar`; row `skip` is left out (this step writes it). Called by every
// thread.
__device__ __noinline__ void fill_cache_rows(uint64_t* bar, void* dst, const uint16_t* pool, const int32_t* btab, int bs, int c0, int n,
                                             int skip, int W, int KS) {
  if ((threadIdx.x >> 5) != kW - 1) return;
  const int lane = threadIdx.x & 31;
  fence_proxy_async_smem();
  #pragma unroll 1
  for (int j = lane; j < n; j += 32) {
    const int row = c0 + j, blk = row / bs;
    if (row == skip) continue;
    mbar_expect_tx(bar, uint32_t(W * 2));
    bulk_copy_g2s(static_cast<uint16_t*>(dst) + j * KS, pool + (int64_t(btab[blk]) * bs + (row - blk * bs)) * W, uint32_t(W * 2), bar);
  }
  __syncwarp();
  if (lane == 0) mbar_arrive(bar);
}
// y[r0 + i] = row i of the staged [r1 - r0, Kd] block m · x, one warp per row. FP8: sc is the weight's staged
// scale grid (split: scale_row's), kb its columns.
template <class WT>
__device__ __noinline__ void gemv_block(const WT* m, int64_t r0, int64_t r1, int Kd, const float* x, float* y, const float* sc, int split,
                                        int kb) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t r = warp; r < r1 - r0; r += kW) {
    const float* sr = sizeof(WT) == 1 ? sc + scale_row(int(r0 + r), split) * kb : nullptr;
    const float v = warp_dot(m + r * Kd, x, Kd, sr);
    if (lane == 0) y[r0 + r] = v;
  }
}
__device__ __forceinline__ int cdiv128(int64_t n) { return int((n + 127) / 128); }

// WT: the projections' weight type, uint16_t (bf16) or uint8_t (e4m3 with 128x128 block scales). W_UK, W_UV and
// the attention stay bf16, the router f32.
template <class WT>
__global__ void __launch_bounds__(kT, 1) k_decode_persistent(const Args a) {
  constexpr int ES = int(sizeof(WT));
  constexpr bool kFp8 = ES == 1;
  extern __shared__ __align__(16) unsigned char sm[];
  const PersistentShape& s = a.s;
  const Work& w = a.w;
  const int b = blockIdx.x, nb = gridDim.x, t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int D = int(s.D), H = int(s.H), dr = int(s.dr), dv = int(s.dv), kvr = int(s.kvr), nq = int(s.nq);
  const int E = int(s.E), K = s.router.top_k, nin = nq + kvr + dr, W = kvr + dr, HV = H * dv, KS = W + kPad;
  unsigned char* buf[2] = {sm, sm + a.wb};
  float* xs = reinterpret_cast<float*>(sm + 2 * a.wb);
  float* red = xs + a.xmax;
  float* runm = red + 32;
  float* runl = runm + kMaxH;
  float* alph = runl + kMaxH;
  int* ridx = reinterpret_cast<int*>(alph + kMaxH);
  float* rw = reinterpret_cast<float*>(ridx + 32);
  uint64_t* mb = reinterpret_cast<uint64_t*>(rw + 32);   // mbarriers: buffer 0, buffer 1, the routed gate|up rows
  const void** ptab_gu = reinterpret_cast<const void**>(mb + 4);  // [E] every expert's weights (copied in)
  const void** ptab_dn = ptab_gu + E;                              // [E]
  const void** seg_gu = ptab_dn + E;                               // [33] the chosen experts' weights
  const void** seg_dn = seg_gu + 33;                               // [33]
  const float** ptab_gus = reinterpret_cast<const float**>(seg_dn + 33);  // [E] FP8: every expert's scale grids
  const float** ptab_dns = ptab_gus + E;                                  // [E]
  const float** seg_gus = ptab_dns + E;                                   // [33] the chosen experts' scale grids
  const float** seg_dns = seg_gus + 33;                                   // [33]
  float* lgs = reinterpret_cast<float*>(seg_dns + 33);  // [E] the router's logits
  float* bias_s = lgs + E;                               // [E] its choice bias
  float* rsc = bias_s + E;                               // router scratch: 2E + n_group
  float* wsp = rsc + 2 * E + s.router.n_group;           // split weights of the merge
  // FP8: the scale grids a fill's rows need, one area per mbarrier (buffer 0, buffer 1, the routed gate|up rows)
  float* sca0 = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(wsp + nb) + 15) & ~uintptr_t(15));  // bulk-copy target
  float* sca[3] = {sca0, sca0 + a.scf, sca0 + 2 * a.scf};
  const int kbD = cdiv128(D);
  GridBarrier bar{a.bar, a.trace, a.flags};
  if (t == 0) {
    for (int i = 0; i < 3; ++i) mbar_init(&mb[i], 1);
    mbar_init_fence();
  }
  __syncthreads();
  uint32_t phase = 0;  // bit i: the parity of barrier i's phase being filled (the same in every thread)
  int cur = 0;         // the buffer (and scale area) the current stage reads

  const int64_t pos = a.io.pos[0];
  const int64_t L = pos + 1;
  const int32_t* btab = a.io.table;
  // The attention's work split (stage 3). Every head together over this block's context rows (the context split
  // over up to nb blocks, merged by stage 4), or, for contexts up to a.hs_max rows, one head per block: head
  // h0 = b % H over its split sp = b / H of the context (up to nb / H splits per head), the last split of a head to
  // finish merging them and applying W_UV itself, which saves stage 4 and its grid barrier. 32-bit divisions (the
  // context is below 2^31 rows; a 64-bit one is a long inline sequence).
  const int Li = int(L);
  const bool hsplit = Li <= a.hs_max && nb >= H;
  const int h0 = hsplit ? b % H : 0, nh = hsplit ? 1 : H, sp = hsplit ? b / H : b;
  const int nsplit = min(hsplit ? nb / H : nb, (Li + a.split_rows - 1) / a.split_rows), rps = (Li + nsplit - 1) / nsplit;
  const int a0 = min(Li, sp * rps), a1 = min(Li, a0 + rps);  // this block's context rows (empty for sp >= nsplit)
  const float2* cs = reinterpret_cast<const float2*>(a.io.rope) + pos * (dr / 2);

  // ---- operand copies: one phase of mbarrier `which` filled by bulk copies that the last warp issues (any number of
  // pieces; an empty fill completes at once), waited for by every thread ----
  // FP8 scale grids ride along: emit_sc(offset, src, n) brings n floats to sca[which] + offset, as one more bulk copy
  // of the phase when both ends are 16-byte aligned and n % 4 == 0; else the last warp loads them (plain loads, all
  // of a lane's issued before its stores) before the phase's arrive, which publishes them.
  auto fill = [&](int which, auto&& pieces) {
    int k = 0;
    pieces([&](void* dst, const void* src, int64_t bytes) { fill_piece(&mb[which], dst, src, bytes, k); },
           [&](int off, const float* src, int n) {
             float* dst = sca[which] + off;
             if (((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) & 15) == 0 && n % 4 == 0) {
               fill_piece(&mb[which], dst, src, int64_t(n) * 4, k);
               return;
             }
             if (warp != kW - 1) return;
             constexpr int U = 8;
#pragma unroll 1
             for (int base = 0; base < n; base += 32 * U) {
               float v[U];
#pragma unroll
               for (int i = 0; i < U; ++i) v[i] = base + lane + 32 * i < n ? __ldg(src + base + lane + 32 * i) : 0.0f;
#pragma unroll
               for (int i = 0; i < U; ++i)
                 if (base + lane + 32 * i < n) sca[which][off + base + lane + 32 * i] = v[i];
             }
           });
    fill_close(&mb[which], k);
  };
  auto wait_fill = [&](int which) {
    mbar_wait_parity(&mb[which], (phase >> which) & 1u);
    phase ^= 1u << which;
  };
  // This block's share of the rows of a projection [n, k] (and, FP8, the weight's whole scale grid: a few hundred
  // floats at these sizes).
  // Stage 1's operands: this block's [q_a | kv_a] rows (and, MoE, its rows of the router's residual weight).
  auto in_rows = [&](int which, const PersistentLayer& Lp) {
    int64_t r0, r1, e0 = 0, e1 = 0;
    share(nin, b, nb, r0, r1);
    if (Lp.gate) share(E, b, nb, e0, e1);
    const int split = int(Lp.split_in);
    fill(which, [&](auto&& emit, auto&& emit_sc) {
      emit(buf[which], static_cast<const char*>(Lp.w_in) + r0 * D * ES, (r1 - r0) * D * ES);
      if (kFp8) emit_sc(0, Lp.s_in, (split > 0 ? cdiv128(split) + cdiv128(nin - split) : cdiv128(nin)) * cdiv128(D));
      if (e1 > e0) emit(buf[which] + a.in_rb, Lp.w_rg + e0 * D, (e1 - e0) * D * 4);
    });
  };
  auto pool_of = [&](const PersistentLayer& Lp) {
    return reinterpret_cast<uint16_t*>(static_cast<char*>(a.io.pool) + Lp.cache_layer * a.io.pool_layer_bytes);
  };
  // Cache rows [c0, c1) into buffer `which` (row pos excepted: this step writes it, and it is read directly).
  auto tile_rows = [&](int which, const uint16_t* pool, int64_t c0, int64_t c1) {
    fill_cache_rows(&mb[which], buf[which], pool, btab, int(s.block_size), int(c0), int(c1 - c0), int(pos), W, KS);
  };
  // FFN units [u0, u1) of the fixed segment or of the routed ones: gate rows at dst, up rows at dst + cap·D. With
  // the fixed segment of a MoE layer the same phase brings the routing's tables (choice bias, expert pointers).
  auto gu_rows = [&](int which, const PersistentLayer& Lp, bool fixed, unsigned char* dst) {
    const int64_t U = Lp.fix_I + (Lp.gate ? int64_t(K) * Lp.exp_I : 0), cap = (int(U) + nb - 1) / nb;
    int64_t u0, u1;
    share(U, b, nb, u0, u1);
    unsigned char* g = dst;
    unsigned char* u = g + cap * D * ES;
    const int has_fix = Lp.fix_I > 0 ? 1 : 0, n = seg_count(Lp, K);
    fill(which, [&](auto&& emit, auto&& emit_sc) {
      if (fixed && Lp.gate) {
        if (Lp.bias) emit(bias_s, Lp.bias, int64_t(E) * 4);
        emit(ptab_gu, Lp.exp_gu, int64_t(E) * 8);
        emit(ptab_dn, Lp.exp_dn, int64_t(E) * 8);
        if (kFp8) {
          emit(ptab_gus, Lp.exp_gu_s, int64_t(E) * 8);
          emit(ptab_dns, Lp.exp_dn_s, int64_t(E) * 8);
        }
      }
#pragma unroll 1
      for (int i = fixed ? 0 : has_fix; i < (fixed ? has_fix : n); ++i) {
        const Seg sg = seg_at(Lp, i, seg_gu, seg_dn);
        if (kFp8 && (a.flags & 8)) {  // the segment's [2·⌈I/128⌉, ⌈D/128⌉] grid: the fixed one at 0, routed ones after each other
          const int cells = 2 * cdiv128(sg.I) * kbD;
          emit_sc(fixed ? 0 : (i - has_fix) * cells, i < has_fix ? Lp.s_fix_gu : seg_gus[i - has_fix], cells);
        }
        const int64_t lo = max(u0, sg.start), hi = min(u1, sg.start + sg.I);
        if (lo >= hi) continue;
        const unsigned char* src = static_cast<const unsigned char*>(sg.gu);
        emit(g + (lo - u0) * D * ES, src + (lo - sg.start) * D * ES, (hi - lo) * D * ES);
        emit(u + (lo - u0) * D * ES, src + (sg.I + lo - sg.start) * D * ES, (hi - lo) * D * ES);
      }
    });
  };
  // Down rows [d0, d1) of every segment, one copy per segment (its rows are contiguous): segment e's [d1 - d0, I_e]
  // block at element (d1 - d0)·start_e.
  auto down_rows = [&](int which, const PersistentLayer& Lp) {
    int64_t d0, d1;
    share(D, b, nb, d0, d1);
    unsigned char* o = buf[which];
    const int n = seg_count(Lp, K), has_fix = Lp.fix_I > 0 ? 1 : 0;
    fill(which, [&](auto&& emit, auto&& emit_sc) {
#pragma unroll 1
      for (int i = 0; i < n; ++i) {
        const Seg sg = seg_at(Lp, i, seg_gu, seg_dn);
        if (kFp8 && (a.flags & 8)) {  // [⌈D/128⌉, ⌈I/128⌉] grids: the fixed one, then the routed ones
          const int fcells = kbD * cdiv128(Lp.fix_I), cells = kbD * cdiv128(sg.I);
          emit_sc(i < has_fix ? 0 : fcells + (i - has_fix) * cells, i < has_fix ? Lp.s_fix_dn : seg_dns[i - has_fix], cells);
        }
        if (d1 > d0) emit(o + (d1 - d0) * sg.start * ES, static_cast<const unsigned char*>(sg.dn) + d0 * sg.I * ES, (d1 - d0) * sg.I * ES);
      }
    });
  };
  // y[r0 + i] = row i of the staged [r1 - r0, Kd] block · xs, one warp per row.
  auto gemv_out = [&](const unsigned char* wsm, int64_t n, int Kd, float* y, int split) {
    int64_t r0, r1;
    share(n, b, nb, r0, r1);
    gemv_block(reinterpret_cast<const WT*>(wsm), r0, r1, Kd, xs, y, sca[cur], split, cdiv128(Kd));
  };

  // Stage 2's share of the absorbed query rows (f32).
  const int nbq = qc_blocks(nb);
  const int64_t qcr = a.qcr;
  auto qc_rows = [&](int which, const PersistentLayer& Lp, int64_t r0, int64_t r1) {  // rows [r0, r1) of w_qc
    fill(which, [&](auto&& emit, auto&&) { emit(buf[which], Lp.w_qc + r0 * nq, (r1 - r0) * nq * 4); });
  };
  auto qc_share = [&](int64_t& r0, int64_t& r1) {
    r0 = r1 = 0;
    if (b < nbq) share(int64_t(H) * W, b, nbq, r0, r1);
  };

  // Stage 5's operands into buffer `which`: this block's o_proj rows and its rows of the router folded into o_proj.
  auto o_rows = [&](int which, const PersistentLayer& Lp, bool moe) {
    int64_t r0, r1, e0 = 0, e1 = 0;
    share(D, b, nb, r0, r1);
    if (moe) share(E, b, nb, e0, e1);
    fill(which, [&](auto&& emit, auto&& emit_sc) {
      emit(buf[which], static_cast<const unsigned char*>(Lp.w_o) + r0 * HV * ES, (r1 - r0) * HV * ES);
      if (kFp8) emit_sc(0, Lp.s_o, cdiv128(D) * cdiv128(HV));
      if (e1 > e0) emit(buf[which] + a.o_rb, Lp.w_lg + e0 * HV, (e1 - e0) * HV * 4);
    });
  };
  // Head h's split weights (warp 0, then the block's barrier): wsp[s] = exp(m_s - max over the splits), red[0] =
  // 1 / Σ_s wsp[s]·l_s. Every lane's loads are issued at once.
  auto split_weights = [&](int h) {
    if (warp == 0) {
      float m[kMaxSplitsPerLane], lsum[kMaxSplitsPerLane];
#pragma unroll
      for (int i = 0; i < kMaxSplitsPerLane; ++i) {
        const int q = lane + 32 * i;
        m[i] = q < nsplit ? __ldcg(w.ml + (q * H + h) * 2) : -INFINITY;
        lsum[i] = q < nsplit ? __ldcg(w.ml + (q * H + h) * 2 + 1) : 0.0f;
      }
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < kMaxSplitsPerLane; ++i) mx = fmaxf(mx, m[i]);
      mx = warp_max(mx);
      float tot = 0.0f;
#pragma unroll
      for (int i = 0; i < kMaxSplitsPerLane; ++i) {
        const int q = lane + 32 * i;
        const float f = m[i] > -INFINITY ? expf(m[i] - mx) : 0.0f;
        if (q < nsplit) wsp[q] = f;
        tot += f * lsum[i];
      }
      tot = warp_sum(tot);
      if (lane == 0) red[0] = 1.0f / tot;
    }
    __syncthreads();
  };
  // (xs[0, kvr) · W_UVᵀ)[t] for t < dv (0 elsewhere), W_UV in buffer `which` (waited for by the caller): the
  // threads split it in kT / dv chunks of kvr (part = xs + kvr), summed in a fixed order. Every thread calls it.
  auto uv_product = [&](int which) {
    const uint16_t* wuv = reinterpret_cast<const uint16_t*>(buf[which]);
    float* part = xs + kvr;
    const int parts = kT / dv, v = t % dv, pp = t / dv;
    if (pp < parts) {
      const int chunk = (kvr + parts - 1) / parts, j0 = pp * chunk, j1 = min(kvr, j0 + chunk);
      float a4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      int j = j0;
      for (; j + 4 <= j1; j += 4) {
#pragma unroll
        for (int u = 0; u < 4; ++u) a4[u] = fmaf(xs[j + u], bf16_to_f32(wuv[(j + u) * dv + v]), a4[u]);
      }
      #pragma unroll 1
      for (; j < j1; ++j) a4[0] = fmaf(xs[j], bf16_to_f32(wuv[j * dv + v]), a4[0]);
      part[pp * dv + v] = (a4[0] + a4[1]) + (a4[2] + a4[3]);
    }
    __syncthreads();
    float o = 0.0f;
    if (t < dv) {
      #pragma unroll 1
      for (int q = 0; q < parts; ++q) o += part[q * dv + t];
    }
    return o;
  };
  // xs[j] = Σ_s wsp[s]·part_s[j] / Σ_s wsp[s]·l_s for j < n: head h's splits merged (part_s: split s's row of
  // w.part, stride kvr). Called by every thread of a block.
  auto merge_columns = [&](int h, int n) {
    // A thread's first column of partials is loaded before the split statistics are reduced (one L2 round trip
    // for both, not one after the other; head-split merges have at most 8 splits).
    float pv0[8];
    const bool pre = t < n && nsplit <= 8;
    if (pre)
#pragma unroll
      for (int i = 0; i < 8; ++i) pv0[i] = i < nsplit ? __ldcg(w.part + (i * H + h) * kvr + t) : 0.0f;
    split_weights(h);
    const float inv = red[0];
    for (int j = t; j < n; j += kT) {
      float v = 0.0f;
      if (pre && j == t) {
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (i < nsplit) v = fmaf(wsp[i], pv0[i], v);
        xs[j] = v * inv;
        continue;
      }
      for (int sp0 = 0; sp0 < nsplit; sp0 += 8) {
        float pv[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) pv[i] = sp0 + i < nsplit ? __ldcg(w.part + ((sp0 + i) * H + h) * kvr + j) : 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (sp0 + i < nsplit) v = fmaf(wsp[sp0 + i], pv[i], v);
      }
      xs[j] = v * inv;
    }
  };
  // Head h's splits merged (exp(m_s - max) / Σ exp(m_s - max)·l_s weights), then ·W_UVᵀ with head h's W_UV once
  // buffer `which` has it (waited for here); o_h rounded to bf16. Called by every thread of a block.
  auto merge_uv = [&](int h, int which) {
    merge_columns(h, kvr);
    wait_fill(which);
    __syncthreads();
    const float o = uv_product(which);
    if (t < dv) w.o[h * dv + t] = round_bf16(o);
  };
  in_rows(0, a.layers[0]);
  // Layer 1 (l == 1) carries the trace's marks inside its attention and FFN stages.
  for (int64_t l = 0; l < s.layers; ++l) {
    const PersistentLayer Lp = a.layers[l];
    const bool moe = Lp.gate != nullptr;
    uint16_t* pool = pool_of(Lp);

    // ---- 1: residual, the router's residual term (ln2 ⊙ gate)·h_in (MoE), input norm, [q_a | kv_a] ----
    auto stage2_rows = [&]() {
      int64_t r0, r1;
      qc_share(r0, r1);
      qc_rows(cur ^ 1, Lp, r0, min(r1, r0 + qcr));  // stage 2's staged rows
    };
    stage2_rows();
    if (l > 0) bar.wait();
    if (l == 0 && a.io.embed) {  // the embedding row itself (one launch less a token than an embedding kernel)
      const int64_t id = min(max(a.io.ids[0], int64_t(0)), a.io.vocab - 1);  // (ids are checked before the launch)
      embed_row(xs, a.io.embed + id * D, D, b == 0 ? w.r1 : nullptr);
    } else if (l == 0) {
      load_vec(xs, a.io.h, nullptr, D, b == 0 ? w.r1 : nullptr);
    }
    else load_vec(xs, w.r2, w.ffn, D, b == 0 ? w.r1 : nullptr);
    wait_fill(cur);
    if (moe) {
      int64_t e0, e1;
      share(E, b, nb, e0, e1);
      gemv_block(reinterpret_cast<const float*>(buf[cur] + a.in_rb), e0, e1, D, xs, w.logits, nullptr, 0, 0);
      __syncthreads();  // before the norm overwrites xs
    }
    norm_in_place(xs, D, Lp.ln1, s.eps, true, red);
    gemv_out(buf[cur], nin, D, w.qkv, int(Lp.split_in));
    bar.arrive();
    cur ^= 1;

    // ---- 2: q_a norm, the query in latent space (q_b with W_UK absorbed); the last block appends the latent row ----
    tile_rows(cur ^ 1, pool, a0, min(a1, a0 + kTile));
    bar.wait();
    load_vec(xs, w.qkv, nullptr, nq);
    norm_in_place(xs, nq, Lp.q_a_ln, s.eps, true, red);
    if (b == nb - 1) {  // [kv_a_layernorm(c_kv) | RoPE(k_pe)] in bf16 at the token's pool row
      float* kv = xs + nq;  // [c_kv | k_pe] (past q_a)
      load_vec(kv, w.qkv + nq, nullptr, W);
      float ss = 0.0f;
      #pragma unroll 1
      for (int j = t; j < kvr; j += kT) ss += kv[j] * kv[j];
      ss = block_sum(ss, red);
      const float r = 1.0f / sqrtf(ss / float(kvr) + s.eps);
      uint16_t* row = pool + int64_t(a.io.dst_row[0]) * W;
      #pragma unroll 1
      for (int j = t; j < kvr; j += kT) row[j] = f32_to_bf16(Lp.kv_a_ln[j] * (kv[j] * r));
      for (int i = t; i < dr / 2; i += kT) {
        const float2 c = cs[i];
        const float u = kv[kvr + 2 * i], v = kv[kvr + 2 * i + 1];
        row[kvr + 2 * i] = f32_to_bf16(u * c.x - v * c.y);
        row[kvr + 2 * i + 1] = f32_to_bf16(v * c.x + u * c.y);
      }
    }
    wait_fill(cur);
    {
      int64_t r0, r1;
      qc_share(r0, r1);
      const int64_t c1 = min(r1, r0 + qcr);
      gemv_block(reinterpret_cast<const float*>(buf[cur]), r0, c1, nq, xs, w.qc, nullptr, 0, 0);
      // Rows past the staged ones (small grids only) straight from global memory.
      if (c1 < r1) gemv_block(Lp.w_qc + c1 * nq, c1, r1, nq, xs, w.qc, nullptr, 0, 0);
    }
    bar.arrive();
    cur ^= 1;

    // ---- 3: attention of every head over this block's context rows (online softmax), f32 partials ----
    // W_UV of the head this block merges (stage 4's block h; with the head split, any split's block may be the one)
    const int hm = hsplit ? h0 : b;
    const bool gets_uv = hsplit ? sp < nsplit : b < H;
    fill(cur ^ 1, [&](auto&& emit, auto&&) {
      if (gets_uv) emit(buf[cur ^ 1], static_cast<const uint16_t*>(Lp.wuv_t) + int64_t(hm) * kvr * dv, int64_t(kvr) * dv * 2);
    });
    bar.wait();
    if (kAttMarks && l == 1) bar.mark(10);
    if (sp < nsplit && t < nh) runm[t] = -INFINITY, runl[t] = 0.0f;
    uint16_t* tile = reinterpret_cast<uint16_t*>(buf[cur]);
    float* qs = reinterpret_cast<float*>(buf[cur] + kTile * KS * 2);  // [H][W]
    float* sc = qs + H * W;                                           // [H][kTile]
    if (a0 < a1) {
      load_vec(qs, w.qc + h0 * W, nullptr, nh * W);
      #pragma unroll 1
      for (int p = t; p < nh * (dr / 2); p += kT) {  // RoPE(q_pe) per head (each thread its own pairs)
        const int h = p / (dr / 2), i = p % (dr / 2);
        float* q = qs + h * W + kvr + 2 * i;
        const float2 c = cs[i];
        const float x = q[0], y = q[1];
        q[0] = x * c.x - y * c.y;
        q[1] = y * c.x + x * c.y;
      }
    }
    if (kAttMarks && l == 1) bar.mark(11);
    wait_fill(cur);
    if (kAttMarks && l == 1) bar.mark(12);
    // (Trace experiment, DSV3_PERSIST_ATT_MARKS=1 with DSV3_PERSISTENT_FLAGS=16: layer 1's scores and values run a
    // second time, its code and operands on chip: marks 6-7. The output is then wrong; timing only.)
    for (int rep = 0; rep < (kAttMarks && l == 1 && (a.flags & 16) ? 2 : 1); ++rep) {
      if (rep == 1) {
        __syncthreads();
        if (sp < nsplit && t < nh) runm[t] = -INFINITY, runl[t] = 0.0f;
        __syncthreads();
        bar.mark(6);
      }
      if (a0 < a1) {
        float acc[2][kMaxH];
#pragma unroll
        for (int u = 0; u < 2; ++u)
#pragma unroll
          for (int h = 0; h < kMaxH; ++h) acc[u][h] = 0.0f;
        for (int c0 = a0; c0 < a1; c0 += kTile) {
          const int n = min(kTile, a1 - c0);
          if (c0 > a0) {  // later tiles: once every thread is done with the previous one
            __syncthreads();
            tile_rows(cur, pool, c0, c0 + n);
            wait_fill(cur);
          }
          if (pos >= c0 && pos < c0 + n)  // the row stage 2 wrote
            for (int c = t; c < W / 8; c += kT)
              reinterpret_cast<uint4*>(tile + (pos - c0) * KS)[c] =
                  __ldcg(reinterpret_cast<const uint4*>(pool + int64_t(a.io.dst_row[0]) * W) + c);
          __syncthreads();
          // One head (the head split): a warp per cache row, the lanes along it (a thread per row kept 16 of the
          // block's threads busy: H200 0.532-0.534 -> with the values' four chains below 0.522-0.524 ms per token).
          if (nh == 1) {
            for (int j = warp; j < n; j += kW) {
              const uint16_t* kr = tile + j * KS;
              float s0 = 0.0f;
              for (int c = lane; c < W / 4; c += 32)
                s0 = dot4(*reinterpret_cast<const uint2*>(kr + c * 4), *reinterpret_cast<const float4*>(qs + c * 4), s0);
              s0 = warp_sum(s0);
              if (lane == 0) sc[j] = s0 * s.scale;
            }
          } else
          for (int p = t; p < nh * n; p += kT) {
            const int h = p / n, j = p % n;
            const uint16_t* kr = tile + j * KS;
            const float* qv = qs + h * W;
            float s0 = 0.0f, s1 = 0.0f;  // two chains: the loop is latency-bound at 8 warps per SM
            int c = 0;
            for (; c + 2 <= W / 8; c += 2) {
              s0 += dot8(*reinterpret_cast<const uint4*>(kr + c * 8), qv + c * 8);
              s1 += dot8(*reinterpret_cast<const uint4*>(kr + c * 8 + 8), qv + c * 8 + 8);
            }
            if (c < W / 8) s0 += dot8(*reinterpret_cast<const uint4*>(kr + c * 8), qv + c * 8);
            sc[h * kTile + j] = (s0 + s1) * s.scale;
          }
          __syncthreads();
          for (int h = warp; h < nh; h += kW) {
            const float v0 = lane < n ? sc[h * kTile + lane] : -INFINITY;
            const float v1 = lane + 32 < n ? sc[h * kTile + lane + 32] : -INFINITY;
            const float m_old = runm[h], m_new = fmaxf(m_old, warp_max(fmaxf(v0, v1)));
            const float p0 = lane < n ? expf(v0 - m_new) : 0.0f, p1 = lane + 32 < n ? expf(v1 - m_new) : 0.0f;
            sc[h * kTile + lane] = p0;
            sc[h * kTile + lane + 32] = p1;
            const float sum = warp_sum(p0 + p1);
            if (lane == 0) {
              const float al = expf(m_old - m_new);  // 0 on the first tile
              runm[h] = m_new;
              runl[h] = runl[h] * al + sum;
              alph[h] = al;
            }
          }
          __syncthreads();
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const int j = t + u * kT;
            if (u == 0 && nh == 1 && j < kvr) {  // one head: four chains over the rows
              float a4[4] = {acc[u][0] * alph[0], 0.0f, 0.0f, 0.0f};
              int r = 0;
#pragma unroll 2
              for (; r + 4 <= n; r += 4) {
                const float4 p4 = *reinterpret_cast<const float4*>(sc + r);
                a4[0] = fmaf(p4.x, bf16_to_f32(tile[r * KS + j]), a4[0]);
                a4[1] = fmaf(p4.y, bf16_to_f32(tile[(r + 1) * KS + j]), a4[1]);
                a4[2] = fmaf(p4.z, bf16_to_f32(tile[(r + 2) * KS + j]), a4[2]);
                a4[3] = fmaf(p4.w, bf16_to_f32(tile[(r + 3) * KS + j]), a4[3]);
              }
              #pragma unroll 1
              for (; r < n; ++r) a4[0] = fmaf(sc[r], bf16_to_f32(tile[r * KS + j]), a4[0]);
              acc[u][0] = (a4[0] + a4[1]) + (a4[2] + a4[3]);
            } else if (j < kvr) {
#pragma unroll
              for (int h = 0; h < kMaxH; ++h)
                if (h < nh) acc[u][h] *= alph[h];
              for (int r = 0; r < n; r += 4) {
                float v[4];
#pragma unroll
                for (int q = 0; q < 4; ++q) v[q] = r + q < n ? bf16_to_f32(tile[(r + q) * KS + j]) : 0.0f;
#pragma unroll
                for (int h = 0; h < kMaxH; ++h) {
                  if (h < nh) {
                    const float4 p4 = *reinterpret_cast<const float4*>(sc + h * kTile + r);
                    acc[u][h] = fmaf(p4.x, v[0], fmaf(p4.y, v[1], fmaf(p4.z, v[2], fmaf(p4.w, v[3], acc[u][h]))));
                  }
                }
              }
            }
          }
        }
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int j = t + u * kT;
          float* pp = w.part + (sp * H + h0) * kvr + j;
          if (j < kvr) {
#pragma unroll
            for (int h = 0; h < kMaxH; ++h)
              if (h < nh) pp[h * kvr] = acc[u][h];
          }
        }
      } else if (sp < nsplit) {  // no rows (cannot happen with these splits, but the merge reads every split)
        #pragma unroll 1
        for (int i = t; i < nh * kvr; i += kT) {
          w.part[(sp * H + h0) * kvr + i] = 0.0f;
        }
      }
      if (rep == 1) {
        __syncthreads();
        bar.mark(7);
      }
    }
    if (sp < nsplit && t < nh) w.ml[(sp * H + h0 + t) * 2] = runm[t], w.ml[(sp * H + h0 + t) * 2 + 1] = runl[t];
    // Without the head split: stage 4, the splits merged and ·W_UVᵀ per head (block h), after a grid barrier. With
    // it, no stage 4: the last split of head h0 to be done merges the head's splits (the others' partials are
    // visible to it, each fenced before its count) while the other blocks go on to stage 5's barrier. o is rounded
    // to bf16 either way. Stage 5's operands go to the buffer free now: with the head split the tile's, which is read.
    if (hsplit) {
      __syncthreads();
    } else {
      bar.arrive();
      cur ^= 1;
    }
    if (kAttMarks && l == 1) bar.mark(13);
    o_rows(hsplit ? cur : cur ^ 1, Lp, moe);
    int mh = -1;  // the head this block merges
    if (hsplit) {
      // One acq_rel atomic after the block's barrier releases this block's partials and, for the last split,
      // acquires the others' (fences around a relaxed atomic: 0.522-0.524 vs 0.517 ms per token, H200).
      if (t == 0) {
        uint32_t old = 0;
        if (sp < nsplit) asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], 1;" : "=r"(old) : "l"(a.bar + 2 + h0) : "memory");
        ridx[0] = sp < nsplit && old == uint32_t(nsplit - 1);
      }
      __syncthreads();
      if (ridx[0]) mh = h0;
    } else {
      bar.wait();
      if (b < H) mh = b;
    }
    const int uvb = hsplit ? cur ^ 1 : cur;  // W_UV's buffer (its phase is consumed whether used or not)
    if (kAttMarks && l == 1) bar.mark(14);
    if (mh >= 0) {
      merge_uv(mh, uvb);
    } else {
      wait_fill(uvb);
      __syncthreads();
    }
    if (hsplit && mh >= 0 && t == 0) atomicExch(a.bar + 2 + h0, 0u);  // for the next layer (after a grid barrier)
    if (kAttMarks && l == 1 && mh >= 0) bar.mark(15);
    bar.arrive();
    if (!hsplit) cur ^= 1;

    // ---- 5: o_proj, and the router's o term w_lg·o ----
    gu_rows(cur ^ 1, Lp, true, buf[cur ^ 1]);
    bar.wait();
    load_vec(xs, w.o, nullptr, HV);
    wait_fill(cur);
    gemv_out(buf[cur], D, HV, w.att, 0);
    if (moe) {
      int64_t e0, e1;
      share(E, b, nb, e0, e1);
      gemv_block(reinterpret_cast<const float*>(buf[cur] + a.o_rb), e0, e1, HV, xs, w.logits + E, nullptr, 0, 0);
    }
    bar.arrive();
    cur ^= 1;

    // ---- 6: routing (every block), gate|up + SwiGLU of the chosen experts and the fixed one ----
    bar.wait();
    if (l == 1) bar.mark(0);
    if (moe) load_vec(lgs, w.logits, w.logits + E, E);  // the router's two terms
    load_vec(xs, w.r1, w.att, D, b == 0 ? w.r2 : nullptr);
    const float rms = norm_in_place(xs, D, Lp.ln2, s.eps, !moe, red);  // dense: the MLP's input in bf16, as mlp_fwd
    wait_fill(cur);  // the fixed rows and (MoE) the routing's tables
    if (l == 1) bar.mark(1);
    if (moe) {
      for (int e = t; e < E; e += kT) lgs[e] *= rms;  // gate·norm(h) = rms(h)·(gate·(ln2 ⊙ h_in) + w_lg·o)
      __syncthreads();
      route_block(lgs, E, Lp.bias ? bias_s : nullptr, s.router, rsc, rsc + E, rsc + 2 * E, ridx, rw);
      if (t < K) {  // the chosen experts' weight pointers
        seg_gu[t] = ptab_gu[ridx[t]];
        seg_dn[t] = ptab_dn[ridx[t]];
        if (kFp8) seg_gus[t] = ptab_gus[ridx[t]], seg_dns[t] = ptab_dns[ridx[t]];
      }
      __syncthreads();
    }
    if (moe && l == 1 && (a.flags & 4)) {  // experiment: the routing again, its code now in the instruction cache
      bar.mark(6);
      route_block(lgs, E, Lp.bias ? bias_s : nullptr, s.router, rsc, rsc + E, rsc + 2 * E, ridx, rw);
      bar.mark(7);
    }
    if (l == 1) bar.mark(2);
    gu_rows(2, Lp, false, buf[cur]);
    if (l == 1) bar.mark(8);
    if (!(a.flags & 2)) down_rows(cur ^ 1, Lp);
    if (l == 1) bar.mark(9);
    if (l == 1) bar.mark(3);
    wait_fill(2);
    if (l == 1) bar.mark(4);
    {
      const int64_t U = Lp.fix_I + (moe ? int64_t(K) * Lp.exp_I : 0), cap = (int(U) + nb - 1) / nb;
      int64_t u0, u1;
      share(U, b, nb, u0, u1);
      const WT* g = reinterpret_cast<const WT*>(buf[cur]);
      const WT* u = g + cap * D;
      [[maybe_unused]] const int has_fix = Lp.fix_I > 0 ? 1 : 0, nseg = seg_count(Lp, K);
      for (int64_t k = warp; k < u1 - u0; k += kW) {
        const float *gsr = nullptr, *usr = nullptr;
        if constexpr (kFp8) {  // the unit's segment, and its gate and up rows' scales
          const int64_t unit = u0 + k;
          int i = 0;
          Seg sg = seg_at(Lp, 0, seg_gu, seg_dn);
#pragma unroll 1
          while (unit >= sg.start + sg.I && i + 1 < nseg) sg = seg_at(Lp, ++i, seg_gu, seg_dn);
          const int q = int(unit - sg.start), kb2 = cdiv128(sg.I);
          const float* grid = !(a.flags & 8) ? (i < has_fix ? Lp.s_fix_gu : seg_gus[i - has_fix])  // the same layout
                              : i < has_fix    ? sca[cur]
                                               : sca[2] + (i - has_fix) * 2 * kb2 * kbD;
          gsr = grid + (q / 128) * kbD;
          usr = grid + (kb2 + q / 128) * kbD;
        }
        const float2 gu = warp_dot2(g + k * D, u + k * D, xs, D, gsr, usr);
        const float gs = gu.x, us = gu.y;
        if (lane == 0) {
          const float act = gs / (1.0f + expf(-gs)) * us;
          w.act[u0 + k] = moe ? act : round_bf16(act);
        }
      }
    }
    if (a.flags & 2) {
      __syncthreads();
      down_rows(cur ^ 1, Lp);
    }
    if (l == 1) bar.mark(5);
    bar.arrive();
    cur ^= 1;

    // ---- 7: down products, weighted by the router (the fixed expert by 1) ----
    if (l + 1 < s.layers) in_rows(cur ^ 1, a.layers[l + 1]);
    bar.wait();
    {
      const int64_t U = Lp.fix_I + (moe ? int64_t(K) * Lp.exp_I : 0);
      load_vec(xs, w.act, nullptr, int(U));
      if (moe)
        for (int i = 0; i < K; ++i) {
          const int s0 = int(Lp.fix_I + i * Lp.exp_I), s1 = s0 + int(Lp.exp_I);
          for (int j = s0 + t; j < s1; j += kT) xs[j] *= rw[i];
        }
      wait_fill(cur);
      __syncthreads();
      int64_t d0, d1;
      share(D, b, nb, d0, d1);
      const WT* o = reinterpret_cast<const WT*>(buf[cur]);
      [[maybe_unused]] const int nseg = seg_count(Lp, K), has_fix = Lp.fix_I > 0 ? 1 : 0;
      for (int64_t r = warp; r < d1 - d0; r += kW) {
        float acc = 0.0f;
        #pragma unroll 1
        for (int i = 0; i < nseg; ++i) {
          const Seg sg = seg_at(Lp, i, seg_gu, seg_dn);
          const float* sr = nullptr;
          if constexpr (kFp8) {  // down_rows' grid layout: the fixed expert's, then the routed ones'
            const int kbI = cdiv128(sg.I), fcells = kbD * cdiv128(Lp.fix_I);
            sr = (!(a.flags & 8) ? (i < has_fix ? Lp.s_fix_dn : seg_dns[i - has_fix])
                                : sca[cur] + (i < has_fix ? 0 : fcells + (i - has_fix) * kbD * kbI)) +
                 int((d0 + r) / 128) * kbI;
          }
          acc = warp_dot_part(o + (d1 - d0) * sg.start + r * sg.I, xs + sg.start, int(sg.I), acc, sr);
        }
        acc = warp_sum(acc);
        if (lane == 0) w.ffn[d0 + r] = acc;
      }
    }
    bar.arrive();
    cur ^= 1;
  }

  // ---- the final norm: f32 hidden state and its bf16 copy for the head (with kHeadFold, then the logits) ----
  if (kHeadFold && a.io.head) {
    const int hr = a.wb / (D * 2);  // head rows a chunk (the plan's buffers hold at least one bf16 row)
    int64_t v0, v1;
    share(a.io.head_rows, b, nb, v0, v1);
    const int64_t nch = (v1 - v0 + hr - 1) / hr;
    auto head_fill = [&](int which, int64_t c) {
      const int64_t r0 = min(v1, v0 + c * hr), r1 = min(v1, r0 + hr);
      fill(which, [&](auto&& emit, auto&&) {
        if (r1 > r0) emit(buf[which], a.io.head + r0 * D, (r1 - r0) * D * 2);
      });
    };
    head_fill(cur, 0);  // both buffers are free: the last layer prefetched nothing
    head_fill(cur ^ 1, 1);
    bar.wait();
    load_vec(xs, w.r2, w.ffn, D);
    norm_in_place(xs, D, a.io.final_norm, s.eps, false, red);
    for (int j = t; j < D; j += kT) {
      if (b == 0) a.io.fin[j] = xs[j], static_cast<uint16_t*>(a.io.xa)[j] = f32_to_bf16(xs[j]);
      xs[j] = round_bf16(xs[j]);  // the head's input, as the GEMV reads xa
    }
    __syncthreads();
    for (int64_t c = 0; c < max(nch, int64_t(2)); ++c) {  // (every issued fill waited for)
      wait_fill(cur);
      const int64_t r0 = min(v1, v0 + c * hr), r1 = min(v1, r0 + hr);
      if (r1 > r0) gemv_block(reinterpret_cast<const uint16_t*>(buf[cur]), r0, r1, D, xs, a.io.logits, nullptr, 0, 0);
      __syncthreads();
      if (c + 2 < nch) head_fill(cur, c + 2);
      cur ^= 1;
    }
  } else {
    bar.wait();
    if (b == 0) {
      load_vec(xs, w.r2, w.ffn, D);
      norm_in_place(xs, D, a.io.final_norm, s.eps, false, red);
      for (int j = t; j < D; j += kT) {
        a.io.fin[j] = xs[j];
        static_cast<uint16_t*>(a.io.xa)[j] = f32_to_bf16(xs[j]);
      }
    }
  }
  // Every block is past its last wait: the last one out resets the counters for the next launch.
  __syncthreads();
  if (t == 0 && atomicAdd(a.bar + 1, 1u) == uint32_t(nb) - 1) {
    atomicExch(a.bar, 0u);
    atomicExch(a.bar + 1, 0u);
  }
}

// DSV3_PERSISTENT_TRACE=1: every launch stamps the time each block arrives at and passes each grid barrier;
// decode_persistent_trace_report prints the last launch's stage times.
unsigned long long* g_trace = nullptr;
int g_trace_blocks = 0;
unsigned long long* trace_buffer(int nb) {
  static const bool on = [] {
    const char* v = std::getenv("DSV3_PERSISTENT_TRACE");
    return v && *v && std::string(v) != "0";
  }();
  if (!on) return nullptr;
  if (!g_trace || g_trace_blocks < nb) {  // first (eager) launch of a shape, before any graph capture
    DSV3_CUDA_CHECK(cudaMalloc(&g_trace, sizeof(unsigned long long) * size_t(nb) * kTraceEvents));
    DSV3_CUDA_CHECK(cudaMemset(g_trace, 0, sizeof(unsigned long long) * size_t(nb) * kTraceEvents));  // marks a model never sets
    g_trace_blocks = nb;
  }
  return g_trace;
}

int env_split_rows() {
  const char* v = std::getenv("DSV3_PERSISTENT_SPLIT_ROWS");
  const int n = v && *v ? std::atoi(v) : 0;
  return n >= 1 && n <= kTile ? n : kSplitRows;
}

// Contexts up to this many rows take the head split of stage 3 (DSV3_PERSISTENT_HEAD_SPLIT=N; 0: never).
int env_head_split() {
  const char* v = std::getenv("DSV3_PERSISTENT_HEAD_SPLIT");
  return v && *v ? std::max(0, std::atoi(v)) : kHeadSplitMax;
}

int env_flags() {
  const char* v = std::getenv("DSV3_PERSISTENT_FLAGS");
  return v && *v ? std::atoi(v) : 0;
}

int device_blocks(int blocks) {
  if (blocks > 0) return blocks;
  int dev = 0, sms = 0;
  DSV3_CUDA_CHECK(cudaGetDevice(&dev));
  DSV3_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}
int max_smem() {
  int dev = 0, v = 0;
  DSV3_CUDA_CHECK(cudaGetDevice(&dev));
  DSV3_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return v;
}

// Workspace floats, each piece 16-byte aligned.
struct WsLayout {
  int64_t off[11] = {};
  int64_t total = 0;
};
WsLayout ws_layout(const PersistentShape& s, int nb) {
  const int64_t n[11] = {s.D, s.D, s.D, s.D, s.nq + s.kvr + s.dr, s.H * (s.kvr + s.dr), s.H * s.dv, 2 * s.E,
                         s.max_units, int64_t(nb) * s.H * 2, int64_t(nb) * s.H * s.kvr};
  WsLayout w;
  for (int i = 0; i < 11; ++i) {
    w.off[i] = w.total;
    w.total += (n[i] + 3) / 4 * 4;
  }
  return w;
}
}  // namespace

void decode_persistent_trace_report() {
  if (!g_trace) return;
  const int nb = g_trace_blocks;
  std::vector<unsigned long long> h(size_t(nb) * kTraceEvents);
  DSV3_CUDA_CHECK(cudaDeviceSynchronize());
  DSV3_CUDA_CHECK(cudaMemcpy(h.data(), g_trace, h.size() * 8, cudaMemcpyDeviceToHost));
  // Events per block: arrive(0), then (wait, arrive) pairs, then the final wait. Stage k spans from the last block
  // passing barrier k-1 (or the launch) to the last block arriving at barrier k.
  auto at = [&](int b, int e) { return double(h[size_t(b) * kTraceEvents + e]); };
  int n = 1;
  while (n + 1 < kTraceSub && at(0, n) >= at(0, n - 1) && at(0, n) > 0) ++n;
  const int stages = (n + 1) / 2;
  std::vector<double> work(size_t(stages), 0), sync(size_t(stages), 0);
  double start = 1e300;
  for (int b = 0; b < nb; ++b) start = std::min(start, at(b, 0));
  double prev_pass = start;
  for (int k = 0; k < stages; ++k) {
    const int ea = k == 0 ? 0 : 2 * k, ep = 2 * k + 1;  // arrive, pass
    if (ep >= n) break;
    double last_arrive = 0, first_pass = 1e300, last_pass = 0;
    for (int b = 0; b < nb; ++b) {
      last_arrive = std::max(last_arrive, at(b, ea));
      first_pass = std::min(first_pass, at(b, ep));
      last_pass = std::max(last_pass, at(b, ep));
    }
    work[size_t(k)] = last_arrive - prev_pass;
    sync[size_t(k)] = last_pass - last_arrive;
    prev_pass = last_pass;
  }
  std::fprintf(stderr, "persistent decode trace: %d blocks, %d barriers, %.1f us in all\n",
               nb, stages, (prev_pass - start) / 1e3);
  for (int k = 0; k < stages; ++k)
    std::fprintf(stderr, "  stage %3d: work %6.2f us, barrier %5.2f us\n", k, work[size_t(k)] / 1e3, sync[size_t(k)] / 1e3);
  // Layer 1's FFN stage from the inside: per step, the median and the slowest block's time.
  static const char* const what[5] = {"logits + input norm", "routing", "issue fills",
                                      "wait for the routed rows", "gate|up products"};
  for (int k = 1; k <= 5; ++k) {
    std::vector<double> d;
    for (int b = 0; b < nb; ++b) d.push_back((at(b, kTraceSub + k) - at(b, kTraceSub + k - 1)) / 1e3);
    std::sort(d.begin(), d.end());
    if (d.back() > 0) std::fprintf(stderr, "  layer 1 FFN, %-38s median %5.2f us, slowest %5.2f us\n", what[k - 1], d[d.size() / 2], d.back());
  }
  if (at(0, kTraceSub + 9) > 0) {  // block 0's split of "issue fills"
    const double m2 = at(0, kTraceSub + 2), m8 = at(0, kTraceSub + 8), m9 = at(0, kTraceSub + 9), m3 = at(0, kTraceSub + 3);
    std::fprintf(stderr, "  layer 1 FFN, block 0: routed gate|up fill issue %.2f us, down fill issue %.2f us, rest %.2f us\n",
                 (m8 - m2) / 1e3, (m9 - m8) / 1e3, (m3 - m9) / 1e3);
  }
  // Layer 1's attention stage (marks 10-15); the merge only in the blocks that merge a head.
  static const char* const att[5] = {"q load + RoPE", "wait for the cache rows", "scores, softmax, values",
                                     "o_proj fill issue + split count", "merge + W_UV (merging blocks)"};
  for (int k = 11; k <= 15; ++k) {
    std::vector<double> d;
    for (int b = 0; b < nb; ++b)
      if (at(b, kTraceSub + k) > 0 && at(b, kTraceSub + k) >= at(b, kTraceSub + k - 1))  // (a merge mark of an earlier launch: older)
        d.push_back((at(b, kTraceSub + k) - at(b, kTraceSub + k - 1)) / 1e3);
    std::sort(d.begin(), d.end());
    if (!d.empty()) std::fprintf(stderr, "  layer 1 attention, %-32s median %5.2f us, slowest %5.2f us (%zu blocks)\n", att[k - 11], d[d.size() / 2], d.back(), d.size());
  }
  if (at(0, kTraceSub + 7) > 0 && (env_flags() & 16))
    std::fprintf(stderr, "  layer 1 attention, scores and values again (flag 16): block 0 %5.2f us\n",
                 (at(0, kTraceSub + 7) - at(0, kTraceSub + 6)) / 1e3);
  else if (at(0, kTraceSub + 7) > 0)
    std::fprintf(stderr, "  layer 1 FFN, routing again (flag 4; included above):  block 0 %5.2f us\n",
                 (at(0, kTraceSub + 7) - at(0, kTraceSub + 6)) / 1e3);
}

bool decode_persistent_folds_head() { return kHeadFold; }

std::string decode_persistent_unsupported(const PersistentShape& s, int blocks) {
  const int nb = device_blocks(blocks);
  const int64_t W = s.kvr + s.dr;
  if (nb > 32 * kMaxSplitsPerLane) return fmt::format("{} blocks (at most {})", nb, 32 * kMaxSplitsPerLane);
  if (s.dn % 4 != 0 || s.dr % 4 != 0 || s.E % 4 != 0) return fmt::format("qk_nope {} / qk_rope {} / experts {} not multiples of 4", s.dn, s.dr, s.E);
  if (s.H < 1 || s.H > kMaxH || s.H > nb) return fmt::format("{} heads (at most {} and the grid's {} blocks)", s.H, kMaxH, nb);
  if (s.kvr < 8 || s.kvr > 2 * kT || s.kvr % 8 != 0) return fmt::format("kv_lora_rank {} (a multiple of 8 up to {})", s.kvr, 2 * kT);
  if (s.dv < 1 || s.dv > kT) return fmt::format("v_head_dim {}", s.dv);
  if (s.dr < 2 || s.dr % 2 != 0 || W % 8 != 0) return fmt::format("qk_rope_head_dim {} (latent width {} not a multiple of 8)", s.dr, W);
  if (s.nq < 8 || s.nq % 8 != 0) return fmt::format("q_lora_rank {} (needs a q LoRA, a multiple of 8)", s.nq);
  if (s.D % 8 != 0 || (s.H * s.dv) % 8 != 0 || s.max_units % 8 != 0 || s.max_units < 8)
    return fmt::format("hidden {} / heads·v {} / FFN width {} not multiples of 8", s.D, s.H * s.dv, s.max_units);
  if (s.fp8 && (s.D % 16 != 0 || s.nq % 16 != 0 || (s.H * s.dv) % 16 != 0 || s.max_units % 16 != 0 || s.scale_floats < 1))
    return fmt::format("FP8: hidden {} / q_lora_rank {} / heads·v {} / FFN width {} not multiples of 16 (16-byte row copies)", s.D, s.nq,
                       s.H * s.dv, s.max_units);
  if (s.E > kRouteMaxE || s.router.n_group > kRouteMaxG || s.router.top_k > 32) return "router beyond the routing warp's limits";
  if (s.block_size < 1 || s.layers < 1) return "empty model or cache layout";
  const int64_t widest = std::max({s.nq + s.kvr + s.dr, s.H * (s.dn + s.dr), s.D, s.E, s.max_units});
  if (widest * nb >= (int64_t(1) << 31)) return fmt::format("a width of {} over {} blocks overflows the kernel's 32-bit shares", widest, nb);
  const Plan p = plan_of(s, nb);
  if (p.smem > max_smem()) return fmt::format("{} bytes of shared memory per block needed, {} available", p.smem, max_smem());
  return {};
}

size_t decode_persistent_workspace_bytes(const PersistentShape& s, int blocks) {
  return size_t(ws_layout(s, device_blocks(blocks)).total) * sizeof(float);
}

void decode_persistent(const PersistentShape& s, const PersistentLayer* layers, const PersistentIO& io, uint32_t* barrier,
                       void* workspace, size_t workspace_bytes, cudaStream_t stream, int blocks) {
  const std::string why = decode_persistent_unsupported(s, blocks);
  DSV3_CHECK(why.empty(), "decode_persistent: unsupported shape: {}", why);
  const int nb = device_blocks(blocks);
  const WsLayout wl = ws_layout(s, nb);
  DSV3_CHECK(workspace && workspace_bytes >= size_t(wl.total) * sizeof(float), "decode_persistent: workspace of {} bytes, {} needed",
             workspace_bytes, size_t(wl.total) * sizeof(float));
  const Plan p = plan_of(s, nb);
  float* f = static_cast<float*>(workspace);
  Args a{s, layers, io,
         Work{f + wl.off[0], f + wl.off[1], f + wl.off[2], f + wl.off[3], f + wl.off[4], f + wl.off[5], f + wl.off[6], f + wl.off[7],
              f + wl.off[8], f + wl.off[9], f + wl.off[10]},
         barrier, trace_buffer(nb), env_flags(), int(p.wb), int(p.xmax), env_split_rows(), int(s.scale_floats),
         int(in_rows_bytes(s, nb)), int(o_rows_bytes(s, nb)), int(qc_chunk_rows(s, nb)), env_head_split()};
  auto* kernel = s.fp8 ? &k_decode_persistent<uint8_t> : &k_decode_persistent<uint16_t>;
  DSV3_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, int(p.smem)));
  int per_sm = 0;
  DSV3_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kT, size_t(p.smem)));
  DSV3_CHECK(per_sm >= 1, "decode_persistent: the kernel does not fit on an SM ({} bytes of shared memory)", p.smem);
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(unsigned(nb));
  cfg.blockDim = dim3(kT);
  cfg.dynamicSmemBytes = size_t(p.smem);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;  // every block resident at once: the grid barriers need it
  attr[0].val.cooperative = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  DSV3_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, a));
  DSV3_CUDA_CHECK_LAUNCH("decode_persistent kernel");
}

}  // namespace dsv3::cuda
