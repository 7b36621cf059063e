// Causal flash attention for long prefills on the tensor cores (attention_causal_flash; see infer_ops.h).
// q, k, v are first packed to bf16 [B, H, T, D] in the workspace (a head's rows contiguous, whole 16-byte chunks for
// cp.async). One block per (64 query rows, head, sequence), 4 warps of 16 rows each: a warp keeps its Q fragments in
// registers and walks the 64-key tiles 0..diagonal (K and V double-buffered in shared memory by cp.async):
// S = Q·Kᵀ (mma.sync m16n8k16) into f32 registers, an online softmax per row (a row lives in the 4 threads of a
// quad), P rounded to bf16 straight into A fragments (the C fragments of two adjacent n8 tiles are the A fragment of
// one k16 step), O += P·V with V read by ldmatrix.trans (online_softmax, flash_softmax.cuh, shared with the wgmma
// kernel of flash_wgmma.cuh). Precision as attention_causal_gemm: q, k, v and P in bf16, f32 accumulation.
#include <algorithm>
#include <climits>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/flash_softmax.cuh"
#include "kernels/cuda/flash_wgmma.cuh"
#include "kernels/cuda/infer_ops.h"

namespace dsv3::cuda {

namespace {
using namespace dev;

constexpr int FK = 64, FW = 4, FT = FW * 32;  // keys per tile, warps, threads

// MT: m16 tiles of query rows a warp owns (block of FQ = 16·MT·FW rows). With two, every K and V fragment read by
// ldmatrix feeds four mma instead of two: one ldmatrix.x4 per two m16n8k16 keeps the SM's shared-memory port
// (128 B/clk) as busy as its tensor cores, so MT 2 halves the fragment traffic per product (FlashAttention-2's
// 128-row blocks). D 192 keeps MT 1 (its Q and O fragments alone fill the register file).
template <int D, int DV, int MT>
struct Flash {
  static constexpr int FQ = 16 * MT * FW;
  // Padded rows: an odd number of 16-byte chunks puts the 8 rows of an ldmatrix in 8 distinct bank groups.
  static constexpr int ks = D + 8, vs = DV + 8;
  // [2 stages][FK][ks] K, then [2][FK][vs] V, then (MT > 1) [FQ][ks] Q; with MT 1 Q borrows K's stage 1
  static constexpr int q_elems = MT > 1 ? FQ * ks : 0;
  static constexpr size_t smem = size_t(2 * FK * (ks + vs) + q_elems) * 2;
  static_assert(D % 16 == 0 && DV % 16 == 0, "D in k16 steps, DV in pairs of n8 tiles");
  static_assert(((ks / 8) & 1) && ((vs / 8) & 1), "odd 16-byte chunks per padded row");
  static_assert(FK % (FT / 4) == 0 && FQ % FK == 0, "whole passes of FT / 4 rows; Q in whole key-tile loads");
};

// dst[b, h, t, :D] = bf16(src[b·s.b + t·s.t + h·s.h + :D]), 4 values per thread; blockIdx: (b·T + t, chunk of the
// token's H·D/4 quads, tensor q/k/v). vec: the source is 16-byte aligned for every quad (float4 loads). MLA's
// pieces (FlashMla): k's dims from k_split on read from kr (head stride 0 for the shared k_rope), q's dims from
// q_rope0 on rotated by RoPE (pairs (2p, 2p + 1), cos/sin of the row's position from table) before rounding.
struct PackArgs {
  const float* src[3];
  Strides3 s[3];
  uint16_t* dst[3];
  int dim[3];
  bool vec[3];
  const float* kr = nullptr;
  Strides3 skr;
  bool vec_kr = false;
  int k_split = 0, q_rope0 = 0, rope_half = 0;
  const float2* table = nullptr;
  const int64_t* pos = nullptr;
};
__global__ void __launch_bounds__(256) k_flash_pack(PackArgs a, int T, int H) {
  const int z = blockIdx.z;  // selects rather than indexes the parameter arrays (no local-memory copy)
  const float* src = z == 0 ? a.src[0] : z == 1 ? a.src[1] : a.src[2];
  const Strides3 s = z == 0 ? a.s[0] : z == 1 ? a.s[1] : a.s[2];
  uint16_t* dst = z == 0 ? a.dst[0] : z == 1 ? a.dst[1] : a.dst[2];
  const int D = z == 0 ? a.dim[0] : z == 1 ? a.dim[1] : a.dim[2];
  const bool vec = z == 0 ? a.vec[0] : z == 1 ? a.vec[1] : a.vec[2];
  const int idx = blockIdx.y * blockDim.x + threadIdx.x, D4 = D / 4;
  if (idx >= H * D4) return;
  const int64_t bt = blockIdx.x, b = bt / T, t = bt % T;
  const int h = idx / D4, d = (idx % D4) * 4;
  const bool from_kr = z == 1 && d >= a.k_split;
  const float* p = from_kr ? a.kr + b * a.skr.b + t * a.skr.t + h * a.skr.h + (d - a.k_split) : src + b * s.b + t * s.t + h * s.h + d;
  float4 x = (from_kr ? a.vec_kr : vec) ? *reinterpret_cast<const float4*>(p) : make_float4(p[0], p[1], p[2], p[3]);
  if (z == 0 && d >= a.q_rope0) {
    const int pr = (d - a.q_rope0) / 2;
    const float2 c0 = a.table[a.pos[bt] * a.rope_half + pr], c1 = a.table[a.pos[bt] * a.rope_half + pr + 1];
    x = make_float4(x.x * c0.x - x.y * c0.y, x.y * c0.x + x.x * c0.y, x.z * c1.x - x.w * c1.y, x.w * c1.x + x.z * c1.y);
  }
  const uint2 o = make_uint2(uint32_t(f32_to_bf16(x.x)) | uint32_t(f32_to_bf16(x.y)) << 16,
                             uint32_t(f32_to_bf16(x.z)) | uint32_t(f32_to_bf16(x.w)) << 16);
  *reinterpret_cast<uint2*>(dst + ((b * H + h) * T + t) * D + d) = o;
}

// Rows r0 .. r0 + FK - 1 of a packed [T, W] bf16 head into dst (row stride S); rows >= T zero-filled (their
// scores are masked and their V rows must be finite: 0 · NaN would poison O). 4 threads per row, 16-byte chunks
// 4 apart, so a thread's addresses are one base plus constants (no per-chunk registers). Thread pairs of a row
// pair are 4 rows apart (bits 0 and 2 of t/4 swapped): 4 padded rows are 64 bytes of banks apart (S·2 ≡ 16 or 80
// mod 128), so the 8 threads of a 128-byte store phase hit distinct banks.
template <int W, int S>
__device__ __forceinline__ void load_rows(uint16_t* dst, const uint16_t* __restrict__ src, int r0, int T) {
  static_assert(W % 32 == 0, "rows in whole groups of 4 chunks");
  const int j = int(threadIdx.x) >> 2, rr = (j & ~5) | ((j & 1) << 2) | ((j >> 2) & 1), c0 = 8 * (threadIdx.x & 3);
#pragma unroll
  for (int p = 0; p < FK / (FT / 4); ++p) {
    const int row = rr + (FT / 4) * p;
    const bool valid = r0 + row < T;
    const uint16_t* g = src + int64_t(valid ? r0 + row : 0) * W + c0;
    uint16_t* d = dst + row * S + c0;
#pragma unroll
    for (int q = 0; q < W / 32; ++q) cp_async16(d + 32 * q, g + 32 * q, valid);
  }
}

template <int D, int DV, int MT, class O>
__global__ void __launch_bounds__(FT) k_flash_causal(const uint16_t* __restrict__ qp, const uint16_t* __restrict__ kp,
                                                     const uint16_t* __restrict__ vp, O* __restrict__ out, Strides3 so, int T,
                                                     int H, float sl2) {
  using F = Flash<D, DV, MT>;
  constexpr int KS = F::ks, VS = F::vs, KT = D / 16, NO = DV / 8, NS = FK / 8, FQ = F::FQ;
  extern __shared__ __align__(16) unsigned char smraw[];
  uint16_t* kbuf = reinterpret_cast<uint16_t*>(smraw);  // [2][FK][KS]
  uint16_t* vbuf = kbuf + 2 * FK * KS;                   // [2][FK][VS]
  uint16_t* qbuf = MT > 1 ? vbuf + 2 * FK * VS : kbuf + FK * KS;
  // Heads along x, query tiles along y in reverse: blocks are dispatched x fastest, so every head's longest rows
  // (most key tiles) start first and the short ones fill the tail (query tiles along x ran each head's tiles in
  // turn: the last heads' long blocks started late, SMs 31% idle at T 4096, H 16).
  const int qt = int(gridDim.y) - 1 - int(blockIdx.y);
  const int h = blockIdx.x, b = blockIdx.z;
  const int q0 = qt * FQ, ntiles = (min(q0 + FQ, T) + FK - 1) / FK;  // keys 0 .. the block's last row
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
  const int64_t head = (int64_t(b) * H + h) * T;
  const uint16_t* qh = qp + head * D;
  const uint16_t* kh = kp + head * D;
  const uint16_t* vh = vp + head * DV;

  // (MT 1: Q borrows K's stage 1 until its fragments are in registers; tile 1 is issued after the loop's first barrier.)
#pragma unroll
  for (int r = 0; r < FQ; r += FK) load_rows<D, KS>(qbuf + r * KS, qh, q0 + r, T);
  load_rows<D, KS>(kbuf, kh, 0, T);
  load_rows<DV, VS>(vbuf, vh, 0, T);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  // Warp w owns m16 tiles MT·w .. MT·w + MT - 1 of the block's rows.
  uint32_t qf[MT][KT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const uint16_t* qa = qbuf + (16 * (MT * w + mt) + (lane & 15)) * KS + 8 * (lane >> 4);
#pragma unroll
    for (int kk = 0; kk < KT; ++kk) ldsm_x4(qf[mt][kk], qa + 16 * kk);
  }
  float o[MT][NO][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int n = 0; n < NO; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
  // This thread's rows i0 (C elements 0, 1) and i1 = i0 + 8 (elements 2, 3) of each m tile; m and l as
  // online_softmax keeps them.
  const int wrow0 = q0 + 16 * MT * w;  // the warp's first row
  float m0[MT], m1[MT], l0[MT], l1[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) m0[mt] = m1[mt] = -INFINITY, l0[mt] = l1[mt] = 0.0f;

  const uint16_t* kb_off = kbuf + ((lane & 7) + 8 * (lane >> 4)) * KS + 8 * ((lane >> 3) & 1);
  const uint16_t* vb_off = vbuf + ((lane & 7) + 8 * ((lane >> 3) & 1)) * VS + 8 * (lane >> 4);
  for (int it = 0; it < ntiles; ++it) {
    const int st = it & 1, j0 = it * FK;
    cp_async_wait<0>();
    __syncthreads();  // tile it has landed for every thread, and nobody still reads stage st ^ 1 (tile it - 1, or Q)
    if (it + 1 < ntiles) {
      load_rows<D, KS>(kbuf + (st ^ 1) * FK * KS, kh, j0 + FK, T);
      load_rows<DV, VS>(vbuf + (st ^ 1) * FK * VS, vh, j0 + FK, T);
      cp_async_commit();
    }
    if (j0 > wrow0 + 16 * MT - 1) continue;  // every key past every row of this warp (warp-uniform)
    // S = Q·Kᵀ: n8 tile nt holds keys j0 + 8 nt ..; K rows are B's n, so ldmatrix without .trans.
    float s[MT][NS][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int n = 0; n < NS; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
    const uint16_t* kb = kb_off + st * FK * KS;
#pragma unroll
    for (int kk = 0; kk < KT; ++kk)
#pragma unroll
      for (int np = 0; np < NS / 2; ++np) {
        uint32_t bf[4];
        ldsm_x4(bf, kb + np * 16 * KS + kk * 16);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_bf16(s[mt][2 * np], qf[mt][kk], bf[0], bf[1]);
          mma_bf16(s[mt][2 * np + 1], qf[mt][kk], bf[2], bf[3]);
        }
      }
    // The key tiles reaching the block's rows are masked (j > i, j >= T).
    uint32_t pf[MT][NS / 2][4];
    const bool diag = j0 + FK > q0;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      if (diag)
        online_softmax<true>(s[mt], o[mt], pf[mt], m0[mt], m1[mt], l0[mt], l1[mt], wrow0 + 16 * mt + g, j0, T, sl2);
      else
        online_softmax<false>(s[mt], o[mt], pf[mt], m0[mt], m1[mt], l0[mt], l1[mt], wrow0 + 16 * mt + g, j0, T, sl2);
    }
    // O += P·V: V rows are B's k, so ldmatrix.trans; (bf[0], bf[1]) columns 16 np .., (bf[2], bf[3]) 16 np + 8 ..
    const uint16_t* vb = vb_off + st * FK * VS;
#pragma unroll
    for (int kk = 0; kk < NS / 2; ++kk)
#pragma unroll
      for (int np = 0; np < NO / 2; ++np) {
        uint32_t bf[4];
        ldsm_x4_t(bf, vb + kk * 16 * VS + np * 16);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_bf16(o[mt][2 * np], pf[mt][kk], bf[0], bf[1]);
          mma_bf16(o[mt][2 * np + 1], pf[mt][kk], bf[2], bf[3]);
        }
      }
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    store_rows(o[mt], l0[mt], l1[mt], out + int64_t(b) * so.b + int64_t(h) * so.h + 2 * tq, so.t, wrow0 + 16 * mt + g, T);
  }
}

// DSV3_FLASH_MT=1: one m16 tile a warp for every head dim (64-row blocks, the kernel before 2026-12-03), for A/B.
int env_flash_mt() {
  static const int v = [] {
    const char* e = std::getenv("DSV3_FLASH_MT");
    return e && std::string(e) == "1" ? 1 : 2;
  }();
  return v;
}

template <int D, int DV, int MT, class O>
void launch_flash_out(const uint16_t* qp, const uint16_t* kp, const uint16_t* vp, O* out, Strides3 so, int64_t B, int64_t T,
                      int64_t H, float scale, cudaStream_t s) {
  using F = Flash<D, DV, MT>;
  if (F::smem > 48 * 1024)
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(&k_flash_causal<D, DV, MT, O>),
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, int(F::smem)));
  const dim3 grid(unsigned(H), unsigned(ceil_div(T, F::FQ)), unsigned(B));
  k_flash_causal<D, DV, MT, O><<<grid, FT, F::smem, s>>>(qp, kp, vp, out, so, int(T), int(H), scale * 1.4426950408889634f);
  DSV3_CUDA_CHECK_LAUNCH("attention_causal_flash kernel");
}
template <int D, int DV, int MT>
void launch_flash(const uint16_t* qp, const uint16_t* kp, const uint16_t* vp, void* out, DType ot, Strides3 so, int64_t B, int64_t T,
                  int64_t H, float scale, cudaStream_t s) {
  if (ot == DType::BF16)
    launch_flash_out<D, DV, MT>(qp, kp, vp, static_cast<uint16_t*>(out), so, B, T, H, scale, s);
  else
    launch_flash_out<D, DV, MT>(qp, kp, vp, static_cast<float*>(out), so, B, T, H, scale, s);
}

// The wgmma kernel (flash_wgmma.cuh) for D 64 / 96 and Dv 64 by default, key tiles of 64 (T 4096 on an H200: 180 us a
// layer against the mma.sync kernel's 208, ncu); DSV3_FLASH_WGMMA=128 for key tiles of 128, =0 for the mma.sync
// kernel. Read at every launch, so a test can compare the kernels in one process.
int env_flash_wgmma() {
  const char* e = std::getenv("DSV3_FLASH_WGMMA");
  if (!e) return 64;
  const std::string v(e);
  return v == "0" ? 0 : v == "128" ? 128 : 64;
}

template <int D, int NK, class O>
void launch_flash_wgmma_out(const WgArgs& a, O* out, int64_t B, cudaStream_t s) {
  using F = FlashWg<D, NK>;
  auto* k = &k_flash_wgmma<D, NK, O>;
  static const bool attr = [&] {
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(F::smem)));
    return true;
  }();
  (void)attr;
  const dim3 grid(unsigned(a.H), unsigned(ceil_div(int64_t(a.T), int64_t(F::BQ))), unsigned(B));
  k<<<grid, F::THREADS, F::smem, s>>>(a, out);
  DSV3_CUDA_CHECK_LAUNCH("attention_causal_flash wgmma kernel");
}
// (D, NK, the output type) picked at run time.
void launch_flash_wgmma(int nk, const WgArgs& a, void* out, DType ot, int64_t B, int64_t D, cudaStream_t s) {
  auto run = [&](auto d, auto n) {
    constexpr int DD = decltype(d)::value, NN = decltype(n)::value;
    if (ot == DType::BF16)
      launch_flash_wgmma_out<DD, NN, uint16_t>(a, static_cast<uint16_t*>(out), B, s);
    else
      launch_flash_wgmma_out<DD, NN, float>(a, static_cast<float*>(out), B, s);
  };
  using I64 = std::integral_constant<int, 64>;
  using I96 = std::integral_constant<int, 96>;
  using I128 = std::integral_constant<int, 128>;
  if (D == 64)
    nk == 64 ? run(I64{}, I64{}) : run(I64{}, I128{});
  else
    nk == 64 ? run(I96{}, I64{}) : run(I96{}, I128{});
}
// The packed [B, H, T, D] copies as panels.
WgArgs packed_panels(const uint16_t* qp, const uint16_t* kp, const uint16_t* vp, Strides3 so, int64_t T, int64_t H, int64_t D, float scale) {
  const WgPanel q{qp, H * T * D, T * D, D}, k{kp, H * T * D, T * D, D}, v{vp, H * T * 64, T * 64, 64};
  WgPanel q1 = q, k1 = k;
  q1.p += 64, k1.p += 64;
  return WgArgs{q, q1, k, k1, v, so, int(T), int(H), scale * 1.4426950408889634f};
}

bool aligned16(const uint16_t* p, Strides3 s) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0 && s.b % 8 == 0 && s.t % 8 == 0 && s.h % 8 == 0;
}
bool aligned16(const float* p, Strides3 s) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0 && s.b % 4 == 0 && s.t % 4 == 0 && s.h % 4 == 0;
}
uint8_t* align256(void* p) { return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + 255) & ~uintptr_t(255)); }
}  // namespace

bool attention_causal_flash_supported(int64_t D, int64_t Dv) {
  return (D == 64 && Dv == 64) || (D == 96 && Dv == 64) || (D == 192 && Dv == 128);
}

size_t attention_causal_flash_workspace(int64_t B, int64_t T, int64_t H, int64_t D, int64_t Dv) {
  return size_t(B * T * H * (2 * D + Dv)) * 2 + 256 * 3;
}

void attention_causal_flash(const float* q, Strides3 sq, const float* k, Strides3 sk, const float* v, Strides3 sv, void* out,
                            Strides3 so, int64_t B, int64_t T, int64_t H, int64_t D, int64_t Dv, float scale, void* ws,
                            size_t ws_bytes, cudaStream_t s, const FlashMla& mla) {
  DSV3_CHECK(attention_causal_flash_supported(D, Dv), "attention_causal_flash: head dims {} / {} have no kernel", D, Dv);
  DSV3_CHECK(mla.out_type == DType::F32 || mla.out_type == DType::BF16, "attention_causal_flash: output {} (F32 or BF16)",
             dtype_name(mla.out_type));
  DSV3_CHECK(mla.out_type == DType::F32 || (so.b % 2 == 0 && so.t % 2 == 0 && so.h % 2 == 0 && (reinterpret_cast<uintptr_t>(out) & 3) == 0),
             "attention_causal_flash: a bf16 output needs even strides and a 4-byte aligned base");
  DSV3_CHECK(mla.kr >= 0 && mla.kr < D && (D - mla.kr) % 4 == 0 && (mla.kr == 0 || mla.k_rope),
             "attention_causal_flash: k_rope of {} dims (a multiple of 4 below D {}, with its tensor)", mla.kr, D);
  DSV3_CHECK(mla.q_rope >= 0 && mla.q_rope <= D && mla.q_rope % 4 == 0 && (mla.q_rope == 0 || (mla.rope_table && mla.pos)),
             "attention_causal_flash: RoPE on {} query dims (a multiple of 4 up to D {}, with a table and positions)", mla.q_rope, D);
  DSV3_CHECK(T <= 65535 * 64 && B <= 65535 && B * T <= INT_MAX,
             "attention_causal_flash: {} sequences x {} tokens x {} heads is too many", B, T, H);
  if (B * T * H == 0) return;
  const size_t need = attention_causal_flash_workspace(B, T, H, D, Dv);
  DSV3_CHECK(ws_bytes >= need, "attention_causal_flash: workspace of {} bytes, {} needed", ws_bytes, need);
  auto* qp = reinterpret_cast<uint16_t*>(align256(ws));                       // [B, H, T, D]
  auto* kp = reinterpret_cast<uint16_t*>(align256(qp + B * H * T * D));     // [B, H, T, D]
  auto* vp = reinterpret_cast<uint16_t*>(align256(kp + B * H * T * D));     // [B, H, T, Dv]
  PackArgs a{};
  a.src[0] = q;
  a.src[1] = k;
  a.src[2] = v;
  a.s[0] = sq;
  a.s[1] = sk;
  a.s[2] = sv;
  a.dst[0] = qp;
  a.dst[1] = kp;
  a.dst[2] = vp;
  a.dim[0] = a.dim[1] = int(D);
  a.dim[2] = int(Dv);
  a.vec[0] = aligned16(q, sq);
  a.vec[1] = aligned16(k, sk);
  a.vec[2] = aligned16(v, sv);
  a.k_split = int(D - mla.kr);
  if (mla.kr > 0) a.kr = mla.k_rope, a.skr = mla.skr, a.vec_kr = aligned16(mla.k_rope, mla.skr);
  a.q_rope0 = int(D - mla.q_rope);
  if (mla.q_rope > 0) {
    a.table = reinterpret_cast<const float2*>(mla.rope_table);
    a.pos = mla.pos;
    a.rope_half = int(mla.q_rope / 2);
  }
  const int64_t quads = H * std::max(D, Dv) / 4;  // per token and tensor
  const int threads = int(std::min<int64_t>(256, round_up(quads, 32)));
  const dim3 pgrid(unsigned(B * T), unsigned(ceil_div(quads, threads)), 3);
  k_flash_pack<<<pgrid, threads, 0, s>>>(a, int(T), int(H));
  DSV3_CUDA_CHECK_LAUNCH("attention_causal_flash pack kernel");
  const bool mt2 = env_flash_mt() == 2;
  const DType ot = mla.out_type;
  if (const int nk = env_flash_wgmma(); nk && (D == 64 || D == 96) && Dv == 64)
    return launch_flash_wgmma(nk, packed_panels(qp, kp, vp, so, T, H, D, scale), out, ot, B, D, s);
  if (D == 64)
    mt2 ? launch_flash<64, 64, 2>(qp, kp, vp, out, ot, so, B, T, H, scale, s)
        : launch_flash<64, 64, 1>(qp, kp, vp, out, ot, so, B, T, H, scale, s);
  else if (D == 96)
    mt2 ? launch_flash<96, 64, 2>(qp, kp, vp, out, ot, so, B, T, H, scale, s)
        : launch_flash<96, 64, 1>(qp, kp, vp, out, ot, so, B, T, H, scale, s);
  else
    launch_flash<192, 128, 1>(qp, kp, vp, out, ot, so, B, T, H, scale, s);
}

bool attention_causal_flash_direct_supported(int64_t D, int64_t Dv, int64_t kr) {
  return Dv == 64 && ((D == 96 && kr == 32) || (D == 64 && kr == 0));
}

void attention_causal_flash_direct(const uint16_t* q, Strides3 sq, const uint16_t* k, Strides3 sk, const uint16_t* k_rope,
                                   Strides3 skr, int64_t kr, const uint16_t* v, Strides3 sv, void* out, DType out_type, Strides3 so,
                                   int64_t B, int64_t T, int64_t H, int64_t D, int64_t Dv, float scale, cudaStream_t s) {
  DSV3_CHECK(attention_causal_flash_direct_supported(D, Dv, kr), "attention_causal_flash_direct: head dims {} / {} with {} k_rope dims have no kernel",
             D, Dv, kr);
  DSV3_CHECK(out_type == DType::F32 || out_type == DType::BF16, "attention_causal_flash_direct: output {} (F32 or BF16)",
             dtype_name(out_type));
  DSV3_CHECK(out_type == DType::F32 || (so.b % 2 == 0 && so.t % 2 == 0 && so.h % 2 == 0 && (reinterpret_cast<uintptr_t>(out) & 3) == 0),
             "attention_causal_flash_direct: a bf16 output needs even strides and a 4-byte aligned base");
  DSV3_CHECK(aligned16(q, sq) && aligned16(k, sk) && aligned16(v, sv) && (kr == 0 || aligned16(k_rope, skr)),
             "attention_causal_flash_direct: q, k, v{} need 16-byte aligned bases and strides in multiples of 8 elements",
             kr ? " and k_rope" : "");
  DSV3_CHECK(T <= 65535 * 128 && B <= 65535 && B * T <= INT_MAX && H <= 65535,
             "attention_causal_flash_direct: {} sequences x {} tokens x {} heads is too many", B, T, H);
  if (B * T * H == 0) return;
  WgArgs a{};
  a.q0 = WgPanel{q, sq.b, sq.h, sq.t};
  a.q1 = a.q0;
  a.q1.p += 64;
  a.k0 = WgPanel{k, sk.b, sk.h, sk.t};
  a.k1 = kr ? WgPanel{k_rope, skr.b, skr.h, skr.t} : a.k0;
  if (!kr) a.k1.p += 64;
  a.v = WgPanel{v, sv.b, sv.h, sv.t};
  a.so = so, a.T = int(T), a.H = int(H), a.sl2 = scale * 1.4426950408889634f;
  const int nk = env_flash_wgmma();
  launch_flash_wgmma(nk ? nk : 64, a, out, out_type, B, D, s);
}

}  // namespace dsv3::cuda
