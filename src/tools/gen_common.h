// Pieces shared by `dsv3 generate` and `dsv3 chat`: sampling options, the tokenizer lookup, stop strings,
// and the speed report.
#pragma once
#include <CLI/CLI.hpp>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "infer/generator.h"
#include "tokenizer/tokenizer.h"
#include "tools/device_opts.h"

namespace dsv3::cli {

struct GenArgs : DeviceArgs {
  std::string model, tokenizer;
  int64_t max_new_tokens = 64;
  SamplingParams sampling;
  std::string speculative;  // "" or "mtp"
  int64_t draft = 1;
  std::vector<std::string> stop;
  bool ignore_eos = false;
  bool host_sampling = false;  // --host-sampling: sample on the host even where the model could on its device
};

void add_generation_options(CLI::App* sub, GenArgs& a, int64_t default_max_new);
// tokenizer.json from --tokenizer, else the model folder; nullopt when absent and not required.
std::optional<Tokenizer> find_tokenizer(const GenArgs& a, bool required);
GenerateOptions generate_options(const GenArgs& a, const ModelConfig& m, const Tokenizer* tok);
void report_speed(const GenerateStats& s);

// Holds back streamed text that could still become a stop string; once one appears, everything from it on
// is dropped and stopped() is true.
class StopFilter {
 public:
  explicit StopFilter(std::vector<std::string> stops);
  std::string push(const std::string& text);  // text safe to show now
  std::string finish();                       // the rest at the end of generation
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  bool stopped_ = false;
};

}  // namespace dsv3::cli
