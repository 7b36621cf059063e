#include "model/init.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <vector>

#include "io/safetensors.h"

namespace dsv3 {

namespace {
uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
double uniform01(uint64_t& s) { return (double(splitmix(s) >> 11) + 0.5) * 0x1.0p-53; }

// N(0, std) values, reproducible from (seed, tensor index) whatever the thread count.
Tensor normal_f32(Shape shape, float std, uint64_t seed) {
  Tensor t = Tensor::empty(DType::F32, std::move(shape));
  const int64_t n = t.numel(), chunk = 1 << 16;
  float* p = t.f32();
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < (n + chunk - 1) / chunk; ++c) {
    uint64_t s = seed * 0x100000001b3ull + uint64_t(c) * 0x9e3779b97f4a7c15ull;
    for (int64_t i = c * chunk; i < std::min(n, (c + 1) * chunk); i += 2) {
      const double r = std::sqrt(-2.0 * std::log(uniform01(s))), a = 2.0 * M_PI * uniform01(s);
      p[i] = float(r * std::cos(a)) * std;
      if (i + 1 < n) p[i + 1] = float(r * std::sin(a)) * std;
    }
  }
  return t;
}

// DeepSeek's fp8 weight format: e4m3 values and one f32 scale per 128x128 block (amax / 448).
void quantize_fp8(const Tensor& w, int64_t bn, int64_t bk, Tensor& q, Tensor& scale_inv) {
  const int64_t N = w.dim(0), K = w.dim(1), nb = (N + bn - 1) / bn, kb = (K + bk - 1) / bk;
  q = Tensor::empty(DType::F8_E4M3, {N, K});
  scale_inv = Tensor::empty(DType::F32, {nb, kb});
  for (int64_t i = 0; i < nb; ++i)
    for (int64_t j = 0; j < kb; ++j) {
      float amax = 0.0f;
      for (int64_t r = i * bn; r < std::min(N, (i + 1) * bn); ++r)
        for (int64_t c = j * bk; c < std::min(K, (j + 1) * bk); ++c) amax = std::max(amax, std::fabs(w.f32()[r * K + c]));
      const float s = amax > 0.0f ? amax / kFp8E4M3Max : 1.0f;
      scale_inv.f32()[i * kb + j] = s;
      for (int64_t r = i * bn; r < std::min(N, (i + 1) * bn); ++r)
        for (int64_t c = j * bk; c < std::min(K, (j + 1) * bk); ++c)
          static_cast<uint8_t*>(q.raw())[r * K + c] = f32_to_fp8_e4m3_saturate(w.f32()[r * K + c] / s);
    }
}

struct Writer {
  const ModelConfig& c;
  const InitOptions& o;
  std::vector<std::pair<std::string, Tensor>> out;
  uint64_t counter = 0;

  void norm(const std::string& name, int64_t n) {
    Tensor t = Tensor::empty(DType::F32, {n});
    std::fill_n(t.f32(), n, 1.0f);
    out.emplace_back(name, t.to(DType::BF16));
  }
  void dense(const std::string& name, int64_t n, int64_t k) {  // never quantized
    out.emplace_back(name, normal_f32({n, k}, float(c.initializer_range), o.seed + ++counter).to(DType::BF16));
  }
  void linear(const std::string& name, int64_t n, int64_t k) {
    Tensor w = normal_f32({n, k}, float(c.initializer_range), o.seed + ++counter);
    if (!o.fp8) {
      out.emplace_back(name, w.to(DType::BF16));
      return;
    }
    Tensor q, s;
    quantize_fp8(w, c.quant.block_n, c.quant.block_k, q, s);
    out.emplace_back(name, q);
    out.emplace_back(name + "_scale_inv", s);
  }
  void mlp(const std::string& p, int64_t inter) {
    linear(p + "gate_proj.weight", inter, c.hidden_size);
    linear(p + "up_proj.weight", inter, c.hidden_size);
    linear(p + "down_proj.weight", c.hidden_size, inter);
  }
  void layer(int64_t l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const int64_t H = c.hidden_size, nh = c.num_attention_heads, dqk = c.qk_head_dim();
    norm(p + "input_layernorm.weight", H);
    norm(p + "post_attention_layernorm.weight", H);
    const std::string a = p + "self_attn.";
    if (c.q_lora_rank > 0) {
      linear(a + "q_a_proj.weight", c.q_lora_rank, H);
      norm(a + "q_a_layernorm.weight", c.q_lora_rank);
      linear(a + "q_b_proj.weight", nh * dqk, c.q_lora_rank);
    } else {
      linear(a + "q_proj.weight", nh * dqk, H);
    }
    linear(a + "kv_a_proj_with_mqa.weight", c.kv_lora_rank + c.qk_rope_head_dim, H);
    norm(a + "kv_a_layernorm.weight", c.kv_lora_rank);
    linear(a + "kv_b_proj.weight", nh * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank);
    linear(a + "o_proj.weight", H, nh * c.v_head_dim);
    if (!c.is_moe_layer(l)) return mlp(p + "mlp.", c.intermediate_size);
    dense(p + "mlp.gate.weight", c.n_routed_experts, H);
    Tensor bias = Tensor::empty(DType::F32, {c.n_routed_experts});
    uint64_t s = o.seed * 31 + uint64_t(l);
    for (int64_t e = 0; e < c.n_routed_experts; ++e) bias.f32()[e] = float((2.0 * uniform01(s) - 1.0) * o.bias_scale);
    out.emplace_back(p + "mlp.gate.e_score_correction_bias", bias);
    for (int64_t e = 0; e < c.n_routed_experts; ++e) mlp(p + "mlp.experts." + std::to_string(e) + ".", c.moe_intermediate_size);
    if (c.n_shared_experts > 0) mlp(p + "mlp.shared_experts.", c.n_shared_experts * c.moe_intermediate_size);
  }
};
}  // namespace

void write_random_checkpoint(const ModelConfig& cfg_in, const std::string& dir, const InitOptions& opts) {
  ModelConfig cfg = cfg_in;
  cfg.quant.fp8 = opts.fp8;
  cfg.validate();
  std::filesystem::create_directories(dir);
  Writer w{cfg, opts, {}, 0};
  const int64_t H = cfg.hidden_size, V = cfg.vocab_size;
  w.dense("model.embed_tokens.weight", V, H);
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) w.layer(l);
  w.norm("model.norm.weight", H);
  if (!cfg.tie_word_embeddings) w.dense("lm_head.weight", V, H);
  for (int64_t k = 0; k < cfg.num_nextn_predict_layers; ++k) {
    const int64_t l = cfg.num_hidden_layers + k;
    const std::string p = "model.layers." + std::to_string(l) + ".";
    w.norm(p + "enorm.weight", H);
    w.norm(p + "hnorm.weight", H);
    w.dense(p + "eh_proj.weight", H, 2 * H);
    w.norm(p + "shared_head.norm.weight", H);
    w.layer(l);
  }
  io::write_safetensors((std::filesystem::path(dir) / "model.safetensors").string(), w.out, {{"format", "pt"}});
  const std::string cfg_path = (std::filesystem::path(dir) / "config.json").string();
  std::ofstream(cfg_path) << cfg.to_json().dump(2) << "\n";
  DSV3_CHECK(std::filesystem::file_size(cfg_path) > 0, "{}: could not write config", cfg_path);
}

}  // namespace dsv3
