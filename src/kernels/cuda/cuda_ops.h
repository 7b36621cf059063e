// The CUDA kernel library: a raw, module-agnostic API (plain device pointers, sizes, element strides and a
// cudaStream_t). Nothing here knows Tensor or the modules; the CUDA backend of ops.h is built on top of it.
// This header needs no CUDA headers and compiles with any C++20 compiler (cudaStream_t is declared the way
// the CUDA runtime declares it). Every entry point checks its launch and turns CUDA/cuBLASLt failures into
// dsv3::Error with a one-line message (file:line, API, error string). Kernels are asynchronous on `stream`
// unless the comment says otherwise. Element strides ("ld") count elements, not bytes.
//
// Conventions: activations f32 (what the CPU ops use) unless a DType argument says otherwise; bf16 values are
// uint16_t bit patterns, fp8 e4m3 values uint8_t (the checkpoint's bytes).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/dtype.h"
#include "core/error.h"  // dsv3::Error, thrown by every entry point

struct CUstream_st;
typedef CUstream_st* cudaStream_t;  // same declaration as the CUDA runtime's

namespace dsv3::cuda {

// ---------------------------------------------------------------------------------------------------------
// Device, memory, errors
// ---------------------------------------------------------------------------------------------------------

// Number of usable CUDA devices; 0 when there is no GPU, no driver, or the driver is too old. Never throws.
int device_count();
// Why device_count() is 0 (the runtime's error string); empty when a device is present.
std::string no_device_reason();
// Throws dsv3::Error("no CUDA GPU available: <reason>") when device_count() == 0.
void require_device();

struct DeviceInfo {
  std::string name;
  int cc_major = 0, cc_minor = 0, sm_count = 0;
  size_t total_mem = 0, l2_bytes = 0, smem_optin = 0;  // smem_optin: per-block shared memory after opt-in
};
DeviceInfo device_info(int device = 0);

void* device_malloc(size_t bytes);  // cudaMalloc; Error naming the size when it fails
void device_free(void* p) noexcept;
// Copies are stream-ordered; with stream == nullptr they run on the legacy default stream and the host-side
// copies (to_host) return when the data is there.
void copy_to_device(void* dst, const void* src, size_t bytes, cudaStream_t stream = nullptr);
void copy_to_host(void* dst, const void* src, size_t bytes, cudaStream_t stream = nullptr);
void copy_on_device(void* dst, const void* src, size_t bytes, cudaStream_t stream = nullptr);
void memset_device(void* dst, int value, size_t bytes, cudaStream_t stream = nullptr);
void synchronize(cudaStream_t stream = nullptr);  // waits and reports any asynchronous error

// Page-locked host memory (cudaMallocHost): copies from and to it are plain DMA, with no staging through the
// driver's bounce buffer. Grow-only: get(n) returns at least n bytes (what it held before is lost on a grow).
void* host_pinned_alloc(size_t bytes);
void host_pinned_free(void* p) noexcept;
// The device's address of page-locked host memory (kernels write there directly; the host reads it after a stream
// synchronisation). The same address under unified addressing.
void* host_pinned_device_pointer(void* p);
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  ~PinnedBuffer() { host_pinned_free(p_); }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  void* get(size_t bytes) {
    if (bytes > n_) {
      host_pinned_free(p_);
      p_ = nullptr;
      n_ = 0;
      p_ = host_pinned_alloc(bytes);
      n_ = bytes;
    }
    return p_;
  }

 private:
  void* p_ = nullptr;
  size_t n_ = 0;
};

// Stream-ordered timing with CUDA events (benchmarks): start(s) ... stop_ms(s) waits and returns milliseconds.
class EventTimer {
 public:
  EventTimer();
  ~EventTimer();
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;
  void start(cudaStream_t stream = nullptr);
  float stop_ms(cudaStream_t stream = nullptr);

 private:
  void* begin_ = nullptr;
  void* end_ = nullptr;
};

// A point in a stream's work the host can wait for (no timing): record(s) after the work, wait() blocks until it is
// done (at once when never recorded). Lazily created: constructing one needs no GPU.
class Event {
 public:
  Event() = default;
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  void record(cudaStream_t stream);
  void wait() const;

 private:
  void* e_ = nullptr;
  bool recorded_ = false;
};

// An owned device allocation of n elements of T (move-only).
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : p_(n ? static_cast<T*>(device_malloc(n * sizeof(T))) : nullptr), n_(n) {}
  ~DeviceBuffer() { device_free(p_); }
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr; o.n_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) { device_free(p_); p_ = o.p_; n_ = o.n_; o.p_ = nullptr; o.n_ = 0; }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return p_; }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// ---------------------------------------------------------------------------------------------------------
// Conversions and FP8 quantization
// ---------------------------------------------------------------------------------------------------------

// dst[i] = src[i] converted (F32 <-> BF16, F32 -> F32, BF16 -> BF16; round-to-nearest-even).
void convert(DType src_type, const void* src, DType dst_type, void* dst, int64_t n, cudaStream_t stream = nullptr);

constexpr int64_t kFp8Block = 128;
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
// Activation scales for the FP8 GEMM: one f32 per 1x128 tile of x [M, K], stored "M-major" as cuBLASLt's
// VEC128_32F expects: scale of (row m, k-tile j) at [j * round_up(M, 4) + m].
inline int64_t fp8_act_scale_ld(int64_t M) { return round_up(M, 4); }
inline int64_t fp8_act_scale_count(int64_t M, int64_t K) { return ceil_div(K, kFp8Block) * fp8_act_scale_ld(M); }
// DeepSeek's act_quant: per 1x128 tile, s = amax / 448 (1 when the tile is all zero), q = e4m3(x / s)
// saturated to ±448. x is F32 or BF16 [M, K] with row stride ldx; xq is [M, K] contiguous.
void quantize_fp8_1x128(DType x_type, const void* x, int64_t ldx, int64_t M, int64_t K, uint8_t* xq, float* scale,
                        cudaStream_t stream = nullptr);
// Decode-sized products: y[m, :N] (f32, row stride ldy) = x[m, :K] (F32 or BF16, row stride ldx) · Wᵀ with f32
// accumulation, for at most kGemvMaxM rows, W BF16 [N, K] or F8_E4M3 [N, K] times w_scale_inv[n / 128, k / 128]
// (activations are not quantized). One launch, made a programmatic dependent of the kernel before it (it
// prefetches its weights while that kernel ends). Needs K a multiple of 16, ldx a multiple of 8 and x 16-byte
// aligned: gemv_supported says whether a call qualifies. scale_split > 0 (FP8): W is two weights stacked by rows,
// the first scale_split rows long, each with its own scale grid (the second's rows follow the first's
// ceil(scale_split / 128) rows), as the model stacks gate | up.
constexpr int64_t kGemvMaxM = 8;
bool gemv_supported(DType x_type, const void* x, int64_t ldx, int64_t M, int64_t K);
void gemv(DType w_type, DType x_type, const void* x, int64_t ldx, int64_t M, const void* w, const float* w_scale_inv, float* y,
          int64_t ldy, int64_t N, int64_t K, cudaStream_t stream = nullptr, int64_t scale_split = 0);
// out[N, K] bf16 = w e4m3 [N, K] · scale_inv[n / 128, k / 128] (scale_inv [ceil(N/128), ceil(K/128)] row-major,
// the checkpoint's weight_scale_inv).
void dequantize_fp8_weight(const uint8_t* w, const float* scale_inv, int64_t N, int64_t K, uint16_t* out_bf16,
                           cudaStream_t stream = nullptr);

// ---------------------------------------------------------------------------------------------------------
// GEMM y[M, N] = x[M, K] · W[N, K]ᵀ through cuBLASLt
// ---------------------------------------------------------------------------------------------------------

// One cuBLASLt handle with its workspace, scratch buffers and a cache of planned products (descriptors and
// the heuristic's algorithm per shape/type/alignment). Not thread-safe: use one per host thread. Scratch grows
// on first use of a shape; for CUDA-graph capture, run each shape once before capturing.
class Gemm {
 public:
  explicit Gemm(size_t workspace_bytes = size_t(32) << 20);
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // x and w both BF16 or both F32 (F32 runs in full f32 precision, no TF32); y F32 or BF16.
  // Row strides ldx >= K, ldw >= K, ldy >= N.
  void matmul(DType xw_type, const void* x, int64_t ldx, const void* w, int64_t ldw, DType y_type, void* y, int64_t ldy,
              int64_t M, int64_t N, int64_t K, cudaStream_t stream = nullptr);

  // FP8 block-scaled: xq e4m3 [M, K] contiguous with scales from quantize_fp8_1x128, w e4m3 [N, K] contiguous
  // with the checkpoint's scale_inv [ceil(N/128), ceil(K/128)]; y F32 or BF16 with row stride ldy.
  // Runs natively (cuBLASLt VEC128_32F x BLK128x128_32F) and returns true; when cuBLASLt refuses the shape
  // it dequantizes both operands to bf16, runs the bf16 GEMM, prints one line to stderr the first time,
  // counts it in fallbacks() and returns false.
  bool matmul_fp8(const uint8_t* xq, const float* x_scale, const uint8_t* w, const float* w_scale_inv, DType y_type,
                  void* y, int64_t ldy, int64_t M, int64_t N, int64_t K, cudaStream_t stream = nullptr);
  // Quantizes x (F32 or BF16, row stride ldx) into scratch on the fly, then matmul_fp8.
  bool linear_fp8(DType x_type, const void* x, int64_t ldx, const uint8_t* w, const float* w_scale_inv, DType y_type,
                  void* y, int64_t ldy, int64_t M, int64_t N, int64_t K, cudaStream_t stream = nullptr);

  size_t cached_plans() const;
  int64_t fallbacks() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// ---------------------------------------------------------------------------------------------------------
// Row-wise ops (twins of src/kernels/cpu: rmsnorm, rope, silu_mul, embedding)
// ---------------------------------------------------------------------------------------------------------

// y = x / sqrt(mean(x²) + eps) * gamma over rows of D; x, y f32; gamma F32 or BF16 [D].
void rmsnorm(const float* x, int64_t ldx, DType gamma_type, const void* gamma, float eps, float* y, int64_t ldy,
             int64_t M, int64_t D, cudaStream_t stream = nullptr);

// RoPE table [max_pos, half, 2] = (cos, sin)(float(pos) · inv_freq[i]) · attention_factor, angles in f32 as the
// CPU op computes them. inv_freq is a device array of `half` values.
void rope_build_table(const float* inv_freq, int64_t half, float attention_factor, int64_t max_pos, float* table,
                      cudaStream_t stream = nullptr);
// In place on x viewed as [M, H, R] (strides s0, s1, unit inner): interleaved pairs (x[2i], x[2i+1]) rotated by
// the table row of positions[m] (device int64, each in [0, max_pos)).
void rope(float* x, int64_t s0, int64_t s1, int64_t M, int64_t H, int64_t R, const int64_t* positions,
          const float* table, cudaStream_t stream = nullptr);
// The same on bf16 x: each pair rotated in f32 and rounded back (a second rounding of values that were bf16 already).
void rope(uint16_t* x, int64_t s0, int64_t s1, int64_t M, int64_t H, int64_t R, const int64_t* positions,
          const float* table, cudaStream_t stream = nullptr);

// out[M, I] = silu(gu[:, :I]) * gu[:, I:] (gu f32 [M, 2I] with row stride ldg); out F32 or BF16 (row stride ldo).
void silu_mul(const float* gu, int64_t ldg, DType out_type, void* out, int64_t ldo, int64_t M, int64_t I,
              cudaStream_t stream = nullptr);
// The same on a bf16 gu (a bf16 model's gate and up outputs).
void silu_mul(const uint16_t* gu, int64_t ldg, DType out_type, void* out, int64_t ldo, int64_t M, int64_t I,
              cudaStream_t stream = nullptr);

// y[i] = table[ids[i]] as f32. ids I32 or I64 (device, M values); table F32 or BF16 [V, D]. An id outside
// [0, V) writes a zero row and records the smallest such position in *err (device uint32; reset it to
// 0xffffffff with embedding_reset_error first). embedding_check_error synchronizes and throws the CPU op's
// message ("token id X at position i is out of range [0, V)").
void embedding_reset_error(uint32_t* err, cudaStream_t stream = nullptr);
void embedding(DType id_type, const void* ids, int64_t M, DType table_type, const void* table, int64_t V, int64_t D,
               float* y, int64_t ldy, uint32_t* err, cudaStream_t stream = nullptr);
void embedding_check_error(const uint32_t* err, DType id_type, const void* ids, int64_t V, cudaStream_t stream = nullptr);

// ---------------------------------------------------------------------------------------------------------
// DeepSeek-V3 router (semantics exactly as ops::moe_route on the CPU)
// ---------------------------------------------------------------------------------------------------------

struct RouterConfig {
  int n_group = 1, topk_group = 1, top_k = 1;
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.0f;
};
// logits f32 [M, E] (row stride ld); bias f32 [E] or nullptr; idx int32 [M, top_k] (descending choice score,
// ties to the lower index), w f32 [M, top_k]. Requires E % n_group == 0, E <= 1024, top_k <= 32.
void moe_route(const float* logits, int64_t ld, int64_t M, int64_t E, const float* bias, const RouterConfig& cfg,
               int32_t* idx, float* w, cudaStream_t stream = nullptr);
// The same routing by one block per token (route_block: ranks instead of serial top-k passes; what the persistent
// decode kernel runs), exposed for its twin test against moe_route's CPU semantics.
void moe_route_block(const float* logits, int64_t ld, int64_t M, int64_t E, const float* bias, const RouterConfig& cfg,
                     int32_t* idx, float* w, cudaStream_t stream = nullptr);
// The whole router of a decode step in one launch: logits = x · gateᵀ (x f32 [M, D] row stride ldx, gate f32
// [E, D]; one warp per expert), written to `logits` ([M, E] scratch), then routed as moe_route by the last block to
// finish. `counter`: one device uint32 that is 0 before the launch and is 0 again after it. M <= kGateRouteMaxM
// (the routing runs in one block); D and ldx multiples of 4.
constexpr int64_t kGateRouteMaxM = 16;
void moe_gate_route(const float* x, int64_t ldx, int64_t M, const float* gate, int64_t D, int64_t E, const float* bias,
                    const RouterConfig& cfg, float* logits, uint32_t* counter, int32_t* idx, float* w, cudaStream_t stream = nullptr);

// ---------------------------------------------------------------------------------------------------------
// Sampling helpers
// ---------------------------------------------------------------------------------------------------------

// out[m] = index of the first maximum of row m (as torch.argmax / std::max_element).
void argmax_rows(const float* x, int64_t ld, int64_t M, int64_t V, int32_t* out, cudaStream_t stream = nullptr);
// y = softmax(x / temperature) per row (temperature > 0).
void softmax_rows(const float* x, int64_t ld, int64_t M, int64_t V, float temperature, float* y, int64_t ldy,
                  cudaStream_t stream = nullptr);

// ---------------------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------------------

// Element strides of a [B, T, H, D] view with unit inner stride.
struct Strides3 {
  int64_t b = 0, t = 0, h = 0;
};
// Causal softmax attention (twin of ops::attention_causal): q, k [B, T, H, D], v [B, T, H, Dv], out [B, T, H, Dv],
// f32, flash-style (one pass over the keys, online softmax). D, Dv <= 256.
void attention_causal(const float* q, Strides3 sq, const float* k, Strides3 sk, const float* v, Strides3 sv, float* out,
                      Strides3 so, int64_t B, int64_t T, int64_t H, int64_t D, int64_t Dv, float scale,
                      cudaStream_t stream = nullptr);

// Absorbed-MLA decode attention over a paged latent cache (twin of ops::attention_latent; FlashMLA's layout).
// q: f32 [batch, s_q, H, W] contiguous (W = kv_lora_rank + rope dim, e.g. 576). The cache of sequence b is the
// rows block_table[b * max_blocks + r / block_size] * block_size + r % block_size of `pool` ([num_blocks,
// block_size, W], F32 or BF16); with block_table == nullptr every sequence reads the same contiguous rows
// pool[r] (one sequence). Query (b, i) sees rows 0..positions[b * s_q + i] (device int32).
// out f32 [batch, s_q, H, R] = softmax(q·rowsᵀ·scale) · rows[:, :R]. Long contexts are split across blocks
// (flash-decoding) into `workspace` (attention_latent_workspace_bytes); max_len bounds every position + 1.
// Precision: a BF16 cache with W = 576, R = 512 runs on the tensor cores with q and the probabilities rounded
// to bf16 (f32 accumulation; rel. L2 ~7e-4 against the f32 CPU op); other caches run in exact f32.
// The block table is read with row / block_size for any block_size; FlashMLA's layout is block_size 64.
struct LatentAttention {
  int64_t batch = 1, s_q = 1, heads = 1, W = 576, R = 512;
  int64_t block_size = 64, max_blocks = 0;  // block table row length
  int64_t max_len = 0;                      // host-known bound on cached rows (sets the split count)
  float scale = 1.0f;
};
size_t attention_latent_workspace_bytes(const LatentAttention& p);
void attention_latent(const LatentAttention& p, const float* q, DType cache_type, const void* pool,
                      const int32_t* block_table, const int32_t* positions, float* out, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream = nullptr);

}  // namespace dsv3::cuda
