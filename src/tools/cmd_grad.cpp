// dsv3 grad: loss, MTP loss and the gradient of loss + λ·mtp_loss for every trainable tensor, under the
// official names — the hook for checking a trainer against another implementation.
#include <chrono>
#include <cmath>
#include <cstdio>

#include "io/safetensors.h"
#include "model/transformer.h"
#include "tools/commands.h"
#include "tools/input_ids.h"

namespace dsv3::cli {

namespace {
struct GradArgs {
  std::string model, input, output;
  float mtp_lambda = 0.3f;
};

int run_grad(const GradArgs& a) {
  DSV3_CHECK(std::isfinite(a.mtp_lambda) && a.mtp_lambda >= 0.0f, "--mtp-lambda must be >= 0, got {}", a.mtp_lambda);
  auto model = Transformer::load(a.model);
  Tensor ids = read_input_ids(a.input, model->config().vocab_size, 2);
  Grads g;
  const auto t0 = std::chrono::steady_clock::now();
  const auto losses = model->loss_and_grads(ids, a.mtp_lambda, g);
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::vector<std::pair<std::string, Tensor>> out;
  out.emplace_back("loss", Tensor::from_vector(std::vector<float>{float(losses.loss)}, {1}));
  if (model->mtp_layers() > 0) out.emplace_back("mtp_loss", Tensor::from_vector(std::vector<float>{float(losses.mtp_loss)}, {1}));
  for (const auto& [name, t] : g.all()) out.emplace_back("grad." + name, t);
  io::write_safetensors(a.output, out);
  std::fprintf(stderr, "grad: loss %.6f mtp_loss %.6f, %zu gradients, %.3f s -> %s\n", losses.loss, losses.mtp_loss,
               g.all().size(), sec, a.output.c_str());
  return 0;
}
}  // namespace

void add_grad(CLI::App& app, Command& run) {
  auto a = std::make_shared<GradArgs>();
  CLI::App* sub = app.add_subcommand("grad", "Loss and gradients of every trainable tensor for input_ids [B,T]");
  sub->add_option("--model", a->model, "Checkpoint folder (config.json + safetensors)")->required();
  sub->add_option("--input", a->input, "safetensors file with input_ids [B,T] (I64 or I32), T >= 2")->required();
  sub->add_option("--output", a->output, "safetensors file to write: loss, mtp_loss, grad.<name>")->required();
  sub->add_option("--mtp-lambda", a->mtp_lambda, "Weight λ of the MTP loss")->capture_default_str();
  sub->callback([a, &run] { run = [a] { return run_grad(*a); }; });
}

}  // namespace dsv3::cli
