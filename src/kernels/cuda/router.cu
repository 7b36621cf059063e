// DeepSeek-V3 router on the GPU: one block per token, semantics exactly as ops::moe_route (src/kernels/cpu).
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace dsv3::cuda {

namespace {
using namespace dev;

constexpr int kMaxE = 1024, kMaxG = 64, kMaxK = 32;

// (value, index) order of the CPU's partial_sort: larger value first, ties to the lower index.
__device__ __forceinline__ bool better(float a, int ia, float b, int ib) { return a > b || (a == b && ia < ib); }

__global__ void k_route(const float* __restrict__ logits, int64_t ld, int E, const float* __restrict__ bias, RouterConfig p,
                        int32_t* __restrict__ idx, float* __restrict__ w) {
  __shared__ float s[kMaxE], choice[kMaxE];
  __shared__ unsigned char taken[kMaxE];
  __shared__ float gscore[kMaxG];
  __shared__ unsigned char keep[kMaxG];
  __shared__ float rv[32];
  __shared__ int ri[32];
  __shared__ int chosen[kMaxK];
  const int64_t m = blockIdx.x;
  const float* l = logits + m * ld;
  const int G = p.n_group, per = E / G;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const float v = 1.0f / (1.0f + expf(-l[e]));
    s[e] = v;
    choice[e] = v + (bias ? bias[e] : 0.0f);
    taken[e] = 0;
  }
  __syncthreads();
  if (G > 1) {
    for (int g = threadIdx.x; g < G; g += blockDim.x) {
      float t1 = -INFINITY, t2 = -INFINITY;
      for (int e = g * per; e < (g + 1) * per; ++e) {
        const float c = choice[e];
        if (c > t1) { t2 = t1; t1 = c; } else if (c > t2) { t2 = c; }
      }
      gscore[g] = t1 + t2;
      keep[g] = 0;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int i = 0; i < p.topk_group; ++i) {  // selection of the topk_group best groups
        int b = -1;
        for (int g = 0; g < G; ++g)
          if (!keep[g] && (b < 0 || better(gscore[g], g, gscore[b], b))) b = g;
        keep[b] = 1;
      }
    }
    __syncthreads();
    // Experts of dropped groups compete with score 0.0, as transformers' masked_fill(..., 0.0).
    for (int e = threadIdx.x; e < E; e += blockDim.x)
      if (!keep[e / per]) choice[e] = 0.0f;
    __syncthreads();
  }
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int k = 0; k < p.top_k; ++k) {
    float bv = -INFINITY;
    int bi = INT32_MAX;
    for (int e = threadIdx.x; e < E; e += blockDim.x)
      if (!taken[e] && (bi == INT32_MAX || better(choice[e], e, bv, bi))) { bv = choice[e]; bi = e; }
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (oi != INT32_MAX && (bi == INT32_MAX || better(ov, oi, bv, bi))) { bv = ov; bi = oi; }
    }
    if (lane == 0) { rv[wid] = bv; ri[wid] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
      float b = rv[0];
      int bidx = ri[0];
      for (int i = 1; i < nw; ++i)
        if (ri[i] != INT32_MAX && (bidx == INT32_MAX || better(rv[i], ri[i], b, bidx))) { b = rv[i]; bidx = ri[i]; }
      chosen[k] = bidx;
      taken[bidx] = 1;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    // Same float operations in the same order as the CPU op.
    float sum = 0.0f;
    for (int i = 0; i < p.top_k; ++i) sum += s[chosen[i]];
    const float denom = p.norm_topk_prob ? sum + 1e-20f : 1.0f;
    for (int i = 0; i < p.top_k; ++i) {
      idx[m * p.top_k + i] = chosen[i];
      w[m * p.top_k + i] = s[chosen[i]] / denom * p.routed_scaling_factor;
    }
  }
}
}  // namespace

void moe_route(const float* logits, int64_t ld, int64_t M, int64_t E, const float* bias, const RouterConfig& p, int32_t* idx,
               float* w, cudaStream_t stream) {
  DSV3_CHECK(p.n_group >= 1 && E % p.n_group == 0 && p.topk_group >= 1 && p.topk_group <= p.n_group && p.top_k >= 1 &&
                 p.top_k <= p.topk_group * (E / p.n_group),
             "moe_route: invalid router parameters");
  DSV3_CHECK(E <= kMaxE && p.n_group <= kMaxG && p.top_k <= kMaxK, "moe_route: E {} / n_group {} / top_k {} beyond the kernel's limits",
             E, p.n_group, p.top_k);
  if (M <= 0) return;
  const int threads = E >= 256 ? 256 : int(round_up(E, 32));
  k_route<<<unsigned(M), threads, 0, stream>>>(logits, ld, int(E), bias, p, idx, w);
  DSV3_CUDA_CHECK_LAUNCH("moe_route kernel");
}

}  // namespace dsv3::cuda
