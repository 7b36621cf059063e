// Training throughput: optimizer steps of a DeepSeek-V3-architecture model (default: the demo's
// configs/kjv.json, MTP depth 1, balance loss on) on random tokens, next to OpenBLAS sgemm in the same run.
// FLOPs per step = 3 × forward FLOPs (forward + backward ≈ 2× forward) of the main model plus the MTP
// modules. Usage: bench_train [config.json] [batch] [seq_len] [steps] [recompute]
// With `recompute`, MLA's norms and up-projections are recomputed in backward; the peak RSS printed at the end
// shows the memory that saves (compare two runs).
#include <cblas.h>
#include <omp.h>
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>
#include <vector>

#include "model/init.h"
#include "model/stats.h"
#include "model/transformer.h"
#include "train/optimizer.h"

using namespace dsv3;
using clk = std::chrono::steady_clock;

static double seconds_since(clk::time_point t0) { return std::chrono::duration<double>(clk::now() - t0).count(); }

static double sgemm_gflops(int n) {
  std::vector<float> a(size_t(n) * size_t(n), 0.5f), b(size_t(n) * size_t(n), 0.25f), c(size_t(n) * size_t(n));
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    auto t0 = clk::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    best = std::max(best, 2.0 * n * double(n) * n / seconds_since(t0) / 1e9);
  }
  return best;
}

int main(int argc, char** argv) {
  const std::string config = argc > 1 ? argv[1] : DSV3_SOURCE_DIR "/configs/kjv.json";
  const int64_t B = argc > 2 ? std::atoll(argv[2]) : 16, T = argc > 3 ? std::atoll(argv[3]) : 256;
  const int steps = argc > 4 ? std::atoi(argv[4]) : 6;
  const bool recompute = argc > 5 && std::string(argv[5]) == "recompute";
  const ModelConfig cfg = ModelConfig::load(config);
  const std::string dir = "/tmp/dsv3-bench-train-" + std::to_string(getpid());
  write_random_checkpoint(cfg, dir, {.seed = 1, .fp8 = false, .bias_scale = 0.0f});
  auto model = Transformer::load(dir);
  std::filesystem::remove_all(dir);
  model->make_trainable();
  std::vector<train::Param> params;
  model->visit({[&](ops::Weight& w) { params.push_back({w.name, w.w, true}); },
                [&](const std::string& n, Tensor& t) { params.push_back({n, t, t.ndim() >= 2}); },
                [](const std::string&, Tensor&) {}});
  train::AdamW opt({}, params);

  // FLOPs: the main model from stats; each MTP module as one MoE layer + eh_proj + the head.
  const ModelStats st = model_stats(cfg);
  ModelConfig one = cfg;
  one.num_hidden_layers = 1, one.first_k_dense_replace = 0;
  const ModelStats st1 = model_stats(one);
  const double head = 2.0 * double(cfg.vocab_size * cfg.hidden_size);
  const double mtp_per_token = st1.forward_flops_per_token(T) + 2.0 * 2.0 * double(cfg.hidden_size * cfg.hidden_size);
  const double fwd = st.forward_flops_per_token(T) + double(cfg.num_nextn_predict_layers) * mtp_per_token;
  const double step_flops = 3.0 * fwd * double(B * T);
  (void)head;

  std::mt19937 rng(1);
  double best = 1e30, total = 0;
  for (int s = 0; s < steps + 1; ++s) {
    Tensor ids = Tensor::empty(DType::I64, {B, T});
    for (int64_t i = 0; i < B * T; ++i) ids.data<int64_t>()[i] = int64_t(rng() % uint32_t(cfg.vocab_size));
    auto t0 = clk::now();
    Grads g;
    model->loss_and_grads(ids, {0.3f, 1e-4f, recompute}, g);
    train::clip_grad_norm(g, 1.0);
    opt.step(g, 1e-3f);
    const double sec = seconds_since(t0);
    if (s > 0) best = std::min(best, sec), total += sec;  // step 0 warms up allocations
  }
  const double peak = sgemm_gflops(2048), mean = total / steps;
  std::printf("threads %d | BLAS %s | %s | %.1fM params (%.1fM active/token) + MTP %d | batch %lld x %lld\n", omp_get_max_threads(), ops::blas_core().c_str(),
              config.c_str(), double(st.params_main + st.params_mtp) / 1e6, double(st.active_main) / 1e6,
              int(cfg.num_nextn_predict_layers), (long long)B, (long long)T);
  std::printf("train step: mean %.3f s (best %.3f s)  %.0f tokens/s  %.1f GFLOP/s | OpenBLAS sgemm 2048^3: %.1f GFLOP/s | ratio %.1f%%\n",
              mean, best, double(B * T) / mean, step_flops / mean / 1e9, peak, 100.0 * step_flops / mean / 1e9 / peak);
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  std::printf("recompute %s | peak RSS %.1f MiB\n", recompute ? "on" : "off", double(ru.ru_maxrss) / 1024.0);
  return 0;
}
