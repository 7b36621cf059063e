// Row-wise kernels: conversions, FP8 quantization, RMSNorm, RoPE, SwiGLU, embedding, argmax, softmax.
#include <cfloat>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace dsv3::cuda {

namespace {
using namespace dev;

inline unsigned grid_1d(int64_t n, int threads) {
  const int64_t b = (n + threads - 1) / threads;
  return unsigned(b < 65535 * 32 ? b : 65535 * 32);
}

__global__ void k_f32_to_bf16(const float* __restrict__ s, uint16_t* __restrict__ d, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) d[i] = f32_to_bf16(s[i]);
}
__global__ void k_bf16_to_f32(const uint16_t* __restrict__ s, float* __restrict__ d, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) d[i] = bf16_to_f32(s[i]);
}

// One warp per (row, 128-wide tile); each lane handles 4 elements.
template <class T>
__global__ void k_quantize_1x128(const T* __restrict__ x, int64_t ldx, int64_t M, int64_t K, uint8_t* __restrict__ xq,
                                 float* __restrict__ scale, int64_t sld) {
  // Launched as a programmatic dependent itself: it waits for the kernel that wrote x (before touching x, xq or
  // scale), then lets the FP8 GEMMs that follow start streaming their weights; they wait for this grid before
  // reading what it writes.
  dependent_kernel_begin();
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t tiles = (K + 127) / 128;
  if (warp >= M * tiles) return;
  const int64_t m = warp / tiles, j = warp % tiles;
  float v[4];
  float amax = 0.0f;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t k = j * 128 + e * 32 + lane;
    v[e] = k < K ? load_f32(x + m * ldx, k) : 0.0f;
    amax = fmaxf(amax, fabsf(v[e]));
  }
  amax = warp_max(amax);
  const float s = amax > 0.0f ? amax / 448.0f : 1.0f;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int64_t k = j * 128 + e * 32 + lane;
    if (k < K) xq[m * K + k] = f32_to_fp8e4m3_sat(v[e] / s);
  }
  if (lane == 0) scale[j * sld + m] = s;
}

__global__ void k_dequant_weight(const uint8_t* __restrict__ w, const float* __restrict__ si, int64_t N, int64_t K,
                                 uint16_t* __restrict__ out) {
  const int64_t kb = (K + 127) / 128;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < N * K; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / K, k = i % K;
    out[i] = f32_to_bf16(fp8e4m3_to_f32(w[i]) * si[(n / 128) * kb + k / 128]);
  }
}

// One block per row; y in F32 or BF16 (O), gamma in F32 or BF16 (G).
template <class G, class O>
__global__ void k_rmsnorm(const float* __restrict__ x, int64_t ldx, const G* __restrict__ gamma, float eps,
                          O* __restrict__ y, int64_t ldy, int64_t D) {
  dependent_kernel_begin();
  __shared__ float red[32];
  const float* xr = x + blockIdx.x * ldx;
  O* yr = y + blockIdx.x * ldy;
  float ss = 0.0f;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) ss += xr[j] * xr[j];
  ss = block_sum(ss, red);
  const float r = 1.0f / sqrtf(ss / float(D) + eps);
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) store(yr + j, load_f32(gamma, j) * (xr[j] * r));
}
int rmsnorm_threads(int64_t D) { return D >= 1024 ? 512 : D >= 256 ? 256 : 128; }

__global__ void k_rope_table(const float* __restrict__ inv_freq, int64_t half, float af, int64_t max_pos, float* __restrict__ t) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < max_pos * half; i += int64_t(gridDim.x) * blockDim.x) {
    const float a = float(i / half) * inv_freq[i % half];
    t[2 * i] = cosf(a) * af;
    t[2 * i + 1] = sinf(a) * af;
  }
}

// A block per row: the row's position and table row are read once, and the (head, pair) split is a 32-bit division
// (the grid-stride form's 64-bit divisions per pair held the bf16 query RoPE at 9 us for 4096 x 16 x 16 pairs, H200).
template <class T>
__global__ void k_rope(T* __restrict__ x, int64_t s0, int64_t s1, int H, int half, const int64_t* __restrict__ pos,
                       const float* __restrict__ table) {
  const int64_t m = blockIdx.x;
  const float2* cs_row = reinterpret_cast<const float2*>(table) + pos[m] * half;
  for (int i = threadIdx.x; i < H * half; i += blockDim.x) {
    const int h = i / half, p = i - h * half;
    const float2 cs = cs_row[p];
    T* v = x + m * s0 + h * s1 + 2 * p;
    if constexpr (sizeof(T) == 4) {
      const float a = v[0], b = v[1];
      v[0] = a * cs.x - b * cs.y;
      v[1] = b * cs.x + a * cs.y;
    } else {  // a bf16 pair, 4-byte aligned (even strides and rope offsets)
      const uint32_t u = *reinterpret_cast<const uint32_t*>(v);
      const float a = __uint_as_float(u << 16), b = __uint_as_float(u & 0xffff0000u);
      *reinterpret_cast<uint32_t*>(v) = pack_bf16x2(a * cs.x - b * cs.y, b * cs.x + a * cs.y);
    }
  }
}
int rope_threads(int64_t pairs) { return int(std::min<int64_t>(256, std::max<int64_t>(32, (pairs + 31) / 32 * 32))); }

// kV4: four columns a thread, 16-byte loads (I, ldg, ldo multiples of 4 and aligned bases): the elementwise form
// spent its time on 64-bit index divisions (26 us for 4096 x 704 on an H200, a third of the copy rate).
template <class G, class O, bool kV4>
__global__ void k_silu_mul(const G* __restrict__ gu, int64_t ldg, O* __restrict__ out, int64_t ldo, int64_t M, int64_t I) {
  dependent_kernel_begin();
  const auto silu_mul1 = [](float g, float u) { return g / (1.0f + expf(-g)) * u; };
  if constexpr (kV4) {
    const int64_t q = I / 4;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < M * q; i += int64_t(gridDim.x) * blockDim.x) {
      const int64_t m = i / q, j = (i - m * q) * 4;
      float4 g, u;
      if constexpr (sizeof(G) == 4) {
        g = *reinterpret_cast<const float4*>(gu + m * ldg + j), u = *reinterpret_cast<const float4*>(gu + m * ldg + I + j);
      } else {  // four bf16 a half: one 8-byte load each
        const uint2 gb = *reinterpret_cast<const uint2*>(gu + m * ldg + j), ub = *reinterpret_cast<const uint2*>(gu + m * ldg + I + j);
        g = make_float4(__uint_as_float(gb.x << 16), __uint_as_float(gb.x & 0xffff0000u), __uint_as_float(gb.y << 16),
                        __uint_as_float(gb.y & 0xffff0000u));
        u = make_float4(__uint_as_float(ub.x << 16), __uint_as_float(ub.x & 0xffff0000u), __uint_as_float(ub.y << 16),
                        __uint_as_float(ub.y & 0xffff0000u));
      }
      const float r[4] = {silu_mul1(g.x, u.x), silu_mul1(g.y, u.y), silu_mul1(g.z, u.z), silu_mul1(g.w, u.w)};
      if constexpr (sizeof(O) == 4) {
        *reinterpret_cast<float4*>(out + m * ldo + j) = make_float4(r[0], r[1], r[2], r[3]);
      } else {
        *reinterpret_cast<uint2*>(out + m * ldo + j) = make_uint2(uint32_t(f32_to_bf16(r[0])) | uint32_t(f32_to_bf16(r[1])) << 16,
                                                                  uint32_t(f32_to_bf16(r[2])) | uint32_t(f32_to_bf16(r[3])) << 16);
      }
    }
  } else {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < M * I; i += int64_t(gridDim.x) * blockDim.x) {
      const int64_t m = i / I, j = i % I;
      const float r = silu_mul1(load_f32(gu, m * ldg + j), load_f32(gu, m * ldg + I + j));
      if constexpr (sizeof(O) == 4) out[m * ldo + j] = r;
      else out[m * ldo + j] = f32_to_bf16(r);
    }
  }
}

template <class I, class T>
__global__ void k_embedding(const I* __restrict__ ids, const T* __restrict__ table, int64_t V, int64_t D, float* __restrict__ y,
                            int64_t ldy, uint32_t* __restrict__ err) {
  const int64_t m = blockIdx.x;
  const int64_t id = int64_t(ids[m]);
  float* yr = y + m * ldy;
  if (id < 0 || id >= V) {
    if (threadIdx.x == 0) atomicMin(err, uint32_t(m));
    for (int64_t j = threadIdx.x; j < D; j += blockDim.x) yr[j] = 0.0f;
    return;
  }
  const T* tr = table + id * D;
  for (int64_t j = threadIdx.x; j < D; j += blockDim.x) yr[j] = load_f32(tr, j);
}

__global__ void k_argmax(const float* __restrict__ x, int64_t ld, int64_t V, int32_t* __restrict__ out) {
  __shared__ float sv[32];
  __shared__ int32_t si[32];
  const float* r = x + blockIdx.x * ld;
  float best = -INFINITY;
  int32_t bi = INT32_MAX;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float v = r[j];
    if (v > best || bi == INT32_MAX) { best = v; bi = int32_t(j); }  // strided scan: first max per thread
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, o);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
  }
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  if (lane == 0) { sv[w] = best; si[w] = bi; }
  __syncthreads();
  if (w == 0) {
    const int nw = blockDim.x >> 5;
    best = lane < nw ? sv[lane] : -INFINITY;
    bi = lane < nw ? si[lane] : INT32_MAX;
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, best, o);
      const int32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
    }
    if (lane == 0) out[blockIdx.x] = bi;
  }
}

__global__ void k_softmax(const float* __restrict__ x, int64_t ld, int64_t V, float inv_t, float* __restrict__ y, int64_t ldy) {
  __shared__ float red[32];
  const float* r = x + blockIdx.x * ld;
  float* yr = y + blockIdx.x * ldy;
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) mx = fmaxf(mx, r[j]);
  mx = block_max(mx, red);
  float s = 0.0f;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float e = expf((r[j] - mx) * inv_t);
    yr[j] = e;
    s += e;
  }
  s = block_sum(s, red);
  const float inv = 1.0f / s;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) yr[j] *= inv;
}

void check_float_type(DType t, const char* what) {
  DSV3_CHECK(t == DType::F32 || t == DType::BF16, "{}: dtype {} is not supported (F32 or BF16)", what, dtype_name(t));
}
}  // namespace

void convert(DType st, const void* src, DType dt, void* dst, int64_t n, cudaStream_t s) {
  check_float_type(st, "convert");
  check_float_type(dt, "convert");
  if (n <= 0) return;
  if (st == dt) return copy_on_device(dst, src, size_t(n) * dtype_size(st), s);
  if (st == DType::F32) k_f32_to_bf16<<<grid_1d(n, 256), 256, 0, s>>>(static_cast<const float*>(src), static_cast<uint16_t*>(dst), n);
  else k_bf16_to_f32<<<grid_1d(n, 256), 256, 0, s>>>(static_cast<const uint16_t*>(src), static_cast<float*>(dst), n);
  DSV3_CUDA_CHECK_LAUNCH("convert kernel");
}

void quantize_fp8_1x128(DType xt, const void* x, int64_t ldx, int64_t M, int64_t K, uint8_t* xq, float* scale, cudaStream_t s) {
  check_float_type(xt, "quantize_fp8_1x128");
  if (M <= 0 || K <= 0) return;
  const int64_t warps = M * ceil_div(K, 128);
  const unsigned blocks = unsigned(ceil_div(warps, 8));
  if (xt == DType::F32)
    launch_dependent(k_quantize_1x128<float>, dim3(blocks), dim3(256), 0, s, static_cast<const float*>(x), ldx, M, K, xq, scale,
                     fp8_act_scale_ld(M));
  else
    launch_dependent(k_quantize_1x128<uint16_t>, dim3(blocks), dim3(256), 0, s, static_cast<const uint16_t*>(x), ldx, M, K, xq, scale,
                     fp8_act_scale_ld(M));
  DSV3_CUDA_CHECK_LAUNCH("quantize_fp8_1x128 kernel");
}

void dequantize_fp8_weight(const uint8_t* w, const float* si, int64_t N, int64_t K, uint16_t* out, cudaStream_t s) {
  if (N * K <= 0) return;
  k_dequant_weight<<<grid_1d(N * K, 256), 256, 0, s>>>(w, si, N, K, out);
  DSV3_CUDA_CHECK_LAUNCH("dequantize_fp8_weight kernel");
}

void rmsnorm(const float* x, int64_t ldx, DType gt, const void* gamma, float eps, float* y, int64_t ldy, int64_t M, int64_t D, cudaStream_t s) {
  check_float_type(gt, "rmsnorm weight");
  if (M <= 0) return;
  const int threads = rmsnorm_threads(D);
  const dim3 grid(static_cast<unsigned>(M)), block(threads);
  if (gt == DType::F32)
    launch_dependent(k_rmsnorm<float, float>, grid, block, 0, s, x, ldx, static_cast<const float*>(gamma), eps, y, ldy, D);
  else
    launch_dependent(k_rmsnorm<uint16_t, float>, grid, block, 0, s, x, ldx, static_cast<const uint16_t*>(gamma), eps, y, ldy, D);
  DSV3_CUDA_CHECK_LAUNCH("rmsnorm kernel");
}

void rmsnorm_to(const float* x, int64_t ldx, const float* gamma, float eps, DType yt, void* y, int64_t ldy, int64_t M, int64_t D,
                cudaStream_t s) {
  DSV3_CHECK(yt == DType::F32 || yt == DType::BF16, "rmsnorm_to output: dtype must be F32 or BF16, not {}", dtype_name(yt));
  if (M <= 0) return;
  const int threads = rmsnorm_threads(D);
  const dim3 grid(static_cast<unsigned>(M)), block(threads);
  if (yt == DType::F32)
    launch_dependent(k_rmsnorm<float, float>, grid, block, 0, s, x, ldx, gamma, eps, static_cast<float*>(y), ldy, D);
  else
    launch_dependent(k_rmsnorm<float, uint16_t>, grid, block, 0, s, x, ldx, gamma, eps, static_cast<uint16_t*>(y), ldy, D);
  DSV3_CUDA_CHECK_LAUNCH("rmsnorm_to kernel");
}

void rope_build_table(const float* inv_freq, int64_t half, float af, int64_t max_pos, float* table, cudaStream_t s) {
  if (half * max_pos <= 0) return;
  k_rope_table<<<grid_1d(half * max_pos, 256), 256, 0, s>>>(inv_freq, half, af, max_pos, table);
  DSV3_CUDA_CHECK_LAUNCH("rope_build_table kernel");
}

void rope(float* x, int64_t s0, int64_t s1, int64_t M, int64_t H, int64_t R, const int64_t* pos, const float* table, cudaStream_t s) {
  DSV3_CHECK(R % 2 == 0, "rope: rope dim {} is odd", R);
  if (M * H * R <= 0) return;
  DSV3_CHECK(M < (int64_t(1) << 31) && H * R / 2 < (int64_t(1) << 31), "rope: {} rows x {} pairs", M, H * R / 2);
  k_rope<<<unsigned(M), rope_threads(H * R / 2), 0, s>>>(x, s0, s1, int(H), int(R / 2), pos, table);
  DSV3_CUDA_CHECK_LAUNCH("rope kernel");
}

void rope(uint16_t* x, int64_t s0, int64_t s1, int64_t M, int64_t H, int64_t R, const int64_t* pos, const float* table, cudaStream_t s) {
  DSV3_CHECK(R % 2 == 0 && s0 % 2 == 0 && s1 % 2 == 0 && (reinterpret_cast<uintptr_t>(x) & 3) == 0,
             "rope: bf16 pairs need an even rope dim {}, even strides {} / {} and a 4-byte aligned base", R, s0, s1);
  if (M * H * R <= 0) return;
  DSV3_CHECK(M < (int64_t(1) << 31) && H * R / 2 < (int64_t(1) << 31), "rope: {} rows x {} pairs", M, H * R / 2);
  k_rope<<<unsigned(M), rope_threads(H * R / 2), 0, s>>>(x, s0, s1, int(H), int(R / 2), pos, table);
  DSV3_CUDA_CHECK_LAUNCH("rope kernel");
}

template <class G>
void launch_silu_mul(const G* gu, int64_t ldg, DType ot, void* out, int64_t ldo, int64_t M, int64_t I, cudaStream_t s) {
  check_float_type(ot, "silu_mul output");
  if (M * I <= 0) return;
  const size_t oa = ot == DType::F32 ? 16 : 8;  // a quad's output bytes
  const bool v4 = I % 4 == 0 && ldg % 4 == 0 && ldo % 4 == 0 && (reinterpret_cast<uintptr_t>(gu) & (4 * sizeof(G) - 1)) == 0 &&
                  (reinterpret_cast<uintptr_t>(out) & (oa - 1)) == 0;
  const dim3 grid(grid_1d(v4 ? M * I / 4 : M * I, 256)), block(256);
  if (ot == DType::F32) {
    auto* o = static_cast<float*>(out);
    if (v4) launch_dependent(k_silu_mul<G, float, true>, grid, block, 0, s, gu, ldg, o, ldo, M, I);
    else launch_dependent(k_silu_mul<G, float, false>, grid, block, 0, s, gu, ldg, o, ldo, M, I);
  } else {
    auto* o = static_cast<uint16_t*>(out);
    if (v4) launch_dependent(k_silu_mul<G, uint16_t, true>, grid, block, 0, s, gu, ldg, o, ldo, M, I);
    else launch_dependent(k_silu_mul<G, uint16_t, false>, grid, block, 0, s, gu, ldg, o, ldo, M, I);
  }
  DSV3_CUDA_CHECK_LAUNCH("silu_mul kernel");
}
void silu_mul(const float* gu, int64_t ldg, DType ot, void* out, int64_t ldo, int64_t M, int64_t I, cudaStream_t s) {
  launch_silu_mul(gu, ldg, ot, out, ldo, M, I, s);
}
void silu_mul(const uint16_t* gu, int64_t ldg, DType ot, void* out, int64_t ldo, int64_t M, int64_t I, cudaStream_t s) {
  launch_silu_mul(gu, ldg, ot, out, ldo, M, I, s);
}

void embedding_reset_error(uint32_t* err, cudaStream_t s) { memset_device(err, 0xff, sizeof(uint32_t), s); }

void embedding(DType it, const void* ids, int64_t M, DType tt, const void* table, int64_t V, int64_t D, float* y, int64_t ldy,
               uint32_t* err, cudaStream_t s) {
  DSV3_CHECK(it == DType::I32 || it == DType::I64, "embedding: ids must be I32 or I64, not {}", dtype_name(it));
  check_float_type(tt, "embedding table");
  if (M <= 0) return;
  const int threads = D >= 1024 ? 256 : 128;
  const unsigned g = unsigned(M);
  if (it == DType::I32 && tt == DType::F32)
    k_embedding<<<g, threads, 0, s>>>(static_cast<const int32_t*>(ids), static_cast<const float*>(table), V, D, y, ldy, err);
  else if (it == DType::I32)
    k_embedding<<<g, threads, 0, s>>>(static_cast<const int32_t*>(ids), static_cast<const uint16_t*>(table), V, D, y, ldy, err);
  else if (tt == DType::F32)
    k_embedding<<<g, threads, 0, s>>>(static_cast<const int64_t*>(ids), static_cast<const float*>(table), V, D, y, ldy, err);
  else
    k_embedding<<<g, threads, 0, s>>>(static_cast<const int64_t*>(ids), static_cast<const uint16_t*>(table), V, D, y, ldy, err);
  DSV3_CUDA_CHECK_LAUNCH("embedding kernel");
}

void embedding_check_error(const uint32_t* err, DType it, const void* ids, int64_t V, cudaStream_t s) {
  uint32_t pos = 0;
  copy_to_host(&pos, err, sizeof pos, s);
  synchronize(s);
  if (pos == 0xffffffffu) return;
  int64_t id = 0;
  if (it == DType::I64) {
    copy_to_host(&id, static_cast<const int64_t*>(ids) + pos, sizeof id, s);
  } else {
    int32_t v = 0;
    copy_to_host(&v, static_cast<const int32_t*>(ids) + pos, sizeof v, s);
    id = v;
  }
  synchronize(s);
  fail("token id {} at position {} is out of range [0, {})", id, pos, V);
}

void argmax_rows(const float* x, int64_t ld, int64_t M, int64_t V, int32_t* out, cudaStream_t s) {
  if (M <= 0) return;
  DSV3_CHECK(V > 0 && V < INT32_MAX, "argmax_rows: bad row length {}", V);
  k_argmax<<<unsigned(M), 1024, 0, s>>>(x, ld, V, out);
  DSV3_CUDA_CHECK_LAUNCH("argmax kernel");
}

void softmax_rows(const float* x, int64_t ld, int64_t M, int64_t V, float temperature, float* y, int64_t ldy, cudaStream_t s) {
  DSV3_CHECK(temperature > 0.0f, "softmax_rows: temperature must be > 0, got {}", temperature);
  if (M <= 0) return;
  k_softmax<<<unsigned(M), 1024, 0, s>>>(x, ld, V, 1.0f / temperature, y, ldy);
  DSV3_CUDA_CHECK_LAUNCH("softmax kernel");
}

}  // namespace dsv3::cuda
