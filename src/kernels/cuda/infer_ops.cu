// Glue kernels of the CUDA model; see infer_ops.h.
#include <climits>
#include <cstdlib>
#include <string>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/infer_ops.h"

namespace dsv3::cuda {

using namespace dev;

namespace {
unsigned grid_for(int64_t n, int threads) {
  const int64_t g = (n + threads - 1) / threads;
  return unsigned(g < 65535 * 16 ? (g > 0 ? g : 1) : 65535 * 16);
}
void check_act(DType t, const char* what) {
  DSV3_CHECK(t == DType::F32 || t == DType::BF16, "{}: dtype must be F32 or BF16, not {}", what, dtype_name(t));
}
}  // namespace

// ---- streams, graphs, memory ----

Stream::Stream() {
  require_device();
  DSV3_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking));
}
Stream::~Stream() {
  if (s_) (void)cudaStreamDestroy(s_);
}

Graph::~Graph() { reset(); }
void Graph::reset() {
  if (exec_) (void)cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
  if (graph_) (void)cudaGraphDestroy(static_cast<cudaGraph_t>(graph_));
  exec_ = graph_ = nullptr;
}
void Graph::begin(cudaStream_t s) {
  DSV3_CHECK(s != nullptr, "CUDA graph capture needs a created stream, not the legacy default stream");
  reset();
  DSV3_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
}
void Graph::end(cudaStream_t s) {
  cudaGraph_t g = nullptr;
  DSV3_CUDA_CHECK(cudaStreamEndCapture(s, &g));
  graph_ = g;
  cudaGraphExec_t e = nullptr;
  DSV3_CUDA_CHECK(cudaGraphInstantiate(&e, g, 0));
  exec_ = e;
}
void Graph::launch(cudaStream_t s) const {
  DSV3_CHECK(exec_ != nullptr, "internal error: launching a graph that was not captured");
  DSV3_CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_), s));
}

void memory_info(size_t* free_bytes, size_t* total_bytes) {
  require_device();
  size_t f = 0, t = 0;
  DSV3_CUDA_CHECK(cudaMemGetInfo(&f, &t));
  if (free_bytes) *free_bytes = f;
  if (total_bytes) *total_bytes = t;
}

// ---- row ops ----

// rmsnorm_to: elementwise.cu (the same kernel as rmsnorm, with a BF16 output).

template <class O>
__global__ void k_cast_rows(const float* __restrict__ x, int64_t ldx, O* __restrict__ y, int64_t ldy, int64_t M, int64_t N) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < M * N; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / N, n = i % N;
    store(y + m * ldy + n, x[m * ldx + n]);
  }
}
void cast_rows(const float* x, int64_t ldx, DType yt, void* y, int64_t ldy, int64_t M, int64_t N, cudaStream_t s) {
  check_act(yt, "cast_rows output");
  if (M * N <= 0) return;
  if (yt == DType::F32) k_cast_rows<<<grid_for(M * N, 256), 256, 0, s>>>(x, ldx, static_cast<float*>(y), ldy, M, N);
  else k_cast_rows<<<grid_for(M * N, 256), 256, 0, s>>>(x, ldx, static_cast<uint16_t*>(y), ldy, M, N);
  DSV3_CUDA_CHECK_LAUNCH("cast_rows kernel");
}

__global__ void k_add_rows(float* __restrict__ h, int64_t ldh, const float* __restrict__ d, int64_t ldd, int64_t M, int64_t N) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < M * N; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / N, n = i % N;
    h[m * ldh + n] += d[m * ldd + n];
  }
}
void add_rows(float* h, int64_t ldh, const float* d, int64_t ldd, int64_t M, int64_t N, cudaStream_t s) {
  if (M * N <= 0) return;
  k_add_rows<<<grid_for(M * N, 256), 256, 0, s>>>(h, ldh, d, ldd, M, N);
  DSV3_CUDA_CHECK_LAUNCH("add_rows kernel");
}

__global__ void k_ids_from_sampled(const int32_t* __restrict__ src, int64_t* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) dst[i] = src[i];
}
void ids_from_sampled(const int32_t* src, int64_t* dst, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  k_ids_from_sampled<<<grid_for(n, 256), 256, 0, stream>>>(src, dst, n);
  DSV3_CUDA_CHECK_LAUNCH("ids_from_sampled kernel");
}

__global__ void k_decode_meta_advance(const int32_t* __restrict__ sampled, int64_t* __restrict__ ids, int64_t* __restrict__ pos64,
                                      int32_t* __restrict__ pos32, int32_t* __restrict__ dst_rows, uint64_t* __restrict__ rng, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    ids[i] = sampled[i];
    pos64[i] += 1;
    pos32[i] += 1;
    dst_rows[i] += 1;
    if (rng) rng[2 * i + 1] += 1;
  }
}
void decode_meta_advance(const int32_t* sampled, int64_t* ids, int64_t* pos64, int32_t* pos32, int32_t* dst_rows, uint64_t* rng,
                         int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  k_decode_meta_advance<<<grid_for(n, 256), 256, 0, stream>>>(sampled, ids, pos64, pos32, dst_rows, rng, n);
  DSV3_CUDA_CHECK_LAUNCH("decode_meta_advance kernel");
}

__device__ __forceinline__ double contract_load(DType t, const void* p, int64_t i) {
  return t == DType::BF16 ? double(bf16_to_f32(static_cast<const uint16_t*>(p)[i])) : double(static_cast<const float*>(p)[i]);
}
// One thread per output element (h, i, k); k is the fastest index so B's reads coalesce and A's are broadcasts.
__global__ void k_contract_weights(const ContractOperand A, const ContractOperand B, const float* __restrict__ s, int64_t nh, int64_t nd,
                                   int64_t ni, int64_t nk, float* __restrict__ out, int64_t soh, int64_t soi) {
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < nh * ni * nk; q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = q % nk, i = (q / nk) % ni, h = q / (nk * ni);
    double acc = 0.0;
    for (int64_t d = 0; d < nd; ++d) {
      const double a = contract_load(A.type, A.p, h * A.sh + d * A.sd + i * A.sx);
      const double b = contract_load(B.type, B.p, h * B.sh + d * B.sd + k * B.sx);
      acc += (s ? double(s[d]) : 1.0) * a * b;
    }
    out[h * soh + i * soi + k] = float(acc);
  }
}
void contract_weights(const ContractOperand& A, const ContractOperand& B, const float* s, int64_t nh, int64_t nd, int64_t ni, int64_t nk,
                      float* out, int64_t soh, int64_t soi, cudaStream_t stream) {
  for (const ContractOperand* o : {&A, &B})
    DSV3_CHECK(o->p && (o->type == DType::F32 || o->type == DType::BF16), "contract_weights: operands must be F32 or BF16");
  if (nh * ni * nk <= 0) return;
  k_contract_weights<<<grid_for(nh * ni * nk, 256), 256, 0, stream>>>(A, B, s, nh, nd, ni, nk, out, soh, soi);
  DSV3_CUDA_CHECK_LAUNCH("contract_weights kernel");
}

// R: the row's values a thread keeps in registers between the sum and the scaling (D <= R · blockDim.x; the
// second pass re-read h, a round trip to L2). Thread t owns elements t, t + blockDim.x, ... as rmsnorm_to's threads
// do, and sums them in that order: the same bits (tested).
template <class A, int R>
__global__ void k_residual_rmsnorm(float* __restrict__ h, int64_t ldh, const float* __restrict__ d, int64_t ldd,
                                   const float* __restrict__ gamma, float eps, int64_t D, float* __restrict__ yf, int64_t ldyf,
                                   A* __restrict__ ya, int64_t ldya) {
  dependent_kernel_begin();
  __shared__ float red[32];
  float* hr = h + blockIdx.x * ldh;
  const float* dr = d ? d + blockIdx.x * ldd : nullptr;
  float v[R];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t j = threadIdx.x + int64_t(i) * blockDim.x;
    v[i] = j < D ? hr[j] : 0.0f;
  }
  float ss = 0.0f;
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t j = threadIdx.x + int64_t(i) * blockDim.x;
    if (j < D) {
      if (dr) {
        v[i] += dr[j];
        hr[j] = v[i];
      }
      ss += v[i] * v[i];
    }
  }
  ss = block_sum(ss, red);
  const float r = 1.0f / sqrtf(ss / float(D) + eps);
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const int64_t j = threadIdx.x + int64_t(i) * blockDim.x;
    if (j < D) {
      const float y = gamma[j] * (v[i] * r);
      if (yf) yf[blockIdx.x * ldyf + j] = y;
      if (ya) store(ya + blockIdx.x * ldya + j, y);
    }
  }
}
template <class A>
void launch_residual_rmsnorm(dim3 grid, dim3 block, cudaStream_t s, float* h, int64_t ldh, const float* d, int64_t ldd, const float* gamma,
                             float eps, int64_t D, float* yf, int64_t ldyf, A* ya, int64_t ldya) {
  const int64_t per = ceil_div(D, int64_t(block.x));
  auto go = [&](auto k) { launch_dependent(k, grid, block, 0, s, h, ldh, d, ldd, gamma, eps, D, yf, ldyf, ya, ldya); };
  if (per <= 2) go(k_residual_rmsnorm<A, 2>);
  else if (per <= 4) go(k_residual_rmsnorm<A, 4>);
  else if (per <= 8) go(k_residual_rmsnorm<A, 8>);
  else if (per <= 16) go(k_residual_rmsnorm<A, 16>);
  else if (per <= 32) go(k_residual_rmsnorm<A, 32>);
  else DSV3_CHECK(false, "residual_rmsnorm: hidden size {} above {}", D, 32 * block.x);
}
namespace {
// The routed-expert rows of a deferred MoE output (MoeRowsSum), E the expert outputs' element type.
template <class E>
struct MoeRowsArgs {
  const E* eo;  // null: no MoE addend
  int64_t ld;
  const int32_t *slot_row, *idx;
  const float* wts;
  int k;
};
__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 ld4(const uint16_t* p) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
                     __uint_as_float(u.y & 0xffff0000u));
}
__device__ __forceinline__ void st4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ void st4(uint16_t* p, float4 v) {
  *reinterpret_cast<uint2*>(p) = make_uint2(pack_bf16x2(v.x, v.y), pack_bf16x2(v.z, v.w));
}

// A warp per row (prefill-sized M; D a multiple of 128 up to 2048): lane l owns the float4 chunks 4 l + 128 q, all
// of a row's loads in flight at once (the block kernel, a 512-thread block a row with two values a thread between
// its barriers, moved 2.2-2.9 TB/s on an H200 at T 4096). The residual sum is the block kernel's to the bit: h[m] +=
// d[m] per element, or with a MoE addend h[m] += (Σ_j w_j·eo[slot_j] + d[m]), the choices in ascending expert
// order (by rank; k_moe_unpermute's stable insertion sort) and each element's sum an fma chain from zero, as
// k_moe_unpermute sums it. The norm's sum of squares runs in this kernel's own order (a lane's chunks, then the
// warp), so the normed outputs may differ from rmsnorm_to's in the last bits.
template <class A, class E, int Q>
__global__ void __launch_bounds__(128) k_residual_rmsnorm_warp(float* __restrict__ h, int64_t ldh, const float* __restrict__ d, int64_t ldd,
                                                               MoeRowsArgs<E> moe, const float* __restrict__ gamma, float eps, int D,
                                                               int64_t M, float* __restrict__ yf, int64_t ldyf, A* __restrict__ ya,
                                                               int64_t ldya) {
  dependent_kernel_begin();
  constexpr unsigned kAll = 0xffffffffu;
  constexpr int KC = 8;  // choices whose rows are loaded together
  const int lane = int(threadIdx.x) & 31;
  const int64_t m = int64_t(blockIdx.x) * 4 + (threadIdx.x >> 5);  // (4 rows a block: ~170 registers a thread)
  if (m >= M) return;
  float* hr = h + m * ldh;
  const float* dr = d ? d + m * ldd : nullptr;
  auto col = [&](int q) { return 4 * lane + 128 * q; };
  float4 v[Q];
#pragma unroll
  for (int q = 0; q < Q; ++q) v[q] = ld4(hr + col(q));
  if (moe.eo || dr) {
    float4 a[Q];
    if (moe.eo) {
      const int k = moe.k;  // <= 32 (host-checked)
      const int64_t base = m * k;
      const int my_e = lane < k ? moe.idx[base + lane] : INT_MAX;
      int rank = 0;
      for (int q = 0; q < k; ++q) {
        const int eq = __shfl_sync(kAll, my_e, q);
        rank += eq < my_e || (eq == my_e && q < lane);
      }
      const int my_slot = lane < k ? moe.slot_row[base + lane] : 0;
      const float my_w = lane < k ? moe.wts[base + lane] : 0.0f;
#pragma unroll
      for (int q = 0; q < Q; ++q) a[q] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      for (int r0 = 0; r0 < k; r0 += KC) {
        const E* row[KC];
        float w[KC];
#pragma unroll
        for (int c = 0; c < KC; ++c) {  // the choice of rank r0 + c: its slot's row and weight
          const int src = __ffs(__ballot_sync(kAll, lane < k && rank == r0 + c)) - 1;
          row[c] = moe.eo + int64_t(__shfl_sync(kAll, my_slot, src < 0 ? 0 : src)) * moe.ld;
          w[c] = __shfl_sync(kAll, my_w, src < 0 ? 0 : src);
        }
        // Two choices' rows in flight: choice c + 1's loads issued before choice c's products.
        float4 e[2][Q];
#pragma unroll
        for (int q = 0; q < Q; ++q) e[0][q] = ld4(row[0] + col(q));
#pragma unroll
        for (int c = 0; c < KC; ++c) {
          if (c + 1 < KC && r0 + c + 1 < k)
#pragma unroll
            for (int q = 0; q < Q; ++q) e[(c + 1) & 1][q] = ld4(row[c + 1] + col(q));
          if (r0 + c < k)
#pragma unroll
            for (int q = 0; q < Q; ++q) {
              const float4 x = e[c & 1][q];
              a[q].x = fmaf(x.x, w[c], a[q].x), a[q].y = fmaf(x.y, w[c], a[q].y);
              a[q].z = fmaf(x.z, w[c], a[q].z), a[q].w = fmaf(x.w, w[c], a[q].w);
            }
        }
      }
      if (dr)
#pragma unroll
        for (int q = 0; q < Q; ++q) {
          const float4 o = ld4(dr + col(q));
          a[q].x += o.x, a[q].y += o.y, a[q].z += o.z, a[q].w += o.w;
        }
    } else {
#pragma unroll
      for (int q = 0; q < Q; ++q) a[q] = ld4(dr + col(q));
    }
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      v[q].x += a[q].x, v[q].y += a[q].y, v[q].z += a[q].z, v[q].w += a[q].w;
      st4(hr + col(q), v[q]);
    }
  }
  float ss = 0.0f;
#pragma unroll
  for (int q = 0; q < Q; ++q) ss += v[q].x * v[q].x + v[q].y * v[q].y + v[q].z * v[q].z + v[q].w * v[q].w;
  const float r = 1.0f / sqrtf(warp_sum(ss) / float(D) + eps);
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    const float4 g = ld4(gamma + col(q));
    const float4 y = make_float4(g.x * (v[q].x * r), g.y * (v[q].y * r), g.z * (v[q].z * r), g.w * (v[q].w * r));
    if (yf) st4(yf + m * ldyf + col(q), y);
    if (ya) st4(ya + m * ldya + col(q), y);
  }
}
// k_residual_rmsnorm's block for D (rmsnorm_to's, elementwise.cu, so that the sums meet in the same order).
int norm_threads(int64_t D) { return D >= 1024 ? 512 : D >= 256 ? 256 : 128; }
// The warp kernel's rows: D = 128, 256, 512, 1024 or 2048 (1 to 16 float4 a lane).
bool warp_norm_fits(int64_t D) {
  const int64_t q = D / 128;
  return D % 128 == 0 && (q == 1 || q == 2 || q == 4 || q == 8 || q == 16);
}
// Rows of 4-element chunks: p (when set) aligned to four elements of `elem` bytes, the row stride a multiple of 4.
bool aligned4(const void* p, int64_t ld, size_t elem = 4) { return !p || (reinterpret_cast<uintptr_t>(p) % (4 * elem) == 0 && ld % 4 == 0); }
template <class A, class E>
void launch_residual_rmsnorm_warp(cudaStream_t s, float* h, int64_t ldh, const float* d, int64_t ldd, const MoeRowsArgs<E>& moe,
                                  const float* gamma, float eps, int64_t M, int64_t D, float* yf, int64_t ldyf, A* ya, int64_t ldya) {
  const dim3 grid(unsigned(ceil_div(M, int64_t(4)))), block(128);
  auto go = [&](auto k) { launch_dependent(k, grid, block, 0, s, h, ldh, d, ldd, moe, gamma, eps, int(D), M, yf, ldyf, ya, ldya); };
  switch (D / 128) {
    case 1: go(k_residual_rmsnorm_warp<A, E, 1>); break;
    case 2: go(k_residual_rmsnorm_warp<A, E, 2>); break;
    case 4: go(k_residual_rmsnorm_warp<A, E, 4>); break;
    case 8: go(k_residual_rmsnorm_warp<A, E, 8>); break;
    case 16: go(k_residual_rmsnorm_warp<A, E, 16>); break;
    default: DSV3_CHECK(false, "residual_rmsnorm: warp rows of D {}", D);
  }
}
template <class E>
void residual_rmsnorm_warp(float* h, int64_t ldh, const float* d, int64_t ldd, const MoeRowsArgs<E>& moe, const float* gamma, float eps,
                           int64_t M, int64_t D, float* yf, int64_t ldyf, DType yt, void* ya, int64_t ldya, cudaStream_t s) {
  if (ya && yt == DType::F32)
    launch_residual_rmsnorm_warp(s, h, ldh, d, ldd, moe, gamma, eps, M, D, yf, ldyf, static_cast<float*>(ya), ldya);
  else
    launch_residual_rmsnorm_warp(s, h, ldh, d, ldd, moe, gamma, eps, M, D, yf, ldyf, static_cast<uint16_t*>(ya), ldya);
}
// DSV3_WARP_NORM=0: prefill-sized layer boundaries on the block kernel (and MoE outputs un-permuted first), for A/B;
// read at every call, so a test can compare both in one process.
bool env_warp_norm() {
  const char* e = std::getenv("DSV3_WARP_NORM");
  return !(e && std::string(e) == "0");
}
}  // namespace

bool residual_rmsnorm_moe_supported(int64_t D, int64_t top_k) {
  return warp_norm_fits(D) && top_k >= 1 && top_k <= 32 && env_warp_norm();
}

void residual_rmsnorm(float* h, int64_t ldh, const float* d, int64_t ldd, const float* gamma, float eps, int64_t M, int64_t D,
                      float* yf, int64_t ldyf, DType yt, void* ya, int64_t ldya, cudaStream_t s, const MoeRowsSum* moe) {
  if (ya) check_act(yt, "residual_rmsnorm output");
  if (M <= 0) return;
  if (moe) {
    DSV3_CHECK(residual_rmsnorm_moe_supported(D, moe->top_k) && moe->eo && moe->slot_row && moe->idx && moe->wts,
               "residual_rmsnorm: MoE rows of D {} / top_k {} not supported", D, moe->top_k);
    DSV3_CHECK(moe->eo_type == DType::BF16 || moe->eo_type == DType::F32, "residual_rmsnorm: expert outputs {}", dtype_name(moe->eo_type));
  }
  const bool fit = warp_norm_fits(D) && aligned4(h, ldh) && aligned4(d, ldd) && aligned4(gamma, 0) && aligned4(yf, ldyf) &&
                   aligned4(ya, ldya, ya ? dtype_size(yt) : 4) &&
                   (!moe || aligned4(moe->eo, moe->ld, dtype_size(moe->eo_type)));
  DSV3_CHECK(!moe || fit, "residual_rmsnorm: MoE rows need 16-byte aligned rows (strides multiples of 4)");
  if (fit && (moe || (M >= 256 && env_warp_norm()))) {  // a warp a row
    if (moe && moe->eo_type == DType::F32) {
      const MoeRowsArgs<float> mr{static_cast<const float*>(moe->eo), moe->ld, moe->slot_row, moe->idx, moe->wts, int(moe->top_k)};
      residual_rmsnorm_warp(h, ldh, d, ldd, mr, gamma, eps, M, D, yf, ldyf, yt, ya, ldya, s);
    } else {
      MoeRowsArgs<uint16_t> mr{};
      if (moe) mr = {static_cast<const uint16_t*>(moe->eo), moe->ld, moe->slot_row, moe->idx, moe->wts, int(moe->top_k)};
      residual_rmsnorm_warp(h, ldh, d, ldd, mr, gamma, eps, M, D, yf, ldyf, yt, ya, ldya, s);
    }
    DSV3_CUDA_CHECK_LAUNCH("residual_rmsnorm warp kernel");
    return;
  }
  const dim3 grid(static_cast<unsigned>(M)), block(norm_threads(D));
  if (ya && yt == DType::F32)
    launch_residual_rmsnorm(grid, block, s, h, ldh, d, ldd, gamma, eps, D, yf, ldyf, static_cast<float*>(ya), ldya);
  else
    launch_residual_rmsnorm(grid, block, s, h, ldh, d, ldd, gamma, eps, D, yf, ldyf, static_cast<uint16_t*>(ya), ldya);
  DSV3_CUDA_CHECK_LAUNCH("residual_rmsnorm kernel");
}

// ---- MLA ----

template <class P>
__global__ void k_mla_decode_prep(const float* __restrict__ q, int64_t ldq, int H, int dn, int half, const float* __restrict__ kv,
                                  int64_t ldkv, int kvr, const float* __restrict__ gamma, float eps, const int64_t* __restrict__ pos,
                                  const float* __restrict__ table, const int32_t* __restrict__ rows, P* __restrict__ pool,
                                  float* __restrict__ qc, int64_t ldqc) {
  dependent_kernel_begin();
  __shared__ float red[32];
  const int64_t m = blockIdx.x;
  const int dqk = dn + 2 * half, W = kvr + 2 * half;
  const float2* cs = reinterpret_cast<const float2*>(table) + pos[m] * half;
  for (int i = threadIdx.x; i < H * half; i += blockDim.x) {
    const int h = i / half, p = i % half;
    const float* v = q + m * ldq + h * dqk + dn + 2 * p;
    float* o = qc + m * ldqc + int64_t(h) * W + kvr + 2 * p;
    const float2 c = cs[p];
    const float a = v[0], b = v[1];
    o[0] = a * c.x - b * c.y;
    o[1] = b * c.x + a * c.y;
  }
  const float* c = kv + m * ldkv;
  float ss = 0.0f;
  for (int j = threadIdx.x; j < kvr; j += blockDim.x) ss += c[j] * c[j];
  ss = block_sum(ss, red);
  const float r = 1.0f / sqrtf(ss / float(kvr) + eps);
  P* dst = pool + int64_t(rows[m]) * W;
  for (int j = threadIdx.x; j < kvr; j += blockDim.x) store(dst + j, gamma[j] * (c[j] * r));
  for (int p = threadIdx.x; p < half; p += blockDim.x) {
    const float a = c[kvr + 2 * p], b = c[kvr + 2 * p + 1];
    store(dst + kvr + 2 * p, a * cs[p].x - b * cs[p].y);
    store(dst + kvr + 2 * p + 1, b * cs[p].x + a * cs[p].y);
  }
}
void mla_decode_prep(const float* q, int64_t ldq, int64_t H, int64_t dn, int64_t dr, const float* kv, int64_t ldkv, int64_t kvr,
                     const float* gamma, float eps, const int64_t* pos, const float* table, const int32_t* rows, DType pt, void* pool,
                     float* qc, int64_t ldqc, int64_t M, cudaStream_t s) {
  check_act(pt, "latent cache");
  DSV3_CHECK(dr % 2 == 0, "mla_decode_prep: rope dim {} is odd", dr);
  if (M <= 0) return;
  const int threads = kvr >= 1024 ? 512 : kvr >= 256 ? 256 : 128;  // rmsnorm_to's, for the same sum order
  const dim3 grid(static_cast<unsigned>(M)), block(threads);
  if (pt == DType::F32)
    launch_dependent(k_mla_decode_prep<float>, grid, block, 0, s, q, ldq, int(H), int(dn), int(dr / 2), kv, ldkv, int(kvr), gamma, eps,
                     pos, table, rows, static_cast<float*>(pool), qc, ldqc);
  else
    launch_dependent(k_mla_decode_prep<uint16_t>, grid, block, 0, s, q, ldq, int(H), int(dn), int(dr / 2), kv, ldkv, int(kvr), gamma,
                     eps, pos, table, rows, static_cast<uint16_t*>(pool), qc, ldqc);
  DSV3_CUDA_CHECK_LAUNCH("mla_decode_prep kernel");
}

// A warp per token: rows of a few hundred f32 (q_a 384, c_kv 256 in small.json; 1536 / 512 in V3) need no block
// reduction, and 4096 one-block rows of 256 threads spent their time in __syncthreads (k_rmsnorm: 14.5 us for a
// 4096 x 384 row set on an H200, a fifth of the copy rate). Lane l owns the float4s l, l + 32, ...
template <class P>
__device__ __forceinline__ void warp_rmsnorm_bf16(const float* __restrict__ x, int n, const float* __restrict__ g, float eps,
                                                  uint16_t* __restrict__ y, P* __restrict__ also, int lane) {
  float ss = 0.0f;
  for (int j = 4 * lane; j < n; j += 128) {
    const float4 v = *reinterpret_cast<const float4*>(x + j);
    ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
  }
  ss = dev::warp_sum(ss);
  const float r = 1.0f / sqrtf(ss / float(n) + eps);
  for (int j = 4 * lane; j < n; j += 128) {
    const float4 v = *reinterpret_cast<const float4*>(x + j), gg = *reinterpret_cast<const float4*>(g + j);
    const float y0 = gg.x * (v.x * r), y1 = gg.y * (v.y * r), y2 = gg.z * (v.z * r), y3 = gg.w * (v.w * r);
    *reinterpret_cast<uint2*>(y + j) = make_uint2(pack_bf16x2(y0, y1), pack_bf16x2(y2, y3));
    if (also) store(also + j, y0), store(also + j + 1, y1), store(also + j + 2, y2), store(also + j + 3, y3);
  }
}

template <class P>
__global__ void __launch_bounds__(256) k_mla_prefill_prep(const float* __restrict__ x, int64_t ldx, int nq, int kvr, int half,
                                                          const float* __restrict__ gq, const float* __restrict__ gkv, float eps,
                                                          const int64_t* __restrict__ pos, const float* __restrict__ table,
                                                          uint16_t* __restrict__ qn, int64_t ldqn, uint16_t* __restrict__ cn,
                                                          int64_t ldcn, uint16_t* __restrict__ kr, int64_t ldkr,
                                                          const int32_t* __restrict__ rows, P* __restrict__ pool, int64_t M) {
  dependent_kernel_begin();
  const int lane = threadIdx.x & 31;
  const int64_t m = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (m >= M) return;
  const float* xr = x + m * ldx;
  P* dst = pool ? pool + int64_t(rows[m]) * (kvr + 2 * half) : nullptr;
  warp_rmsnorm_bf16<P>(xr, nq, gq, eps, qn + m * ldqn, nullptr, lane);
  warp_rmsnorm_bf16<P>(xr + nq, kvr, gkv, eps, cn + m * ldcn, dst, lane);
  const float2* cs = reinterpret_cast<const float2*>(table) + pos[m] * half;
  for (int p = lane; p < half; p += 32) {
    const float2 v = *reinterpret_cast<const float2*>(xr + nq + kvr + 2 * p), c = cs[p];
    const float a = v.x * c.x - v.y * c.y, b = v.y * c.x + v.x * c.y;
    *reinterpret_cast<uint32_t*>(kr + m * ldkr + 2 * p) = pack_bf16x2(a, b);
    if (dst) store(dst + kvr + 2 * p, a), store(dst + kvr + 2 * p + 1, b);
  }
}

bool mla_prefill_prep_supported(const float* x, int64_t ldx, int64_t nq, int64_t kvr, int64_t dr, int64_t ldqn, int64_t ldcn, int64_t ldkr) {
  auto al = [](const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; };
  return nq > 0 && kvr > 0 && dr > 0 && nq % 4 == 0 && kvr % 4 == 0 && dr % 2 == 0 && ldx % 4 == 0 && ldqn % 4 == 0 && ldcn % 4 == 0 &&
         ldkr % 2 == 0 && nq <= INT32_MAX / 2 && kvr <= INT32_MAX / 2 && dr <= INT32_MAX / 2 && al(x, 16);
}

void mla_prefill_prep(const float* x, int64_t ldx, int64_t nq, int64_t kvr, int64_t dr, const float* gq, const float* gkv, float eps,
                      const int64_t* pos, const float* table, uint16_t* qn, int64_t ldqn, uint16_t* cn, int64_t ldcn, uint16_t* kr,
                      int64_t ldkr, const int32_t* rows, DType pt, void* pool, int64_t M, cudaStream_t s) {
  DSV3_CHECK(mla_prefill_prep_supported(x, ldx, nq, kvr, dr, ldqn, ldcn, ldkr),
             "mla_prefill_prep: widths {} / {} / {} or strides {} / {} / {} / {} not supported", nq, kvr, dr, ldx, ldqn, ldcn, ldkr);
  auto al = [](const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; };
  DSV3_CHECK(al(gq, 16) && al(gkv, 16) && al(qn, 8) && al(cn, 8) && al(kr, 4), "mla_prefill_prep: misaligned gamma or output");
  if (pool) check_act(pt, "latent cache");
  if (M <= 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(M, int64_t(8)))), block(256);
  if (!pool || pt == DType::F32)
    launch_dependent(k_mla_prefill_prep<float>, grid, block, 0, s, x, ldx, int(nq), int(kvr), int(dr / 2), gq, gkv, eps, pos, table, qn,
                     ldqn, cn, ldcn, kr, ldkr, rows, static_cast<float*>(pool), M);
  else
    launch_dependent(k_mla_prefill_prep<uint16_t>, grid, block, 0, s, x, ldx, int(nq), int(kvr), int(dr / 2), gq, gkv, eps, pos, table,
                     qn, ldqn, cn, ldcn, kr, ldkr, rows, static_cast<uint16_t*>(pool), M);
  DSV3_CUDA_CHECK_LAUNCH("mla_prefill_prep kernel");
}

__global__ void k_expand_k(const float* __restrict__ kv, int64_t H, int64_t dn, int64_t dv, const float* __restrict__ kr,
                           int64_t ldkr, int64_t dr, float* __restrict__ k, int64_t M) {
  const int64_t dqk = dn + dr, n = M * H * dqk;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = i % dqk, h = (i / dqk) % H, m = i / (dqk * H);
    k[i] = j < dn ? kv[m * H * (dn + dv) + h * (dn + dv) + j] : kr[m * ldkr + (j - dn)];
  }
}
void mla_expand_k(const float* kv, int64_t H, int64_t dn, int64_t dv, const float* kr, int64_t ldkr, int64_t dr, float* k,
                  int64_t M, cudaStream_t s) {
  if (M * H <= 0) return;
  k_expand_k<<<grid_for(M * H * (dn + dr), 256), 256, 0, s>>>(kv, H, dn, dv, kr, ldkr, dr, k, M);
  DSV3_CUDA_CHECK_LAUNCH("mla_expand_k kernel");
}

template <class P>
__global__ void k_latent_append(const float* __restrict__ c, int64_t ldc, int64_t kvr, const float* __restrict__ kr,
                                int64_t ldkr, int64_t dr, const int32_t* __restrict__ rows, P* __restrict__ pool) {
  const int64_t m = blockIdx.x, W = kvr + dr;
  P* dst = pool + int64_t(rows[m]) * W;
  for (int64_t j = threadIdx.x; j < W; j += blockDim.x) store(dst + j, j < kvr ? c[m * ldc + j] : kr[m * ldkr + j - kvr]);
}
void latent_append(const float* c, int64_t ldc, int64_t kvr, const float* kr, int64_t ldkr, int64_t dr, const int32_t* rows,
                   int64_t M, DType pt, void* pool, cudaStream_t s) {
  check_act(pt, "latent cache");
  if (M <= 0) return;
  if (pt == DType::F32) k_latent_append<<<unsigned(M), 128, 0, s>>>(c, ldc, kvr, kr, ldkr, dr, rows, static_cast<float*>(pool));
  else k_latent_append<<<unsigned(M), 128, 0, s>>>(c, ldc, kvr, kr, ldkr, dr, rows, static_cast<uint16_t*>(pool));
  DSV3_CUDA_CHECK_LAUNCH("latent_append kernel");
}

// Decode-sized per-head products (M small, K and N a few hundred): one block of 8 warps per (head, 32 columns,
// kMT rows). The warps split K (so a block has 8 independent load streams, not one serial loop over K); lanes
// take consecutive columns (coalesced weight rows); partial sums meet in shared memory.
constexpr int kMT = 8, kHW = 8;
template <class W, class Y>
__global__ void __launch_bounds__(kHW * 32) k_head_matmul(const float* __restrict__ x, int64_t xs0, int64_t xs1, int K,
                                                         const W* __restrict__ w, int64_t wsh, int64_t wsk, int N,
                                                         Y* __restrict__ y, int64_t ys0, int64_t ys1, int64_t M) {
  dependent_kernel_begin();
  extern __shared__ float xs[];  // [kMT][K], then red[kHW][kMT][32]
  float* red = xs + kMT * K;
  const int64_t h = blockIdx.x, m0 = int64_t(blockIdx.z) * kMT;
  const int mt = M - m0 < kMT ? int(M - m0) : kMT;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n = blockIdx.y * 32 + lane;
  for (int i = threadIdx.x; i < mt * K; i += blockDim.x) xs[i] = x[(m0 + i / K) * xs0 + h * xs1 + i % K];
  __syncthreads();
  float acc[kMT];
#pragma unroll
  for (int r = 0; r < kMT; ++r) acc[r] = 0.0f;
  if (n < N) {
    const W* wh = w + h * wsh + n;
    const int kc = (K + kHW - 1) / kHW, k0 = warp * kc, k1 = min(K, k0 + kc);
#pragma unroll 4
    for (int k = k0; k < k1; ++k) {
      const float wv = load_f32(wh, int64_t(k) * wsk);
#pragma unroll
      for (int r = 0; r < kMT; ++r)
        if (r < mt) acc[r] = fmaf(xs[r * K + k], wv, acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < kMT; ++r) red[(warp * kMT + r) * 32 + lane] = acc[r];
  __syncthreads();
  for (int i = threadIdx.x; i < mt * 32; i += blockDim.x) {
    const int r = i / 32, l = i % 32, nn = blockIdx.y * 32 + l;
    float v = 0.0f;
#pragma unroll
    for (int q = 0; q < kHW; ++q) v += red[(q * kMT + r) * 32 + l];
    if (nn < N) store(y + (m0 + r) * ys0 + h * ys1 + nn, v);
  }
}
template <class W, class Y>
void launch_head_matmul(dim3 grid, size_t smem, cudaStream_t s, const float* x, int64_t xs0, int64_t xs1, int K, const void* w,
                        int64_t wsh, int64_t wsk, int N, void* y, int64_t ys0, int64_t ys1, int64_t M) {
  launch_dependent(k_head_matmul<W, Y>, grid, dim3(kHW * 32), smem, s, x, xs0, xs1, K, static_cast<const W*>(w), wsh, wsk, N,
                   static_cast<Y*>(y), ys0, ys1, M);
}
void head_matmul(const float* x, int64_t xs0, int64_t xs1, int64_t K, DType wt, const void* w, int64_t wsh, int64_t wsk, int64_t N,
                 DType yt, void* y, int64_t ys0, int64_t ys1, int64_t M, int64_t H, cudaStream_t s) {
  check_act(wt, "head_matmul weight");
  check_act(yt, "head_matmul output");
  if (M * H * N <= 0) return;
  const size_t smem = size_t(kMT) * size_t(K) * sizeof(float) + size_t(kHW * kMT * 32) * sizeof(float);
  DSV3_CHECK(smem <= 48 * 1024, "head_matmul: K = {} is too large", K);
  DSV3_CHECK((M + kMT - 1) / kMT <= 65535, "head_matmul: {} rows are too many", M);
  const dim3 grid(unsigned(H), unsigned((N + 31) / 32), unsigned((M + kMT - 1) / kMT));
  const bool wf = wt == DType::F32, yf = yt == DType::F32;
  auto* launch = wf ? (yf ? launch_head_matmul<float, float> : launch_head_matmul<float, uint16_t>)
                    : (yf ? launch_head_matmul<uint16_t, float> : launch_head_matmul<uint16_t, uint16_t>);
  launch(grid, smem, s, x, xs0, xs1, int(K), w, wsh, wsk, int(N), y, ys0, ys1, M);
  DSV3_CUDA_CHECK_LAUNCH("head_matmul kernel");
}

// ---- MoE rows ----

template <class O>
__global__ void k_gather_rows(const float* __restrict__ x, int64_t ldx, const int32_t* __restrict__ rows, int64_t D,
                              O* __restrict__ y, int64_t ldy) {
  const int64_t i = blockIdx.x;
  const float* src = x + int64_t(rows[i]) * ldx;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) store(y + i * ldy + j, src[j]);
}
void gather_rows(const float* x, int64_t ldx, const int32_t* rows, int64_t n, int64_t D, DType yt, void* y, int64_t ldy,
                 cudaStream_t s) {
  check_act(yt, "gather_rows output");
  if (n <= 0) return;
  if (yt == DType::F32) k_gather_rows<<<unsigned(n), 256, 0, s>>>(x, ldx, rows, D, static_cast<float*>(y), ldy);
  else k_gather_rows<<<unsigned(n), 256, 0, s>>>(x, ldx, rows, D, static_cast<uint16_t*>(y), ldy);
  DSV3_CUDA_CHECK_LAUNCH("gather_rows kernel");
}

__global__ void k_scatter_rows(const float* __restrict__ x, int64_t ldx, const int32_t* __restrict__ rows, int64_t D,
                               float* __restrict__ y, int64_t ldy) {
  const int64_t i = blockIdx.x;
  float* dst = y + int64_t(rows[i]) * ldy;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) dst[j] = x[i * ldx + j];
}
void scatter_rows(const float* x, int64_t ldx, const int32_t* rows, int64_t n, int64_t D, float* y, int64_t ldy, cudaStream_t s) {
  if (n <= 0) return;
  k_scatter_rows<<<unsigned(n), 256, 0, s>>>(x, ldx, rows, D, y, ldy);
  DSV3_CUDA_CHECK_LAUNCH("scatter_rows kernel");
}

__global__ void k_moe_combine(const float* __restrict__ slots, const int32_t* __restrict__ idx, const float* __restrict__ w,
                              int64_t K, int64_t D, float* __restrict__ y, int64_t ldy, bool acc) {
  __shared__ int order[32];
  const int64_t m = blockIdx.x;
  const int32_t* im = idx + m * K;
  if (threadIdx.x < K) {
    int rank = 0;
    for (int64_t j = 0; j < K; ++j) rank += im[j] < im[threadIdx.x] || (im[j] == im[threadIdx.x] && j < int64_t(threadIdx.x));
    order[rank] = int(threadIdx.x);
  }
  __syncthreads();
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float a = 0.0f;
    for (int64_t r = 0; r < K; ++r) {
      const int j = order[r];
      a += slots[(m * K + j) * D + d] * w[m * K + j];
    }
    y[m * ldy + d] = acc ? a + y[m * ldy + d] : a;
  }
}
void moe_combine(const float* slots, const int32_t* idx, const float* w, int64_t M, int64_t K, int64_t D, float* y, int64_t ldy,
                 bool accumulate, cudaStream_t s) {
  DSV3_CHECK(K >= 1 && K <= 32, "moe_combine: top-k {} outside [1, 32]", K);
  if (M <= 0) return;
  k_moe_combine<<<unsigned(M), 256, 0, s>>>(slots, idx, w, K, D, y, ldy, accumulate);
  DSV3_CUDA_CHECK_LAUNCH("moe_combine kernel");
}

}  // namespace dsv3::cuda

// ---- causal attention through cuBLASLt (long prefill) ----
namespace dsv3::cuda {
namespace {
// dst[b·ob + t·ot + h·oh + d·od] = bf16(src[b·s.b + t·s.t + h·s.h + d]) over [B, T, H, D].
__global__ void k_pack_bf16(const float* __restrict__ src, Strides3 s, int64_t T, int64_t H, int64_t D, uint16_t* __restrict__ dst,
                            int64_t ob, int64_t ot, int64_t oh, int64_t od, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t d = i % D, h = (i / D) % H, t = (i / (D * H)) % T, b = i / (D * H * T);
    dst[b * ob + t * ot + h * oh + d * od] = f32_to_bf16(src[b * s.b + t * s.t + h * s.h + d]);
  }
}
// P[i, j] = softmax_j≤i(scale · S[i, j]) in bf16, 0 for j > i (one block per row).
__global__ void k_causal_softmax(const float* __restrict__ S, int64_t T, float scale, uint16_t* __restrict__ P) {
  __shared__ float red[32];
  const int64_t i = blockIdx.x;
  const float* s = S + i * T;
  uint16_t* p = P + i * T;
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) m = fmaxf(m, s[j] * scale);
  m = block_max(m, red);
  float l = 0.0f;
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) l += expf(s[j] * scale - m);
  l = block_sum(l, red);
  const float inv = 1.0f / l;
  for (int64_t j = threadIdx.x; j < T; j += blockDim.x) p[j] = j <= i ? f32_to_bf16(expf(s[j] * scale - m) * inv) : uint16_t(0);
}
}  // namespace

size_t attention_causal_gemm_workspace(int64_t B, int64_t T, int64_t H, int64_t D, int64_t Dv) {
  return size_t(B * T * H * (2 * D + Dv)) * 2 + size_t(T * T) * 4 + size_t(T * T) * 2 + 256 * 3;
}

void attention_causal_gemm(Gemm& g, const float* q, Strides3 sq, const float* k, Strides3 sk, const float* v, Strides3 sv, float* out,
                           Strides3 so, int64_t B, int64_t T, int64_t H, int64_t D, int64_t Dv, float scale, void* ws, size_t ws_bytes,
                           cudaStream_t s) {
  if (B * T * H == 0) return;
  DSV3_CHECK(ws_bytes >= attention_causal_gemm_workspace(B, T, H, D, Dv), "attention_causal_gemm: workspace of {} bytes, {} needed",
             ws_bytes, attention_causal_gemm_workspace(B, T, H, D, Dv));
  auto align = [](uint8_t* p) { return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + 255) & ~uintptr_t(255)); };
  uint8_t* base = align(static_cast<uint8_t*>(ws));
  auto* qb = reinterpret_cast<uint16_t*>(base);                     // [B, T, H, D]
  auto* kb = qb + B * T * H * D;                                    // [B, T, H, D]
  auto* vt = kb + B * T * H * D;                                    // [B, H, Dv, T]
  auto* S = reinterpret_cast<float*>(align(reinterpret_cast<uint8_t*>(vt + B * H * Dv * T)));  // [T, T]
  auto* P = reinterpret_cast<uint16_t*>(align(reinterpret_cast<uint8_t*>(S + T * T)));        // [T, T]
  const int64_t nq = B * T * H * D, nv = B * T * H * Dv;
  k_pack_bf16<<<grid_for(nq, 256), 256, 0, s>>>(q, sq, T, H, D, qb, T * H * D, H * D, D, 1, nq);
  k_pack_bf16<<<grid_for(nq, 256), 256, 0, s>>>(k, sk, T, H, D, kb, T * H * D, H * D, D, 1, nq);
  k_pack_bf16<<<grid_for(nv, 256), 256, 0, s>>>(v, sv, T, H, Dv, vt, H * Dv * T, 1, Dv * T, T, nv);
  DSV3_CUDA_CHECK_LAUNCH("attention_causal_gemm pack kernels");
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const uint16_t* qh = qb + b * T * H * D + h * D;
      const uint16_t* kh = kb + b * T * H * D + h * D;
      g.matmul(DType::BF16, qh, H * D, kh, H * D, DType::F32, S, T, T, T, D, s);  // S = Q Kᵀ
      k_causal_softmax<<<unsigned(T), 256, 0, s>>>(S, T, scale, P);
      DSV3_CUDA_CHECK_LAUNCH("attention_causal_gemm softmax kernel");
      g.matmul(DType::BF16, P, T, vt + (b * H + h) * Dv * T, T, DType::F32, out + b * so.b + h * so.h, so.t, T, Dv, T, s);  // O = P V
    }
}

}  // namespace dsv3::cuda
