// dsv3 tokenizer train: a byte-level BPE with the DeepSeek-V3 pre-tokenizer and special tokens, trained on
// UTF-8 text files, written as tokenizer.json (+ tokenizer_config.json beside it). See tokenizer/bpe_train.h.
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "io/text_file.h"
#include "tokenizer/bpe_train.h"
#include "tools/commands.h"

namespace dsv3::cli {

namespace {
struct TokenizerTrainArgs {
  std::vector<std::string> inputs;
  int64_t vocab_size = 0;
  std::string output;
};

int run_tokenizer_train(const TokenizerTrainArgs& a) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string text = io::read_utf8_files(a.inputs);
  const bpe::Trained t = bpe::train(text, {.vocab_size = a.vocab_size, .progress = true});
  bpe::save(t, a.output);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s: vocab %zu (%zu merges, %zu special tokens), trained on %zu bytes, %lld words (%lld distinct) in %.2f s\n",
              a.output.c_str(), t.vocab.size(), t.merges.size(), bpe::kSpecialTokens.size(), text.size(),
              (long long)t.n_words, (long long)t.n_distinct_words, s);
  return 0;
}
}  // namespace

void add_tokenizer(CLI::App& app, Command& run) {
  CLI::App* tok = app.add_subcommand("tokenizer", "Tokenizer tools (train)");
  tok->require_subcommand(1, 1);
  auto a = std::make_shared<TokenizerTrainArgs>();
  CLI::App* train = tok->add_subcommand("train", "Train a byte-level BPE tokenizer (DeepSeek-V3 pre-tokenizer) on text files");
  train->add_option("--input", a->inputs, "UTF-8 text files, concatenated")->required()->expected(1, -1);
  train->add_option("--vocab-size", a->vocab_size, "total vocabulary: 256 bytes + merges + 5 special tokens")
      ->required()
      ->check(CLI::PositiveNumber);
  train->add_option("--output", a->output, "tokenizer.json to write (tokenizer_config.json goes beside it)")->required();
  train->callback([a, &run] { run = [a] { return run_tokenizer_train(*a); }; });
}

}  // namespace dsv3::cli
