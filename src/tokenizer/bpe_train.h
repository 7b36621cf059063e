// Training a byte-level BPE tokenizer with the DeepSeek-V3 pre-tokenizer, written as a Hugging Face
// tokenizer.json that our Tokenizer (and HF `tokenizers`) loads.
//
// Ids: the 5 special tokens first (0 = <｜begin▁of▁sentence｜>, 1 = <｜end▁of▁sentence｜>, 2 = <｜▁pad▁｜>,
// 3 = <｜User｜>, 4 = <｜Assistant｜>), as in the official DeepSeek-V3 tokenizer where BOS is 0 and EOS 1; then
// the 256 byte-level characters in code point order ('!' first, as GPT-2 and HF's BpeTrainer order them);
// then one token per merge, in merge order. The specials are also in model.vocab (as in the official file), so
// HF keeps their ids whatever order it reads things in.
//
// Algorithm (the one HF's BpeTrainer uses, so the two agree on the same corpus): pre-tokenize (the three Split
// regexes, then ByteLevel), count distinct words, count adjacent symbol pairs weighted by word frequency, then
// repeatedly merge the most frequent pair (ties: the smallest (left id, right id)), updating only the words
// that contain it, with a max-heap whose stale entries are corrected when popped. A merge whose result spells
// an existing token reuses that token (the merge is still recorded), so the vocab grows by one per new string
// and ends at exactly vocab_size.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace dsv3::bpe {

inline constexpr std::array<std::string_view, 5> kSpecialTokens = {
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>", "<｜Assistant｜>"};
inline constexpr int64_t kMinVocab = 256 + int64_t(kSpecialTokens.size());

struct TrainOptions {
  int64_t vocab_size = 0;  // total, specials included; at least kMinVocab
  bool progress = false;   // merges/s on stderr
};

struct Trained {
  std::vector<std::string> vocab;                            // id -> token (byte-level alphabet; specials as is)
  std::vector<std::pair<std::string, std::string>> merges;   // in rank order, byte-level alphabet
  int64_t n_words = 0, n_distinct_words = 0;                 // pre-tokenized pieces of the corpus
};

// Trains on `text` (must be valid UTF-8). Errors: empty corpus, vocab_size below kMinVocab, invalid UTF-8,
// and a corpus too small to yield vocab_size tokens (no pair left to merge).
Trained train(std::string_view text, const TrainOptions& options);

// Pieces of `text` after the DeepSeek-V3 pre-tokenizer, as raw bytes (before ByteLevel); exposed for tests.
std::vector<std::string_view> pretokenize(std::string_view text);

// The tokenizer.json document (pretty-printed JSON text).
std::string tokenizer_json(const Trained& t);
// A tokenizer_config.json for it (LlamaTokenizerFast, bos/eos/pad, no chat template).
std::string tokenizer_config_json();

// Writes `path` (tokenizer.json) and tokenizer_config.json in the same folder, each atomically.
void save(const Trained& t, const std::string& path);

}  // namespace dsv3::bpe
