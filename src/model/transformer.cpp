#include "model/transformer.h"

#include <algorithm>
#include <filesystem>

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

}  // namespace dsv3
