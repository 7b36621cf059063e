// The DeepSeek-V3 modules. Each owns its weights (borrowed views into the mmap'd checkpoint) and its
// forward; activations are float32 rows [M = B·T, features], batch-major.
#pragma once
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "kernels/ops.h"
#include "model/latent_cache.h"
#include "model/loader.h"

namespace dsv3 {

// Gradients by official tensor name: float32, the parameter's shape, zero until first accumulated into.
class Grads {
 public:
  Tensor& of(const std::string& name, const Shape& shape);
  const std::map<std::string, Tensor>& all() const { return g_; }

 private:
  std::map<std::string, Tensor> g_;
};

// Walks a module's tensors: trainable weights (linear layers and norm/embedding vectors, by official name)
// and buffers (e_score_correction_bias: updated by the balancer, never by gradients). Handles may be
// replaced (e.g. by float32 master copies for training).
struct ParamVisitor {
  std::function<void(ops::Weight&)> weight;
  std::function<void(const std::string& name, Tensor&)> tensor;
  std::function<void(const std::string& name, Tensor&)> buffer;
};

// Where the rows of an activation sit. Without a cache: B sequences of T tokens at positions 0..T-1.
// With a cache: the new tokens of each sequence, concatenated; sequence s owns cache slot `slot`, its
// first new token sits at position `start` and it has `n` new tokens.
struct Batch {
  struct Seq {
    int64_t slot = 0, start = 0, n = 0;
  };
  int64_t B = 1, T = 1;
  std::vector<Seq> seqs;           // cached batches only
  std::vector<int64_t> positions;  // RoPE position of each row
  static Batch contiguous(int64_t B, int64_t T);
  static Batch cached(std::vector<Seq> seqs);
  int64_t rows() const { return int64_t(positions.size()); }
};

// Multi-head Latent Attention (§2.1.1), expanded form: kv_b_proj is applied to the latent c_kv.
// With a cache it appends the new tokens' latents and attends in the absorbed form: kv_b_proj folded into
// the queries (q_nope·W_UK) and the output (W_UV·o_latent), so keys and values are never expanded.
class Mla {
 public:
  void load(const WeightLoader& w, const std::string& prefix, int64_t layer, const ModelConfig& cfg);
  struct Ctx {  // activations saved for backward (expanded form only)
    // Set before forward: keep only x, qa, kva and o, and recompute the rest (the q_a/kv_a RMSNorms and the q/kv
    // up-projections, report §3.2.3) in backward: less memory for one more pass through those products.
    bool recompute = false;
    Tensor x, qa, qan, q, kva, cn, kv, k, o;
  };
  // x: normed input [M, hidden]. cache: null for the expanded (training/prefill) form. ctx: filled when given.
  Tensor forward(const Tensor& x, const Batch& batch, LatentCache* cache = nullptr, Ctx* ctx = nullptr) const;
  Tensor backward(const Ctx& ctx, const Tensor& dout, const Batch& batch, Grads& g) const;  // returns dx
  void visit(const ParamVisitor& v);

 private:
  std::string prefix_;
  Tensor forward_absorbed(const Tensor& q, const Tensor& kva, const Batch& batch, LatentCache& cache) const;
  // Roped queries [M, H·(dn+dr)] of the normed input x (qa: q_a_proj's output, with q LoRA); qan gets q_a's norm.
  Tensor queries(const Tensor& x, const Tensor& qa, const Batch& batch, Tensor* qan) const;
  // From kva (roped k_rope): the normed latent cn, its up-projection kv [M, H·(dn+dv)] and the keys k [M, H, dn+dr].
  void keys(const Tensor& kva, Tensor* cn, Tensor* kv, Tensor* k) const;
  int64_t layer_ = 0, H_ = 0, dn_ = 0, dr_ = 0, dv_ = 0, kvr_ = 0;
  mutable Tensor kv_b_f32_;  // kv_b_proj in float32 [H·(dn+dv), kvr], made on first absorbed use
  float eps_ = 1e-6f, scale_ = 1.0f;
  ops::RopeTable rope_;
  std::optional<ops::Weight> q_a_proj_, q_b_proj_, q_proj_;
  Tensor q_a_layernorm_, kv_a_layernorm_;
  ops::Weight kv_a_proj_, kv_b_proj_, o_proj_;
};

// SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers, shared experts and routed experts.
class Mlp {
 public:
  struct Ctx {
    Tensor x, gu, a;
  };
  void load(const WeightLoader& w, const std::string& prefix, int64_t hidden, int64_t inter);
  Tensor forward(const Tensor& x, Ctx* ctx = nullptr) const;
  Tensor backward(const Ctx& ctx, const Tensor& dy, Grads& g) const;  // returns dx
  void reserve_grads(Grads& g) const;  // create its gradient tensors (before a parallel backward)
  void visit(const ParamVisitor& v);

 private:
  ops::Weight gate_, up_, down_;
};

// DeepSeekMoE (§2.1.2): sigmoid group-limited routing over fine-grained experts plus shared experts.
class Moe {
 public:
  void load(const WeightLoader& w, const std::string& prefix, const ModelConfig& cfg);
  struct Ctx {
    Tensor x, idx, wts, logits, out_slots;        // out_slots: [M·K, hidden] unweighted expert outputs
    std::vector<std::vector<int64_t>> slots;      // per expert: the (token·K + j) slots it served
    std::vector<Mlp::Ctx> experts;
    Mlp::Ctx shared;
    Tensor dlogits_aux;  // gradient of the sequence-wise balance loss w.r.t. the router logits, if any
  };
  // routing (optional): receives the chosen experts [M, top_k] int32.
  Tensor forward(const Tensor& x, Tensor* routing = nullptr, Ctx* ctx = nullptr) const;
  // Gradients flow through the routing weights into the gate (sigmoid → normalisation → scaling); the
  // selection itself and e_score_correction_bias get none.
  Tensor backward(const Ctx& ctx, const Tensor& dy, Grads& g) const;
  void visit(const ParamVisitor& v);
  // Tokens each routed expert received in the forward that filled ctx (the balancer's load).
  static std::vector<int64_t> expert_load(const Ctx& ctx);
  // The complementary sequence-wise balance loss (§2.3.3, eqs. 17-20) over sequences of seq_len rows,
  // averaged over sequences: α Σ_i f_i P_i. Stores its gradient in ctx.dlogits_aux for backward.
  double balance_loss(Ctx& ctx, int64_t seq_len, float alpha) const;

 private:
  std::string prefix_;
  int64_t hidden_ = 0, moe_width_ = 0;
  ops::RouterParams router_;
  ops::Weight gate_;
  Tensor bias_;  // e_score_correction_bias; no gradient, nudged by the balancer during training
  std::vector<Mlp> experts_;
  std::optional<Mlp> shared_;
};

class DecoderLayer {
 public:
  void load(const WeightLoader& w, const std::string& prefix, int64_t layer, const ModelConfig& cfg);
  struct Ctx {
    Tensor h_in, n1, h_mid, n2;
    Mla::Ctx attn;
    Mlp::Ctx mlp;
    Moe::Ctx moe;
  };
  // h: the residual stream [M, hidden], updated in place.
  void forward(Tensor& h, const Batch& batch, Tensor* routing = nullptr, LatentCache* cache = nullptr,
               Ctx* ctx = nullptr) const;
  // dh: gradient w.r.t. the layer's output; returns the gradient w.r.t. its input.
  Tensor backward(const Ctx& ctx, const Tensor& dh, const Batch& batch, Grads& g) const;
  bool is_moe() const { return moe_.has_value(); }
  const Moe& moe() const { return *moe_; }
  void visit(const ParamVisitor& v);

 private:
  std::string prefix_;
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
  struct Ctx {
    Tensor h_prev, emb, cat;
    DecoderLayer::Ctx layer;
  };
  Tensor forward(const Tensor& h_prev, const Tensor& emb, const Batch& batch, Tensor* routing = nullptr,
                 LatentCache* cache = nullptr, Ctx* ctx = nullptr) const;
  Tensor logits(const Tensor& h) const;
  const Tensor& embed_tokens() const { return embed_tokens_; }
  const Tensor& head_norm() const { return head_norm_; }
  const ops::Weight& head() const { return head_; }
  float eps() const { return eps_; }
  // dh: gradient w.r.t. forward's output. Returns the gradient w.r.t. h_prev; *demb receives the
  // gradient w.r.t. the embeddings.
  Tensor backward(const Ctx& ctx, const Tensor& dh, const Batch& batch, Grads& g, Tensor* demb) const;
  std::string prefix() const { return prefix_; }
  const DecoderLayer& layer() const { return layer_; }
  // Its own parameters (the embedding and head are the main model's and are not visited).
  void visit(const ParamVisitor& v);
  // Share the main model's embedding and output head (training ties them, §2.2).
  void tie(const Tensor& embed, const ops::Weight& head) { embed_tokens_ = embed, head_ = head; }

 private:
  std::string prefix_;
  float eps_ = 1e-6f;
  int64_t hidden_ = 0;
  Tensor enorm_, hnorm_, embed_tokens_, head_norm_;
  ops::Weight eh_proj_, head_;
  DecoderLayer layer_;
};

}  // namespace dsv3
