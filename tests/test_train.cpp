// The training loop's parts: optimizer, schedule, clipping, the balance loss's gradient, the data order,
// and the trainer end to end (bit-exact resume, NaN stop, bad checkpoints and data).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/transformer.h"
#include "testutil.h"
#include "train/optimizer.h"
#include "train/token_shard.h"
#include "train/trainer.h"

using namespace dsv3;
using namespace dsv3::train;
namespace fs = std::filesystem;

namespace {

fs::path temp_dir(const std::string& tag) {
  const fs::path p = fs::temp_directory_path() / ("dsv3-train-" + tag + "-" + std::to_string(getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(TrainParts, LrScheduleWarmupConstantCosine) {
  const LrSchedule s{1.0, 0.1, 10, 50, 100};
  EXPECT_NEAR(s.at(0), 0.1, 1e-12);
  EXPECT_NEAR(s.at(9), 1.0, 1e-12);
  EXPECT_NEAR(s.at(30), 1.0, 1e-12);
  EXPECT_NEAR(s.at(75), 0.55, 1e-12);  // half way through the cosine
  EXPECT_NEAR(s.at(100), 0.1, 1e-12);
  EXPECT_NEAR(s.at(200), 0.1, 1e-12);
}

TEST(TrainParts, AdamWMatchesTheFormula) {
  Tensor w = Tensor::from_vector(std::vector<float>{1.0f, -2.0f}, {2});
  Tensor b = Tensor::from_vector(std::vector<float>{0.5f, 0.5f}, {2});
  AdamWConfig c;
  AdamW opt(c, {{"w", w, true}, {"b", b, false}});
  Grads g;
  Tensor& gw = g.of("w", {2});
  gw.f32()[0] = 0.1f, gw.f32()[1] = -0.3f;
  g.of("b", {2}).f32()[0] = 1.0f;
  const float lr = 0.01f;
  opt.step(g, lr);
  // Step 1: m̂ = g, v̂ = g², update = g/(|g| + eps) ≈ sign(g); decay on w only.
  for (int i = 0; i < 2; ++i) {
    const double gi = gw.f32()[i], w0 = i == 0 ? 1.0 : -2.0;
    const double want = w0 * (1 - lr * 0.1) - lr * gi / (std::fabs(gi) + 1e-8);
    EXPECT_NEAR(w.f32()[i], want, 1e-6);
  }
  EXPECT_NEAR(b.f32()[0], 0.5 - lr, 1e-6);
  EXPECT_NEAR(b.f32()[1], 0.5, 1e-7);  // zero gradient: moments stay 0, update 0, no decay
  // Step 2 by the formula with bias correction.
  gw.f32()[0] = -0.2f;
  const double w1 = w.f32()[0];
  opt.step(g, lr);
  const double m = 0.9 * 0.1 * 0.1 + 0.1 * -0.2, v = 0.95 * 0.05 * 0.01 + 0.05 * 0.04;
  const double mh = m / (1 - 0.81), vh = v / (1 - 0.9025);
  EXPECT_NEAR(w.f32()[0], w1 * (1 - lr * 0.1) - lr * mh / (std::sqrt(vh) + 1e-8), 1e-6);
}

TEST(TrainParts, AdamWBf16MomentsTrackF32) {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  const int n = 4096;
  std::vector<float> init(n);
  for (float& x : init) x = nd(rng);
  Tensor a = Tensor::from_vector(init, {n}), b = Tensor::from_vector(init, {n});
  AdamWConfig c32, c16;
  c16.bf16_moments = true;
  AdamW o32(c32, {{"p", a, true}}), o16(c16, {{"p", b, true}});
  for (int s = 0; s < 20; ++s) {
    Grads g;
    Tensor& t = g.of("p", {n});
    for (int i = 0; i < n; ++i) t.f32()[i] = nd(rng);
    o32.step(g, 1e-3f), o16.step(g, 1e-3f);
  }
  Tensor d = Tensor::from_vector(init, {n});
  for (int i = 0; i < n; ++i) d.f32()[i] = a.f32()[i] - init[size_t(i)], b.f32()[i] -= init[size_t(i)];
  EXPECT_LT(test::rel_l2(b, d), 2e-2);  // the updates agree to about bf16 precision
  EXPECT_EQ(o16.state()[0].second.dtype(), DType::BF16);
}

TEST(TrainParts, ClipGradNorm) {
  Grads g;
  g.of("a", {2}).f32()[0] = 3.0f;
  g.of("b", {1}).f32()[0] = 4.0f;
  EXPECT_NEAR(clip_grad_norm(g, 1.0), 5.0, 1e-9);
  EXPECT_NEAR(g.all().at("a").f32()[0], 0.6, 1e-5);
  EXPECT_NEAR(clip_grad_norm(g, 1.0), 1.0, 1e-5);
  EXPECT_NEAR(g.all().at("b").f32()[0], 0.8, 1e-5);
}

TEST(TrainParts, BatchChunksArePermutationsPerEpoch) {
  std::set<int64_t> seen;
  for (int64_t step = 0; step < 5; ++step)
    for (int64_t c : batch_chunks(7, step, 2, 10)) seen.insert(c);
  EXPECT_EQ(seen.size(), 10u);
  EXPECT_EQ(batch_chunks(7, 3, 4, 10), batch_chunks(7, 3, 4, 10));
  EXPECT_NE(batch_chunks(7, 0, 10, 10), batch_chunks(8, 0, 10, 10));
}

// The sequence-wise balance loss (§2.3.3): its gradient w.r.t. the router logits against central
// differences (the selection is an input, held fixed). Double accumulation; the perturbation actually
// applied is the float32 difference, so the check is exact up to O(eps²).
TEST(TrainParts, BalanceLossGradientMatchesFiniteDifference) {
  const int64_t B = 2, T = 12, E = 16, K = 4, M = B * T;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  Tensor logits = Tensor::empty(DType::F32, {M, E}), idx = Tensor::empty(DType::I32, {M, K});
  for (int64_t i = 0; i < M * E; ++i) logits.f32()[i] = nd(rng);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < K; ++j) idx.data<int32_t>()[m * K + j] = int32_t((m * 5 + j * 3) % E);
  const float alpha = 0.3f;
  Tensor d = Tensor::empty(DType::F32, {M, E});
  const double L = ops::seq_balance_loss(logits, idx, T, alpha, &d);
  EXPECT_GT(L, 0.0);
  double worst = 0;
  for (int64_t i = 0; i < M * E; i += 7) {
    const float x = logits.f32()[i];
    logits.f32()[i] = x + 1e-2f;
    const double hi = double(logits.f32()[i]) - x, Lp = ops::seq_balance_loss(logits, idx, T, alpha, nullptr);
    logits.f32()[i] = x - 1e-2f;
    const double lo = x - double(logits.f32()[i]), Lm = ops::seq_balance_loss(logits, idx, T, alpha, nullptr);
    logits.f32()[i] = x;
    const double fd = (Lp - Lm) / (hi + lo);
    worst = std::max(worst, std::fabs(fd - d.f32()[i]) / (std::fabs(fd) + 1e-6));
  }
  EXPECT_LT(worst, 1e-3);
  // Balanced routing with equal affinities gives the minimum α·1 (f_i = P_i·E = 1 for all i).
  Tensor flat = Tensor::zeros(DType::F32, {T, 4}), round = Tensor::empty(DType::I32, {T, 1});
  for (int64_t t = 0; t < T; ++t) round.data<int32_t>()[t] = int32_t(t % 4);
  EXPECT_NEAR(ops::seq_balance_loss(flat, round, T, alpha, nullptr), alpha, 1e-9);
}

// In the model, α > 0 adds the balance loss of every MoE layer (MTP's included) and its gradient reaches the
// router weights; with α = 0 nothing changes.
TEST(TrainParts, BalanceLossReachesTheRouter) {
  auto model = Transformer::load(test::golden_dir("tiny") + "/model");
  model->make_trainable();
  std::vector<int64_t> seq;
  for (int i = 0; i < 48; ++i) seq.push_back((i * 37 + 11) % 500);
  const Tensor ids = Tensor::from_vector(seq, {2, 24});
  Grads g0, g1;
  const auto L0 = model->loss_and_grads(ids, {0.3f, 0.0f}, g0);
  const auto L1 = model->loss_and_grads(ids, {0.3f, 0.5f}, g1);
  EXPECT_EQ(L0.balance_loss, 0.0);
  EXPECT_EQ(L0.loss, L1.loss);
  EXPECT_EQ(L1.expert_load.size(), 3u);  // MoE layers 1, 2 and the MTP layer 3
  // Near balance each layer contributes about α; 3 layers.
  EXPECT_GT(L1.balance_loss, 3 * 0.5 * 0.9);
  EXPECT_LT(L1.balance_loss, 3 * 0.5 * 2.0);
  for (const char* n : {"model.layers.1.mlp.gate.weight", "model.layers.3.mlp.gate.weight"})
    EXPECT_GT(test::rel_l2(g1.all().at(n), g0.all().at(n)), 1e-6) << n;
}

// ---- the trainer end to end ----

namespace {

struct Corpus {
  fs::path dir, data, config;
};

// A micro model (the golden tiny config: MLA with q LoRA, 16 experts in 4 groups, MTP) and a corpus with
// structure to learn: a repeating random phrase book.
Corpus make_setup(const std::string& tag, int64_t n_tokens = 6000) {
  Corpus s;
  s.dir = temp_dir(tag);
  s.data = s.dir / "data";
  fs::create_directories(s.data);
  s.config = s.dir / "config.json";
  fs::copy_file(test::golden_dir("tiny") + "/model/config.json", s.config);
  std::mt19937 rng(11);
  std::vector<std::vector<uint32_t>> phrases(20);
  for (auto& p : phrases)
    for (int i = 0; i < 6; ++i) p.push_back(uint32_t(rng() % 500));
  std::vector<uint32_t> toks;
  while (int64_t(toks.size()) < n_tokens) {
    const auto& p = phrases[rng() % phrases.size()];
    toks.insert(toks.end(), p.begin(), p.end());
  }
  toks.resize(size_t(n_tokens));
  const size_t cut = toks.size() * 9 / 10;
  write_token_shard((s.data / "train.bin").string(), {toks.begin(), toks.begin() + long(cut)}, 512, cut * 4);
  write_token_shard((s.data / "val.bin").string(), {toks.begin() + long(cut), toks.end()}, 512, (toks.size() - cut) * 4);
  return s;
}

TrainOptions options(const Corpus& s, const std::string& out, int64_t steps) {
  TrainOptions o;
  o.config = s.config.string();
  o.data = s.data.string();
  o.out = (s.dir / out).string();
  o.steps = steps;
  o.batch = 4, o.seq_len = 32;
  o.lr = 3e-3, o.min_lr = 3e-4, o.warmup = 2;
  o.eval_every = 4, o.eval_tokens = 256, o.save_every = 1000, o.log_every = 1000;
  o.plot = false, o.quiet = true;
  return o;
}

TrainResult run_train(const TrainOptions& o) { return dsv3::train::train(o); }

std::vector<uint8_t> file_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

TEST(Trainer, LearnsAndResumesBitExactly) {
  const Corpus s = make_setup("resume");
  TrainOptions straight = options(s, "straight", 8);
  straight.adam.bf16_moments = true;
  const TrainResult r = run_train(straight);
  EXPECT_EQ(r.steps, 8);
  EXPECT_LT(r.val_loss, std::log(512.0));  // better than uniform after a few steps
  EXPECT_GT(r.val_bpb, 0.0);

  TrainOptions half = straight;
  half.out = (s.dir / "halves").string();
  half.stop_after = 4;  // interrupted half way (the schedule still spans 8 steps)
  run_train(half);
  TrainOptions rest = straight;
  rest.out = half.out;
  rest.resume = true;
  run_train(rest);
  for (const char* f : {"model.safetensors", "trainer/state.safetensors"})
    EXPECT_TRUE(file_bytes(fs::path(straight.out) / "checkpoint" / f) == file_bytes(fs::path(half.out) / "checkpoint" / f))
        << f << " differs between 8 straight steps and 4 + resume + 4";
  // Metrics: one line per step, no duplicates after the resume.
  std::ifstream m(fs::path(half.out) / "metrics.jsonl");
  int lines = 0;
  for (std::string l; std::getline(m, l);) ++lines;
  EXPECT_EQ(lines, 8);
  // The checkpoint is a model in the official layout.
  auto model = Transformer::load((fs::path(straight.out) / "checkpoint").string());
  EXPECT_EQ(model->mtp_layers(), 1);
  fs::remove_all(s.dir);
}

TEST(Trainer, StopsOnNonFiniteLossKeepingTheLastCheckpoint) {
  const Corpus s = make_setup("nan");
  TrainOptions o = options(s, "run", 30);
  o.save_every = 1, o.lr = 1e30, o.warmup = 0, o.clip = 0;
  const std::string err = error_of([&] { run_train(o); });
  EXPECT_NE(err.find("the loss is"), std::string::npos) << err;
  EXPECT_NE(err.find("last good checkpoint"), std::string::npos) << err;
  // What is there loads and resumes to the same failure, never a half-written folder.
  EXPECT_FALSE(fs::exists(fs::path(o.out) / "checkpoint.tmp"));
  if (fs::exists(fs::path(o.out) / "checkpoint")) {
    EXPECT_NO_THROW(Transformer::load((fs::path(o.out) / "checkpoint").string()));
  }
  fs::remove_all(s.dir);
}

TEST(Trainer, RejectsBadCheckpointsAndData) {
  const Corpus s = make_setup("bad");
  // --resume on a folder that is a model but not a training checkpoint.
  TrainOptions o = options(s, "foreign", 2);
  fs::create_directories(fs::path(o.out));
  fs::copy(test::golden_dir("tiny") + "/model", fs::path(o.out) / "checkpoint");
  o.resume = true;
  EXPECT_NE(error_of([&] { run_train(o); }).find("not a dsv3 training checkpoint"), std::string::npos);
  // A corrupted optimizer state.
  TrainOptions ok = options(s, "ok", 2);
  run_train(ok);
  const fs::path st = fs::path(ok.out) / "checkpoint" / "trainer" / "state.safetensors";
  fs::resize_file(st, fs::file_size(st) / 2);
  ok.resume = true, ok.steps = 4;
  EXPECT_NE(error_of([&] { run_train(ok); }).find("state.safetensors"), std::string::npos);
  // Resuming with another batch size would not be the same run.
  TrainOptions other = options(s, "ok2", 2);
  run_train(other);
  other.resume = true, other.batch = 3;
  EXPECT_NE(error_of([&] { run_train(other); }).find("resume with the same"), std::string::npos);
  // A fresh run over an existing checkpoint refuses instead of overwriting it.
  TrainOptions again = options(s, "ok2", 2);
  EXPECT_NE(error_of([&] { run_train(again); }).find("exists"), std::string::npos);
  // Data shorter than one sequence, and a config that does not validate.
  write_token_shard((s.data / "val.bin").string(), {1, 2, 3}, 512, 12);
  TrainOptions shortval = options(s, "short", 2);
  EXPECT_NE(error_of([&] { run_train(shortval); }).find("fewer than one sequence"), std::string::npos);
  std::ofstream(s.dir / "bad.json") << R"({"model_type": "deepseek_v3", "hidden_size": -4})";
  TrainOptions badcfg = options(s, "badcfg", 2);
  badcfg.config = (s.dir / "bad.json").string();
  write_token_shard((s.data / "val.bin").string(), std::vector<uint32_t>(200, 5), 512, 800);
  EXPECT_NE(error_of([&] { run_train(badcfg); }), "");
  fs::remove_all(s.dir);
}
