// dsv3 init: a random-weight checkpoint (config.json + model.safetensors, bf16 or the official fp8 layout)
// for tests and benchmarks. The output folder appears complete or not at all (io::replace_dir_atomically).
#include <cstdio>
#include <filesystem>

#include "core/error.h"
#include "io/atomic_dir.h"
#include "io/config.h"
#include "model/init.h"
#include "model/stats.h"
#include "tools/commands.h"

namespace dsv3::cli {

namespace {
struct InitArgs {
  std::string config, output;
  bool random = false, fp8 = false, force = false;
  uint64_t seed = 0;
  float bias_scale = 0.0f;
};

int run_init(const InitArgs& a) {
  namespace fs = std::filesystem;
  DSV3_CHECK(a.random, "only random initialisation is supported: pass --random");
  const ModelConfig cfg = ModelConfig::load(a.config);  // missing file, bad JSON or bad field -> one-line Error
  std::error_code ec;
  if (fs::exists(a.output, ec)) {
    DSV3_CHECK(fs::is_directory(a.output, ec), "{}: exists and is not a folder", a.output);
    DSV3_CHECK(a.force || fs::is_empty(a.output, ec), "{}: folder exists and is not empty (pass --force to replace it)",
               a.output);
  }
  InitOptions o;
  o.seed = a.seed;
  o.fp8 = a.fp8;
  o.bias_scale = a.bias_scale;
  io::replace_dir_atomically(a.output, [&](const std::string& tmp) { write_random_checkpoint(cfg, tmp, o); });
  const ModelStats s = model_stats(cfg);
  std::fprintf(stderr, "init: %lld parameters (%s, seed %llu) -> %s\n", (long long)(s.params_main + s.params_mtp),
               a.fp8 ? "fp8 e4m3 + bf16" : "bf16", (unsigned long long)a.seed, a.output.c_str());
  return 0;
}
}  // namespace

void add_init(CLI::App& app, Command& run) {
  auto a = std::make_shared<InitArgs>();
  CLI::App* sub = app.add_subcommand("init", "Write a random-weight checkpoint for a config (tests, benchmarks)");
  sub->add_option("--config", a->config, "config.json of the architecture (e.g. ../shared/configs/small.json)")->required();
  sub->add_flag("--random", a->random, "Random weights ~ N(0, initializer_range), norms 1 (required)")->required();
  sub->add_option("--output", a->output, "Checkpoint folder to create (config.json + model.safetensors)")->required();
  sub->add_flag("--fp8", a->fp8, "Quantize the layer linears to fp8 e4m3 with 128x128 scales, as the official release");
  sub->add_option("--seed", a->seed, "Random seed (default 0)");
  sub->add_option("--bias-scale", a->bias_scale, "e_score_correction_bias ~ U(-s, s) (default 0)")->check(CLI::NonNegativeNumber);
  sub->add_flag("--force", a->force, "Replace an existing non-empty output folder");
  sub->callback([a, &run] { run = [a] { return run_init(*a); }; });
}

}  // namespace dsv3::cli
