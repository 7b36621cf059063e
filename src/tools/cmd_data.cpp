// dsv3 data prepare: text files -> DIR/train.bin, DIR/val.bin (token shards) and DIR/val.txt (the raw
// validation text). See train/data_prepare.h.
#include <cstdio>
#include <memory>
#include <string>

#include "train/data_prepare.h"
#include "tools/commands.h"

namespace dsv3::cli {

namespace {
void print_shard(const char* name, const train::ShardInfo& s) {
  std::printf("%s: %llu tokens, %llu bytes, %.3f bytes/token\n", name, (unsigned long long)s.n_tokens,
              (unsigned long long)s.n_bytes, s.n_tokens ? double(s.n_bytes) / double(s.n_tokens) : 0.0);
}
}  // namespace

void add_data(CLI::App& app, Command& run) {
  CLI::App* data = app.add_subcommand("data", "Training data tools (prepare)");
  data->require_subcommand(1, 1);
  auto a = std::make_shared<train::PrepareOptions>();
  CLI::App* prep = data->add_subcommand(
      "prepare", "Tokenize text files into DIR/train.bin and DIR/val.bin (the last --val-fraction, cut at a line)");
  prep->add_option("--tokenizer", a->tokenizer, "tokenizer.json")->required();
  prep->add_option("--input", a->inputs, "UTF-8 text files, concatenated")->required()->expected(1, -1);
  prep->add_option("--output", a->output, "output folder (created if missing)")->required();
  prep->add_option("--val-fraction", a->val_fraction, "share of the text held out for validation")->capture_default_str();
  prep->callback([a, &run] {
    run = [a] {
      const train::PrepareResult r = train::prepare_data(*a);
      std::printf("vocab %u\n", r.train.vocab_size);
      print_shard((a->output + "/train.bin").c_str(), r.train);
      print_shard((a->output + "/val.bin").c_str(), r.val);
      return 0;
    };
  });
}

}  // namespace dsv3::cli
