// Inference over the latent cache: cached (absorbed) decoding equals the uncached expanded forward,
// greedy generation reproduces transformers' greedy output with and without MTP speculative decoding,
// batching does not change results, and speculative sampling keeps the target distribution.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>

#include <unistd.h>

#include <cstring>
#include <filesystem>

#include "infer/generator.h"
#include "model/init.h"
#include "io/safetensors.h"
#include "testutil.h"

using namespace dsv3;

namespace {
std::vector<int64_t> row_of(const Tensor& t, int64_t r) {
  Tensor c = t.to(DType::I64);
  return {c.data<int64_t>() + r * c.dim(1), c.data<int64_t>() + (r + 1) * c.dim(1)};
}
}  // namespace

TEST(Generate, CachedDecodeEqualsUncachedForward) {
  for (const char* name : {"tiny", "fp8"}) {
    auto model = Transformer::load(test::golden_dir(name) + "/model");
    auto golden = io::SafetensorsFile::open(test::golden_dir(name) + "/golden.safetensors");
    const std::vector<int64_t> ids = row_of(golden->get("input_ids"), 0);
    const int64_t T = int64_t(ids.size()), V = model->config().vocab_size;
    ForwardResult full = model->forward(Tensor::from_vector(ids, {1, T}));
    LatentCache cache(model->config(), 1, T);
    Tensor got = Tensor::empty(DType::F32, {T, V});
    // Prefill in uneven chunks (3, 5), then one token per step.
    int64_t pos = 0;
    for (int64_t n : {3, 5}) {
      auto st = model->step({ids.begin() + pos, ids.begin() + pos + n}, Batch::cached({{0, pos, n}}), cache, true);
      std::copy_n(st.logits.f32(), n * V, got.f32() + pos * V);
      pos += n;
    }
    for (; pos < T; ++pos) {
      auto st = model->step({ids[size_t(pos)]}, Batch::cached({{0, pos, 1}}), cache);
      std::copy_n(st.logits.f32(), V, got.f32() + pos * V);
    }
    EXPECT_LT(test::rel_l2(got, full.logits.reshape({T, V})), 1e-5) << name;
  }
}

TEST(Generate, GreedyMatchesTransformersWithAndWithoutMtp) {
  for (const char* name : {"tiny", "fp8"}) {
    auto model = Transformer::load(test::golden_dir(name) + "/model");
    auto golden = io::SafetensorsFile::open(test::golden_dir(name) + "/golden.safetensors");
    const std::vector<int64_t> prompt = row_of(golden->get("greedy.prompt"), 0);
    const std::vector<int64_t> want = row_of(golden->get("greedy.output"), 0);
    const std::vector<int64_t> want_new(want.begin() + int64_t(prompt.size()), want.end());
    for (int draft : {0, 1, 2, 3}) {
      GenerateOptions o;
      o.max_new_tokens = int64_t(want_new.size());
      o.speculative = draft > 0;
      o.draft = std::max(draft, 1);
      o.prefill_chunk = 5;
      Generator gen(*model);
      auto out = gen.generate({prompt}, o);
      EXPECT_EQ(out[0].tokens, want_new) << name << " draft " << draft;
      if (draft > 0) {
        EXPECT_EQ(gen.stats().drafted, gen.stats().main_passes * draft - draft * ((int64_t(prompt.size()) + 4) / 5));
        EXPECT_LE(gen.stats().accepted, gen.stats().drafted);
      }
    }
  }
}

TEST(Generate, BatchedPromptsOfDifferentLengthsMatchSingleRuns) {
  auto model = Transformer::load(test::golden_dir("tiny") + "/model");
  const std::vector<std::vector<int64_t>> prompts{{5, 17, 300, 2, 9, 44, 101}, {7, 8}, {400, 3, 3, 3}};
  GenerateOptions o;
  o.max_new_tokens = 9;
  o.prefill_chunk = 4;
  o.sampling.temperature = 0.8f;
  o.sampling.top_k = 20;
  o.sampling.seed = 7;
  Generator gen(*model);
  auto batched = gen.generate(prompts, o);
  EXPECT_EQ(gen.stats().decode_tokens, 3 * 8);
  for (size_t s = 0; s < prompts.size(); ++s) {
    // A sequence's RNG depends on its index in the batch; a single run at index s needs the same stream.
    GenerateOptions one = o;
    one.sampling.seed = o.sampling.seed + 0x9e3779b97f4a7c15ull * s;
    auto single = Generator(*model).generate({prompts[s]}, one);
    EXPECT_EQ(batched[s].tokens, single[0].tokens) << "prompt " << s;
  }
  // Same seed, same text; another seed, (almost surely) another text.
  EXPECT_EQ(Generator(*model).generate(prompts, o)[0].tokens, batched[0].tokens);
  o.sampling.seed = 8;
  EXPECT_NE(Generator(*model).generate(prompts, o)[0].tokens, batched[0].tokens);
}

// A model that samples "on its device" (here: greedy from its own step's logits), recording the draw counters
// the Generator passes: the Generator must give the host sampler's greedy text through it, pass each sequence
// how many tokens it has drawn, and keep the host sampler when the model cannot (penalties) or when told not to.
namespace {
struct DeviceGreedy final : StepModel {
  explicit DeviceGreedy(const Transformer& m) : inner(m) {}
  CpuStepModel inner;
  mutable std::vector<std::vector<uint64_t>> draws;
  const ModelConfig& config() const override { return inner.config(); }
  int64_t mtp_layers() const override { return inner.mtp_layers(); }
  std::unique_ptr<StepCache> make_cache(int64_t slots, int64_t max_tokens) const override { return inner.make_cache(slots, max_tokens); }
  Transformer::Step step(const std::vector<int64_t>& t, const Batch& b, StepCache& c, bool all) const override {
    return inner.step(t, b, c, all);
  }
  Tensor mtp_step(int64_t k, const Tensor& h, const std::vector<int64_t>& a, const Batch& b, StepCache& c, Tensor* ho) const override {
    return inner.mtp_step(k, h, a, b, c, ho);
  }
  bool can_sample_on_device(const SamplingParams& p) const override { return p.repetition_penalty == 1.0f; }
  std::vector<int64_t> step_sampled(const std::vector<int64_t>& t, const Batch& b, StepCache& c, const SamplingParams&,
                                    const std::vector<uint64_t>& d) const override {
    draws.push_back(d);
    const auto st = inner.step(t, b, c, false);
    std::vector<int64_t> out;
    const int64_t V = st.logits.dim(1);
    for (int64_t r = 0; r < st.logits.dim(0); ++r)
      out.push_back(std::max_element(st.logits.f32() + r * V, st.logits.f32() + (r + 1) * V) - (st.logits.f32() + r * V));
    return out;
  }
};
}  // namespace

TEST(Generate, DeviceSamplingPathGivesTheHostText) {
  auto model = Transformer::load(test::golden_dir("tiny") + "/model");
  const std::vector<std::vector<int64_t>> prompts{{5, 17, 300, 2, 9, 44, 101}, {7, 8}, {400, 3, 3, 3}};
  GenerateOptions o;
  o.max_new_tokens = 5;
  o.prefill_chunk = 4;
  const auto want = Generator(*model).generate(prompts, o);
  DeviceGreedy dev(*model);
  const auto got = Generator(dev).generate(prompts, o);
  for (size_t s = 0; s < prompts.size(); ++s) EXPECT_EQ(got[s].tokens, want[s].tokens) << "prompt " << s;
  // Prefill passes (chunks of 4: two passes) draw for every row with counter 0; decode pass k passes k + 1.
  ASSERT_EQ(dev.draws.size(), size_t(2 + 4));
  EXPECT_EQ(dev.draws[0], std::vector<uint64_t>(3, 0));
  EXPECT_EQ(dev.draws[1], std::vector<uint64_t>{0});
  for (size_t k = 0; k < 4; ++k) EXPECT_EQ(dev.draws[2 + k], std::vector<uint64_t>(3, k + 1)) << "decode pass " << k;
  dev.draws.clear();
  o.device_sampling = false;
  EXPECT_EQ(Generator(dev).generate(prompts, o)[1].tokens, want[1].tokens);
  o.device_sampling = true;
  o.sampling.repetition_penalty = 1.3f;
  Generator(dev).generate(prompts, o);
  EXPECT_TRUE(dev.draws.empty()) << "the model cannot apply penalties: the host sampler must run";
}

TEST(Generate, StopTokensAndCallbackEndASequence) {
  auto model = Transformer::load(test::golden_dir("tiny") + "/model");
  GenerateOptions o;
  o.max_new_tokens = 10;
  auto free_run = Generator(*model).generate({{1, 2, 3}}, o)[0].tokens;
  ASSERT_EQ(free_run.size(), 10u);
  o.stop_tokens = {free_run[3]};
  auto stopped = Generator(*model).generate({{1, 2, 3}}, o)[0];
  EXPECT_EQ(stopped.finish, Finish::Stop);
  EXPECT_LE(stopped.tokens.size(), 4u);
  o.stop_tokens.clear();
  auto cb = Generator(*model).generate({{1, 2, 3}}, o, [](size_t, int64_t) { return false; })[0];
  EXPECT_EQ(cb.tokens.size(), 1u);
  EXPECT_EQ(cb.finish, Finish::Callback);
}

TEST(Generate, BadRequestsAreClearErrors) {
  auto model = Transformer::load(test::golden_dir("tiny") + "/model");
  GenerateOptions o;
  Generator gen(*model);
  EXPECT_THROW(gen.generate({{1, 99999}}, o), Error);
  EXPECT_THROW(gen.generate({{}}, o), Error);
  EXPECT_THROW(gen.generate({std::vector<int64_t>(size_t(model->config().max_position_embeddings), 1)}, o), Error);
  o.max_new_tokens = 0;
  EXPECT_THROW(gen.generate({{1, 2}}, o), Error);
  o.max_new_tokens = 4;
  o.sampling.top_p = 0.0f;
  EXPECT_THROW(gen.generate({{1, 2}}, o), Error);
}

// Speculative sampling must leave the output distribution unchanged (Leviathan et al. 2023). The second
// generated token is the first that goes through draft + verification. Its exact marginal is
// Σ_t1 p(t1 | prompt) · p(t2 | prompt, t1) under the same sampling filters; the empirical distribution over
// N seeds must pass a chi-square goodness-of-fit test at significance 1e-4.
TEST(Generate, SpeculativeSamplingKeepsTheDistribution) {
  auto model = Transformer::load(test::golden_dir("tiny") + "/model");
  const int64_t V = model->config().vocab_size;
  const std::vector<int64_t> prompt{11, 200, 37, 5};
  SamplingParams sp;
  // Sharpened (temperature 0.4) so the MTP draft distribution q differs clearly from the target p, and no
  // top-k so their supports overlap and both the accept and the reject path run.
  sp.temperature = 0.4f;
  const Sampler sampler(sp);
  auto next_dist = [&](const std::vector<int64_t>& ctx) {
    ForwardResult r = model->forward(Tensor::from_vector(ctx, {1, int64_t(ctx.size())}), {.mtp_depth = 0});
    return sampler.distribution(r.logits.f32() + (int64_t(ctx.size()) - 1) * V, V, ctx);
  };
  std::vector<double> exact(size_t(V), 0.0);
  const std::vector<float> p1 = next_dist(prompt);
  for (int64_t t1 = 0; t1 < V; ++t1) {
    if (p1[size_t(t1)] <= 0.0f) continue;
    std::vector<int64_t> ctx(prompt);
    ctx.push_back(t1);
    const std::vector<float> p2 = next_dist(ctx);
    for (int64_t t = 0; t < V; ++t) exact[size_t(t)] += double(p1[size_t(t1)]) * double(p2[size_t(t)]);
  }
  const int N = 3000;
  std::map<int64_t, int> counts;
  GenerateOptions o;
  o.max_new_tokens = 2;
  o.speculative = true;
  o.draft = 1;
  o.sampling = sp;
  int64_t drafted = 0, accepted = 0;
  for (int s = 0; s < N; ++s) {
    o.sampling.seed = uint64_t(1000 + s);
    Generator gen(*model);
    auto out = gen.generate({prompt}, o);
    ASSERT_EQ(out[0].tokens.size(), 2u);
    ++counts[out[0].tokens[1]];
    drafted += gen.stats().drafted, accepted += gen.stats().accepted;
  }
  // Pool categories with expected count < 5 into one bin, as the chi-square approximation requires.
  double chi2 = 0, pooled_exp = 0, pooled_obs = 0;
  int bins = 0;
  for (int64_t t = 0; t < V; ++t) {
    const double e = exact[size_t(t)] * N, obs = counts.count(t) ? counts[t] : 0;
    if (e < 5) {
      pooled_exp += e, pooled_obs += obs;
      continue;
    }
    chi2 += (obs - e) * (obs - e) / e;
    ++bins;
  }
  if (pooled_exp > 0) chi2 += (pooled_obs - pooled_exp) * (pooled_obs - pooled_exp) / pooled_exp, ++bins;
  // Critical value of chi-square at p = 1e-4: about df + 4.3·sqrt(2·df) + 10 covers df ≤ 40 conservatively.
  const double df = bins - 1, critical = df + 4.3 * std::sqrt(2.0 * df) + 10.0;
  EXPECT_LT(chi2, critical) << "bins " << bins;
  std::printf("chi2 %.1f (critical %.1f, %d bins), drafts accepted %lld/%lld\n", chi2, critical, bins, (long long)accepted,
              (long long)drafted);
  EXPECT_GT(accepted, 0);
  EXPECT_LT(accepted, drafted);  // the rejection path was exercised too
}

// An MTP module that drafts exactly what the main model will say: with every attention and FFN output
// projection zeroed, the main model is a bigram model (logits = head(norm(embed(t)))), and with
// eh_proj = [I | 0] the MTP module computes head(norm(enorm(embed(t_{i+1})))) — the same bigram one step
// ahead. Every draft must then be accepted, k+1 tokens per verification pass, output unchanged.
TEST(Generate, OracleDraftsAreAllAccepted) {
  const std::string dir = (std::filesystem::temp_directory_path() / ("dsv3-oracle-" + std::to_string(getpid()))).string();
  ModelConfig cfg = ModelConfig::load(test::golden_dir("tiny") + "/model/config.json");
  cfg.initializer_range = 0.5;
  write_random_checkpoint(cfg, dir, {.seed = 3});
  std::vector<std::pair<std::string, Tensor>> tensors;
  {
    auto ck = io::Checkpoint::open(dir);
    for (const auto& name : ck.names()) {
      Tensor t = ck.get(name).clone();
      const bool out_proj = name.find("o_proj") != std::string::npos || name.find("down_proj") != std::string::npos;
      if (out_proj) std::memset(t.raw(), 0, t.nbytes());
      if (name.find("eh_proj") != std::string::npos) {  // [H, 2H] = [I | 0]
        Tensor f = Tensor::zeros(DType::F32, t.shape());
        for (int64_t i = 0; i < t.dim(0); ++i) f.f32()[i * t.dim(1) + i] = 1.0f;
        t = f.to(t.dtype());
      }
      tensors.emplace_back(name, t);
    }
  }
  io::write_safetensors(dir + "/model.safetensors", tensors);
  auto model = Transformer::load(dir);
  const std::vector<int64_t> prompt{3, 141, 59, 26};
  GenerateOptions o;
  o.max_new_tokens = 24;
  o.stop_tokens.clear();
  const auto plain = Generator(*model).generate({prompt}, o)[0].tokens;
  for (int64_t draft : {1, 3}) {
    o.speculative = true;
    o.draft = draft;
    Generator gen(*model);
    EXPECT_EQ(gen.generate({prompt}, o)[0].tokens, plain) << "draft " << draft;
    EXPECT_EQ(gen.stats().accepted, gen.stats().drafted) << "draft " << draft;
    // One prefill pass, then each verification pass yields draft+1 tokens (the first token comes from prefill).
    EXPECT_EQ(gen.stats().main_passes, 1 + (o.max_new_tokens - 1 + draft) / (draft + 1)) << "draft " << draft;
  }
  std::filesystem::remove_all(dir);
}
