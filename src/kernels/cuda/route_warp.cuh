// The DeepSeek-V3 routing of one token by one warp (exactly ops::moe_route's semantics), shared by the router
// kernels (router.cu) and the persistent decode kernel (decode_persistent.cu).
#pragma once
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace dsv3::cuda::dev {

constexpr int kRouteMaxE = 1024, kRouteMaxG = 64, kRouteMaxK = 32;

// (value, index) order of the CPU's partial_sort: larger value first, ties to the lower index.
__device__ __forceinline__ bool route_better(float a, int ia, float b, int ib) { return a > b || (a == b && ia < ib); }

// A group's score: the sum of its two best choice scores (DeepSeek-V3's noaux_tc group ranking).
__device__ __forceinline__ float group_score(const float* c, int g, int per) {
  float t1 = -INFINITY, t2 = -INFINITY;
#pragma unroll 1
  for (int e = g * per; e < (g + 1) * per; ++e) {
    const float v = c[e];
    if (v > t1) { t2 = t1; t1 = v; } else if (v > t2) { t2 = v; }
  }
  return t1 + t2;
}

// The best (value, index) over the warp's candidates (bi == INT32_MAX: none); every lane gets the result.
__device__ __forceinline__ void warp_best(float& bv, int& bi) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (oi != INT32_MAX && (bi == INT32_MAX || route_better(ov, oi, bv, bi))) { bv = ov; bi = oi; }
  }
}

// One token routed by one warp, exactly as ops::moe_route: sigmoid scores s, choice scores c = s + bias; with
// groups, a group scores the sum of its two best choices, the topk_group best groups stay and the experts of the
// others compete with choice 0.0 (transformers' masked_fill); the top_k best choices win (ties to the lower
// index), weighted s / Σ s (norm_topk_prob) · routed_scaling_factor, summed in the chosen order like the CPU.
// s, c: E floats of this warp's shared memory, gs: n_group floats. kL2: the logits are in global memory and read
// past L1 (__ldcg: in the fused router they were written by other blocks of the same launch); else in shared
// memory. E <= 1024, n_group <= 64, top_k <= 32.
template <bool kL2 = true>
__device__ inline void route_warp(const float* __restrict__ logits, int E, const float* __restrict__ bias, const RouterConfig& p,
                           float* s, float* c, float* gs, int32_t* __restrict__ idx, float* __restrict__ w) {
  const int lane = threadIdx.x & 31;
  for (int e = lane; e < E; e += 32) {
    const float v = 1.0f / (1.0f + expf(-(kL2 ? __ldcg(logits + e) : logits[e])));
    s[e] = v;
    c[e] = v + (bias ? bias[e] : 0.0f);
  }
  __syncwarp();
  const int G = p.n_group, per = E / G;
  if (G > 1) {
    for (int g = lane; g < G; g += 32) {
      gs[g] = group_score(c, g, per);
    }
    __syncwarp();
    uint64_t keep = 0;
    for (int i = 0; i < p.topk_group; ++i) {
      float bv = -INFINITY;
      int bi = INT32_MAX;
      for (int g = lane; g < G; g += 32)
        if (!((keep >> g) & 1u) && (bi == INT32_MAX || route_better(gs[g], g, bv, bi))) { bv = gs[g]; bi = g; }
      warp_best(bv, bi);
      keep |= uint64_t(1) << bi;
    }
    for (int e = lane; e < E; e += 32)
      if (!((keep >> (e / per)) & 1u)) c[e] = 0.0f;
    __syncwarp();
  }
  uint32_t taken = 0;  // bit i: expert lane + 32·i
  int chosen[kRouteMaxK];
  for (int k = 0; k < p.top_k; ++k) {
    float bv = -INFINITY;
    int bi = INT32_MAX;
    for (int e = lane, i = 0; e < E; e += 32, ++i)
      if (!((taken >> i) & 1u) && (bi == INT32_MAX || route_better(c[e], e, bv, bi))) { bv = c[e]; bi = e; }
    warp_best(bv, bi);
    if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
    chosen[k] = bi;
  }
  if (lane == 0) {
    float sum = 0.0f;
    for (int i = 0; i < p.top_k; ++i) sum += s[chosen[i]];
    const float denom = p.norm_topk_prob ? sum + 1e-20f : 1.0f;
    for (int i = 0; i < p.top_k; ++i) {
      idx[i] = chosen[i];
      w[i] = s[chosen[i]] / denom * p.routed_scaling_factor;
    }
  }
  __syncwarp();
}

// The same routing by a whole block (every thread calls it; logits, bias, s, c, gs in shared memory, c 16-byte
// aligned; blockDim.x >= max(n_group, 32)): each choice's rank among the others replaces the warp's serial top-k passes, so it costs a few
// shared-memory sweeps. Under route_better's strict order the topk_group best groups and the top_k best choices are
// exactly the ones of rank below topk_group / top_k, picked in rank order: the same result as route_warp. Its loops
// stay rolled (#pragma unroll 1 / a fixed small unroll): the persistent decode kernel runs it once per layer, so its
// machine code is fetched cold each time (an unrolled version was 21 KB and cost ~3 µs of instruction fetch).
static __device__ __noinline__ void route_block(const float* logits, int E, const float* bias, const RouterConfig p, float* s, float* c,
                                   float* gs, int32_t* idx, float* w) {
  const int t = threadIdx.x, nt = blockDim.x;
#pragma unroll 1
  for (int e = t; e < E; e += nt) {
    const float v = 1.0f / (1.0f + expf(-logits[e]));
    s[e] = v;
    c[e] = v + (bias ? bias[e] : 0.0f);
  }
  __syncthreads();
  const int G = p.n_group, per = E / G;
  if (G > 1) {
    bool keep = false;
    if (t < G) gs[t] = group_score(c, t, per);
    __syncthreads();
    if (t < G) {
      int above = 0;
#pragma unroll 1
      for (int h = 0; h < G; ++h) above += route_better(gs[h], h, gs[t], t) ? 1 : 0;
      keep = above < p.topk_group;
    }
    __syncthreads();
    if (t < G) gs[t] = keep ? 1.0f : 0.0f;
    __syncthreads();
#pragma unroll 1
    for (int e = t; e < E; e += nt)
      if (gs[e / per] == 0.0f) c[e] = 0.0f;
    __syncthreads();
  }
#pragma unroll 1
  for (int e = t; e < E; e += nt) {
    const float v = c[e];
    int rank = 0, f = 0;
#pragma unroll 4
    for (; f + 4 <= E; f += 4) {  // 16-byte loads, 4 in flight: the loop waited on each one's latency rolled
      const float4 q = *reinterpret_cast<const float4*>(c + f);
      rank += (route_better(q.x, f, v, e) ? 1 : 0) + (route_better(q.y, f + 1, v, e) ? 1 : 0) +
              (route_better(q.z, f + 2, v, e) ? 1 : 0) + (route_better(q.w, f + 3, v, e) ? 1 : 0);
    }
#pragma unroll 1
    for (; f < E; ++f) rank += route_better(c[f], f, v, e) ? 1 : 0;
    if (rank < p.top_k) idx[rank] = e;
  }
  __syncthreads();
  if (t < 32) {  // the weights: warp 0 loads the chosen scores at once; the sum stays in the chosen order (top_k <= 32)
    const float v = t < p.top_k ? s[idx[t]] : 0.0f;
    float sum = 0.0f;
#pragma unroll 1
    for (int i = 0; i < p.top_k; ++i) sum += __shfl_sync(0xffffffffu, v, i);
    const float denom = p.norm_topk_prob ? sum + 1e-20f : 1.0f;
    if (t < p.top_k) w[t] = v / denom * p.routed_scaling_factor;
  }
  __syncthreads();
}

}  // namespace dsv3::cuda::dev
