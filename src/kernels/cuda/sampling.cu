// Sampling on the GPU: one block per row. Softmax at temperature (exp in double rounded to float, as close to
// the host's std::exp as we can make it), then the kept set of Sampler::distribution found by radix selection
// over the float bits of the probabilities (no sort), then one draw with the counter-based Philox RNG. All sums
// are integer (fixed-point probabilities), so the result does not depend on the summation order.
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/moe_ops.h"

namespace dsv3::cuda {

namespace {
using namespace dev;

constexpr int kThreads = 1024;

struct SelectShared {
  unsigned int cnt[256];
  unsigned long long mass[256];
  unsigned int prefix, mask, count_above;
  unsigned long long mass_above;
  int done;  // 1: descended through all digits; 0: never reached (criterion not met by the whole row)
};

// Radix selection over the float bits of p (all >= 0, so the bits order as the values). Mode mass: the value v
// at which the descending cumulative fixed-point mass first reaches `target`; mode rank: the value of the
// target-th largest element (1-based). Returns v's bits in s.prefix, the count/mass strictly above v.
template <bool kMass>
__device__ void radix_select(const float* __restrict__ p, int V, unsigned long long target, SelectShared& s) {
  const int tid = threadIdx.x;
  if (tid == 0) {
    s.prefix = 0;
    s.mask = 0;
    s.count_above = 0;
    s.mass_above = 0;
    s.done = 1;
  }
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += blockDim.x) s.cnt[i] = 0, s.mass[i] = 0;
    __syncthreads();
    const unsigned prefix = s.prefix, mask = s.mask;
    for (int i = tid; i < V; i += blockDim.x) {
      const float v = p[i];
      const unsigned b = __float_as_uint(v);
      if ((b & mask) == prefix) {
        const unsigned bin = (b >> shift) & 255u;
        atomicAdd(&s.cnt[bin], 1u);
        if (kMass) atomicAdd(&s.mass[bin], (unsigned long long)prob_fixed(v));
      }
    }
    __syncthreads();
    if (tid == 0) {
      int bin = 255;
      for (; bin >= 0; --bin) {
        const bool here = kMass ? s.mass_above + s.mass[bin] >= target : s.count_above + s.cnt[bin] >= target;
        if (here) break;
        s.mass_above += s.mass[bin];
        s.count_above += s.cnt[bin];
      }
      if (bin < 0) {
        s.done = 0;
        bin = 0;
      }
      s.prefix = prefix | (unsigned(bin) << shift);
      s.mask = mask | (255u << shift);
    }
    __syncthreads();
    if (!s.done) return;
  }
}

__global__ void __launch_bounds__(kThreads) k_sample(const float* __restrict__ logits, int64_t ld, int V, GpuSampling sp,
                                                     unsigned long long* __restrict__ rng, bool advance,
                                                     int32_t* __restrict__ out, float* __restrict__ probs, SampleOutputs also) {
  __shared__ SelectShared sel;
  __shared__ float redf[32];
  __shared__ double redd[32];
  __shared__ unsigned long long scan_mass[kThreads];
  __shared__ int scan_ties[kThreads];
  __shared__ int s_best;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
  const int64_t row = blockIdx.x;
  const float* l = logits + row * ld;
  float* p = probs + row * int64_t(V);

  // First maximum (greedy answer, and the softmax's shift).
  // A thread visits its indices in ascending order, so a strict > keeps its first maximum; NaNs never win.
  float bv = -INFINITY;
  int bi = INT32_MAX;
  auto visit = [&](float v, int i) {
    if (v > bv || (bi == INT32_MAX && !(v != v))) bv = v, bi = i;
  };
  int i_tail = 0;  // the indices from here on are read one at a time
  if ((reinterpret_cast<uintptr_t>(l) & 15) == 0) {
    // Every load of a thread issued before the first comparison: one round trip for a 32k vocabulary (the greedy
    // draw is on the critical path of batch-1 decoding, between two steps' graphs).
    constexpr int U = 8;
    const int V4 = V / 4;
    const float4* l4 = reinterpret_cast<const float4*>(l);
    for (int base = 0; base < V4; base += U * int(blockDim.x)) {
      float4 x[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = base + tid + u * int(blockDim.x);
        if (c < V4) x[u] = l4[c];
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int c = base + tid + u * int(blockDim.x);
        if (c < V4) visit(x[u].x, 4 * c), visit(x[u].y, 4 * c + 1), visit(x[u].z, 4 * c + 2), visit(x[u].w, 4 * c + 3);
      }
    }
    i_tail = 4 * V4;
  }
  for (int i = i_tail + tid; i < V; i += blockDim.x) visit(l[i], i);
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
  }
  if (lane == 0) redf[warp] = bv, scan_ties[warp] = bi;
  __syncthreads();
  if (tid == 0) {
    float b = redf[0];
    int idx = scan_ties[0];
    for (int w = 1; w < nw; ++w)
      if (redf[w] > b || (redf[w] == b && scan_ties[w] < idx)) b = redf[w], idx = scan_ties[w];
    redf[0] = b;
    s_best = idx == INT32_MAX ? 0 : idx;
  }
  __syncthreads();
  const float mx = redf[0];
  const int best = s_best;
  const unsigned long long seed = rng[2 * row], step = rng[2 * row + 1];
  __syncthreads();
  auto finish = [&](int id) {  // thread 0
    out[row] = id;
    if (also.host) also.host[row] = id;
    if (also.ids) {
      also.ids[row] = id;
      also.pos64[row] += 1;
      also.pos32[row] += 1;
      also.dst_rows[row] += 1;
    }
    if (advance) rng[2 * row + 1] = step + 1;
  };
  if (!(sp.temperature > 0.0f)) {
    if (tid == 0) finish(best);
    return;
  }

  // Softmax at temperature: e = exp((l - mx) / T) as float, the sum in double, p = float(e / sum).
  double sum = 0.0;
  for (int i = tid; i < V; i += blockDim.x) {
    const float e = float(exp(double((l[i] - mx) / sp.temperature)));
    p[i] = e;
    sum += double(e);
  }
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) redd[warp] = sum;
  __syncthreads();
  if (tid == 0) {
    double t = 0.0;
    for (int w = 0; w < nw; ++w) t += redd[w];
    redd[0] = t;
  }
  __syncthreads();
  sum = redd[0];
  for (int i = tid; i < V; i += blockDim.x) p[i] = float(double(p[i]) / sum);
  const float pmax = float(1.0 / sum);  // the top element has e = 1
  __syncthreads();

  // keep = min(top-k, top-p prefix, min-p count), at least one.
  int keep = V;
  if (sp.top_k > 0) keep = min(keep, sp.top_k);
  if (sp.top_p < 1.0f) {
    const unsigned long long target = prob_fixed(sp.top_p);
    radix_select<true>(p, V, target, sel);
    if (sel.done) {
      const unsigned long long fx = prob_fixed(__uint_as_float(sel.prefix));
      const unsigned long long need = (target - sel.mass_above + fx - 1) / fx;
      keep = min(keep, int(sel.count_above + need));
    }
    __syncthreads();
  }
  if (sp.min_p > 0.0f) {
    const float floor_p = sp.min_p * pmax;
    int c = 0;
    for (int i = tid; i < V; i += blockDim.x) c += p[i] >= floor_p;
    c = __reduce_add_sync(0xffffffffu, c);
    if (lane == 0) scan_ties[warp] = c;
    __syncthreads();
    int t = 0;
    for (int w = 0; w < nw; ++w) t += scan_ties[w];
    keep = min(keep, max(1, t));
    __syncthreads();
  }
  // The kept set: values > v, plus the first `ties` elements (index order) equal to v.
  unsigned vbits = 0;
  int ties = V;
  const bool all = keep >= V;
  if (!all) {
    radix_select<false>(p, V, (unsigned long long)keep, sel);
    vbits = sel.prefix;
    ties = keep - int(sel.count_above);
    __syncthreads();
  }
  const float vth = __uint_as_float(vbits);

  // Draw: contiguous chunks per thread, exclusive scans of the kept mass and of the tie count.
  const int chunk = (V + blockDim.x - 1) / blockDim.x, i0 = min(V, tid * chunk), i1 = min(V, i0 + chunk);
  unsigned long long m = 0;
  int nt = 0;
  for (int i = i0; i < i1; ++i) {
    const float v = p[i];
    if (all || v > vth) m += prob_fixed(v);
    else if (v == vth) ++nt;
  }
  scan_mass[tid] = m;
  scan_ties[tid] = nt;
  __syncthreads();
  // Simple in-place Hillis-Steele scans (inclusive) over 1024 entries.
  for (int o = 1; o < int(blockDim.x); o <<= 1) {
    const unsigned long long a = tid >= o ? scan_mass[tid - o] : 0ull;
    const int b = tid >= o ? scan_ties[tid - o] : 0;
    __syncthreads();
    scan_mass[tid] += a;
    scan_ties[tid] += b;
    __syncthreads();
  }
  // The tie elements of earlier chunks come first in index order; the kept ties add fx(v) each.
  const unsigned long long fxv = prob_fixed(vth);
  const int ties_before = scan_ties[tid] - nt;
  const int total_ties = scan_ties[blockDim.x - 1];
  const int kept_ties_total = all ? 0 : min(ties, total_ties);
  const int kept_ties_before = all ? 0 : min(ties, ties_before);
  const unsigned long long total = scan_mass[blockDim.x - 1] + (unsigned long long)kept_ties_total * fxv;
  unsigned long long run = scan_mass[tid] - m + (unsigned long long)kept_ties_before * fxv;
  const double u = philox_uniform(seed, step, (unsigned long long)row);
  const unsigned long long target = min((unsigned long long)(u * double(total)), total > 0 ? total - 1 : 0ull);
  if (tid == 0) s_best = -1;
  __syncthreads();
  if (total > 0 && run <= target) {
    int tie_rank = ties_before;
    for (int i = i0; i < i1; ++i) {
      const float v = p[i];
      bool kept = all || v > vth;
      if (!all && v == vth) kept = tie_rank++ < ties;
      if (!kept) continue;
      run += prob_fixed(v);
      if (run > target) {
        s_best = i;  // exactly one thread crosses the target
        break;
      }
    }
  }
  __syncthreads();
  if (tid == 0) finish(s_best >= 0 ? s_best : best);
}

}  // namespace

size_t sample_workspace_bytes(int64_t B, int64_t V) { return size_t(B) * size_t(V) * sizeof(float); }

void sample_rows(const float* logits, int64_t ld, int64_t B, int64_t V, const GpuSampling& p, uint64_t* rng, bool advance,
                 int32_t* out, void* workspace, size_t workspace_bytes, cudaStream_t stream, const SampleOutputs& also) {
  DSV3_CHECK(p.top_k >= 0 && p.top_p > 0.0f && p.top_p <= 1.0f && p.min_p >= 0.0f && p.min_p <= 1.0f,
             "sample_rows: bad parameters (top-k {}, top-p {}, min-p {})", p.top_k, p.top_p, p.min_p);
  DSV3_CHECK(V > 0 && V < (int64_t(1) << 31) && ld >= V, "sample_rows: V {} / ld {}", V, ld);
  DSV3_CHECK(!also.ids || (also.pos64 && also.pos32 && also.dst_rows), "sample_rows: metadata to advance without its positions");
  if (B <= 0) return;
  DSV3_CHECK(p.temperature <= 0.0f || workspace_bytes >= sample_workspace_bytes(B, V),
             "sample_rows: workspace of {} bytes, needs {}", workspace_bytes, sample_workspace_bytes(B, V));
  k_sample<<<unsigned(B), kThreads, 0, stream>>>(logits, ld, int(V), p, reinterpret_cast<unsigned long long*>(rng), advance, out,
                                                 static_cast<float*>(workspace), also);
  DSV3_CUDA_CHECK_LAUNCH("sample_rows kernel");
}

}  // namespace dsv3::cuda
