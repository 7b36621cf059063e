#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>

#include "temp_dir.h"
#include "core/error.h"
#include "io/config.h"

using namespace dsv3;
using json = nlohmann::json;

namespace {

const std::string kTiny = DSV3_SHARED_DIR "/golden/tiny/model/config.json";
const std::string kFp8 = DSV3_SHARED_DIR "/golden/fp8/model/config.json";
const std::string kSmall = DSV3_SHARED_DIR "/configs/small.json";

json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

// The tiny golden config with top-level keys replaced (a null value sets null; it does not delete).
json tiny_with(const json& patch) {
  json j = read_json(kTiny);
  for (const auto& [k, v] : patch.items()) j[k] = v;
  return j;
}
json tiny_rope(const json& rope_scaling) { return tiny_with({{"rope_scaling", rope_scaling}}); }
json tiny_quant(const json& quant) { return tiny_with({{"quantization_config", quant}}); }

ModelConfig parse(const json& j) { return ModelConfig::from_json(j, "cfg.json"); }

// from_json must throw one line that starts with the origin and contains every needle.
::testing::AssertionResult fails_with(const json& j, std::initializer_list<std::string> needles) {
  std::string msg;
  try {
    parse(j);
    return ::testing::AssertionFailure() << "parsed without error";
  } catch (const Error& e) {
    msg = e.what();
  }
  if (msg.rfind("cfg.json: ", 0) != 0) return ::testing::AssertionFailure() << "no origin prefix: " << msg;
  if (msg.find('\n') != std::string::npos) return ::testing::AssertionFailure() << "not one line: " << msg;
  for (const auto& n : needles)
    if (msg.find(n) == std::string::npos) return ::testing::AssertionFailure() << "'" << msg << "' lacks '" << n << "'";
  return ::testing::AssertionSuccess() << msg;
}

void expect_same(const ModelConfig& a, const ModelConfig& b) {
#define SAME(f) EXPECT_EQ(a.f, b.f) << #f
  SAME(vocab_size); SAME(hidden_size); SAME(intermediate_size); SAME(moe_intermediate_size);
  SAME(num_hidden_layers); SAME(first_k_dense_replace); SAME(moe_layer_freq); SAME(num_attention_heads);
  SAME(num_key_value_heads); SAME(n_shared_experts); SAME(n_routed_experts); SAME(num_experts_per_tok);
  SAME(n_group); SAME(topk_group); SAME(routed_scaling_factor); SAME(norm_topk_prob); SAME(scoring_func);
  SAME(topk_method); SAME(hidden_act); SAME(q_lora_rank); SAME(kv_lora_rank); SAME(qk_nope_head_dim);
  SAME(qk_rope_head_dim); SAME(v_head_dim); SAME(max_position_embeddings); SAME(rms_norm_eps); SAME(rope_theta);
  SAME(num_nextn_predict_layers); SAME(tie_word_embeddings); SAME(attention_bias); SAME(bos_token_id);
  SAME(eos_token_id); SAME(initializer_range); SAME(torch_dtype); SAME(quant.fp8); SAME(quant.block_n);
  SAME(quant.block_k); SAME(quant.activation_scheme);
  ASSERT_EQ(a.rope_scaling.has_value(), b.rope_scaling.has_value());
  if (a.rope_scaling) {
    SAME(rope_scaling->factor); SAME(rope_scaling->original_max_position_embeddings);
    SAME(rope_scaling->beta_fast); SAME(rope_scaling->beta_slow); SAME(rope_scaling->mscale);
    SAME(rope_scaling->mscale_all_dim);
  }
#undef SAME
}

// to_json -> from_json, both directly and through text, gives back the same config.
void expect_round_trip(const ModelConfig& c) {
  expect_same(parse(c.to_json()), c);
  expect_same(parse(json::parse(c.to_json().dump(2))), c);
}

// A file in a scratch folder unique to this process (other builds may run these tests concurrently), removed
// at exit.
std::string temp_file(const std::string& name, const std::string& text) {
  static test::TempDir dir("dsv3_cfg");
  const std::string path = dir / name;
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

std::string load_error(const std::string& path) {
  try {
    ModelConfig::load(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "<no error>";
}

}  // namespace

// ---- the real files ----

TEST(Config, TinyGoldenParses) {
  const ModelConfig c = ModelConfig::load(kTiny);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, 160);
  EXPECT_EQ(c.moe_intermediate_size, 32);
  EXPECT_EQ(c.num_hidden_layers, 3);
  EXPECT_EQ(c.first_k_dense_replace, 1);
  EXPECT_EQ(c.num_attention_heads, 4);
  EXPECT_EQ(c.n_shared_experts, 1);
  EXPECT_EQ(c.n_routed_experts, 16);
  EXPECT_EQ(c.num_experts_per_tok, 4);
  EXPECT_EQ(c.n_group, 4);
  EXPECT_EQ(c.topk_group, 2);
  EXPECT_EQ(c.q_lora_rank, 32);
  EXPECT_EQ(c.kv_lora_rank, 16);
  EXPECT_EQ(c.qk_nope_head_dim, 16);
  EXPECT_EQ(c.qk_rope_head_dim, 8);
  EXPECT_EQ(c.qk_head_dim(), 24);
  EXPECT_EQ(c.v_head_dim, 16);
  EXPECT_EQ(c.max_position_embeddings, 512);
  EXPECT_EQ(c.num_nextn_predict_layers, 1);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 2.5);
  EXPECT_TRUE(c.norm_topk_prob);
  ASSERT_TRUE(c.rope_scaling);
  EXPECT_DOUBLE_EQ(c.rope_scaling->factor, 4.0);
  EXPECT_EQ(c.rope_scaling->original_max_position_embeddings, 128);
  EXPECT_DOUBLE_EQ(c.rope_scaling->beta_fast, 32.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling->beta_slow, 1.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling->mscale, 1.0);
  EXPECT_DOUBLE_EQ(c.rope_scaling->mscale_all_dim, 1.0);
  EXPECT_EQ(c.bos_token_id, 0);
  EXPECT_EQ(c.eos_token_id, 1);
  EXPECT_FALSE(c.quant.fp8);
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.is_moe_layer(1));
  EXPECT_TRUE(c.is_moe_layer(3));  // the MTP layer
}

TEST(Config, Fp8GoldenParses) {
  const ModelConfig c = ModelConfig::load(kFp8);
  EXPECT_EQ(c.vocab_size, 768);
  EXPECT_EQ(c.hidden_size, 256);
  EXPECT_EQ(c.num_hidden_layers, 2);
  EXPECT_EQ(c.n_shared_experts, 2);
  EXPECT_EQ(c.n_routed_experts, 8);
  EXPECT_EQ(c.num_experts_per_tok, 2);
  EXPECT_EQ(c.n_group, 2);
  EXPECT_EQ(c.topk_group, 1);
  EXPECT_EQ(c.q_lora_rank, 192);
  EXPECT_EQ(c.kv_lora_rank, 128);
  ASSERT_TRUE(c.rope_scaling);
  EXPECT_DOUBLE_EQ(c.rope_scaling->factor, 8.0);
  EXPECT_EQ(c.rope_scaling->original_max_position_embeddings, 256);
  EXPECT_TRUE(c.quant.fp8);
  EXPECT_EQ(c.quant.block_n, 128);
  EXPECT_EQ(c.quant.block_k, 128);
  EXPECT_EQ(c.quant.activation_scheme, "dynamic");
}

TEST(Config, SmallParses) {
  const ModelConfig c = ModelConfig::load(kSmall);
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_EQ(c.hidden_size, 1024);
  EXPECT_EQ(c.intermediate_size, 2816);
  EXPECT_EQ(c.moe_intermediate_size, 352);
  EXPECT_EQ(c.num_hidden_layers, 12);
  EXPECT_EQ(c.num_attention_heads, 16);
  EXPECT_EQ(c.n_routed_experts, 64);
  EXPECT_EQ(c.num_experts_per_tok, 6);
  EXPECT_EQ(c.n_group, 8);
  EXPECT_EQ(c.topk_group, 4);
  EXPECT_EQ(c.q_lora_rank, 384);
  EXPECT_EQ(c.kv_lora_rank, 256);
  EXPECT_EQ(c.qk_nope_head_dim, 64);
  EXPECT_EQ(c.qk_rope_head_dim, 32);
  EXPECT_EQ(c.v_head_dim, 64);
  EXPECT_DOUBLE_EQ(c.initializer_range, 0.006);
  EXPECT_FALSE(c.rope_scaling);
  EXPECT_FALSE(c.quant.fp8);
}

TEST(Config, EmptyObjectGivesTransformersDefaults) {
  expect_same(parse(json::object()), ModelConfig{});
  EXPECT_NO_THROW(ModelConfig{}.validate());
}

// ---- round trip and the official layout ----

TEST(Config, RoundTrip) {
  for (const auto& p : {kTiny, kFp8, kSmall}) {
    SCOPED_TRACE(p);
    expect_round_trip(ModelConfig::load(p));
  }
  ModelConfig c = ModelConfig::load(kTiny);
  c.q_lora_rank = 0;
  c.bos_token_id.reset();
  c.eos_token_id.reset();
  c.norm_topk_prob = false;
  c.tie_word_embeddings = true;
  c.rope_scaling->beta_fast = 16.5;
  c.rope_scaling->mscale = 0.707;
  c.routed_scaling_factor = 1.0 / 3.0;  // not representable in short decimal: checks full precision
  c.quant = {true, 64, 32, "dynamic"};
  expect_round_trip(c);
  c.rope_scaling.reset();
  expect_round_trip(c);
  expect_round_trip(ModelConfig{});
}

TEST(Config, ToJsonWritesOfficialLayout) {
  const json j = ModelConfig::load(kFp8).to_json();
  EXPECT_EQ(j["model_type"], "deepseek_v3");
  EXPECT_EQ(j["architectures"], json::array({"DeepseekV3ForCausalLM"}));
  EXPECT_EQ(j["rope_scaling"]["type"], "yarn");
  EXPECT_EQ(j["rope_scaling"]["rope_type"], "yarn");
  EXPECT_EQ(j["rope_scaling"]["original_max_position_embeddings"], 256);
  EXPECT_EQ(j["quantization_config"]["quant_method"], "fp8");
  EXPECT_EQ(j["quantization_config"]["fmt"], "e4m3");
  EXPECT_EQ(j["quantization_config"]["activation_scheme"], "dynamic");
  EXPECT_EQ(j["quantization_config"]["weight_block_size"], json::array({128, 128}));
  EXPECT_EQ(j["q_lora_rank"], 192);
  for (const char* k : {"vocab_size", "first_k_dense_replace", "moe_layer_freq", "n_group", "topk_group",
                        "num_nextn_predict_layers", "scoring_func", "topk_method", "norm_topk_prob", "bos_token_id"})
    EXPECT_TRUE(j.contains(k)) << k;

  ModelConfig c = ModelConfig::load(kSmall);
  c.q_lora_rank = 0;
  const json s = c.to_json();
  EXPECT_TRUE(s["q_lora_rank"].is_null());
  EXPECT_TRUE(s["rope_scaling"].is_null());
  EXPECT_FALSE(s.contains("quantization_config"));
}

// ---- variants that must parse ----

TEST(Config, QLoraRankNull) {
  const ModelConfig c = parse(tiny_with({{"q_lora_rank", nullptr}}));
  EXPECT_EQ(c.q_lora_rank, 0);
  expect_round_trip(c);
  EXPECT_EQ(parse(tiny_with({{"q_lora_rank", 0}})).q_lora_rank, 0);
}

TEST(Config, NoRopeScaling) {
  json j = read_json(kTiny);
  j.erase("rope_scaling");
  EXPECT_FALSE(parse(j).rope_scaling);
  EXPECT_FALSE(parse(tiny_rope(nullptr)).rope_scaling);
  EXPECT_FALSE(parse(tiny_rope({{"rope_type", "default"}})).rope_scaling);
  EXPECT_FALSE(parse(tiny_rope({{"rope_type", "none"}})).rope_scaling);
}

TEST(Config, RopeScalingYarnDefaults) {
  for (const char* key : {"type", "rope_type"}) {
    const ModelConfig c = parse(tiny_rope({{key, "yarn"}, {"factor", 2}}));
    ASSERT_TRUE(c.rope_scaling) << key;
    EXPECT_DOUBLE_EQ(c.rope_scaling->factor, 2.0);
    EXPECT_EQ(c.rope_scaling->original_max_position_embeddings, 512);  // = max_position_embeddings
    EXPECT_DOUBLE_EQ(c.rope_scaling->beta_fast, 32.0);
    EXPECT_DOUBLE_EQ(c.rope_scaling->beta_slow, 1.0);
    EXPECT_DOUBLE_EQ(c.rope_scaling->mscale, 1.0);
    EXPECT_DOUBLE_EQ(c.rope_scaling->mscale_all_dim, 0.0);
  }
}

TEST(Config, NGroupOne) {
  const ModelConfig c = parse(tiny_with({{"n_group", 1}, {"topk_group", 1}}));
  EXPECT_EQ(c.n_group, 1);
  EXPECT_EQ(c.topk_group, 1);
  // A single expert per group is fine without grouping: nothing sums a group's top 2.
  EXPECT_NO_THROW(parse(tiny_with({{"n_group", 1}, {"topk_group", 1}, {"n_routed_experts", 1},
                                   {"num_experts_per_tok", 1}})));
}

TEST(Config, NormTopkProbFalse) { EXPECT_FALSE(parse(tiny_with({{"norm_topk_prob", false}})).norm_topk_prob); }

TEST(Config, FirstKDenseReplaceZero) {
  const ModelConfig c = parse(tiny_with({{"first_k_dense_replace", 0}}));
  EXPECT_EQ(c.first_k_dense_replace, 0);
  EXPECT_TRUE(c.is_moe_layer(0));
  // All layers dense is allowed too.
  EXPECT_FALSE(parse(tiny_with({{"first_k_dense_replace", 3}})).is_moe_layer(2));
}

TEST(Config, NoNextnPredictLayers) {
  EXPECT_EQ(parse(tiny_with({{"num_nextn_predict_layers", 0}})).num_nextn_predict_layers, 0);
}

TEST(Config, IntegralFloatsAccepted) {
  const ModelConfig c = parse(tiny_with({{"hidden_size", 64.0}, {"n_group", 4.0}, {"rope_theta", 10000}}));
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.n_group, 4);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(parse(tiny_quant({{"quant_method", "fp8"}, {"weight_block_size", {64.0, 32.0}}})).quant.block_k, 32);
}

TEST(Config, UnknownKeysIgnored) {
  const ModelConfig c = parse(tiny_with({{"auto_map", {{"AutoConfig", "configuration_deepseek.DeepseekV3Config"}}},
                                         {"ep_size", 1}, {"aux_loss_alpha", 0.001}, {"seq_aux", true},
                                         {"use_cache", true}, {"pretraining_tp", 1}, {"attention_dropout", 0.0},
                                         {"transformers_version", "4.33.1"}, {"some_future_key", {1, 2, 3}}}));
  expect_same(c, ModelConfig::load(kTiny));
  json j = read_json(kTiny);
  j.erase("model_type");  // optional
  EXPECT_NO_THROW(parse(j));
}

TEST(Config, NullTokenIds) {
  const ModelConfig c = parse(tiny_with({{"bos_token_id", nullptr}, {"eos_token_id", nullptr}}));
  EXPECT_FALSE(c.bos_token_id);
  EXPECT_FALSE(c.eos_token_id);
}

TEST(Config, NumKeyValueHeadsNullMeansAttentionHeads) {
  EXPECT_EQ(parse(tiny_with({{"num_key_value_heads", nullptr}})).num_key_value_heads, 4);
}

TEST(Config, QuantizationConfigDefaults) {
  const ModelConfig c = parse(tiny_quant({{"quant_method", "fp8"}}));
  EXPECT_TRUE(c.quant.fp8);
  EXPECT_EQ(c.quant.block_n, 128);
  EXPECT_EQ(c.quant.block_k, 128);
  EXPECT_EQ(c.quant.activation_scheme, "dynamic");
  EXPECT_FALSE(parse(tiny_quant(nullptr)).quant.fp8);
}

// ---- errors: one line naming the field ----

TEST(ConfigError, WrongModelType) {
  EXPECT_TRUE(fails_with(tiny_with({{"model_type", "llama"}}), {"model_type", "llama"}));
  EXPECT_TRUE(fails_with(tiny_with({{"model_type", 3}}), {"model_type"}));
}

TEST(ConfigError, NotAnObject) { EXPECT_TRUE(fails_with(json::array({1, 2}), {"object", "array"})); }

TEST(ConfigError, IntegerFieldWrongType) {
  EXPECT_EQ(std::string(fails_with(tiny_with({{"hidden_size", "abc"}}), {}).message()),
            "cfg.json: field 'hidden_size' must be an integer, got \"abc\"");
  EXPECT_TRUE(fails_with(tiny_with({{"hidden_size", 64.5}}), {"'hidden_size'", "64.5"}));
  EXPECT_TRUE(fails_with(tiny_with({{"num_hidden_layers", true}}), {"'num_hidden_layers'", "integer", "true"}));
  EXPECT_TRUE(fails_with(tiny_with({{"vocab_size", nullptr}}), {"'vocab_size'", "null"}));
  EXPECT_TRUE(fails_with(tiny_with({{"n_group", 1e30}}), {"'n_group'"}));
  EXPECT_TRUE(fails_with(tiny_with({{"n_group", std::numeric_limits<uint64_t>::max()}}), {"'n_group'"}));
  EXPECT_TRUE(fails_with(tiny_with({{"q_lora_rank", "32"}}), {"'q_lora_rank'", "integer or null"}));
  EXPECT_TRUE(fails_with(tiny_with({{"bos_token_id", 0.5}}), {"'bos_token_id'"}));
}

TEST(ConfigError, NumberFieldWrongType) {
  EXPECT_TRUE(fails_with(tiny_with({{"rms_norm_eps", "1e-6"}}), {"'rms_norm_eps'", "number"}));
  EXPECT_TRUE(fails_with(tiny_with({{"routed_scaling_factor", false}}), {"'routed_scaling_factor'", "number"}));
}

TEST(ConfigError, BoolFieldWrongType) {
  EXPECT_TRUE(fails_with(tiny_with({{"norm_topk_prob", 1}}), {"'norm_topk_prob'", "true or false"}));
  EXPECT_TRUE(fails_with(tiny_with({{"attention_bias", "false"}}), {"'attention_bias'"}));
  EXPECT_TRUE(fails_with(tiny_with({{"tie_word_embeddings", nullptr}}), {"'tie_word_embeddings'"}));
}

TEST(ConfigError, StringFieldWrongType) {
  EXPECT_TRUE(fails_with(tiny_with({{"scoring_func", 1}}), {"'scoring_func'", "string"}));
  EXPECT_TRUE(fails_with(tiny_with({{"torch_dtype", json::array()}}), {"'torch_dtype'", "string"}));
}

TEST(ConfigError, ObjectFieldWrongType) {
  EXPECT_TRUE(fails_with(tiny_rope("yarn"), {"'rope_scaling'", "object"}));
  EXPECT_TRUE(fails_with(tiny_quant(json::array()), {"'quantization_config'", "object"}));
  EXPECT_TRUE(fails_with(tiny_rope({{"type", "yarn"}, {"factor", "4"}}), {"'rope_scaling.factor'", "number"}));
  EXPECT_TRUE(fails_with(tiny_rope({{"type", "yarn"}, {"factor", 4}, {"original_max_position_embeddings", 1.5}}),
                         {"'rope_scaling.original_max_position_embeddings'", "integer"}));
}

TEST(ConfigError, SizesMustBePositive) {
  for (const char* f : {"vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                        "num_hidden_layers", "num_attention_heads", "n_routed_experts", "num_experts_per_tok",
                        "n_group", "topk_group", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim",
                        "max_position_embeddings"}) {
    SCOPED_TRACE(f);
    EXPECT_TRUE(fails_with(tiny_with({{f, 0}}), {f, ">= 1", "got 0"}));
    EXPECT_TRUE(fails_with(tiny_with({{f, -3}}), {f, ">= 1", "got -3"}));
  }
}

TEST(ConfigError, CountsMustBeNonNegative) {
  for (const char* f : {"qk_nope_head_dim", "q_lora_rank", "n_shared_experts", "num_nextn_predict_layers"}) {
    SCOPED_TRACE(f);
    EXPECT_TRUE(fails_with(tiny_with({{f, -1}}), {f, ">= 0", "got -1"}));
    EXPECT_NO_THROW(parse(tiny_with({{f, 0}})));
  }
}

TEST(ConfigError, FirstKDenseReplaceOutOfRange) {
  EXPECT_TRUE(fails_with(tiny_with({{"first_k_dense_replace", -1}}), {"first_k_dense_replace", "got -1"}));
  EXPECT_TRUE(fails_with(tiny_with({{"first_k_dense_replace", 4}}), {"first_k_dense_replace", "num_hidden_layers"}));
}

TEST(ConfigError, RoutedExpertsNotDivisibleByGroups) {
  EXPECT_TRUE(fails_with(tiny_with({{"n_routed_experts", 18}}), {"n_routed_experts (18)", "n_group (4)"}));
}

TEST(ConfigError, TopkGroupAboveNGroup) {
  EXPECT_TRUE(fails_with(tiny_with({{"topk_group", 5}}), {"topk_group (5)", "n_group (4)"}));
}

TEST(ConfigError, ExpertsPerTokenAboveRoutedExperts) {
  EXPECT_TRUE(fails_with(tiny_with({{"num_experts_per_tok", 17}, {"topk_group", 4}}),
                         {"num_experts_per_tok (17)", "n_routed_experts (16)"}));
}

TEST(ConfigError, TooFewExpertsInAllowedGroups) {
  // 16 experts in 4 groups of 4, 2 groups kept -> only 8 candidates.
  EXPECT_TRUE(fails_with(tiny_with({{"num_experts_per_tok", 9}}), {"num_experts_per_tok (9)", "topk_group (2)"}));
  EXPECT_NO_THROW(parse(tiny_with({{"num_experts_per_tok", 8}})));
}

TEST(ConfigError, OneExpertPerGroup) {
  EXPECT_TRUE(fails_with(tiny_with({{"n_group", 16}, {"topk_group", 8}}), {"n_group (16)", ">= 2"}));
}

TEST(ConfigError, OddRopeHeadDim) {
  EXPECT_TRUE(fails_with(tiny_with({{"qk_rope_head_dim", 7}}), {"qk_rope_head_dim", "even", "7"}));
}

TEST(ConfigError, UnsupportedScoringFunc) {
  EXPECT_TRUE(fails_with(tiny_with({{"scoring_func", "softmax"}}), {"unsupported scoring_func 'softmax'"}));
}

TEST(ConfigError, UnsupportedTopkMethod) {
  EXPECT_TRUE(fails_with(tiny_with({{"topk_method", "greedy"}}), {"unsupported topk_method 'greedy'"}));
}

TEST(ConfigError, UnsupportedHiddenAct) {
  EXPECT_TRUE(fails_with(tiny_with({{"hidden_act", "gelu"}}), {"unsupported hidden_act 'gelu'"}));
}

TEST(ConfigError, UnsupportedMoeLayerFreq) {
  EXPECT_TRUE(fails_with(tiny_with({{"moe_layer_freq", 2}}), {"unsupported moe_layer_freq 2"}));
}

TEST(ConfigError, UnsupportedAttentionBias) {
  EXPECT_TRUE(fails_with(tiny_with({{"attention_bias", true}}), {"unsupported attention_bias"}));
}

TEST(ConfigError, BadRmsNormEps) {
  for (double v : {0.0, -1e-6, std::nan(""), std::numeric_limits<double>::infinity()})
    EXPECT_TRUE(fails_with(tiny_with({{"rms_norm_eps", v}}), {"rms_norm_eps"})) << v;
}

TEST(ConfigError, BadRopeTheta) {
  for (double v : {0.0, -10000.0}) EXPECT_TRUE(fails_with(tiny_with({{"rope_theta", v}}), {"rope_theta"})) << v;
}

TEST(ConfigError, BadRoutedScalingFactor) {
  for (double v : {0.0, -2.5, std::numeric_limits<double>::infinity()})
    EXPECT_TRUE(fails_with(tiny_with({{"routed_scaling_factor", v}}), {"routed_scaling_factor"})) << v;
}

TEST(ConfigError, UnsupportedRopeType) {
  EXPECT_TRUE(fails_with(tiny_rope({{"type", "linear"}, {"factor", 2}}), {"unsupported rope_scaling type 'linear'"}));
  EXPECT_TRUE(fails_with(tiny_rope({{"rope_type", "dynamic"}, {"factor", 2}}), {"rope_scaling type 'dynamic'"}));
  EXPECT_TRUE(fails_with(tiny_rope({{"type", "yarn"}, {"rope_type", "linear"}, {"factor", 2}}),
                         {"rope_scaling.type", "rope_scaling.rope_type", "disagree"}));
  EXPECT_TRUE(fails_with(tiny_rope({{"factor", 2}}), {"rope_scaling", "rope_type"}));
  EXPECT_TRUE(fails_with(tiny_rope({{"type", "yarn"}}), {"rope_scaling.factor"}));
}

TEST(ConfigError, BadYarnFactor) {
  EXPECT_TRUE(fails_with(tiny_rope({{"type", "yarn"}, {"factor", 0.5}}), {"rope_scaling.factor", ">= 1", "0.5"}));
}

TEST(ConfigError, BadYarnOriginalMaxPositions) {
  EXPECT_TRUE(fails_with(tiny_rope({{"type", "yarn"}, {"factor", 4}, {"original_max_position_embeddings", 0}}),
                         {"rope_scaling.original_max_position_embeddings", ">= 1"}));
}

TEST(ConfigError, YarnBetaFastBelowBetaSlow) {
  EXPECT_TRUE(fails_with(tiny_rope({{"type", "yarn"}, {"factor", 4}, {"beta_fast", 0.5}, {"beta_slow", 1}}),
                         {"rope_scaling.beta_fast (0.5)", "rope_scaling.beta_slow (1)"}));
}

TEST(ConfigError, TokenIdsOutsideVocab) {
  for (const char* f : {"bos_token_id", "eos_token_id"}) {
    EXPECT_TRUE(fails_with(tiny_with({{f, -1}}), {f, "vocab_size=512", "got -1"}));
    EXPECT_TRUE(fails_with(tiny_with({{f, 512}}), {f, "got 512"}));
  }
}

TEST(ConfigError, BadQuantizationConfig) {
  EXPECT_TRUE(fails_with(tiny_quant({{"quant_method", "awq"}}), {"unsupported quantization_config.quant_method 'awq'"}));
  EXPECT_TRUE(fails_with(tiny_quant({{"fmt", "e4m3"}}), {"quantization_config.quant_method"}));
  EXPECT_TRUE(fails_with(tiny_quant({{"quant_method", "fp8"}, {"fmt", "e5m2"}}),
                         {"unsupported quantization_config.fmt 'e5m2'"}));
  EXPECT_TRUE(fails_with(tiny_quant({{"quant_method", "fp8"}, {"activation_scheme", "static"}}),
                         {"unsupported quantization_config.activation_scheme 'static'"}));
}

TEST(ConfigError, BadWeightBlockSize) {
  for (const json& b : {json::array({128}), json::array({128, 128, 1}), json("128"), json::array({128, 1.5}),
                        json(nullptr)})
    EXPECT_TRUE(fails_with(tiny_quant({{"quant_method", "fp8"}, {"weight_block_size", b}}),
                           {"'quantization_config.weight_block_size'", "list of 2 integers"}))
        << b.dump();
  for (const json& b : {json::array({0, 128}), json::array({128, -1})})
    EXPECT_TRUE(fails_with(tiny_quant({{"quant_method", "fp8"}, {"weight_block_size", b}}),
                           {"quantization_config.weight_block_size", "positive"}))
        << b.dump();
}

TEST(ConfigError, ValidateCatchesProgrammaticConfigs) {
  ModelConfig c;
  c.rms_norm_eps = std::numeric_limits<double>::quiet_NaN();
  EXPECT_THROW(c.validate(), Error);
  c = ModelConfig{};
  c.rope_scaling = RopeScaling{};
  c.rope_scaling->mscale = std::numeric_limits<double>::infinity();
  try {
    c.validate("x.json");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("x.json: rope_scaling.mscale"), std::string::npos) << e.what();
  }
}

// ---- load(): file-level errors name the path ----

TEST(ConfigError, LoadMissingFile) {
  const std::string p = "/nonexistent/dsv3/config.json";
  const std::string e = load_error(p);
  EXPECT_EQ(e.rfind(p + ": ", 0), 0u) << e;
  EXPECT_NE(e.find("not found"), std::string::npos) << e;
}

TEST(ConfigError, LoadDirectory) {
  const std::string dir = std::filesystem::temp_directory_path().string();
  const std::string e = load_error(dir);
  EXPECT_EQ(e.rfind(dir + ": ", 0), 0u) << e;
  EXPECT_NE(e.find("directory"), std::string::npos) << e;
}

TEST(ConfigError, LoadInvalidJson) {
  const std::string p = temp_file("bad.json", "{\"hidden_size\": 64,\n \"vocab_size\": }");
  const std::string e = load_error(p);
  EXPECT_EQ(e.rfind(p + ": invalid JSON at byte ", 0), 0u) << e;
  EXPECT_EQ(e.find('\n'), std::string::npos) << e;
  EXPECT_NE(load_error(temp_file("empty.json", "")).find("invalid JSON"), std::string::npos);
}

TEST(ConfigError, LoadNotAnObject) {
  const std::string p = temp_file("array.json", "[1, 2, 3]\n");
  const std::string e = load_error(p);
  EXPECT_EQ(e.rfind(p + ": ", 0), 0u) << e;
  EXPECT_NE(e.find("object"), std::string::npos) << e;
}

TEST(ConfigError, LoadFieldErrorNamesPath) {
  json j = read_json(kTiny);
  j["hidden_size"] = "abc";
  const std::string p = temp_file("typed.json", j.dump(2));
  EXPECT_EQ(load_error(p), p + ": field 'hidden_size' must be an integer, got \"abc\"");
}
