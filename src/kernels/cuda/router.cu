// DeepSeek-V3 router on the GPU: one warp per token, semantics exactly as ops::moe_route (src/kernels/cpu); and the
// decode-step router that computes the gate logits and routes in one launch.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/route_warp.cuh"

namespace dsv3::cuda {

namespace {
using namespace dev;

constexpr int kRouteWarps = 8;
size_t route_smem(int E, int G) { return sizeof(float) * size_t(kRouteWarps) * size_t(2 * E + G); }

// moe_route: one warp per token.
__global__ void __launch_bounds__(kRouteWarps * 32) k_route(const float* __restrict__ logits, int64_t ld, int64_t M, int E,
                                                           const float* __restrict__ bias, RouterConfig p, int32_t* __restrict__ idx,
                                                           float* __restrict__ w) {
  dependent_kernel_begin();
  extern __shared__ float sm[];
  const int warp = threadIdx.x >> 5;
  const int64_t m = int64_t(blockIdx.x) * kRouteWarps + warp;
  if (m >= M) return;
  float* s = sm + warp * (2 * E + p.n_group);
  route_warp(logits + m * ld, E, bias, p, s, s + E, s + 2 * E, idx + m * p.top_k, w + m * p.top_k);
}

// A lane's 8 float4 of one 1024-value piece of a row (zeros past D4 float4s), all loads issued before any use.
__device__ __forceinline__ void load_piece(const float4* __restrict__ row, int p0, int D4, int lane, float4 (&v)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int d4 = p0 + i * 32 + lane;
    v[i] = d4 < D4 ? __ldg(row + d4) : make_float4(0.f, 0.f, 0.f, 0.f);
  }
}

// moe_gate_route: warp (block b, warp v) computes the logits of expert b·8 + v for every token (f32 dot products,
// float4 loads, 8 tokens per pass over the expert's row); the last block to finish routes the tokens.
__global__ void __launch_bounds__(kRouteWarps * 32) k_gate_route(const float* __restrict__ x, int64_t ldx, int M,
                                                                const float* __restrict__ gate, int D, int E,
                                                                const float* __restrict__ bias, RouterConfig p,
                                                                float* __restrict__ logits, unsigned* __restrict__ counter,
                                                                int32_t* __restrict__ idx, float* __restrict__ w) {
  extern __shared__ float sm[];
  __shared__ bool last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int e = blockIdx.x * kRouteWarps + warp;
  if (e < E)  // the gate row into L2 while the kernel before ends (it does not depend on it)
    for (int64_t b = int64_t(lane) * 128; b < int64_t(D) * 4; b += 32 * 128)
      prefetch_l2(reinterpret_cast<const char*>(gate + int64_t(e) * D) + b);
  grid_dependency_wait();
  grid_dependents_launch();
  if (e < E) {
    // The row in pieces of 1024 values: each lane issues its 8 float4 loads of gate and x before any math (one
    // round trip per piece, not one per float4).
    const float4* g4 = reinterpret_cast<const float4*>(gate + int64_t(e) * D);
    const int D4 = D / 4;
    for (int m0 = 0; m0 < M; m0 += 8) {
      const int nt = min(8, M - m0);
      float acc[8];
#pragma unroll
      for (int t = 0; t < 8; ++t) acc[t] = 0.0f;
      for (int p0 = 0; p0 < D4; p0 += 256) {
        float4 g[8];
        load_piece(g4, p0, D4, lane, g);
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          if (t < nt) {
            const float4* x4 = reinterpret_cast<const float4*>(x + int64_t(m0 + t) * ldx);
            float4 v[8];
            load_piece(x4, p0, D4, lane, v);
#pragma unroll
            for (int i = 0; i < 8; ++i)
              acc[t] = fmaf(g[i].x, v[i].x, fmaf(g[i].y, v[i].y, fmaf(g[i].z, v[i].z, fmaf(g[i].w, v[i].w, acc[t]))));
          }
        }
      }
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        const float v = warp_sum(acc[t]);
        if (t < nt && lane == 0) logits[int64_t(m0 + t) * E + e] = v;
      }
    }
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (threadIdx.x == 0) *counter = 0u;  // ready for the next launch (the stream orders it after this one)
  float* s = sm + warp * (2 * E + p.n_group);
  for (int m = warp; m < M; m += kRouteWarps)
    route_warp(logits + int64_t(m) * E, E, bias, p, s, s + E, s + 2 * E, idx + int64_t(m) * p.top_k, w + int64_t(m) * p.top_k);
}

// moe_route_block: one block per token; logits and bias staged in shared memory, then route_block.
__global__ void __launch_bounds__(256) k_route_block(const float* __restrict__ logits, int64_t ld, int E, const float* __restrict__ bias,
                                                     RouterConfig p, int32_t* __restrict__ idx, float* __restrict__ w) {
  dependent_kernel_begin();
  extern __shared__ float sm[];
  const int E4 = (E + 3) / 4 * 4;  // route_block reads c in 16-byte pieces
  float* lg = sm;                  // [E]
  float* bs = lg + E4;             // [E]
  float* sc = bs + E4;             // s, c: 2·E4, gs: n_group
  __shared__ int32_t ci[kRouteMaxK];
  __shared__ float cw[kRouteMaxK];
  const int64_t m = blockIdx.x;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    lg[e] = logits[m * ld + e];
    if (bias) bs[e] = bias[e];
  }
  __syncthreads();
  route_block(lg, E, bias ? bs : nullptr, p, sc, sc + E4, sc + 2 * E4, ci, cw);
  for (int i = threadIdx.x; i < p.top_k; i += blockDim.x) {
    idx[m * p.top_k + i] = ci[i];
    w[m * p.top_k + i] = cw[i];
  }
}

// router_logits: y[m, e] = x[m, :] · w[e, :] in f32 for prefill-sized M. A block per (32 tokens, 64 experts) of 512
// threads in four k groups, each a quarter of K in 16-wide tiles (cp.async, double-buffered, rows as they are in
// memory); a thread owns 4 tokens x 4 experts (experts te + 16 j: the float4 reads of a warp spread over the banks),
// and the four groups' partial sums are added in group order (deterministic). 16 warps an SM: the first version (one
// 128-thread block an SM, synchronous transposing loads) ran 9x slower than cuBLAS's f32 GEMM.
constexpr int RL_M = 32, RL_E = 64, RL_K = 16, RL_G = 4, RL_P = RL_K + 4, RL_T = 128 * RL_G;
constexpr int RL_STAGE = (RL_M + RL_E) * RL_P;  // floats of one group's stage
constexpr size_t router_logits_smem() { return size_t(2 * RL_G * RL_STAGE) * 4; }
__global__ void __launch_bounds__(RL_T) k_router_logits(const float* __restrict__ x, int64_t ldx, int M, const float* __restrict__ w, int E,
                                                        int K, float* __restrict__ y, int64_t ldy) {
  extern __shared__ __align__(16) float rl_sm[];
  grid_dependency_wait();
  grid_dependents_launch();
  const int t = threadIdx.x, kg = t >> 7, u = t & 127, tr = u >> 4, te = u & 15;
  const int m0 = blockIdx.x * RL_M, e0 = blockIdx.y * RL_E;
  // Every group runs the same tiles (the loop's barriers are the block's); past its range a tile is zeros.
  const int kq = (K / RL_G + RL_K - 1) / RL_K * RL_K, kb = kg * kq, ke = min(K, kb + kq), nt = kq / RL_K;
  float* const gs = rl_sm + kg * 2 * RL_STAGE;
  auto load = [&](int it, int st) {  // tile it of this group into stage st: 32 x rows then 64 w rows, 4 float4 a row
    float* xs = gs + st * RL_STAGE;
    const int k0 = kb + it * RL_K;
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      const int c = u + 128 * i, r = c >> 2, q = (c & 3) * 4, k = k0 + q;
      if (r < RL_M) {
        const int m = m0 + r;
        const bool ok = m < M && k < ke;
        cp_async16(xs + r * RL_P + q, ok ? x + int64_t(m) * ldx + k : x, ok);
      } else {
        const int e = e0 + r - RL_M;
        const bool ok = e < E && k < ke;
        cp_async16(xs + r * RL_P + q, ok ? w + int64_t(e) * K + k : w, ok);
      }
    }
    cp_async_commit();
  };
  float acc[4][4] = {};
  if (nt > 0) load(0, 0);
  for (int it = 0; it < nt; ++it) {
    if (it + 1 < nt) {
      load(it + 1, (it + 1) & 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const float* xs = gs + (it & 1) * RL_STAGE;
    const float* ws = xs + RL_M * RL_P;
#pragma unroll
    for (int kk = 0; kk < RL_K; kk += 4) {
      float4 a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = *reinterpret_cast<const float4*>(xs + (4 * tr + i) * RL_P + kk);
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = *reinterpret_cast<const float4*>(ws + (te + 16 * j) * RL_P + kk);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          acc[i][j] = fmaf(a[i].x, b[j].x, acc[i][j]);
          acc[i][j] = fmaf(a[i].y, b[j].y, acc[i][j]);
          acc[i][j] = fmaf(a[i].z, b[j].z, acc[i][j]);
          acc[i][j] = fmaf(a[i].w, b[j].w, acc[i][j]);
        }
    }
    __syncthreads();  // every group's threads are done with this stage before it is refilled
  }
  // The groups' partial sums: groups 1-3 park theirs, group 0 adds them in order and stores.
  float* red = rl_sm;  // [3][32][64] (the stages are free: the loop ended on a barrier)
  __syncthreads();
  if (kg > 0)
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) red[((kg - 1) * RL_M + 4 * tr + i) * RL_E + te + 16 * j] = acc[i][j];
  __syncthreads();
  if (kg == 0)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = m0 + 4 * tr + i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float v = acc[i][j];
#pragma unroll
        for (int g = 0; g < RL_G - 1; ++g) v += red[(g * RL_M + 4 * tr + i) * RL_E + te + 16 * j];
        const int e = e0 + te + 16 * j;
        if (m < M && e < E) y[int64_t(m) * ldy + e] = v;
      }
    }
}

void check_router(int64_t E, const RouterConfig& p, const char* what) {
  DSV3_CHECK(p.n_group >= 1 && E % p.n_group == 0 && p.topk_group >= 1 && p.topk_group <= p.n_group && p.top_k >= 1 &&
                 p.top_k <= p.topk_group * (E / p.n_group),
             "{}: invalid router parameters", what);
  DSV3_CHECK(E <= kRouteMaxE && p.n_group <= kRouteMaxG && p.top_k <= kRouteMaxK, "{}: E {} / n_group {} / top_k {} beyond the kernel's limits", what,
             E, p.n_group, p.top_k);
}
void set_route_smem(const void* f, size_t bytes) {
  if (bytes > 48 * 1024) DSV3_CUDA_CHECK(cudaFuncSetAttribute(f, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}
}  // namespace

void moe_route(const float* logits, int64_t ld, int64_t M, int64_t E, const float* bias, const RouterConfig& p, int32_t* idx,
               float* w, cudaStream_t stream) {
  check_router(E, p, "moe_route");
  if (M <= 0) return;
  const size_t smem = route_smem(int(E), p.n_group);
  set_route_smem(reinterpret_cast<const void*>(&k_route), smem);
  launch_dependent(k_route, dim3(unsigned(ceil_div(M, kRouteWarps))), dim3(kRouteWarps * 32), smem, stream, logits, ld, M, int(E),
                   bias, p, idx, w);
  DSV3_CUDA_CHECK_LAUNCH("moe_route kernel");
}

void moe_route_block(const float* logits, int64_t ld, int64_t M, int64_t E, const float* bias, const RouterConfig& p, int32_t* idx,
                     float* w, cudaStream_t stream) {
  check_router(E, p, "moe_route_block");
  if (M <= 0) return;
  const size_t smem = sizeof(float) * size_t(4 * ((E + 3) / 4 * 4) + p.n_group);
  set_route_smem(reinterpret_cast<const void*>(&k_route_block), smem);
  launch_dependent(k_route_block, dim3(unsigned(M)), dim3(256), smem, stream, logits, ld, int(E), bias, p, idx, w);
  DSV3_CUDA_CHECK_LAUNCH("moe_route_block kernel");
}

void moe_gate_route(const float* x, int64_t ldx, int64_t M, const float* gate, int64_t D, int64_t E, const float* bias,
                    const RouterConfig& p, float* logits, uint32_t* counter, int32_t* idx, float* w, cudaStream_t stream) {
  check_router(E, p, "moe_gate_route");
  DSV3_CHECK(M <= kGateRouteMaxM, "moe_gate_route: {} tokens, at most {}", M, kGateRouteMaxM);
  DSV3_CHECK(D % 4 == 0 && ldx % 4 == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0 && (reinterpret_cast<uintptr_t>(gate) & 15) == 0,
             "moe_gate_route: D {} and ldx {} must be multiples of 4, x and gate 16-byte aligned", D, ldx);
  if (M <= 0) return;
  const size_t smem = route_smem(int(E), p.n_group);
  set_route_smem(reinterpret_cast<const void*>(&k_gate_route), smem);
  launch_dependent(k_gate_route, dim3(unsigned(ceil_div(E, kRouteWarps))), dim3(kRouteWarps * 32), smem, stream, x, ldx, int(M), gate,
                   int(D), int(E), bias, p, logits, counter, idx, w);
  DSV3_CUDA_CHECK_LAUNCH("moe_gate_route kernel");
}

bool router_logits_supported(const float* x, int64_t ldx, int64_t M, const float* w, int64_t K) {
  return M > 0 && M <= INT32_MAX && K > 0 && K % 4 == 0 && K <= INT32_MAX && ldx % 4 == 0 && (reinterpret_cast<uintptr_t>(x) & 15) == 0 &&
         (reinterpret_cast<uintptr_t>(w) & 15) == 0;
}

void router_logits(const float* x, int64_t ldx, int64_t M, const float* w, int64_t E, int64_t K, float* y, int64_t ldy,
                   cudaStream_t stream) {
  DSV3_CHECK(router_logits_supported(x, ldx, M, w, K) && E > 0 && E <= 65535 * RL_E,
             "router_logits: M {}, E {}, K {} (a multiple of 4), ldx {} or alignment not supported", M, E, K, ldx);
  constexpr size_t smem = router_logits_smem();
  static const bool attr = [] {
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(k_router_logits, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    return true;
  }();
  (void)attr;
  const dim3 grid(unsigned(ceil_div(M, int64_t(RL_M))), unsigned(ceil_div(E, int64_t(RL_E))));
  launch_dependent(k_router_logits, grid, dim3(RL_T), smem, stream, x, ldx, int(M), w, int(E), int(K), y, ldy);
  DSV3_CUDA_CHECK_LAUNCH("router_logits kernel");
}

}  // namespace dsv3::cuda
