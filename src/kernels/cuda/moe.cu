// Routed experts on the GPU: the expert pointer tables, the fused decode kernels (no host synchronisation),
// and the prefill path (device permutation + grouped expert GEMMs (moe_grouped.cu; a loop of cuBLASLt GEMMs over
// experts where D or I is not a multiple of 32) + un-permutation).
#include <algorithm>
#include <vector>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/infer_ops.h"
#include "kernels/cuda/moe_ops.h"

namespace dsv3::cuda {

namespace {
using namespace dev;

constexpr int kMaxE = 1024;

template <class T>
void* upload_table(const std::vector<T>& v) {
  if (v.empty()) return nullptr;
  void* d = device_malloc(v.size() * sizeof(T));
  copy_to_device(d, v.data(), v.size() * sizeof(T));
  return d;
}

// Weight loads (fetch/unpack of 8 values of a row): common.cuh.

// ---- decode workspace: group table written by kernel A, read by kernel B ----
// ints: [0] number of groups; gexp[gmax]; gcount[gmax]; glist[gmax * slots] (slots of each group, ascending);
// then (16-byte aligned) h f32 [slots, I].
// With a shared expert of width Is, its h f32 [M, Is] follows.
struct DecodeLayout {
  int64_t gmax, slots;
  size_t ints() const { return size_t(1 + 2 * gmax + gmax * slots); }
  size_t h_offset() const { return (ints() * 4 + 255) / 256 * 256; }
  size_t hs_offset(int64_t I) const { return h_offset() + (size_t(slots) * size_t(I) * 4 + 255) / 256 * 256; }
  size_t out_offset(int64_t I, int64_t M, int64_t Is) const { return hs_offset(I) + (size_t(M) * size_t(Is) * 4 + 255) / 256 * 256; }
  // With the grouped down kernel, the per-slot outputs f32 [slots, D] follow.
  size_t bytes(int64_t I, int64_t M = 0, int64_t Is = 0, int64_t D = 0) const { return out_offset(I, M, Is) + size_t(slots) * size_t(D) * 4; }
};

constexpr int kThreadsA = 256, kWarpsA = kThreadsA / 32, kRowsPerWarpA = 2, kRowsA = kWarpsA * kRowsPerWarpA;
constexpr int kTokChunk = 4;  // tokens of one expert handled per pass over its rows

// The shared expert of a decode MoE call (width Is, same dtype and layout as the routed experts).
struct SharedArgs {
  const void* gu = nullptr;
  const void* dn = nullptr;
  const float* gus = nullptr;
  const float* dns = nullptr;
  int Is = 0;
  float* h = nullptr;  // [M, Is]
};

// h[list[t], i] = silu(gate_i · x[list[t] / k]) * (up_i · x[list[t] / k]) for the n tokens in `list` (shared memory) and
// the rows i = row0 + {0, 1} of one warp; wgu: [2I, D] gate | up, sc its scale rows (gate's, then up's) or null.
template <class W>
__device__ __forceinline__ void gate_up_rows(const float* __restrict__ x, int64_t ldx, const int* list, int n, int k, int D, int I,
                                             const W* __restrict__ wgu, const float* __restrict__ sc, int row0, int lane,
                                             float* __restrict__ h) {
  const int kb = (D + 127) / 128, ib = (I + 127) / 128;
  for (int c0 = 0; c0 < n; c0 += kTokChunk) {
    const int nt = min(kTokChunk, n - c0);
    const float* xr[kTokChunk];
#pragma unroll
    for (int t = 0; t < kTokChunk; ++t) xr[t] = x + int64_t(list[c0 + min(t, nt - 1)] / k) * ldx;
    float ag[kTokChunk][kRowsPerWarpA], au[kTokChunk][kRowsPerWarpA];
#pragma unroll
    for (int t = 0; t < kTokChunk; ++t)
#pragma unroll
      for (int r = 0; r < kRowsPerWarpA; ++r) ag[t][r] = au[t][r] = 0.0f;
    const W* rg[kRowsPerWarpA];
    const W* ru[kRowsPerWarpA];
#pragma unroll
    for (int r = 0; r < kRowsPerWarpA; ++r) {
      const int i = min(row0 + r, I - 1);
      rg[r] = wgu + int64_t(i) * D;
      ru[r] = wgu + int64_t(I + i) * D;
    }
#pragma unroll 2
    for (int d0 = lane * 8; d0 < D; d0 += 256) {
      Raw<W> fg[kRowsPerWarpA], fu[kRowsPerWarpA];
#pragma unroll
      for (int r = 0; r < kRowsPerWarpA; ++r) {
        fetch(rg[r], d0, fg[r]);
        fetch(ru[r], d0, fu[r]);
      }
      float sg[kRowsPerWarpA], su[kRowsPerWarpA];
#pragma unroll
      for (int r = 0; r < kRowsPerWarpA; ++r) {
        sg[r] = su[r] = 1.0f;
        if (sc) {
          const int i = min(row0 + r, I - 1);
          sg[r] = __ldg(sc + (i / 128) * kb + d0 / 128);
          su[r] = __ldg(sc + (ib + i / 128) * kb + d0 / 128);
        }
      }
      float xv[kTokChunk][8];
#pragma unroll
      for (int t = 0; t < kTokChunk; ++t) {
        if (t < nt) {
          const float4 a = __ldg(reinterpret_cast<const float4*>(xr[t] + d0));
          const float4 b = __ldg(reinterpret_cast<const float4*>(xr[t] + d0 + 4));
          xv[t][0] = a.x, xv[t][1] = a.y, xv[t][2] = a.z, xv[t][3] = a.w;
          xv[t][4] = b.x, xv[t][5] = b.y, xv[t][6] = b.z, xv[t][7] = b.w;
        }
      }
#pragma unroll
      for (int r = 0; r < kRowsPerWarpA; ++r) {
        float wg[8], wu[8];
        unpack(fg[r], sg[r], wg);
        unpack(fu[r], su[r], wu);
#pragma unroll
        for (int t = 0; t < kTokChunk; ++t) {
          if (t < nt) {
#pragma unroll
            for (int q = 0; q < 8; ++q) {
              ag[t][r] = fmaf(wg[q], xv[t][q], ag[t][r]);
              au[t][r] = fmaf(wu[q], xv[t][q], au[t][r]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kTokChunk; ++t) {
      if (t < nt) {
#pragma unroll
        for (int r = 0; r < kRowsPerWarpA; ++r) {
          const float gs = warp_sum(ag[t][r]), us = warp_sum(au[t][r]);
          const int i = row0 + r;
          if (lane == 0 && i < I) h[int64_t(list[c0 + t]) * I + i] = gs / (1.0f + expf(-gs)) * us;
        }
      }
    }
  }
}

// Kernel A: block (g, tile) = the g-th distinct chosen expert (ascending id) x rows [tile·kRowsA, +kRowsA) of I.
// h[s, i] = silu(gate_i · x[m]) * (up_i · x[m]) for each slot s = m·k + j routed to that expert. With a shared
// expert, the blocks g = gmax compute its h for every token (rows of Is).
template <class W>
__global__ void __launch_bounds__(kThreadsA) k_moe_decode_gate_up(const float* __restrict__ x, int64_t ldx,
                                                                   const int32_t* __restrict__ idx, int slots, int k, int E,
                                                                   int D, int I, const void* const* __restrict__ gu_tab,
                                                                   const float* const* __restrict__ gu_scale_tab,
                                                                   int32_t* __restrict__ ws, int gmax, float* __restrict__ h,
                                                                   SharedArgs sh, int M) {
  __shared__ uint32_t bits[kMaxE / 32];
  __shared__ int s_slot[kMoeDecodeMaxSlots];
  __shared__ int s_warpcnt[kThreadsA / 32];
  __shared__ int s_expert, s_ngroups;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = blockIdx.x;
  if (g == gmax) {  // the shared expert: every token, weight rows that do not depend on the kernel before
    const int row0 = blockIdx.y * kRowsA + warp * kRowsPerWarpA;
    if (blockIdx.y * kRowsA < sh.Is)
      for (int r = 0; r < kRowsPerWarpA; ++r) {
        const int i = min(row0 + r, sh.Is - 1);
        for (int b = lane * 128; b < D * int(sizeof(W)); b += 32 * 128) {
          prefetch_l2(reinterpret_cast<const char*>(static_cast<const W*>(sh.gu) + int64_t(i) * D) + b);
          prefetch_l2(reinterpret_cast<const char*>(static_cast<const W*>(sh.gu) + int64_t(sh.Is + i) * D) + b);
        }
      }
    dependent_kernel_begin();
    if (blockIdx.y * kRowsA >= sh.Is) return;
    for (int t = tid; t < M; t += blockDim.x) s_slot[t] = t;
    __syncthreads();
    gate_up_rows(x, ldx, s_slot, M, 1, D, sh.Is, static_cast<const W*>(sh.gu), sh.gus, row0, lane, sh.h);
    return;
  }
  dependent_kernel_begin();
  if (blockIdx.y * kRowsA >= I) return;  // a tile of the shared expert's wider grid
  for (int i = tid; i < kMaxE / 32; i += blockDim.x) bits[i] = 0;
  __syncthreads();
  for (int s = tid; s < slots; s += blockDim.x) {
    const int e = idx[s];
    if (e >= 0 && e < E) atomicOr(&bits[e >> 5], 1u << (e & 31));
  }
  __syncthreads();
  if (warp == 0) {  // E <= 1024: one word per lane; the g-th set bit and the number of set bits
    const int nw = (E + 31) >> 5;
    const uint32_t b = lane < nw ? bits[lane] : 0u;
    const int c = __popc(b);
    int incl = c;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int t = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += t;
    }
    const int excl = incl - c;
    if (g >= excl && g < incl) {
      uint32_t bb = b;
      for (int r = g - excl; r > 0; --r) bb &= bb - 1;
      s_expert = lane * 32 + __ffs(bb) - 1;
    }
    if (lane == 31) {
      s_ngroups = incl;
      if (g >= incl) s_expert = -1;
    }
  }
  __syncthreads();
  const int e = s_expert;
  if (g == 0 && blockIdx.y == 0 && tid == 0) ws[0] = s_ngroups;
  if (e < 0 || g >= gmax) return;
  // The slots routed to e, in ascending order (ballot compaction).
  int n = 0;
  for (int base = 0; base < slots; base += blockDim.x) {
    const int s = base + tid;
    const bool p = s < slots && idx[s] == e;
    const unsigned m = __ballot_sync(0xffffffffu, p);
    if (lane == 0) s_warpcnt[warp] = __popc(m);
    __syncthreads();
    int off = n;
    for (int w2 = 0; w2 < warp; ++w2) off += s_warpcnt[w2];
    if (p) s_slot[off + __popc(m & ((1u << lane) - 1u))] = s;
    int tot = 0;
    for (int w2 = 0; w2 < int(blockDim.x >> 5); ++w2) tot += s_warpcnt[w2];
    n += tot;
    __syncthreads();
  }
  if (blockIdx.y == 0) {
    int32_t* gexp = ws + 1;
    int32_t* gcount = gexp + gmax;
    int32_t* glist = gcount + gmax;
    if (tid == 0) {
      gexp[g] = e;
      gcount[g] = n;
    }
    for (int r = tid; r < n; r += blockDim.x) glist[int64_t(g) * slots + r] = s_slot[r];
  }
  const int row0 = blockIdx.y * kRowsA + warp * kRowsPerWarpA;
  gate_up_rows(x, ldx, s_slot, n, k, D, I, static_cast<const W*>(gu_tab[e]), gu_scale_tab ? gu_scale_tab[e] : nullptr, row0, lane, h);
}

constexpr int kThreadsB = 256, kWarpsB = kThreadsB / 32;
constexpr int kMaxChunksB = 8;  // 8-value chunks of an I row held per lane at once (I <= 2048 in one pass)

// One warp, one down row of one expert (I wide, scale row `sc` or null): for each of the n tokens, emit(slot(r),
// weight(r) · (row · h[slot(r)]), first pass over I) on lane 0, the rows' chunks held in registers.
template <class W, class Slot, class Weight, class Emit>
__device__ __forceinline__ void down_row(const W* __restrict__ row, const float* __restrict__ sc, int I, int n, Slot slot,
                                         Weight weight, const float* __restrict__ h, Emit emit, int lane) {
  for (int p0 = 0; p0 < I; p0 += kMaxChunksB * 256) {
    Raw<W> f[kMaxChunksB];
#pragma unroll
    for (int c = 0; c < kMaxChunksB; ++c) {
      const int i0 = p0 + c * 256 + lane * 8;
      if (i0 < I) fetch(row, i0, f[c]);
    }
    float wv[kMaxChunksB][8];
#pragma unroll
    for (int c = 0; c < kMaxChunksB; ++c) {
      const int i0 = p0 + c * 256 + lane * 8;
      if (i0 < I) unpack(f[c], sc ? __ldg(sc + i0 / 128) : 1.0f, wv[c]);
    }
    for (int r = 0; r < n; ++r) {
      const int s = slot(r);
      const float* hr = h + int64_t(s) * I;
      float part = 0.0f;
#pragma unroll
      for (int c = 0; c < kMaxChunksB; ++c) {
        const int i0 = p0 + c * 256 + lane * 8;
        if (i0 < I) {
          const float4 a = *reinterpret_cast<const float4*>(hr + i0);
          const float4 b = *reinterpret_cast<const float4*>(hr + i0 + 4);
          part = fmaf(wv[c][0], a.x, part);
          part = fmaf(wv[c][1], a.y, part);
          part = fmaf(wv[c][2], a.z, part);
          part = fmaf(wv[c][3], a.w, part);
          part = fmaf(wv[c][4], b.x, part);
          part = fmaf(wv[c][5], b.y, part);
          part = fmaf(wv[c][6], b.z, part);
          part = fmaf(wv[c][7], b.w, part);
        }
      }
      part = warp_sum(part);
      // Partial sums over I chunks of one slot are combined before weighting when I fits one pass (the
      // usual case); with I > 2048 each pass's part is weighted separately (still a fixed order).
      if (lane == 0) emit(s, weight(r) * part, p0 == 0);
    }
  }
}

// Kernel B: block = rows [blockIdx.x·kWarpsB, +kWarpsB) of D, one row per warp. For each group (ascending
// expert id) the warp holds its down row in registers and, for each token of the group, adds w · (row · h[s])
// into the token's accumulator. Then y = acc (+ the shared expert's row · hs[m]) (+ y).
template <class W>
__global__ void __launch_bounds__(kThreadsB) k_moe_decode_down(const int32_t* __restrict__ ws, int gmax, int slots, int k,
                                                                int M, int D, int I, const float* __restrict__ h,
                                                                const float* __restrict__ wts,
                                                                const void* const* __restrict__ dn_tab,
                                                                const float* const* __restrict__ dn_scale_tab,
                                                                float* __restrict__ y, int64_t ldy, bool accumulate, SharedArgs sh,
                                                                const int32_t* __restrict__ idx, int E) {
  extern __shared__ float acc[];  // [M][kWarpsB], then the shared expert's [M][kWarpsB]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int d = blockIdx.x * kWarpsB + warp;
  const int ibs = (sh.Is + 127) / 128;
  // Before the wait, this warp's down rows into L2: the shared expert's, and those of the chosen experts. The choices
  // (idx) come from the router, an earlier kernel than the gate|up kernel before this one: that kernel launched this
  // one only after its own wait (and every kernel before it waited before launching its dependents), so the router's
  // writes are visible here. A stale idx could only misdirect a prefetch.
  if (sh.Is > 0 && d < D)
    for (int b = lane * 128; b < sh.Is * int(sizeof(W)); b += 32 * 128)
      prefetch_l2(reinterpret_cast<const char*>(static_cast<const W*>(sh.dn) + int64_t(d) * sh.Is) + b);
  if (d < D)
    for (int sl = lane; sl < slots; sl += 32) {
      const int e = idx[sl];
      if (e < 0 || e >= E) continue;
      const char* row = reinterpret_cast<const char*>(static_cast<const W*>(dn_tab[e]) + int64_t(d) * I);
      for (int b = 0; b < I * int(sizeof(W)); b += 128) prefetch_l2(row + b);
    }
  dependent_kernel_begin();
  float* acc_s = acc + M * kWarpsB;
  for (int i = tid; i < 2 * M * kWarpsB; i += blockDim.x) acc[i] = 0.0f;
  __syncthreads();
  const int ngroups = ws[0];
  const int32_t* gexp = ws + 1;
  const int32_t* gcount = gexp + gmax;
  const int32_t* glist = gcount + gmax;
  const int ib = (I + 127) / 128;
  if (d < D) {
    // Groups in ascending expert id, then (g = ngroups) the shared expert: every token, weight 1, its own sums.
    for (int g = 0; g < ngroups + (sh.Is > 0 ? 1 : 0); ++g) {
      const bool shared = g == ngroups;
      const int32_t* gl = glist + int64_t(g) * slots;
      const W* row;
      const float* sc;
      if (shared) {
        row = static_cast<const W*>(sh.dn) + int64_t(d) * sh.Is;
        sc = sh.dns ? sh.dns + int64_t(d / 128) * ibs : nullptr;
      } else {
        const int e = gexp[g];
        row = static_cast<const W*>(dn_tab[e]) + int64_t(d) * I;
        sc = dn_scale_tab ? dn_scale_tab[e] + int64_t(d / 128) * ib : nullptr;
      }
      float* to = shared ? acc_s : acc;
      const int kk = shared ? 1 : k;
      down_row(
          row, sc, shared ? sh.Is : I, shared ? M : gcount[g], [&](int r) { return shared ? r : gl[r]; },
          [&](int r) { return shared ? 1.0f : wts[gl[r]]; }, shared ? sh.h : h,
          [&](int sl, float v, bool) { to[(sl / kk) * kWarpsB + warp] += v; }, lane);
    }
  }
  __syncwarp();
  if (d < D && lane == 0) {
    for (int m = 0; m < M; ++m) {
      float* yp = y + int64_t(m) * ldy + d;
      float v = acc[m * kWarpsB + warp];
      if (sh.Is > 0) v += acc_s[m * kWarpsB + warp];
      *yp = accumulate ? v + *yp : v;
    }
  }
}

// Kernel B for batches beyond GEMV size: block (row tile, g) = kWarpsB rows of D for the g-th group alone, so the
// groups run in parallel instead of one after another in every block; out[s][d] = row · h[s] (unweighted), and
// moe_combine then weights and sums each token's slots in ascending expert order.
template <class W>
__global__ void __launch_bounds__(kThreadsB) k_moe_decode_down_grouped(const int32_t* __restrict__ ws, int gmax, int slots, int D,
                                                                        int I, const float* __restrict__ h,
                                                                        const void* const* __restrict__ dn_tab,
                                                                        const float* const* __restrict__ dn_scale_tab,
                                                                        float* __restrict__ out) {
  dependent_kernel_begin();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = blockIdx.y;
  const int d = blockIdx.x * kWarpsB + warp;
  if (g >= ws[0] || d >= D) return;
  const int32_t* gexp = ws + 1;
  const int32_t* gcount = gexp + gmax;
  const int32_t* gl = gcount + gmax + int64_t(g) * slots;
  const int e = gexp[g], ib = (I + 127) / 128;
  const W* row = static_cast<const W*>(dn_tab[e]) + int64_t(d) * I;
  const float* sc = dn_scale_tab ? dn_scale_tab[e] + int64_t(d / 128) * ib : nullptr;
  down_row(
      row, sc, I, gcount[g], [&](int r) { return gl[r]; }, [](int) { return 1.0f; }, h,
      [&](int sl, float v, bool first) {
        float* o = out + int64_t(sl) * D + d;
        *o = first ? v : *o + v;
      },
      lane);
}

// ---- prefill: permutation ----

// Three passes over chunks of the slots (one block a chunk; moe_permute_chunks): each chunk's slots ranked among the
// chunk's slots of the same expert, in slot order (the rank parked in slot_row), and the chunk's count per expert;
// one block turns the counts into offsets and each chunk's first row per expert; each chunk places its slots. A
// chunk walks its slots 256 at a time: a warp's peers of one expert by match.any, the warps before it by an [8][E]
// table in shared memory (entries reset after use, so E up to 1024 costs no per-step clearing).
constexpr int kPermThreads = 256, kPermChunk = 1024;
__global__ void __launch_bounds__(kPermThreads) k_moe_rank(const int32_t* __restrict__ idx, int slots, int chunk, int E,
                                                           int32_t* __restrict__ rank, int32_t* __restrict__ hist) {
  extern __shared__ int psm[];
  int* running = psm;     // [E] this chunk's slots per expert so far
  int* wc = psm + E;      // [8][E] the current step's slots per warp and expert
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  for (int i = tid; i < 9 * E; i += kPermThreads) psm[i] = 0;
  __syncthreads();
  const int c0 = blockIdx.x * chunk, c1 = min(slots, c0 + chunk);
  for (int base = c0; base < c1; base += kPermThreads) {
    const int s = base + tid;
    const int e = s < c1 ? idx[s] : -1;
    const bool ok = e >= 0 && e < E;
    const unsigned peers = __match_any_sync(0xffffffffu, ok ? e : -1);
    const bool leader = ok && (peers & ((1u << lane) - 1u)) == 0;
    if (leader) wc[warp * E + e] = __popc(peers);
    __syncthreads();
    if (ok) {
      int r = running[e] + __popc(peers & ((1u << lane) - 1u));
      for (int w2 = 0; w2 < warp; ++w2) r += wc[w2 * E + e];
      rank[s] = r;
    }
    __syncthreads();
    if (leader) {
      atomicAdd(&running[e], __popc(peers));
      wc[warp * E + e] = 0;
    }
    __syncthreads();
  }
  for (int i = tid; i < E; i += kPermThreads) hist[int64_t(blockIdx.x) * E + i] = running[i];
}
// One block of 1024 threads, thread e: counts[e] = Σ_c hist[c][e]; offsets by an exclusive scan over e (E <= 1024);
// hist[c][e] becomes chunk c's first row of expert e.
__global__ void __launch_bounds__(1024) k_moe_offsets(int32_t* __restrict__ hist, int chunks, int E, int32_t* __restrict__ counts,
                                                      int32_t* __restrict__ offsets) {
  __shared__ int wsum[32];
  const int t = threadIdx.x, lane = t & 31, w = t >> 5;
  int c = 0;
  if (t < E)
    for (int k = 0; k < chunks; ++k) c += hist[int64_t(k) * E + t];
  int incl = c;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  if (lane == 31) wsum[w] = incl;
  __syncthreads();
  if (w == 0) {
    int v = wsum[lane], vi = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int u = __shfl_up_sync(0xffffffffu, vi, o);
      if (lane >= o) vi += u;
    }
    wsum[lane] = vi - v;
  }
  __syncthreads();
  const int excl = wsum[w] + incl - c;
  if (t < E) {
    counts[t] = c;
    offsets[t] = excl;
    int run = excl;
    for (int k = 0; k < chunks; ++k) {
      const int n = hist[int64_t(k) * E + t];
      hist[int64_t(k) * E + t] = run;
      run += n;
    }
  }
  if (t == E - 1) offsets[E] = excl + c;
}
__global__ void __launch_bounds__(kPermThreads) k_moe_place(const int32_t* __restrict__ idx, int slots, int chunk, int E,
                                                            const int32_t* __restrict__ hist, int32_t* __restrict__ perm,
                                                            int32_t* __restrict__ slot_row) {
  const int c0 = blockIdx.x * chunk, c1 = min(slots, c0 + chunk);
  const int32_t* first = hist + int64_t(blockIdx.x) * E;
  for (int s = c0 + int(threadIdx.x); s < c1; s += kPermThreads) {
    const int e = idx[s];
    if (e < 0 || e >= E) continue;
    const int r = first[e] + slot_row[s];
    perm[r] = s;
    slot_row[s] = r;
  }
}

template <class O>
__global__ void k_moe_gather(const float* __restrict__ x, int64_t ldx, const int32_t* __restrict__ perm, int k, int D,
                             O* __restrict__ out, int64_t ldo) {
  const int64_t p = blockIdx.x;
  const float* xr = x + int64_t(perm[p] / k) * ldx;
  O* o = out + p * ldo;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    if constexpr (sizeof(O) == 4) o[d] = xr[d];
    else o[d] = f32_to_bf16(xr[d]);
  }
}

// Block per token; kV4: 4 columns a thread with 16-byte loads (D, ld, ldy multiples of 4, aligned bases). Each
// column's sum runs over the token's slots in ascending expert order either way (the same bits).
// (E: f32, or bf16 expert outputs widened on load; 4 of them a uint2.)
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const uint16_t* p) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
                     __uint_as_float(u.y & 0xffff0000u));
}
__device__ __forceinline__ float load1(const float* p) { return *p; }
__device__ __forceinline__ float load1(const uint16_t* p) { return bf16_to_f32(*p); }

template <bool kV4, class E>
__global__ void k_moe_unpermute(const E* __restrict__ eo, int64_t ld, const int32_t* __restrict__ slot_row,
                                const int32_t* __restrict__ idx, const float* __restrict__ wts, int k, int D,
                                float* __restrict__ y, int64_t ldy, bool accumulate) {
  __shared__ int order[64];
  __shared__ int64_t rows[64];
  __shared__ float ws[64];
  const int64_t m = blockIdx.x;
  const int kk = min(k, 64);
  if (threadIdx.x == 0) {  // ascending expert order (insertion sort of <= 64 entries)
    for (int j = 0; j < kk; ++j) {
      int t = j;
      while (t > 0 && idx[m * k + order[t - 1]] > idx[m * k + j]) {
        order[t] = order[t - 1];
        --t;
      }
      order[t] = j;
    }
  }
  __syncthreads();
  if (int(threadIdx.x) < kk) {
    const int j = order[threadIdx.x];
    rows[threadIdx.x] = int64_t(slot_row[m * k + j]) * ld;
    ws[threadIdx.x] = wts[m * k + j];
  }
  __syncthreads();
  if constexpr (kV4) {
    for (int d = 4 * int(threadIdx.x); d < D; d += 4 * int(blockDim.x)) {
      float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      for (int jj = 0; jj < k; ++jj) {
        const float4 e = load4(eo + (jj < 64 ? rows[jj] : int64_t(slot_row[m * k + jj]) * ld) + d);
        const float w = jj < 64 ? ws[jj] : wts[m * k + jj];
        a.x += e.x * w, a.y += e.y * w, a.z += e.z * w, a.w += e.w * w;
      }
      float4* yp = reinterpret_cast<float4*>(y + m * ldy + d);
      if (accumulate) {
        const float4 o = *yp;
        a.x += o.x, a.y += o.y, a.z += o.z, a.w += o.w;
      }
      *yp = a;
    }
  } else {
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
      float a = 0.0f;
      for (int jj = 0; jj < k; ++jj)
        a += load1(eo + (jj < 64 ? rows[jj] : int64_t(slot_row[m * k + jj]) * ld) + d) * (jj < 64 ? ws[jj] : wts[m * k + jj]);
      float* yp = y + m * ldy + d;
      *yp = accumulate ? a + *yp : a;
    }
  }
}

void check_experts(const MoeExperts& w) {
  DSV3_CHECK(w.E > 0 && w.D > 0 && w.I > 0, "moe: experts not set (E {}, D {}, I {})", w.E, w.D, w.I);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------

MoeExperts::MoeExperts(int64_t E_, int64_t D_, int64_t I_, DType type_, std::vector<const void*> gu,
                       std::vector<const void*> dn, std::vector<const float*> gus, std::vector<const float*> dns)
    : E(E_), D(D_), I(I_), type(type_), gate_up(std::move(gu)), down(std::move(dn)), gate_up_scale(std::move(gus)),
      down_scale(std::move(dns)) {
  DSV3_CHECK(type == DType::BF16 || type == DType::F8_E4M3, "moe experts: weights must be BF16 or F8_E4M3, not {}",
             dtype_name(type));
  DSV3_CHECK(E > 0 && E <= kMaxE, "moe experts: E = {} outside [1, {}]", E, kMaxE);
  DSV3_CHECK(D % 8 == 0 && I % 8 == 0 && D > 0 && I > 0, "moe experts: D {} and I {} must be positive multiples of 8", D, I);
  DSV3_CHECK(int64_t(gate_up.size()) == E && int64_t(down.size()) == E, "moe experts: {} gate_up and {} down pointers for {} experts",
             gate_up.size(), down.size(), E);
  if (type == DType::F8_E4M3)
    DSV3_CHECK(int64_t(gate_up_scale.size()) == E && int64_t(down_scale.size()) == E,
               "moe experts: fp8 weights need {} scale pointers each (got {} and {})", E, gate_up_scale.size(), down_scale.size());
  table_[0] = upload_table(gate_up);
  table_[1] = upload_table(down);
  table_[2] = upload_table(gate_up_scale);
  table_[3] = upload_table(down_scale);
}
MoeExperts::~MoeExperts() {
  for (void*& p : table_) device_free(p), p = nullptr;
}
MoeExperts::MoeExperts(MoeExperts&& o) noexcept { *this = std::move(o); }
MoeExperts& MoeExperts::operator=(MoeExperts&& o) noexcept {
  if (this != &o) {
    for (void*& p : table_) device_free(p), p = nullptr;
    E = o.E, D = o.D, I = o.I, type = o.type;
    gate_up = std::move(o.gate_up), down = std::move(o.down);
    gate_up_scale = std::move(o.gate_up_scale), down_scale = std::move(o.down_scale);
    for (int i = 0; i < 4; ++i) table_[i] = o.table_[i], o.table_[i] = nullptr;
  }
  return *this;
}
int64_t MoeExperts::bytes_per_expert() const {
  if (type == DType::BF16) return 3 * I * D * 2;
  const int64_t kb = ceil_div(D, 128), ib = ceil_div(I, 128), db = ceil_div(D, 128);
  return 3 * I * D + (2 * ib * kb + db * ib) * 4;
}

// ---- decode ----

namespace {
// From this many tokens the down products of the groups run in parallel (k_moe_decode_down_grouped + moe_combine).
bool grouped_down(int64_t M, const MoeSharedExpert* shared) { return M > kGemvMaxM && !shared; }
}  // namespace

size_t moe_decode_workspace_bytes(int64_t M, int64_t top_k, int64_t E, int64_t I, int64_t shared_I, int64_t D) {
  const int64_t slots = M * top_k;
  return DecodeLayout{std::min(E, slots), slots}.bytes(I, M, shared_I, M > kGemvMaxM ? D : 0);
}

void moe_decode(const MoeExperts& w, const float* x, int64_t ldx, const int32_t* idx, const float* wts, int64_t M,
                int64_t top_k, float* y, int64_t ldy, bool accumulate, void* workspace, size_t workspace_bytes,
                cudaStream_t stream, const MoeSharedExpert* shared) {
  check_experts(w);
  if (M <= 0) return;
  const int64_t slots = M * top_k;
  DSV3_CHECK(top_k > 0 && slots <= kMoeDecodeMaxSlots, "moe_decode: M·top_k = {}·{} outside [1, {}]", M, top_k,
             kMoeDecodeMaxSlots);
  DSV3_CHECK(ldx % 4 == 0 && ldx >= w.D && ldy >= w.D, "moe_decode: row strides ldx {} (multiple of 4) / ldy {} must be >= D {}",
             ldx, ldy, w.D);
  const int64_t Is = shared ? shared->I : 0;
  if (shared)
    DSV3_CHECK(Is > 0 && Is % 8 == 0 && shared->gate_up && shared->down &&
                   (w.type != DType::F8_E4M3 || (shared->gate_up_scale && shared->down_scale)),
               "moe_decode: shared expert of width {} (a positive multiple of 8, weights{} as the routed experts')", Is,
               w.type == DType::F8_E4M3 ? " and scales" : "");
  const DecodeLayout L{std::min(w.E, slots), slots};
  const bool grouped = grouped_down(M, shared);
  const size_t need = L.bytes(w.I, M, Is, grouped ? w.D : 0);
  DSV3_CHECK(workspace_bytes >= need, "moe_decode: workspace of {} bytes, needs {}", workspace_bytes, need);
  int32_t* ws = static_cast<int32_t*>(workspace);
  float* h = reinterpret_cast<float*>(static_cast<char*>(workspace) + L.h_offset());
  SharedArgs sa;
  if (shared) {
    sa.gu = shared->gate_up, sa.dn = shared->down, sa.gus = shared->gate_up_scale, sa.dns = shared->down_scale;
    sa.Is = int(Is);
    sa.h = reinterpret_cast<float*>(static_cast<char*>(workspace) + L.hs_offset(w.I));
  }
  const dim3 ga(unsigned(L.gmax + (shared ? 1 : 0)), unsigned(ceil_div(std::max(w.I, Is), kRowsA)));
  const int E = int(w.E), D = int(w.D), I = int(w.I), k = int(top_k), sl = int(slots), gm = int(L.gmax);
  if (w.type == DType::BF16)
    launch_dependent(k_moe_decode_gate_up<uint16_t>, ga, dim3(kThreadsA), 0, stream, x, ldx, idx, sl, k, E, D, I, w.d_gate_up(),
                     nullptr, ws, gm, h, sa, int(M));
  else
    launch_dependent(k_moe_decode_gate_up<uint8_t>, ga, dim3(kThreadsA), 0, stream, x, ldx, idx, sl, k, E, D, I, w.d_gate_up(),
                     w.d_gate_up_scale(), ws, gm, h, sa, int(M));
  DSV3_CUDA_CHECK_LAUNCH("moe_decode gate_up kernel");
  const unsigned gb = unsigned(ceil_div(w.D, kWarpsB));
  if (grouped) {
    float* out = reinterpret_cast<float*>(static_cast<char*>(workspace) + L.out_offset(w.I, M, Is));
    if (w.type == DType::BF16)
      launch_dependent(k_moe_decode_down_grouped<uint16_t>, dim3(gb, unsigned(gm)), dim3(kThreadsB), 0, stream, ws, gm, sl, D, I, h,
                       w.d_down(), nullptr, out);
    else
      launch_dependent(k_moe_decode_down_grouped<uint8_t>, dim3(gb, unsigned(gm)), dim3(kThreadsB), 0, stream, ws, gm, sl, D, I, h,
                       w.d_down(), w.d_down_scale(), out);
    DSV3_CUDA_CHECK_LAUNCH("moe_decode grouped down kernel");
    moe_combine(out, idx, wts, M, top_k, w.D, y, ldy, accumulate, stream);
    return;
  }
  const size_t smem = size_t(2 * M) * kWarpsB * sizeof(float);
  if (w.type == DType::BF16) {
    if (smem > 48 * 1024)
      DSV3_CUDA_CHECK(cudaFuncSetAttribute(k_moe_decode_down<uint16_t>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    launch_dependent(k_moe_decode_down<uint16_t>, dim3(gb), dim3(kThreadsB), smem, stream, ws, gm, sl, k, int(M), D, I, h, wts,
                     w.d_down(), nullptr, y, ldy, accumulate, sa, idx, E);
  } else {
    if (smem > 48 * 1024)
      DSV3_CUDA_CHECK(cudaFuncSetAttribute(k_moe_decode_down<uint8_t>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    launch_dependent(k_moe_decode_down<uint8_t>, dim3(gb), dim3(kThreadsB), smem, stream, ws, gm, sl, k, int(M), D, I, h, wts,
                     w.d_down(), w.d_down_scale(), y, ldy, accumulate, sa, idx, E);
  }
  DSV3_CUDA_CHECK_LAUNCH("moe_decode down kernel");
}

// ---- prefill ----

namespace {
// Chunks of whole 1024-slot pieces, at most 256 of them (the offsets block walks them serially).
int64_t perm_chunk(int64_t slots) { return round_up(std::max<int64_t>(1, ceil_div(slots, 256)), kPermChunk); }
}  // namespace

int64_t moe_permute_chunks(int64_t M, int64_t top_k) {
  const int64_t slots = M * top_k;
  return slots <= 0 ? 0 : ceil_div(slots, perm_chunk(slots));
}

void moe_permute(const int32_t* idx, int64_t M, int64_t top_k, int64_t E, int32_t* counts, int32_t* offsets, int32_t* perm,
                 int32_t* slot_row, int32_t* chunk_first, cudaStream_t stream) {
  DSV3_CHECK(E > 0 && E <= kMaxE, "moe_permute: E = {} outside [1, {}]", E, kMaxE);
  const int64_t slots = M * top_k;
  DSV3_CHECK(slots < (int64_t(1) << 31), "moe_permute: {} slots", slots);
  if (slots <= 0) {
    memset_device(counts, 0, size_t(E) * 4, stream);
    memset_device(offsets, 0, size_t(E + 1) * 4, stream);
    return;
  }
  const int64_t chunk = perm_chunk(slots), chunks = ceil_div(slots, chunk);
  const size_t smem = size_t(9 * E) * 4;  // under 48 KB for E <= kMaxE
  static_assert(9 * kMaxE * 4 <= 48 * 1024, "k_moe_rank's tables in the default shared memory");
  k_moe_rank<<<unsigned(chunks), kPermThreads, smem, stream>>>(idx, int(slots), int(chunk), int(E), slot_row, chunk_first);
  DSV3_CUDA_CHECK_LAUNCH("moe_permute rank kernel");
  k_moe_offsets<<<1, 1024, 0, stream>>>(chunk_first, int(chunks), int(E), counts, offsets);
  DSV3_CUDA_CHECK_LAUNCH("moe_permute offsets kernel");
  k_moe_place<<<unsigned(chunks), kPermThreads, 0, stream>>>(idx, int(slots), int(chunk), int(E), chunk_first, perm, slot_row);
  DSV3_CUDA_CHECK_LAUNCH("moe_permute place kernel");
}

void moe_gather(const float* x, int64_t ldx, const int32_t* perm, int64_t rows, int64_t top_k, int64_t D, DType ot, void* out,
                int64_t ldo, cudaStream_t stream) {
  DSV3_CHECK(ot == DType::F32 || ot == DType::BF16, "moe_gather: output must be F32 or BF16, not {}", dtype_name(ot));
  if (rows <= 0) return;
  const int threads = D >= 1024 ? 256 : 128;
  if (ot == DType::F32)
    k_moe_gather<<<unsigned(rows), threads, 0, stream>>>(x, ldx, perm, int(top_k), int(D), static_cast<float*>(out), ldo);
  else
    k_moe_gather<<<unsigned(rows), threads, 0, stream>>>(x, ldx, perm, int(top_k), int(D), static_cast<uint16_t*>(out), ldo);
  DSV3_CUDA_CHECK_LAUNCH("moe_gather kernel");
}

namespace {
template <class E>
void unpermute(const E* eo, int64_t ld, const int32_t* slot_row, const int32_t* idx, const float* wts, int64_t M, int64_t top_k,
               int64_t D, float* y, int64_t ldy, bool accumulate, cudaStream_t stream) {
  if (M <= 0) return;
  const bool v4 = D % 4 == 0 && ld % 4 == 0 && ldy % 4 == 0 && (reinterpret_cast<uintptr_t>(eo) & (4 * sizeof(E) - 1)) == 0 &&
                  (reinterpret_cast<uintptr_t>(y) & 15) == 0;
  const int threads = v4 ? int(std::min<int64_t>(256, round_up(std::max<int64_t>(D / 4, 64), 32))) : D >= 1024 ? 256 : 128;
  if (v4)
    k_moe_unpermute<true><<<unsigned(M), threads, 0, stream>>>(eo, ld, slot_row, idx, wts, int(top_k), int(D), y, ldy, accumulate);
  else
    k_moe_unpermute<false><<<unsigned(M), threads, 0, stream>>>(eo, ld, slot_row, idx, wts, int(top_k), int(D), y, ldy, accumulate);
  DSV3_CUDA_CHECK_LAUNCH("moe_unpermute kernel");
}
}  // namespace

void moe_unpermute(const float* eo, int64_t ld, const int32_t* slot_row, const int32_t* idx, const float* wts, int64_t M,
                   int64_t top_k, int64_t D, float* y, int64_t ldy, bool accumulate, cudaStream_t stream) {
  unpermute(eo, ld, slot_row, idx, wts, M, top_k, D, y, ldy, accumulate, stream);
}
void moe_unpermute(const uint16_t* eo, int64_t ld, const int32_t* slot_row, const int32_t* idx, const float* wts, int64_t M,
                   int64_t top_k, int64_t D, float* y, int64_t ldy, bool accumulate, cudaStream_t stream) {
  unpermute(eo, ld, slot_row, idx, wts, M, top_k, D, y, ldy, accumulate, stream);
}

namespace {
struct PrefillLayout {
  size_t counts, offsets, perm, slot_row, chunk_first, xg, gu, hb, out, xq, xs, hq, hs, total;
  PrefillLayout(int64_t M, int64_t k, int64_t E, int64_t D, int64_t I) {
    const int64_t S = M * k;
    auto al = [](size_t b) { return (b + 255) / 256 * 256; };
    size_t o = 0;
    counts = o, o += al(size_t(E) * 4);
    offsets = o, o += al(size_t(E + 1) * 4);
    perm = o, o += al(size_t(S) * 4);
    slot_row = o, o += al(size_t(S) * 4);
    chunk_first = o, o += al(size_t(moe_permute_chunks(M, k) * E) * 4);
    xg = o, o += al(size_t(S) * size_t(D) * 2);
    gu = o, o += al(size_t(S) * size_t(2 * I) * 4);
    hb = o, o += al(size_t(S) * size_t(I) * 2);
    out = o, o += al(size_t(S) * size_t(D) * 4);
    // e4m3 activations of the FP8 path (moe_grouped_*_fp8) and their 1x128 scales
    xq = o, o += al(size_t(M) * size_t(D));
    xs = o, o += al(size_t(fp8_act_scale_count(M, D)) * 4);
    hq = o, o += al(size_t(S) * size_t(I));
    hs = o, o += al(size_t(fp8_act_scale_count(S, I)) * 4);
    total = o;
  }
};
}  // namespace

size_t moe_prefill_workspace_bytes(int64_t M, int64_t top_k, int64_t E, int64_t D, int64_t I) {
  return PrefillLayout(M, top_k, E, D, I).total;
}

void moe_prefill(Gemm& gemm, const MoeExperts& w, const float* x, int64_t ldx, const int32_t* idx, const float* wts, int64_t M,
                 int64_t top_k, float* y, int64_t ldy, bool accumulate, void* workspace, size_t workspace_bytes,
                 cudaStream_t stream, bool fp8_activations, bool no_gather, const uint16_t* x_bf16, MoeRowsSum* defer) {
  check_experts(w);
  if (M <= 0) return;
  const PrefillLayout L(M, top_k, w.E, w.D, w.I);
  DSV3_CHECK(workspace_bytes >= L.total, "moe_prefill: workspace of {} bytes, needs {}", workspace_bytes, L.total);
  char* base = static_cast<char*>(workspace);
  auto* counts = reinterpret_cast<int32_t*>(base + L.counts);
  auto* offsets = reinterpret_cast<int32_t*>(base + L.offsets);
  auto* perm = reinterpret_cast<int32_t*>(base + L.perm);
  auto* slot_row = reinterpret_cast<int32_t*>(base + L.slot_row);
  auto* chunk_first = reinterpret_cast<int32_t*>(base + L.chunk_first);
  auto* xg = reinterpret_cast<uint16_t*>(base + L.xg);
  auto* gu = reinterpret_cast<float*>(base + L.gu);
  auto* hb = reinterpret_cast<uint16_t*>(base + L.hb);
  auto* out = reinterpret_cast<float*>(base + L.out);
  const int64_t S = M * top_k, D = w.D, I = w.I;
  // The weighted sum of each token's expert rows: now, or described for the next layer boundary.
  auto finish = [&](DType eo_type, const void* eo) {
    if (defer) {
      *defer = MoeRowsSum{eo_type, eo, D, slot_row, idx, wts, top_k};
      return;
    }
    if (eo_type == DType::F32) moe_unpermute(static_cast<const float*>(eo), D, slot_row, idx, wts, M, top_k, D, y, ldy, accumulate, stream);
    else moe_unpermute(static_cast<const uint16_t*>(eo), D, slot_row, idx, wts, M, top_k, D, y, ldy, accumulate, stream);
  };
  moe_permute(idx, M, top_k, w.E, counts, offsets, perm, slot_row, chunk_first, stream);
  if (fp8_activations && moe_grouped_fp8_supported(w)) {  // e4m3 x e4m3 (moe_grouped_fp8.cu)
    auto* xq = reinterpret_cast<uint8_t*>(base + L.xq);
    auto* xs = reinterpret_cast<float*>(base + L.xs);
    auto* hq = reinterpret_cast<uint8_t*>(base + L.hq);
    auto* hs = reinterpret_cast<float*>(base + L.hs);
    quantize_fp8_1x128(DType::F32, x, ldx, M, D, xq, xs, stream);  // each token once; the kernel reads through perm
    moe_grouped_swiglu_fp8(w, xq, xs, fp8_act_scale_ld(M), perm, top_k, offsets, S, hb, stream);
    quantize_fp8_1x128(DType::BF16, hb, I, S, I, hq, hs, stream);
    moe_grouped_down_fp8(w, hq, hs, offsets, S, out, stream);
    finish(DType::F32, out);
    return;
  }
  // The grouped kernels' expert outputs in bf16 (what a bf16 model's down_proj returns; half the bytes written and
  // un-permuted of f32's), the weighted sum in f32.
  auto* outb = reinterpret_cast<uint16_t*>(base + L.out);
  if (no_gather && ldx == D && moe_grouped_supported(w)) {
    if (!x_bf16) convert(DType::F32, x, DType::BF16, xg, M * D, stream);
    moe_grouped_swiglu(w, x_bf16 ? x_bf16 : xg, offsets, S, hb, stream, perm, top_k);
    moe_grouped_down(w, hb, offsets, S, outb, DType::BF16, stream);
    finish(DType::BF16, outb);
    return;
  }
  moe_gather(x, ldx, perm, S, top_k, D, DType::BF16, xg, D, stream);
  if (moe_grouped_supported(w)) {  // two grouped launches, no host round trip (moe_grouped.cu)
    moe_grouped_swiglu(w, xg, offsets, S, hb, stream);
    moe_grouped_down(w, hb, offsets, S, outb, DType::BF16, stream);
    finish(DType::BF16, outb);
    return;
  }
  std::vector<int32_t> off(size_t(w.E + 1));
  copy_to_host(off.data(), offsets, off.size() * 4, stream);
  synchronize(stream);
  const bool fp8 = w.type == DType::F8_E4M3;
  for (int64_t e = 0; e < w.E; ++e) {
    const int64_t r0 = off[size_t(e)], n = off[size_t(e + 1)] - r0;
    if (n <= 0) continue;
    if (!fp8) {
      gemm.matmul(DType::BF16, xg + r0 * D, D, w.gate_up[size_t(e)], D, DType::F32, gu + r0 * 2 * I, 2 * I, n, 2 * I, D, stream);
    } else {
      // gate and up separately: each keeps its own 128x128 scale blocks (I need not be a multiple of 128).
      const auto* wq = static_cast<const uint8_t*>(w.gate_up[size_t(e)]);
      const float* s = w.gate_up_scale[size_t(e)];
      gemm.linear_fp8(DType::BF16, xg + r0 * D, D, wq, s, DType::F32, gu + r0 * 2 * I, 2 * I, n, I, D, stream);
      gemm.linear_fp8(DType::BF16, xg + r0 * D, D, wq + I * D, s + ceil_div(I, 128) * ceil_div(D, 128), DType::F32,
                      gu + r0 * 2 * I + I, 2 * I, n, I, D, stream);
    }
  }
  silu_mul(gu, 2 * I, DType::BF16, hb, I, S, I, stream);
  for (int64_t e = 0; e < w.E; ++e) {
    const int64_t r0 = off[size_t(e)], n = off[size_t(e + 1)] - r0;
    if (n <= 0) continue;
    if (!fp8)
      gemm.matmul(DType::BF16, hb + r0 * I, I, w.down[size_t(e)], I, DType::F32, out + r0 * D, D, n, D, I, stream);
    else
      gemm.linear_fp8(DType::BF16, hb + r0 * I, I, static_cast<const uint8_t*>(w.down[size_t(e)]), w.down_scale[size_t(e)],
                      DType::F32, out + r0 * D, D, n, D, I, stream);
  }
  finish(DType::F32, out);
}

}  // namespace dsv3::cuda
