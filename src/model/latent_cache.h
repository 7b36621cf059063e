// The latent KV cache of MLA (§2.1.1): per layer and token only kv_a_layernorm(c_kv) and the roped k_rope,
// (kv_lora_rank + qk_rope_head_dim) values, instead of full keys and values for every head. One slot per
// sequence being generated; MTP layers have their own rows after the main layers.
#pragma once
#include "core/tensor.h"
#include "io/config.h"

namespace dsv3 {

class LatentCache {
 public:
  LatentCache(const ModelConfig& cfg, int64_t slots, int64_t max_tokens);
  int64_t slots() const { return data_.dim(1); }
  int64_t max_tokens() const { return data_.dim(2); }
  int64_t width() const { return data_.dim(3); }
  size_t bytes() const { return data_.nbytes(); }
  // [max_tokens, width] rows of one layer and slot.
  Tensor rows(int64_t layer, int64_t slot) const { return data_.select(0, layer).select(0, slot); }

 private:
  Tensor data_;  // [layers (main + MTP), slots, max_tokens, width] float32
};

}  // namespace dsv3
