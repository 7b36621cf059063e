// Training data from text files: validated UTF-8, the last part held out for validation (cut at a line
// boundary), each part tokenized as one document (no BOS) into token shards. `dsv3 data prepare` runs it.
#pragma once
#include <string>
#include <string_view>
#include <vector>

#include "train/token_shard.h"

namespace dsv3::train {

struct PrepareOptions {
  std::string tokenizer;            // tokenizer.json
  std::vector<std::string> inputs;  // UTF-8 text files, concatenated (see io::read_utf8_files)
  std::string output;               // folder, created if missing
  double val_fraction = 0.05;       // share of the text's bytes for validation, in (0, 1)
};

struct PrepareResult {
  ShardInfo train, val;
};

// Byte offset where validation starts: the first line start at or after size·(1 − val_fraction); size when
// there is none.
size_t validation_cut(std::string_view text, double val_fraction);

// Writes output/train.bin and output/val.bin (token shards) and output/val.txt (the validation text exactly,
// so that other compressors can be measured on the same bytes), each atomically. Errors: unreadable or
// non-UTF-8 input (naming file and byte offset), empty corpus, a split leaving train or validation empty.
PrepareResult prepare_data(const PrepareOptions& options);

}  // namespace dsv3::train
