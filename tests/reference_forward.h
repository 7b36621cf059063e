// A plain reference forward of DeepSeek-V3 in double precision, written straight from docs/DESIGN.md
// ("The model, precisely") and transformers' DeepseekV3 conventions, independent of src/model and
// src/kernels. It only uses the checkpoint reader (io::Checkpoint), the config parser and the scalar dtype
// conversions. Everything is nested loops over std::vector<double>; it is meant for tiny models.
//
// Conventions that are easy to get wrong (all followed by transformers' DeepseekV3, which made the golden data):
//  - RoPE rotates interleaved pairs (x[2i], x[2i+1]) by pos·inv_freq[i] (transformers de-interleaves and then
//    uses rotate_half; the result is a permutation of ours, applied to q and k alike, so q·k is identical).
//  - YaRN: cos/sin are multiplied by attention_factor; the softmax scale gets mscale(factor, mscale_all_dim)²
//    on top of 1/sqrt(qk_nope+qk_rope) (only when mscale_all_dim != 0).
//    NB: transformers' _compute_yarn_parameters replaces `factor` by max_position_embeddings /
//    original_max_position_embeddings for inv_freq and attention_factor, while the attention module uses
//    rope_scaling.factor for the softmax mscale. We use rope_scaling.factor everywhere (as DESIGN.md says);
//    the two agree whenever max_position_embeddings == factor · original_max_position_embeddings, as in the
//    official config and every checkpoint the tests build.
//  - Router: experts of dropped groups get choice score 0.0 (masked_fill with 0.0, not -inf), so an expert with
//    a negative biased score in a kept group can lose to a dropped one.
//  - Weights of the chosen experts are the unbiased sigmoid scores, normalised with a +1e-20 denominator.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <numbers>
#include <numeric>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/tensor.h"
#include "io/config.h"
#include "io/safetensors.h"

namespace dsv3::ref {

using Vec = std::vector<double>;
using Seq = std::vector<Vec>;  // [T][dim]

// A weight matrix [rows (out), cols (in)], row-major, dequantized to double.
struct Mat {
  int64_t rows = 0, cols = 0;
  std::vector<double> w;
  bool empty() const { return rows == 0; }
  double at(int64_t r, int64_t c) const { return w[size_t(r * cols + c)]; }
};

// Per-router diagnostics of one token, for telling a near-tie from a bug.
struct RouterTrace {
  Vec choice;       // masked choice scores used for the final top-k (dropped groups = 0.0)
  Vec group_score;  // per group: sum of the top-2 biased scores
};

struct RefOutput {
  int64_t B = 0, T = 0, V = 0, H = 0;
  Vec logits;        // [B][T][V] flattened
  Vec final_hidden;  // [B][T][H] after the final RMSNorm
  // layer -> [B*T][top_k] sorted ascending; the MTP layer (index num_hidden_layers) has [B*(T-1)][top_k].
  std::map<int64_t, std::vector<std::vector<int64_t>>> routing;
  std::map<int64_t, std::vector<RouterTrace>> router_trace;  // same rows as routing
  bool has_mtp = false;
  Vec mtp_logits;  // [B][T-1][V] when has_mtp
};

// ---------------------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------------------

inline std::vector<double> to_double(const Tensor& t0) {
  Tensor t = t0.contiguous();
  std::vector<double> out(static_cast<size_t>(t.numel()));
  if (t.dtype() == DType::F64) {
    std::memcpy(out.data(), t.raw(), out.size() * sizeof(double));
    return out;
  }
  DSV3_CHECK(dtype_is_float(t.dtype()), "reference: tensor of dtype {} is not a float", dtype_name(t.dtype()));
  std::vector<float> f(out.size());
  convert_to_f32(t.dtype(), t.raw(), f.data(), f.size());  // exact for bf16/f16/fp8/f32
  for (size_t i = 0; i < f.size(); ++i) out[i] = double(f[i]);
  return out;
}

class Weights {
 public:
  Weights(const io::Checkpoint& ck, const ModelConfig& cfg) : ck_(ck), cfg_(cfg) {}
  bool has(const std::string& name) const { return ck_.contains(name); }

  Vec vec(const std::string& name) const { return to_double(ck_.get(name)); }

  // A 2-D weight; fp8 weights are multiplied by `<name>_scale_inv`, one value per block_n x block_k block
  // (edge blocks may be partial).
  Mat mat(const std::string& name) const {
    Tensor t = ck_.get(name);
    DSV3_CHECK(t.ndim() == 2, "reference: {} is not 2-D", name);
    Mat m;
    m.rows = t.dim(0);
    m.cols = t.dim(1);
    m.w = to_double(t);
    const std::string sname = name + "_scale_inv";
    if (t.dtype() == DType::F8_E4M3 || t.dtype() == DType::F8_E5M2) {
      DSV3_CHECK(ck_.contains(sname), "reference: fp8 weight {} without {}", name, sname);
      const Tensor st = ck_.get(sname);
      const std::vector<double> s = to_double(st);
      const int64_t bn = cfg_.quant.block_n, bk = cfg_.quant.block_k;
      const int64_t sr = (m.rows + bn - 1) / bn, sc = (m.cols + bk - 1) / bk;
      DSV3_CHECK(st.ndim() == 2 && st.dim(0) == sr && st.dim(1) == sc, "reference: {} has shape {}, want [{}, {}]", sname,
                 shape_str(st.shape()), sr, sc);
      for (int64_t r = 0; r < m.rows; ++r)
        for (int64_t c = 0; c < m.cols; ++c) m.w[size_t(r * m.cols + c)] *= s[size_t((r / bn) * sc + c / bk)];
    }
    return m;
  }

 private:
  const io::Checkpoint& ck_;
  const ModelConfig& cfg_;
};

// ---------------------------------------------------------------------------------------------------------
// Math
// ---------------------------------------------------------------------------------------------------------

inline Vec linear(const Mat& m, const Vec& x) {
  DSV3_CHECK(int64_t(x.size()) == m.cols, "reference: linear with {} inputs, weight has {} columns", x.size(), m.cols);
  Vec y(size_t(m.rows), 0.0);
  for (int64_t r = 0; r < m.rows; ++r) {
    double acc = 0;
    for (int64_t c = 0; c < m.cols; ++c) acc += m.at(r, c) * x[size_t(c)];
    y[size_t(r)] = acc;
  }
  return y;
}

inline Vec rms_norm(const Vec& x, const Vec& w, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double inv = 1.0 / std::sqrt(ss / double(x.size()) + eps);
  Vec y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = w[i] * (x[i] * inv);
  return y;
}

inline double silu(double x) { return x / (1.0 + std::exp(-x)); }
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// mscale(f, m) = 0.1·m·ln(f) + 1 for f > 1, else 1.
inline double yarn_mscale(double factor, double m) { return factor <= 1.0 ? 1.0 : 0.1 * m * std::log(factor) + 1.0; }

struct Rope {
  Vec inv_freq;                  // [d/2]
  double attention_factor = 1.0;  // multiplies cos and sin
};

inline Rope make_rope(const ModelConfig& cfg) {
  const int64_t d = cfg.qk_rope_head_dim;
  const double theta = cfg.rope_theta;
  Rope r;
  r.inv_freq.resize(size_t(d / 2));
  for (int64_t i = 0; i < d / 2; ++i) r.inv_freq[size_t(i)] = 1.0 / std::pow(theta, double(2 * i) / double(d));
  if (!cfg.rope_scaling) return r;
  const RopeScaling& y = *cfg.rope_scaling;
  const double factor = y.factor;
  const double orig = double(y.original_max_position_embeddings);
  auto corr_dim = [&](double rot) { return double(d) * std::log(orig / (rot * 2.0 * std::numbers::pi)) / (2.0 * std::log(theta)); };
  double low = std::floor(corr_dim(y.beta_fast));
  double high = std::ceil(corr_dim(y.beta_slow));
  low = std::max(low, 0.0);
  high = std::min(high, double(d - 1));
  if (low == high) high += 0.001;  // transformers' guard against a zero-width ramp
  for (int64_t i = 0; i < d / 2; ++i) {
    const double pos_freq = std::pow(theta, double(2 * i) / double(d));
    const double extrap = 1.0 / pos_freq, interp = 1.0 / (factor * pos_freq);
    const double ramp = std::clamp((double(i) - low) / (high - low), 0.0, 1.0);
    r.inv_freq[size_t(i)] = interp * ramp + extrap * (1.0 - ramp);
  }
  if (y.mscale != 0.0 && y.mscale_all_dim != 0.0)
    r.attention_factor = yarn_mscale(factor, y.mscale) / yarn_mscale(factor, y.mscale_all_dim);
  else
    r.attention_factor = yarn_mscale(factor, 1.0);
  return r;
}

inline double softmax_scale(const ModelConfig& cfg) {
  double s = 1.0 / std::sqrt(double(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim));
  if (cfg.rope_scaling && cfg.rope_scaling->mscale_all_dim != 0.0) {
    const double m = yarn_mscale(cfg.rope_scaling->factor, cfg.rope_scaling->mscale_all_dim);
    s *= m * m;
  }
  return s;
}

// Rotates x[off .. off+d) in interleaved pairs at position pos.
inline void apply_rope(Vec& x, size_t off, const Rope& rope, int64_t pos) {
  for (size_t i = 0; i < rope.inv_freq.size(); ++i) {
    const double a = double(pos) * rope.inv_freq[i];
    const double c = std::cos(a) * rope.attention_factor, s = std::sin(a) * rope.attention_factor;
    const double x0 = x[off + 2 * i], x1 = x[off + 2 * i + 1];
    x[off + 2 * i] = x0 * c - x1 * s;
    x[off + 2 * i + 1] = x1 * c + x0 * s;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Modules
// ---------------------------------------------------------------------------------------------------------

struct Mlp {  // SwiGLU: down(silu(gate(x)) * up(x))
  Mat gate, up, down;
  Vec operator()(const Vec& x) const {
    const Vec g = linear(gate, x), u = linear(up, x);
    Vec h(g.size());
    for (size_t i = 0; i < g.size(); ++i) h[i] = silu(g[i]) * u[i];
    return linear(down, h);
  }
};

inline Mlp load_mlp(const Weights& W, const std::string& p) {
  return Mlp{W.mat(p + "gate_proj.weight"), W.mat(p + "up_proj.weight"), W.mat(p + "down_proj.weight")};
}

struct Attention {
  Mat q_a, q_b, q_proj, kv_a, kv_b, o;
  Vec q_a_ln, kv_a_ln;
};

struct Moe {
  Mat gate;
  Vec bias;
  std::vector<Mlp> experts;
  bool has_shared = false;
  Mlp shared;
};

struct Layer {
  Vec input_ln, post_ln;
  Attention attn;
  bool moe = false;
  Mlp dense;
  Moe mo;
};

inline Layer load_layer(const Weights& W, const ModelConfig& cfg, int64_t li) {
  const std::string p = "model.layers." + std::to_string(li) + ".";
  Layer L;
  L.input_ln = W.vec(p + "input_layernorm.weight");
  L.post_ln = W.vec(p + "post_attention_layernorm.weight");
  const std::string a = p + "self_attn.";
  if (cfg.q_lora_rank > 0) {
    L.attn.q_a = W.mat(a + "q_a_proj.weight");
    L.attn.q_a_ln = W.vec(a + "q_a_layernorm.weight");
    L.attn.q_b = W.mat(a + "q_b_proj.weight");
  } else {
    L.attn.q_proj = W.mat(a + "q_proj.weight");
  }
  L.attn.kv_a = W.mat(a + "kv_a_proj_with_mqa.weight");
  L.attn.kv_a_ln = W.vec(a + "kv_a_layernorm.weight");
  L.attn.kv_b = W.mat(a + "kv_b_proj.weight");
  L.attn.o = W.mat(a + "o_proj.weight");
  L.moe = li >= cfg.first_k_dense_replace;
  if (!L.moe) {
    L.dense = load_mlp(W, p + "mlp.");
  } else {
    L.mo.gate = W.mat(p + "mlp.gate.weight");
    L.mo.bias = W.vec(p + "mlp.gate.e_score_correction_bias");
    for (int64_t e = 0; e < cfg.n_routed_experts; ++e)
      L.mo.experts.push_back(load_mlp(W, p + "mlp.experts." + std::to_string(e) + "."));
    L.mo.has_shared = cfg.n_shared_experts > 0;
    if (L.mo.has_shared) {
      L.mo.shared = load_mlp(W, p + "mlp.shared_experts.");
      DSV3_CHECK(L.mo.shared.gate.rows == cfg.n_shared_experts * cfg.moe_intermediate_size,
                 "reference: shared expert width {} != n_shared_experts·moe_intermediate_size", L.mo.shared.gate.rows);
    }
  }
  return L;
}

// Causal MLA over one sequence x [T][H] with positions 0..T-1.
inline Seq attention(const Attention& A, const ModelConfig& cfg, const Rope& rope, const Seq& x) {
  const int64_t T = int64_t(x.size());
  const int64_t nh = cfg.num_attention_heads, dn = cfg.qk_nope_head_dim, dr = cfg.qk_rope_head_dim, dv = cfg.v_head_dim;
  const int64_t r = cfg.kv_lora_rank, dq = dn + dr;
  const double eps = cfg.rms_norm_eps;
  Seq q(static_cast<size_t>(T)), kv(static_cast<size_t>(T)), krope(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    const Vec& xt = x[size_t(t)];
    q[size_t(t)] = cfg.q_lora_rank > 0 ? linear(A.q_b, rms_norm(linear(A.q_a, xt), A.q_a_ln, eps)) : linear(A.q_proj, xt);
    DSV3_CHECK(int64_t(q[size_t(t)].size()) == nh * dq, "reference: q has {} values", q[size_t(t)].size());
    for (int64_t h = 0; h < nh; ++h) apply_rope(q[size_t(t)], size_t(h * dq + dn), rope, t);
    const Vec ckv = linear(A.kv_a, xt);  // [c_kv (r) | k_rope (dr)]
    DSV3_CHECK(int64_t(ckv.size()) == r + dr, "reference: kv_a output has {} values", ckv.size());
    const Vec c(ckv.begin(), ckv.begin() + r);
    krope[size_t(t)] = Vec(ckv.begin() + r, ckv.end());
    apply_rope(krope[size_t(t)], 0, rope, t);
    kv[size_t(t)] = linear(A.kv_b, rms_norm(c, A.kv_a_ln, eps));  // per head [k_nope (dn) | v (dv)]
    DSV3_CHECK(int64_t(kv[size_t(t)].size()) == nh * (dn + dv), "reference: kv_b output has {} values", kv[size_t(t)].size());
  }
  const double scale = softmax_scale(cfg);
  Seq out(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    Vec o(size_t(nh * dv), 0.0);
    for (int64_t h = 0; h < nh; ++h) {
      const Vec& qt = q[size_t(t)];
      Vec sc(static_cast<size_t>(t + 1));
      double mx = -INFINITY;
      for (int64_t s = 0; s <= t; ++s) {
        const Vec& ks = kv[size_t(s)];
        double d = 0;
        for (int64_t i = 0; i < dn; ++i) d += qt[size_t(h * dq + i)] * ks[size_t(h * (dn + dv) + i)];
        for (int64_t i = 0; i < dr; ++i) d += qt[size_t(h * dq + dn + i)] * krope[size_t(s)][size_t(i)];
        sc[size_t(s)] = d * scale;
        mx = std::max(mx, sc[size_t(s)]);
      }
      double sum = 0;
      for (auto& v : sc) sum += (v = std::exp(v - mx));
      for (int64_t s = 0; s <= t; ++s) {
        const double p = sc[size_t(s)] / sum;
        for (int64_t i = 0; i < dv; ++i) o[size_t(h * dv + i)] += p * kv[size_t(s)][size_t(h * (dn + dv) + dn + i)];
      }
    }
    out[size_t(t)] = linear(A.o, o);
  }
  return out;
}

// Indices of the k largest values (ties broken by lower index), in descending order of value.
inline std::vector<int64_t> top_k(const Vec& v, int64_t k) {
  std::vector<int64_t> idx(v.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return v[size_t(a)] > v[size_t(b)]; });
  idx.resize(size_t(k));
  return idx;
}

// The DeepSeek-V3 MoE on one token; appends the chosen experts (sorted) and the router trace.
inline Vec moe(const Moe& M, const ModelConfig& cfg, const Vec& x, std::vector<int64_t>* chosen, RouterTrace* trace) {
  const int64_t E = cfg.n_routed_experts, G = cfg.n_group, per = E / G;
  const Vec logit = linear(M.gate, x);
  Vec s(static_cast<size_t>(E)), c(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e) {
    s[size_t(e)] = sigmoid(logit[size_t(e)]);
    c[size_t(e)] = s[size_t(e)] + M.bias[size_t(e)];
  }
  Vec gs(static_cast<size_t>(G));
  for (int64_t g = 0; g < G; ++g) {
    Vec in(c.begin() + g * per, c.begin() + (g + 1) * per);
    std::sort(in.begin(), in.end(), std::greater<>());
    gs[size_t(g)] = in[0] + (per > 1 ? in[1] : 0.0);
  }
  const std::vector<int64_t> keep = top_k(gs, cfg.topk_group);
  Vec masked(size_t(E), 0.0);  // dropped groups: 0.0, as transformers' masked_fill
  for (int64_t g : keep)
    for (int64_t e = g * per; e < (g + 1) * per; ++e) masked[size_t(e)] = c[size_t(e)];
  std::vector<int64_t> pick = top_k(masked, cfg.num_experts_per_tok);
  Vec w(pick.size());
  double sum = 0;
  for (size_t j = 0; j < pick.size(); ++j) sum += (w[j] = s[size_t(pick[j])]);
  for (auto& v : w) {
    if (cfg.norm_topk_prob) v /= (sum + 1e-20);
    v *= cfg.routed_scaling_factor;
  }
  Vec y = M.has_shared ? M.shared(x) : Vec(x.size(), 0.0);
  for (size_t j = 0; j < pick.size(); ++j) {
    const Vec ye = M.experts[size_t(pick[j])](x);
    for (size_t i = 0; i < y.size(); ++i) y[i] += w[j] * ye[i];
  }
  std::sort(pick.begin(), pick.end());
  if (chosen) *chosen = pick;
  if (trace) *trace = RouterTrace{masked, gs};
  return y;
}

// One decoder layer over one sequence; routing rows are written at route[row0 + t].
inline Seq decoder_layer(const Layer& L, const ModelConfig& cfg, const Rope& rope, const Seq& x,
                         std::vector<std::vector<int64_t>>* route, std::vector<RouterTrace>* trace, size_t row0) {
  const double eps = cfg.rms_norm_eps;
  Seq xn(x.size());
  for (size_t t = 0; t < x.size(); ++t) xn[t] = rms_norm(x[t], L.input_ln, eps);
  const Seq a = attention(L.attn, cfg, rope, xn);
  Seq h(x.size());
  for (size_t t = 0; t < x.size(); ++t) {
    h[t] = x[t];
    for (size_t i = 0; i < h[t].size(); ++i) h[t][i] += a[t][i];
  }
  Seq out(x.size());
  for (size_t t = 0; t < x.size(); ++t) {
    const Vec hn = rms_norm(h[t], L.post_ln, eps);
    const Vec f = L.moe ? moe(L.mo, cfg, hn, &(*route)[row0 + t], &(*trace)[row0 + t]) : L.dense(hn);
    out[t] = h[t];
    for (size_t i = 0; i < f.size(); ++i) out[t][i] += f[i];
  }
  return out;
}

inline Vec embed_row(const Mat& E, int64_t id) {
  DSV3_CHECK(id >= 0 && id < E.rows, "reference: token id {} out of range", id);
  return Vec(E.w.begin() + id * E.cols, E.w.begin() + (id + 1) * E.cols);
}

// ---------------------------------------------------------------------------------------------------------
// The whole model
// ---------------------------------------------------------------------------------------------------------

inline RefOutput reference_forward(const std::string& model_dir, const std::vector<std::vector<int64_t>>& ids) {
  const ModelConfig cfg = ModelConfig::load(model_dir + "/config.json");
  const io::Checkpoint ck = io::Checkpoint::open(model_dir);
  const Weights W(ck, cfg);
  const double eps = cfg.rms_norm_eps;
  const Rope rope = make_rope(cfg);

  const Mat embed = W.mat("model.embed_tokens.weight");
  const Vec final_norm = W.vec("model.norm.weight");
  const Mat head = W.mat("lm_head.weight");
  std::vector<Layer> layers;
  for (int64_t li = 0; li < cfg.num_hidden_layers; ++li) layers.push_back(load_layer(W, cfg, li));

  RefOutput R;
  R.B = int64_t(ids.size());
  R.T = R.B ? int64_t(ids[0].size()) : 0;
  R.V = head.rows;
  R.H = cfg.hidden_size;
  const int64_t B = R.B, T = R.T, H = R.H, V = R.V;
  for (auto& s : ids) DSV3_CHECK(int64_t(s.size()) == T, "reference: ragged batch");
  R.logits.assign(size_t(B * T * V), 0.0);
  R.final_hidden.assign(size_t(B * T * H), 0.0);
  for (int64_t li = 0; li < cfg.num_hidden_layers; ++li)
    if (layers[size_t(li)].moe) {
      R.routing[li].resize(size_t(B * T));
      R.router_trace[li].resize(size_t(B * T));
    }

  // MTP depth 1: layer `num_hidden_layers`.
  R.has_mtp = cfg.num_nextn_predict_layers > 0 && T >= 2;
  const int64_t ml = cfg.num_hidden_layers;
  const std::string mp = "model.layers." + std::to_string(ml) + ".";
  Layer mtp_layer;
  Mat mtp_embed, mtp_eh, mtp_head;
  Vec mtp_enorm, mtp_hnorm, mtp_norm;
  if (R.has_mtp) {
    mtp_layer = load_layer(W, cfg, ml);
    mtp_embed = W.has(mp + "embed_tokens.weight") ? W.mat(mp + "embed_tokens.weight") : embed;
    mtp_eh = W.mat(mp + "eh_proj.weight");
    mtp_enorm = W.vec(mp + "enorm.weight");
    mtp_hnorm = W.vec(mp + "hnorm.weight");
    mtp_norm = W.vec(mp + "shared_head.norm.weight");
    mtp_head = W.has(mp + "shared_head.head.weight") ? W.mat(mp + "shared_head.head.weight") : head;
    R.mtp_logits.assign(size_t(B * (T - 1) * V), 0.0);
    if (mtp_layer.moe) {
      R.routing[ml].resize(size_t(B * (T - 1)));
      R.router_trace[ml].resize(size_t(B * (T - 1)));
    }
  }

  for (int64_t b = 0; b < B; ++b) {
    Seq x(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) x[size_t(t)] = embed_row(embed, ids[size_t(b)][size_t(t)]);
    for (int64_t li = 0; li < cfg.num_hidden_layers; ++li) {
      const bool moe_layer = layers[size_t(li)].moe;
      x = decoder_layer(layers[size_t(li)], cfg, rope, x, moe_layer ? &R.routing[li] : nullptr,
                        moe_layer ? &R.router_trace[li] : nullptr, size_t(b * T));
    }
    Seq fh(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) {
      fh[size_t(t)] = rms_norm(x[size_t(t)], final_norm, eps);
      std::copy(fh[size_t(t)].begin(), fh[size_t(t)].end(), R.final_hidden.begin() + (b * T + t) * H);
      const Vec lg = linear(head, fh[size_t(t)]);
      std::copy(lg.begin(), lg.end(), R.logits.begin() + (b * T + t) * V);
    }
    if (!R.has_mtp) continue;
    Seq m(static_cast<size_t>(T - 1));
    for (int64_t i = 0; i + 1 < T; ++i) {
      Vec cat = rms_norm(embed_row(mtp_embed, ids[size_t(b)][size_t(i + 1)]), mtp_enorm, eps);
      const Vec hn = rms_norm(fh[size_t(i)], mtp_hnorm, eps);
      cat.insert(cat.end(), hn.begin(), hn.end());
      m[size_t(i)] = linear(mtp_eh, cat);
    }
    m = decoder_layer(mtp_layer, cfg, rope, m, mtp_layer.moe ? &R.routing[ml] : nullptr,
                      mtp_layer.moe ? &R.router_trace[ml] : nullptr, size_t(b * (T - 1)));
    for (int64_t i = 0; i + 1 < T; ++i) {
      const Vec lg = linear(mtp_head, rms_norm(m[size_t(i)], mtp_norm, eps));
      std::copy(lg.begin(), lg.end(), R.mtp_logits.begin() + (b * (T - 1) + i) * V);
    }
  }
  return R;
}

// ---------------------------------------------------------------------------------------------------------
// Comparison helpers
// ---------------------------------------------------------------------------------------------------------

// ‖a − ref‖ / ‖ref‖ with `a` any float tensor of ref.size() elements.
inline double rel_l2(const Tensor& a, const Vec& ref) {
  DSV3_CHECK(size_t(a.numel()) == ref.size(), "rel_l2: {} vs {} elements", a.numel(), ref.size());
  const std::vector<double> x = to_double(a);
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (x[i] - ref[i]) * (x[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1.0));
}

inline std::vector<std::vector<int64_t>> routing_rows(const Tensor& t0) {
  Tensor t = t0.contiguous();
  DSV3_CHECK(t.ndim() == 2 && t.dtype() == DType::I64, "routing: want [rows, k] int64, got {} {}", dtype_name(t.dtype()),
             shape_str(t.shape()));
  std::vector<std::vector<int64_t>> rows(size_t(t.dim(0)));
  const int64_t* p = t.data<const int64_t>();
  for (int64_t r = 0; r < t.dim(0); ++r) rows[size_t(r)].assign(p + r * t.dim(1), p + (r + 1) * t.dim(1));
  return rows;
}

// The gap between the k-th and (k+1)-th masked choice score, and between the kept and dropped groups.
inline std::string router_margin(const RouterTrace& tr, int64_t k, int64_t topk_group) {
  Vec c = tr.choice, g = tr.group_score;
  std::sort(c.begin(), c.end(), std::greater<>());
  std::sort(g.begin(), g.end(), std::greater<>());
  std::string s = "expert margin ";
  s += size_t(k) < c.size() ? std::to_string(c[size_t(k - 1)] - c[size_t(k)]) : "n/a";
  s += ", group margin ";
  s += size_t(topk_group) < g.size() ? std::to_string(g[size_t(topk_group - 1)] - g[size_t(topk_group)]) : "n/a";
  return s;
}

}  // namespace dsv3::ref
