#include "model/stats.h"

namespace dsv3 {

namespace {
struct LayerParams {
  int64_t total = 0, active = 0;
};

LayerParams layer_params(const ModelConfig& c, bool moe) {
  const int64_t H = c.hidden_size, nh = c.num_attention_heads, dqk = c.qk_head_dim();
  int64_t attn = c.q_lora_rank > 0 ? H * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * nh * dqk : H * nh * dqk;
  attn += H * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank + c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim);
  attn += nh * c.v_head_dim * H;
  const int64_t norms = 2 * H;
  LayerParams p;
  if (!moe) {
    p.total = p.active = attn + norms + 3 * H * c.intermediate_size;
    return p;
  }
  const int64_t expert = 3 * H * c.moe_intermediate_size, shared = c.n_shared_experts * expert, gate = c.n_routed_experts * H;
  p.total = attn + norms + gate + shared + c.n_routed_experts * expert;
  p.active = attn + norms + gate + shared + c.num_experts_per_tok * expert;
  return p;
}
}  // namespace

ModelStats model_stats(const ModelConfig& c) {
  ModelStats s;
  s.cfg = c;
  const int64_t H = c.hidden_size, V = c.vocab_size;
  const int64_t head = c.tie_word_embeddings ? 0 : V * H;
  s.params_main = s.active_main = V * H + head + H;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerParams p = layer_params(c, c.is_moe_layer(l));
    s.params_main += p.total;
    s.active_main += p.active;
  }
  for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k)
    s.params_mtp += 2 * H + 2 * H * H + H + layer_params(c, c.is_moe_layer(c.num_hidden_layers + k)).total;
  s.kv_cache_values_per_token = c.num_hidden_layers * (c.kv_lora_rank + c.qk_rope_head_dim);
  return s;
}

double ModelStats::forward_flops_per_token(int64_t T) const {
  const ModelConfig& c = cfg;
  // Matmul parameters touched per token (embedding lookup and norms are not matmuls).
  double matmul_params = double(active_main) - double(c.vocab_size * c.hidden_size) - double(c.hidden_size);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) matmul_params -= 2.0 * double(c.hidden_size) + double(c.kv_lora_rank) +
                                                                    (c.q_lora_rank > 0 ? double(c.q_lora_rank) : 0.0);
  // Causal attention: scores and values over (T+1)/2 keys on average, per head.
  const double attn = double(c.num_hidden_layers) * double(c.num_attention_heads) *
                      double(c.qk_head_dim() + c.v_head_dim) * double(T + 1) / 2.0;
  return 2.0 * (matmul_params + attn);
}

}  // namespace dsv3
