// The model on one CUDA GPU: a device copy of a loaded checkpoint (weights uploaded once), the uncached
// forward (expanded MLA with the causal prefill kernel) and incremental steps over a paged latent cache on the
// device (absorbed MLA with the paged decode kernel, block size 64 as FlashMLA), with the semantics of
// Transformer::forward / step / mtp_step. It implements StepModel, so the Generator runs on it unchanged.
//
// Compute dtypes: BF16 (bf16 weights, f32 activations and accumulation; FP8 checkpoints run their routed experts
// natively in e4m3 and the other projections on bf16 weights dequantized once at load, see fp8_dense_native; with
// fp8_native off every weight is dequantized to bf16 at load) or F32 (every weight
// dequantized to f32, f32 GEMMs without TF32, f32 latent cache: the golden models' precision). The router
// always runs in f32 (as transformers does). Decode steps (one token per sequence, BF16) run with no host
// synchronisation and are captured as CUDA graphs per (batch, context bucket).
//
// Built only with CUDA (DSV3_HAVE_CUDA); the header itself needs no CUDA headers.
#pragma once
#include <memory>
#include <string>

#include "infer/step_model.h"

namespace dsv3 {

struct CudaModelOptions {
  DType dtype = DType::BF16;  // BF16 or F32
  bool fp8_native = true;     // FP8 checkpoints with BF16: the routed experts' e4m3 weights used as stored
  // FP8 checkpoints, the projections outside the routed experts (attention, shared experts, dense MLPs): false:
  // dequantized to bf16 once at load, as DeepSeek's reference inference does per call (its default gemm_impl
  // "bf16"); they are a small part of the bytes (small.json: ~15%) but at decode batches their e4m3 products (an
  // activation quantize and a block-scaled GEMM each) cost more than bf16's (H200 batch 64: 1.71 vs 1.98 ms a step).
  // true: FP8 too (half their bytes), and batch-1 steps on the persistent kernel's e4m3 variant (0.65 vs 0.80 ms).
  // The environment's DSV3_FP8_DENSE_NATIVE=0/1 overrides it (A/B runs); the CLI's --fp8-dense chooses it.
  bool fp8_dense_native = false;
  bool graphs = true;         // capture decode steps as CUDA graphs
  bool verbose = false;       // one line about the upload (bytes, seconds) on stderr
  // Batch-1 decode steps of bf16 models as one persistent kernel (persistent_ops.h) where the shape allows;
  // off (or DSV3_NO_PERSISTENT=1): the per-op launches. persistent_blocks > 0 sets its grid (tests), else one per SM.
  bool persistent_decode = true;
  int persistent_blocks = 0;
};

class CudaModel final : public StepModel {
 public:
  // Uploads the weights of `host` (read from its checkpoint by official name; the host model may be dropped
  // afterwards). Errors: no GPU ("no CUDA GPU available: ..."), weights larger than the free GPU memory.
  static std::unique_ptr<CudaModel> load(const Transformer& host, const CudaModelOptions& opts = {});
  ~CudaModel() override;

  // As Transformer::forward (host tensors out; hidden_states and routing on request).
  ForwardResult forward(const Tensor& input_ids, const ForwardOptions& opts = {}) const;

  const ModelConfig& config() const override;
  int64_t mtp_layers() const override;
  // Errors when the cache does not fit in the free GPU memory.
  std::unique_ptr<StepCache> make_cache(int64_t slots, int64_t max_tokens) const override;
  Transformer::Step step(const std::vector<int64_t>& tokens, const Batch& batch, StepCache& cache,
                         bool all_logits = false) const override;
  Tensor mtp_step(int64_t k, const Tensor& h_prev, const std::vector<int64_t>& ahead, const Batch& batch, StepCache& cache,
                  Tensor* h_out = nullptr) const override;
  // On the GPU (sample_rows, after the step's graph): every filter but the history penalties.
  bool can_sample_on_device(const SamplingParams& p) const override;
  std::vector<int64_t> step_sampled(const std::vector<int64_t>& tokens, const Batch& batch, StepCache& cache,
                                    const SamplingParams& p, const std::vector<uint64_t>& draws) const override;

  // Bytes of weights on the device, and what one batch-1 decode step reads at least: every weight of the
  // main model except the embedding table and the routed experts, plus one embedding row and top_k experts
  // per MoE layer (the roofline bound of decoding).
  int64_t weight_bytes() const;
  int64_t decode_bytes_per_token() const;
  DType dtype() const;
  int64_t graph_replays() const;  // decode steps that ran as a replayed CUDA graph
  // Empty when batch-1 decode steps run as the persistent kernel, else why they do not.
  std::string persistent_decode_unavailable() const;
  // Benchmarking: GPU milliseconds per replay of the most recently captured decode graph (replayed `reps`
  // times back to back, event-timed; it rewrites the same cache rows, so that cache must still exist), or -1
  // when none was captured.
  double time_last_graph_ms(int reps) const;
  // Benchmarking: with time_steps(true), each step that runs uncaptured (a prefill) records events around its
  // kernels; last_step_gpu_ms() is the latest span in GPU milliseconds (-1 before any), so that a bench can tell the
  // GPU's time from the host work around it.
  void time_steps(bool on);
  double last_step_gpu_ms() const;

  struct Impl;

 private:
  explicit CudaModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsv3
