// ModelConfig <-> the official DeepSeek-V3 config.json. from_json checks JSON types field by field (so a
// mistyped value fails at load, naming the field); validate() then checks the values against what the
// model code implements, so nothing downstream has to guard against an impossible config.
#include "io/config.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>

#include "core/error.h"

namespace dsv3 {
namespace {

using json = nlohmann::json;

// A JSON value for an error message: compact and cut short; dump() escapes control characters, so the
// message stays one line.
std::string show(const json& v) {
  std::string s = v.dump();
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

// An integer, or an integral float such as 64.0 (some tools write every number as a float).
std::optional<int64_t> as_int(const json& v) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u <= uint64_t(std::numeric_limits<int64_t>::max())) return int64_t(u);
  } else if (v.is_number_integer()) {
    return v.get<int64_t>();
  } else if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && d == std::trunc(d) && d >= -0x1p63 && d < 0x1p63) return int64_t(d);
  }
  return std::nullopt;
}

// Typed reads of one JSON object's fields. Absent keys leave `out` (the default) untouched; `prefix`
// names the enclosing object ("rope_scaling.") in errors.
struct Fields {
  const json& j;
  const std::string& origin;
  std::string prefix;

  const json* find(const char* key) const {
    auto it = j.find(key);
    return it == j.end() ? nullptr : &*it;
  }
  [[noreturn]] void bad(const char* key, const char* want, const json& v) const {
    fail("{}: field '{}{}' must be {}, got {}", origin, prefix, key, want, show(v));
  }
  void integer(const char* key, int64_t& out) const {
    if (const json* v = find(key)) {
      const auto i = as_int(*v);
      if (!i) bad(key, "an integer", *v);
      out = *i;
    }
  }
  void opt_integer(const char* key, std::optional<int64_t>& out) const {  // null -> nullopt
    if (const json* v = find(key)) {
      if (v->is_null()) {
        out.reset();
        return;
      }
      const auto i = as_int(*v);
      if (!i) bad(key, "an integer or null", *v);
      out = *i;
    }
  }
  void number(const char* key, double& out) const {
    if (const json* v = find(key)) {
      if (!v->is_number()) bad(key, "a number", *v);
      out = v->get<double>();
    }
  }
  void boolean(const char* key, bool& out) const {
    if (const json* v = find(key)) {
      if (!v->is_boolean()) bad(key, "true or false", *v);
      out = v->get<bool>();
    }
  }
  void string(const char* key, std::string& out) const {
    if (const json* v = find(key)) {
      if (!v->is_string()) bad(key, "a string", *v);
      out = v->get<std::string>();
    }
  }
  // An object or null; returns nullptr for absent/null.
  const json* object(const char* key) const {
    const json* v = find(key);
    if (!v || v->is_null()) return nullptr;
    if (!v->is_object()) bad(key, "an object or null", *v);
    return v;
  }
};

std::optional<RopeScaling> parse_rope_scaling(const json& rs, const std::string& origin, int64_t max_pos) {
  const Fields f{rs, origin, "rope_scaling."};
  // Older configs say "type", newer ones "rope_type", DeepSeek's official one says both.
  std::string type, rope_type;
  f.string("type", type);
  f.string("rope_type", rope_type);
  if (!type.empty() && !rope_type.empty() && type != rope_type)
    fail("{}: rope_scaling.type '{}' and rope_scaling.rope_type '{}' disagree", origin, type, rope_type);
  if (type.empty()) type = rope_type;
  if (type.empty()) fail("{}: rope_scaling has neither 'type' nor 'rope_type'", origin);
  if (type == "default" || type == "none") return std::nullopt;
  if (type != "yarn") fail("{}: unsupported rope_scaling type '{}' (only 'yarn')", origin, type);
  RopeScaling y;
  if (!f.find("factor")) fail("{}: rope_scaling.factor is required for yarn", origin);
  f.number("factor", y.factor);
  y.original_max_position_embeddings = max_pos;
  f.integer("original_max_position_embeddings", y.original_max_position_embeddings);
  f.number("beta_fast", y.beta_fast);
  f.number("beta_slow", y.beta_slow);
  f.number("mscale", y.mscale);
  f.number("mscale_all_dim", y.mscale_all_dim);
  return y;
}

QuantConfig parse_quant(const json& q, const std::string& origin) {
  const Fields f{q, origin, "quantization_config."};
  QuantConfig out;
  std::string method, fmt = "e4m3";
  if (!f.find("quant_method")) fail("{}: quantization_config.quant_method is missing", origin);
  f.string("quant_method", method);
  if (method != "fp8") fail("{}: unsupported quantization_config.quant_method '{}' (only 'fp8')", origin, method);
  f.string("fmt", fmt);
  if (fmt != "e4m3") fail("{}: unsupported quantization_config.fmt '{}' (only 'e4m3')", origin, fmt);
  f.string("activation_scheme", out.activation_scheme);
  if (const json* b = f.find("weight_block_size")) {
    std::optional<int64_t> n, k;
    if (b->is_array() && b->size() == 2) n = as_int((*b)[0]), k = as_int((*b)[1]);
    if (!n || !k) f.bad("weight_block_size", "a list of 2 integers", *b);
    out.block_n = *n, out.block_k = *k;
  }
  out.fp8 = true;
  return out;
}

}  // namespace

ModelConfig ModelConfig::from_json(const json& j, const std::string& origin) {
  if (!j.is_object()) fail("{}: top level must be a JSON object, got {}", origin, j.type_name());
  const Fields f{j, origin, ""};
  if (const json* mt = f.find("model_type")) {
    if (!mt->is_string() || mt->get<std::string>() != "deepseek_v3")
      fail("{}: model_type must be \"deepseek_v3\", got {}", origin, show(*mt));
  }
  ModelConfig c;
  f.integer("vocab_size", c.vocab_size);
  f.integer("hidden_size", c.hidden_size);
  f.integer("intermediate_size", c.intermediate_size);
  f.integer("moe_intermediate_size", c.moe_intermediate_size);
  f.integer("num_hidden_layers", c.num_hidden_layers);
  f.integer("first_k_dense_replace", c.first_k_dense_replace);
  f.integer("moe_layer_freq", c.moe_layer_freq);
  f.integer("num_attention_heads", c.num_attention_heads);
  // transformers: num_key_value_heads None -> num_attention_heads (MLA does not use it either way).
  std::optional<int64_t> kv_heads = c.num_attention_heads;
  f.opt_integer("num_key_value_heads", kv_heads);
  c.num_key_value_heads = kv_heads.value_or(c.num_attention_heads);
  f.integer("n_shared_experts", c.n_shared_experts);
  f.integer("n_routed_experts", c.n_routed_experts);
  f.integer("num_experts_per_tok", c.num_experts_per_tok);
  f.integer("n_group", c.n_group);
  f.integer("topk_group", c.topk_group);
  f.number("routed_scaling_factor", c.routed_scaling_factor);
  f.boolean("norm_topk_prob", c.norm_topk_prob);
  f.string("scoring_func", c.scoring_func);
  f.string("topk_method", c.topk_method);
  f.string("hidden_act", c.hidden_act);
  std::optional<int64_t> q_lora = c.q_lora_rank;
  f.opt_integer("q_lora_rank", q_lora);
  c.q_lora_rank = q_lora.value_or(0);  // null: no q LoRA, plain q_proj
  f.integer("kv_lora_rank", c.kv_lora_rank);
  f.integer("qk_nope_head_dim", c.qk_nope_head_dim);
  f.integer("qk_rope_head_dim", c.qk_rope_head_dim);
  f.integer("v_head_dim", c.v_head_dim);
  f.integer("max_position_embeddings", c.max_position_embeddings);
  f.number("rms_norm_eps", c.rms_norm_eps);
  f.number("rope_theta", c.rope_theta);
  if (const json* rs = f.object("rope_scaling")) c.rope_scaling = parse_rope_scaling(*rs, origin, c.max_position_embeddings);
  f.integer("num_nextn_predict_layers", c.num_nextn_predict_layers);
  f.boolean("tie_word_embeddings", c.tie_word_embeddings);
  f.boolean("attention_bias", c.attention_bias);
  f.opt_integer("bos_token_id", c.bos_token_id);
  f.opt_integer("eos_token_id", c.eos_token_id);
  f.number("initializer_range", c.initializer_range);
  f.string("dtype", c.torch_dtype);  // newer transformers write "dtype"; "torch_dtype" wins if both are there
  f.string("torch_dtype", c.torch_dtype);
  if (const json* q = f.object("quantization_config")) c.quant = parse_quant(*q, origin);
  c.validate(origin);
  return c;
}

ModelConfig ModelConfig::load(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::exists(path, ec)) fail("{}: config file not found", path);
  if (fs::is_directory(path, ec)) fail("{}: cannot read config: is a directory", path);
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open config: {}", path, std::strerror(errno));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) fail("{}: cannot read config: {}", path, std::strerror(errno));
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    fail("{}: invalid JSON at byte {}: {}", path, e.byte, e.what());
  }
  return from_json(j, path);
}

void ModelConfig::validate(const std::string& origin) const {
  const auto at_least = [&](const char* name, int64_t v, int64_t lo) {
    DSV3_CHECK(v >= lo, "{}: {} must be >= {}, got {}", origin, name, lo, v);
  };
  at_least("vocab_size", vocab_size, 1);
  at_least("hidden_size", hidden_size, 1);
  at_least("intermediate_size", intermediate_size, 1);
  at_least("moe_intermediate_size", moe_intermediate_size, 1);
  at_least("num_hidden_layers", num_hidden_layers, 1);
  at_least("num_attention_heads", num_attention_heads, 1);
  at_least("n_routed_experts", n_routed_experts, 1);
  at_least("num_experts_per_tok", num_experts_per_tok, 1);
  at_least("n_group", n_group, 1);
  at_least("topk_group", topk_group, 1);
  at_least("kv_lora_rank", kv_lora_rank, 1);
  at_least("qk_rope_head_dim", qk_rope_head_dim, 1);
  at_least("v_head_dim", v_head_dim, 1);
  at_least("max_position_embeddings", max_position_embeddings, 1);
  at_least("qk_nope_head_dim", qk_nope_head_dim, 0);
  at_least("q_lora_rank", q_lora_rank, 0);
  at_least("n_shared_experts", n_shared_experts, 0);
  at_least("num_nextn_predict_layers", num_nextn_predict_layers, 0);
  DSV3_CHECK(first_k_dense_replace >= 0 && first_k_dense_replace <= num_hidden_layers,
             "{}: first_k_dense_replace must be in [0, num_hidden_layers={}], got {}", origin, num_hidden_layers,
             first_k_dense_replace);

  // Routing (noaux_tc): experts split into n_group groups, the best topk_group groups kept, then top-k.
  DSV3_CHECK(n_routed_experts % n_group == 0, "{}: n_routed_experts ({}) must be divisible by n_group ({})", origin,
             n_routed_experts, n_group);
  DSV3_CHECK(topk_group <= n_group, "{}: topk_group ({}) must be <= n_group ({})", origin, topk_group, n_group);
  DSV3_CHECK(num_experts_per_tok <= n_routed_experts, "{}: num_experts_per_tok ({}) must be <= n_routed_experts ({})",
             origin, num_experts_per_tok, n_routed_experts);
  const int64_t per_group = n_routed_experts / n_group;
  DSV3_CHECK(topk_group * per_group >= num_experts_per_tok,
             "{}: num_experts_per_tok ({}) exceeds the {} experts in topk_group ({}) groups of {}", origin,
             num_experts_per_tok, topk_group * per_group, topk_group, per_group);
  // A group's score is the sum of its top-2 expert scores, so each group needs two experts.
  DSV3_CHECK(n_group == 1 || per_group >= 2,
             "{}: n_group ({}) leaves {} expert(s) per group; group scoring needs >= 2 (n_routed_experts {})", origin,
             n_group, per_group, n_routed_experts);
  DSV3_CHECK(scoring_func == "sigmoid", "{}: unsupported scoring_func '{}' (only 'sigmoid')", origin, scoring_func);
  DSV3_CHECK(topk_method == "noaux_tc", "{}: unsupported topk_method '{}' (only 'noaux_tc')", origin, topk_method);
  DSV3_CHECK(hidden_act == "silu", "{}: unsupported hidden_act '{}' (only 'silu')", origin, hidden_act);
  DSV3_CHECK(moe_layer_freq == 1, "{}: unsupported moe_layer_freq {} (only 1)", origin, moe_layer_freq);
  DSV3_CHECK(!attention_bias, "{}: unsupported attention_bias true (only false)", origin);
  // RoPE rotates pairs of dimensions.
  DSV3_CHECK(qk_rope_head_dim % 2 == 0, "{}: qk_rope_head_dim must be even, got {}", origin, qk_rope_head_dim);

  DSV3_CHECK(std::isfinite(rms_norm_eps) && rms_norm_eps > 0, "{}: rms_norm_eps must be finite and > 0, got {}", origin,
             rms_norm_eps);
  DSV3_CHECK(std::isfinite(rope_theta) && rope_theta > 0, "{}: rope_theta must be finite and > 0, got {}", origin,
             rope_theta);
  DSV3_CHECK(std::isfinite(routed_scaling_factor) && routed_scaling_factor > 0,
             "{}: routed_scaling_factor must be finite and > 0, got {}", origin, routed_scaling_factor);
  if (rope_scaling) {
    const RopeScaling& y = *rope_scaling;
    DSV3_CHECK(std::isfinite(y.factor) && y.factor >= 1, "{}: rope_scaling.factor must be finite and >= 1, got {}",
               origin, y.factor);
    DSV3_CHECK(y.original_max_position_embeddings >= 1,
               "{}: rope_scaling.original_max_position_embeddings must be >= 1, got {}", origin,
               y.original_max_position_embeddings);
    DSV3_CHECK(std::isfinite(y.beta_fast) && std::isfinite(y.beta_slow) && y.beta_fast >= y.beta_slow,
               "{}: rope_scaling.beta_fast ({}) must be >= rope_scaling.beta_slow ({})", origin, y.beta_fast,
               y.beta_slow);
    DSV3_CHECK(std::isfinite(y.mscale) && std::isfinite(y.mscale_all_dim),
               "{}: rope_scaling.mscale ({}) and mscale_all_dim ({}) must be finite", origin, y.mscale,
               y.mscale_all_dim);
  }
  for (const auto& [name, id] : {std::pair{"bos_token_id", bos_token_id}, std::pair{"eos_token_id", eos_token_id}})
    DSV3_CHECK(!id || (*id >= 0 && *id < vocab_size), "{}: {} must be in [0, vocab_size={}), got {}", origin, name,
               vocab_size, *id);
  if (quant.fp8) {
    DSV3_CHECK(quant.block_n > 0 && quant.block_k > 0,
               "{}: quantization_config.weight_block_size must be positive, got [{}, {}]", origin, quant.block_n,
               quant.block_k);
    DSV3_CHECK(quant.activation_scheme == "dynamic",
               "{}: unsupported quantization_config.activation_scheme '{}' (only 'dynamic')", origin,
               quant.activation_scheme);
  }
}

json ModelConfig::to_json() const {
  json j = {
      {"architectures", json::array({"DeepseekV3ForCausalLM"})},
      {"model_type", "deepseek_v3"},
      {"vocab_size", vocab_size},
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"moe_intermediate_size", moe_intermediate_size},
      {"num_hidden_layers", num_hidden_layers},
      {"first_k_dense_replace", first_k_dense_replace},
      {"moe_layer_freq", moe_layer_freq},
      {"num_attention_heads", num_attention_heads},
      {"num_key_value_heads", num_key_value_heads},
      {"n_shared_experts", n_shared_experts},
      {"n_routed_experts", n_routed_experts},
      {"num_experts_per_tok", num_experts_per_tok},
      {"n_group", n_group},
      {"topk_group", topk_group},
      {"routed_scaling_factor", routed_scaling_factor},
      {"norm_topk_prob", norm_topk_prob},
      {"scoring_func", scoring_func},
      {"topk_method", topk_method},
      {"hidden_act", hidden_act},
      {"q_lora_rank", q_lora_rank > 0 ? json(q_lora_rank) : json(nullptr)},
      {"kv_lora_rank", kv_lora_rank},
      {"qk_nope_head_dim", qk_nope_head_dim},
      {"qk_rope_head_dim", qk_rope_head_dim},
      {"v_head_dim", v_head_dim},
      {"max_position_embeddings", max_position_embeddings},
      {"rms_norm_eps", rms_norm_eps},
      {"rope_theta", rope_theta},
      {"rope_scaling", nullptr},
      {"num_nextn_predict_layers", num_nextn_predict_layers},
      {"tie_word_embeddings", tie_word_embeddings},
      {"attention_bias", attention_bias},
      {"bos_token_id", bos_token_id ? json(*bos_token_id) : json(nullptr)},
      {"eos_token_id", eos_token_id ? json(*eos_token_id) : json(nullptr)},
      {"initializer_range", initializer_range},
      {"torch_dtype", torch_dtype},
  };
  if (rope_scaling) {
    const RopeScaling& y = *rope_scaling;
    j["rope_scaling"] = {{"type", "yarn"},
                         {"rope_type", "yarn"},
                         {"factor", y.factor},
                         {"original_max_position_embeddings", y.original_max_position_embeddings},
                         {"beta_fast", y.beta_fast},
                         {"beta_slow", y.beta_slow},
                         {"mscale", y.mscale},
                         {"mscale_all_dim", y.mscale_all_dim}};
  }
  if (quant.fp8)
    j["quantization_config"] = {{"quant_method", "fp8"},
                                {"fmt", "e4m3"},
                                {"activation_scheme", quant.activation_scheme},
                                {"weight_block_size", json::array({quant.block_n, quant.block_k})}};
  return j;
}

}  // namespace dsv3
