// Finite-difference checks of Transformer::loss_and_grads on micro models, including configs the golden
// gradients (tests/test_golden_grad.cpp, tiny only) do not cover. Every trainable tensor — embeddings, lm_head,
// q_a_proj / q_a_layernorm / q_b_proj or q_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj, the norms,
// dense MLPs, routed and shared experts, the MoE routers (mlp.gate.weight), the MTP modules' eh_proj / enorm /
// hnorm / shared_head.norm and decoder layers — is checked along three directions d over the whole tensor:
//   fd = (L(θ + ε·d) − L(θ − ε·d)) / 2ε   against   an = <∇L, d>
// (1) two random Gaussian d, unit variance per element: every coordinate takes part, so an error anywhere in the
//     tensor's gradient shows; ε = 1.5e-3 × RMS(θ).
// (2) d = the analytic gradient rescaled to unit RMS: <∇L, d> is as large as it gets, so this is the precise
//     check of the gradient's scale and sign; ε = 3e-4 × RMS(θ) (the loss curves most along this direction).
// L = loss + λ·mtp_loss (λ = 0.3; + the balance loss in its own test), exactly what the gradient is of.
//
// Routing: the loss is only piecewise smooth — it jumps where a token's top-k experts (or kept groups) change.
// A micro model is used only if perturbing all its parameters at once by 1e-3 × RMS leaves every expert's load
// unchanged (else the next draw is taken, deterministically); every evaluation still compares the loads of every
// MoE layer (MTP layers included) with the unperturbed ones, halves ε on a change (up to 4 times) and otherwise
// skips and counts the direction; skips must stay under 10%.
//
// Tolerance, per direction: |fd − an| <= 1e-2·max(|fd|, |an|) + 2e-7·|L|/ε.
// - Rounding: the model computes in float32; L(θ ± ε·d) carry noise up to ~5e-8·|L| (about one float32 ulp;
//   measured), i.e. up to 5e-8·|L|/ε in fd. The second term allows 4× that.
// - Truncation (∝ ε²): measured below 0.5% of |an| at these ε (it falls 4× per halving of ε, as it should).
// A wrong gradient is caught: GradFd.DetectsWrongGradients checks that the gradient without its MTP term and
// the gradient scaled by 1.05 both fail.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "temp_dir.h"
#include "io/config.h"
#include "model/init.h"
#include "model/transformer.h"
#include "testutil.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

struct TempDir : test::TempDir {
  explicit TempDir(const std::string& tag) : test::TempDir("dsv3_grad_fd_" + tag, false) {}
};

// Variant (a): q LoRA, 2 MTP modules, group-limited routing (2 groups, 1 kept), one dense layer then MoE.
ModelConfig micro_a() {
  ModelConfig c;
  c.vocab_size = 61;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.moe_intermediate_size = 16;
  c.num_hidden_layers = 2;
  c.first_k_dense_replace = 1;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 2;
  c.n_shared_experts = 1;
  c.n_routed_experts = 8;
  c.num_experts_per_tok = 2;
  c.n_group = 2;
  c.topk_group = 1;
  c.routed_scaling_factor = 2.5;
  c.norm_topk_prob = true;
  c.q_lora_rank = 24;
  c.kv_lora_rank = 16;
  c.qk_nope_head_dim = 8;
  c.qk_rope_head_dim = 4;
  c.v_head_dim = 8;
  c.max_position_embeddings = 64;
  c.rope_scaling = RopeScaling{4.0, 16, 32.0, 1.0, 1.0, 1.0};  // YaRN, positions past the original 16 used
  c.num_nextn_predict_layers = 2;
  c.initializer_range = 0.2;  // activations of order 1, routing far from uniform
  return c;
}

// Variant (b): plain q_proj, no MTP, every layer MoE, unnormalised top-k weights, one expert group.
ModelConfig micro_b() {
  ModelConfig c = micro_a();
  c.q_lora_rank = 0;
  c.num_nextn_predict_layers = 0;
  c.first_k_dense_replace = 0;
  c.norm_topk_prob = false;
  c.n_group = 1;
  c.topk_group = 1;
  c.n_shared_experts = 2;
  c.rope_scaling.reset();
  return c;
}

double rms(const Tensor& t) {
  double s = 0;
  for (int64_t i = 0; i < t.numel(); ++i) s += double(t.f32()[i]) * double(t.f32()[i]);
  return std::sqrt(s / double(t.numel()));
}

// A random micro model (float32 master weights) and a batch of 2 x 20 random tokens.
//
// The draw is kept only if its routing is robust: perturbing every parameter at once by ±kRobustRel × its RMS
// (Gaussian, per element) — far more than any single check perturbs — leaves every expert's load unchanged in
// every MoE layer. Otherwise the next draw is taken (deterministically). A model with a token within a hair of a
// routing tie would make the piecewise smooth loss jump under any perturbation of the layers before it.
constexpr double kRobustRel = 1e-3;

struct Micro {
  TempDir dir;
  std::unique_ptr<Transformer> model;
  std::map<std::string, Tensor> params;  // float32 master weights, by official name (shared storage)
  Tensor ids;
  Transformer::LossOptions opts;
  int draws = 0;

  struct Eval {
    double loss = 0;  // the objective the gradient is of
    double balance = 0;
    std::map<int64_t, std::vector<int64_t>> load;
  };
  Eval eval(Grads* g = nullptr) const {
    Grads scratch;
    const auto l = model->loss_and_grads(ids, opts, g ? *g : scratch);
    return {l.loss + double(opts.mtp_lambda) * l.mtp_loss + l.balance_loss, l.balance_loss, l.expert_load};
  }

  Micro(const std::string& tag, const ModelConfig& cfg, uint64_t seed, float balance_alpha = 0.0f) : dir(tag) {
    opts.mtp_lambda = 0.3f;
    opts.balance_alpha = balance_alpha;
    for (draws = 1; draws <= 20; ++draws) {
      draw(cfg, seed + 1000 * uint64_t(draws - 1));
      if (robust_routing(seed + 1000 * uint64_t(draws - 1))) return;
    }
    ADD_FAILURE() << tag << ": no draw in 20 with routing robust to perturbations of " << kRobustRel;
  }

 private:
  void draw(const ModelConfig& cfg, uint64_t seed) {
    InitOptions io;
    io.seed = seed;
    io.bias_scale = 0.05f;  // e_score_correction_bias takes part in the choice (not in the weights)
    write_random_checkpoint(cfg, dir.path.string(), io);
    model = Transformer::load(dir.path.string());
    model->make_trainable();
    params.clear();
    model->visit({[&](ops::Weight& w) { params[w.name] = w.w; }, [&](const std::string& n, Tensor& t) { params[n] = t; },
                  [](const std::string&, Tensor&) {}});
    for (const auto& [n, t] : params) {
      EXPECT_EQ(t.dtype(), DType::F32) << n;
      EXPECT_TRUE(t.is_contiguous()) << n;
    }
    const int64_t B = 2, T = 20;  // T past original_max_position_embeddings = 16 of micro_a's YaRN
    std::vector<int64_t> v(static_cast<size_t>(B * T));
    std::mt19937_64 rng(seed + 99);
    for (auto& x : v) x = int64_t(rng() % uint64_t(cfg.vocab_size));
    ids = Tensor::from_vector(v, {B, T});
  }

  bool robust_routing(uint64_t seed) {
    const auto base = eval().load;
    std::map<std::string, std::vector<float>> saved;
    for (auto& [n, p] : params) saved[n].assign(p.f32(), p.f32() + p.numel());
    std::mt19937_64 rng(seed * 7 + 1);
    std::normal_distribution<double> normal;
    bool robust = true;
    for (double sign : {1.0, -1.0}) {
      for (auto& [n, p] : params) {
        const double e = kRobustRel * rms(p);
        for (int64_t i = 0; i < p.numel(); ++i) p.f32()[i] = float(saved[n][size_t(i)] + sign * e * normal(rng));
      }
      robust = robust && eval().load == base;
      for (auto& [n, p] : params) std::copy(saved[n].begin(), saved[n].end(), p.f32());
    }
    return robust;
  }
};

double dot(const Tensor& a, const std::vector<double>& d) {
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += double(a.f32()[i]) * d[size_t(i)];
  return s;
}

// One directional check. `objective` picks the value of an Eval the gradient belongs to.
struct Outcome {
  bool done = false;  // false: the routing changed at every ε tried
  double fd = 0, an = 0, eps = 0, bound = 0;
  bool ok() const { return done && std::fabs(fd - an) <= bound; }
};

constexpr double kRtol = 1e-2, kNoise = 2e-7, kEpsRandom = 1.5e-3, kEpsGradient = 3e-4;

template <class Objective>
Outcome directional(Micro& m, const std::string& name, const Tensor& an_grad, const std::vector<double>& d,
                    const Micro::Eval& base, Objective objective, double eps_rel) {
  Tensor& p = m.params.at(name);
  const int64_t n = p.numel();
  const std::vector<float> saved(p.f32(), p.f32() + n);
  Outcome o;
  o.an = dot(an_grad, d);
  o.eps = eps_rel * std::max(rms(p), 1e-2);
  for (int attempt = 0; attempt < 5; ++attempt, o.eps /= 2) {
    auto at = [&](double sign) {
      for (int64_t i = 0; i < n; ++i) p.f32()[i] = float(double(saved[size_t(i)]) + sign * o.eps * d[size_t(i)]);
      Micro::Eval e = m.eval();
      std::copy(saved.begin(), saved.end(), p.f32());  // restored bit for bit
      return e;
    };
    const Micro::Eval plus = at(+1), minus = at(-1);
    if (plus.load != base.load || minus.load != base.load) continue;  // a routing change: the loss jumps
    o.done = true;
    o.fd = (objective(plus) - objective(minus)) / (2 * o.eps);
    o.bound = kRtol * std::max(std::fabs(o.fd), std::fabs(o.an)) + kNoise * std::fabs(objective(base)) / o.eps;
    return o;
  }
  return o;
}

std::vector<double> random_direction(int64_t n, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  std::vector<double> d(static_cast<size_t>(n));
  for (auto& x : d) x = normal(rng);
  return d;
}

// The gradient rescaled to unit RMS; empty when it is zero.
std::vector<double> gradient_direction(const Tensor& g) {
  double norm = 0;
  for (int64_t i = 0; i < g.numel(); ++i) norm += double(g.f32()[i]) * double(g.f32()[i]);
  if (norm == 0) return {};
  const double k = std::sqrt(double(g.numel()) / norm);
  std::vector<double> d(static_cast<size_t>(g.numel()));
  for (int64_t i = 0; i < g.numel(); ++i) d[size_t(i)] = double(g.f32()[i]) * k;
  return d;
}

struct Report {
  int checked = 0, skipped = 0, failed = 0;
  std::set<std::string> passed;  // tensors checked along at least one direction (every check must pass)
  double worst = 0;              // largest |fd − an| / bound (< 1 passes)
  std::string worst_name;

  void add(const std::string& name, const char* kind, const Outcome& o) {
    if (std::getenv("DSV3_FD_VERBOSE"))
      std::printf("    %-52s %-8s eps %.2e fd %+.6e an %+.6e |fd-an|/bound %.3f |fd-an|*eps %.2e\n", name.c_str(), kind,
                  o.eps, o.fd, o.an, o.done ? std::fabs(o.fd - o.an) / o.bound : -1.0, std::fabs(o.fd - o.an) * o.eps);
    if (!o.done) {
      ++skipped;
      std::printf("  skipped %s along the %s direction: routing changes down to eps %.2g\n", name.c_str(), kind, o.eps);
      return;
    }
    ++checked;
    const double r = std::fabs(o.fd - o.an) / o.bound;
    if (r > worst) worst = r, worst_name = name + " (" + kind + ")";
    if (o.ok()) {
      passed.insert(name);
      return;
    }
    ++failed;
    ADD_FAILURE() << name << " along the " << kind << " direction: finite difference " << o.fd << ", analytic " << o.an
                  << " (eps " << o.eps << ", |fd - an| " << std::fabs(o.fd - o.an) << " > bound " << o.bound << ")";
  }
};

// Checks every tensor of `grads` that `want` selects along two random directions and the gradient direction.
template <class Objective, class Want>
Report check_all(Micro& m, const Grads& grads, const Micro::Eval& base, Objective objective, Want want, uint64_t seed) {
  Report rep;
  std::mt19937_64 rng(seed);
  for (const auto& [name, g] : grads.all()) {
    if (!want(name)) continue;
    EXPECT_TRUE(m.params.count(name)) << "gradient for a tensor the model does not visit: " << name;
    if (!m.params.count(name)) continue;
    EXPECT_EQ(g.shape(), m.params.at(name).shape()) << name;
    for (const char* kind : {"random", "random 2"})
      rep.add(name, kind, directional(m, name, g, random_direction(g.numel(), rng), base, objective, kEpsRandom));
    const std::vector<double> dg = gradient_direction(g);
    if (!dg.empty()) rep.add(name, "gradient", directional(m, name, g, dg, base, objective, kEpsGradient));
  }
  return rep;
}

void expect_covered(const Report& rep, const std::vector<std::string>& names) {
  for (const auto& n : names) EXPECT_TRUE(rep.passed.count(n)) << "not verified along any direction: " << n;
}

void summarize(const char* tag, const Micro& m, const Report& rep, double sec) {
  std::printf("[grad fd %s] draw %d; %d directional checks over %zu tensors, %d skipped (routing changes), %d failed; worst "
              "%.2f of the tolerance (%s); %.2f s\n",
              tag, m.draws, rep.checked, rep.passed.size(), rep.skipped, rep.failed, rep.worst, rep.worst_name.c_str(), sec);
  EXPECT_LE(rep.skipped * 10, rep.checked) << "too many directions skipped for routing changes";
}

std::vector<std::string> attention_names(const std::string& layer, bool q_lora) {
  const std::string a = "model.layers." + layer + ".self_attn.";
  std::vector<std::string> v{a + "kv_a_proj_with_mqa.weight", a + "kv_a_layernorm.weight", a + "kv_b_proj.weight",
                             a + "o_proj.weight"};
  if (q_lora) {
    for (const char* s : {"q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"}) v.push_back(a + s);
  } else {
    v.push_back(a + "q_proj.weight");
  }
  return v;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Every trainable tensor has a gradient, except routed experts that received no token (never touched).
void expect_gradients_complete(const Micro& m, const Grads& g, const Micro::Eval& base) {
  for (const auto& [name, t] : g.all()) EXPECT_TRUE(m.params.count(name)) << "gradient of an unknown tensor " << name;
  int idle = 0;
  for (const auto& [name, p] : m.params) {
    if (g.all().count(name)) continue;
    int64_t layer = -1, expert = -1;
    const bool is_expert = std::sscanf(name.c_str(), "model.layers.%ld.mlp.experts.%ld.", &layer, &expert) == 2;
    EXPECT_TRUE(is_expert && base.load.count(layer) && base.load.at(layer).at(size_t(expert)) == 0)
        << "no gradient for " << name;
    idle += is_expert;
  }
  std::printf("  %zu gradients; %d tensors of idle experts have none\n", g.all().size(), idle);
}

auto full_loss = [](const Micro::Eval& e) { return e.loss; };
auto every_tensor = [](const std::string&) { return true; };

TEST(GradFd, QLoraMtpDepth2GroupLimited) {
  const auto t0 = std::chrono::steady_clock::now();
  Micro m("a", micro_a(), 11);
  Grads g;
  const Micro::Eval base = m.eval(&g);
  ASSERT_EQ(m.model->mtp_layers(), 2);
  ASSERT_EQ(base.load.size(), 3u);  // layer 1 and the two MTP layers (2, 3)
  const Report rep = check_all(m, g, base, full_loss, every_tensor, 1);
  std::vector<std::string> must{"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                                "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.gate.weight",
                                "model.layers.1.mlp.shared_experts.down_proj.weight"};
  for (const std::string l : {"0", "1", "2", "3"})
    for (const auto& n : attention_names(l, true)) must.push_back(n);
  for (const std::string l : {"2", "3"})
    for (const char* s : {"eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight", "mlp.gate.weight",
                          "input_layernorm.weight", "post_attention_layernorm.weight"})
      must.push_back("model.layers." + l + "." + s);
  expect_covered(rep, must);
  expect_gradients_complete(m, g, base);
  summarize("a: q LoRA, MTP x2, groups", m, rep, seconds_since(t0));
}

// Negative controls on the same model: the check must reject gradients that are plausibly or slightly wrong.
// (1) The gradient without the MTP term (as if the MTP loss were not backpropagated): a random direction must
//     catch it — at least one of three (one alone may by chance be nearly orthogonal to the missing part; so may
//     the gradient direction).
// (2) The gradient 5% too large: the gradient direction must catch it.
TEST(GradFd, DetectsWrongGradients) {
  Micro m("neg", micro_a(), 11);
  Grads g, g_no_mtp;
  const Micro::Eval base = m.eval(&g);
  m.opts.mtp_lambda = 0.0f;
  m.eval(&g_no_mtp);
  m.opts.mtp_lambda = 0.3f;
  std::mt19937_64 rng(5);
  auto ratio = [](const Outcome& o) { return o.done ? std::fabs(o.fd - o.an) / o.bound : -1.0; };
  for (const std::string name : {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_b_proj.weight",
                                 "model.layers.1.mlp.gate.weight", "model.layers.1.self_attn.o_proj.weight"}) {
    const Tensor& right = g.all().at(name);
    double worst_right = 0, best_no_mtp = 0;
    for (int k = 0; k < 3; ++k) {
      const auto d = random_direction(right.numel(), rng);
      const Outcome good = directional(m, name, right, d, base, full_loss, kEpsRandom);
      const Outcome no_mtp = directional(m, name, g_no_mtp.all().at(name), d, base, full_loss, kEpsRandom);
      EXPECT_TRUE(good.ok()) << name;
      ASSERT_TRUE(no_mtp.done) << name;
      worst_right = std::max(worst_right, ratio(good));
      best_no_mtp = std::max(best_no_mtp, ratio(no_mtp));
    }
    EXPECT_GT(best_no_mtp, 1.0) << name << ": the gradient without its MTP term passes";
    Tensor scaled = right.clone();
    for (int64_t i = 0; i < scaled.numel(); ++i) scaled.f32()[i] *= 1.05f;
    const Outcome good_g = directional(m, name, right, gradient_direction(right), base, full_loss, kEpsGradient);
    const Outcome big = directional(m, name, scaled, gradient_direction(scaled), base, full_loss, kEpsGradient);
    EXPECT_TRUE(good_g.ok()) << name;
    EXPECT_TRUE(big.done && !big.ok()) << name << ": the gradient scaled by 1.05 passes";
    std::printf("[grad fd controls] %-48s |fd-an|/bound: right %.3f / %.3f, no MTP term %.1f, x1.05 %.1f\n", name.c_str(),
                worst_right, ratio(good_g), best_no_mtp, ratio(big));
  }
}

TEST(GradFd, PlainQNoMtpAllMoeUnnormalised) {
  const auto t0 = std::chrono::steady_clock::now();
  Micro m("b", micro_b(), 23);
  Grads g;
  const Micro::Eval base = m.eval(&g);
  ASSERT_EQ(m.model->mtp_layers(), 0);
  ASSERT_EQ(base.load.size(), 2u);  // both layers are MoE
  const Report rep = check_all(m, g, base, full_loss, every_tensor, 2);
  std::vector<std::string> must{"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                                "model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight",
                                "model.layers.0.mlp.shared_experts.gate_proj.weight"};
  for (const std::string l : {"0", "1"})
    for (const auto& n : attention_names(l, false)) must.push_back(n);
  expect_covered(rep, must);
  for (const auto& [name, t] : g.all()) EXPECT_EQ(name.find("q_a_proj"), std::string::npos) << name;
  expect_gradients_complete(m, g, base);
  summarize("b: q_proj, no MTP, all MoE", m, rep, seconds_since(t0));
}

// The sequence-wise balance loss (α > 0) alone: its value (Losses::balance_loss) against the part of the
// gradient it adds (the gradient with α minus the gradient without; the routing is the same, so the rest cancels).
TEST(GradFd, BalanceLoss) {
  const auto t0 = std::chrono::steady_clock::now();
  Micro m("bal", micro_a(), 37, /*balance_alpha=*/0.1f);
  Grads with, without;
  const Micro::Eval base = m.eval(&with);
  ASSERT_GT(base.balance, 0.0);
  m.opts.balance_alpha = 0.0f;
  m.eval(&without);
  m.opts.balance_alpha = 0.1f;
  Grads bal;
  for (const auto& [name, t] : with.all()) {
    Tensor& d = bal.of(name, t.shape());
    const Tensor& o = without.all().at(name);
    for (int64_t i = 0; i < t.numel(); ++i) d.f32()[i] = t.f32()[i] - o.f32()[i];
  }
  // The routers and what feeds them (attention, norms, embeddings, the MTP input projection).
  auto want = [](const std::string& n) {
    return n.find("mlp.gate.weight") != std::string::npos || n.find("self_attn") != std::string::npos ||
           n.find("embed_tokens") != std::string::npos || n.find("eh_proj") != std::string::npos ||
           n.find("layernorm") != std::string::npos;
  };
  const Report rep = check_all(m, bal, base, [](const Micro::Eval& e) { return e.balance; }, want, 3);
  expect_covered(rep, {"model.layers.1.mlp.gate.weight", "model.layers.2.mlp.gate.weight", "model.layers.3.mlp.gate.weight",
                       "model.layers.1.self_attn.o_proj.weight", "model.layers.0.self_attn.q_b_proj.weight",
                       "model.layers.2.eh_proj.weight", "model.embed_tokens.weight"});
  summarize("balance loss", m, rep, seconds_since(t0));
}

}  // namespace
}  // namespace dsv3
