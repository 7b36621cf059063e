// Batch-1 decode benchmark on the CPU: tokens/s of a ~100M-parameter DeepSeek-V3 (bench/configs/decode.json,
// random bf16 weights) next to the memory-bandwidth bound (bytes of weights read per token ÷ read
// bandwidth measured in the same run), plus batched decode throughput.
// Usage: bench_decode [context] [new_tokens] [model_dir]
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <vector>

#include "infer/generator.h"
#include "model/init.h"
#include "model/stats.h"

using namespace dsv3;
using clk = std::chrono::steady_clock;

// Read bandwidth: sum a 1 GiB buffer as 64-bit integers (a reduction the compiler vectorises) with
// `threads` threads; best of 3.
static double read_bandwidth_gbs(int threads) {
  const size_t n = size_t(1) << 27;  // uint64 values
  std::vector<uint64_t> buf(n, 1);
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = clk::now();
    uint64_t total = 0;
#pragma omp parallel for reduction(+ : total) schedule(static) num_threads(threads)
    for (size_t i = 0; i < n; ++i) total += buf[i];
    const double s = std::chrono::duration<double>(clk::now() - t0).count();
    if (total != n) std::puts("bandwidth check failed");
    best = std::max(best, double(n) * 8 / s / 1e9);
  }
  return best;
}

int main(int argc, char** argv) {
  const int64_t context = argc > 1 ? std::atoll(argv[1]) : 64;
  const int64_t new_tokens = argc > 2 ? std::atoll(argv[2]) : 64;
  const std::string dir = argc > 3 ? argv[3] : "/tmp/dsv3-bench-decode";
  ModelConfig cfg = ModelConfig::load(DSV3_SOURCE_DIR "/bench/configs/decode.json");
  if (!std::filesystem::exists(dir + "/config.json")) write_random_checkpoint(cfg, dir, {.seed = 2, .fp8 = false, .bias_scale = 0.01f});
  auto model = Transformer::load(dir);
  const ModelStats st = model_stats(model->config());
  // Bytes a decode step must read: every active weight once (bf16), the embedding row aside.
  const double bytes = double(st.active_main - model->config().vocab_size * model->config().hidden_size) * 2.0;
  std::vector<int64_t> prompt(static_cast<size_t>(context));
  for (int64_t i = 0; i < context; ++i) prompt[size_t(i)] = (i * 131 + 7) % cfg.vocab_size;
  GenerateOptions o;
  o.max_new_tokens = new_tokens;
  Generator gen(*model);
  gen.generate({prompt}, o);  // warm-up
  gen.generate({prompt}, o);
  const double tps = double(gen.stats().decode_tokens) / gen.stats().decode_seconds;
  const double bw = read_bandwidth_gbs(omp_get_max_threads()), bound = bw * 1e9 / bytes;
  std::printf("threads %d | model %.1fM params (%.1fM + %.1fM MTP), %.1fM active/token = %.0f MB bf16 read per token\n",
              omp_get_max_threads(), double(st.params_main + st.params_mtp) / 1e6, double(st.params_main) / 1e6,
              double(st.params_mtp) / 1e6, double(st.active_main) / 1e6, bytes / 1e6);
  std::printf("batch-1 decode: %.1f tokens/s | read bandwidth %.1f GB/s -> bound %.1f tokens/s | %.1f%% of bound\n", tps, bw,
              bound, 100.0 * tps / bound);
  for (int batch : {8, 32}) {
    std::vector<std::vector<int64_t>> prompts(size_t(batch), prompt);
    Generator g(*model);
    g.generate(prompts, o);
    std::printf("batch-%d decode: %.1f tokens/s\n", batch, double(g.stats().decode_tokens) / g.stats().decode_seconds);
  }
  GenerateOptions so = o;
  so.speculative = true;
  Generator sg(*model);
  sg.generate({prompt}, so);
  std::printf("MTP speculative (random weights, draft 1): %.1f tokens/s, %lld/%lld drafts accepted\n",
              double(sg.stats().decode_tokens) / sg.stats().decode_seconds, (long long)sg.stats().accepted,
              (long long)sg.stats().drafted);
  return 0;
}
