// The DeepSeek-V3 modules. Each owns its weights (borrowed views into the mmap'd checkpoint) and its
// forward; activations are float32 rows [M = B·T, features], batch-major.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "model/loader.h"

namespace dsv3 {

// Where the rows of an activation sit: B sequences of T tokens, token t of every sequence at `positions[t]`.
struct Batch {
  int64_t B = 1, T = 1;
  std::vector<int64_t> positions;  // [B·T] RoPE position of each row
  static Batch contiguous(int64_t B, int64_t T);
  int64_t rows() const { return B * T; }
};

// Multi-head Latent Attention (§2.1.1), expanded form: kv_b_proj is applied to the latent c_kv.
class Mla {
 public:
  void load(const WeightLoader& w, const std::string& prefix, const ModelConfig& cfg);
  Tensor forward(const Tensor& x, const Batch& batch) const;  // x: normed input [M, hidden]

 private:
  int64_t H_ = 0, dn_ = 0, dr_ = 0, dv_ = 0, kvr_ = 0;
  float eps_ = 1e-6f, scale_ = 1.0f;
  ops::RopeTable rope_;
  std::optional<ops::Weight> q_a_proj_, q_b_proj_, q_proj_;
  Tensor q_a_layernorm_, kv_a_layernorm_;
  ops::Weight kv_a_proj_, kv_b_proj_, o_proj_;
};

// SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers, shared experts and routed experts.
class Mlp {
 public:
  void load(const WeightLoader& w, const std::string& prefix, int64_t hidden, int64_t inter);
  Tensor forward(const Tensor& x) const;

 private:
  ops::Weight gate_, up_, down_;
};

// DeepSeekMoE (§2.1.2): sigmoid group-limited routing over fine-grained experts plus shared experts.
class Moe {
 public:
  void load(const WeightLoader& w, const std::string& prefix, const ModelConfig& cfg);
  // routing (optional): receives the chosen experts [M, top_k] int32.
  Tensor forward(const Tensor& x, Tensor* routing = nullptr) const;

 private:
  int64_t hidden_ = 0;
  ops::RouterParams router_;
  ops::Weight gate_;
  Tensor bias_;  // e_score_correction_bias; no gradient, nudged by the balancer during training
  std::vector<Mlp> experts_;
  std::optional<Mlp> shared_;
};

class DecoderLayer {
 public:
  void load(const WeightLoader& w, const std::string& prefix, int64_t layer, const ModelConfig& cfg);
  // h: the residual stream [M, hidden], updated in place.
  void forward(Tensor& h, const Batch& batch, Tensor* routing = nullptr) const;
  bool is_moe() const { return moe_.has_value(); }

 private:
  float eps_ = 1e-6f;
  Tensor input_layernorm_, post_attention_layernorm_;
  Mla attn_;
  std::optional<Mlp> mlp_;
  std::optional<Moe> moe_;
};

// Multi-Token Prediction module k (§2.2): h'_i = eh_proj([enorm(embed(t_{i+k})); hnorm(h^{k-1}_i)]), one
// decoder layer, then the shared output head.
class MtpModule {
 public:
  void load(const WeightLoader& w, int64_t layer, const ModelConfig& cfg);
  // h_prev: [B·T', hidden] (T' = positions available at this depth); emb: embeddings of the tokens k ahead.
  Tensor forward(const Tensor& h_prev, const Tensor& emb, const Batch& batch, Tensor* routing = nullptr) const;
  Tensor logits(const Tensor& h) const;
  const Tensor& embed_tokens() const { return embed_tokens_; }

 private:
  float eps_ = 1e-6f;
  int64_t hidden_ = 0;
  Tensor enorm_, hnorm_, embed_tokens_, head_norm_;
  ops::Weight eh_proj_, head_;
  DecoderLayer layer_;
};

}  // namespace dsv3
