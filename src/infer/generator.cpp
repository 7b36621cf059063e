#include "infer/generator.h"

#include <algorithm>
#include <chrono>

namespace dsv3 {

namespace {
using clk = std::chrono::steady_clock;
double since(clk::time_point t0) { return std::chrono::duration<double>(clk::now() - t0).count(); }

const float* row(const Tensor& logits, int64_t r) { return logits.f32() + r * logits.dim(1); }

// Emits one token into a generation; returns false when the sequence is finished.
bool emit(Generation& g, size_t seq, int64_t tok, const GenerateOptions& o, const TokenCallback& cb, int64_t context_left) {
  g.tokens.push_back(tok);
  if (cb && !cb(seq, tok)) return g.finish = Finish::Callback, false;
  if (std::find(o.stop_tokens.begin(), o.stop_tokens.end(), tok) != o.stop_tokens.end()) return g.finish = Finish::Stop, false;
  if (int64_t(g.tokens.size()) >= o.max_new_tokens) return g.finish = Finish::Length, false;
  if (context_left <= 0) return g.finish = Finish::Context, false;
  return true;
}
}  // namespace

std::vector<Generation> Generator::generate(const std::vector<std::vector<int64_t>>& prompts, const GenerateOptions& o,
                                            const TokenCallback& cb) {
  const ModelConfig& c = model_.config();
  DSV3_CHECK(!prompts.empty(), "no prompts to generate from");
  DSV3_CHECK(o.max_new_tokens >= 1, "max new tokens must be at least 1, got {}", o.max_new_tokens);
  DSV3_CHECK(o.prefill_chunk >= 1, "prefill chunk must be at least 1");
  for (size_t s = 0; s < prompts.size(); ++s) {
    DSV3_CHECK(!prompts[s].empty(), "prompt {} is empty", s);
    DSV3_CHECK(int64_t(prompts[s].size()) < c.max_position_embeddings,
               "prompt {} has {} tokens; the model's context is {} (max_position_embeddings)", s, prompts[s].size(),
               c.max_position_embeddings);
    for (size_t i = 0; i < prompts[s].size(); ++i)
      DSV3_CHECK(prompts[s][i] >= 0 && prompts[s][i] < c.vocab_size, "prompt {}: token {} at position {} is out of range [0, {})",
                 s, prompts[s][i], i, c.vocab_size);
  }
  if (o.speculative) {
    DSV3_CHECK(model_.mtp_layers() > 0, "speculative decoding with MTP needs a checkpoint with MTP layers (num_nextn_predict_layers > 0)");
    DSV3_CHECK(o.draft >= 1, "--draft must be at least 1, got {}", o.draft);
  }
  stats_ = {};
  if (!o.speculative) return generate_batched(prompts, o, cb);
  std::vector<Generation> out;
  for (size_t s = 0; s < prompts.size(); ++s) out.push_back(generate_speculative(s, prompts[s], o, cb));
  return out;
}

std::vector<Generation> Generator::generate_batched(const std::vector<std::vector<int64_t>>& prompts, const GenerateOptions& o,
                                                    const TokenCallback& cb) {
  const ModelConfig& c = model_.config();
  const size_t S = prompts.size();
  int64_t longest = 0;
  for (const auto& p : prompts) longest = std::max<int64_t>(longest, int64_t(p.size()));
  const int64_t cap = std::min<int64_t>(longest + o.max_new_tokens, c.max_position_embeddings);
  auto cache_ptr = model_.make_cache(int64_t(S), cap);
  StepCache& cache = *cache_ptr;
  const Sampler sampler(o.sampling);
  std::vector<std::mt19937_64> rng;
  for (size_t s = 0; s < S; ++s) rng.emplace_back(o.sampling.seed + 0x9e3779b97f4a7c15ull * s);
  std::vector<Generation> gen(S);
  std::vector<std::vector<int64_t>> hist(prompts);
  std::vector<char> active(S, 1);
  std::vector<int64_t> done(S, 0);
  const bool on_device = o.device_sampling && model_.can_sample_on_device(o.sampling);
  // The next token of every sequence of a pass (row i of the pass is sequence who[i]).
  auto pass = [&](const std::vector<int64_t>& toks, const std::vector<Batch::Seq>& seqs, const std::vector<size_t>& who) {
    std::vector<int64_t> next(who.size());
    if (on_device) {
      std::vector<uint64_t> draws;
      for (size_t s : who) draws.push_back(uint64_t(gen[s].tokens.size()));
      next = model_.step_sampled(toks, Batch::cached(seqs), cache, o.sampling, draws);
    } else {
      auto st = model_.step(toks, Batch::cached(seqs), cache);
      for (size_t i = 0; i < who.size(); ++i) {
        const size_t s = who[i];
        const bool last = done[s] >= int64_t(prompts[s].size());  // prefill rows of unfinished prompts: not sampled
        if (last) next[i] = sampler.sample(row(st.logits, int64_t(i)), c.vocab_size, hist[s], rng[s]);
      }
    }
    ++stats_.main_passes;
    return next;
  };

  // Prefill: rounds of up to prefill_chunk tokens of every prompt in one pass; the first token of a sequence
  // is sampled from the logits of its prompt's last row.
  auto t0 = clk::now();
  for (bool more = true; more;) {
    std::vector<Batch::Seq> seqs;
    std::vector<int64_t> toks;
    std::vector<size_t> who;
    for (size_t s = 0; s < S; ++s) {
      const int64_t n = std::min<int64_t>(o.prefill_chunk, int64_t(prompts[s].size()) - done[s]);
      if (n <= 0) continue;
      seqs.push_back({int64_t(s), done[s], n});
      toks.insert(toks.end(), prompts[s].begin() + done[s], prompts[s].begin() + done[s] + n);
      who.push_back(s);
      done[s] += n;
    }
    more = !seqs.empty();
    if (!more) break;
    const std::vector<int64_t> next = pass(toks, seqs, who);
    stats_.prefill_tokens += int64_t(toks.size());
    for (size_t i = 0; i < who.size(); ++i) {
      const size_t s = who[i];
      if (done[s] < int64_t(prompts[s].size())) continue;
      const int64_t tok = next[i];
      hist[s].push_back(tok);
      active[s] = emit(gen[s], s, tok, o, cb, cap - int64_t(hist[s].size()));
    }
  }
  stats_.prefill_seconds = since(t0);

  // Decode: every active sequence advances one token per pass.
  t0 = clk::now();
  for (;;) {
    std::vector<Batch::Seq> seqs;
    std::vector<int64_t> toks;
    std::vector<size_t> who;
    for (size_t s = 0; s < S; ++s)
      if (active[s]) {
        seqs.push_back({int64_t(s), int64_t(hist[s].size()) - 1, 1});
        toks.push_back(hist[s].back());
        who.push_back(s);
      }
    if (seqs.empty()) break;
    const std::vector<int64_t> next = pass(toks, seqs, who);
    for (size_t i = 0; i < who.size(); ++i) {
      const size_t s = who[i];
      const int64_t tok = next[i];
      hist[s].push_back(tok);
      ++stats_.decode_tokens;
      active[s] = emit(gen[s], s, tok, o, cb, cap - int64_t(hist[s].size()));
    }
  }
  stats_.decode_seconds = since(t0);
  return gen;
}

Generation Generator::generate_speculative(size_t seq, const std::vector<int64_t>& prompt, const GenerateOptions& o,
                                           const TokenCallback& cb) {
  const ModelConfig& c = model_.config();
  const int64_t V = c.vocab_size, D = c.hidden_size, P = int64_t(prompt.size());
  const int64_t cap = std::min<int64_t>(P + o.max_new_tokens + o.draft + 1, c.max_position_embeddings);
  auto cache_ptr = model_.make_cache(1, cap);
  StepCache& cache = *cache_ptr;
  const Sampler sampler(o.sampling);
  std::mt19937_64 rng(o.sampling.seed + 0x9e3779b97f4a7c15ull * seq);
  Generation g;
  std::vector<int64_t> hist(prompt);

  // Prefill the main model (chunked), keeping every row's hidden state for the MTP module.
  auto t0 = clk::now();
  Tensor hidden = Tensor::empty(DType::F32, {P, D});
  Tensor last_logits;
  for (int64_t s0 = 0; s0 < P; s0 += o.prefill_chunk) {
    const int64_t n = std::min(o.prefill_chunk, P - s0);
    auto st = model_.step({prompt.begin() + s0, prompt.begin() + s0 + n}, Batch::cached({{0, s0, n}}), cache);
    ++stats_.main_passes;
    std::copy_n(st.hidden.f32(), n * D, hidden.f32() + s0 * D);
    last_logits = st.logits;
  }
  stats_.prefill_tokens += P;
  int64_t tok = sampler.sample(row(last_logits, 0), V, hist, rng);
  hist.push_back(tok);
  bool live = emit(g, seq, tok, o, cb, cap - int64_t(hist.size()) - o.draft);
  stats_.prefill_seconds += since(t0);

  // The MTP module at position i reads (h_i, t_{i+1}) and predicts t_{i+2}; catch it up on the prompt.
  t0 = clk::now();
  auto mtp_over = [&](int64_t start, const Tensor& h, const std::vector<int64_t>& ahead, Tensor* h_out) {
    return model_.mtp_step(1, h, ahead, Batch::cached({{0, start, int64_t(ahead.size())}}), cache, h_out);
  };
  Tensor mtp_h, mtp_logits;
  if (live) {
    for (int64_t s0 = 0; s0 < P; s0 += o.prefill_chunk) {
      const int64_t n = std::min(o.prefill_chunk, P - s0);
      mtp_logits = mtp_over(s0, hidden.slice(0, s0, s0 + n), {hist.begin() + s0 + 1, hist.begin() + s0 + 1 + n}, &mtp_h);
    }
  }
  while (live) {
    const int64_t n = int64_t(hist.size()) - 1;  // position of the newest token, not yet in the main cache
    // Draft k tokens: the first from the MTP logits at position n-1; later ones chain the module on its own
    // output (the main model's h at the next position is not known yet).
    std::vector<int64_t> drafts;
    std::vector<std::vector<float>> q;
    Tensor dl = mtp_logits.slice(0, mtp_logits.dim(0) - 1, mtp_logits.dim(0)).contiguous();
    Tensor dh = mtp_h.slice(0, mtp_h.dim(0) - 1, mtp_h.dim(0)).contiguous();
    std::vector<int64_t> dhist = hist;
    for (int64_t j = 0; j < o.draft; ++j) {
      q.push_back(sampler.distribution(row(dl, 0), V, dhist));
      const int64_t d = Sampler::draw(q.back(), rng);
      drafts.push_back(d);
      dhist.push_back(d);
      if (j + 1 < o.draft) dl = mtp_over(n + j, dh, {d}, &dh);
    }
    // Verify: the main model runs [t_n, d_1..d_k] at positions n..n+k in one pass.
    std::vector<int64_t> toks{hist.back()};
    toks.insert(toks.end(), drafts.begin(), drafts.end());
    auto st = model_.step(toks, Batch::cached({{0, n, int64_t(toks.size())}}), cache, true);
    ++stats_.main_passes;
    stats_.drafted += o.draft;
    int64_t accepted = 0, next = -1;
    std::vector<int64_t> vhist = hist;
    for (int64_t j = 0; j < o.draft && next < 0; ++j) {
      std::vector<float> p = sampler.distribution(row(st.logits, j), V, vhist);
      const int64_t d = drafts[size_t(j)];
      const float pd = p[size_t(d)], qd = q[size_t(j)][size_t(d)];
      if (qd > 0.0f && Sampler::uniform(rng) < double(pd) / double(qd)) {  // greedy: p, q one-hot -> equality
        ++accepted;
        vhist.push_back(d);
        continue;
      }
      // Rejected: draw from the residual max(0, p - q), which restores the target distribution.
      for (size_t v = 0; v < p.size(); ++v) p[v] = std::max(0.0f, p[v] - q[size_t(j)][v]);
      next = Sampler::draw(p, rng);
    }
    if (next < 0) next = sampler.sample(row(st.logits, o.draft), V, vhist, rng);  // all accepted: bonus token
    stats_.accepted += accepted;
    std::vector<int64_t> fresh(drafts.begin(), drafts.begin() + accepted);
    fresh.push_back(next);
    for (int64_t t : fresh) {
      hist.push_back(t);
      ++stats_.decode_tokens;
      if (!(live = emit(g, seq, t, o, cb, cap - int64_t(hist.size()) - o.draft))) break;
    }
    if (!live) break;
    // Advance the MTP module over the verified positions n..n+accepted with the true hidden states.
    mtp_logits = mtp_over(n, st.hidden.slice(0, 0, accepted + 1), fresh, &mtp_h);
  }
  stats_.decode_seconds += since(t0);
  return g;
}

}  // namespace dsv3
