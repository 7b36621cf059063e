// Grouped expert GEMMs of an FP8 checkpoint on e4m3 activations: both operands stay e4m3 all the way to the
// tensor cores (mma.sync m16n8k32 e4m3 x e4m3 -> f32), the recipe of DeepSeek-V3's inference (§3.3 of the
// report: activations quantized per 1x128 tile, weights per 128x128 block, products promoted to f32 per 128-wide
// k block). moe_grouped.cu's FP8 variant instead dequantizes the weights to bf16 in shared memory: an ALU pass
// per weight byte that made it slower than the bf16 checkpoint (45.6 vs 36.5 us for gate|up at batch 64, H200).
//
// Same tiling as moe_grouped.cu (a BM x 128 output tile of one expert per block, rows found from the device
// offsets, SwiGLU fused into gate|up's epilogue), with 64-byte k slices (two k32 MMA steps) in a 4-stage
// cp.async ring. Each 128-wide k block is accumulated apart (`part`) and then added to the result times
// (activation scale of the row x weight scale of the block): the scales ride in the ring with the slice that
// ends their block (4-byte cp.async), so no global load sits in the loop. K need only be a multiple of 16: the
// last slice is zero-filled past K (both operands, so the padding adds 0).
#include <algorithm>
#include <cstdlib>
#include <string>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/moe_ops.h"
#include "kernels/cuda/moe_tiles.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace dsv3::cuda {
namespace {
using namespace dev;

constexpr int QN = 128, QK = 64, QSTR = QK + 16, QTHREADS = 256;

struct Fp8GroupedArgs {
  const uint8_t* a;          // e4m3 rows: [slots, K] grouped by expert, or [tokens, K] read through a_rows
  const float* a_scale;      // scale of (row r of a, k block j) at [j * a_scale_ld + r]
  int a_scale_ld;
  const int32_t* a_rows;     // null: slot p reads row p of a; else row a_rows[p] / a_row_div (perm / top_k)
  int a_row_div;
  const int32_t* offsets;    // [E + 1]
  const void* const* w;      // [E] -> e4m3 weights [rows, K]
  const float* const* scale; // [E] -> 128x128 block scales
  int E, K, N;               // N: output columns (I for gate|up, D for down)
  int up_row0;               // gate|up: first up row (I)
  int scale_up0;             // gate|up: offset of up's scale rows (ceil(I/128) * ceil(K/128))
  void* out;                 // gate|up: h [slots, N] bf16; down: [slots, N] f32 (row stride ldo)
  int ldo;
  // offsets == nullptr: one group of rows1 rows with weights w1 / scale1 (a dense product, rows_gemm_fp8), K split
  // over the gridDim.z blocks of a cluster.
  int rows1;
  const void* w1;
  const float* scale1;
};

template <int GM, int QST>
constexpr size_t fp8_grouped_smem_bytes() {
  return size_t(QST) * (GM + QN) * QSTR + size_t(QST) * (GM + 2) * 4;
}

// WARPS_M warps along M with MT m16 tiles each (BM = 16 MT WARPS_M); 8 / WARPS_M along N with NT n8 tiles; a
// ring of QST slices.
template <bool SWIGLU, int WARPS_M, int MT, int MINB, int QST>
__global__ void __launch_bounds__(QTHREADS, MINB) k_moe_grouped_fp8(Fp8GroupedArgs g) {
  constexpr int GM = 16 * MT * WARPS_M, WARPS_N = 8 / WARPS_M, NT = QN / 8 / WARPS_N;
  static_assert(NT % 2 == 0, "n8 tiles go in pairs (one ldmatrix.x4); SwiGLU splits them gate / up");
  extern __shared__ __align__(16) unsigned char smraw[];
  __shared__ int e_s, mt_s, src_s[GM];
  const int t = threadIdx.x, lane = t & 31, w = t >> 5, wm = w / WARPS_N, wn = w % WARPS_N, gq = lane >> 2;
  const bool one_group = g.offsets == nullptr;
  if (w == 0 && !one_group) find_tile<GM>(g.offsets, g.E, &e_s, &mt_s);
  __syncthreads();
  const int e = one_group ? 0 : e_s;
  if (e < 0) return;
  const int row0 = one_group ? int(blockIdx.y) * GM : g.offsets[e] + mt_s * GM, row_end = one_group ? g.rows1 : g.offsets[e + 1];
  const int nj = blockIdx.x, K = g.K, kblocks = (K + 127) / 128;
  // Split K (one-group products only): block z of the cluster runs slices [kbeg, kbeg + nk) and the cluster sums.
  const int splits = int(gridDim.z), z = int(blockIdx.z), nkt = (K + QK - 1) / QK;
  const int kbeg = nkt * z / splits, nk = nkt * (z + 1) / splits - kbeg;
  uint8_t* as = smraw;                                                    // [QST][GM][QSTR]
  uint8_t* bs = as + QST * GM * QSTR;                                     // [QST][QN][QSTR]
  float* ss = reinterpret_cast<float*>(bs + QST * QN * QSTR);             // [QST][GM + 2]: row scales, weight scales

  auto weight_row = [&](int r) {  // -1: beyond the projection (zero-filled)
    if constexpr (SWIGLU) {
      const int n = nj * (QN / 2) + (r & (QN / 2 - 1));
      return n < g.N ? (r < QN / 2 ? n : g.up_row0 + n) : -1;
    } else {
      const int n = nj * QN + r;
      return n < g.N ? n : -1;
    }
  };
  // The weight scales of this tile's columns for k block kb: SwiGLU's 64 gate (and 64 up) columns lie in one
  // 128-row scale block, down's 128 columns too (tiles start at multiples of 64 / 128).
  const float* wsc = one_group ? g.scale1 : g.scale[e];
  const int n_first = SWIGLU ? nj * (QN / 2) : nj * QN;
  const float* gate_sc = wsc + (n_first / 128) * kblocks;
  const float* up_sc = SWIGLU ? wsc + g.scale_up0 + (n_first / 128) * kblocks : gate_sc;
  const uint8_t* wbase = static_cast<const uint8_t*>(one_group ? g.w1 : g.w[e]);
  // 2 slices per 128-wide k block; a split's last slice also ends its (partial) block.
  auto ends_block = [&](int kt) { return ((kbeg + kt) & 1) == 1 || kt == nk - 1; };

  auto load_a = [&](int kt, int st) {  // activations (and the scales when slice kt ends a k block), then commit
    const int k0 = (kbeg + kt) * QK;
#pragma unroll
    for (int c = t; c < GM * 4; c += QTHREADS) {  // A: GM rows x 4 chunks of 16 bytes
      const int r = c >> 2, ch = c & 3;
      const bool ok = row0 + r < row_end && k0 + ch * 16 < K;
      cp_async16(as + (st * GM + r) * QSTR + ch * 16, g.a + int64_t(src_s[r]) * K + (ok ? k0 + ch * 16 : 0), ok);
    }
    if (ends_block(kt)) {
      const int kb = k0 / 128;
      if (t < GM) {
        const bool ok = row0 + t < row_end;
        cp_async4(ss + st * (GM + 2) + t, g.a_scale + int64_t(kb) * g.a_scale_ld + src_s[t], ok);
      } else if (t < GM + 2) {
        cp_async4(ss + st * (GM + 2) + t, (t == GM ? gate_sc : up_sc) + kb, true);
      }
    }
    cp_async_commit();
  };
  auto load_b = [&](int kt, int st) {  // weights: 128 rows x 4 chunks of 16 bytes
    const int k0 = (kbeg + kt) * QK;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int c = t + i * QTHREADS, r = c >> 2, ch = c & 3, wr = weight_row(r);
      const bool ok = wr >= 0 && k0 + ch * 16 < K;
      cp_async16(bs + (st * QN + r) * QSTR + ch * 16, wbase + (ok ? int64_t(wr) * K + k0 + ch * 16 : 0), ok);
    }
  };

  float acc[MT][NT][4], part[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = part[i][j][c] = 0.0f;

  // Prologue: the weights' slices first (they need nothing from the kernel before), then the activations' rows of the tile (a lookup
  // through perm whose latency the weight copies hide; rows past the group read the first, their products are
  // not stored), then the activations' slices. Group s holds slice s's activations (group 0 also every prologue
  // weight slice), so waiting for group s still means slice s has landed.
  for (int s = 0; s < QST - 1; ++s)
    if (s < nk) load_b(s, s);
  // Launched as a programmatic dependent: everything above reads only what kernels before the previous one
  // wrote (offsets from moe_permute, weights), so it overlaps that kernel's tail (quantize_fp8_1x128 lets its
  // dependents start at once); the activations and scales it writes are read only from here on.
  dependent_kernel_begin();
  if (t < GM) {
    const int p = row0 + t < row_end ? row0 + t : row0;
    src_s[t] = g.a_rows ? g.a_rows[p] / g.a_row_div : p;
  }
  __syncthreads();
  for (int s = 0; s < QST - 1; ++s) {
    if (s < nk) load_a(s, s);
    else cp_async_commit();
  }
  auto col0 = [&](int i) {  // tile row (output column) of the warp's n8 tile i; SwiGLU: gate tiles, then up
    if constexpr (SWIGLU) return i < NT / 2 ? wn * (QN / 2 / WARPS_N) + 8 * i : QN / 2 + wn * (QN / 2 / WARPS_N) + 8 * (i - NT / 2);
    else return wn * (QN / WARPS_N) + 8 * i;
  };
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<QST - 2>();
    __syncthreads();  // slice kt has landed for every thread; slice kt - 1's buffers are free
    if (kt + QST - 1 < nk) {
      load_b(kt + QST - 1, (kt + QST - 1) % QST);
      load_a(kt + QST - 1, (kt + QST - 1) % QST);
    } else {
      cp_async_commit();
    }
    const int st = kt % QST;
    const uint8_t* at = as + st * GM * QSTR;
    const uint8_t* bt = bs + st * QN * QSTR;
#pragma unroll
    for (int kk = 0; kk < QK / 32; ++kk) {
      uint32_t af[MT][4], bf[NT / 2][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) ldsm_x4(af[mt], at + (wm * 16 * MT + mt * 16 + (lane & 15)) * QSTR + kk * 32 + 16 * (lane >> 4));
#pragma unroll
      for (int p = 0; p < NT / 2; ++p)  // lanes 0-15 address tile 2p, lanes 16-31 tile 2p + 1
        ldsm_x4(bf[p], bt + (col0(2 * p + (lane >> 4)) + (lane & 7)) * QSTR + kk * 32 + 16 * ((lane >> 3) & 1));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int p = 0; p < NT / 2; ++p) {
          mma_e4m3(part[mt][2 * p], af[mt], bf[p][0], bf[p][1]);
          mma_e4m3(part[mt][2 * p + 1], af[mt], bf[p][2], bf[p][3]);
        }
    }
    if (ends_block(kt)) {  // promote: acc += part · (row scale · weight scale), in f32
      const float* sc = ss + st * (GM + 2);
      const float s_gate = sc[GM], s_up = sc[GM + 1];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float sa = sc[wm * 16 * MT + mt * 16 + gq + 8 * half];
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const float f = sa * (SWIGLU && nt >= NT / 2 ? s_up : s_gate);
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              acc[mt][nt][2 * half + c] = fmaf(part[mt][nt][2 * half + c], f, acc[mt][nt][2 * half + c]);
              part[mt][nt][2 * half + c] = 0.0f;
            }
          }
        }
    }
  }
  cp_async_wait<0>();

  store_tile<SWIGLU, GM, QN, MT, NT, QTHREADS>(acc, col0, wm, splits, smraw, row0, row_end, nj, g.N, g.out, g.ldo);
}

template <bool SWIGLU, int WARPS_M, int MT, int MINB, int QST>
void launch_shape(const Fp8GroupedArgs& g, int64_t slots, int64_t n_tiles, cudaStream_t s) {
  constexpr int GM = 16 * MT * WARPS_M;
  constexpr size_t smem = fp8_grouped_smem_bytes<GM, QST>();
  auto* k = &k_moe_grouped_fp8<SWIGLU, WARPS_M, MT, MINB, QST>;
  static const bool attr = [&] {
    if (smem > 48 * 1024) DSV3_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    return true;
  }();
  (void)attr;
  const int64_t m_tiles = ceil_div(slots, int64_t(GM)) + g.E;  // each expert's last tile may be partial
  DSV3_CHECK(m_tiles <= 65535, "moe_grouped_fp8: {} row tiles exceed the grid", m_tiles);
  launch_dependent(k, dim3(unsigned(n_tiles), unsigned(m_tiles)), dim3(QTHREADS), smem, s, g);
  DSV3_CUDA_CHECK_LAUNCH("moe_grouped_fp8 kernel");
}

// The prefill tiles on Hopper's warpgroup MMA (the default for prefill-sized groups; DSV3_GROUPED_FP8_WGMMA=0 for
// the mma.sync tiles): 128 x 128 output tiles, two warpgroups of 64 rows, one 128-wide k block a slice (a
// 128-byte-swizzled K-major row is 128 e4m3, as k_moe_grouped_wgmma's bf16 rows are 64), each slice's four
// m64n128k32 e4m3 products summed apart (`part`, scale-d 0 on the first) and added to acc times (row scale x weight
// scale) after their wait, as k_moe_grouped_fp8 promotes per k block. The scales ride in the ring with their
// slice. part and acc are 64 registers each: one block an SM, four stages.
constexpr int FW_ST = 4, FW_TILE = 128 * 128;  // a 128-row x 128-byte e4m3 tile: 16 KB
constexpr size_t fp8_wgmma_smem_bytes() { return size_t(FW_ST) * (2 * FW_TILE + (128 + 2) * 4) + 1024; }

template <bool SWIGLU>
__global__ void __launch_bounds__(256, 1) k_moe_grouped_fp8_wgmma(Fp8GroupedArgs g) {
  constexpr int GM = 128;
  dependent_kernel_begin();
  extern __shared__ __align__(16) unsigned char smraw[];
  __shared__ int e_s, mt_s, src_s[GM];
  const int t = threadIdx.x, w = t >> 5, wg = w >> 2, lane = t & 31, gq = lane >> 2;
  if (w == 0) find_tile<GM>(g.offsets, g.E, &e_s, &mt_s);
  __syncthreads();
  const int e = e_s;
  if (e < 0) return;
  const int row0 = g.offsets[e] + mt_s * GM, row_end = g.offsets[e + 1];
  const int nj = blockIdx.x, K = g.K, nk = (K + 127) / 128;
  if (t < GM) {
    const int p = row0 + t < row_end ? row0 + t : row0;
    src_s[t] = g.a_rows ? g.a_rows[p] / g.a_row_div : p;
  }
  const uint32_t base = (smem_u32(smraw) + 1023u) & ~1023u;  // stage s: A at base + 2 s FW_TILE, B one tile later
  unsigned char* const base_ptr = smraw + (base - smem_u32(smraw));
  float* const ss = reinterpret_cast<float*>(base_ptr + FW_ST * 2 * FW_TILE);  // [FW_ST][GM + 2]: row, gate, up scales
  const float* wsc = g.scale[e];
  const int n_first = SWIGLU ? nj * 64 : nj * 128;
  const float* gate_sc = wsc + (n_first / 128) * nk;  // (64 gate / 64 up / 128 down columns: one 128-row block each)
  const float* up_sc = SWIGLU ? wsc + g.scale_up0 + (n_first / 128) * nk : gate_sc;
  const auto* wbase = static_cast<const uint8_t*>(g.w[e]);
  auto weight_row = [&](int r) {  // -1: beyond the projection (zero-filled)
    if constexpr (SWIGLU) {
      const int n = nj * 64 + (r & 63);
      return n < g.N ? (r < 64 ? n : g.up_row0 + n) : -1;
    } else {
      const int n = nj * 128 + r;
      return n < g.N ? n : -1;
    }
  };
  __syncthreads();  // src_s
  // A and B: 128 rows x 8 chunks of 16 bytes each, four chunks a thread (a chunk keeps its row over the k loop).
  constexpr int CH = 4;
  const uint8_t* asrc[CH];
  const uint8_t* bsrc[CH];
  uint32_t soff[CH];
  uint32_t aval = 0, bval = 0;
#pragma unroll
  for (int j = 0; j < CH; ++j) {
    const int c = t + j * 256, r = c >> 3, ch = c & 7;
    asrc[j] = g.a + int64_t(src_s[r]) * K + ch * 16;
    const int wr = weight_row(r);
    bsrc[j] = wbase + int64_t(wr < 0 ? 0 : wr) * K + ch * 16;
    aval |= uint32_t(row0 + r < row_end) << j;
    bval |= uint32_t(wr >= 0) << j;
    soff[j] = swizzle128(r, ch);
  }
  const int kch = (t & 7) * 16;  // this thread's chunks' first k in a slice
  auto load = [&](int kt, int st) {
    const int k0 = kt * 128;
    const bool in_k = k0 + kch < K;  // past K (a partial last block): zeros, which add nothing
    const int kk0 = in_k ? k0 : 0;
    unsigned char* a_st = base_ptr + size_t(2 * st) * FW_TILE;
#pragma unroll
    for (int j = 0; j < CH; ++j) {
      cp_async16(a_st + soff[j], asrc[j] + kk0, in_k && ((aval >> j) & 1));
      cp_async16(a_st + FW_TILE + soff[j], bsrc[j] + kk0, in_k && ((bval >> j) & 1));
    }
    float* sc = ss + st * (GM + 2);
    if (t < GM) cp_async4(sc + t, g.a_scale + int64_t(kt) * g.a_scale_ld + src_s[t], row0 + t < row_end);
    else if (t < GM + 2) cp_async4(sc + t, (t == GM ? gate_sc : up_sc) + kt, true);
    cp_async_commit();
  };
#pragma unroll
  for (int st = 0; st < FW_ST - 1; ++st) {
    if (st < nk) load(st, st);
    else cp_async_commit();
  }
  float acc[64], part[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = part[i] = 0.0f;
  const int r_lo = 64 * wg + 16 * (w & 3) + gq;  // this thread's rows r_lo and r_lo + 8 of the tile
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<FW_ST - 2>();
    fence_proxy_async_smem();
    __syncthreads();  // slice kt everywhere; slice kt - 1's stage (and its scales) no longer read
    if (kt + FW_ST - 1 < nk) load(kt + FW_ST - 1, (kt + FW_ST - 1) % FW_ST);
    else cp_async_commit();
    const int st = kt % FW_ST;
    const uint32_t a_addr = base + uint32_t(2 * st) * FW_TILE + uint32_t(wg) * 64 * 128, b_addr = base + uint32_t(2 * st + 1) * FW_TILE;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wgmma_m64n128k32_e4m3(part, wgmma_desc_k128(a_addr + 32 * kk), wgmma_desc_k128(b_addr + 32 * kk), kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(part);
    const float* sc = ss + st * (GM + 2);
    const float sa0 = sc[r_lo], sa1 = sc[r_lo + 8], s_gate = sc[GM], s_up = sc[GM + 1];
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const float sb = SWIGLU && j >= 8 ? s_up : s_gate;
      acc[4 * j] = fmaf(part[4 * j], sa0 * sb, acc[4 * j]);
      acc[4 * j + 1] = fmaf(part[4 * j + 1], sa0 * sb, acc[4 * j + 1]);
      acc[4 * j + 2] = fmaf(part[4 * j + 2], sa1 * sb, acc[4 * j + 2]);
      acc[4 * j + 3] = fmaf(part[4 * j + 3], sa1 * sb, acc[4 * j + 3]);
    }
  }
  cp_async_wait<0>();
  float out[1][16][4];
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int q = 0; q < 4; ++q) out[0][j][q] = acc[4 * j + q];
  // Warp w's 16 rows are 16 w .. of the tile; n8 tile j at column 8 j (gate | up halves for SwiGLU).
  store_tile<SWIGLU, GM, 128, 1, 16, 256>(out, [](int i) { return 8 * i; }, w, 1, smraw, row0, row_end, nj, g.N, g.out, g.ldo);
}

template <bool SWIGLU>
void launch_fp8_wgmma(const Fp8GroupedArgs& g, int64_t slots, int64_t n_tiles, cudaStream_t s) {
  constexpr size_t smem = fp8_wgmma_smem_bytes();
  auto* k = &k_moe_grouped_fp8_wgmma<SWIGLU>;
  static const bool attr = [&] {
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    return true;
  }();
  (void)attr;
  const int64_t m_tiles = ceil_div(slots, int64_t(128)) + g.E;
  DSV3_CHECK(m_tiles <= 65535, "moe_grouped_fp8: {} row tiles exceed the grid", m_tiles);
  launch_dependent(k, dim3(unsigned(n_tiles), unsigned(m_tiles)), dim3(256), smem, s, g);
  DSV3_CUDA_CHECK_LAUNCH("moe_grouped_fp8 wgmma kernel");
}
// Read at every launch (a test compares both kernels in one process). The default since 2026-12-03 (twelfth
// session): H200 prefill T 4096 on an FP8 checkpoint 492,653-498,108 tokens/s vs 391,889-405,151 on the mma.sync
// tiles (DSV3_GROUPED_FP8_WGMMA=0).
bool env_fp8_wgmma() {
  const char* e = std::getenv("DSV3_GROUPED_FP8_WGMMA");
  return !(e && std::string(e) == "0");
}

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : fallback;
}

// 64-row tiles (two blocks per SM) once the groups average 64 rows: measured faster than 128-row ones (one block
// per SM, 128 f32 accumulators per thread), H200 bench_cuda_moe prefill T 4096: small 0.531 vs 0.583 ms, V3 17.7 vs
// 21.2 ms; DSV3_FP8_GROUPED_TILE=128 selects those for A/B runs. 32-row tiles below (decode batches, where the
// weights' stream is the cost) with a ring of 4 slices: 8 (DSV3_FP8_GROUPED_STAGES=8) measured slower, H200 batch-64
// graph 2.045 vs 1.996 ms, bench_cuda_moe 68.6 vs 64.2 us per layer.
template <bool SWIGLU>
void launch_fp8_grouped(const Fp8GroupedArgs& g, int64_t slots, int64_t n_tiles, cudaStream_t s) {
  static const bool tile128 = env_int("DSV3_FP8_GROUPED_TILE", 64) == 128;
  static const bool stages8 = env_int("DSV3_FP8_GROUPED_STAGES", 4) == 8;
  if (slots >= 64 * int64_t(g.E)) {
    if (g.offsets && env_fp8_wgmma()) return launch_fp8_wgmma<SWIGLU>(g, slots, n_tiles, s);  // (K % 16 == 0: supported)
    if (tile128) launch_shape<SWIGLU, 2, 4, 1, 4>(g, slots, n_tiles, s);
    else launch_shape<SWIGLU, 2, 2, 2, 4>(g, slots, n_tiles, s);
  } else if (stages8) {
    launch_shape<SWIGLU, 1, 2, 2, 8>(g, slots, n_tiles, s);
  } else {
    launch_shape<SWIGLU, 1, 2, 2, 4>(g, slots, n_tiles, s);
  }
}

Fp8GroupedArgs base_args(const MoeExperts& w, const uint8_t* aq, const float* a_scale, int64_t a_scale_ld, const int32_t* offsets,
                         int64_t slots, void* out, const char* what) {
  DSV3_CHECK(moe_grouped_fp8_supported(w), "{}: needs F8_E4M3 experts with D {} / I {} multiples of 16", what, w.D, w.I);
  DSV3_CHECK(slots < (int64_t(1) << 31) && a_scale_ld > 0 && a_scale_ld < (int64_t(1) << 31), "{}: {} slots, scale stride {}", what,
             slots, a_scale_ld);
  Fp8GroupedArgs g{};
  g.a = aq;
  g.a_scale = a_scale;
  g.a_scale_ld = int(a_scale_ld);
  g.a_row_div = 1;
  g.offsets = offsets;
  g.E = int(w.E);
  g.out = out;
  return g;
}
}  // namespace

bool moe_grouped_fp8_supported(const MoeExperts& w) {
  return w.type == DType::F8_E4M3 && w.D > 0 && w.I > 0 && w.D % 16 == 0 && w.I % 16 == 0 && w.D <= INT32_MAX / 2 &&
         w.I <= INT32_MAX / 2;
}

void moe_grouped_swiglu_fp8(const MoeExperts& w, const uint8_t* xq, const float* x_scale, int64_t x_scale_ld, const int32_t* x_rows,
                            int64_t x_row_div, const int32_t* offsets, int64_t slots, uint16_t* h, cudaStream_t s) {
  if (slots <= 0) return;
  DSV3_CHECK(x_row_div > 0 && x_row_div < (int64_t(1) << 31), "moe_grouped_swiglu_fp8: row divisor {}", x_row_div);
  Fp8GroupedArgs g = base_args(w, xq, x_scale, x_scale_ld, offsets, slots, h, "moe_grouped_swiglu_fp8");
  g.a_rows = x_rows;
  g.a_row_div = int(x_row_div);
  g.w = w.d_gate_up();
  g.scale = w.d_gate_up_scale();
  g.K = int(w.D);
  g.N = int(w.I);
  g.ldo = g.N;
  g.up_row0 = int(w.I);
  g.scale_up0 = int(ceil_div(w.I, int64_t(128)) * ceil_div(w.D, int64_t(128)));
  launch_fp8_grouped<true>(g, slots, ceil_div(w.I, int64_t(QN / 2)), s);
}

void moe_grouped_down_fp8(const MoeExperts& w, const uint8_t* hq, const float* h_scale, const int32_t* offsets, int64_t slots,
                          float* out, cudaStream_t s) {
  if (slots <= 0) return;
  Fp8GroupedArgs g = base_args(w, hq, h_scale, fp8_act_scale_ld(slots), offsets, slots, out, "moe_grouped_down_fp8");
  g.w = w.d_down();
  g.scale = w.d_down_scale();
  g.K = int(w.I);
  g.N = int(w.D);
  g.ldo = g.N;
  launch_fp8_grouped<false>(g, slots, ceil_div(w.D, int64_t(QN)), s);
}

bool rows_gemm_fp8_supported(int64_t M, int64_t K, const float* y, int64_t ldy) {
  return M >= 1 && M <= kRowsGemmMaxRows && K > 0 && K % 16 == 0 && K <= INT32_MAX / 2 && ldy % 2 == 0 &&
         reinterpret_cast<uintptr_t>(y) % 8 == 0;
}

void rows_gemm_fp8(const uint8_t* xq, const float* x_scale, int64_t M, const uint8_t* w, const float* scale, int64_t N, int64_t K,
                   float* y, int64_t ldy, cudaStream_t s) {
  DSV3_CHECK(rows_gemm_fp8_supported(M, K, y, ldy) && N > 0 && N <= INT32_MAX && w && scale,
             "rows_gemm_fp8: M {} (1..{}), K {} (a multiple of 16), ldy {} or alignment not supported", M, kRowsGemmMaxRows, K, ldy);
  Fp8GroupedArgs g{};
  g.a = xq;
  g.a_scale = x_scale;
  g.a_scale_ld = int(fp8_act_scale_ld(M));
  g.a_row_div = 1;
  g.E = 1;
  g.K = int(K);
  g.N = int(N);
  g.out = y;
  g.ldo = int(ldy);
  g.rows1 = int(M);
  g.w1 = w;
  g.scale1 = scale;
  // Few output tiles: split K over a cluster of up to 8 blocks so that ~2 blocks per SM stream the weights.
  constexpr int GM = 32, QST = 4;
  const int64_t n_tiles = ceil_div(N, int64_t(QN)), m_tiles = ceil_div(M, int64_t(GM)), nkt = ceil_div(K, int64_t(QK));
  static const int64_t sms = device_info().sm_count;
  const int splits = int(std::clamp<int64_t>(std::min(ceil_div(2 * sms, n_tiles * m_tiles), nkt), 1, 8));
  constexpr size_t smem = fp8_grouped_smem_bytes<GM, QST>();
  auto* k = &k_moe_grouped_fp8<false, 1, 2, 2, QST>;
  static const bool attr = [&] {
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    return true;
  }();
  (void)attr;
  launch_k_split_cluster(k, dim3(unsigned(n_tiles), unsigned(m_tiles), unsigned(splits)), dim3(QTHREADS), smem, s, g);
  DSV3_CUDA_CHECK_LAUNCH("rows_gemm_fp8 kernel");
}

}  // namespace dsv3::cuda
