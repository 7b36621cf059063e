// dsv3 info: what a checkpoint is — architecture, parameters (total and active per token), the latent KV
// cache per token, and the dtypes stored.
#include <cstdio>
#include <filesystem>
#include <map>

#include "io/safetensors.h"
#include "model/stats.h"
#include "tools/commands.h"

namespace dsv3::cli {

namespace {
std::string human(double n) {
  const char* unit[] = {"", "K", "M", "B", "T"};
  int u = 0;
  while (n >= 1000.0 && u < 4) n /= 1000.0, ++u;
  return fmt::format("{:.{}f}{}", n, u ? 2 : 0, unit[u]);
}

int run_info(const std::string& dir) {
  const ModelConfig c = ModelConfig::load((std::filesystem::path(dir) / "config.json").string());
  const io::Checkpoint ck = io::Checkpoint::open(dir);
  const ModelStats s = model_stats(c);
  std::map<std::string, int64_t> dtypes;
  int64_t stored = 0;
  for (const auto& n : ck.names()) {
    const auto& i = ck.info(n);
    dtypes[dtype_name(i.dtype)] += 1;
    stored += int64_t(i.end - i.begin);
  }
  const int64_t dense = std::min(c.first_k_dense_replace, c.num_hidden_layers);
  fmt::print("model            {} (deepseek_v3)\n", dir);
  fmt::print("parameters       {} total = {} main + {} MTP ({} stored bytes in {} tensors)\n",
             human(double(s.params_main + s.params_mtp)), human(double(s.params_main)), human(double(s.params_mtp)),
             human(double(stored)), ck.names().size());
  fmt::print("active/token     {} ({:.1f}% of the main model)\n", human(double(s.active_main)),
             100.0 * double(s.active_main) / double(s.params_main));
  fmt::print("layers           {}: {} dense (0-{}), {} MoE; {} MTP module(s)\n", c.num_hidden_layers, dense, dense - 1,
             c.num_hidden_layers - dense, c.num_nextn_predict_layers);
  fmt::print("hidden           {}, vocab {}, context {}{}\n", c.hidden_size, c.vocab_size, c.max_position_embeddings,
             c.rope_scaling ? fmt::format(" (YaRN x{} from {})", c.rope_scaling->factor,
                                          c.rope_scaling->original_max_position_embeddings)
                            : "");
  fmt::print("attention        MLA, {} heads, q {}, kv_lora_rank {}, qk {}+{} (nope+rope), v {}\n", c.num_attention_heads,
             c.q_lora_rank ? fmt::format("LoRA {}", c.q_lora_rank) : "plain q_proj", c.kv_lora_rank, c.qk_nope_head_dim,
             c.qk_rope_head_dim, c.v_head_dim);
  fmt::print("experts          {} routed (top-{} within {} of {} groups, sigmoid, scale {}{}) + {} shared, width {}\n",
             c.n_routed_experts, c.num_experts_per_tok, c.topk_group, c.n_group, c.routed_scaling_factor,
             c.norm_topk_prob ? ", normalised" : "", c.n_shared_experts, c.moe_intermediate_size);
  fmt::print("latent KV cache  {} values/token = {} layers x ({} + {}); {} bytes/token in bf16, {} in f32\n",
             s.kv_cache_values_per_token, c.num_hidden_layers, c.kv_lora_rank, c.qk_rope_head_dim,
             s.kv_cache_values_per_token * 2, s.kv_cache_values_per_token * 4);
  std::string dt;
  for (const auto& [name, n] : dtypes) dt += fmt::format("{}{} x{}", dt.empty() ? "" : ", ", name, n);
  fmt::print("dtypes           {}{}\n", dt,
             c.quant.fp8 ? fmt::format(" (fp8 e4m3, {}x{} weight blocks)", c.quant.block_n, c.quant.block_k) : "");
  return 0;
}
}  // namespace

void add_info(CLI::App& app, Command& run) {
  auto dir = std::make_shared<std::string>();
  CLI::App* sub = app.add_subcommand("info", "Architecture summary of a checkpoint folder");
  sub->add_option("--model", *dir, "Checkpoint folder (config.json + safetensors)")->required();
  sub->callback([dir, &run] { run = [dir] { return run_info(*dir); }; });
}

}  // namespace dsv3::cli
