#include "model/transformer.h"

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "io/atomic_dir.h"

namespace dsv3 {

std::unique_ptr<Transformer> Transformer::load(const std::string& dir) {
  DSV3_CHECK(std::filesystem::is_directory(dir), "{}: not a model folder", dir);
  auto m = std::make_unique<Transformer>();
  m->cfg_ = ModelConfig::load((std::filesystem::path(dir) / "config.json").string());
  m->ckpt_ = io::Checkpoint::open(dir);
  const ModelConfig& c = m->cfg_;
  WeightLoader w(m->ckpt_, c);
  m->embed_tokens_ = w.tensor("model.embed_tokens.weight", {c.vocab_size, c.hidden_size});
  m->norm_ = w.tensor("model.norm.weight", {c.hidden_size});
  if (w.has("lm_head.weight") || !c.tie_word_embeddings) {
    m->lm_head_ = w.linear("lm_head.weight", c.vocab_size, c.hidden_size);
  } else {
    m->lm_head_.w = m->embed_tokens_;  // tied embeddings
  }
  m->layers_.resize(size_t(c.num_hidden_layers));
  for (int64_t i = 0; i < c.num_hidden_layers; ++i)
    m->layers_[size_t(i)].load(w, "model.layers." + std::to_string(i) + ".", i, c);
  m->mtp_.resize(size_t(c.num_nextn_predict_layers));
  for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) m->mtp_[size_t(k)].load(w, c.num_hidden_layers + k, c);
  return m;
}

namespace {
Tensor as_batch(const Tensor& rows, int64_t B, int64_t T) { return rows.reshape({B, T, rows.dim(1)}); }

Tensor sorted_i64(const Tensor& idx) {
  Tensor out = idx.to(DType::I64);
  const int64_t M = out.dim(0), K = out.dim(1);
  for (int64_t m = 0; m < M; ++m) std::sort(out.data<int64_t>() + m * K, out.data<int64_t>() + (m + 1) * K);
  return out;
}

// Rows [b, t0 : t0+n) of every sequence of a [B·T, D] activation, as a new [B·n, D] tensor.
Tensor take_positions(const Tensor& x, int64_t B, int64_t T, int64_t t0, int64_t n) {
  const int64_t D = x.dim(1);
  Tensor out = Tensor::empty(x.dtype(), {B * n, D});
  const size_t row = size_t(D) * dtype_size(x.dtype());
  for (int64_t b = 0; b < B; ++b)
    std::memcpy(static_cast<char*>(out.raw()) + size_t(b * n) * row, static_cast<const char*>(x.raw()) + size_t(b * T + t0) * row,
                size_t(n) * row);
  return out;
}
}  // namespace

ForwardResult Transformer::forward(const Tensor& input_ids, const ForwardOptions& opts) const {
  DSV3_CHECK(input_ids.ndim() == 2, "input_ids must be [B, T], got {}", shape_str(input_ids.shape()));
  DSV3_CHECK(input_ids.dtype() == DType::I64 || input_ids.dtype() == DType::I32, "input_ids must be int64 or int32, got {}",
             dtype_name(input_ids.dtype()));
  const int64_t B = input_ids.dim(0), T = input_ids.dim(1), D = cfg_.hidden_size, M = B * T;
  DSV3_CHECK(B > 0 && T > 0, "input_ids is empty ({})", shape_str(input_ids.shape()));
  const float eps = float(cfg_.rms_norm_eps);
  const Tensor ids = input_ids.contiguous().to(DType::I64).reshape({M});
  ForwardResult r;

  Tensor h = Tensor::empty(DType::F32, {M, D});
  ops::embedding(ids, embed_tokens_, h);
  if (opts.hidden_states) r.hidden_states.push_back(as_batch(h.clone(), B, T));
  const Batch batch = Batch::contiguous(B, T);
  for (size_t i = 0; i < layers_.size(); ++i) {
    Tensor routing;
    layers_[i].forward(h, batch, opts.routing ? &routing : nullptr);
    if (routing.defined()) r.routing[int64_t(i)] = sorted_i64(routing);
    if (opts.hidden_states && i + 1 < layers_.size()) r.hidden_states.push_back(as_batch(h.clone(), B, T));
  }
  Tensor final_h = Tensor::empty(DType::F32, {M, D});
  ops::rmsnorm(h, norm_, eps, final_h);
  if (opts.hidden_states) r.hidden_states.push_back(as_batch(final_h, B, T));
  r.final_hidden = as_batch(final_h, B, T);
  Tensor logits = Tensor::empty(DType::F32, {M, cfg_.vocab_size});
  ops::linear(final_h, lm_head_, logits);
  r.logits = as_batch(logits, B, T);

  // MTP depth k predicts token i+k+1 from h^{k-1}_i and the embedding of token i+k, for i < T-k.
  const int64_t depth = opts.mtp_depth < 0 ? int64_t(mtp_.size()) : std::min<int64_t>(opts.mtp_depth, int64_t(mtp_.size()));
  Tensor h_prev = final_h;  // h^0, [B·(T-k+1), D] at depth k
  for (int64_t k = 1; k <= depth && k < T; ++k) {
    const MtpModule& mod = mtp_[size_t(k - 1)];
    const int64_t n = T - k;
    Tensor prev = take_positions(h_prev, B, n + 1, 0, n);
    Tensor ahead = take_positions(ids.reshape({M, 1}), B, T, k, n).reshape({B * n});
    Tensor emb = Tensor::empty(DType::F32, {B * n, D});
    ops::embedding(ahead, mod.embed_tokens(), emb);
    h_prev = mod.forward(prev, emb, Batch::contiguous(B, n));
    r.mtp_logits.push_back(as_batch(mod.logits(h_prev), B, n));
  }
  return r;
}

namespace {
Tensor ids_tensor(const std::vector<int64_t>& tokens) {
  return Tensor::from_vector(tokens, {int64_t(tokens.size())});
}
}  // namespace

Transformer::Step Transformer::step(const std::vector<int64_t>& tokens, const Batch& batch, LatentCache& cache,
                                    bool all_logits) const {
  const int64_t M = int64_t(tokens.size()), D = cfg_.hidden_size;
  DSV3_CHECK(M == batch.rows() && M > 0, "step: {} tokens for a batch of {} rows", M, batch.rows());
  Tensor h = Tensor::empty(DType::F32, {M, D});
  ops::embedding(ids_tensor(tokens), embed_tokens_, h);
  for (const DecoderLayer& layer : layers_) layer.forward(h, batch, nullptr, &cache);
  Step out;
  out.hidden = Tensor::empty(DType::F32, {M, D});
  ops::rmsnorm(h, norm_, float(cfg_.rms_norm_eps), out.hidden);
  Tensor rows = out.hidden;
  if (!all_logits) {
    rows = Tensor::empty(DType::F32, {int64_t(batch.seqs.size()), D});
    int64_t r = 0;
    for (size_t s = 0; s < batch.seqs.size(); ++s) {
      r += batch.seqs[s].n;
      std::copy_n(out.hidden.f32() + (r - 1) * D, D, rows.f32() + int64_t(s) * D);
    }
  }
  out.logits = Tensor::empty(DType::F32, {rows.dim(0), cfg_.vocab_size});
  ops::linear(rows, lm_head_, out.logits);
  return out;
}

Tensor Transformer::mtp_step(int64_t k, const Tensor& h_prev, const std::vector<int64_t>& ahead, const Batch& batch,
                             LatentCache& cache, Tensor* h_out) const {
  DSV3_CHECK(k >= 1 && k <= int64_t(mtp_.size()), "the checkpoint has {} MTP modules, depth {} asked", mtp_.size(), k);
  const MtpModule& mod = mtp_[size_t(k - 1)];
  Tensor emb = Tensor::empty(DType::F32, {int64_t(ahead.size()), cfg_.hidden_size});
  ops::embedding(ids_tensor(ahead), mod.embed_tokens(), emb);
  Tensor h = mod.forward(h_prev, emb, batch, nullptr, &cache);
  if (h_out) *h_out = h;
  return mod.logits(h);
}

Transformer::Losses Transformer::loss_and_grads(const Tensor& input_ids, const LossOptions& opts, Grads& g) const {
  const float mtp_lambda = opts.mtp_lambda;
  DSV3_CHECK(input_ids.ndim() == 2 && input_ids.dim(1) >= 2, "training input must be [B, T] with T >= 2, got {}",
             shape_str(input_ids.shape()));
  const int64_t B = input_ids.dim(0), T = input_ids.dim(1), D = cfg_.hidden_size, V = cfg_.vocab_size, M = B * T;
  const float eps = float(cfg_.rms_norm_eps);
  const Tensor ids = input_ids.contiguous().to(DType::I64).reshape({M});
  const int64_t* id = ids.data<int64_t>();
  const Batch batch = Batch::contiguous(B, T);
  const std::string embed_name = "model.embed_tokens.weight";
  ops::Weight head = lm_head_;
  head.name = lm_head_.name.empty() ? embed_name : lm_head_.name;  // tied embeddings: the head is the embedding

  // Forward, keeping what backward needs.
  Tensor h = Tensor::empty(DType::F32, {M, D});
  ops::embedding(ids, embed_tokens_, h);
  std::vector<DecoderLayer::Ctx> ctx(layers_.size());
  Losses out;
  // Balancing statistics of a MoE layer's forward: its load and, with α > 0, the sequence-wise loss.
  auto balance = [&](int64_t layer, const DecoderLayer& l, DecoderLayer::Ctx& c, int64_t seq_len) {
    if (!l.is_moe()) return;
    out.expert_load[layer] = Moe::expert_load(c.moe);
    if (opts.balance_alpha > 0) out.balance_loss += l.moe().balance_loss(c.moe, seq_len, opts.balance_alpha);
  };
  for (size_t i = 0; i < layers_.size(); ++i) {
    ctx[i].attn.recompute = opts.recompute;
    layers_[i].forward(h, batch, nullptr, nullptr, &ctx[i]);
    balance(int64_t(i), layers_[i], ctx[i], T);
  }
  Tensor final_h = Tensor::empty(DType::F32, {M, D});
  ops::rmsnorm(h, norm_, eps, final_h);
  Tensor dfinal = Tensor::zeros(DType::F32, {M, D});
  {
    Tensor logits = Tensor::empty(DType::F32, {M, V}), dlogits = Tensor::empty(DType::F32, {M, V});
    ops::linear(final_h, lm_head_, logits);
    std::vector<int64_t> targets(static_cast<size_t>(M));
    for (int64_t i = 0; i < M; ++i) targets[size_t(i)] = i % T + 1 < T ? id[i + 1] : -1;
    out.loss = ops::cross_entropy(logits, targets, &dlogits);
    ops::linear_backward(final_h, head, dlogits, &dfinal, g.of(head.name, {V, D}));
  }

  // MTP depth k: position i (< T-k) reads h^{k-1}_i and token i+k, predicts token i+k+1.
  const int64_t depth = std::min<int64_t>(int64_t(mtp_.size()), T - 2);
  if (depth > 0) {
    struct Level {
      Batch batch;
      Tensor prev, ahead, out;
      MtpModule::Ctx ctx;
    };
    std::vector<Level> lv(static_cast<size_t>(depth));
    std::vector<Tensor> dh(static_cast<size_t>(depth));
    Tensor h_prev = final_h;
    for (int64_t k = 1; k <= depth; ++k) {
      Level& L = lv[size_t(k - 1)];
      const MtpModule& mod = mtp_[size_t(k - 1)];
      const int64_t n = T - k;
      L.batch = Batch::contiguous(B, n);
      L.prev = take_positions(h_prev, B, n + 1, 0, n);
      L.ahead = take_positions(ids.reshape({M, 1}), B, T, k, n).reshape({B * n});
      Tensor emb = Tensor::empty(DType::F32, {B * n, D});
      ops::embedding(L.ahead, mod.embed_tokens(), emb);
      L.ctx.layer.attn.recompute = opts.recompute;
      L.out = mod.forward(L.prev, emb, L.batch, nullptr, nullptr, &L.ctx);
      balance(cfg_.num_hidden_layers + k - 1, mod.layer(), L.ctx.layer, n);
      // Loss of this depth through the shared head.
      Tensor normed = Tensor::empty(DType::F32, {B * n, D}), logits = Tensor::empty(DType::F32, {B * n, V});
      ops::rmsnorm(L.out, mod.head_norm(), eps, normed);
      ops::linear(normed, mod.head(), logits);
      std::vector<int64_t> targets(static_cast<size_t>(B * n));
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < n; ++i) targets[size_t(b * n + i)] = i + k + 1 < T ? id[b * T + i + k + 1] : -1;
      Tensor dlogits = Tensor::empty(DType::F32, {B * n, V}), dnormed = Tensor::empty(DType::F32, {B * n, D});
      out.mtp_loss += ops::cross_entropy(logits, targets, &dlogits, mtp_lambda / float(depth)) / double(depth);
      ops::linear_backward(normed, head, dlogits, &dnormed, g.of(head.name, {V, D}));
      dh[size_t(k - 1)] = Tensor::empty(DType::F32, {B * n, D});
      ops::rmsnorm_backward(L.out, mod.head_norm(), eps, dnormed, dh[size_t(k - 1)],
                            g.of(mod.prefix() + "shared_head.norm.weight", {D}));
      h_prev = L.out;
    }
    // Backward from the deepest module; each passes a gradient to the positions of the one before.
    for (int64_t k = depth; k >= 1; --k) {
      Level& L = lv[size_t(k - 1)];
      const int64_t n = T - k;
      Tensor demb;
      Tensor dprev = mtp_[size_t(k - 1)].backward(L.ctx, dh[size_t(k - 1)], L.batch, g, &demb);
      ops::embedding_backward(L.ahead, demb, g.of(embed_name, {V, D}));
      Tensor& target = k == 1 ? dfinal : dh[size_t(k - 2)];
      const int64_t rows_per_seq = k == 1 ? T : T - k + 1;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < n; ++i) {
          float* dst = target.f32() + (b * rows_per_seq + i) * D;
          const float* src = dprev.f32() + (b * n + i) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
        }
    }
  }

  // Main model backward.
  Tensor dh_main = Tensor::empty(DType::F32, {M, D});
  ops::rmsnorm_backward(h, norm_, eps, dfinal, dh_main, g.of("model.norm.weight", {D}));
  for (size_t i = layers_.size(); i-- > 0;) dh_main = layers_[i].backward(ctx[i], dh_main, batch, g);
  ops::embedding_backward(ids, dh_main, g.of(embed_name, {V, D}));
  return out;
}

void Transformer::visit(const ParamVisitor& v) {
  v.tensor("model.embed_tokens.weight", embed_tokens_);
  for (DecoderLayer& l : layers_) l.visit(v);
  v.tensor("model.norm.weight", norm_);
  if (!lm_head_.name.empty()) v.weight(lm_head_);
  for (MtpModule& m : mtp_) m.visit(v);
}

void Transformer::make_trainable() {
  visit({[](ops::Weight& w) {
           w.w = w.to_f32();
           w.scale_inv = Tensor();
         },
         [](const std::string&, Tensor& t) { t = t.to(DType::F32); },
         [](const std::string&, Tensor& t) { t = t.to(DType::F32); }});
  if (lm_head_.name.empty()) lm_head_.w = embed_tokens_;  // tied embeddings stay one tensor
  for (MtpModule& m : mtp_) m.tie(embed_tokens_, lm_head_);
  cfg_.quant = QuantConfig{};
}

void Transformer::write_files(const std::string& dir, DType dtype) const {
  DSV3_CHECK(dtype == DType::F32 || dtype == DType::BF16, "save: dtype must be F32 or BF16");
  std::vector<std::pair<std::string, Tensor>> out;
  auto put = [&](const std::string& name, const Tensor& t) { out.emplace_back(name, t.to(dtype)); };
  // visit() needs a mutable model; it only reads here.
  auto& self = const_cast<Transformer&>(*this);
  self.visit({[&](ops::Weight& w) { put(w.name, w.to_f32()); }, [&](const std::string& n, Tensor& t) { put(n, t); },
              [&](const std::string& n, Tensor& t) { out.emplace_back(n, t.to(DType::F32)); }});
  for (int64_t k = 0; k < int64_t(mtp_.size()); ++k) {
    const std::string p = "model.layers." + std::to_string(cfg_.num_hidden_layers + k) + ".";
    put(p + "embed_tokens.weight", embed_tokens_);
    put(p + "shared_head.head.weight", lm_head_.to_f32());
  }
  ModelConfig c = cfg_;
  c.quant = QuantConfig{};
  c.torch_dtype = dtype == DType::BF16 ? "bfloat16" : "float32";
  const std::filesystem::path d(dir);
  io::write_safetensors((d / "model.safetensors").string(), out, {{"format", "pt"}});
  std::ofstream f(d / "config.json");
  f << c.to_json().dump(2) << "\n";
  f.close();
  DSV3_CHECK(f.good(), "{}: could not write config.json", dir);
}

void Transformer::save(const std::string& dir, DType dtype) const {
  io::replace_dir_atomically(dir, [&](const std::string& tmp) { write_files(tmp, dtype); });
}

}  // namespace dsv3
