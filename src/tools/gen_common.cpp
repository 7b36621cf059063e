#include "tools/gen_common.h"

#include <cstdio>
#include <filesystem>

namespace dsv3::cli {

void add_generation_options(CLI::App* sub, GenArgs& a, int64_t default_max_new) {
  a.max_new_tokens = default_max_new;
  sub->add_option("--model", a.model, "Checkpoint folder (config.json + safetensors)")->required();
  sub->add_option("--tokenizer", a.tokenizer, "tokenizer.json (default: the one in the model folder)");
  sub->add_option("--max-new-tokens", a.max_new_tokens, "Tokens to generate at most")->capture_default_str();
  sub->add_option("--temperature", a.sampling.temperature, "0 = greedy")->capture_default_str();
  sub->add_option("--top-k", a.sampling.top_k, "Keep the k most likely tokens (0 = off)");
  sub->add_option("--top-p", a.sampling.top_p, "Nucleus sampling mass (1 = off)");
  sub->add_option("--min-p", a.sampling.min_p, "Drop tokens below min-p × the top probability (0 = off)");
  sub->add_option("--repetition-penalty", a.sampling.repetition_penalty, "Penalise tokens already present (1 = off)");
  sub->add_option("--frequency-penalty", a.sampling.frequency_penalty, "Subtract count × this from logits (0 = off)");
  sub->add_option("--presence-penalty", a.sampling.presence_penalty, "Subtract this from logits of present tokens");
  sub->add_option("--seed", a.sampling.seed, "Random seed (the same seed gives the same text)");
  sub->add_option("--speculative", a.speculative, "Speculative decoding with the model's MTP module")
      ->check(CLI::IsMember({"mtp"}));
  sub->add_option("--draft", a.draft, "Tokens drafted per step with --speculative")->check(CLI::PositiveNumber);
  sub->add_option("--stop", a.stop, "Stop when this text appears (repeatable)");
  sub->add_flag("--ignore-eos", a.ignore_eos, "Keep going past the end-of-sentence token");
  sub->add_flag("--host-sampling", a.host_sampling,
                "With --device cuda: copy every step's logits to the host and sample there (the CPU's draws for a "
                "seed) instead of sampling on the GPU");
  add_device_options(sub, a);
}

std::optional<Tokenizer> find_tokenizer(const GenArgs& a, bool required) {
  std::string path = a.tokenizer;
  if (path.empty()) {
    path = (std::filesystem::path(a.model) / "tokenizer.json").string();
    if (!std::filesystem::exists(path)) {
      DSV3_CHECK(!required, "{}: no tokenizer.json in the model folder; pass --tokenizer PATH", a.model);
      return std::nullopt;
    }
  }
  return Tokenizer::load(path);
}

GenerateOptions generate_options(const GenArgs& a, const ModelConfig& cfg, const Tokenizer* tok) {
  GenerateOptions o;
  o.max_new_tokens = a.max_new_tokens;
  o.sampling = a.sampling;
  o.speculative = a.speculative == "mtp";
  o.draft = a.draft;
  o.device_sampling = !a.host_sampling;
  if (!a.ignore_eos) {
    if (cfg.eos_token_id) o.stop_tokens.push_back(*cfg.eos_token_id);
    if (tok && tok->eos_id() && !cfg.eos_token_id) o.stop_tokens.push_back(*tok->eos_id());
  }
  return o;
}

void report_speed(const GenerateStats& s) {
  std::fprintf(stderr, "prefill: %lld tokens, %.1f tokens/s | decode: %lld tokens, %.2f tokens/s",
               (long long)s.prefill_tokens, s.prefill_seconds > 0 ? double(s.prefill_tokens) / s.prefill_seconds : 0.0,
               (long long)s.decode_tokens, s.decode_seconds > 0 ? double(s.decode_tokens) / s.decode_seconds : 0.0);
  if (s.drafted > 0)
    std::fprintf(stderr, " | MTP drafts accepted %lld/%lld (%.1f%%)", (long long)s.accepted, (long long)s.drafted,
                 100.0 * double(s.accepted) / double(s.drafted));
  std::fprintf(stderr, "\n");
}

StopFilter::StopFilter(std::vector<std::string> stops) {
  for (auto& s : stops)
    if (!s.empty()) stops_.push_back(std::move(s));
}

std::string StopFilter::push(const std::string& text) {
  if (stopped_) return {};
  held_ += text;
  size_t cut = std::string::npos;
  for (const auto& s : stops_) {
    const size_t at = held_.find(s);
    if (at != std::string::npos) cut = std::min(cut, at);
  }
  if (cut != std::string::npos) {
    stopped_ = true;
    std::string out = held_.substr(0, cut);
    held_.clear();
    return out;
  }
  // Keep the longest suffix that is a proper prefix of some stop string; show the rest.
  size_t keep = 0;
  for (const auto& s : stops_)
    for (size_t k = std::min(s.size() - 1, held_.size()); k > keep; --k)
      if (held_.compare(held_.size() - k, k, s, 0, k) == 0) {
        keep = k;
        break;
      }
  // Never split a UTF-8 character when holding back.
  while (keep < held_.size() && (static_cast<unsigned char>(held_[held_.size() - keep]) & 0xC0) == 0x80) ++keep;
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopFilter::finish() {
  std::string out;
  out.swap(held_);
  return stopped_ ? std::string() : out;
}

}  // namespace dsv3::cli
