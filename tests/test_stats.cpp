// model_stats (src/model/stats.h) on the real DeepSeek-V3 config: the numbers of the technical report and
// of the Hugging Face release, derived here by hand (not with the formula stats.cpp uses).
//
// Per layer (H = 7168, 128 heads, q_lora 1536, kv_lora 512, rope 64, nope 128, v 128):
//   q_a_proj 7168·1536 = 11,010,048      q_a_layernorm 1,536
//   q_b_proj 1536·128·192 = 37,748,736   kv_a_proj_with_mqa 7168·576 = 4,128,768   kv_a_layernorm 512
//   kv_b_proj 512·128·256 = 16,777,216   o_proj 128·128·7168 = 117,440,512
//   attention = 187,107,328; input/post-attention norms 2·7168 = 14,336
//   dense MLP 3·7168·18432 = 396,361,728  -> dense layer 583,483,392
//   expert 3·7168·2048 = 44,040,192; router 256·7168 = 1,835,008 (e_score_correction_bias is a buffer: not counted)
//   MoE layer, all experts: 187,107,328 + 14,336 + 1,835,008 + 44,040,192 (shared) + 256·44,040,192 = 11,507,286,016
//   MoE layer, active (top-8): 187,107,328 + 14,336 + 1,835,008 + 9·44,040,192 = 585,318,400
// Main model: embed 129280·7168 = 926,679,040, lm_head the same, final norm 7,168:
//   total  = 2·926,679,040 + 7,168 + 3·583,483,392 + 58·11,507,286,016 = 671,026,404,352  (the report's 671B)
//   active = 2·926,679,040 + 7,168 + 3·583,483,392 + 58·585,318,400    =  37,552,282,624  (the report's 37B)
// MTP module (1 layer): enorm + hnorm 2·7168, eh_proj 7168·14336 = 102,760,448, one MoE layer, shared_head.norm 7168
//   = 11,610,067,968. The HF release also stores the module's own copies of embed_tokens and shared_head.head
//   (2·926,679,040), so it holds 671,026,404,352 + 11,610,067,968 + 1,853,358,080 = 684,489,830,400 weights
//   (+ ~42M fp8 weight_scale_inv values: "685B" on the model card, "671B main + 14B MTP").
// Latent KV cache: 61 layers × (512 + 64) = 35,136 values/token = 70,272 bytes in bf16, 140,544 in f32.
#include <gtest/gtest.h>

#include "model/stats.h"

using namespace dsv3;

namespace {

ModelConfig deepseek_v3_config() {
  ModelConfig c;  // every field written out (the official config.json), not taken from the struct's defaults
  c.vocab_size = 129280;
  c.hidden_size = 7168;
  c.intermediate_size = 18432;
  c.moe_intermediate_size = 2048;
  c.num_hidden_layers = 61;
  c.first_k_dense_replace = 3;
  c.moe_layer_freq = 1;
  c.num_attention_heads = 128;
  c.num_key_value_heads = 128;
  c.n_shared_experts = 1;
  c.n_routed_experts = 256;
  c.num_experts_per_tok = 8;
  c.n_group = 8;
  c.topk_group = 4;
  c.routed_scaling_factor = 2.5;
  c.norm_topk_prob = true;
  c.q_lora_rank = 1536;
  c.kv_lora_rank = 512;
  c.qk_nope_head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.v_head_dim = 128;
  c.max_position_embeddings = 163840;
  c.rope_scaling = RopeScaling{40.0, 4096, 32.0, 1.0, 1.0, 1.0};
  c.num_nextn_predict_layers = 1;
  c.tie_word_embeddings = false;
  c.validate("DeepSeek-V3 config");
  return c;
}

}  // namespace

TEST(Stats, DeepSeekV3ParameterCounts) {
  const ModelConfig c = deepseek_v3_config();
  const ModelStats s = model_stats(c);
  EXPECT_EQ(s.params_main, 671'026'404'352);
  EXPECT_EQ(s.active_main, 37'552'282'624);
  EXPECT_EQ(s.params_mtp, 11'610'067'968);
  // As the release stores it: with the MTP module's embedding and head copies.
  EXPECT_EQ(s.params_main + s.params_mtp + 2 * c.vocab_size * c.hidden_size, 684'489'830'400);
  // The report's round figures.
  EXPECT_NEAR(double(s.params_main) / 1e9, 671.0, 0.5);
  EXPECT_NEAR(double(s.active_main) / 1e9, 37.0, 1.0);
}

TEST(Stats, DeepSeekV3LatentKvCache) {
  const ModelStats s = model_stats(deepseek_v3_config());
  EXPECT_EQ(s.kv_cache_values_per_token, 35'136);
  EXPECT_EQ(s.kv_cache_values_per_token * 2, 70'272);  // bytes/token in bf16, as `dsv3 info` prints
}

// Variants change the counts the way the architecture says.
TEST(Stats, ConfigVariants) {
  const ModelConfig base = deepseek_v3_config();
  const ModelStats s0 = model_stats(base);
  const int64_t H = 7168, V = 129280, expert = 3 * H * 2048;

  ModelConfig plain_q = base;  // q_proj [128·192, 7168] replaces q_a_proj + q_a_layernorm + q_b_proj
  plain_q.q_lora_rank = 0;
  const int64_t dq = int64_t(128) * 192 * H - (H * 1536 + 1536 + 1536 * int64_t(128) * 192);
  EXPECT_EQ(model_stats(plain_q).params_main - s0.params_main, 61 * dq);
  EXPECT_EQ(model_stats(plain_q).params_mtp - s0.params_mtp, dq);

  ModelConfig all_moe = base;  // three dense MLPs become MoE layers
  all_moe.first_k_dense_replace = 0;
  EXPECT_EQ(model_stats(all_moe).params_main - s0.params_main, 3 * (256 * H + 257 * expert - 3 * H * 18432));
  EXPECT_EQ(model_stats(all_moe).active_main - s0.active_main, 3 * (256 * H + 9 * expert - 3 * H * 18432));

  ModelConfig no_mtp = base;
  no_mtp.num_nextn_predict_layers = 0;
  EXPECT_EQ(model_stats(no_mtp).params_mtp, 0);
  EXPECT_EQ(model_stats(no_mtp).params_main, s0.params_main);

  ModelConfig tied = base;
  tied.tie_word_embeddings = true;
  EXPECT_EQ(s0.params_main - model_stats(tied).params_main, V * H);

  ModelConfig no_shared = base;
  no_shared.n_shared_experts = 0;
  EXPECT_EQ(s0.params_main - model_stats(no_shared).params_main, 58 * expert);
  EXPECT_EQ(s0.active_main - model_stats(no_shared).active_main, 58 * expert);
}

// Forward FLOPs per token: 2 per multiply-add over every matrix a token passes through (q_a, q_b, kv_a, kv_b, o,
// the MLP or router + shared + 8 experts, the head; not the embedding lookup or the norms) plus causal attention
// over (T+1)/2 keys on average: per layer and head, (192 + 128) multiply-adds per key.
TEST(Stats, DeepSeekV3ForwardFlops) {
  const ModelStats s = model_stats(deepseek_v3_config());
  const double H = 7168, V = 129280;
  const double attn_mats = H * 1536 + 1536.0 * 128 * 192 + H * 576 + 512.0 * 128 * 256 + 128.0 * 128 * H;  // 187,105,280
  const double dense_mats = attn_mats + 3 * H * 18432;
  const double moe_mats = attn_mats + 256 * H + 9 * 3 * H * 2048;
  const double matmul = V * H + 3 * dense_mats + 58 * moe_mats;
  EXPECT_DOUBLE_EQ(attn_mats, 187'105'280.0);
  for (int64_t T : {1, 4096, 32768}) {
    const double attn = 61.0 * 128 * (192 + 128) * double(T + 1) / 2.0;
    EXPECT_NEAR(s.forward_flops_per_token(T), 2.0 * (matmul + attn), 1e-9 * 2.0 * (matmul + attn)) << "T = " << T;
  }
  // About 2 × 36.6B at short contexts: the active parameters less the embedding table and norm vectors.
  EXPECT_NEAR(s.forward_flops_per_token(1) / 2e9, 36.6, 0.1);
}
