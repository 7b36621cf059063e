// Prefill benchmark: the CPU forward pass of a DeepSeek-V3 with realistic proportions (hidden 1024,
// 8 layers: 1 dense + 7 MoE of 64 routed experts top-6 in 4 of 8 groups + 2 shared, MLA with q LoRA 384
// and kv LoRA 256, vocab 32000; random bf16 weights) at T = 512, next to OpenBLAS sgemm measured in
// the same run. Usage: bench_forward [T] [layers] [model_dir]
#include <cblas.h>
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <vector>

#include "model/init.h"
#include "model/stats.h"
#include "model/transformer.h"

using namespace dsv3;
using clk = std::chrono::steady_clock;

static double seconds_since(clk::time_point t0) { return std::chrono::duration<double>(clk::now() - t0).count(); }

// Best-of-N sgemm rate on a square problem large enough to reach the library's peak.
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
  const int64_t T = argc > 1 ? std::atoll(argv[1]) : 512;
  const int64_t layers = argc > 2 ? std::atoll(argv[2]) : 8;
  const std::string dir = argc > 3 ? argv[3] : "/tmp/dsv3-bench-prefill-" + std::to_string(layers);

  ModelConfig cfg = ModelConfig::load(DSV3_SOURCE_DIR "/bench/configs/prefill.json");
  cfg.num_hidden_layers = layers;
  if (!std::filesystem::exists(dir + "/config.json")) {
    auto t0 = clk::now();
    write_random_checkpoint(cfg, dir, {.seed = 1, .fp8 = false, .bias_scale = 0.01f});
    std::printf("wrote random checkpoint %s in %.1f s\n", dir.c_str(), seconds_since(t0));
  }
  auto model = Transformer::load(dir);
  const ModelStats st = model_stats(model->config());

  Tensor ids = Tensor::empty(DType::I64, {1, T});
  for (int64_t t = 0; t < T; ++t) ids.data<int64_t>()[t] = (t * 7919) % cfg.vocab_size;
  ForwardOptions opts;
  opts.mtp_depth = 0;
  model->forward(ids, opts);  // warm-up: page in the mmap'd weights
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = clk::now();
    model->forward(ids, opts);
    best = std::min(best, seconds_since(t0));
  }
  const double flops = st.forward_flops_per_token(T) * double(T);
  const double gflops = flops / best / 1e9, peak = sgemm_gflops(2048);
  std::printf("threads %d | BLAS %s | model %.0fM params, %.1fM active/token | T=%lld\n", omp_get_max_threads(), ops::blas_core().c_str(),
              double(st.params_main) / 1e6, double(st.active_main) / 1e6, (long long)T);
  std::printf("forward: %.3f s  %.1f tokens/s  %.1f GFLOP/s | OpenBLAS sgemm 2048^3: %.1f GFLOP/s | ratio %.1f%%\n",
              best, double(T) / best, gflops, peak, 100.0 * gflops / peak);
  return 0;
}
