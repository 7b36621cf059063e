// Architecture arithmetic for `dsv3 info` and the benchmarks: parameter counts (total, active per token),
// the latent KV cache per token, and forward FLOPs.
#pragma once
#include <cstdint>

#include "io/config.h"

namespace dsv3 {

struct ModelStats {
  int64_t params_main = 0;     // main model (embedding, layers, final norm, head)
  int64_t params_mtp = 0;      // MTP modules, excluding the embedding/head they share with the main model
  int64_t active_main = 0;     // main-model parameters used per token (top-k routed experts, not all)
  int64_t kv_cache_values_per_token = 0;  // layers × (kv_lora_rank + qk_rope_head_dim)
  // Forward FLOPs per token of the main model at context length T (matmuls, 2 per multiply-add),
  // attention averaged over causal positions.
  double forward_flops_per_token(int64_t T) const;
  ModelConfig cfg;
};

ModelStats model_stats(const ModelConfig& cfg);

}  // namespace dsv3
