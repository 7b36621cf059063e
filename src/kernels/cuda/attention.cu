// Attention kernels.
//  - attention_causal: flash-style prefill (one pass over key tiles, online softmax), f32 SIMT. One block per
//    (32 queries, head, sequence); each warp owns 8 queries, lane j scores key j of the 32-key tile.
//  - attention_latent: absorbed-MLA decode over a paged latent cache (flash-decoding): blocks split the rows of
//    each sequence, each block handles one query token and a group of heads, keeps an online softmax per head
//    and writes an unnormalised partial; a second kernel merges the partials. A bf16 cache of DeepSeek-V3's
//    width (576 = 512 + 64) or small.json's (288 = 256 + 32) runs on the tensor cores (mma.sync): up to 47
//    heads on the streaming kernel (latent_stream.cuh), 48+ heads of the 576 width on k_latent_mma; anything
//    else on the SIMT kernel (k_latent_split, exact f32).
#include <algorithm>
#include <cstdlib>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/latent_stream.cuh"

namespace dsv3::cuda {

namespace {
using namespace dev;

// ---------------------------------------------------------------------------------------------------------
// Prefill
// ---------------------------------------------------------------------------------------------------------
constexpr int PQ = 32, PK = 32, PW = 4, QPW = PQ / PW, MAXC = 8;  // MAXC * 32 >= Dv

__global__ void __launch_bounds__(PW * 32) k_attention_causal(const float* __restrict__ q, Strides3 sq, const float* __restrict__ k,
                                                              Strides3 sk, const float* __restrict__ v, Strides3 sv,
                                                              float* __restrict__ out, Strides3 so, int T, int D, int Dv,
                                                              float scale) {
  extern __shared__ float sm[];
  float* qs = sm;                    // [PQ][D]
  float* ks = qs + PQ * D;           // [PK][D + 1]
  float* vs = ks + PK * (D + 1);     // [PK][Dv]
  const int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * PQ;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const float* qb = q + b * sq.b + h * sq.h;
  const float* kb = k + b * sk.b + h * sk.h;
  const float* vb = v + b * sv.b + h * sv.h;
  for (int e = threadIdx.x; e < PQ * D; e += blockDim.x) {
    const int i = e / D, d = e % D;
    qs[e] = i0 + i < T ? qb[int64_t(i0 + i) * sq.t + d] : 0.0f;
  }
  float m[QPW], l[QPW], acc[QPW][MAXC];
#pragma unroll
  for (int qi = 0; qi < QPW; ++qi) {
    m[qi] = -INFINITY;
    l[qi] = 0.0f;
#pragma unroll
    for (int c = 0; c < MAXC; ++c) acc[qi][c] = 0.0f;
  }
  const int last_key = min(T, i0 + PQ);  // keys [0, last_key) can be visible to this block
  for (int j0 = 0; j0 < last_key; j0 += PK) {
    __syncthreads();
    for (int e = threadIdx.x; e < PK * D; e += blockDim.x) {
      const int j = e / D, d = e % D;
      ks[j * (D + 1) + d] = j0 + j < T ? kb[int64_t(j0 + j) * sk.t + d] : 0.0f;
    }
    for (int e = threadIdx.x; e < PK * Dv; e += blockDim.x) {
      const int j = e / Dv, d = e % Dv;
      vs[e] = j0 + j < T ? vb[int64_t(j0 + j) * sv.t + d] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int qi = 0; qi < QPW; ++qi) {
      const int il = w * QPW + qi, i = i0 + il;
      if (i >= T || j0 > i) continue;  // warp-uniform
      const float* qr = qs + il * D;
      const float* kr = ks + lane * (D + 1);
      float s = 0.0f;
      for (int d = 0; d < D; ++d) s = fmaf(qr[d], kr[d], s);
      const bool valid = j0 + lane <= i;
      s = valid ? s * scale : -INFINITY;
      const float mt = warp_max(s);
      const float mn = fmaxf(m[qi], mt);
      const float alpha = expf(m[qi] - mn);  // 0 on the first tile (m = -inf)
      const float p = valid ? expf(s - mn) : 0.0f;
      l[qi] = l[qi] * alpha + warp_sum(p);
      m[qi] = mn;
#pragma unroll
      for (int c = 0; c < MAXC; ++c) acc[qi][c] *= alpha;
      for (int jj = 0; jj < PK; ++jj) {
        const float pj = __shfl_sync(0xffffffffu, p, jj);
        const float* vr = vs + jj * Dv;
#pragma unroll
        for (int c = 0; c < MAXC; ++c)
          if (lane + 32 * c < Dv) acc[qi][c] = fmaf(pj, vr[lane + 32 * c], acc[qi][c]);
      }
    }
  }
#pragma unroll
  for (int qi = 0; qi < QPW; ++qi) {
    const int i = i0 + w * QPW + qi;
    if (i >= T) continue;
    float* o = out + b * so.b + int64_t(i) * so.t + h * so.h;
    const float inv = 1.0f / l[qi];
#pragma unroll
    for (int c = 0; c < MAXC; ++c)
      if (lane + 32 * c < Dv) o[lane + 32 * c] = acc[qi][c] * inv;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Decode (absorbed MLA, paged latent cache)
// ---------------------------------------------------------------------------------------------------------
constexpr int DH = 16, DT = 32, DTHREADS = 256, DMAXU = 2;  // heads per block, rows per tile, R <= 256 * DMAXU

template <class C>
__global__ void __launch_bounds__(DTHREADS) k_latent_split(DecodeArgs a) {
  dependent_kernel_begin();
  extern __shared__ float sm[];
  const int W = a.W, R = a.R, KS = W + 4;  // padded row stride (16 B) keeps the lanes' row reads conflict-free
  float* qs = sm;                 // [DH][W]
  float* ks = qs + DH * W;        // [DT][KS]
  float* ps = ks + DT * KS;       // [DH][DT]
  float* al = ps + DH * DT;       // [DH]
  const int split = blockIdx.x, qt = blockIdx.y, h0 = blockIdx.z * DH;
  const int b = qt / a.s_q;
  const int t = threadIdx.x, lane = t & 31, w = t >> 5;
  const int last = a.positions[qt];  // rows 0..last are visible
  const int r0 = split * a.chunk, r1 = min(last + 1, r0 + a.chunk);
  for (int e = t; e < DH * W; e += DTHREADS) {
    const int hh = e / W, d = e % W;
    qs[e] = h0 + hh < a.H ? a.q[(int64_t(qt) * a.H + h0 + hh) * W + d] : 0.0f;
  }
  const int hA = w, hB = w + 8;  // the two heads this warp scores
  float mA = -INFINITY, mB = -INFINITY, lA = 0.0f, lB = 0.0f;
  float acc[DH][DMAXU];
#pragma unroll
  for (int hh = 0; hh < DH; ++hh)
#pragma unroll
    for (int u = 0; u < DMAXU; ++u) acc[hh][u] = 0.0f;
  const C* pool = static_cast<const C*>(a.pool);
  for (int j0 = r0; j0 < r1; j0 += DT) {
    __syncthreads();
    // Tile rows j0..j0+DT-1 (zero past r1), 4 values per load.
    const int vec = W / 4;
    for (int e = t; e < DT * vec; e += DTHREADS) {
      const int j = e / vec, c4 = e % vec, row = j0 + j;
      float4 val = make_float4(0.f, 0.f, 0.f, 0.f);
      if (row < r1) {
        const int64_t phys = a.block_table ? int64_t(a.block_table[int64_t(b) * a.max_blocks + row / a.bs]) * a.bs + row % a.bs : row;
        if constexpr (sizeof(C) == 4) {
          val = reinterpret_cast<const float4*>(pool + phys * W)[c4];
        } else {
          const uint2 raw = reinterpret_cast<const uint2*>(pool + phys * W)[c4];
          val = make_float4(__uint_as_float(raw.x << 16), __uint_as_float(raw.x & 0xffff0000u), __uint_as_float(raw.y << 16),
                            __uint_as_float(raw.y & 0xffff0000u));
        }
      }
      *reinterpret_cast<float4*>(ks + j * KS + 4 * c4) = val;
    }
    __syncthreads();
    // Scores: lane = row, heads hA and hB.
    {
      const float4* kr = reinterpret_cast<const float4*>(ks + lane * KS);
      const float4* qa = reinterpret_cast<const float4*>(qs + hA * W);
      const float4* qb = reinterpret_cast<const float4*>(qs + hB * W);
      float sA = 0.0f, sB = 0.0f;
      for (int c4 = 0; c4 < vec; ++c4) {
        const float4 kv = kr[c4], x = qa[c4], y = qb[c4];
        sA = fmaf(x.x, kv.x, fmaf(x.y, kv.y, fmaf(x.z, kv.z, fmaf(x.w, kv.w, sA))));
        sB = fmaf(y.x, kv.x, fmaf(y.y, kv.y, fmaf(y.z, kv.z, fmaf(y.w, kv.w, sB))));
      }
      const bool valid = j0 + lane < r1;
      sA = valid ? sA * a.scale : -INFINITY;
      sB = valid ? sB * a.scale : -INFINITY;
      const float nA = fmaxf(mA, warp_max(sA)), nB = fmaxf(mB, warp_max(sB));
      const float aA = expf(mA - nA), aB = expf(mB - nB);
      const float pA = valid ? expf(sA - nA) : 0.0f, pB = valid ? expf(sB - nB) : 0.0f;
      lA = lA * aA + warp_sum(pA);
      lB = lB * aB + warp_sum(pB);
      mA = nA;
      mB = nB;
      ps[hA * DT + lane] = pA;
      ps[hB * DT + lane] = pB;
      if (lane == 0) { al[hA] = aA; al[hB] = aB; }
    }
    __syncthreads();
    // Values: thread owns columns t + 256 u.
#pragma unroll
    for (int hh = 0; hh < DH; ++hh) {
      const float f = al[hh];
#pragma unroll
      for (int u = 0; u < DMAXU; ++u) acc[hh][u] *= f;
    }
    for (int j = 0; j < DT; j += 4) {
      float kv[4][DMAXU];
#pragma unroll
      for (int jj = 0; jj < 4; ++jj)
#pragma unroll
        for (int u = 0; u < DMAXU; ++u) kv[jj][u] = t + 256 * u < R ? ks[(j + jj) * KS + t + 256 * u] : 0.0f;
#pragma unroll
      for (int hh = 0; hh < DH; ++hh) {
        const float4 p4 = *reinterpret_cast<const float4*>(ps + hh * DT + j);
#pragma unroll
        for (int u = 0; u < DMAXU; ++u)
          acc[hh][u] = fmaf(p4.x, kv[0][u], fmaf(p4.y, kv[1][u], fmaf(p4.z, kv[2][u], fmaf(p4.w, kv[3][u], acc[hh][u]))));
      }
    }
  }
  // Partials (unnormalised) and the (max, sum) of each head.
  const int64_t base = int64_t(qt) * a.H;
#pragma unroll
  for (int hh = 0; hh < DH; ++hh) {
    if (h0 + hh >= a.H) break;
    float* o = a.part + ((base + h0 + hh) * a.splits + split) * R;
#pragma unroll
    for (int u = 0; u < DMAXU; ++u)
      if (t + 256 * u < R) o[t + 256 * u] = acc[hh][u];
  }
  if (lane == 0) {
    if (h0 + hA < a.H) {
      float* p = a.ml + ((base + h0 + hA) * a.splits + split) * 2;
      p[0] = mA;
      p[1] = lA;
    }
    if (h0 + hB < a.H) {
      float* p = a.ml + ((base + h0 + hB) * a.splits + split) * 2;
      p[0] = mB;
      p[1] = lB;
    }
  }
}

// Merges the splits of one (query token, head) for 128 columns: weights exp(m_s - M) / sum_s exp(m_s - M) l_s.
__global__ void k_latent_combine(const float* __restrict__ part, const float* __restrict__ ml, int splits, int R, float* __restrict__ out) {
  dependent_kernel_begin();
  extern __shared__ float wsh[];  // [splits]
  __shared__ float red[32];
  const int64_t row = blockIdx.x;  // (query token, head)
  const float* mlr = ml + row * splits * 2;
  float M = -INFINITY;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) M = fmaxf(M, mlr[2 * s]);
  M = block_max(M, red);
  float L = 0.0f;
  for (int s = threadIdx.x; s < splits; s += blockDim.x) {
    const float f = mlr[2 * s] > -INFINITY ? expf(mlr[2 * s] - M) : 0.0f;
    wsh[s] = f;
    L += f * mlr[2 * s + 1];
  }
  L = block_sum(L, red);  // its barriers also publish wsh
  const float inv = 1.0f / L;
  const int c = blockIdx.y * blockDim.x + threadIdx.x;
  if (c >= R) return;
  const float* pr = part + row * splits * R + c;
  float o = 0.0f;
  for (int s = 0; s < splits; ++s) o = fmaf(wsh[s], pr[int64_t(s) * R], o);
  out[row * R + c] = o * inv;
}

// ---------------------------------------------------------------------------------------------------------
// Decode on the tensor cores (bf16 cache, W = 576, R = 512): per block one query token, HM = 16·MT heads and a
// range of rows; 32-row tiles arrive by cp.async into a double buffer; S = Q·Kᵀ and O += P·V with
// mma.sync m16n8k16 (bf16 in, f32 accumulate); the online softmax runs on S in shared memory (f32), P is
// rounded to bf16 for the second product and l sums the rounded values.
// ---------------------------------------------------------------------------------------------------------
constexpr int TW = 576, TR = 512, TKR = 32, TSTR = TW + 8, TPS = TKR + 8, TSS = TKR + 4;

template <int MT>
constexpr size_t mma_smem_bytes() {
  return size_t(16 * MT * TSTR + 2 * TKR * TSTR + 16 * MT * TPS) * 2 + size_t(16 * MT * TSS + 3 * 16 * MT) * 4;
}

template <int MT>
__global__ void __launch_bounds__(256, MT == 1 ? 2 : 1) k_latent_mma(DecodeArgs a) {
  dependent_kernel_begin();
  constexpr int HM = 16 * MT;
  extern __shared__ __align__(16) unsigned char smraw[];
  uint16_t* qs = reinterpret_cast<uint16_t*>(smraw);  // [HM][TSTR]
  uint16_t* kbuf = qs + HM * TSTR;                    // [2][TKR][TSTR]
  uint16_t* pbuf = kbuf + 2 * TKR * TSTR;             // [HM][TPS]
  float* sbuf = reinterpret_cast<float*>(pbuf + HM * TPS);  // [HM][TSS]
  float* m_s = sbuf + HM * TSS;
  float* l_s = m_s + HM;
  float* al_s = l_s + HM;
  const int split = blockIdx.x, qt = blockIdx.y, h0 = blockIdx.z * HM;
  const int b = qt / a.s_q;
  const int t = threadIdx.x, lane = t & 31, w = t >> 5, g = lane >> 2, tq = lane & 3;
  const int last = a.positions[qt];
  const int r0 = split * a.chunk, r1 = min(last + 1, r0 + a.chunk);
  const int ntiles = r1 > r0 ? (r1 - r0 + TKR - 1) / TKR : 0;
  const uint16_t* pool = static_cast<const uint16_t*>(a.pool);

  auto load_tile = [&](int j0, int buf) {
    uint16_t* dst = kbuf + buf * TKR * TSTR;
    for (int c = t; c < TKR * (TW / 8); c += 256) {
      const int j = c / (TW / 8), ch = c % (TW / 8), row = j0 + j;
      const bool valid = row < r1;
      int64_t phys = 0;
      if (valid) phys = a.block_table ? int64_t(a.block_table[int64_t(b) * a.max_blocks + row / a.bs]) * a.bs + row % a.bs : row;
      cp_async16(dst + j * TSTR + ch * 8, pool + phys * TW + ch * 8, valid);
    }
    cp_async_commit();
  };
  if (ntiles > 0) load_tile(r0, 0);
  for (int e = t; e < HM * TW; e += 256) {
    const int hh = e / TW, d = e % TW;
    qs[hh * TSTR + d] = h0 + hh < a.H ? f32_to_bf16(a.q[(int64_t(qt) * a.H + h0 + hh) * TW + d]) : uint16_t(0);
  }
  if (t < HM) {
    m_s[t] = -INFINITY;
    l_s[t] = 0.0f;
  }
  float acc[MT][8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][n][i] = 0.0f;

  for (int it = 0; it < ntiles; ++it) {
    const int j0 = r0 + it * TKR, buf = it & 1;
    if (it + 1 < ntiles) {
      load_tile(j0 + TKR, buf ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const uint16_t* ks = kbuf + buf * TKR * TSTR;
    {  // S = Q·Kᵀ for (m-tile, n8-tile) pairs
      constexpr int NPAIR = MT * 4, PPW = (NPAIR + 7) / 8;
      const int p0 = w * PPW;
      if (p0 < NPAIR) {
        const int mt = p0 / 4, nt0 = p0 % 4;
        float c[PPW][4];
#pragma unroll
        for (int i = 0; i < PPW; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.0f;
        const uint16_t* qa = qs + (mt * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * TSTR + 8 * (lane >> 4);
#pragma unroll 4
        for (int k16 = 0; k16 < TW / 16; ++k16) {
          uint32_t af[4];
          ldsm_x4(af, qa + k16 * 16);
          if constexpr (PPW == 2) {
            uint32_t bf[4];
            ldsm_x4(bf, ks + (nt0 * 8 + (lane & 7) + 8 * (lane >> 4)) * TSTR + k16 * 16 + 8 * ((lane >> 3) & 1));
            mma_bf16(c[0], af, bf[0], bf[1]);
            mma_bf16(c[PPW - 1], af, bf[2], bf[3]);
          } else {
            uint32_t b0, b1;
            ldsm_x2(b0, b1, ks + (nt0 * 8 + (lane & 7)) * TSTR + k16 * 16 + 8 * ((lane >> 3) & 1));
            mma_bf16(c[0], af, b0, b1);
          }
        }
#pragma unroll
        for (int i = 0; i < PPW; ++i) {
          float* s0 = sbuf + (mt * 16 + g) * TSS + (nt0 + i) * 8 + 2 * tq;
          s0[0] = c[i][0] * a.scale;
          s0[1] = c[i][1] * a.scale;
          s0[8 * TSS] = c[i][2] * a.scale;
          s0[8 * TSS + 1] = c[i][3] * a.scale;
        }
      }
    }
    __syncthreads();
    {  // online softmax: TPH threads per head row
      constexpr int TPH = 256 / HM, SPT = TKR / TPH;
      const int hh = t / TPH, sub = t % TPH;
      float sv[SPT];
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < SPT; ++i) {
        const int j = sub * SPT + i;
        sv[i] = j0 + j < r1 ? sbuf[hh * TSS + j] : -INFINITY;
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
        const uint16_t pb = f32_to_bf16(j0 + j < r1 ? expf(sv[i] - m_new) : 0.0f);
        pbuf[hh * TPS + j] = pb;
        sum += bf16_to_f32(pb);
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
    {  // O = O·alpha + P·V, warp w owns columns [64 w, 64 w + 64)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const float f0 = al_s[mt * 16 + g], f1 = al_s[mt * 16 + g + 8];
#pragma unroll
        for (int n = 0; n < 8; ++n) {
          acc[mt][n][0] *= f0;
          acc[mt][n][1] *= f0;
          acc[mt][n][2] *= f1;
          acc[mt][n][3] *= f1;
        }
      }
#pragma unroll
      for (int k16 = 0; k16 < TKR / 16; ++k16) {
        uint32_t pa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          ldsm_x4(pa[mt], pbuf + (mt * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * TPS + k16 * 16 + 8 * (lane >> 4));
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          uint32_t bf[4];
          ldsm_x4_t(bf, ks + (k16 * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * TSTR + w * 64 + np * 16 + 8 * (lane >> 4));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_bf16(acc[mt][2 * np], pa[mt], bf[0], bf[1]);
            mma_bf16(acc[mt][2 * np + 1], pa[mt], bf[2], bf[3]);
          }
        }
      }
    }
    __syncthreads();
  }
  const int64_t base = int64_t(qt) * a.H;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int h = h0 + mt * 16 + g + 8 * half;
      if (h >= a.H) continue;
      float* o = a.part + ((base + h) * a.splits + split) * TR + w * 64 + 2 * tq;
#pragma unroll
      for (int n = 0; n < 8; ++n) *reinterpret_cast<float2*>(o + n * 8) = make_float2(acc[mt][n][2 * half], acc[mt][n][2 * half + 1]);
    }
  if (t < HM && h0 + t < a.H) {
    float* p = a.ml + ((base + h0 + t) * a.splits + split) * 2;
    p[0] = m_s[t];
    p[1] = l_s[t];
  }
}

int sm_count() {
  static int n = [] {
    int dev = 0, v = 0;
    DSV3_CUDA_CHECK(cudaGetDevice(&dev));
    DSV3_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
    return v;
  }();
  return n;
}

// Which kernel reads a cache: the streaming kernel (latent_stream.cuh) for bf16 caches of DeepSeek-V3's or
// small.json's width with < 48 heads; k_latent_mma (64 heads a block) for DeepSeek-V3's width with more heads;
// the exact-f32 SIMT kernel otherwise. DSV3_LATENT_OLD=1 sends the streaming kernel's cases back to the kernels
// they ran on before it (k_latent_mma<1> for the 576 width, the SIMT kernel for 288), for A/B runs.
enum class LatentKernel { Simt, Mma16, Mma64, Stream576, Stream288 };
LatentKernel latent_kernel(const LatentAttention& p, DType ct) {
  static const bool old = std::getenv("DSV3_LATENT_OLD") != nullptr;
  if (ct != DType::BF16) return LatentKernel::Simt;
  const bool w576 = p.W == 576 && p.R == 512, w288 = p.W == 288 && p.R == 256;
  if (w576 && p.heads >= 48) return LatentKernel::Mma64;
  if (w576) return old ? LatentKernel::Mma16 : LatentKernel::Stream576;
  if (w288 && p.heads < 48 && !old) return LatentKernel::Stream288;
  return LatentKernel::Simt;
}

// Blocks of the streaming kernel per SM (latent_stream.cuh): two when each block still gets a long range of rows
// (>= 256 at two per SM: batch 64 H 16 L 16384 W 576 on an H200 went from 2,279 to 3,500 GB/s), else one with the
// deeper ring (a split of 124 rows: 989 GB/s at one per SM, 855 at two). DSV3_LATENT_BPS=1|2 forces either.
int stream_bps(const LatentAttention& p) {
  static const int forced = [] {
    const char* e = std::getenv("DSV3_LATENT_BPS");
    return e && (std::string(e) == "1" || std::string(e) == "2") ? std::atoi(e) : 0;
  }();
  if (forced) return forced;
  const int64_t blocks = std::max<int64_t>(1, p.batch * p.s_q * ceil_div(p.heads, int64_t(16)));
  const int64_t splits = std::max<int64_t>(1, 2 * int64_t(sm_count()) / blocks);
  return ceil_div(p.max_len, splits) >= 256 ? 2 : 1;
}

int latent_splits(const LatentAttention& p, DType ct) {
  const LatentKernel k = latent_kernel(p, ct);
  const int64_t hm = k == LatentKernel::Mma64 ? 64 : 16;
  const int64_t blocks = p.batch * p.s_q * ceil_div(p.heads, hm);
  int64_t want;
  if (k == LatentKernel::Stream576 || k == LatentKernel::Stream288) {
    // As many splits as fill one wave of stream_bps() blocks per SM (a partial second wave would double the time).
    want = std::max<int64_t>(1, int64_t(stream_bps(p)) * int64_t(sm_count()) / std::max<int64_t>(1, blocks));
  } else {
    const int64_t per_sm = k == LatentKernel::Mma64 ? 1 : 2;  // resident blocks per SM
    want = ceil_div(per_sm * int64_t(sm_count()), std::max<int64_t>(1, blocks));
  }
  // A split is one tile of DT rows at least: the decode step of a small batch is otherwise one block streaming
  // the whole context.
  const int64_t most = std::max<int64_t>(1, ceil_div(p.max_len, int64_t(DT)));
  const int64_t splits = std::clamp<int64_t>(want, 1, most);
  return int(ceil_div(p.max_len, round_up(ceil_div(p.max_len, splits), int64_t(DT))));  // no empty trailing split
}

void set_smem(const void* f, size_t bytes) {
  if (bytes > 48 * 1024) DSV3_CUDA_CHECK(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}
}  // namespace

void attention_causal(const float* q, Strides3 sq, const float* k, Strides3 sk, const float* v, Strides3 sv, float* out, Strides3 so,
                      int64_t B, int64_t T, int64_t H, int64_t D, int64_t Dv, float scale, cudaStream_t s) {
  DSV3_CHECK(D > 0 && D <= 256 && Dv > 0 && Dv <= 32 * MAXC, "attention_causal: head dims {} / {} beyond the kernel's 256", D, Dv);
  DSV3_CHECK(H <= 65535 && B <= 65535, "attention_causal: {} heads x {} sequences is too many", H, B);
  if (B * T * H == 0) return;
  const size_t smem = sizeof(float) * size_t(PQ * D + PK * (D + 1) + PK * Dv);
  set_smem(reinterpret_cast<const void*>(&k_attention_causal), smem);
  const dim3 grid(unsigned(ceil_div(T, PQ)), unsigned(H), unsigned(B));
  k_attention_causal<<<grid, PW * 32, smem, s>>>(q, sq, k, sk, v, sv, out, so, int(T), int(D), int(Dv), scale);
  DSV3_CUDA_CHECK_LAUNCH("attention_causal kernel");
}

size_t attention_latent_workspace_bytes(const LatentAttention& p) {
  const int64_t splits = std::max(latent_splits(p, DType::F32), latent_splits(p, DType::BF16));
  return size_t(p.batch * p.s_q * p.heads * splits * (p.R + 2)) * sizeof(float);
}

void attention_latent(const LatentAttention& p, const float* q, DType ct, const void* pool, const int32_t* block_table,
                      const int32_t* positions, float* out, void* workspace, size_t workspace_bytes, cudaStream_t s) {
  DSV3_CHECK(ct == DType::F32 || ct == DType::BF16, "attention_latent: cache dtype {} (F32 or BF16)", dtype_name(ct));
  DSV3_CHECK(p.W % 4 == 0 && p.W <= 1024 && p.R <= 256 * DMAXU && p.R <= p.W, "attention_latent: W {} / R {} unsupported", p.W, p.R);
  DSV3_CHECK(p.max_len > 0 && (block_table == nullptr || (p.block_size > 0 && p.max_blocks * p.block_size >= p.max_len)),
             "attention_latent: max_len {} / block table {} x {}", p.max_len, p.max_blocks, p.block_size);
  const size_t need = attention_latent_workspace_bytes(p);
  DSV3_CHECK(workspace_bytes >= need, "attention_latent: workspace of {} bytes, {} needed", workspace_bytes, need);
  const int64_t nq = p.batch * p.s_q;
  if (nq * p.heads == 0) return;
  const int splits = latent_splits(p, ct);
  DecodeArgs a{};
  a.q = q;
  a.pool = pool;
  a.block_table = block_table;
  a.positions = positions;
  a.part = static_cast<float*>(workspace);
  a.ml = a.part + nq * p.heads * splits * p.R;
  a.H = int(p.heads);
  a.W = int(p.W);
  a.R = int(p.R);
  a.s_q = int(p.s_q);
  a.bs = int(p.block_size);
  a.max_blocks = int(p.max_blocks);
  a.splits = splits;
  a.chunk = int(round_up(ceil_div(p.max_len, splits), DT));
  a.scale = p.scale;
  const LatentKernel kind = latent_kernel(p, ct);
  const unsigned groups16 = unsigned(ceil_div(p.heads, 16));
  if (kind == LatentKernel::Stream576 || kind == LatentKernel::Stream288) {
    const bool w576 = kind == LatentKernel::Stream576, two = stream_bps(p) == 2;
    auto* k = w576 ? (two ? &k_latent_stream<576, 512, 2> : &k_latent_stream<576, 512>)
                   : (two ? &k_latent_stream<288, 256, 2> : &k_latent_stream<288, 256>);
    const size_t smem = w576 ? (two ? LatentStream<576, 512, 2>::smem_bytes : LatentStream<576, 512>::smem_bytes)
                             : (two ? LatentStream<288, 256, 2>::smem_bytes : LatentStream<288, 256>::smem_bytes);
    set_smem(reinterpret_cast<const void*>(k), smem);
    launch_dependent(k, dim3(unsigned(splits), unsigned(nq), groups16), dim3(256), smem, s, a);
    DSV3_CUDA_CHECK_LAUNCH("attention_latent streaming kernel");
  } else if (kind == LatentKernel::Mma64) {
    set_smem(reinterpret_cast<const void*>(&k_latent_mma<4>), mma_smem_bytes<4>());
    launch_dependent(k_latent_mma<4>, dim3(unsigned(splits), unsigned(nq), unsigned(ceil_div(p.heads, 64))), dim3(256),
                     mma_smem_bytes<4>(), s, a);
    DSV3_CUDA_CHECK_LAUNCH("attention_latent tensor-core split kernel");
  } else if (kind == LatentKernel::Mma16) {
    set_smem(reinterpret_cast<const void*>(&k_latent_mma<1>), mma_smem_bytes<1>());
    launch_dependent(k_latent_mma<1>, dim3(unsigned(splits), unsigned(nq), groups16), dim3(256), mma_smem_bytes<1>(), s, a);
    DSV3_CUDA_CHECK_LAUNCH("attention_latent tensor-core split kernel");
  } else {  // f32 cache or other widths: the SIMT kernel
    const size_t smem = sizeof(float) * size_t(DH * p.W + DT * (p.W + 4) + DH * DT + DH);
    const dim3 grid(unsigned(splits), unsigned(nq), unsigned(ceil_div(p.heads, DH)));
    if (ct == DType::F32) {
      set_smem(reinterpret_cast<const void*>(&k_latent_split<float>), smem);
      launch_dependent(k_latent_split<float>, grid, dim3(DTHREADS), smem, s, a);
    } else {
      set_smem(reinterpret_cast<const void*>(&k_latent_split<uint16_t>), smem);
      launch_dependent(k_latent_split<uint16_t>, grid, dim3(DTHREADS), smem, s, a);
    }
    DSV3_CUDA_CHECK_LAUNCH("attention_latent split kernel");
  }
  launch_dependent(k_latent_combine, dim3(unsigned(nq * p.heads), unsigned(ceil_div(p.R, 128))), dim3(128),
                   sizeof(float) * size_t(splits), s, a.part, a.ml, splits, a.R, out);
  DSV3_CUDA_CHECK_LAUNCH("attention_latent combine kernel");
}

}  // namespace dsv3::cuda
