#include "model/modules.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

#include "model/rope.h"

namespace dsv3 {

namespace {
Tensor f32(Shape shape) { return Tensor::empty(DType::F32, std::move(shape)); }

Tensor rmsnormed(const Tensor& x, const Tensor& gamma, float eps) {
  Tensor y = f32({x.dim(0), x.dim(1)});
  ops::rmsnorm(x, gamma, eps, y);
  return y;
}

Tensor linear(const Tensor& x, const ops::Weight& w) {
  Tensor y = f32({x.dim(0), w.rows()});
  ops::linear(x, w, y);
  return y;
}

void add_inplace(Tensor& h, const Tensor& d) {
  float* hp = h.f32();
  const float* dp = d.f32();
  const int64_t n = h.numel();
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) hp[i] += dp[i];
}
}  // namespace

Tensor& Grads::of(const std::string& name, const Shape& shape) {
  auto it = g_.find(name);
  if (it == g_.end()) it = g_.emplace(name, Tensor::zeros(DType::F32, shape)).first;
  DSV3_CHECK(it->second.shape() == shape, "gradient '{}' has shape {}, not {}", name, shape_str(it->second.shape()),
             shape_str(shape));
  return it->second;
}

namespace {
Tensor& wgrad(Grads& g, const ops::Weight& w) { return g.of(w.name, {w.rows(), w.cols()}); }

// dx of a linear layer (written into a new tensor) and its weight gradient (accumulated).
Tensor linear_back(const Tensor& x, const ops::Weight& w, const Tensor& dy, Grads& g) {
  Tensor dx = f32({x.dim(0), x.dim(1)});
  ops::linear_backward(x, w, dy, &dx, wgrad(g, w));
  return dx;
}

Tensor rmsnorm_back(const Tensor& x, const Tensor& gamma, const std::string& name, float eps, const Tensor& dy, Grads& g) {
  Tensor dx = f32({x.dim(0), x.dim(1)});
  ops::rmsnorm_backward(x, gamma, eps, dy, dx, g.of(name, {gamma.numel()}));
  return dx;
}
}  // namespace

Batch Batch::cached(std::vector<Seq> seqs) {
  Batch b;
  b.B = int64_t(seqs.size());
  b.T = 0;
  for (const Seq& s : seqs)
    for (int64_t i = 0; i < s.n; ++i) b.positions.push_back(s.start + i);
  b.seqs = std::move(seqs);
  return b;
}

Batch Batch::contiguous(int64_t B, int64_t T) {
  Batch b;
  b.B = B, b.T = T;
  b.positions.resize(size_t(B * T));
  for (int64_t i = 0; i < B * T; ++i) b.positions[size_t(i)] = i % T;
  return b;
}

// ---- MLA ----

void Mla::load(const WeightLoader& w, const std::string& p, int64_t layer, const ModelConfig& c) {
  layer_ = layer;
  prefix_ = p;
  H_ = c.num_attention_heads, dn_ = c.qk_nope_head_dim, dr_ = c.qk_rope_head_dim, dv_ = c.v_head_dim;
  kvr_ = c.kv_lora_rank;
  eps_ = float(c.rms_norm_eps);
  scale_ = attention_softmax_scale(c);
  rope_ = make_rope_table(c);
  const int64_t hid = c.hidden_size, dqk = dn_ + dr_;
  if (c.q_lora_rank > 0) {
    q_a_proj_ = w.linear(p + "q_a_proj.weight", c.q_lora_rank, hid);
    q_a_layernorm_ = w.tensor(p + "q_a_layernorm.weight", {c.q_lora_rank});
    q_b_proj_ = w.linear(p + "q_b_proj.weight", H_ * dqk, c.q_lora_rank);
  } else {
    q_proj_ = w.linear(p + "q_proj.weight", H_ * dqk, hid);
  }
  kv_a_proj_ = w.linear(p + "kv_a_proj_with_mqa.weight", kvr_ + dr_, hid);
  kv_a_layernorm_ = w.tensor(p + "kv_a_layernorm.weight", {kvr_});
  kv_b_proj_ = w.linear(p + "kv_b_proj.weight", H_ * (dn_ + dv_), kvr_);
  o_proj_ = w.linear(p + "o_proj.weight", hid, H_ * dv_);
}

Tensor Mla::queries(const Tensor& x, const Tensor& qa, const Batch& bt, Tensor* qan) const {
  const int64_t M = x.dim(0), dqk = dn_ + dr_;
  Tensor q;
  if (q_proj_) {
    q = linear(x, *q_proj_);
  } else {
    *qan = rmsnormed(qa, q_a_layernorm_, eps_);
    q = linear(*qan, *q_b_proj_);
  }
  Tensor q_rope = q.reshape({M, H_, dqk}).slice(2, dn_, dqk);
  ops::rope(q_rope, bt.positions, rope_);
  return q;
}

void Mla::keys(const Tensor& kva, Tensor* cn, Tensor* kv, Tensor* k) const {
  const int64_t M = kva.dim(0), dqk = dn_ + dr_;
  *cn = rmsnormed(kva.slice(1, 0, kvr_), kv_a_layernorm_, eps_);
  *kv = linear(*cn, kv_b_proj_);  // [M, H·(dn+dv)]
  // Keys per head: [k_nope_h | k_rope], the rope part shared by all heads.
  *k = f32({M, H_, dqk});
  const float* kvp = kv->f32();
  const float* krp = kva.f32() + kvr_;
  float* kp = k->f32();
#pragma omp parallel for schedule(static) if (M * H_ * dqk > 65536)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t h = 0; h < H_; ++h) {
      float* dst = kp + (m * H_ + h) * dqk;
      std::copy_n(kvp + m * H_ * (dn_ + dv_) + h * (dn_ + dv_), dn_, dst);
      std::copy_n(krp + m * (kvr_ + dr_), dr_, dst + dn_);
    }
}

Tensor Mla::forward(const Tensor& x, const Batch& bt, LatentCache* cache, Ctx* ctx) const {
  const int64_t M = x.dim(0), B = bt.B, T = bt.T, dqk = dn_ + dr_;
  Tensor qa, qan;
  if (!q_proj_) qa = linear(x, *q_a_proj_);
  Tensor q = queries(x, qa, bt, &qan);
  Tensor kva = linear(x, kv_a_proj_);  // [M, kv_lora_rank + rope]: latent c_kv | shared k_rope
  Tensor k_rope = kva.reshape({M, 1, kvr_ + dr_}).slice(2, kvr_, kvr_ + dr_);
  ops::rope(k_rope, bt.positions, rope_);
  if (cache) return forward_absorbed(q, kva, bt, *cache);
  Tensor cn, kv, k;
  keys(kva, &cn, &kv, &k);
  Tensor v = kv.reshape({B, T, H_, dn_ + dv_}).slice(3, dn_, dn_ + dv_);
  Tensor o = f32({B, T, H_, dv_});
  ops::attention_causal(q.reshape({B, T, H_, dqk}), k.reshape({B, T, H_, dqk}), v, scale_, o);
  if (ctx) {
    const bool recompute = ctx->recompute;
    *ctx = recompute ? Ctx{true, x, qa, {}, {}, kva, {}, {}, {}, o} : Ctx{false, x, qa, qan, q, kva, cn, kv, k, o};
  }
  return linear(o.reshape({M, H_ * dv_}), o_proj_);
}

Tensor Mla::backward(const Ctx& saved, const Tensor& dout, const Batch& bt, Grads& g) const {
  const int64_t M = saved.x.dim(0), B = bt.B, T = bt.T, dqk = dn_ + dr_, hd = dn_ + dv_;
  Ctx redone;
  if (saved.recompute) {  // the same operations on the same inputs as forward: bit-identical tensors
    redone = saved;
    redone.q = queries(saved.x, saved.qa, bt, &redone.qan);
    keys(saved.kva, &redone.cn, &redone.kv, &redone.k);
  }
  const Ctx& c = saved.recompute ? redone : saved;
  Tensor o2 = c.o.reshape({M, H_ * dv_});
  Tensor d_o = linear_back(o2, o_proj_, dout, g);
  Tensor dq = f32({M, H_, dqk}), dk = f32({M, H_, dqk}), dkv = f32({M, H_ * hd});
  Tensor dv = dkv.reshape({B, T, H_, hd}).slice(3, dn_, hd);
  ops::attention_causal_backward(c.q.reshape({B, T, H_, dqk}), c.k.reshape({B, T, H_, dqk}),
                                 c.kv.reshape({B, T, H_, hd}).slice(3, dn_, hd), scale_, d_o.reshape({B, T, H_, dv_}),
                                 dq.reshape({B, T, H_, dqk}), dk.reshape({B, T, H_, dqk}), dv);
  // Keys: the nope part goes back to kv_b_proj's output; the rope part is shared by all heads.
  Tensor dkva = Tensor::zeros(DType::F32, {M, kvr_ + dr_});
  for (int64_t m = 0; m < M; ++m)
    for (int64_t h = 0; h < H_; ++h) {
      const float* src = dk.f32() + (m * H_ + h) * dqk;
      std::copy_n(src, dn_, dkv.f32() + m * H_ * hd + h * hd);
      float* kr = dkva.f32() + m * (kvr_ + dr_) + kvr_;
      for (int64_t i = 0; i < dr_; ++i) kr[i] += src[dn_ + i];
    }
  Tensor dk_rope = dkva.reshape({M, 1, kvr_ + dr_}).slice(2, kvr_, kvr_ + dr_);
  ops::rope_inverse(dk_rope, bt.positions, rope_);
  Tensor dq_rope = dq.slice(2, dn_, dqk);
  ops::rope_inverse(dq_rope, bt.positions, rope_);
  Tensor dcn = linear_back(c.cn, kv_b_proj_, dkv, g);
  Tensor dc = dkva.slice(1, 0, kvr_);
  ops::rmsnorm_backward(c.kva.slice(1, 0, kvr_), kv_a_layernorm_, eps_, dcn, dc,
                        g.of(prefix_ + "kv_a_layernorm.weight", {kvr_}));
  Tensor dx = linear_back(c.x, kv_a_proj_, dkva, g);
  Tensor dq2 = dq.reshape({M, H_ * dqk});
  Tensor dxq;
  if (q_proj_) {
    dxq = linear_back(c.x, *q_proj_, dq2, g);
  } else {
    Tensor dqan = linear_back(c.qan, *q_b_proj_, dq2, g);
    Tensor dqa = rmsnorm_back(c.qa, q_a_layernorm_, prefix_ + "q_a_layernorm.weight", eps_, dqan, g);
    dxq = linear_back(c.x, *q_a_proj_, dqa, g);
  }
  add_inplace(dx, dxq);
  return dx;
}

Tensor Mla::forward_absorbed(const Tensor& q, const Tensor& kva, const Batch& bt, LatentCache& cache) const {
  const int64_t M = q.dim(0), dqk = dn_ + dr_, W = kvr_ + dr_, hd = dn_ + dv_;
  if (!kv_b_f32_.defined()) kv_b_f32_ = kv_b_proj_.to_f32();
  const float* wkv = kv_b_f32_.f32();  // head h: rows [h·hd, h·hd+dn) = W_UK_h, then dv rows of W_UV_h
  // Append [kv_a_layernorm(c_kv) | roped k_rope] of the new tokens to their sequences' cache rows.
  Tensor c = rmsnormed(kva.slice(1, 0, kvr_), kv_a_layernorm_, eps_);
  {
    int64_t r = 0;
    for (const Batch::Seq& s : bt.seqs) {
      DSV3_CHECK(s.start + s.n <= cache.max_tokens(), "sequence of {} tokens exceeds the cache ({} tokens)", s.start + s.n,
                 cache.max_tokens());
      Tensor rows = cache.rows(layer_, s.slot);
      for (int64_t i = 0; i < s.n; ++i, ++r) {
        float* dst = rows.f32() + (s.start + i) * W;
        std::copy_n(c.f32() + r * kvr_, kvr_, dst);
        std::copy_n(kva.f32() + r * (kvr_ + dr_) + kvr_, dr_, dst + kvr_);
      }
    }
  }
  // Queries in latent space: [q_nope_h · W_UK_h | q_rope_h] per head.
  Tensor qc = f32({M, H_, W}), ol = f32({M, H_, kvr_}), o = f32({M, H_ * dv_});
  const bool par = M * H_ * kvr_ * (dn_ + dv_) > (1 << 19);
#pragma omp parallel for schedule(static) if (par)
  for (int64_t h = 0; h < H_; ++h) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(M), int(kvr_), int(dn_), 1.0f, q.f32() + h * dqk, int(H_ * dqk),
                wkv + h * hd * kvr_, int(kvr_), 0.0f, qc.f32() + h * W, int(H_ * W));
    for (int64_t m = 0; m < M; ++m) std::copy_n(q.f32() + (m * H_ + h) * dqk + dn_, dr_, qc.f32() + (m * H_ + h) * W + kvr_);
  }
  int64_t r = 0;
  for (const Batch::Seq& s : bt.seqs) {
    Tensor rows = cache.rows(layer_, s.slot).slice(0, 0, s.start + s.n);
    Tensor qs = qc.slice(0, r, r + s.n), os = ol.slice(0, r, r + s.n);
    ops::attention_latent(qs, rows, bt.positions.data() + r, scale_, os);
    r += s.n;
  }
  // Back out of latent space per head: o_h = o_latent_h · W_UV_hᵀ.
#pragma omp parallel for schedule(static) if (par)
  for (int64_t h = 0; h < H_; ++h)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), int(dv_), int(kvr_), 1.0f, ol.f32() + h * kvr_, int(H_ * kvr_),
                wkv + (h * hd + dn_) * kvr_, int(kvr_), 0.0f, o.f32() + h * dv_, int(H_ * dv_));
  return linear(o, o_proj_);
}

// ---- MLP ----

void Mlp::load(const WeightLoader& w, const std::string& p, int64_t hidden, int64_t inter) {
  gate_ = w.linear(p + "gate_proj.weight", inter, hidden);
  up_ = w.linear(p + "up_proj.weight", inter, hidden);
  down_ = w.linear(p + "down_proj.weight", hidden, inter);
}

Tensor Mlp::forward(const Tensor& x, Ctx* ctx) const {
  const int64_t M = x.dim(0), I = gate_.rows();
  Tensor gu = f32({M, 2 * I});
  Tensor g = gu.slice(1, 0, I), u = gu.slice(1, I, 2 * I);
  ops::linear(x, gate_, g);
  ops::linear(x, up_, u);
  Tensor a = f32({M, I});
  ops::silu_mul(gu, a);
  if (ctx) *ctx = {x, gu, a};
  return linear(a, down_);
}

void Mlp::reserve_grads(Grads& g) const {
  for (const ops::Weight* w : {&gate_, &up_, &down_}) wgrad(g, *w);
}

Tensor Mlp::backward(const Ctx& c, const Tensor& dy, Grads& g) const {
  const int64_t M = c.x.dim(0), I = gate_.rows();
  Tensor da = linear_back(c.a, down_, dy, g);
  Tensor dgu = f32({M, 2 * I});
  ops::silu_mul_backward(c.gu, da, dgu);
  Tensor dx = linear_back(c.x, gate_, dgu.slice(1, 0, I), g);
  add_inplace(dx, linear_back(c.x, up_, dgu.slice(1, I, 2 * I), g));
  return dx;
}

// ---- MoE ----

void Moe::load(const WeightLoader& w, const std::string& p, const ModelConfig& c) {
  prefix_ = p;
  hidden_ = c.hidden_size;
  moe_width_ = c.moe_intermediate_size;
  router_ = {c.n_group, c.topk_group, c.num_experts_per_tok, c.norm_topk_prob, float(c.routed_scaling_factor)};
  gate_ = w.linear(p + "gate.weight", c.n_routed_experts, c.hidden_size);
  const std::string bname = p + "gate.e_score_correction_bias";
  if (w.has(bname)) bias_ = w.tensor(bname, {c.n_routed_experts});
  experts_.resize(size_t(c.n_routed_experts));
  for (int64_t e = 0; e < c.n_routed_experts; ++e)
    experts_[size_t(e)].load(w, p + "experts." + std::to_string(e) + ".", c.hidden_size, c.moe_intermediate_size);
  if (c.n_shared_experts > 0) {
    shared_.emplace();
    shared_->load(w, p + "shared_experts.", c.hidden_size, c.n_shared_experts * c.moe_intermediate_size);
  }
}

Tensor Moe::forward(const Tensor& x, Tensor* routing, Ctx* ctx) const {
  const int64_t M = x.dim(0), K = router_.top_k, E = int64_t(experts_.size()), D = hidden_;
  // The router runs in float32 (transformers casts both x and the gate weight to f32).
  Tensor idx = Tensor::empty(DType::I32, {M, K}), wts = f32({M, K});
  Tensor logits = linear(x, gate_);
  ops::moe_route(logits, bias_, router_, idx, wts);
  if (routing) *routing = idx;

  // Group the (token, slot) pairs by expert, then run each expert on its rows; experts run in parallel.
  std::vector<std::vector<int64_t>> slots(static_cast<size_t>(E));  // slot = m·K + j
  const int32_t* ip = idx.data<int32_t>();
  for (int64_t s = 0; s < M * K; ++s) slots[size_t(ip[s])].push_back(s);
  Tensor out_slots = f32({M * K, D});
  if (ctx) {
    ctx->experts.assign(size_t(E), {});
    ctx->x = x, ctx->idx = idx, ctx->wts = wts, ctx->logits = logits, ctx->out_slots = out_slots, ctx->slots = slots;
  }
#pragma omp parallel for schedule(dynamic, 1) if (M * K * D * moe_width_ > (1 << 20))
  for (int64_t e = 0; e < E; ++e) {
    const auto& sl = slots[size_t(e)];
    if (sl.empty()) continue;
    const int64_t n = int64_t(sl.size());
    Tensor xe = f32({n, D});
    for (int64_t r = 0; r < n; ++r) std::copy_n(x.f32() + (sl[size_t(r)] / K) * D, D, xe.f32() + r * D);
    Tensor ye = experts_[size_t(e)].forward(xe, ctx ? &ctx->experts[size_t(e)] : nullptr);
    for (int64_t r = 0; r < n; ++r) std::copy_n(ye.f32() + r * D, D, out_slots.f32() + sl[size_t(r)] * D);
  }
  Tensor y = shared_ ? shared_->forward(x, ctx ? &ctx->shared : nullptr) : Tensor::zeros(DType::F32, {M, D});
  const float* wp = wts.f32();
#pragma omp parallel for schedule(static) if (M * K * D > (1 << 16))
  for (int64_t m = 0; m < M; ++m) {
    // Sum the weighted expert outputs in ascending expert order (the reference's index_add order).
    int64_t order[64];
    const int64_t k = std::min<int64_t>(K, 64);
    for (int64_t j = 0; j < k; ++j) order[j] = j;
    std::sort(order, order + k, [&](int64_t a, int64_t b) { return ip[m * K + a] < ip[m * K + b]; });
    std::vector<float> acc(size_t(D), 0.0f);
    for (int64_t jj = 0; jj < K; ++jj) {
      const int64_t j = jj < 64 ? order[jj] : jj;
      const float wj = wp[m * K + j];
      const float* o = out_slots.f32() + (m * K + j) * D;
      for (int64_t d = 0; d < D; ++d) acc[size_t(d)] += o[d] * wj;
    }
    float* yr = y.f32() + m * D;
    for (int64_t d = 0; d < D; ++d) yr[d] = acc[size_t(d)] + yr[d];
  }
  return y;
}

Tensor Moe::backward(const Ctx& c, const Tensor& dy, Grads& g) const {
  const int64_t M = c.x.dim(0), K = router_.top_k, E = int64_t(experts_.size()), D = hidden_;
  Tensor dx = shared_ ? shared_->backward(c.shared, dy, g) : Tensor::zeros(DType::F32, {M, D});
  const int32_t* ip = c.idx.data<int32_t>();
  const float* wp = c.wts.f32();
  // Through each expert: its rows' output gradient is the routing weight times dy. Experts run in parallel
  // (each writes only its own gradients and slots); their gradient tensors are created first, since
  // Grads is not safe to grow from several threads.
  Tensor dx_slots = Tensor::zeros(DType::F32, {M * K, D});
  for (int64_t e = 0; e < E; ++e)
    if (!c.slots[size_t(e)].empty()) experts_[size_t(e)].reserve_grads(g);
#pragma omp parallel for schedule(dynamic, 1) if (M * K * D * moe_width_ > (1 << 20))
  for (int64_t e = 0; e < E; ++e) {
    const auto& sl = c.slots[size_t(e)];
    if (sl.empty()) continue;
    const int64_t n = int64_t(sl.size());
    Tensor dye = f32({n, D});
    for (int64_t r = 0; r < n; ++r) {
      const int64_t s = sl[size_t(r)];
      for (int64_t d = 0; d < D; ++d) dye.f32()[r * D + d] = wp[s] * dy.f32()[(s / K) * D + d];
    }
    Tensor dxe = experts_[size_t(e)].backward(c.experts[size_t(e)], dye, g);
    for (int64_t r = 0; r < n; ++r) std::copy_n(dxe.f32() + r * D, D, dx_slots.f32() + sl[size_t(r)] * D);
  }
  // Through the routing weights w_j = scale · s_j / Σ_i s_i (or scale · s_j): ds, then dlogit = ds · s(1−s).
  Tensor dlogits = Tensor::zeros(DType::F32, {M, E});
#pragma omp parallel for schedule(static) if (M * K * D > (1 << 16))
  for (int64_t m = 0; m < M; ++m) {
    float* dxr = dx.f32() + m * D;
    for (int64_t j = 0; j < K; ++j) {
      const float* dxs = dx_slots.f32() + (m * K + j) * D;
      for (int64_t d = 0; d < D; ++d) dxr[d] += dxs[d];
    }
    std::vector<double> s(static_cast<size_t>(K)), dw(static_cast<size_t>(K));
    double sum = 0, dot = 0;
    for (int64_t j = 0; j < K; ++j) {
      s[size_t(j)] = 1.0 / (1.0 + std::exp(-double(c.logits.f32()[m * E + ip[m * K + j]])));
      const float* o = c.out_slots.f32() + (m * K + j) * D;
      double acc = 0;
      for (int64_t d = 0; d < D; ++d) acc += double(o[d]) * dy.f32()[m * D + d];
      dw[size_t(j)] = acc;
      sum += s[size_t(j)];
      dot += acc * s[size_t(j)];
    }
    const double scale = router_.routed_scaling_factor, denom = sum + 1e-20;
    for (int64_t j = 0; j < K; ++j) {
      const double ds = router_.norm_topk_prob ? scale * (dw[size_t(j)] / denom - dot / (denom * denom)) : scale * dw[size_t(j)];
      dlogits.f32()[m * E + ip[m * K + j]] = float(ds * s[size_t(j)] * (1.0 - s[size_t(j)]));
    }
  }
  if (c.dlogits_aux.defined()) add_inplace(dlogits, c.dlogits_aux);
  add_inplace(dx, linear_back(c.x, gate_, dlogits, g));
  return dx;
}

std::vector<int64_t> Moe::expert_load(const Ctx& c) {
  std::vector<int64_t> load;
  for (const auto& sl : c.slots) load.push_back(int64_t(sl.size()));
  return load;
}

double Moe::balance_loss(Ctx& c, int64_t T, float alpha) const {
  c.dlogits_aux = Tensor::empty(DType::F32, c.logits.shape());
  return ops::seq_balance_loss(c.logits, c.idx, T, alpha, &c.dlogits_aux);
}

// ---- Decoder layer ----

void DecoderLayer::load(const WeightLoader& w, const std::string& p, int64_t layer, const ModelConfig& c) {
  prefix_ = p;
  eps_ = float(c.rms_norm_eps);
  input_layernorm_ = w.tensor(p + "input_layernorm.weight", {c.hidden_size});
  post_attention_layernorm_ = w.tensor(p + "post_attention_layernorm.weight", {c.hidden_size});
  attn_.load(w, p + "self_attn.", layer, c);
  if (c.is_moe_layer(layer)) {
    moe_.emplace();
    moe_->load(w, p + "mlp.", c);
  } else {
    mlp_.emplace();
    mlp_->load(w, p + "mlp.", c.hidden_size, c.intermediate_size);
  }
}

void DecoderLayer::forward(Tensor& h, const Batch& batch, Tensor* routing, LatentCache* cache, Ctx* ctx) const {
  if (ctx) ctx->h_in = h.clone();
  Tensor n1 = rmsnormed(h, input_layernorm_, eps_);
  add_inplace(h, attn_.forward(n1, batch, cache, ctx ? &ctx->attn : nullptr));
  if (ctx) ctx->h_mid = h.clone(), ctx->n1 = n1;
  Tensor x = rmsnormed(h, post_attention_layernorm_, eps_);
  if (ctx) ctx->n2 = x;
  add_inplace(h, moe_ ? moe_->forward(x, routing, ctx ? &ctx->moe : nullptr) : mlp_->forward(x, ctx ? &ctx->mlp : nullptr));
}

Tensor DecoderLayer::backward(const Ctx& c, const Tensor& dh, const Batch& batch, Grads& g) const {
  Tensor dn2 = moe_ ? moe_->backward(c.moe, dh, g) : mlp_->backward(c.mlp, dh, g);
  Tensor dmid = rmsnorm_back(c.h_mid, post_attention_layernorm_, prefix_ + "post_attention_layernorm.weight", eps_, dn2, g);
  add_inplace(dmid, dh);
  Tensor dn1 = attn_.backward(c.attn, dmid, batch, g);
  Tensor din = rmsnorm_back(c.h_in, input_layernorm_, prefix_ + "input_layernorm.weight", eps_, dn1, g);
  add_inplace(din, dmid);
  return din;
}

// ---- MTP ----

void MtpModule::load(const WeightLoader& w, int64_t layer, const ModelConfig& c) {
  const std::string p = "model.layers." + std::to_string(layer) + ".";
  prefix_ = p;
  eps_ = float(c.rms_norm_eps);
  hidden_ = c.hidden_size;
  enorm_ = w.tensor(p + "enorm.weight", {c.hidden_size});
  hnorm_ = w.tensor(p + "hnorm.weight", {c.hidden_size});
  eh_proj_ = w.linear(p + "eh_proj.weight", c.hidden_size, 2 * c.hidden_size);
  head_norm_ = w.tensor(p + "shared_head.norm.weight", {c.hidden_size});
  // The MTP module's embedding and head are shared with the main model; checkpoints may carry copies.
  embed_tokens_ = w.has(p + "embed_tokens.weight") ? w.tensor(p + "embed_tokens.weight", {c.vocab_size, c.hidden_size})
                                                   : w.tensor("model.embed_tokens.weight", {c.vocab_size, c.hidden_size});
  head_ = w.has(p + "shared_head.head.weight") ? w.linear(p + "shared_head.head.weight", c.vocab_size, c.hidden_size)
                                               : w.linear("lm_head.weight", c.vocab_size, c.hidden_size);
  layer_.load(w, p, layer, c);
}

Tensor MtpModule::forward(const Tensor& h_prev, const Tensor& emb, const Batch& batch, Tensor* routing,
                          LatentCache* cache, Ctx* ctx) const {
  const int64_t M = h_prev.dim(0), D = hidden_;
  Tensor cat = f32({M, 2 * D});
  Tensor e_half = cat.slice(1, 0, D), h_half = cat.slice(1, D, 2 * D);
  ops::rmsnorm(emb, enorm_, eps_, e_half);
  ops::rmsnorm(h_prev, hnorm_, eps_, h_half);
  Tensor h = linear(cat, eh_proj_);
  if (ctx) ctx->h_prev = h_prev, ctx->emb = emb, ctx->cat = cat;
  layer_.forward(h, batch, routing, cache, ctx ? &ctx->layer : nullptr);
  return h;
}

Tensor MtpModule::backward(const Ctx& c, const Tensor& dh, const Batch& batch, Grads& g, Tensor* demb) const {
  const int64_t D = hidden_;
  Tensor dlin = layer_.backward(c.layer, dh, batch, g);
  Tensor dcat = linear_back(c.cat, eh_proj_, dlin, g);
  *demb = rmsnorm_back(c.emb, enorm_, prefix_ + "enorm.weight", eps_, dcat.slice(1, 0, D), g);
  return rmsnorm_back(c.h_prev, hnorm_, prefix_ + "hnorm.weight", eps_, dcat.slice(1, D, 2 * D), g);
}

Tensor MtpModule::logits(const Tensor& h) const { return linear(rmsnormed(h, head_norm_, eps_), head_); }

// ---- Parameter walks ----

void Mla::visit(const ParamVisitor& v) {
  for (auto* w : {&q_a_proj_, &q_b_proj_, &q_proj_})
    if (*w) v.weight(**w);
  if (q_a_layernorm_.defined()) v.tensor(prefix_ + "q_a_layernorm.weight", q_a_layernorm_);
  v.weight(kv_a_proj_);
  v.tensor(prefix_ + "kv_a_layernorm.weight", kv_a_layernorm_);
  v.weight(kv_b_proj_);
  v.weight(o_proj_);
  kv_b_f32_ = Tensor();  // the weights may change: rebuild the absorbed copy on next use
}

void Mlp::visit(const ParamVisitor& v) {
  v.weight(gate_);
  v.weight(up_);
  v.weight(down_);
}

void Moe::visit(const ParamVisitor& v) {
  v.weight(gate_);
  if (bias_.defined()) v.buffer(prefix_ + "gate.e_score_correction_bias", bias_);
  for (Mlp& e : experts_) e.visit(v);
  if (shared_) shared_->visit(v);
}

void DecoderLayer::visit(const ParamVisitor& v) {
  v.tensor(prefix_ + "input_layernorm.weight", input_layernorm_);
  attn_.visit(v);
  v.tensor(prefix_ + "post_attention_layernorm.weight", post_attention_layernorm_);
  if (moe_) moe_->visit(v);
  if (mlp_) mlp_->visit(v);
}

void MtpModule::visit(const ParamVisitor& v) {
  v.tensor(prefix_ + "enorm.weight", enorm_);
  v.tensor(prefix_ + "hnorm.weight", hnorm_);
  v.weight(eh_proj_);
  layer_.visit(v);
  v.tensor(prefix_ + "shared_head.norm.weight", head_norm_);
}

}  // namespace dsv3
