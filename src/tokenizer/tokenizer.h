// The DeepSeek-V3 tokenizer: a byte-level BPE read from a Hugging Face tokenizer.json, producing the same ids
// as HF `tokenizers` for that file. Pipeline: added/special tokens are cut out of the raw text first (leftmost,
// longest match) and map straight to their ids; the rest goes through the pre-tokenizer's Split regexes (each
// splits every current piece into matches and the gaps between them, all kept), ByteLevel, then BPE merges by
// rank. Decoding maps the byte-level alphabet back to bytes; invalid UTF-8 in the result becomes U+FFFD, one
// per maximal ill-formed subsequence (as Rust's String::from_utf8_lossy, which HF uses).
//
// Supported tokenizer.json subset (anything else is a dsv3::Error naming the file): normalizer null; pre_tokenizer
// Split (Regex or String pattern, behavior Isolated, invert false), ByteLevel (add_prefix_space false) or a
// Sequence of those ending in ByteLevel; model BPE without byte_fallback, dropout or subword prefix/suffix, merges
// as "a b" strings or ["a", "b"] pairs; decoder ByteLevel. Added tokens' lstrip/rstrip/single_word flags
// are ignored (DeepSeek-V3 sets none of them).
//
// Thread safety: a loaded Tokenizer may be used from several threads at once (each thread keeps its own BPE word
// cache, bounded, for the tokenizer it used last).
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dsv3 {

class Tokenizer {
 public:
  static constexpr std::string_view kBosContent = "<｜begin▁of▁sentence｜>";
  static constexpr std::string_view kEosContent = "<｜end▁of▁sentence｜>";

  // Reads a tokenizer.json; errors (missing file, bad JSON, unsupported or inconsistent contents) name the file.
  static Tokenizer load(const std::string& path);

  // Token ids of `text`, which must be valid UTF-8: otherwise throws dsv3::Error "invalid UTF-8 at byte N",
  // N being the 0-based offset of the first byte of the first ill-formed sequence. No BOS is added.
  std::vector<int32_t> encode(std::string_view text) const;
  // Text of `ids` (always valid UTF-8, see above). An id with no token throws dsv3::Error.
  std::string decode(const std::vector<int32_t>& ids) const;

  // The token's string as stored in tokenizer.json (byte-level alphabet, e.g. "Ġworld"); throws for unknown ids.
  std::string token_text(int32_t id) const;
  // The raw bytes the token decodes to (may be part of a UTF-8 character); throws for unknown ids.
  const std::string& token_bytes(int32_t id) const;
  std::optional<int32_t> token_id(std::string_view token) const;  // added tokens first, then the BPE vocab
  int32_t vocab_size() const;                                     // max id + 1, added tokens included
  bool is_special(int32_t id) const;                              // an added token marked "special"
  std::optional<int32_t> bos_id() const { return token_id(kBosContent); }
  std::optional<int32_t> eos_id() const { return token_id(kEosContent); }

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  struct Impl;  // opaque; public only so the loader's helpers in tokenizer.cpp can name it

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Incremental decoding for generation: push ids one at a time and get the text they complete. Each returned chunk
// is valid UTF-8; bytes of a character split across tokens are held back until it is complete. The concatenation
// of all chunks and flush() equals tokenizer.decode(all ids).
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok) : tok_(&tok) {}
  std::string push(int32_t id);
  std::string flush();  // end of stream: a held-back incomplete sequence becomes U+FFFD

 private:
  const Tokenizer* tok_;
  std::string pending_;  // at most 3 bytes: the start of a possibly valid, incomplete UTF-8 sequence
};

namespace utf8 {
// Offset of the first byte of the first ill-formed sequence in s, or npos when s is valid UTF-8.
size_t find_invalid(std::string_view s);
// Appends the lossy decoding of s to out and returns how many bytes were consumed. With final=false a trailing
// incomplete (but so far valid) sequence is left unconsumed.
size_t append_lossy(std::string& out, std::string_view s, bool final);
}  // namespace utf8

}  // namespace dsv3
