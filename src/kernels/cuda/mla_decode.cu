// The absorbed-MLA decode of one new token per sequence as one kernel (see infer_ops.h, mla_decode_fused).
//
// Why: at batch 1 and short contexts a decode layer's attention was five dependent launches (prologue, q_nope·W_UK,
// split attention, split merge, ·W_UVᵀ), each a few µs of latency for kilobytes of work. One block per
// (token, head) does all of it. Latency, not bandwidth, is the cost, so every load is issued early and as one batch:
// the head's W_UK and W_UV and the first cache tile go to shared memory by cp.async before griddepcontrol.wait
// (none depends on the kernel before), later tiles while the previous one is scored (double buffer). The block
// recomputes the new token's latent row itself (every head needs it; the head-0 block also appends it to the
// cache), so no block waits on another.
//
// Math, per token m (position p) and head h, as the unfused chain: c = [rmsnorm(c_kv)·γ | RoPE(k_pe)] rounded to
// the cache dtype; q = [q_nope·W_UK_h | RoPE(q_pe)]; s_j = scale · q·K_j for rows j ≤ p (row p is c);
// o = Σ_j softmax(s)_j · K_j[:kvr]; out = o·W_UV_hᵀ. f32 math throughout; the output is written in the act dtype.
#include <algorithm>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/infer_ops.h"

namespace dsv3::cuda {

using namespace dev;

namespace {
constexpr int kThreads = 256, kTile = 32, kPad = 8;  // rows per staged cache tile; elements of padding per staged row

struct FusedArgs {
  const float* q;  // [M, ldq]: per head [q_nope dn | q_pe dr]
  int64_t ldq;
  const float* kv;  // [M, ldkv]: [c_kv kvr | k_pe dr]
  int64_t ldkv;
  const float* gamma;
  const int64_t* pos;
  const float* table;
  const int32_t* rows;   // pool row of each new token
  const int32_t* btab;   // [M, max_blocks]
  const void* wuk;       // W_UK_h = rows h·(dn+dv) .. +dn of kv_b, kvr wide
  const void* wuv_t;     // [H, kvr, dv]
  void* pool;
  void* out;  // [M, ldo]
  int64_t ldo;
  int H, dn, dr, dv, kvr, bs, max_blocks, max_len;
  float eps, scale;
  int splits, chunk;  // splits > 1: blocks (h, m, split) take rows [split·chunk, +chunk) and write partials
  float* part;        // [M, H, splits, kvr] unnormalised latent outputs
  float* ml;          // [M, H, splits, 2] running max and sum
};

// out[m, h·dv + v] = Σ_j ol[j] · W_UVᵀ[j][v] (ol, wuv_s in shared memory; part: kThreads floats of scratch). dv threads per
// part, `parts` of them split j; ends with the write.
template <class T>
__device__ __forceinline__ void uv_product(const float* ol, const T* wuv_s, int kvr, int dv, float* part, T* out) {
  const int t = threadIdx.x, parts = kThreads / dv, v = t % dv, pp = t / dv;
  if (pp < parts) {
    const int chunk = (kvr + parts - 1) / parts, j0 = pp * chunk, j1 = min(kvr, j0 + chunk);
    float a4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int j = j0;
    for (; j + 4 <= j1; j += 4) {
#pragma unroll
      for (int u = 0; u < 4; ++u) a4[u] = fmaf(ol[j + u], load_f32(wuv_s, int64_t(j + u) * dv + v), a4[u]);
    }
    for (; j < j1; ++j) a4[0] = fmaf(ol[j], load_f32(wuv_s, int64_t(j) * dv + v), a4[0]);
    part[pp * dv + v] = (a4[0] + a4[1]) + (a4[2] + a4[3]);
  }
  __syncthreads();
  if (t < dv) {
    float o = 0.0f;
    for (int q = 0; q < parts; ++q) o += part[q * dv + t];
    store(out + t, o);
  }
}

// Shared memory: the head's W_UK [dn][kvr] and W_UVᵀ [kvr][dv], two cache tiles [kTile][W + kPad] (all in T), then f32
// vectors.
template <class T>
size_t smem_bytes(int64_t dn, int64_t dr, int64_t dv, int64_t kvr) {
  const int64_t W = kvr + dr;
  return sizeof(T) * size_t(dn * kvr + kvr * dv + 2 * kTile * (W + kPad)) +
         sizeof(float) * size_t(2 * W + dn + 2 * kTile + kvr + kThreads + 32 + 4);
}

__device__ __forceinline__ float round_to(float v, const float*) { return v; }
__device__ __forceinline__ float round_to(float v, const uint16_t*) { return bf16_to_f32(f32_to_bf16(v)); }
__device__ __forceinline__ float2 load2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ float2 load2(const uint16_t* p) {
  const uint32_t u = *reinterpret_cast<const uint32_t*>(p);
  return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}
// n T values from global to shared memory, 16 bytes per cp.async (n·sizeof(T) a multiple of 16, both 16-byte aligned).
template <class T>
__device__ __forceinline__ void stage(T* dst, const T* src, int64_t n) {
  constexpr int per = 16 / sizeof(T);
  for (int64_t c = threadIdx.x; c < n / per; c += kThreads) cp_async16(dst + c * per, src + c * per, true);
}

template <class T>
__global__ void __launch_bounds__(kThreads, 1) k_mla_decode_fused(FusedArgs a) {
  extern __shared__ __align__(16) unsigned char smraw[];
  const int W = a.kvr + a.dr, half = a.dr / 2, hd = a.dn + a.dv, KS = W + kPad;
  T* wuk_s = reinterpret_cast<T*>(smraw);        // [dn][kvr]
  T* wuv_s = wuk_s + a.dn * a.kvr;                // [kvr][dv]
  T* kt = wuv_s + a.kvr * a.dv;                   // [2][kTile][KS]
  float* qv = reinterpret_cast<float*>(kt + 2 * kTile * KS);  // [W] the absorbed query
  float* cur = qv + W;                            // [W] the new token's cache row
  float* qn = cur + W;                            // [dn]
  float* sct = qn + a.dn;                         // [kTile] scores of a tile
  float* ps = sct + kTile;                        // [kTile] their probabilities
  float* ol = ps + kTile;                         // [kvr] the latent output
  float* part = ol + a.kvr;                       // [kThreads] W_UV partial sums
  float* red = part + kThreads;                   // [32]
  float* run = red + 32;                          // running max, sum, last rescale factor
  const int h = blockIdx.x, m = blockIdx.y, split = blockIdx.z, t = threadIdx.x, lane = t & 31, warp = t >> 5;
  T* pool = static_cast<T*>(a.pool);

  // Before the wait, what does not depend on the kernel before: the head's weights, the step's metadata (written by
  // host copies ahead of the step) and the first tile of cache rows < p (written by earlier steps).
  stage(wuk_s, static_cast<const T*>(a.wuk) + int64_t(h) * hd * a.kvr, int64_t(a.dn) * a.kvr);
  if (a.splits == 1) stage(wuv_s, static_cast<const T*>(a.wuv_t) + int64_t(h) * a.kvr * a.dv, int64_t(a.kvr) * a.dv);
  cp_async_commit();
  // The caller sizes max_len past every position; the clamp only keeps a bad position inside the block table.
  const int64_t p = min(a.pos[m], int64_t(a.max_len - 1));
  const int32_t* bt = a.btab + int64_t(m) * a.max_blocks;
  // This block's rows [r0, r1) of 0..p (all of them without splits); chunk is a multiple of kTile.
  const int64_t r0 = int64_t(split) * a.chunk, r1 = min(p + 1, r0 + a.chunk);
  const int ntiles = r1 > r0 ? int((r1 - r0 + kTile - 1) / kTile) : 0;
  constexpr int per = 16 / sizeof(T);
  const int cpr = W / per;  // 16-byte chunks per row
  auto load_tile = [&](int i) {
    T* dst = kt + (i & 1) * kTile * KS;
    const int64_t j0 = r0 + int64_t(i) * kTile;
    for (int c = t; c < kTile * cpr; c += kThreads) {
      const int j = c / cpr, ch = c % cpr;
      const int64_t row = j0 + j;
      // Row p is this step's, stored from `cur` (a zero-fill in flight there would race with that store); rows past p are
      // zero-filled (their probability is 0, and 0 · stale NaN would not be).
      if (row == p) continue;
      const bool valid = row < p && row < r1;
      const T* src = valid ? pool + (int64_t(bt[row / a.bs]) * a.bs + row % a.bs) * W + ch * per : pool;
      cp_async16(dst + j * KS + ch * per, src, valid);
    }
    cp_async_commit();
  };
  load_tile(0);  // (an empty block zero-fills its buffer: harmless)
  grid_dependency_wait();
  grid_dependents_launch();
  if (ntiles == 0) {  // a split past the sequence's end: an empty partial
    cp_async_wait<0>();
    const int64_t o = (int64_t(m) * a.H + h) * a.splits + split;
    for (int j = t; j < a.kvr; j += kThreads) a.part[o * a.kvr + j] = 0.0f;
    if (t == 0) a.ml[2 * o] = -INFINITY, a.ml[2 * o + 1] = 0.0f;
    return;
  }

  const float2* cs = reinterpret_cast<const float2*>(a.table) + a.pos[m] * half;
  const float* qm = a.q + m * a.ldq + int64_t(h) * (a.dn + a.dr);
  const float* kvm = a.kv + m * a.ldkv;
  for (int i = t; i < a.dn; i += kThreads) qn[i] = qm[i];
  for (int i = t; i < half; i += kThreads) {
    const float2 c = cs[i];
    const float x = qm[a.dn + 2 * i], y = qm[a.dn + 2 * i + 1];
    qv[a.kvr + 2 * i] = x * c.x - y * c.y;
    qv[a.kvr + 2 * i + 1] = y * c.x + x * c.y;
    const float u = kvm[a.kvr + 2 * i], v = kvm[a.kvr + 2 * i + 1];
    cur[a.kvr + 2 * i] = round_to(u * c.x - v * c.y, static_cast<const T*>(nullptr));
    cur[a.kvr + 2 * i + 1] = round_to(v * c.x + u * c.y, static_cast<const T*>(nullptr));
  }
  float ss = 0.0f;
  for (int j = t; j < a.kvr; j += kThreads) ss += kvm[j] * kvm[j];
  ss = block_sum(ss, red);
  const float r = 1.0f / sqrtf(ss / float(a.kvr) + a.eps);
  for (int j = t; j < a.kvr; j += kThreads) cur[j] = round_to(a.gamma[j] * (kvm[j] * r), static_cast<const T*>(nullptr));
  if (t == 0) run[0] = -INFINITY, run[1] = 0.0f;
  cp_async_wait<1>();  // the weights (the first tile may still be in flight)
  __syncthreads();
  // q_lat[j] = Σ_d q_nope[d] · W_UK[d][j].
  for (int j = t; j < a.kvr; j += kThreads) {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int d = 0;
    for (; d + 4 <= a.dn; d += 4) {
#pragma unroll
      for (int u = 0; u < 4; ++u) acc[u] = fmaf(qn[d + u], load_f32(wuk_s, int64_t(d + u) * a.kvr + j), acc[u]);
    }
    for (; d < a.dn; ++d) acc[0] = fmaf(qn[d], load_f32(wuk_s, int64_t(d) * a.kvr + j), acc[0]);
    qv[j] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }
  if (h == 0 && split == 0)
    for (int j = t; j < W; j += kThreads) store(pool + int64_t(a.rows[m]) * W + j, cur[j]);

  // Online softmax over the tiles; thread t owns latent columns t and t + 256 of the output.
  float acc[2] = {0.0f, 0.0f};
  const int rr = t >> 3, pr = t & 7;  // scores: row rr of the tile, pair slice pr
  for (int i = 0; i < ntiles; ++i) {
    T* tile = kt + (i & 1) * kTile * KS;
    const int64_t j0 = r0 + int64_t(i) * kTile;
    cp_async_wait<0>();
    if (p >= j0 && p < j0 + kTile)
      for (int d = t; d < W; d += kThreads) store(tile + (p - j0) * KS + d, cur[d]);
    __syncthreads();  // tile i (and q_lat) visible; every thread is done with the other buffer
    if (i + 1 < ntiles) load_tile(i + 1);
    {
      const T* kr = tile + rr * KS;
      float s = 0.0f;
      for (int q2 = pr; q2 < W / 2; q2 += 8) {
        const float2 k2 = load2(kr + 2 * q2), x2 = *reinterpret_cast<const float2*>(qv + 2 * q2);
        s = fmaf(x2.x, k2.x, fmaf(x2.y, k2.y, s));
      }
      s += __shfl_xor_sync(0xffffffffu, s, 4);
      s += __shfl_xor_sync(0xffffffffu, s, 2);
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      if (pr == 0) sct[rr] = j0 + rr < r1 ? s * a.scale : -INFINITY;
    }
    __syncthreads();
    if (warp == 0) {
      const float sv = sct[lane], m_old = run[0];
      const float m_new = fmaxf(m_old, warp_max(sv));  // finite: row j0 < r1 is in every tile
      const float pj = sv == -INFINITY ? 0.0f : expf(sv - m_new);
      ps[lane] = pj;
      const float sum = warp_sum(pj);
      if (lane == 0) {
        const float alpha = expf(m_old - m_new);  // 0 on the first tile
        run[0] = m_new;
        run[1] = run[1] * alpha + sum;
        run[2] = alpha;
      }
    }
    __syncthreads();
    const float alpha = run[2];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int c = t + kThreads * u;
      if (c < a.kvr) {
        float o = acc[u] * alpha;
        for (int j = 0; j < kTile; ++j) o = fmaf(ps[j], load_f32(tile, int64_t(j) * KS + c), o);
        acc[u] = o;
      }
    }
  }
  if (a.splits > 1) {  // the partial of this split; k_mla_merge_uv merges and applies W_UV
    const int64_t o = (int64_t(m) * a.H + h) * a.splits + split;
#pragma unroll
    for (int u = 0; u < 2; ++u)
      if (t + kThreads * u < a.kvr) a.part[o * a.kvr + t + kThreads * u] = acc[u];
    if (t == 0) a.ml[2 * o] = run[0], a.ml[2 * o + 1] = run[1];
    return;
  }
  const float inv = 1.0f / run[1];
#pragma unroll
  for (int u = 0; u < 2; ++u)
    if (t + kThreads * u < a.kvr) ol[t + kThreads * u] = acc[u] * inv;
  __syncthreads();
  uv_product(ol, wuv_s, a.kvr, a.dv, part, static_cast<T*>(a.out) + m * a.ldo + int64_t(h) * a.dv);
}

// The splits of one (token, head) merged (weights exp(m_s - max) / Σ exp(m_s - max) l_s), then ·W_UVᵀ.
template <class T>
__global__ void __launch_bounds__(kThreads) k_mla_merge_uv(FusedArgs a) {
  extern __shared__ __align__(16) unsigned char smraw[];
  T* wuv_s = reinterpret_cast<T*>(smraw);                          // [kvr][dv]
  float* ol = reinterpret_cast<float*>(wuv_s + a.kvr * a.dv);      // [kvr]
  float* part = ol + a.kvr;                                        // [kThreads]
  float* wsp = part + kThreads;                                    // [splits]
  const int h = blockIdx.x, m = blockIdx.y, t = threadIdx.x;
  stage(wuv_s, static_cast<const T*>(a.wuv_t) + int64_t(h) * a.kvr * a.dv, int64_t(a.kvr) * a.dv);
  cp_async_commit();
  grid_dependency_wait();
  grid_dependents_launch();
  const int64_t o = (int64_t(m) * a.H + h) * a.splits;
  const float* ml = a.ml + 2 * o;
  float mx = -INFINITY;
  for (int sp = 0; sp < a.splits; ++sp) mx = fmaxf(mx, ml[2 * sp]);  // split 0 always holds row 0: finite
  float L = 0.0f;
  for (int sp = 0; sp < a.splits; ++sp) {
    const float f = ml[2 * sp] > -INFINITY ? expf(ml[2 * sp] - mx) : 0.0f;
    L += f * ml[2 * sp + 1];
    if (t == 0) wsp[sp] = f;
  }
  __syncthreads();
  const float inv = 1.0f / L;
  for (int j = t; j < a.kvr; j += kThreads) {
    float v = 0.0f;
    for (int sp = 0; sp < a.splits; ++sp) v = fmaf(wsp[sp], a.part[(o + sp) * a.kvr + j], v);
    ol[j] = v * inv;
  }
  cp_async_wait<0>();
  __syncthreads();
  uv_product(ol, wuv_s, a.kvr, a.dv, part, static_cast<T*>(a.out) + m * a.ldo + int64_t(h) * a.dv);
}

constexpr size_t kMaxSmem = 227 * 1024;  // Hopper's opt-in shared memory per block
constexpr int64_t kMaxSplits = 1024;
size_t fused_smem(const MlaDecodeShape& s, DType act) {
  return act == DType::F32 ? smem_bytes<float>(s.dn, s.dr, s.dv, s.kvr) : smem_bytes<uint16_t>(s.dn, s.dr, s.dv, s.kvr);
}
size_t merge_smem(const MlaDecodeShape& s, DType act) {
  return dtype_size(act) * size_t(s.kvr * s.dv) + sizeof(float) * size_t(s.kvr + kThreads + s.splits);
}
int64_t chunk_rows(const MlaDecodeShape& s) { return round_up(ceil_div(s.max_len, s.splits), int64_t(kTile)); }
}  // namespace

bool mla_decode_fused_supported(const MlaDecodeShape& s, DType act) {
  return (act == DType::F32 || act == DType::BF16) && s.kvr % 8 == 0 && s.kvr <= 2 * kThreads && (s.kvr + s.dr) % 16 == 0 &&
         s.dr % 2 == 0 && s.dr > 0 && s.dv > 0 && s.dv <= kThreads && s.dn > 0 && s.H > 0 && s.H <= 65535 && s.max_len > 0 &&
         s.block_size > 0 && s.splits >= 1 && s.splits <= kMaxSplits && fused_smem(s, act) <= kMaxSmem &&
         merge_smem(s, act) <= kMaxSmem;
}

size_t mla_decode_fused_workspace_bytes(const MlaDecodeShape& s, int64_t M) {
  return s.splits > 1 ? sizeof(float) * size_t(M * s.H * s.splits * (s.kvr + 2)) : 0;
}

void mla_decode_fused(const MlaDecodeShape& s, const float* q, int64_t ldq, const float* kv, int64_t ldkv, const float* gamma,
                      float eps, const int64_t* pos, const float* table, const int32_t* rows, const int32_t* block_table,
                      DType act, const void* wuk, const void* wuv_t, void* pool, void* out, int64_t ldo, int64_t M, cudaStream_t st,
                      void* workspace, size_t workspace_bytes) {
  DSV3_CHECK(mla_decode_fused_supported(s, act),
             "mla_decode_fused: H {} dn {} dr {} dv {} kvr {} max_len {} splits {} in {} unsupported", s.H, s.dn, s.dr, s.dv, s.kvr,
             s.max_len, s.splits, dtype_name(act));
  DSV3_CHECK(M <= 65535, "mla_decode_fused: {} tokens are too many", M);
  const size_t need = mla_decode_fused_workspace_bytes(s, M);
  DSV3_CHECK(workspace_bytes >= need && (need == 0 || workspace), "mla_decode_fused: workspace of {} bytes, {} needed", workspace_bytes,
             need);
  if (M <= 0) return;
  float* part = static_cast<float*>(workspace);
  FusedArgs a{q, ldq, kv, ldkv, gamma, pos, table, rows, block_table, wuk, wuv_t, pool, out, ldo, int(s.H), int(s.dn), int(s.dr),
              int(s.dv), int(s.kvr), int(s.block_size), int(s.max_blocks), int(s.max_len), eps, s.scale, int(s.splits),
              int(chunk_rows(s)), part, part ? part + M * s.H * s.splits * s.kvr : nullptr};
  const size_t smem = fused_smem(s, act), msmem = merge_smem(s, act);
  // The f32 or bf16 instance of a kernel, with its shared memory opted in beyond 48 KiB.
  auto launch = [&](auto* f32_kernel, auto* bf16_kernel, dim3 grid, size_t smem, const char* what) {
    auto run = [&](auto* k) {
      if (smem > 48 * 1024)
        DSV3_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(k), cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      launch_dependent(k, grid, dim3(kThreads), smem, st, a);
    };
    if (act == DType::F32) run(f32_kernel);
    else run(bf16_kernel);
    DSV3_CUDA_CHECK_LAUNCH(what);
  };
  launch(&k_mla_decode_fused<float>, &k_mla_decode_fused<uint16_t>, dim3(unsigned(s.H), unsigned(M), unsigned(s.splits)),
         fused_smem(s, act), "mla_decode_fused kernel");
  if (s.splits > 1)
    launch(&k_mla_merge_uv<float>, &k_mla_merge_uv<uint16_t>, dim3(unsigned(s.H), unsigned(M)), merge_smem(s, act),
           "mla_decode_fused merge kernel");
}

}  // namespace dsv3::cuda
