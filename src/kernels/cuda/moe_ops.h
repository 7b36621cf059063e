// CUDA kernels for the routed experts of a DeepSeekMoE layer (prefill and decode) and for sampling on the GPU.
// Same conventions as cuda_ops.h: raw device pointers, element strides, a cudaStream_t, no CUDA headers needed,
// failures as dsv3::Error. Implementation: moe.cu (experts) and sampling.cu (sampling).
//
// Semantics are those of the CPU Moe::forward (src/model/modules.cpp) for the routed part:
//   y[m] = Σ_j w[m, j] · down_e( silu(gate_e · x[m]) * (up_e · x[m]) ),  e = idx[m, j]
// summed per token in ascending expert order (the CPU's index_add order), accumulated in f32, then added to
// what y holds (the shared experts' output) when `accumulate` is true: y[m] = Σ + y[m], as the CPU does.
// Nothing here uses float atomics: every output element has one writer and a fixed summation order, so results
// are bitwise reproducible run to run.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/cuda/cuda_ops.h"

#if defined(__CUDACC__)
#define DSV3_HD __host__ __device__ __forceinline__
#else
#define DSV3_HD inline
#endif

namespace dsv3::cuda {

// ---------------------------------------------------------------------------------------------------------
// The routed experts of one layer
// ---------------------------------------------------------------------------------------------------------

// Non-owning view of E experts' weights (device memory, owned by the engine) plus the device-side pointer
// tables this object owns (built once in the constructor; synchronous upload).
//   type BF16: gate_up[e] -> [2I, D] bf16 (rows 0..I-1 = gate_proj, I..2I-1 = up_proj), down[e] -> [D, I] bf16.
//   type F8_E4M3: the same shapes in e4m3 bytes, with the checkpoint's 128x128 block scales (weight_scale_inv):
//     gate_up_scale[e] -> [2·ceil(I/128), ceil(D/128)] f32 = gate's scale rows, then up's (each proj keeps its
//     own blocks, so I need not be a multiple of 128); down_scale[e] -> [ceil(D/128), ceil(I/128)].
// Requirements: D % 8 == 0, I % 8 == 0, pointers 16-byte aligned.
class MoeExperts {
 public:
  MoeExperts() = default;
  MoeExperts(int64_t E, int64_t D, int64_t I, DType type, std::vector<const void*> gate_up, std::vector<const void*> down,
             std::vector<const float*> gate_up_scale = {}, std::vector<const float*> down_scale = {});
  ~MoeExperts();
  MoeExperts(MoeExperts&&) noexcept;
  MoeExperts& operator=(MoeExperts&&) noexcept;
  MoeExperts(const MoeExperts&) = delete;
  MoeExperts& operator=(const MoeExperts&) = delete;

  int64_t E = 0, D = 0, I = 0;
  DType type = DType::BF16;
  // Host copies of the pointers (used by the prefill path, which calls cuBLASLt per expert).
  std::vector<const void*> gate_up, down;
  std::vector<const float*> gate_up_scale, down_scale;
  // Device arrays of the same pointers (E entries each; scale tables null for BF16), read by the decode kernels.
  const void* const* d_gate_up() const { return static_cast<const void* const*>(table_[0]); }
  const void* const* d_down() const { return static_cast<const void* const*>(table_[1]); }
  const float* const* d_gate_up_scale() const { return static_cast<const float* const*>(table_[2]); }
  const float* const* d_down_scale() const { return static_cast<const float* const*>(table_[3]); }
  // Bytes of weights (and scales) of one expert: what decoding reads per distinct expert chosen.
  int64_t bytes_per_expert() const;

 private:
  void* table_[4] = {nullptr, nullptr, nullptr, nullptr};
};

// ---------------------------------------------------------------------------------------------------------
// Decode: fused routed experts for a few tokens, no host synchronisation (CUDA-graph capturable)
// ---------------------------------------------------------------------------------------------------------

// Largest M·top_k moe_decode accepts (one block sorts the slots).
constexpr int64_t kMoeDecodeMaxSlots = 1024;
// The shared experts of a layer as one expert of width I (gate | up [2I, D], down [D, I]) in the routed experts'
// dtype and layout (FP8: gate's scale rows, then up's), for moe_decode to fold in.
struct MoeSharedExpert {
  const void* gate_up = nullptr;
  const void* down = nullptr;
  const float* gate_up_scale = nullptr;
  const float* down_scale = nullptr;
  int64_t I = 0;
};
// D: the model width (room for per-slot outputs when M > kGemvMaxM; 0 only for M <= kGemvMaxM).
size_t moe_decode_workspace_bytes(int64_t M, int64_t top_k, int64_t E, int64_t I, int64_t shared_I = 0, int64_t D = 0);
// x f32 [M, D] (row stride ldx); idx int32 [M, top_k] and wts f32 [M, top_k] in device memory (e.g. from
// moe_route); y f32 [M, D] (row stride ldy): y = Σ (+ y when accumulate). Each distinct chosen expert's
// weights are read once whatever the number of tokens that chose it. Two kernels: gate|up + SiLU·mul into
// `workspace` per (token, slot), then down + the weighted sum per token. Requires M·top_k <= kMoeDecodeMaxSlots,
// E <= 1024, x and y 16-byte aligned rows (ldx, ldy multiples of 4). Meant for M <= 64; any M within the limit
// is correct. Precision: weights as stored (bf16, or e4m3 × block scale), x and all sums in f32.
// Beyond kGemvMaxM tokens (without `shared`) the groups' down products run in parallel into per-slot rows, then
// moe_combine sums them (a third launch; the serial walk over groups costs more at batch 64).
// With `shared`, the same two kernels also compute the shared expert of every token (extra blocks of the first, a
// last term in the second): y = Σ routed + shared(x) (+ y when accumulate); the workspace then needs shared->I.
void moe_decode(const MoeExperts& w, const float* x, int64_t ldx, const int32_t* idx, const float* wts, int64_t M,
                int64_t top_k, float* y, int64_t ldy, bool accumulate, void* workspace, size_t workspace_bytes,
                cudaStream_t stream = nullptr, const MoeSharedExpert* shared = nullptr);

// ---------------------------------------------------------------------------------------------------------
// Prefill: token permutation + grouped expert GEMMs through cuBLASLt
// ---------------------------------------------------------------------------------------------------------

// Stable grouping of the M·top_k slots (slot s = m·top_k + j) by expert, all on the device:
//   counts[e] = #slots routed to e; offsets[e] = Σ_{e' < e} counts[e'] (E + 1 entries, offsets[E] = M·top_k);
//   perm[p] = the slot at permuted row p (slots of expert e at rows offsets[e].., in ascending slot order);
//   slot_row[s] = the permuted row of slot s (inverse of perm). Requires E <= 1024. idx out of [0, E) -> the
//   slot is counted nowhere and a later moe_unpermute reads garbage: route with moe_route. chunk_first: scratch of
//   moe_permute_chunks(M, top_k) · E ints.
int64_t moe_permute_chunks(int64_t M, int64_t top_k);
void moe_permute(const int32_t* idx, int64_t M, int64_t top_k, int64_t E, int32_t* counts, int32_t* offsets,
                 int32_t* perm, int32_t* slot_row, int32_t* chunk_first, cudaStream_t stream = nullptr);
// out[p, :] = x[perm[p] / top_k, :] converted to out_type (F32 or BF16); rows = M·top_k.
void moe_gather(const float* x, int64_t ldx, const int32_t* perm, int64_t rows, int64_t top_k, int64_t D,
                DType out_type, void* out, int64_t ldo, cudaStream_t stream = nullptr);
// y[m, :] = Σ_j w[m, j] · expert_out[slot_row[m·top_k + j], :] in ascending idx[m, j] order (+ y[m, :] when
// accumulate); expert_out f32 with row stride ld.
void moe_unpermute(const float* expert_out, int64_t ld, const int32_t* slot_row, const int32_t* idx, const float* wts,
                   int64_t M, int64_t top_k, int64_t D, float* y, int64_t ldy, bool accumulate,
                   cudaStream_t stream = nullptr);
// The same on bf16 expert outputs (each widened to f32; the sums and y in f32).
void moe_unpermute(const uint16_t* expert_out, int64_t ld, const int32_t* slot_row, const int32_t* idx, const float* wts,
                   int64_t M, int64_t top_k, int64_t D, float* y, int64_t ldy, bool accumulate,
                   cudaStream_t stream = nullptr);

// Grouped expert GEMMs over rows grouped by expert (offsets from moe_permute, `slots` = offsets[E] known to the
// host), one launch each, bf16 activations, f32 accumulation on the tensor cores; FP8 weights are dequantized
// to bf16 (e4m3 x block scale, rounded) on the way. Requires moe_grouped_supported (D % 32 == 0, I % 32 == 0).
//   moe_grouped_swiglu: h[p, :] = bf16(silu(gate_e · x[p]) * (up_e · x[p])), x = xg [slots, D], h [slots, I].
//   moe_grouped_down:   out[p, :] = down_e · h[p] (f32 [slots, D]).
bool moe_grouped_supported(const MoeExperts& w);
// A dense product of a decode batch: y[M, N] (f32, row stride ldy) = x[M, K] (bf16, row stride ldx) · W[N, K]ᵀ,
// W bf16 or e4m3 with its 128x128 block scales (dequantized to bf16 in shared memory), as one group of the grouped
// kernel's 32-row tiles with K split over a thread-block cluster (up to 8 blocks, partial tiles summed through
// distributed shared memory in rank order: deterministic) so that a few output tiles still fill the GPU.
constexpr int64_t kRowsGemmMaxRows = 128;
bool rows_gemm_supported(const void* x, int64_t ldx, int64_t M, int64_t K, const float* y, int64_t ldy);
void rows_gemm(DType wt, const uint16_t* x, int64_t ldx, int64_t M, const void* w, const float* scale, int64_t N, int64_t K,
               float* y, int64_t ldy, cudaStream_t stream = nullptr);
// The same product on e4m3 activations (moe_grouped_fp8.cu's kernel as one group): xq [M, K] contiguous with
// quantize_fp8_1x128's scales, W e4m3 [N, K] with its 128x128 block scales, y f32 (row stride ldy); K a multiple
// of 16. A programmatic dependent like the grouped FP8 kernels (weights streamed before waiting for the kernel
// before it, which writes xq: quantize_fp8_1x128 lets it start).
bool rows_gemm_fp8_supported(int64_t M, int64_t K, const float* y, int64_t ldy);
void rows_gemm_fp8(const uint8_t* xq, const float* x_scale, int64_t M, const uint8_t* w, const float* scale, int64_t N, int64_t K,
                   float* y, int64_t ldy, cudaStream_t stream = nullptr);
// x_rows (or null): slot p reads row x_rows[p] / top_k of xg (moe_permute's perm over the tokens' bf16 rows,
// [M, D]: no gathered copy).
void moe_grouped_swiglu(const MoeExperts& w, const uint16_t* xg, const int32_t* offsets, int64_t slots, uint16_t* h,
                        cudaStream_t stream = nullptr, const int32_t* x_rows = nullptr, int64_t top_k = 1);
void moe_grouped_down(const MoeExperts& w, const uint16_t* h, const int32_t* offsets, int64_t slots, float* out,
                      cudaStream_t stream = nullptr);
// The same with out_type F32 or BF16 (the expert outputs rounded to bf16, as a bf16 model's down_proj returns them).
void moe_grouped_down(const MoeExperts& w, const uint16_t* h, const int32_t* offsets, int64_t slots, void* out, DType out_type,
                      cudaStream_t stream = nullptr);
// The FP8 checkpoint's grouped GEMMs on e4m3 activations (moe_grouped_fp8.cu): activations quantized per 1x128
// tile as quantize_fp8_1x128 does, both operands e4m3 on the tensor cores, each 128-wide k block's f32 partial sum
// times (activation scale x weight block scale) added in f32. Requires moe_grouped_fp8_supported (F8_E4M3,
// D % 16 == 0, I % 16 == 0). Same outputs as the two above.
//   swiglu: xq e4m3 rows with scales at [j · x_scale_ld + r]; slot p reads row x_rows[p] / x_row_div (moe_permute's
//     perm and top_k: the tokens' rows, quantized once, no gather), or row p when x_rows is null.
//   down: hq [slots, I] with scales at [j · fp8_act_scale_ld(slots) + p].
// Both are programmatic dependents that read offsets and start on the weights before waiting for the kernel
// before them: offsets must be complete before that kernel starts (moe_prefill: permute, quantize, GEMM).
bool moe_grouped_fp8_supported(const MoeExperts& w);
void moe_grouped_swiglu_fp8(const MoeExperts& w, const uint8_t* xq, const float* x_scale, int64_t x_scale_ld, const int32_t* x_rows,
                            int64_t x_row_div, const int32_t* offsets, int64_t slots, uint16_t* h, cudaStream_t stream = nullptr);
void moe_grouped_down_fp8(const MoeExperts& w, const uint8_t* hq, const float* h_scale, const int32_t* offsets, int64_t slots,
                          float* out, cudaStream_t stream = nullptr);

size_t moe_prefill_workspace_bytes(int64_t M, int64_t top_k, int64_t E, int64_t D, int64_t I);
// The whole routed-expert FFN for many tokens: permute, gather x as bf16 rows, then, when D and I are multiples
// of 32 (moe_grouped_supported), the two grouped kernels below (no host synchronisation; with bf16 activations the
// expert outputs are rounded to bf16 before the weighted sum, as in a bf16 model); otherwise per expert
// one cuBLASLt GEMM for gate|up [n_e, 2I] (f32 out), one SiLU·mul over all rows (bf16 out), per expert one GEMM
// for down (f32) — that fallback copies the per-expert row counts to the host, so it SYNCHRONIZES `stream` and
// runs FP8 experts through gemm.linear_fp8 (activations quantized 1x128 on the fly). Then un-permute. Same
// x/idx/wts/y contract as moe_decode; any M. FP8 experts with fp8_activations (and moe_grouped_fp8_supported):
// x and h are quantized to e4m3 per 1x128 tile and multiplied by the e4m3 weights as they are (DeepSeek-V3's
// recipe, moe_grouped_*_fp8); without it the grouped kernels dequantize the weights to bf16 (bf16 activations).
// no_gather (bf16 activations, ldx == D): x cast to bf16 once and read through the permutation by the gate|up
// kernel instead of gathered into a [M·top_k, D] copy (the same products); x_bf16 (or null): that cast already made
// (bf16(x), rows of D), e.g. by the norm that wrote x.
// defer (or null): the un-permute is left to the next layer boundary (residual_rmsnorm with these rows, infer_ops.h,
// when residual_rmsnorm_moe_supported): y is not written (with accumulate, the caller adds it there as d); the rows
// live in the workspace, and idx / wts must stay unchanged until then.
struct MoeRowsSum {
  DType eo_type = DType::BF16;  // BF16 or F32 expert outputs
  const void* eo = nullptr;     // [slots, ld]
  int64_t ld = 0;
  const int32_t* slot_row = nullptr;  // [M, top_k]: the slot of each choice
  const int32_t* idx = nullptr;       // [M, top_k]: its expert
  const float* wts = nullptr;         // [M, top_k]: its weight
  int64_t top_k = 0;
};
void moe_prefill(Gemm& gemm, const MoeExperts& w, const float* x, int64_t ldx, const int32_t* idx, const float* wts,
                 int64_t M, int64_t top_k, float* y, int64_t ldy, bool accumulate, void* workspace,
                 size_t workspace_bytes, cudaStream_t stream = nullptr, bool fp8_activations = true, bool no_gather = false,
                 const uint16_t* x_bf16 = nullptr, MoeRowsSum* defer = nullptr);


// ---------------------------------------------------------------------------------------------------------
// Sampling on the GPU (no host synchronisation; graph-capturable)
// ---------------------------------------------------------------------------------------------------------

// The filters of dsv3::Sampler (src/infer/sampler.h) without the history penalties: softmax at temperature,
// then on the stable descending order: top-k, top-p (smallest prefix with mass >= top_p), min-p (p >= min_p ·
// p_max, at least one token); then one draw from the renormalised kept mass. temperature <= 0 is greedy
// (first maximum). The kept set equals Sampler::distribution's; the draw uses the counter-based RNG below, so
// a (seed, step, row) triple always gives the same token (bitwise, run to run).
struct GpuSampling {
  float temperature = 0.0f;  // <= 0: greedy
  int top_k = 0;             // 0: off
  float top_p = 1.0f;        // 1: off
  float min_p = 0.0f;        // 0: off
};
size_t sample_workspace_bytes(int64_t B, int64_t V);
// What a draw also writes (each optional): host, the ids into page-locked host memory (its device address; no copy
// after the kernel); ids..dst_rows, a decode step's metadata advanced to the next step of the same B sequences, one
// position on, the drawn id as its token (step-ahead decoding, as decode_meta_advance).
struct SampleOutputs {
  int32_t* host = nullptr;
  int64_t* ids = nullptr;
  int64_t* pos64 = nullptr;
  int32_t* pos32 = nullptr;
  int32_t* dst_rows = nullptr;
};
// logits f32 [B, V] (row stride ld); rng: device uint64 [B, 2] = (seed, step) per row; out int32 [B]. With
// advance_step the kernel increments each row's step after its draw (so a captured graph replays new draws).
// Probabilities are compared in a fixed-point form (p · 2^52 truncated to an integer) so that sums are exact
// and order-free; the draw picks the first kept token (index order) whose running fixed-point mass exceeds
// floor(u · total), u = philox_uniform(seed, step, row).
void sample_rows(const float* logits, int64_t ld, int64_t B, int64_t V, const GpuSampling& p, uint64_t* rng,
                 bool advance_step, int32_t* out, void* workspace, size_t workspace_bytes,
                 cudaStream_t stream = nullptr, const SampleOutputs& also = {});

// Philox-4x32-10 (Salmon et al. 2011) on counter (row, step_lo, step_hi, 0) with key (seed_lo, seed_hi): the same
// function on host and device. philox_uniform returns a double in [0, 1) with 53 random bits.
struct Philox4 {
  uint32_t v[4];
};
DSV3_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0, p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0, n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {{c0, c1, c2, c3}};
}
DSV3_HD double philox_uniform(uint64_t seed, uint64_t step, uint64_t row) {
  const Philox4 r = philox4x32_10(uint32_t(row), uint32_t(step), uint32_t(step >> 32), uint32_t(row >> 32), uint32_t(seed),
                                  uint32_t(seed >> 32));
  const uint64_t bits = (uint64_t(r.v[0]) << 32 | r.v[1]) >> 11;
  return double(bits) * 0x1.0p-53;
}
// The fixed-point probability of the sampler: p · 2^52 truncated (p in [0, 1]).
DSV3_HD uint64_t prob_fixed(float p) { return uint64_t(double(p) * 0x1.0p52); }

}  // namespace dsv3::cuda
