// dsv3 forward: logits (and MTP logits, hidden states, routing on request) for a batch of token ids.
#include <chrono>
#include <cstdio>

#include "io/safetensors.h"
#include "model/transformer.h"
#include "tools/commands.h"
#include "tools/device_opts.h"
#include "tools/input_ids.h"

namespace dsv3::cli {

namespace {
struct ForwardArgs : DeviceArgs {
  std::string model, input, output;
  bool hidden = false, routing = false;
  int mtp_depth = -1;
};

int run_forward(const ForwardArgs& a) {
  const LoadedModel model = LoadedModel::load(a.model, a);
  Tensor ids64 = read_input_ids(a.input, model.config().vocab_size);
  ForwardOptions o;
  o.hidden_states = a.hidden;
  o.routing = a.routing;
  o.mtp_depth = a.mtp_depth;
  const auto t0 = std::chrono::steady_clock::now();
  ForwardResult r = model.forward(ids64, o);
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::vector<std::pair<std::string, Tensor>> out{{"logits", r.logits}};
  for (size_t k = 0; k < r.mtp_logits.size(); ++k)
    out.emplace_back(k == 0 ? "mtp_logits" : "mtp_logits." + std::to_string(k + 1), r.mtp_logits[k]);
  if (a.hidden) {
    for (size_t i = 0; i < r.hidden_states.size(); ++i) out.emplace_back("hidden_states." + std::to_string(i), r.hidden_states[i]);
    out.emplace_back("final_hidden", r.final_hidden);
  }
  for (const auto& [layer, idx] : r.routing) out.emplace_back("routing." + std::to_string(layer) + ".experts", idx);
  io::write_safetensors(a.output, out);
  std::fprintf(stderr, "forward: %lld tokens in %.3f s (%.1f tokens/s) -> %s\n", (long long)ids64.numel(), sec,
               double(ids64.numel()) / sec, a.output.c_str());
  return 0;
}
}  // namespace

void add_forward(CLI::App& app, Command& run) {
  auto a = std::make_shared<ForwardArgs>();
  CLI::App* sub = app.add_subcommand("forward", "Logits for input_ids [B,T] read from a safetensors file");
  sub->add_option("--model", a->model, "Checkpoint folder (config.json + safetensors)")->required();
  sub->add_option("--input", a->input, "safetensors file with input_ids [B,T] (I64 or I32)")->required();
  sub->add_option("--output", a->output, "safetensors file to write: logits [B,T,V], mtp_logits [B,T-1,V]")->required();
  sub->add_flag("--hidden-states", a->hidden, "Also write hidden_states.{i} and final_hidden");
  sub->add_flag("--routing", a->routing, "Also write routing.{layer}.experts (chosen experts, sorted)");
  add_device_options(sub, *a);
  sub->add_option("--mtp-depth", a->mtp_depth, "MTP modules to run (default: all in the checkpoint; 0: none)");
  sub->callback([a, &run] { run = [a] { return run_forward(*a); }; });
}

}  // namespace dsv3::cli
