#include "model/latent_cache.h"

namespace dsv3 {

LatentCache::LatentCache(const ModelConfig& c, int64_t slots, int64_t max_tokens) {
  DSV3_CHECK(slots > 0 && max_tokens > 0, "latent cache: {} slots of {} tokens", slots, max_tokens);
  data_ = Tensor::zeros(DType::F32, {c.num_hidden_layers + c.num_nextn_predict_layers, slots, max_tokens,
                                     c.kv_lora_rank + c.qk_rope_head_dim});
}

}  // namespace dsv3
