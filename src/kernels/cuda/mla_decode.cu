// The absorbed-MLA decode of one new token per sequence as one kernel (see infer_ops.h, mla_decode_fused).
//
// Why: at batch 1 and short contexts a decode layer's attention was five dependent launches (prologue, q_nope·W_UK,
// split attention, split merge, ·W_UVᵀ), each a few µs of latency for kilobytes of work. One block per
// (token, head) does all of it: the head's W_UK and W_UV do not depend on the kernel before, so they are
// prefetched into L2 before griddepcontrol.wait; the block recomputes the new token's latent row itself (every
// head needs it; the head-0 block also appends it to the cache), so no block waits on another.
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
constexpr int kThreads = 256;

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
};

// 8 consecutive values of a cache row (bf16 or f32) as f32.
__device__ __forceinline__ void load8(const uint16_t* p, float (&v)[8]) {
  Raw<uint16_t> r;
  fetch(p, 0, r);
  unpack(r, 1.0f, v);
}
__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p)), b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}
__device__ __forceinline__ float round_to(float v, const float*) { return v; }
__device__ __forceinline__ float round_to(float v, const uint16_t*) { return bf16_to_f32(f32_to_bf16(v)); }

template <class T>
__global__ void __launch_bounds__(kThreads) k_mla_decode_fused(FusedArgs a) {
  extern __shared__ __align__(16) float sm[];
  const int W = a.kvr + a.dr, half = a.dr / 2, hd = a.dn + a.dv;
  float* qv = sm;            // [W] the absorbed query
  float* cur = qv + W;       // [W] the new token's cache row
  float* qn = cur + W;       // [dn]
  float* red = qn + a.dn;    // [32]
  float* part = red + 32;    // [groups][kvr], then the latent output [kvr] and the W_UV partials
  float* sc = part + (kThreads / (a.kvr / 8)) * a.kvr;  // [p + 1] scores, then probabilities
  const int h = blockIdx.x, m = blockIdx.y, t = threadIdx.x;
  const T* wuk = static_cast<const T*>(a.wuk) + int64_t(h) * hd * a.kvr;
  const T* wuv = static_cast<const T*>(a.wuv_t) + int64_t(h) * a.kvr * a.dv;
  {  // The head's weights into L2 while the kernel before finishes (they do not depend on it).
    const int64_t lines_uk = (int64_t(a.dn) * a.kvr * sizeof(T) + 127) / 128, lines_uv = (int64_t(a.kvr) * a.dv * sizeof(T) + 127) / 128;
    for (int64_t i = t; i < lines_uk; i += kThreads) prefetch_l2(reinterpret_cast<const char*>(wuk) + i * 128);
    for (int64_t i = t; i < lines_uv; i += kThreads) prefetch_l2(reinterpret_cast<const char*>(wuv) + i * 128);
  }
  grid_dependency_wait();
  grid_dependents_launch();
  // The caller sizes max_len past every position; the clamp only keeps a bad position inside the scores buffer.
  const int64_t p = min(a.pos[m], int64_t(a.max_len - 1));
  const float2* cs = reinterpret_cast<const float2*>(a.table) + p * half;
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
  ss = block_sum(ss, red);  // its barriers also publish qn
  const float r = 1.0f / sqrtf(ss / float(a.kvr) + a.eps);
  for (int j = t; j < a.kvr; j += kThreads) {
    cur[j] = round_to(a.gamma[j] * (kvm[j] * r), static_cast<const T*>(nullptr));
    // q_lat[j] = Σ_d q_nope[d] · W_UK[d][j]: lanes take consecutive j (coalesced rows of W_UK).
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int d = 0;
    for (; d + 4 <= a.dn; d += 4) {
#pragma unroll
      for (int u = 0; u < 4; ++u) acc[u] = fmaf(qn[d + u], load_f32(wuk, int64_t(d + u) * a.kvr + j), acc[u]);
    }
    for (; d < a.dn; ++d) acc[0] = fmaf(qn[d], load_f32(wuk, int64_t(d) * a.kvr + j), acc[0]);
    qv[j] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  }
  __syncthreads();
  T* pool = static_cast<T*>(a.pool);
  if (h == 0)
    for (int j = t; j < W; j += kThreads) store(pool + int64_t(a.rows[m]) * W + j, cur[j]);
  const int32_t* bt = a.btab + int64_t(m) * a.max_blocks;
  auto row_ptr = [&](int64_t j) -> const T* {
    return pool + (int64_t(bt[j / a.bs]) * a.bs + j % a.bs) * W;
  };
  // Scores: one row per thread, 8 values per load, 4 independent partial sums.
  float mx = -INFINITY;
  for (int64_t j = t; j <= p; j += kThreads) {
    float s4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const T* kr = j == p ? nullptr : row_ptr(j);
    for (int d = 0; d < W; d += 8) {
      float v[8];
      if (kr) {
        load8(kr + d, v);
      } else {
#pragma unroll
        for (int u = 0; u < 8; ++u) v[u] = cur[d + u];
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) s4[u & 3] = fmaf(qv[d + u], v[u], s4[u & 3]);
    }
    const float s = ((s4[0] + s4[1]) + (s4[2] + s4[3])) * a.scale;
    sc[j] = s;
    mx = fmaxf(mx, s);
  }
  mx = block_max(mx, red);
  float l = 0.0f;
  for (int64_t j = t; j <= p; j += kThreads) {
    const float e = expf(sc[j] - mx);
    sc[j] = e;
    l += e;
  }
  l = block_sum(l, red);  // its barriers also publish sc
  // o = Σ_j p_j K_j[:kvr]: CT threads cover the kvr columns 8 at a time, `groups` of them split the rows.
  const int ct = a.kvr / 8, groups = kThreads / ct, c8 = t % ct, g = t / ct;
  if (g < groups) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t j = g; j <= p; j += groups) {
      const float pj = sc[j];
      float v[8];
      if (j == p) {
#pragma unroll
        for (int u = 0; u < 8; ++u) v[u] = cur[8 * c8 + u];
      } else {
        load8(row_ptr(j) + 8 * c8, v);
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) acc[u] = fmaf(pj, v[u], acc[u]);
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) part[g * a.kvr + 8 * c8 + u] = acc[u];
  }
  __syncthreads();
  float* ol = sc;  // the probabilities are no longer needed
  const float inv = 1.0f / l;
  for (int j = t; j < a.kvr; j += kThreads) {
    float o = 0.0f;
    for (int q = 0; q < groups; ++q) o += part[q * a.kvr + j];
    ol[j] = o * inv;
  }
  __syncthreads();
  // out[v] = Σ_j o[j] · W_UVᵀ[j][v]: dv threads per part, `parts` of them split j.
  const int parts = kThreads / a.dv, v = t % a.dv, pp = t / a.dv;
  float acc = 0.0f;
  if (pp < parts) {
    const int chunk = (a.kvr + parts - 1) / parts, j0 = pp * chunk, j1 = min(a.kvr, j0 + chunk);
    float a4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int j = j0;
    for (; j + 4 <= j1; j += 4) {
#pragma unroll
      for (int u = 0; u < 4; ++u) a4[u] = fmaf(ol[j + u], load_f32(wuv, int64_t(j + u) * a.dv + v), a4[u]);
    }
    for (; j < j1; ++j) a4[0] = fmaf(ol[j], load_f32(wuv, int64_t(j) * a.dv + v), a4[0]);
    acc = (a4[0] + a4[1]) + (a4[2] + a4[3]);
    part[pp * a.dv + v] = acc;
  }
  __syncthreads();
  if (t < a.dv) {
    float o = 0.0f;
    for (int q = 0; q < parts; ++q) o += part[q * a.dv + t];
    store(static_cast<T*>(a.out) + m * a.ldo + int64_t(h) * a.dv + t, o);
  }
}

size_t fused_smem(const MlaDecodeShape& s) {
  const int64_t W = s.kvr + s.dr, groups = kThreads / (s.kvr / 8);
  return sizeof(float) * size_t(2 * W + s.dn + 32 + groups * s.kvr + std::max<int64_t>(s.max_len, s.kvr));
}
}  // namespace

bool mla_decode_fused_supported(const MlaDecodeShape& s) {
  return s.kvr % 8 == 0 && s.kvr / 8 <= kThreads && s.dr % 8 == 0 && s.dr > 0 && s.dv > 0 && s.dv <= kThreads && s.dn > 0 &&
         s.H > 0 && s.H <= 65535 && s.max_len > 0 && s.block_size > 0 && fused_smem(s) <= 200 * 1024;
}

void mla_decode_fused(const MlaDecodeShape& s, const float* q, int64_t ldq, const float* kv, int64_t ldkv, const float* gamma,
                      float eps, const int64_t* pos, const float* table, const int32_t* rows, const int32_t* block_table,
                      DType act, const void* wuk, const void* wuv_t, void* pool, void* out, int64_t ldo, int64_t M, cudaStream_t st) {
  DSV3_CHECK(act == DType::F32 || act == DType::BF16, "mla_decode_fused: dtype {} (F32 or BF16)", dtype_name(act));
  DSV3_CHECK(mla_decode_fused_supported(s), "mla_decode_fused: H {} dn {} dr {} dv {} kvr {} max_len {} unsupported", s.H, s.dn, s.dr,
             s.dv, s.kvr, s.max_len);
  DSV3_CHECK(M <= 65535, "mla_decode_fused: {} tokens are too many", M);
  if (M <= 0) return;
  FusedArgs a{q, ldq, kv, ldkv, gamma, pos, table, rows, block_table, wuk, wuv_t, pool, out, ldo, int(s.H), int(s.dn), int(s.dr),
              int(s.dv), int(s.kvr), int(s.block_size), int(s.max_blocks), int(s.max_len), eps, s.scale};
  const size_t smem = fused_smem(s);
  const dim3 grid(unsigned(s.H), unsigned(M));
  auto set = [&](const void* f) {
    if (smem > 48 * 1024) DSV3_CUDA_CHECK(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  };
  if (act == DType::F32) {
    set(reinterpret_cast<const void*>(&k_mla_decode_fused<float>));
    launch_dependent(k_mla_decode_fused<float>, grid, dim3(kThreads), smem, st, a);
  } else {
    set(reinterpret_cast<const void*>(&k_mla_decode_fused<uint16_t>));
    launch_dependent(k_mla_decode_fused<uint16_t>, grid, dim3(kThreads), smem, st, a);
  }
  DSV3_CUDA_CHECK_LAUNCH("mla_decode_fused kernel");
}

}  // namespace dsv3::cuda
