// Text generation over the latent cache: chunked prefill, batched decoding of several prompts sharing
// each forward pass, and MTP speculative decoding (DeepSeek-V3 §2.2 / §5.4.3: the MTP module drafts, the
// main model verifies k+1 positions in one pass; greedy output is unchanged and sampling keeps the target
// distribution through the standard rejection rule).
#pragma once
#include <functional>
#include <memory>
#include <vector>

#include "infer/sampler.h"
#include "infer/step_model.h"
#include "model/transformer.h"

namespace dsv3 {

struct GenerateOptions {
  int64_t max_new_tokens = 16;
  SamplingParams sampling;
  std::vector<int64_t> stop_tokens;  // generation of a sequence ends after emitting one of these
  int64_t prefill_chunk = 512;       // prompt tokens per forward pass
  bool speculative = false;          // MTP drafting (needs an MTP layer)
  int64_t draft = 1;                 // tokens drafted per step
  // Batched generation samples where the logits are when the model can (StepModel::can_sample_on_device: the
  // CUDA model, without history penalties): only token ids leave the GPU. Greedy output is the same either way;
  // sampled text follows the device's counter-based draws instead of the host generator's.
  bool device_sampling = true;
};

enum class Finish { Length, Stop, Callback, Context };

struct Generation {
  std::vector<int64_t> tokens;  // generated tokens (the prompt excluded)
  Finish finish = Finish::Length;
};

struct GenerateStats {
  int64_t prefill_tokens = 0, decode_tokens = 0, main_passes = 0, drafted = 0, accepted = 0;
  double prefill_seconds = 0, decode_seconds = 0;
};

// Called for every emitted token; returning false ends that sequence (stop strings, a closed stream).
using TokenCallback = std::function<bool(size_t seq, int64_t token)>;

class Generator {
 public:
  // The CPU model (an adapter owned by the Generator), or any StepModel (e.g. the CUDA model), borrowed.
  explicit Generator(const Transformer& model) : own_(std::make_unique<CpuStepModel>(model)), model_(*own_) {}
  explicit Generator(const StepModel& model) : model_(model) {}
  std::vector<Generation> generate(const std::vector<std::vector<int64_t>>& prompts, const GenerateOptions& opts,
                                   const TokenCallback& on_token = {});
  const GenerateStats& stats() const { return stats_; }

 private:
  std::vector<Generation> generate_batched(const std::vector<std::vector<int64_t>>& prompts, const GenerateOptions& o,
                                           const TokenCallback& cb);
  Generation generate_speculative(size_t seq, const std::vector<int64_t>& prompt, const GenerateOptions& o,
                                  const TokenCallback& cb);
  std::unique_ptr<StepModel> own_;
  const StepModel& model_;
  GenerateStats stats_;
};

}  // namespace dsv3
