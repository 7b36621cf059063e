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

}  // namespace dsv3::cuda
