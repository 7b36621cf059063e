#include "infer/step_model.h"

namespace dsv3 {

namespace {
struct CpuCache final : StepCache {
  CpuCache(const ModelConfig& c, int64_t slots, int64_t max_tokens) : cache(c, slots, max_tokens) {}
  LatentCache cache;
};
LatentCache& cpu_cache(StepCache& c) {
  auto* p = dynamic_cast<CpuCache*>(&c);
  DSV3_CHECK(p != nullptr, "internal error: a cache of another device was given to the CPU model");
  return p->cache;
}
}  // namespace

std::unique_ptr<StepCache> CpuStepModel::make_cache(int64_t slots, int64_t max_tokens) const {
  return std::make_unique<CpuCache>(m_.config(), slots, max_tokens);
}

Transformer::Step CpuStepModel::step(const std::vector<int64_t>& tokens, const Batch& batch, StepCache& cache,
                                     bool all_logits) const {
  return m_.step(tokens, batch, cpu_cache(cache), all_logits);
}

Tensor CpuStepModel::mtp_step(int64_t k, const Tensor& h_prev, const std::vector<int64_t>& ahead, const Batch& batch,
                              StepCache& cache, Tensor* h_out) const {
  return m_.mtp_step(k, h_prev, ahead, batch, cpu_cache(cache), h_out);
}

std::vector<int64_t> StepModel::step_sampled(const std::vector<int64_t>&, const Batch&, StepCache&, const SamplingParams&,
                                             const std::vector<uint64_t>&) const {
  throw Error("internal error: this model does not sample on its device (check can_sample_on_device first)");
}

}  // namespace dsv3
