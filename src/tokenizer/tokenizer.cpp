#include "tokenizer/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cctype>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "core/error.h"

namespace dsv3 {

// ---------------------------------------------------------------------------------------------- UTF-8 helpers

namespace utf8 {
namespace {
constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// Length of the well-formed sequence starting at s[i] (Unicode table 3-7), or 0 when ill-formed; `end` receives
// the end of the maximal subpart checked, which for a truncated sequence is s.size().
inline size_t sequence_at(std::string_view s, size_t i, size_t& end) {
  const auto c = uint8_t(s[i]);
  const size_t need = c >= 0xC2 && c <= 0xDF ? 1 : c >= 0xE0 && c <= 0xEF ? 2 : c >= 0xF0 && c <= 0xF4 ? 3 : 0;
  if (!need) return end = i + 1, 0;                               // 80..C1, F5..FF never start a character
  const uint8_t lo = c == 0xE0 ? 0xA0 : c == 0xF0 ? 0x90 : 0x80;  // range of the second byte: no overlongs,
  const uint8_t hi = c == 0xED ? 0x9F : c == 0xF4 ? 0x8F : 0xBF;  // no surrogates, nothing above U+10FFFF
  size_t j = i + 1;
  for (size_t k = 0; k < need && j < s.size(); ++k, ++j) {
    const auto d = uint8_t(s[j]);
    if (d < (k ? 0x80 : lo) || d > (k ? 0xBF : hi)) return end = j, 0;
  }
  end = j;
  return j - i == need + 1 ? need + 1 : 0;
}
}  // namespace

size_t find_invalid(std::string_view s) {
  size_t i = 0, end;
  while (i < s.size()) {
    if (uint8_t(s[i]) < 0x80) {
      ++i;
      continue;
    }
    const size_t len = sequence_at(s, i, end);
    if (!len) return i;
    i += len;
  }
  return std::string_view::npos;
}

size_t append_lossy(std::string& out, std::string_view s, bool final) {
  size_t i = 0, run = 0, end;  // [run, i): well-formed bytes not yet appended
  while (i < s.size()) {
    if (uint8_t(s[i]) < 0x80) {
      ++i;
      continue;
    }
    const size_t len = sequence_at(s, i, end);
    if (len) {
      i += len;
      continue;
    }
    out.append(s.substr(run, i - run));
    if (end == s.size() && !final) return i;  // maybe completed by bytes still to come: hold back
    out.append(kReplacement);
    run = i = end;
  }
  out.append(s.substr(run));
  return s.size();
}
}  // namespace utf8

namespace {

using json = nlohmann::json;

void append_codepoint(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += char(cp);
  } else if (cp < 0x800) {
    out += char(0xC0 | (cp >> 6)), out += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += char(0xE0 | (cp >> 12)), out += char(0x80 | ((cp >> 6) & 0x3F)), out += char(0x80 | (cp & 0x3F));
  } else {
    out += char(0xF0 | (cp >> 18)), out += char(0x80 | ((cp >> 12) & 0x3F));
    out += char(0x80 | ((cp >> 6) & 0x3F)), out += char(0x80 | (cp & 0x3F));
  }
}

// Code points of a string known to be valid UTF-8 (nlohmann::json rejects anything else).
std::vector<uint32_t> codepoints(std::string_view s) {
  std::vector<uint32_t> cps;
  for (size_t i = 0; i < s.size();) {
    const auto c = uint8_t(s[i]);
    const size_t n = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
    uint32_t cp = n == 1 ? c : n == 2 ? c & 0x1F : n == 3 ? c & 0x0F : c & 0x07;
    for (size_t k = 1; k < n && i + k < s.size(); ++k) cp = (cp << 6) | (uint8_t(s[i + k]) & 0x3F);
    cps.push_back(cp), i += n;
  }
  return cps;
}

// GPT-2's reversible byte <-> printable code point map that ByteLevel uses: printable Latin-1 bytes map to
// themselves, the other 68 to U+0100.. in byte order.
struct ByteLevelMap {
  std::array<uint32_t, 256> to_cp{};
  std::array<int16_t, 324> to_byte{};  // code point -> byte, -1 outside the alphabet
  ByteLevelMap() {
    to_byte.fill(-1);
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      to_cp[b] = printable ? uint32_t(b) : next++;
      to_byte[to_cp[b]] = int16_t(b);
    }
  }
};
const ByteLevelMap& byte_level() {
  static const ByteLevelMap m;
  return m;
}

// The ByteLevel decoder's rule for one token: map every char back to its byte; a token with any char outside
// the alphabet (e.g. "<｜User｜>") contributes its own UTF-8 bytes instead.
std::string token_to_bytes(std::string_view token) {
  std::string out;
  for (uint32_t cp : codepoints(token)) {
    if (cp >= byte_level().to_byte.size() || byte_level().to_byte[cp] < 0) return std::string(token);
    out += char(byte_level().to_byte[cp]);
  }
  return out;
}

// HF regexes are Oniguruma syntax, which PCRE2 (UTF + UCP) reads the same apart from a few classes: \s is exactly
// Unicode White_Space in Oniguruma (PCRE2 adds U+180E); \w is letters, marks, numbers and connector punctuation
// (PCRE2: letters, numbers, '_'); \h is a hex digit (PCRE2: horizontal space). Those are spelled out (negated ones
// only outside [...], where they can be written as a class). Also ^/$ are always line anchors in Oniguruma:
// PCRE2_MULTILINE, set at compile.
std::string translate_regex(std::string_view re) {
  constexpr std::string_view ws =
      "\\t-\\r\\x20\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}";
  std::string out;
  int depth = 0;  // nesting of [...] (Oniguruma allows nested classes)
  for (size_t i = 0; i < re.size(); ++i) {
    const char c = re[i];
    if (c == '\\' && i + 1 < re.size()) {
      const char e = re[++i];
      const char l = char(std::tolower(uint8_t(e)));
      const std::string_view set = l == 's' ? ws : l == 'w' ? "\\p{L}\\p{M}\\p{N}\\p{Pc}" : l == 'h' ? "0-9a-fA-F" : "";
      const bool neg = e != l;
      if (set.empty() || (depth && neg)) {
        out += c, out += e;
      } else {
        out += depth ? std::string(set) : (neg ? "[^" : "[") + std::string(set) + "]";
      }
      continue;
    }
    if (c == '[') {
      out += c;
      ++depth;
      // A ']' right after '[' or '[^' is a literal member, not the end of the class.
      if (i + 1 < re.size() && re[i + 1] == '^') out += re[++i];
      if (i + 1 < re.size() && re[i + 1] == ']') out += "\\]", ++i;
      continue;
    }
    if (c == ']' && depth) --depth;
    out += c;
  }
  return out;
}

// A literal String pattern: escape every ASCII punctuation char (PCRE treats "\<non-alnum>" as that char).
std::string quote_regex(std::string_view s) {
  std::string out;
  for (char c : s) {
    if (uint8_t(c) < 0x80 && !std::isalnum(uint8_t(c))) out += '\\';
    out += c;
  }
  return out;
}

struct CodeFree {
  void operator()(pcre2_code* c) const { pcre2_code_free(c); }
};

// Per-thread match state: match data with room for the whole match, and a JIT stack bigger than the 32 KiB
// default so long runs of one class cannot overflow it.
struct MatchScratch {
  pcre2_match_data* md = pcre2_match_data_create(1, nullptr);
  pcre2_match_context* mc = pcre2_match_context_create(nullptr);
  pcre2_jit_stack* js = pcre2_jit_stack_create(32 * 1024, 16 * 1024 * 1024, nullptr);
  MatchScratch() { pcre2_jit_stack_assign(mc, nullptr, js); }
  ~MatchScratch() {
    pcre2_jit_stack_free(js);
    pcre2_match_context_free(mc);
    pcre2_match_data_free(md);
  }
};

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof buf);
  return reinterpret_cast<const char*>(buf);
}

// Byte trie of added tokens for leftmost-longest matching.
struct Trie {
  std::unordered_map<uint64_t, int32_t> edges;  // (node << 8 | byte) -> child
  std::vector<int32_t> id{-1};                  // per node: the token ending here, or -1
  std::array<bool, 256> first{};                // bytes that can start a token
  bool empty() const { return id.size() == 1; }
  void add(std::string_view s, int32_t token) {
    if (s.empty()) return;
    first[uint8_t(s[0])] = true;
    int32_t node = 0;
    for (char c : s) {
      auto [it, fresh] = edges.try_emplace(uint64_t(node) << 8 | uint8_t(c), int32_t(id.size()));
      if (fresh) id.push_back(-1);
      node = it->second;
    }
    id[node] = token;
  }
  // Calls gap(text) for the stretches between matches and hit(id) for each match, in order.
  template <class Gap, class Hit>
  void split(std::string_view s, Gap&& gap, Hit&& hit) const {
    if (empty()) return s.empty() ? void() : gap(s);
    size_t start = 0;
    for (size_t i = 0; i < s.size();) {
      if (!first[uint8_t(s[i])]) {
        ++i;
        continue;
      }
      int32_t node = 0, best = -1;
      size_t best_len = 0;
      for (size_t j = i; j < s.size(); ++j) {
        auto it = edges.find(uint64_t(node) << 8 | uint8_t(s[j]));
        if (it == edges.end()) break;
        node = it->second;
        if (id[node] >= 0) best = id[node], best_len = j + 1 - i;
      }
      if (best < 0) {
        ++i;
        continue;
      }
      if (i > start) gap(s.substr(start, i - start));
      hit(best);
      start = i += best_len;
    }
    if (start < s.size()) gap(s.substr(start));
  }
};

struct SvHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <class V>
using StrMap = std::unordered_map<std::string, V, SvHash, std::equal_to<>>;

// word -> BPE ids, open addressing over flat arenas: a hit costs one hash and one memcmp. The table starts small
// and doubles, so the slots of a typical working set stay in cache. Each thread keeps one (see bpe_cached), so
// lookups need no lock.
class WordCache {
 public:
  static constexpr size_t kMaxWord = 128, kMaxEntries = size_t(1) << 16;
  uint64_t owner = 0;  // serial of the tokenizer whose words these are

  void clear() {
    slots_.assign(4096, Slot{});
    keys_.clear(), ids_.clear(), used_ = 0;
  }
  // Appends the cached ids of w to out; false when w is not cached.
  bool get(std::string_view w, uint64_t h, std::vector<int32_t>& out) const {
    const size_t mask = slots_.size() - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
      const Slot& s = slots_[i];
      if (!s.tag) return false;
      if (s.tag == tag(h) && s.key_len == w.size() && !std::memcmp(keys_.data() + s.key, w.data(), w.size())) {
        out.insert(out.end(), ids_.data() + s.ids, ids_.data() + s.ids + s.n_ids);
        return true;
      }
    }
  }
  void put(std::string_view w, uint64_t h, const int32_t* ids, size_t n) {
    if (used_ >= kMaxEntries) clear();  // bounds memory on endless novel text
    if (2 * (used_ + 1) > slots_.size()) grow();
    slots_[free_slot(h)] = {tag(h), uint32_t(keys_.size()), uint16_t(w.size()), uint16_t(n), uint32_t(ids_.size())};
    keys_.append(w), ids_.insert(ids_.end(), ids, ids + n), ++used_;
  }

 private:
  struct Slot {
    uint32_t tag = 0, key = 0;  // tag: high hash bits, never 0 in a used slot
    uint16_t key_len = 0, n_ids = 0;
    uint32_t ids = 0;
  };
  static uint32_t tag(uint64_t h) { return uint32_t(h >> 32) | 1; }
  size_t free_slot(uint64_t h) const {
    size_t i = h & (slots_.size() - 1);
    while (slots_[i].tag) i = (i + 1) & (slots_.size() - 1);
    return i;
  }
  void grow() {
    std::vector<Slot> old(2 * slots_.size());
    old.swap(slots_);
    for (const Slot& s : old)
      if (s.tag) slots_[free_slot(std::hash<std::string_view>{}({keys_.data() + s.key, s.key_len}))] = s;
  }
  std::vector<Slot> slots_ = std::vector<Slot>(4096);
  std::string keys_;
  std::vector<int32_t> ids_;
  size_t used_ = 0;
};

std::atomic<uint64_t> next_serial{1};

}  // namespace

// ---------------------------------------------------------------------------------------------- Tokenizer

struct Tokenizer::Impl {
  struct Merge {
    int32_t rank, id;
  };
  std::vector<std::unique_ptr<pcre2_code, CodeFree>> splits;  // pre-tokenizer regexes, applied in order
  std::vector<uint8_t> jitted;                                // per split: JIT-compiled, so pcre2_jit_match works
  StrMap<int32_t> vocab, added;                               // model vocab; added tokens (take precedence)
  std::vector<std::string> text;                              // id -> token string ("" for holes)
  std::vector<std::string> bytes;                             // id -> decoded bytes
  std::vector<uint8_t> present, special;
  std::array<int32_t, 256> byte_id{};          // initial BPE symbol of each byte, -1 if none
  std::unordered_map<uint64_t, Merge> merges;  // (left id << 32 | right id) -> merge
  bool ignore_merges = false;
  Trie raw_trie, norm_trie;  // added tokens with normalized=false / true (HF matches the former first)

  uint64_t serial = next_serial++;  // identifies this tokenizer to the per-thread word caches

  void bpe(std::string_view word, std::vector<int32_t>& out) const;
  void bpe_cached(std::string_view word, std::vector<int32_t>& out) const;
  void pretokenize(size_t level, std::string_view s, MatchScratch& ms, std::vector<int32_t>& out) const;
  void encode_plain(std::string_view s, std::vector<int32_t>& out) const;
};

// HF's Word::merge_all: repeatedly apply the lowest-rank merge (leftmost on ties) via a heap of candidates,
// skipping candidates made stale by earlier merges.
void Tokenizer::Impl::bpe(std::string_view word, std::vector<int32_t>& out) const {
  if (ignore_merges) {
    std::string bl;
    for (char c : word) append_codepoint(bl, byte_level().to_cp[uint8_t(c)]);
    if (auto it = vocab.find(bl); it != vocab.end()) return out.push_back(it->second);
  }
  struct Sym {
    int32_t id, prev, next;
    bool alive;
  };
  struct Cand {
    int32_t rank, pos, id;
    bool operator<(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }  // min-heap
  };
  thread_local std::vector<Sym> sym;
  thread_local std::vector<Cand> heap;  // binary heap via std::push_heap / pop_heap
  sym.clear();
  for (char c : word) {
    const int32_t id = byte_id[uint8_t(c)];
    if (id < 0) continue;  // no token for this byte and no unk: HF drops it
    const auto n = int32_t(sym.size());
    sym.push_back({id, n - 1, n + 1, true});
  }
  if (sym.empty()) return;
  sym.back().next = -1;
  auto find = [&](int32_t a, int32_t b) { return merges.find(uint64_t(uint32_t(a)) << 32 | uint32_t(b)); };
  heap.clear();
  auto push = [&](int32_t pos, const Merge& mg) {
    heap.push_back({mg.rank, pos, mg.id});
    std::push_heap(heap.begin(), heap.end());
  };
  for (int32_t i = 0; i + 1 < int32_t(sym.size()); ++i)
    if (auto it = find(sym[i].id, sym[i + 1].id); it != merges.end()) push(i, it->second);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end());
    const Cand top = heap.back();
    heap.pop_back();
    Sym& s = sym[top.pos];
    if (!s.alive || s.next < 0) continue;
    const Sym right = sym[s.next];
    if (auto it = find(s.id, right.id); it == merges.end() || it->second.id != top.id) continue;  // stale
    s.id = top.id;
    sym[s.next].alive = false;
    s.next = right.next;
    if (right.next >= 0) sym[right.next].prev = top.pos;
    if (s.prev >= 0)
      if (auto it = find(sym[s.prev].id, s.id); it != merges.end()) push(s.prev, it->second);
    if (s.next >= 0)
      if (auto it = find(s.id, sym[s.next].id); it != merges.end()) push(top.pos, it->second);
  }
  for (const Sym& s : sym)
    if (s.alive) out.push_back(s.id);
}

void Tokenizer::Impl::bpe_cached(std::string_view word, std::vector<int32_t>& out) const {
  if (word.size() == 1 && byte_id[uint8_t(word[0])] >= 0) return out.push_back(byte_id[uint8_t(word[0])]);
  if (word.size() > WordCache::kMaxWord) return bpe(word, out);
  // One cache per thread, serving the tokenizer it last worked for (a serial, not a pointer, so a new tokenizer
  // at a freed one's address cannot inherit its words).
  thread_local WordCache cache;
  if (cache.owner != serial) cache.clear(), cache.owner = serial;
  const uint64_t h = std::hash<std::string_view>{}(word);
  if (cache.get(word, h, out)) return;
  const size_t at = out.size();
  bpe(word, out);
  cache.put(word, h, out.data() + at, out.size() - at);
}

// Applies split `level` to s and recurses into every match and gap (empty pieces are dropped, as in HF). The
// piece alone is the subject, so lookarounds cannot see past its ends, again as in HF.
void Tokenizer::Impl::pretokenize(size_t level, std::string_view s, MatchScratch& ms, std::vector<int32_t>& out) const {
  if (level == splits.size()) return bpe_cached(s, out);
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(s.data());
  size_t prev = 0, pos = 0;
  while (pos <= s.size()) {
    // pcre2_jit_match skips pcre2_match's option checks, a noticeable share of the cost of one short match.
    const int rc = jitted[level]
                       ? pcre2_jit_match(splits[level].get(), subject, s.size(), pos, 0, ms.md, ms.mc)
                       : pcre2_match(splits[level].get(), subject, s.size(), pos, PCRE2_NO_UTF_CHECK, ms.md, ms.mc);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) fail("tokenizer: pre-tokenizer regex failed: {}", pcre2_message(rc));
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(ms.md);
    const size_t a = ov[0], b = ov[1];  // read before recursing: the nested matches reuse ms.md
    if (a > prev) pretokenize(level + 1, s.substr(prev, a - prev), ms, out);
    if (b > a) pretokenize(level + 1, s.substr(a, b - a), ms, out);
    prev = b;
    if (b > a) {
      pos = b;
    } else {  // empty match: step over one character
      if (b == s.size()) break;
      pos = b + 1;
      while (pos < s.size() && (uint8_t(s[pos]) & 0xC0) == 0x80) ++pos;
    }
  }
  if (prev < s.size()) pretokenize(level + 1, s.substr(prev), ms, out);
}

void Tokenizer::Impl::encode_plain(std::string_view s, std::vector<int32_t>& out) const {
  thread_local MatchScratch ms;
  pretokenize(0, s, ms, out);
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  const size_t bad = utf8::find_invalid(text);
  DSV3_CHECK(bad == std::string_view::npos, "invalid UTF-8 at byte {}", bad);
  std::vector<int32_t> out;
  out.reserve(text.size() / 2 + 16);  // typically enough: a later regrowth copies and faults in fresh pages
  const Impl& m = *impl_;
  auto hit = [&](int32_t id) { out.push_back(id); };
  m.raw_trie.split(
      text,
      [&](std::string_view gap) {
        m.norm_trie.split(
            gap, [&](std::string_view g) { m.encode_plain(g, out); }, hit);
      },
      hit);
  return out;
}

const std::string& Tokenizer::token_bytes(int32_t id) const {
  DSV3_CHECK(id >= 0 && id < vocab_size() && impl_->present[id], "token id {} is not in the vocabulary (size {})", id,
             vocab_size());
  return impl_->bytes[id];
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string raw, out;
  for (int32_t id : ids) raw += token_bytes(id);
  utf8::append_lossy(out, raw, true);
  return out;
}

std::string Tokenizer::token_text(int32_t id) const {
  token_bytes(id);  // range check
  return impl_->text[id];
}

std::optional<int32_t> Tokenizer::token_id(std::string_view token) const {
  if (auto it = impl_->added.find(token); it != impl_->added.end()) return it->second;
  if (auto it = impl_->vocab.find(token); it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

int32_t Tokenizer::vocab_size() const { return int32_t(impl_->text.size()); }

bool Tokenizer::is_special(int32_t id) const { return id >= 0 && id < vocab_size() && impl_->special[id]; }

std::string StreamDecoder::push(int32_t id) {
  pending_ += tok_->token_bytes(id);
  std::string out;
  pending_.erase(0, utf8::append_lossy(out, pending_, false));
  return out;
}

std::string StreamDecoder::flush() {
  std::string out;
  utf8::append_lossy(out, pending_, true);
  pending_.clear();
  return out;
}

// ---------------------------------------------------------------------------------------------- loading

namespace {

struct Loader {
  const std::string& path;
  Tokenizer::Impl& m;
  bool byte_level_seen = false;

  const json& field(const json& obj, const char* key, const char* where) const {
    DSV3_CHECK(obj.is_object() && obj.contains(key), "{}: missing {}.{}", path, where, key);
    return obj[key];
  }
  std::string str(const json& obj, const char* key, const char* where) const {
    const json& v = field(obj, key, where);
    DSV3_CHECK(v.is_string(), "{}: {}.{} must be a string", path, where, key);
    return v.get<std::string>();
  }
  bool flag(const json& obj, const char* key, bool dflt) const {
    if (!obj.contains(key) || obj[key].is_null()) return dflt;
    DSV3_CHECK(obj[key].is_boolean(), "{}: {} must be true or false", path, key);
    return obj[key].get<bool>();
  }

  void add_regex(const std::string& pattern, const std::string& shown) {
    int err = 0;
    PCRE2_SIZE off = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE, &err, &off, nullptr);
    DSV3_CHECK(code, "{}: pre_tokenizer regex '{}': {} (offset {} of translated pattern)", path, shown,
               pcre2_message(err), off);
    m.splits.emplace_back(code);
    m.jitted.push_back(pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0);  // without JIT, pcre2_match interprets
  }

  void pre_tokenizer(const json& p) {
    const std::string type = str(p, "type", "pre_tokenizer");
    if (type == "Sequence") {
      const json& seq = field(p, "pretokenizers", "pre_tokenizer");
      DSV3_CHECK(seq.is_array(), "{}: pre_tokenizer.pretokenizers must be an array", path);
      for (const json& q : seq) pre_tokenizer(q);
    } else if (type == "Split") {
      // Splits after ByteLevel would see the byte-level alphabet, which this implementation never builds.
      DSV3_CHECK(!byte_level_seen, "{}: unsupported pre_tokenizer: Split after ByteLevel", path);
      const json& pat = field(p, "pattern", "Split");
      const std::string behavior = str(p, "behavior", "Split");
      DSV3_CHECK(behavior == "Isolated", "{}: unsupported Split behavior '{}' (only Isolated)", path, behavior);
      DSV3_CHECK(!flag(p, "invert", false), "{}: unsupported Split with invert true", path);
      if (pat.contains("Regex")) {
        const std::string re = str(pat, "Regex", "Split.pattern");
        add_regex(translate_regex(re), re);
      } else {
        const std::string lit = str(pat, "String", "Split.pattern");
        add_regex(quote_regex(lit), lit);
      }
    } else if (type == "ByteLevel") {
      DSV3_CHECK(!flag(p, "add_prefix_space", true), "{}: unsupported ByteLevel add_prefix_space true", path);
      if (flag(p, "use_regex", true))  // the GPT-2 split HF's ByteLevel applies itself
        add_regex(translate_regex(R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)"),
                  "ByteLevel use_regex");
      byte_level_seen = true;
    } else {
      fail("{}: unsupported pre_tokenizer type '{}'", path, type);
    }
  }

  void set_token(int32_t id, const std::string& tok) {
    if (size_t(id) >= m.text.size()) m.text.resize(id + 1), m.present.resize(id + 1), m.special.resize(id + 1);
    m.text[id] = tok;
    m.present[id] = 1;
  }

  int32_t vocab_id(const std::string& tok, size_t rank, const std::string& a, const std::string& b) const {
    auto it = m.vocab.find(tok);
    DSV3_CHECK(it != m.vocab.end(), "{}: merge {} ('{} {}') refers to unknown token '{}'", path, rank, a, b, tok);
    return it->second;
  }

  void model(const json& mj) {
    const std::string type = str(mj, "type", "model");
    DSV3_CHECK(type == "BPE", "{}: unsupported model type '{}' (only BPE)", path, type);
    DSV3_CHECK(!mj.contains("dropout") || mj["dropout"].is_null() ||
                   (mj["dropout"].is_number() && mj["dropout"].get<double>() == 0.0),
               "{}: unsupported BPE dropout", path);
    DSV3_CHECK(!flag(mj, "byte_fallback", false), "{}: unsupported BPE byte_fallback true", path);
    for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"})
      DSV3_CHECK(!mj.contains(k) || mj[k].is_null() || mj[k] == "", "{}: unsupported BPE {}", path, k);
    m.ignore_merges = flag(mj, "ignore_merges", false);

    const json& vocab = field(mj, "vocab", "model");
    DSV3_CHECK(vocab.is_object(), "{}: model.vocab must be an object", path);
    for (const auto& [tok, v] : vocab.items()) {
      DSV3_CHECK(v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() < (int64_t(1) << 30),
                 "{}: model.vocab['{}'] must be a non-negative integer id", path, tok);
      m.vocab[tok] = v.get<int32_t>();
      set_token(v.get<int32_t>(), tok);
    }
    std::optional<int32_t> unk;
    if (mj.contains("unk_token") && !mj["unk_token"].is_null()) {
      const std::string u = str(mj, "unk_token", "model");
      auto it = m.vocab.find(u);
      DSV3_CHECK(it != m.vocab.end(), "{}: unk_token '{}' is not in the vocab", path, u);
      unk = it->second;
    }
    for (int b = 0; b < 256; ++b) {
      std::string ch;
      append_codepoint(ch, byte_level().to_cp[b]);
      auto it = m.vocab.find(ch);
      m.byte_id[b] = it != m.vocab.end() ? it->second : unk.value_or(-1);
    }

    const json& merges = field(mj, "merges", "model");
    DSV3_CHECK(merges.is_array(), "{}: model.merges must be an array", path);
    int32_t rank = 0;
    for (const json& e : merges) {
      std::string a, b;
      if (e.is_string()) {  // legacy layout "a b"
        const std::string s = e.get<std::string>();
        if (s.starts_with("#version")) continue;
        const size_t sp = s.find(' ');
        DSV3_CHECK(sp != std::string::npos && s.find(' ', sp + 1) == std::string::npos,
                   "{}: merge {} '{}' is not two tokens separated by one space", path, rank, s);
        a = s.substr(0, sp), b = s.substr(sp + 1);
      } else {
        DSV3_CHECK(e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string(),
                   "{}: merge {} is neither \"a b\" nor [\"a\", \"b\"]", path, rank);
        a = e[0].get<std::string>(), b = e[1].get<std::string>();
      }
      const int32_t ia = vocab_id(a, rank, a, b), ib = vocab_id(b, rank, a, b), ic = vocab_id(a + b, rank, a, b);
      m.merges.insert_or_assign(uint64_t(uint32_t(ia)) << 32 | uint32_t(ib), Tokenizer::Impl::Merge{rank, ic});
      ++rank;
    }
  }

  void added_tokens(const json& list) {
    DSV3_CHECK(list.is_array(), "{}: added_tokens must be an array", path);
    for (const json& t : list) {
      const std::string content = str(t, "content", "added_tokens[]");
      const json& id = field(t, "id", "added_tokens[]");
      DSV3_CHECK(id.is_number_integer() && id.get<int64_t>() >= 0 && id.get<int64_t>() < (int64_t(1) << 30),
                 "{}: added token '{}' has no valid id", path, content);
      DSV3_CHECK(!content.empty(), "{}: added token {} has empty content", path, id.get<int32_t>());
      const bool special = flag(t, "special", false);
      set_token(id.get<int32_t>(), content);
      m.special[id.get<int32_t>()] = special;
      m.added[content] = id.get<int32_t>();
      (flag(t, "normalized", !special) ? m.norm_trie : m.raw_trie).add(content, id.get<int32_t>());
    }
  }

  void load(const json& j) {
    DSV3_CHECK(j.is_object(), "{}: not a tokenizer.json object", path);
    DSV3_CHECK(!j.contains("normalizer") || j["normalizer"].is_null(), "{}: unsupported normalizer (only null)", path);
    DSV3_CHECK(j.contains("pre_tokenizer") && !j["pre_tokenizer"].is_null(), "{}: missing pre_tokenizer", path);
    pre_tokenizer(j["pre_tokenizer"]);
    DSV3_CHECK(byte_level_seen, "{}: unsupported pre_tokenizer without ByteLevel", path);
    const json& dec = field(j, "decoder", "tokenizer");
    DSV3_CHECK(dec.is_object() && dec.value("type", "") == "ByteLevel", "{}: unsupported decoder (only ByteLevel)",
               path);
    model(field(j, "model", "tokenizer"));
    if (j.contains("added_tokens") && !j["added_tokens"].is_null()) added_tokens(j["added_tokens"]);
    m.bytes.resize(m.text.size());
    for (size_t id = 0; id < m.text.size(); ++id)
      if (m.present[id]) m.bytes[id] = token_to_bytes(m.text[id]);
  }
};

}  // namespace

Tokenizer Tokenizer::load(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  DSV3_CHECK(f, "{}: cannot open tokenizer file", path);
  auto impl = std::make_unique<Impl>();
  try {
    Loader{path, *impl}.load(json::parse(f));
  } catch (const json::exception& e) {
    fail("{}: {}", path, e.what());
  }
  return Tokenizer(std::move(impl));
}

}  // namespace dsv3
