#include "train/trainer.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <fmt/format.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/atomic_dir.h"
#include "io/safetensors.h"
#include "model/init.h"
#include "model/transformer.h"
#include "train/token_shard.h"

namespace dsv3::train {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kStateFormat = "dsv3-trainer";
constexpr int kStateVersion = 1;

uint64_t splitmix(uint64_t& x) {
  uint64_t z = (x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Chunk c covers tokens [c·(T-1), c·(T-1) + T): consecutive chunks overlap by one token, so each token
// after the first is predicted exactly once per pass.
int64_t chunk_count(int64_t n_tokens, int64_t T) { return n_tokens < T ? 0 : (n_tokens - T) / (T - 1) + 1; }

Tensor chunk_batch(const TokenShard& shard, const std::vector<int64_t>& chunks, int64_t T) {
  Tensor ids = Tensor::empty(DType::I64, {int64_t(chunks.size()), T});
  for (size_t b = 0; b < chunks.size(); ++b)
    for (int64_t t = 0; t < T; ++t) ids.data<int64_t>()[int64_t(b) * T + t] = shard.data()[chunks[b] * (T - 1) + t];
  return ids;
}

std::string duration_str(double s) {
  const int64_t t = int64_t(std::llround(std::max(0.0, s)));
  char buf[32];
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%lldh%02lldm", (long long)(t / 3600), (long long)(t % 3600 / 60));
  else
    std::snprintf(buf, sizeof buf, "%lldm%02llds", (long long)(t / 60), (long long)(t % 60));
  return buf;
}

struct Eval {
  double loss = 0, bpb = 0;
  int64_t tokens = 0;
};

// Mean next-token loss of the main model over up to max_tokens of the validation shard (all of it when
// max_tokens <= 0); bits per byte scale it by the shard's tokens-per-byte.
Eval evaluate(const Transformer& model, const TokenShard& val, int64_t T, int64_t batch, int64_t max_tokens) {
  int64_t n = chunk_count(val.size(), T);
  if (max_tokens > 0) n = std::min(n, std::max<int64_t>(1, max_tokens / (T - 1)));
  double nats = 0;
  int64_t count = 0;
  ForwardOptions fo;
  fo.mtp_depth = 0;
  for (int64_t c0 = 0; c0 < n; c0 += batch) {
    std::vector<int64_t> chunks;
    for (int64_t c = c0; c < std::min(n, c0 + batch); ++c) chunks.push_back(c);
    const Tensor ids = chunk_batch(val, chunks, T);
    const ForwardResult r = model.forward(ids, fo);
    const int64_t M = ids.numel();
    std::vector<int64_t> targets(static_cast<size_t>(M));
    for (int64_t i = 0; i < M; ++i) targets[size_t(i)] = i % T + 1 < T ? ids.data<int64_t>()[i + 1] : -1;
    const int64_t counted = int64_t(chunks.size()) * (T - 1);
    nats += ops::cross_entropy(r.logits.reshape({M, -1}), targets, nullptr) * double(counted);
    count += counted;
  }
  Eval e;
  e.tokens = count;
  e.loss = nats / double(std::max<int64_t>(count, 1));
  e.bpb = e.loss / std::log(2.0) * double(val.info().n_tokens) / double(std::max<uint64_t>(val.info().n_bytes, 1));
  return e;
}

// Keeps the metrics of steps before `step` (a resumed run rewrites what came after its checkpoint).
void truncate_metrics(const fs::path& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return;
  std::string line, kept;
  while (std::getline(in, line)) {
    const json j = json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.contains("step") && j["step"].get<int64_t>() < step) kept += line + "\n";
  }
  in.close();
  std::ofstream(path, std::ios::trunc) << kept;
}

void plot_losses(const fs::path& metrics, const fs::path& png, bool quiet) {
  const fs::path dir = png.parent_path(), train_dat = dir / "loss.train.dat", val_dat = dir / "loss.val.dat",
                 script = dir / "loss.gp";
  {
    std::ifstream in(metrics);
    std::ofstream tr(train_dat), va(val_dat);
    std::string line;
    while (std::getline(in, line)) {
      const json j = json::parse(line, nullptr, false);
      if (j.is_discarded()) continue;
      if (j.contains("loss")) tr << j["step"].get<int64_t>() + 1 << " " << j["loss"].get<double>() << "\n";
      if (j.contains("val_loss")) va << j["step"].get<int64_t>() + 1 << " " << j["val_loss"].get<double>() << "\n";
    }
  }
  std::ofstream gp(script);
  gp << "set terminal pngcairo size 900,540\nset output '" << png.string() << "'\n"
     << "set title 'dsv3 training'\nset xlabel 'step'\nset ylabel 'loss (nats/token)'\nset grid\n"
     << "plot '" << train_dat.string() << "' using 1:2 with lines title 'train', '" << val_dat.string()
     << "' using 1:2 with linespoints title 'validation'\n";
  gp.close();
  if (std::system("command -v gnuplot >/dev/null 2>&1") != 0) {
    if (!quiet) std::fprintf(stderr, "train: gnuplot not found, no plot (scripts/setup.sh installs it)\n");
    return;
  }
  const std::string cmd = "gnuplot '" + script.string() + "' 2>/dev/null";
  if (std::system(cmd.c_str()) != 0 && !quiet) std::fprintf(stderr, "train: gnuplot failed, no plot\n");
  fs::remove(script), fs::remove(train_dat), fs::remove(val_dat);
}

}  // namespace

std::vector<int64_t> batch_chunks(uint64_t seed, int64_t step, int64_t batch, int64_t n_chunks) {
  DSV3_CHECK(n_chunks > 0, "no training chunks");
  std::vector<int64_t> out;
  int64_t cached_epoch = -1;
  std::vector<int64_t> perm;
  for (int64_t i = step * batch; i < (step + 1) * batch; ++i) {
    const int64_t epoch = i / n_chunks;
    if (epoch != cached_epoch) {
      perm.resize(static_cast<size_t>(n_chunks));
      for (int64_t c = 0; c < n_chunks; ++c) perm[size_t(c)] = c;
      uint64_t s = seed * 0x100000001B3ull + uint64_t(epoch);
      for (int64_t c = n_chunks - 1; c > 0; --c) std::swap(perm[size_t(c)], perm[splitmix(s) % uint64_t(c + 1)]);
      cached_epoch = epoch;
    }
    out.push_back(perm[size_t(i % n_chunks)]);
  }
  return out;
}

TrainResult train(const TrainOptions& o) {
  DSV3_CHECK(o.steps > 0 && o.batch > 0, "--steps and --batch must be positive");
  DSV3_CHECK(o.seq_len >= 3, "--seq-len must be at least 3, got {}", o.seq_len);
  DSV3_CHECK(o.eval_every > 0 && o.save_every > 0 && o.log_every > 0, "--eval-every, --save-every and --log-every must be positive");
  DSV3_CHECK(std::isfinite(o.lr) && o.lr > 0 && std::isfinite(o.min_lr) && o.min_lr >= 0, "--lr must be > 0 and --min-lr >= 0");
  DSV3_CHECK(o.decay_start >= 0 && o.decay_start <= 1, "--decay-start is a fraction of the steps, got {}", o.decay_start);
  DSV3_CHECK(o.bias_gamma >= 0 && o.balance_alpha >= 0 && o.mtp_lambda >= 0, "γ, α and λ must be >= 0");
  const fs::path out(o.out), ckpt = out / "checkpoint", metrics_path = out / "metrics.jsonl";
  const TokenShard train_shard = TokenShard::open((fs::path(o.data) / "train.bin").string());
  const TokenShard val_shard = TokenShard::open((fs::path(o.data) / "val.bin").string());
  const int64_t T = o.seq_len, n_chunks = chunk_count(train_shard.size(), T);
  DSV3_CHECK(n_chunks > 0, "{}: {} tokens, fewer than one sequence of --seq-len {}", o.data + "/train.bin",
             train_shard.size(), T);
  DSV3_CHECK(chunk_count(val_shard.size(), T) > 0, "{}: {} tokens, fewer than one sequence of --seq-len {}",
             o.data + "/val.bin", val_shard.size(), T);

  // The model: a fresh random one, or the checkpoint's.
  io::recover_dir(ckpt.string());
  int64_t start = 0;
  std::unique_ptr<Transformer> model;
  json state;
  if (o.resume) {
    const fs::path sp = ckpt / "trainer" / "state.json";
    DSV3_CHECK(fs::is_regular_file(sp), "{}: not a dsv3 training checkpoint (no trainer/state.json); cannot --resume",
               ckpt.string());
    std::ifstream in(sp);
    state = json::parse(in, nullptr, false);
    DSV3_CHECK(!state.is_discarded() && state.value("format", "") == kStateFormat && state.value("version", 0) == kStateVersion,
               "{}: not a dsv3 trainer state (format {} version {} expected)", sp.string(), kStateFormat, kStateVersion);
    for (const char* k : {"step", "seed", "batch", "seq_len"})
      DSV3_CHECK(state.contains(k) && state[k].is_number_integer(), "{}: missing integer field '{}'", sp.string(), k);
    start = state["step"].get<int64_t>();
    DSV3_CHECK(state["seed"].get<uint64_t>() == o.seed && state["batch"].get<int64_t>() == o.batch &&
                   state["seq_len"].get<int64_t>() == T,
               "{}: saved with --seed {} --batch {} --seq-len {}; resume with the same values", sp.string(),
               state["seed"].get<uint64_t>(), state["batch"].get<int64_t>(), state["seq_len"].get<int64_t>());
    model = Transformer::load(ckpt.string());
  } else {
    DSV3_CHECK(!fs::exists(ckpt), "{} exists: pass --resume to continue it, or choose another --out", ckpt.string());
    const ModelConfig cfg = ModelConfig::load(o.config);
    const fs::path tmp = fs::temp_directory_path() / ("dsv3-init-" + std::to_string(getpid()));
    InitOptions io_;
    io_.seed = o.seed;
    write_random_checkpoint(cfg, tmp.string(), io_);
    model = Transformer::load(tmp.string());
    fs::remove_all(tmp);
  }
  model->make_trainable();
  const ModelConfig& cfg = model->config();
  DSV3_CHECK(int64_t(train_shard.info().vocab_size) <= cfg.vocab_size,
             "the data's vocabulary ({} tokens) does not fit the model's vocab_size {}", train_shard.info().vocab_size,
             cfg.vocab_size);

  std::vector<Param> params;
  std::map<std::string, Tensor> biases;
  model->visit({[&](ops::Weight& w) { params.push_back({w.name, w.w, true}); },
                [&](const std::string& n, Tensor& t) { params.push_back({n, t, t.ndim() >= 2}); },
                [&](const std::string& n, Tensor& t) { biases[n] = t; }});
  AdamW opt(o.adam, params);
  if (o.resume) {
    auto st = io::SafetensorsFile::open((ckpt / "trainer" / "state.safetensors").string());
    std::map<std::string, Tensor> m;
    for (const std::string& n : st->names()) m[n] = st->get(n);
    opt.load_state(m, state.value("adam_t", int64_t(0)));
  }
  const LrSchedule sched{o.lr, o.min_lr, o.warmup, int64_t(std::llround(o.decay_start * double(o.steps))), o.steps};

  auto save = [&](int64_t next_step) {
    io::replace_dir_atomically(ckpt.string(), [&](const std::string& tmp) {
      model->write_files(tmp, DType::F32);
      if (!o.tokenizer.empty()) fs::copy_file(o.tokenizer, fs::path(tmp) / "tokenizer.json");
      fs::create_directories(fs::path(tmp) / "trainer");
      io::write_safetensors((fs::path(tmp) / "trainer" / "state.safetensors").string(), opt.state());
      json s = {{"format", kStateFormat}, {"version", kStateVersion}, {"step", next_step}, {"seed", o.seed},
                {"batch", o.batch},       {"seq_len", T},               {"adam_t", opt.steps()},
                {"epoch", next_step * o.batch / n_chunks}, {"chunk_in_epoch", next_step * o.batch % n_chunks}};
      std::ofstream f(fs::path(tmp) / "trainer" / "state.json");
      f << s.dump(2) << "\n";
      f.close();
      DSV3_CHECK(f.good(), "{}: could not write trainer state", tmp);
    });
  };

  fs::create_directories(out);
  if (o.resume)
    truncate_metrics(metrics_path, start);
  else
    std::ofstream(metrics_path, std::ios::trunc);
  std::ofstream metrics(metrics_path, std::ios::app);
  if (!o.quiet)
    std::fprintf(stderr, "train: %s step %lld of %lld, batch %lld × %lld tokens, %lld chunks/epoch, %lld trainable tensors\n",
                 o.resume ? "resuming at" : "starting at", (long long)start, (long long)o.steps, (long long)o.batch,
                 (long long)T, (long long)n_chunks, (long long)params.size());

  TrainResult res;
  double ema_step_s = 0, last_val = NAN;
  const auto t_begin = std::chrono::steady_clock::now();
  const int64_t end = o.stop_after > 0 ? std::min(o.steps, o.stop_after) : o.steps;
  for (int64_t step = start; step < end; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    const Tensor ids = chunk_batch(train_shard, batch_chunks(o.seed, step, o.batch, n_chunks), T);
    Grads g;
    const auto L = model->loss_and_grads(ids, Transformer::LossOptions{o.mtp_lambda, o.balance_alpha, o.recompute}, g);
    const double gnorm = clip_grad_norm(g, o.clip);
    if (!std::isfinite(L.loss) || !std::isfinite(L.mtp_loss) || !std::isfinite(gnorm))
      fail("step {}: the loss is {} (gradient norm {}); stopping. The last good checkpoint is {}", step + 1, L.loss, gnorm,
           fs::exists(ckpt) ? ckpt.string() : std::string("not written yet"));
    const double lr = sched.at(step);
    opt.step(g, float(lr));
    // Auxiliary-loss-free balancing (§2.3.2): b_i += γ·sign(mean load − load_i), per MoE layer.
    json maxvio = json::object();
    double maxvio_mean = 0;
    for (const auto& [layer, load] : L.expert_load) {
      double mean = 0, mx = 0;
      for (int64_t c : load) mean += double(c) / double(load.size()), mx = std::max(mx, double(c));
      const double vio = mean > 0 ? (mx - mean) / mean : 0.0;
      maxvio[std::to_string(layer)] = vio;
      maxvio_mean += vio / double(L.expert_load.size());
      const auto it = biases.find("model.layers." + std::to_string(layer) + ".mlp.gate.e_score_correction_bias");
      if (o.bias_gamma > 0 && it != biases.end())
        for (size_t e = 0; e < load.size(); ++e)
          it->second.f32()[e] += o.bias_gamma * float((mean > double(load[e])) - (mean < double(load[e])));
    }
    const double step_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ema_step_s = step == start ? step_s : 0.9 * ema_step_s + 0.1 * step_s;
    const double tok_s = double(o.batch * T) / step_s;
    json line = {{"step", step},         {"loss", L.loss}, {"mtp_loss", L.mtp_loss}, {"balance_loss", L.balance_loss},
                 {"lr", lr},             {"grad_norm", gnorm}, {"tokens_per_s", tok_s}, {"max_vio", maxvio},
                 {"max_vio_mean", maxvio_mean}};
    const bool last = step + 1 == o.steps;
    if ((step + 1) % o.eval_every == 0 || last) {
      const Eval e = evaluate(*model, val_shard, T, o.batch, last ? 0 : o.eval_tokens);
      line["val_loss"] = e.loss, line["val_bpb"] = e.bpb, last_val = e.loss;
      if (last) res.val_loss = e.loss, res.val_bpb = e.bpb;
    }
    metrics << line.dump() << "\n" << std::flush;
    if (!o.quiet && ((step + 1) % o.log_every == 0 || last || step == start)) {
      std::string val = std::isnan(last_val) ? "" : fmt::format(" | val {:.3f}", last_val);
      std::fprintf(stderr, "step %5lld/%lld | loss %.3f | mtp %.3f%s | lr %.2e | gnorm %.2f | maxvio %.2f | %.0f tok/s | ETA %s\n",
                   (long long)(step + 1), (long long)o.steps, L.loss, L.mtp_loss, val.c_str(), lr, gnorm, maxvio_mean,
                   tok_s, duration_str(ema_step_s * double(end - step - 1)).c_str());
    }
    if ((step + 1) % o.save_every == 0 || step + 1 == end) save(step + 1);
    res.train_loss = L.loss;
    res.steps = step + 1;
  }
  const double total_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_begin).count();
  res.tokens_per_s = double((res.steps - start) * o.batch * T) / std::max(total_s, 1e-9);
  metrics.close();
  if (o.plot) plot_losses(metrics_path, out / "loss.png", o.quiet);
  if (!o.quiet)
    std::fprintf(stderr, "train: done in %s, %.0f tok/s; validation loss %.4f = %.4f bits per byte; checkpoint %s\n",
                 duration_str(total_s).c_str(), res.tokens_per_s, res.val_loss, res.val_bpb, ckpt.string().c_str());
  return res;
}

}  // namespace dsv3::train
