// Grouped expert GEMMs for the MoE prefill: every expert's rows of the permuted activations in one launch per
// projection, no host synchronisation (the expert of a block is found from the device offsets).
//
// A block computes a BM x 128 output tile of one expert: rows [BM m, BM m + BM) of that expert's slots (rows
// past its count are zero-filled and not stored) times 128 weight rows. Operands arrive by cp.async into a
// 4-stage ring of 32-wide k slices; 8 warps run mma.sync m16n8k16 (bf16 in, f32 accumulate). Two shapes: BM 128
// (2 warps along M x 4 along N, 64 x 32 each) for prefill-sized groups, BM 32 (1 x 8, 32 x 16 each) when the
// groups are a few rows (decode batches): there the weights are read once and the padding rows cost little. FP8
// experts are dequantized per slice in shared memory (e4m3 x its 128x128 block scale, rounded to bf16; slice k + 1
// while slice k is multiplied), so both checkpoint types share the tensor-core loop.
//
// gate|up (SwiGLU fused): the 128 weight rows of a tile are 64 gate rows and the 64 up rows of the same output
// columns, and each warp holds gate columns and the matching up columns, so the epilogue writes
// h = silu(gate)·up (bf16) directly: the f32 [slots, 2I] intermediate is never stored.
#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <mutex>
#include <vector>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/moe_ops.h"
#include "kernels/cuda/moe_tiles.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace dsv3::cuda {
namespace {
using namespace dev;

constexpr int GN = 128, GK = 32, GTHREADS = 256, GSTR = GK + 8;

// Ring stages of k slices. An e4m3 slice is half a bf16 one's bytes, so FP8 with 32-row tiles (decode batches,
// where the weights' stream is the cost) keeps 8 in flight to have as many bytes outstanding as bf16's 4.
// BK 64 (bf16 prefill tiles, K a multiple of 64): half the barriers and ring waits per product, 3 stages (two
// blocks an SM still fit).
template <bool FP8, int GM, int BK = GK>
__host__ __device__ constexpr int grouped_stages() {
  return BK == 64 ? 3 : FP8 && GM <= 32 ? 8 : 4;
}

struct GroupedArgs {
  const uint16_t* a;            // [slots, K] bf16, grouped by expert (or, with a_rows, the tokens' rows)
  const int32_t* a_rows;        // null, or slot p reads row a_rows[p] / a_row_div of a (perm / top_k: no gather)
  int a_row_div;
  const int32_t* offsets;       // [E + 1]
  const void* const* w;         // [E] -> weights [rows, K] (bf16 or e4m3)
  const float* const* scale;    // [E] -> 128x128 block scales (FP8)
  int E, K, N;                  // N: output columns (I for gate|up, D for down)
  int up_row0;                  // gate|up: first up row (I); unused for down
  int scale_up0;                // gate|up FP8: offset of up's scale rows (ceil(I/128) * ceil(K/128))
  void* out;                    // gate|up: h [slots, N] bf16; down: [slots, N] f32, or bf16 with out_bf16
  int lda, ldo;                 // row strides of a and out (elements)
  bool out_bf16;
  // offsets == nullptr: one group of rows1 rows with weight w1 / scale1 (a dense product, fp8_rows_gemm).
  int rows1;
  const void* w1;
  const float* scale1;
};

// Weight row of tile row r of column tile nj of BN columns (-1: beyond the projection; zero-filled). SwiGLU: the
// tile's BN / 2 gate rows, then the BN / 2 up rows of the same output columns.
template <bool SWIGLU, int BN = GN>
__device__ __forceinline__ int tile_weight_row(const GroupedArgs& g, int nj, int r) {
  if constexpr (SWIGLU) {
    const int n = nj * (BN / 2) + (r & (BN / 2 - 1));
    return n < g.N ? (r < BN / 2 ? n : g.up_row0 + n) : -1;
  } else {
    const int n = nj * BN + r;
    return n < g.N ? n : -1;
  }
}

template <bool FP8, int GM, int BK = GK>
constexpr size_t grouped_smem_bytes() {
  constexpr int GST = grouped_stages<FP8, GM, BK>(), BSTR = BK + 8;
  return size_t(GST * GM * BSTR) * 2 + (FP8 ? size_t(GST * GN * GK) + size_t(2 * GN * GSTR) * 2 : size_t(GST * GN * BSTR) * 2);
}

// WARPS_M warps along M with MT m16 tiles each (BM = 16 MT WARPS_M); 8 / WARPS_M warps along N with NT n8 tiles.
// BK: the k slice (32, or 64 for bf16); BSTR its padded row (an odd number of 16-byte chunks, for ldmatrix).
template <bool FP8, bool SWIGLU, int WARPS_M, int MT, int BK = GK>
__global__ void __launch_bounds__(GTHREADS, 2) k_moe_grouped(GroupedArgs g) {
  constexpr int GM = 16 * MT * WARPS_M, WARPS_N = 8 / WARPS_M, NT = GN / 8 / WARPS_N;
  constexpr int GST = grouped_stages<FP8, GM, BK>(), BSTR = BK + 8, CH = BK / 8;
  static_assert(!FP8 || BK == GK, "FP8 weights are dequantized in 32-wide slices");
  static_assert(BK == 32 || BK == 64, "k slices of 32 or 64");
  static_assert(NT % 2 == 0, "n8 tiles go in pairs (one ldmatrix.x4); SwiGLU splits them gate / up");
  dependent_kernel_begin();
  extern __shared__ __align__(16) unsigned char smraw[];
  __shared__ int e_s, mt_s;
  const int t = threadIdx.x, lane = t & 31, w = t >> 5, wm = w / WARPS_N, wn = w % WARPS_N;
  const bool one_group = g.offsets == nullptr;
  if (w == 0 && !one_group) find_tile<GM>(g.offsets, g.E, &e_s, &mt_s);
  __syncthreads();
  const int e = one_group ? 0 : e_s;
  if (e < 0) return;
  const int row0 = one_group ? int(blockIdx.y) * GM : g.offsets[e] + mt_s * GM;
  const int row_end = one_group ? g.rows1 : g.offsets[e + 1];
  const int nj = blockIdx.x, K = g.K;
  // Split K (one-group products only): block z of the cluster runs slices [kbeg, kbeg + nk) and the cluster sums.
  const int splits = int(gridDim.z), z = int(blockIdx.z);
  const int kbeg = (K / BK) * z / splits, nk = (K / BK) * (z + 1) / splits - kbeg;
  uint16_t* as = reinterpret_cast<uint16_t*>(smraw);  // [GST][GM][BSTR]
  uint16_t* bs = as + GST * GM * BSTR;                 // bf16: [GST][GN][BSTR]; FP8: converted [2][GN][GSTR]
  uint8_t* braw = reinterpret_cast<uint8_t*>(bs + (FP8 ? 2 * GN * GSTR : GST * GN * BSTR));  // FP8: [GST][GN][GK]

  auto weight_row = [&](int r) { return tile_weight_row<SWIGLU>(g, nj, r); };
  const void* wbase = one_group ? g.w1 : g.w[e];
  // A: GM rows x CH chunks of 8 a slice; a thread's chunks keep their rows over the k loop, so their source rows
  // (through a_rows when set) are found once.
  constexpr int AC = (GM * CH + GTHREADS - 1) / GTHREADS;
  const uint16_t* asrc[AC];
#pragma unroll
  for (int j = 0; j < AC; ++j) {
    const int c = t + j * GTHREADS, row = row0 + c / CH;
    int src = row < row_end ? row : row0;
    if (g.a_rows) src = g.a_rows[src] / g.a_row_div;
    asrc[j] = g.a + int64_t(src) * g.lda + (c % CH) * 8;
  }
  auto load = [&](int kt, int st) {  // kt: slice of this block's range
    const int k0 = (kbeg + kt) * BK;
#pragma unroll
    for (int j = 0; j < AC; ++j) {
      const int c = t + j * GTHREADS, r = c / CH;
      if (c < GM * CH) cp_async16(as + (st * GM + r) * BSTR + (c % CH) * 8, asrc[j] + k0, row0 + r < row_end);
    }
    if constexpr (FP8) {  // 128 rows x 2 chunks of 16 e4m3
      const int r = t >> 1, ch = t & 1, wr = weight_row(r);
      const uint8_t* src = static_cast<const uint8_t*>(wbase) + int64_t(wr < 0 ? 0 : wr) * K + k0 + ch * 16;
      cp_async16(braw + (st * GN + r) * GK + ch * 16, src, wr >= 0);
    } else {
#pragma unroll
      for (int i = 0; i < GN * CH / GTHREADS; ++i) {
        const int c = t + i * GTHREADS, r = c / CH, ch = c % CH, wr = weight_row(r);
        const uint16_t* src = static_cast<const uint16_t*>(wbase) + int64_t(wr < 0 ? 0 : wr) * K + k0 + ch * 8;
        cp_async16(bs + (st * GN + r) * BSTR + ch * 8, src, wr >= 0);
      }
    }
    cp_async_commit();
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;

#pragma unroll
  for (int s = 0; s < GST - 1; ++s) {
    if (s < nk) load(s, s);
    else cp_async_commit();
  }
  // Tile row (output column) of the warp's n8 tile i: SwiGLU puts gate tiles first and the matching up tiles
  // (64 rows later) second.
  auto col0 = [&](int i) {
    if constexpr (SWIGLU) return i < NT / 2 ? wn * (GN / 2 / WARPS_N) + 8 * i : GN / 2 + wn * (GN / 2 / WARPS_N) + 8 * (i - NT / 2);
    else return wn * (GN / WARPS_N) + 8 * i;
  };
  // The MMAs of one BK-wide k slice from A stage `at` and bf16 weight rows `bt` (row stride BSTR; FP8's converted
  // rows have GSTR, the same for its BK of 32).
  auto mma_slice = [&](const uint16_t* at, const uint16_t* bt) {
#pragma unroll
    for (int k16 = 0; k16 < BK / 16; ++k16) {
      uint32_t af[MT][4], bf[NT / 2][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldsm_x4(af[mt], at + (wm * 16 * MT + mt * 16 + (lane & 15)) * BSTR + k16 * 16 + 8 * (lane >> 4));
#pragma unroll
      for (int p = 0; p < NT / 2; ++p)  // lanes 0-15 address tile 2p, lanes 16-31 tile 2p + 1
        ldsm_x4(bf[p], bt + (col0(2 * p + (lane >> 4)) + (lane & 7)) * BSTR + k16 * 16 + 8 * ((lane >> 3) & 1));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int p = 0; p < NT / 2; ++p) {
          mma_bf16(acc[mt][2 * p], af[mt], bf[p][0], bf[p][1]);
          mma_bf16(acc[mt][2 * p + 1], af[mt], bf[p][2], bf[p][3]);
        }
    }
  };
  if constexpr (!FP8) {
    for (int kt = 0; kt < nk; ++kt) {
      cp_async_wait<GST - 2>();
      __syncthreads();  // slice kt has landed for every thread; slice kt - 1's buffers are free
      if (kt + GST - 1 < nk) load(kt + GST - 1, (kt + GST - 1) % GST);
      else cp_async_commit();
      const int st = kt % GST;
      mma_slice(as + st * GM * BSTR, bs + st * GN * BSTR);
    }
  } else {
    // FP8: thread t dequantizes 16 values of tile row t / 2 per slice into one of two bf16 buffers, slice kt + 1
    // while the warps multiply slice kt (one barrier per slice). Its block scale is read one 128-wide k block
    // ahead into a register: a global load per slice would stall every slice (it did: 67 vs 36 us bf16 at batch 64).
    constexpr int kSlicesPerBlock = 128 / GK;
    const int kblocks = (K + 127) / 128;
    const int r = t >> 1, ch = t & 1, wr = weight_row(r);
    const float* my_sc = nullptr;
    if (wr >= 0) {
      const float* sc = one_group ? g.scale1 : g.scale[e];
      if constexpr (SWIGLU) my_sc = r < GN / 2 ? sc + (wr / 128) * kblocks : sc + g.scale_up0 + ((wr - g.up_row0) / 128) * kblocks;
      else my_sc = sc + (wr / 128) * kblocks;
    }
    const int kb0 = kbeg / kSlicesPerBlock;
    float s_cur = my_sc ? my_sc[kb0] : 0.0f, s_nxt = my_sc && kb0 + 1 < kblocks ? my_sc[kb0 + 1] : 0.0f;
    auto convert = [&](int kl, uint16_t* dst_rows) {  // kl: slice of this block's range
      const int kc = kbeg + kl;
      if (kl > 0 && kc % kSlicesPerBlock == 0) {
        const int kb = kc / kSlicesPerBlock;
        s_cur = s_nxt;
        s_nxt = my_sc && kb + 1 < kblocks ? my_sc[kb + 1] : 0.0f;
      }
      const uint4 v = *reinterpret_cast<const uint4*>(braw + ((kl % GST) * GN + r) * GK + ch * 16);
      const uint32_t u[4] = {v.x, v.y, v.z, v.w};
      uint32_t o[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(u[i] & 0xffffu), __NV_E4M3);
        const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(u[i] >> 16), __NV_E4M3);
        const float2 fl = __half22float2(__half2(lo)), fh = __half22float2(__half2(hi));
        // (pack_bf16x2: the same bits as two f32_to_bf16 for finite values; the dequantize loop is ALU-bound and the
        // software rounding was most of it)
        o[2 * i] = pack_bf16x2(fl.x * s_cur, fl.y * s_cur);
        o[2 * i + 1] = pack_bf16x2(fh.x * s_cur, fh.y * s_cur);
      }
      uint4* dst = reinterpret_cast<uint4*>(dst_rows + r * GSTR + ch * 16);
      dst[0] = make_uint4(o[0], o[1], o[2], o[3]);
      dst[1] = make_uint4(o[4], o[5], o[6], o[7]);
    };
    cp_async_wait<GST - 2>();
    __syncthreads();  // slice 0 has landed
    convert(0, bs);
    for (int kt = 0; kt < nk; ++kt) {
      cp_async_wait<GST - 3>();
      // Slice kt + 1 has landed; slice kt's bf16 rows are written; everyone is done with slice kt - 1's buffers.
      __syncthreads();
      if (kt + GST - 1 < nk) load(kt + GST - 1, (kt + GST - 1) % GST);
      else cp_async_commit();
      if (kt + 1 < nk) convert(kt + 1, bs + ((kt + 1) & 1) * GN * GSTR);
      mma_slice(as + (kt % GST) * GM * BSTR, bs + (kt & 1) * GN * GSTR);
    }
  }
  cp_async_wait<0>();

  store_tile<SWIGLU, GM, GN, MT, NT, GTHREADS>(acc, col0, wm, splits, smraw, row0, row_end, nj, g.N, g.out, g.ldo, g.out_bf16);
}

// The bf16 prefill tile on Hopper's warpgroup MMA (the default; DSV3_GROUPED_WGMMA=0 for k_moe_grouped; K a multiple of 32, a last half slice
// zero-filled past K): the same 128 x 128
// tiles, rows and epilogue as k_moe_grouped, the operands copied by cp.async into 128-byte-swizzled K-major tiles
// (3 stages of 64-wide k slices, 32 KB each; two blocks an SM) and multiplied by wgmma m64n128k16 from shared
// memory, each warpgroup 64 of the rows (no ldmatrix: the fragment traffic of mma.sync is what held the tensor
// pipe at ~41%). A stage is refilled only after every warpgroup waited for the products that read it (the slice
// before's wgmma are complete at the loop's barrier). (Leaving one wgmma group in flight across the barrier, with 3
// or 4 stages, measured slower on an H200: 482,898-489,474 and 457,835-472,826 vs 504,703-508,767 tokens/s.)
constexpr int WG_BK = 64, WG_TILE = 128 * WG_BK * 2;  // a 128-row x 64-k bf16 tile: 16 KB
template <int ST>
constexpr size_t wgmma_smem_bytes() { return size_t(ST) * 2 * WG_TILE + 1024; }  // + the 1024-byte alignment

template <bool SWIGLU>
__global__ void __launch_bounds__(GTHREADS, 2) k_moe_grouped_wgmma(GroupedArgs g) {
  constexpr int WG_ST = 3, PD = WG_ST - 1;  // stages, slices loaded ahead
  constexpr int GM = 128;
  dependent_kernel_begin();
  extern __shared__ __align__(16) unsigned char smraw[];
  __shared__ int e_s, mt_s;
  const int t = threadIdx.x, w = t >> 5, wg = w >> 2;
  if (w == 0) find_tile<GM>(g.offsets, g.E, &e_s, &mt_s);
  __syncthreads();
  const int e = e_s;
  if (e < 0) return;
  const int row0 = g.offsets[e] + mt_s * GM, row_end = g.offsets[e + 1];
  const int nj = blockIdx.x, K = g.K, nk = (K + WG_BK - 1) / WG_BK;
  const uint32_t base = (smem_u32(smraw) + 1023u) & ~1023u;  // stage s: A at base + 2 s WG_TILE, B one tile later
  unsigned char* const base_ptr = smraw + (base - smem_u32(smraw));
  auto weight_row = [&](int r) { return tile_weight_row<SWIGLU>(g, nj, r); };
  const auto* wbase = static_cast<const uint16_t*>(g.w[e]);
  // A and B tiles: 128 rows x 8 chunks of 16 bytes each, four chunks a thread; a chunk keeps its rows (and so its
  // swizzled place) over the k loop.
  constexpr int CH = 4;
  const uint16_t* asrc[CH];
  const uint16_t* bsrc[CH];
  uint32_t soff[CH];
  uint32_t aval = 0, bval = 0;
#pragma unroll
  for (int j = 0; j < CH; ++j) {
    const int c = t + j * GTHREADS, r = c >> 3, ch = c & 7, row = row0 + r;
    int src = row < row_end ? row : row0;
    if (g.a_rows) src = g.a_rows[src] / g.a_row_div;
    asrc[j] = g.a + int64_t(src) * g.lda + ch * 8;
    const int wr = weight_row(r);
    bsrc[j] = wbase + int64_t(wr < 0 ? 0 : wr) * K + ch * 8;
    aval |= uint32_t(row < row_end) << j;
    bval |= uint32_t(wr >= 0) << j;
    soff[j] = swizzle128(r, ch);
  }
  const int kch = (t & 7) * 8;  // this thread's chunks' first k in a slice (the same for its four)
  auto load = [&](int kt, int st) {
    const int k0 = kt * WG_BK;
    const bool in_k = k0 + kch < K;  // past K (a half last slice): zeros, which add nothing
    const int kk0 = in_k ? k0 : 0;
    unsigned char* a_st = base_ptr + size_t(2 * st) * WG_TILE;
#pragma unroll
    for (int j = 0; j < CH; ++j) {
      cp_async16(a_st + soff[j], asrc[j] + kk0, in_k && ((aval >> j) & 1));
      cp_async16(a_st + WG_TILE + soff[j], bsrc[j] + kk0, in_k && ((bval >> j) & 1));
    }
    cp_async_commit();
  };
#pragma unroll
  for (int st = 0; st < PD; ++st) {
    if (st < nk) load(st, st);
    else cp_async_commit();
  }
  float d[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) d[i] = 0.0f;
  for (int kt = 0; kt < nk; ++kt) {
    cp_async_wait<PD - 1>();
    fence_proxy_async_smem();  // this thread's copies of slice kt, visible to the async proxy
    __syncthreads();           // everyone's; and every warpgroup's products of slice kt - 1 are done
    if (kt + PD < nk) load(kt + PD, (kt + PD) % WG_ST);  // the stage of slice kt - 1: its products are done
    else cp_async_commit();
    const uint32_t a_addr = base + uint32_t(2 * (kt % WG_ST)) * WG_TILE + uint32_t(wg) * 64 * 128, b_addr = a_addr - uint32_t(wg) * 64 * 128 + WG_TILE;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < WG_BK / 16; ++kk)
      wgmma_m64n128k16_bf16(d, wgmma_desc_k128(a_addr + 32 * kk), wgmma_desc_k128(b_addr + 32 * kk), true);
    wgmma_commit();
    wgmma_wait<0>();
  }
  cp_async_wait<0>();
  float acc[1][16][4];
#pragma unroll
  for (int j = 0; j < 16; ++j)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[0][j][q] = d[4 * j + q];
  // Warp w's 16 rows are 16 w .. of the tile (warpgroup w / 4, its warp w % 4); n8 tile j at column 8 j (gate | up
  // halves for SwiGLU, as k_moe_grouped's single warp column).
  store_tile<SWIGLU, GM, GN, 1, 16, GTHREADS>(acc, [](int i) { return 8 * i; }, w, 1, smraw, row0, row_end, nj, g.N, g.out, g.ldo,
                                              g.out_bf16);
}

// The same tiles, warp-specialised (DSV3_GROUPED_WGMMA=ws; H200: bit-identical to k_moe_grouped_wgmma, 2% slower as
// one tile a block; with BN 256 and TMA weights, below, the default since the thirteenth session): warps 8-9 copy
// every slice's A and B rows by cp.async into the stage ring, each stage completing on its `full` mbarrier (the 64 producer threads' copies landed); the two consumer warpgroups wait on it, issue the
// slice's wgmma and keep one group in flight, and free the stage before (its `empty` barrier: one arrival per
// consumer warp) once those products are done. No block-wide barrier in the loop, and the consumers issue no copies.
// Producer thread p copies chunk p % 8 of rows p / 8 + 8 i of both tiles: the rows' offsets stay in its registers
// (one producer warp reading them from shared memory each slice measured 2.5x slower than the default tiles).
// BN 256 (DSV3_GROUPED_WGMMA=ws256): a 64-wide k slice of a 128 x 128 tile is 32 KB for 2.1 MFLOP (64 FLOP a byte,
// ~15 TB/s of L2-to-SM traffic at the tensor cores' rate), of a 128 x 256 tile 48 KB for 4.2 MFLOP (85). Each
// consumer warpgroup owns 64 rows x 256 columns as two m64n128 accumulators (the second B half 16 KB on); gate|up
// tiles are 128 gate rows then the same 128 up rows. Four 48 KB stages, one block an SM (BN 128: three 32 KB
// stages, two blocks). As one tile a block (H200, 2026-12-03) it was slower than BN 128: gate|up 144 vs 116 us a
// layer, down 84 vs 82: with one block an SM nothing covers a tile's ring fill and epilogue.
// Persistent (2026-12-03, thirteenth session): a block runs tiles blockIdx.x, + gridDim.x, .. of the
// (row tile, column tile) list, column tiles fastest (neighbouring blocks share the expert's rows and weights in
// L2); the producer's slice count runs on over the tiles, so the next tile's first slices land while the consumers
// finish a tile's products and store it. Products that add only zeros are not issued: a consumer warpgroup whose
// 64 rows are all past the expert's (its tile's second half, at an expert's last tile) and the k16 steps of a half
// last slice past K (the stored outputs keep their bits).
constexpr int WS_THREADS = 320, WS_ROWS = 16;  // A rows a producer thread copies (B: BN / 8)
constexpr int kWsMaxExperts = 256;             // the tile starts kept in shared memory
template <int BN>
constexpr int kWsStages = BN == 128 ? 3 : 4;
template <int BN>
constexpr size_t ws_smem_bytes() { return size_t(kWsStages<BN>) * (WG_TILE + BN * WG_BK * 2) + 1024; }
// TMA (the default; DSV3_GROUPED_TMA=0 for cp.async weights; 2026-12-03, thirteenth session: correct on its first
// run; ws256 + TMA 1.5-2.5% faster prefill than k_moe_grouped_wgmma, ws + TMA level with it): the weight tile of a
// slice comes by one thread's tensor-map copies (ws_tensor_maps: gate
// and up boxes of BN / 2 rows, or a down box of BN rows, 64 k wide, 128-byte swizzle, rows and k past the tensor
// zero-filled by the copy) on the same `full` barrier, armed with their bytes; the producer warps' cp.async then
// copy only the activation rows, half the copies and all of their address arithmetic for the weights.
constexpr int kTmapBytes = 128;  // sizeof(CUtensorMap)
// tmaps (TMA): [E][3] tensor maps (CUtensorMap, 128 bytes each) of gate, up and down.
// ATMA (the down product, DSV3_GROUPED_TMA_A=1; written 2026-12-03 after the device time was spent, not yet run):
// its activation rows (h, contiguous per expert) by TMA too, a tensor map over h [slots, I] passed by value (amap,
// encoded per launch); a tile's rows past its expert's are the next expert's rows (or zeros past the tensor),
// multiplied and not stored. The producer warps then copy nothing.
template <bool SWIGLU, int BN, bool TMA = false, bool ATMA = false>
__global__ void __launch_bounds__(WS_THREADS, BN == 128 ? 2 : 1) k_moe_grouped_ws(GroupedArgs g, int n_tiles, const void* tmaps,
                                                                               const __grid_constant__ CUtensorMap amap) {
  static_assert(!ATMA || (TMA && !SWIGLU), "activation rows by TMA: the down product, with TMA weights");
  static_assert(BN == 128 || BN == 256, "128- or 256-column tiles");
  constexpr int GM = 128, ST = kWsStages<BN>, NH = BN / 128, BROWS = BN / 8;
  constexpr int SB = WG_TILE + BN * WG_BK * 2;  // a stage: A, then B
  dependent_kernel_begin();
  extern __shared__ __align__(16) unsigned char smraw[];
  __shared__ int ts[kWsMaxExperts + 1];
  __shared__ __align__(8) uint64_t full[ST], empty[ST];
  const int t = threadIdx.x, w = t >> 5, wg = w >> 2, lane = t & 31;
  if (w == 0) tile_starts<GM>(g.offsets, g.E, ts);
  if (t == 32) {
    for (int s = 0; s < ST; ++s) mbar_init(&full[s], TMA ? 65 : 64), mbar_init(&empty[s], 8);  // (TMA: + the arming arrival)
    mbar_init_fence();
  }
  __syncthreads();
  const int n_all = ts[g.E] * n_tiles, K = g.K, nk = (K + WG_BK - 1) / WG_BK;
  // Tile L: row tile L / n_tiles (expert e, rows [row0, min(row0 + GM, row_end))), column tile nj.
  auto tile = [&](int L, int& e, int& row0, int& row_end, int& nj) {
    const int m = L / n_tiles;
    nj = L - m * n_tiles;
    e = tile_expert(ts, g.E, m);
    row0 = g.offsets[e] + (m - ts[e]) * GM;
    row_end = g.offsets[e + 1];
  };
  const uint32_t base = (smem_u32(smraw) + 1023u) & ~1023u;  // stage s at base + s SB
  unsigned char* const base_ptr = smraw + (base - smem_u32(smraw));
  int it = 0;  // slices through the ring so far (this block's tiles, in order)
  if (w >= 8) {  // producer
    const int p = t - 256, ch = p & 7, rg = p >> 3;
    const uint32_t soff = uint32_t(rg) * 128u + uint32_t((ch ^ rg) * 16);  // swizzle128(rg + 8 i, ch) - 1024 i
    for (int L = int(blockIdx.x); L < n_all; L += int(gridDim.x)) {
      int e, row0, row_end, nj;
      tile(L, e, row0, row_end, nj);
      const uint16_t* wbase = static_cast<const uint16_t*>(g.w[e]);
      const unsigned char* maps = static_cast<const unsigned char*>(tmaps) + size_t(e) * 3 * kTmapBytes;  // (TMA)
      int32_t aoff[WS_ROWS], boff[TMA ? 1 : BROWS];  // element offsets of the rows' starts; -1: a zero row
#pragma unroll
      for (int i = 0; i < BROWS; ++i) {
        const int r = rg + 8 * i, row = row0 + r;
        if (i < WS_ROWS) aoff[i] = row < row_end ? (g.a_rows ? g.a_rows[row] / g.a_row_div : row) * g.lda : -1;
        if constexpr (!TMA) {
          const int wr = tile_weight_row<SWIGLU, BN>(g, nj, r);
          boff[i] = wr >= 0 ? wr * K : -1;
        }
      }
      for (int kt = 0; kt < nk; ++kt, ++it) {
        const int s = it % ST;
        if (it >= ST) mbar_wait_parity(&empty[s], uint32_t(it / ST - 1) & 1u);
        const int k = kt * WG_BK + ch * 8;
        const bool in_k = k < K;  // past K (a half last slice): zeros (their products are not issued)
        unsigned char* a_st = base_ptr + size_t(s) * SB + soff;
        if constexpr (TMA) {
          if (p == 0) {  // the weight rows: gate then up (BN / 2 each), or BN down rows
            unsigned char* b_st = base_ptr + size_t(s) * SB + WG_TILE;
            mbar_arrive_expect_tx(&full[s], uint32_t(BN * WG_BK * 2 + (ATMA ? WG_TILE : 0)));
            if constexpr (SWIGLU) {
              tma_load_2d(b_st, maps, kt * WG_BK, nj * (BN / 2), &full[s]);
              tma_load_2d(b_st + (BN / 2) * 128, maps + kTmapBytes, kt * WG_BK, nj * (BN / 2), &full[s]);
            } else {
              tma_load_2d(b_st, maps + 2 * kTmapBytes, kt * WG_BK, nj * BN, &full[s]);
            }
            if constexpr (ATMA) tma_load_2d(base_ptr + size_t(s) * SB, &amap, kt * WG_BK, row0, &full[s]);
          }
          if constexpr (!ATMA)
#pragma unroll
            for (int i = 0; i < WS_ROWS; ++i)
              cp_async16(a_st + 1024 * i, g.a + (aoff[i] >= 0 && in_k ? aoff[i] + k : 0), aoff[i] >= 0 && in_k);
        } else {
#pragma unroll
          for (int i = 0; i < BROWS; ++i) {
            if (i < WS_ROWS) cp_async16(a_st + 1024 * i, g.a + (aoff[i] >= 0 && in_k ? aoff[i] + k : 0), aoff[i] >= 0 && in_k);
            cp_async16(a_st + WG_TILE + 1024 * i, wbase + (boff[i] >= 0 && in_k ? boff[i] + k : 0), boff[i] >= 0 && in_k);
          }
        }
        cp_async_mbar_arrive(&full[s]);
      }
    }
    cp_async_wait<0>();
    return;
  }
  for (int L = int(blockIdx.x); L < n_all; L += int(gridDim.x)) {
    int e, row0, row_end, nj;
    tile(L, e, row0, row_end, nj);
    const bool rows = row0 + 64 * wg < row_end;  // this warpgroup's half of the tile has rows
    float d[NH][64];  // columns 128 h .. of the tile
#pragma unroll
    for (int h = 0; h < NH; ++h)
#pragma unroll
      for (int i = 0; i < 64; ++i) d[h][i] = 0.0f;
    for (int kt = 0; kt < nk; ++kt, ++it) {
      const int s = it % ST;
      mbar_wait_parity(&full[s], uint32_t(it / ST) & 1u);
      fence_proxy_async_smem();  // the copies' (generic-proxy) writes, ordered before this thread's wgmma reads
      if (rows) {
        const uint32_t a_addr = base + uint32_t(s) * SB + uint32_t(wg) * 64 * 128, b_addr = base + uint32_t(s) * SB + WG_TILE;
        auto products = [&](auto steps) {  // the slice's first `steps` k16 steps
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < decltype(steps)::value; ++kk)
#pragma unroll
            for (int h = 0; h < NH; ++h)
              wgmma_m64n128k16_bf16(d[h], wgmma_desc_k128(a_addr + 32 * kk), wgmma_desc_k128(b_addr + 128 * 128 * h + 32 * kk), true);
          wgmma_commit();
        };
        if (K - kt * WG_BK >= WG_BK) products(std::integral_constant<int, WG_BK / 16>{});
        else products(std::integral_constant<int, WG_BK / 32>{});  // a half last slice (K is a multiple of 32)
      }
      wgmma_wait<1>();  // slice it - 1's products are done: its stage is free
      __syncwarp();
      if (kt > 0 && lane == 0) mbar_arrive(&empty[(it - 1) % ST]);
    }
    wgmma_wait<0>();
    __syncwarp();
    if (lane == 0) mbar_arrive(&empty[(it - 1) % ST]);  // the tile's last slice
    float acc[1][BN / 8][4];
#pragma unroll
    for (int h = 0; h < NH; ++h) {
      wgmma_fence_operands(d[h]);
#pragma unroll
      for (int j = 0; j < 16; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[0][16 * h + j][q] = d[h][4 * j + q];
    }
    if (rows)
      store_tile<SWIGLU, GM, BN, 1, BN / 8, GTHREADS>(acc, [](int i) { return 8 * i; }, w, 1, smraw, row0, row_end, nj, g.N, g.out,
                                                      g.ldo, g.out_bf16);
  }
}

// The producer's row offsets are int32: a's rows (the tokens' with a_rows) times lda, and the weight rows times K.
bool ws_offsets_fit(const GroupedArgs& g, int64_t slots) {
  const int64_t a_rows = g.a_rows ? slots / g.a_row_div + 1 : slots;
  return a_rows * g.lda < INT32_MAX && int64_t(g.up_row0 + g.N) * g.K < INT32_MAX && int64_t(g.N) * g.K < INT32_MAX;
}
// A launch of the 128-row wgmma tiles (Kernel: k_moe_grouped_wgmma, THREADS its block, SMEM its ring): the shared
// memory opted in once, a block per (column tile, row tile) of every expert.
template <auto Kernel, int THREADS, size_t SMEM = wgmma_smem_bytes<3>()>
void launch_tiles128(const GroupedArgs& g, int64_t slots, int64_t n_tiles, cudaStream_t s, const char* what) {
  constexpr size_t smem = SMEM;
  static const bool attr = [] {
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    return true;
  }();
  (void)attr;
  const int64_t m_tiles = ceil_div(slots, int64_t(128)) + g.E;
  DSV3_CHECK(m_tiles <= 65535, "moe_grouped: {} row tiles exceed the grid", m_tiles);
  launch_dependent(Kernel, dim3(unsigned(n_tiles), unsigned(m_tiles)), dim3(THREADS), smem, s, g);
  DSV3_CUDA_CHECK_LAUNCH(what);
}

// The tensor maps of k_moe_grouped_ws<., BN, true>: per expert [gate, up, down] (K-major bf16 rows; gate and up I
// rows of D, down D rows of I), boxes of 64 k x BN / 2 rows (gate, up) or BN rows (down), 128-byte swizzle. Encoded
// on the host (the driver's cuTensorMapEncodeTiled, found through the runtime: no libcuda link) once per set of
// expert pointers and BN, and kept in device memory for the process (a map is a function of its pointers and dims
// alone, so a cache hit is always right).
// The driver's cuTensorMapEncodeTiled, found once through the runtime.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q{};
    DSV3_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q));
    DSV3_CHECK(fn && q == cudaDriverEntryPointSuccess, "moe_grouped: the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}
// A map over `rows` K-major bf16 rows of k elements at base: boxes of 64 k x box_rows rows, 128-byte swizzle.
void encode_rows_map(CUtensorMap* m, const void* base, int64_t k, int64_t rows, int box_rows) {
  const cuuint64_t dims[2] = {cuuint64_t(k), cuuint64_t(rows)}, strides[1] = {cuuint64_t(k * 2)};
  const cuuint32_t box[2] = {cuuint32_t(WG_BK), cuuint32_t(box_rows)}, one[2] = {1, 1};
  const CUresult r = tensor_map_encoder()(m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box, one,
                                          CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                          CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  DSV3_CHECK(r == CUDA_SUCCESS, "moe_grouped: cuTensorMapEncodeTiled failed ({}) for {} x {} rows", int(r), rows, k);
}
const void* ws_tensor_maps(const MoeExperts& w, int BN, bool may_build) {
  struct Entry {
    std::vector<const void*> gu, dn;
    int64_t D, I;
    int BN;
    void* maps;
  };
  static std::mutex mu;
  static std::vector<Entry> cache;
  std::lock_guard<std::mutex> lock(mu);
  for (const Entry& c : cache)
    if (c.BN == BN && c.D == w.D && c.I == w.I && c.gu == w.gate_up && c.dn == w.down) return c.maps;
  if (!may_build) return nullptr;
  std::vector<CUtensorMap> maps(size_t(3 * w.E));
  for (int64_t e = 0; e < w.E; ++e) {
    const auto* gu = static_cast<const uint8_t*>(w.gate_up[size_t(e)]);
    encode_rows_map(&maps[size_t(3 * e)], gu, w.D, w.I, BN / 2);
    encode_rows_map(&maps[size_t(3 * e + 1)], gu + size_t(w.I * w.D) * 2, w.D, w.I, BN / 2);
    encode_rows_map(&maps[size_t(3 * e + 2)], w.down[size_t(e)], w.I, w.D, BN);
  }
  void* d = device_malloc(maps.size() * sizeof(CUtensorMap));
  copy_to_device(d, maps.data(), maps.size() * sizeof(CUtensorMap));
  cache.push_back(Entry{w.gate_up, w.down, w.D, w.I, BN, d});
  return d;
}
static_assert(sizeof(CUtensorMap) == kTmapBytes, "a tensor map is 128 bytes");
// DSV3_GROUPED_TMA=0: the warp-specialised kernels' weight tiles by the producer warps' cp.async instead of TMA (the
// default). Read at every launch.
bool env_tma() {
  const char* e = std::getenv("DSV3_GROUPED_TMA");
  return !(e && std::string(e) == "0");
}
// TMA's needs: 16-byte aligned weight bases and row strides (D and I multiples of 8: MoeExperts checks), and the
// up half's base (I·D·2 bytes on) aligned likewise.
bool ws_tma_ok(const MoeExperts& w) {
  if (w.type != DType::BF16) return false;
  for (int64_t e = 0; e < w.E; ++e)
    if (reinterpret_cast<uintptr_t>(w.gate_up[size_t(e)]) % 16 || reinterpret_cast<uintptr_t>(w.down[size_t(e)]) % 16) return false;
  return true;
}

// The tensor maps when the warp-specialised tiles (ws / ws256) take their weights by TMA (unless DSV3_GROUPED_TMA=0).
// Built outside stream capture only (the first build allocates and copies): a captured launch without cached maps
// copies the weights by cp.async.
int env_wgmma();
const void* ws_maps_for(const MoeExperts& w, cudaStream_t s) {
  if (!env_tma() || !ws_tma_ok(w)) return nullptr;
  const int v = env_wgmma();
  if (v < 98) return nullptr;
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  DSV3_CUDA_CHECK(cudaStreamIsCapturing(s, &cs));
  return ws_tensor_maps(w, v == 98 ? 256 : 128, cs == cudaStreamCaptureStatusNone);
}

// DSV3_GROUPED_TMA_A=1: the down product's activation rows by TMA too (not yet run): the map over h [slots, I]
// (16-byte aligned; the box is 128 rows for both tile widths). False (cp.async rows) otherwise.
bool ws_amap_for(const uint16_t* h, int64_t slots, int64_t I, CUtensorMap* m) {
  const char* e = std::getenv("DSV3_GROUPED_TMA_A");
  if (!(e && std::string(e) == "1") || reinterpret_cast<uintptr_t>(h) % 16 || slots <= 0 || slots > INT32_MAX) return false;
  encode_rows_map(m, h, I, slots, 128);
  return true;
}

// DSV3_GROUPED_WS_GRID=N: the warp-specialised kernels on N blocks (a test's few blocks run many tiles each;
// 0: a block per tile, as the kernel was first measured); unset, the SMs' resident blocks. Read at every launch.
int64_t env_ws_grid() {
  const char* e = std::getenv("DSV3_GROUPED_WS_GRID");
  return e ? std::max<int64_t>(0, std::atoll(e)) : -1;
}
// The persistent warp-specialised tiles of BN columns (n_tiles of them across N; at most ceil(slots / 128) + E row
// tiles); unused blocks find no tile.
template <bool SWIGLU, int BN, bool TMA = false, bool ATMA = false>
void launch_ws(const GroupedArgs& g, int64_t slots, int64_t n_tiles, cudaStream_t s, const void* tmaps = nullptr,
               const CUtensorMap* amap = nullptr) {
  constexpr size_t smem = ws_smem_bytes<BN>();
  auto* k = &k_moe_grouped_ws<SWIGLU, BN, TMA, ATMA>;
  static const bool attr = [&] {
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    return true;
  }();
  (void)attr;
  static const int64_t sms = device_info().sm_count;
  const int64_t tiles = (ceil_div(slots, int64_t(128)) + g.E) * n_tiles, env = env_ws_grid();
  DSV3_CHECK(tiles <= INT32_MAX, "moe_grouped: {} tiles", tiles);
  const int64_t grid = env < 0 ? std::min(tiles, (BN == 128 ? 2 : 1) * sms) : env == 0 ? tiles : std::min(tiles, env);
  const CUtensorMap none{};
  launch_dependent(k, dim3(unsigned(grid)), dim3(WS_THREADS), smem, s, g, int(n_tiles), tmaps, amap ? *amap : none);
  DSV3_CUDA_CHECK_LAUNCH(BN == 128 ? "moe_grouped warp-specialised kernel" : "moe_grouped 128x256 kernel");
}

template <bool FP8, bool SWIGLU, int WARPS_M, int MT, int BK = GK>
void launch_shape(const GroupedArgs& g, int64_t slots, int64_t n_tiles, cudaStream_t s) {
  constexpr int GM = 16 * MT * WARPS_M;
  constexpr size_t smem = grouped_smem_bytes<FP8, GM, BK>();
  auto* k = &k_moe_grouped<FP8, SWIGLU, WARPS_M, MT, BK>;
  static const bool attr = [&] {
    if (smem > 48 * 1024) DSV3_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    return true;
  }();
  (void)attr;
  // Row tiles: at most ceil(slots / GM) + E (each expert's last tile may be partial).
  const int64_t m_tiles = ceil_div(slots, int64_t(GM)) + (g.offsets ? g.E : 0);
  DSV3_CHECK(m_tiles <= 65535, "moe_grouped: {} row tiles exceed the grid", m_tiles);
  launch_dependent(k, dim3(unsigned(n_tiles), unsigned(m_tiles)), dim3(GTHREADS), smem, s, g);
  DSV3_CUDA_CHECK_LAUNCH("moe_grouped kernel");
}
// The bf16 prefill tiles on wgmma (k_moe_grouped_wgmma, the default from the eleventh session to the thirteenth:
// prefill T 4096 443,731-450,113 tokens/s against mma.sync's 396,980-407,278, one run, 2026-12-03);
// DSV3_GROUPED_WGMMA=0 for the mma.sync tiles. Read at every launch, so a test can compare the paths in one process.
// DSV3_GROUPED_WGMMA=ws: the persistent warp-specialised tiles (k_moe_grouped_ws<., 128>); =ws256: 128 x 256 (the
// default); =wgmma (any other value): k_moe_grouped_wgmma. Returns 0 (mma.sync), 30 (wgmma), 99 (ws) or 98 (ws256).
// The default since 2026-12-03 (thirteenth session): ws256 with TMA weights (prefill T 4096 664,897-668,367 tokens/s
// against k_moe_grouped_wgmma's 651,740-655,728, three rounds in two calls; the same bits); =wgmma for those tiles.
int env_wgmma() {
  const char* e = std::getenv("DSV3_GROUPED_WGMMA");
  if (!e) return 98;
  const std::string v(e);
  return v == "0" ? 0 : v == "ws" ? 99 : v == "ws256" ? 98 : 30;
}
// DSV3_GROUPED_BK=32: the bf16 prefill tiles in 32-wide k slices too (the kernel before 2026-12-03), for A/B.
bool env_bk32() {
  static const bool v = [] {
    const char* e = std::getenv("DSV3_GROUPED_BK");
    return e && std::string(e) == "32";
  }();
  return v;
}
// 128-row tiles once the groups average 64 rows; 32-row tiles below (decode batches).
// tmaps: the warp-specialised tiles' tensor maps when they copy the weights by TMA (ws_maps_for), else null; amap
// (down, with tmaps): the activation rows' map when they come by TMA too (ws_amap_for), else null.
template <bool FP8, bool SWIGLU>
void launch_grouped(const GroupedArgs& g, int64_t slots, int64_t n_tiles, cudaStream_t s, const void* tmaps = nullptr,
                    const CUtensorMap* amap = nullptr) {
  if (slots >= 64 * int64_t(g.E)) {
    if constexpr (!FP8) {
      if (const int v = g.offsets ? env_wgmma() : 0; v)  // (K % 32 == 0: supported)
      {
        if (v >= 98 && g.E <= kWsMaxExperts && ws_offsets_fit(g, slots))  // ws256: gate|up 128 h columns a tile, down 256
        {
          const int64_t n256 = SWIGLU ? ceil_div(g.N, 128) : ceil_div(g.N, 256);
          if constexpr (!SWIGLU)
            if (tmaps && amap)
              return v == 98 ? launch_ws<SWIGLU, 256, true, true>(g, slots, n256, s, tmaps, amap)
                             : launch_ws<SWIGLU, 128, true, true>(g, slots, n_tiles, s, tmaps, amap);
          if (tmaps)
            return v == 98 ? launch_ws<SWIGLU, 256, true>(g, slots, n256, s, tmaps)
                           : launch_ws<SWIGLU, 128, true>(g, slots, n_tiles, s, tmaps);
          return v == 98 ? launch_ws<SWIGLU, 256>(g, slots, n256, s) : launch_ws<SWIGLU, 128>(g, slots, n_tiles, s);
        }
        return launch_tiles128<k_moe_grouped_wgmma<SWIGLU>, GTHREADS>(g, slots, n_tiles, s, "moe_grouped wgmma kernel");
      }
      if (g.K % 64 == 0 && !env_bk32()) return launch_shape<FP8, SWIGLU, 2, 4, 64>(g, slots, n_tiles, s);
    }
    launch_shape<FP8, SWIGLU, 2, 4>(g, slots, n_tiles, s);
  } else {
    launch_shape<FP8, SWIGLU, 1, 2>(g, slots, n_tiles, s);
  }
}
}  // namespace

bool moe_grouped_supported(const MoeExperts& w) {
  return (w.type == DType::BF16 || w.type == DType::F8_E4M3) && w.D % GK == 0 && w.I % GK == 0 && w.D > 0 && w.I > 0;
}

void moe_grouped_swiglu(const MoeExperts& w, const uint16_t* xg, const int32_t* offsets, int64_t slots, uint16_t* h,
                        cudaStream_t s, const int32_t* x_rows, int64_t top_k) {
  DSV3_CHECK(moe_grouped_supported(w), "moe_grouped_swiglu: D {} / I {} must be multiples of {}", w.D, w.I, GK);
  DSV3_CHECK(top_k >= 1, "moe_grouped_swiglu: top_k {}", top_k);
  if (slots <= 0) return;
  GroupedArgs g{};
  g.a = xg;
  g.a_rows = x_rows, g.a_row_div = int(top_k);
  g.offsets = offsets;
  g.w = w.d_gate_up();
  g.scale = w.d_gate_up_scale();
  g.E = int(w.E);
  g.K = int(w.D);
  g.N = int(w.I);
  g.up_row0 = int(w.I);
  g.scale_up0 = int(ceil_div(w.I, int64_t(128)) * ceil_div(w.D, int64_t(128)));
  g.out = h;
  g.lda = g.K, g.ldo = g.N;
  const int64_t n_tiles = ceil_div(w.I, int64_t(GN / 2));
  if (w.type == DType::F8_E4M3) launch_grouped<true, true>(g, slots, n_tiles, s);
  else launch_grouped<false, true>(g, slots, n_tiles, s, ws_maps_for(w, s));
}

void moe_grouped_down(const MoeExperts& w, const uint16_t* h, const int32_t* offsets, int64_t slots, float* out, cudaStream_t s) {
  moe_grouped_down(w, h, offsets, slots, out, DType::F32, s);
}
void moe_grouped_down(const MoeExperts& w, const uint16_t* h, const int32_t* offsets, int64_t slots, void* out, DType out_type,
                      cudaStream_t s) {
  DSV3_CHECK(moe_grouped_supported(w), "moe_grouped_down: D {} / I {} must be multiples of {}", w.D, w.I, GK);
  DSV3_CHECK(out_type == DType::F32 || out_type == DType::BF16, "moe_grouped_down: output {} (F32 or BF16)", dtype_name(out_type));
  if (slots <= 0) return;
  GroupedArgs g{};
  g.a = h;
  g.offsets = offsets;
  g.w = w.d_down();
  g.scale = w.d_down_scale();
  g.E = int(w.E);
  g.K = int(w.I);
  g.N = int(w.D);
  g.out = out;
  g.out_bf16 = out_type == DType::BF16;
  g.lda = g.K, g.ldo = g.N;
  const int64_t n_tiles = ceil_div(w.D, int64_t(GN));
  if (w.type == DType::F8_E4M3) {
    launch_grouped<true, false>(g, slots, n_tiles, s);
  } else {
    const void* tmaps = ws_maps_for(w, s);
    CUtensorMap amap{};
    const bool a_tma = tmaps && ws_amap_for(h, slots, w.I, &amap);
    launch_grouped<false, false>(g, slots, n_tiles, s, tmaps, a_tma ? &amap : nullptr);
  }
}

namespace {
// One-group launch of the 32-row down-style kernel with K split over a cluster of grid.z blocks (and PDL).
template <bool FP8>
void launch_cluster(const GroupedArgs& g, dim3 grid, cudaStream_t s) {
  constexpr size_t smem = grouped_smem_bytes<FP8, 32>();
  auto* k = &k_moe_grouped<FP8, false, 1, 2>;
  static const bool attr = [&] {  // one per instantiation
    if (smem > 48 * 1024) DSV3_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    return true;
  }();
  (void)attr;
  launch_k_split_cluster(k, grid, dim3(GTHREADS), smem, s, g);
  DSV3_CUDA_CHECK_LAUNCH("rows_gemm kernel");
}
}  // namespace

bool rows_gemm_supported(const void* x, int64_t ldx, int64_t M, int64_t K, const float* y, int64_t ldy) {
  return M >= 1 && M <= kRowsGemmMaxRows && K > 0 && K % GK == 0 && ldx % 8 == 0 && ldy % 2 == 0 &&
         reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(y) % 8 == 0 && K <= INT32_MAX / 2;
}

void rows_gemm(DType wt, const uint16_t* x, int64_t ldx, int64_t M, const void* w, const float* scale, int64_t N, int64_t K, float* y,
               int64_t ldy, cudaStream_t s) {
  DSV3_CHECK(rows_gemm_supported(x, ldx, M, K, y, ldy) && N > 0 && N <= INT32_MAX,
             "rows_gemm: M {} (1..{}), K {} (a multiple of {}), ldx {} / ldy {} or alignment not supported", M, kRowsGemmMaxRows, K,
             GK, ldx, ldy);
  DSV3_CHECK(wt == DType::BF16 || (wt == DType::F8_E4M3 && scale), "rows_gemm: weights must be BF16 or F8_E4M3 with scales");
  GroupedArgs g{};
  g.a = x;
  g.offsets = nullptr;
  g.E = 1;
  g.K = int(K);
  g.N = int(N);
  g.out = y;
  g.lda = int(ldx), g.ldo = int(ldy);
  g.rows1 = int(M);
  g.w1 = w;
  g.scale1 = scale;
  // Few output tiles: split K over a cluster of up to 8 blocks so that ~2 blocks per SM stream the weights.
  constexpr int GM = 32;
  const int64_t n_tiles = ceil_div(N, int64_t(GN)), m_tiles = ceil_div(M, int64_t(GM)), nk = K / GK;
  static const int64_t sms = device_info().sm_count;
  const int64_t want = ceil_div(2 * sms, n_tiles * m_tiles);
  const int splits = int(std::clamp<int64_t>(std::min(want, nk), 1, 8));
  const dim3 grid{unsigned(n_tiles), unsigned(m_tiles), unsigned(splits)};
  if (wt == DType::F8_E4M3) launch_cluster<true>(g, grid, s);
  else launch_cluster<false>(g, grid, s);
}

}  // namespace dsv3::cuda
