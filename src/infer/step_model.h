// What the Generator needs from a model: incremental steps over a latent cache that the model creates.
// Two implementations: the CPU Transformer (CpuStepModel, a thin adapter over Transformer::step/mtp_step and
// its LatentCache) and the CUDA model (infer/cuda_model.h, a paged latent cache on the device). Inputs and
// outputs stay host tensors, so the Generator's sampling and speculative logic is one code path.
#pragma once
#include <memory>
#include <vector>

#include "infer/sampler.h"
#include "model/transformer.h"

namespace dsv3 {

// A model's cache for `slots` sequences of up to `max_tokens` tokens each (main layers and MTP layers).
class StepCache {
 public:
  virtual ~StepCache() = default;
};

class StepModel {
 public:
  virtual ~StepModel() = default;
  virtual const ModelConfig& config() const = 0;
  virtual int64_t mtp_layers() const = 0;
  virtual std::unique_ptr<StepCache> make_cache(int64_t slots, int64_t max_tokens) const = 0;
  // Same semantics as Transformer::step and Transformer::mtp_step (host tensors in and out).
  virtual Transformer::Step step(const std::vector<int64_t>& tokens, const Batch& batch, StepCache& cache,
                                 bool all_logits = false) const = 0;
  virtual Tensor mtp_step(int64_t k, const Tensor& h_prev, const std::vector<int64_t>& ahead, const Batch& batch,
                          StepCache& cache, Tensor* h_out = nullptr) const = 0;
  // Sampling where the logits are (optional): step() over `batch`, then the next token of every sequence drawn
  // from its last row on the model's device, so that only the ids come back (a batch-64 step's logits are 8 MB).
  // The filters are Sampler's without the history penalties (those need the host); the draw is counter-based,
  // keyed by (p.seed, the sequence's slot, draws[i]: how many tokens that sequence has drawn before), so a
  // replayed run gives the same text. Greedy (temperature 0) is the first maximum, as Sampler's.
  virtual bool can_sample_on_device(const SamplingParams& p) const {
    (void)p;
    return false;
  }
  virtual std::vector<int64_t> step_sampled(const std::vector<int64_t>& tokens, const Batch& batch, StepCache& cache,
                                            const SamplingParams& p, const std::vector<uint64_t>& draws) const;
};

// The CPU path: Transformer with its float32 LatentCache.
class CpuStepModel final : public StepModel {
 public:
  explicit CpuStepModel(const Transformer& m) : m_(m) {}
  const ModelConfig& config() const override { return m_.config(); }
  int64_t mtp_layers() const override { return m_.mtp_layers(); }
  std::unique_ptr<StepCache> make_cache(int64_t slots, int64_t max_tokens) const override;
  Transformer::Step step(const std::vector<int64_t>& tokens, const Batch& batch, StepCache& cache,
                         bool all_logits) const override;
  Tensor mtp_step(int64_t k, const Tensor& h_prev, const std::vector<int64_t>& ahead, const Batch& batch, StepCache& cache,
                  Tensor* h_out) const override;

 private:
  const Transformer& m_;
};

}  // namespace dsv3
