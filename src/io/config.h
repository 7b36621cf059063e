// The official `config.json` of `model_type: deepseek_v3`: fields and defaults as transformers'
// DeepseekV3Config. Every field that changes the math is honoured or rejected by validate() with one
// line naming the file and the field.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

namespace dsv3 {

struct RopeScaling {  // rope_scaling with type/rope_type "yarn"
  double factor = 1.0;
  int64_t original_max_position_embeddings = 4096;
  double beta_fast = 32.0, beta_slow = 1.0;
  double mscale = 1.0, mscale_all_dim = 0.0;
};

struct QuantConfig {  // quantization_config
  bool fp8 = false;   // quant_method "fp8", fmt "e4m3"
  int64_t block_n = 128, block_k = 128;  // weight_block_size [rows, cols] of weight_scale_inv blocks
  std::string activation_scheme = "dynamic";
};

struct ModelConfig {
  int64_t vocab_size = 129280;
  int64_t hidden_size = 7168;
  int64_t intermediate_size = 18432;
  int64_t moe_intermediate_size = 2048;
  int64_t num_hidden_layers = 61;
  int64_t first_k_dense_replace = 3;
  int64_t moe_layer_freq = 1;
  int64_t num_attention_heads = 128;
  int64_t num_key_value_heads = 128;
  int64_t n_shared_experts = 1;
  int64_t n_routed_experts = 256;
  int64_t num_experts_per_tok = 8;
  int64_t n_group = 8;
  int64_t topk_group = 4;
  double routed_scaling_factor = 2.5;
  bool norm_topk_prob = true;
  std::string scoring_func = "sigmoid";
  std::string topk_method = "noaux_tc";
  std::string hidden_act = "silu";
  int64_t q_lora_rank = 1536;  // 0 when the config says null: plain q_proj
  int64_t kv_lora_rank = 512;
  int64_t qk_nope_head_dim = 128;
  int64_t qk_rope_head_dim = 64;
  int64_t v_head_dim = 128;
  int64_t max_position_embeddings = 4096;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  std::optional<RopeScaling> rope_scaling;  // absent/null: plain RoPE
  int64_t num_nextn_predict_layers = 0;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  std::optional<int64_t> bos_token_id = 0, eos_token_id = 1;
  double initializer_range = 0.02;
  std::string torch_dtype = "bfloat16";
  QuantConfig quant;

  // Parses and validates; `origin` (usually the file path) prefixes every error message.
  static ModelConfig from_json(const nlohmann::json& j, const std::string& origin = "config.json");
  static ModelConfig load(const std::string& path);  // reads + from_json; missing/unreadable/bad JSON -> Error
  void validate(const std::string& origin = "config.json") const;
  nlohmann::json to_json() const;  // the official layout; from_json(to_json()) round-trips

  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  bool is_moe_layer(int64_t layer) const { return layer >= first_k_dense_replace; }  // MTP layers too
};

}  // namespace dsv3
