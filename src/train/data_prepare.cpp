#include "train/data_prepare.h"

#include <cmath>
#include <filesystem>

#include "core/error.h"
#include "io/text_file.h"
#include "tokenizer/tokenizer.h"

namespace dsv3::train {

size_t validation_cut(std::string_view text, double val_fraction) {
  const auto keep = size_t(std::llround(double(text.size()) * (1.0 - val_fraction)));
  const size_t target = std::min(keep, text.size());
  if (target == 0 || text[target - 1] == '\n') return target;
  const size_t nl = text.find('\n', target);
  return nl == std::string_view::npos ? text.size() : nl + 1;
}

namespace {
std::vector<uint32_t> encode(const Tokenizer& tok, std::string_view text) {
  const std::vector<int32_t> ids = tok.encode(text);
  return {ids.begin(), ids.end()};  // ids are non-negative
}
}  // namespace

PrepareResult prepare_data(const PrepareOptions& o) {
  DSV3_CHECK(o.val_fraction > 0 && o.val_fraction < 1, "--val-fraction {} must be between 0 and 1 (exclusive)",
             o.val_fraction);
  const Tokenizer tok = Tokenizer::load(o.tokenizer);  // first: a bad tokenizer fails before the long read
  const std::string text = io::read_utf8_files(o.inputs);
  DSV3_CHECK(!text.empty(), "the corpus is empty ({} input files)", o.inputs.size());
  const size_t cut = validation_cut(text, o.val_fraction);
  DSV3_CHECK(cut > 0, "the corpus ({} bytes) is too small: with --val-fraction {} the training part is empty",
             text.size(), o.val_fraction);
  DSV3_CHECK(cut < text.size(),
             "the corpus ({} bytes) is too small: with --val-fraction {} no line is left for validation "
             "(validation starts at a line boundary)",
             text.size(), o.val_fraction);
  const std::string_view train_text = std::string_view(text).substr(0, cut), val_text = std::string_view(text).substr(cut);

  const auto vocab = uint32_t(tok.vocab_size());
  const std::vector<uint32_t> train_ids = encode(tok, train_text), val_ids = encode(tok, val_text);
  const std::filesystem::path dir(o.output);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  DSV3_CHECK(std::filesystem::is_directory(dir), "{}: cannot create the output folder: {}", o.output, ec.message());
  io::write_file_atomically((dir / "val.txt").string(), val_text);
  write_token_shard((dir / "val.bin").string(), val_ids, vocab, val_text.size());
  write_token_shard((dir / "train.bin").string(), train_ids, vocab, train_text.size());
  return {{vocab, train_ids.size(), train_text.size()}, {vocab, val_ids.size(), val_text.size()}};
}

}  // namespace dsv3::train
