// safetensors: round trips, checkpoints (golden + sharded), atomic writes, every malformed-input error
// and a seeded mutation fuzz loop (every outcome must be success or dsv3::Error).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <set>

#include "temp_dir.h"
#include "io/safetensors.h"
#include "testutil.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;
using io::Checkpoint;
using io::SafetensorsFile;
using ::testing::HasSubstr;

// A fresh folder under the system temp dir, removed with everything in it at scope exit.
struct TempDir : test::TempDir {
  TempDir() : test::TempDir("dsv3_st") {}
};

std::string read_bytes(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
// Removes first: ext4 flushes a truncated-and-rewritten file to disk on close, which is slow.
void write_bytes(const std::string& p, const std::string& b) {
  fs::remove(p);
  std::ofstream(p, std::ios::binary) << b;
}

std::string u64le(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[size_t(i)] = char(uint8_t(v >> (8 * i)));
  return s;
}
// A raw safetensors file: length prefix, header text as given, `data` zero bytes.
std::string raw_file(const std::string& header, size_t data = 0) { return u64le(header.size()) + header + std::string(data, '\0'); }

Tensor random_tensor(DType dt, Shape shape, std::mt19937& rng) {
  Tensor t = Tensor::empty(dt, std::move(shape));
  auto* p = static_cast<uint8_t*>(t.raw());
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = dt == DType::BOOL ? uint8_t(rng() & 1) : uint8_t(rng());
  return t;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  Tensor x = a.contiguous(), y = b.contiguous();
  return x.dtype() == y.dtype() && x.shape() == y.shape() && std::memcmp(x.raw(), y.raw(), x.nbytes()) == 0;
}

// Runs f, expecting a dsv3::Error whose message contains every one of `parts`.
template <class F> void expect_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one mentioning " << *parts.begin();
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    for (const std::string& p : parts) EXPECT_THAT(msg, HasSubstr(p));
  }
}

const DType kAllDTypes[] = {DType::F32,  DType::F64, DType::F16, DType::BF16, DType::F8_E4M3, DType::F8_E5M2,
                            DType::I64,  DType::I32, DType::I16, DType::I8,   DType::U8,      DType::BOOL};

TEST(Safetensors, RoundTripAllDTypes) {
  TempDir d;
  std::mt19937 rng(1);
  std::vector<std::pair<std::string, Tensor>> ts;
  for (DType dt : kAllDTypes) ts.emplace_back(std::string("t.") + dtype_name(dt), random_tensor(dt, {3, 5}, rng));
  ts.emplace_back("odd_bf16", random_tensor(DType::BF16, {3}, rng));  // leaves the next tensor misaligned
  ts.emplace_back("after_odd", random_tensor(DType::F32, {2, 2}, rng));
  ts.emplace_back("scalar", random_tensor(DType::F32, {}, rng));
  ts.emplace_back("empty", Tensor::empty(DType::I64, {0, 4}));
  Tensor base = random_tensor(DType::F32, {4, 6}, rng);
  ts.emplace_back("transposed", base.transpose(0, 1));
  ts.emplace_back("sliced", base.slice(1, 1, 4));
  ASSERT_FALSE(ts.back().second.is_contiguous());

  const std::string p = d / "rt.safetensors";
  io::write_safetensors(p, ts, {{"format", "pt"}, {"note", "ünïcode"}});
  EXPECT_EQ(d.count(), 1u);  // no temporary left behind
  auto f = SafetensorsFile::open(p);
  EXPECT_EQ(f->metadata(), (std::map<std::string, std::string>{{"format", "pt"}, {"note", "ünïcode"}}));
  EXPECT_EQ(f->names().size(), ts.size());
  uint64_t expect_begin = 0;
  for (const auto& [name, t] : ts) {
    SCOPED_TRACE(name);
    const io::TensorInfo& info = f->info(name);
    EXPECT_EQ(info.begin, expect_begin);  // packed in the given order
    expect_begin = info.end;
    EXPECT_TRUE(same_bytes(f->get(name), t));
  }
  // Header padded to 8 bytes so the data section is aligned.
  const std::string bytes = read_bytes(p);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(bytes.size(), 8 + n + expect_begin);
  // Borrowed tensors keep the mapping alive after the file object is gone.
  Tensor kept = f->get("t.F32");
  f.reset();
  EXPECT_TRUE(same_bytes(kept, ts[0].second));
}

TEST(Safetensors, NoMetadataWritesNoMetadataKey) {
  TempDir d;
  io::write_safetensors(d / "a.safetensors", {{"x", Tensor::zeros(DType::F32, {2})}});
  EXPECT_EQ(read_bytes(d / "a.safetensors").find("__metadata__"), std::string::npos);
  EXPECT_TRUE(SafetensorsFile::open(d / "a.safetensors")->metadata().empty());
  io::write_safetensors(d / "b.safetensors", {});
  EXPECT_TRUE(SafetensorsFile::open(d / "b.safetensors")->names().empty());
}

TEST(Safetensors, ShardedCheckpointWithIndex) {
  TempDir d;
  std::mt19937 rng(2);
  Tensor a = random_tensor(DType::F8_E4M3, {4, 4}, rng), s = random_tensor(DType::F32, {1, 1}, rng);
  Tensor b = random_tensor(DType::BF16, {8}, rng);
  io::write_safetensors(d / "s1.safetensors", {{"a.weight", a}, {"a.weight_scale_inv", s}});
  io::write_safetensors(d / "s2.safetensors", {{"b.weight", b}, {"unlisted", b}});
  write_bytes(d / "model.safetensors.index.json",
              R"({"metadata": {"total_size": 100}, "weight_map": {"a.weight": "s1.safetensors",
                  "a.weight_scale_inv": "s1.safetensors", "b.weight": "s2.safetensors"}})");
  Checkpoint c = Checkpoint::open(d.path.string());
  EXPECT_EQ(c.names(), (std::vector<std::string>{"a.weight", "a.weight_scale_inv", "b.weight"}));
  EXPECT_FALSE(c.contains("unlisted"));  // the index is authoritative
  EXPECT_EQ(c.file_of("b.weight"), d / "s2.safetensors");
  EXPECT_TRUE(same_bytes(c.get("a.weight"), a));
  EXPECT_TRUE(same_bytes(c.get("a.weight_scale_inv"), s));
  EXPECT_TRUE(same_bytes(c.get("b.weight"), b));
  EXPECT_EQ(c.info("a.weight").dtype, DType::F8_E4M3);
  expect_error([&] { c.get("nope"); }, {d.path.string(), "'nope'"});
}

TEST(Safetensors, CheckpointWithoutIndexUsesEveryFile) {
  TempDir d;
  io::write_safetensors(d / "x.safetensors", {{"x", Tensor::zeros(DType::F32, {1})}});
  io::write_safetensors(d / "y.safetensors", {{"y", Tensor::zeros(DType::I32, {2})}});
  write_bytes(d / "notes.txt", "ignored");
  Checkpoint c = Checkpoint::open(d.path.string());
  EXPECT_EQ(c.names(), (std::vector<std::string>{"x", "y"}));
  EXPECT_EQ(c.file_of("y"), d / "y.safetensors");
}

TEST(Safetensors, GoldenTinyCheckpoint) {
  const std::string dir = test::golden_dir("tiny/model");
  Checkpoint c = Checkpoint::open(dir);
  ASSERT_TRUE(c.contains("model.embed_tokens.weight"));
  EXPECT_THAT(c.file_of("model.embed_tokens.weight"), HasSubstr("model.safetensors"));
  for (const std::string& n : c.names()) {
    const io::TensorInfo& i = c.info(n);
    Tensor t = c.get(n);
    EXPECT_EQ(t.shape(), i.shape);
    EXPECT_EQ(t.nbytes(), i.end - i.begin);
  }
  EXPECT_EQ(c.get("model.embed_tokens.weight").ndim(), 2);
  EXPECT_EQ(SafetensorsFile::open(dir + "/model.safetensors")->metadata().at("format"), "pt");
}

TEST(Safetensors, GoldenFp8ShardedCheckpoint) {
  Checkpoint c = Checkpoint::open(test::golden_dir("fp8/model"));
  std::set<std::string> files;
  int fp8 = 0;
  for (const std::string& n : c.names()) {
    files.insert(c.file_of(n));
    if (c.info(n).dtype != DType::F8_E4M3) continue;
    ++fp8;
    const std::string s = n + "_scale_inv";
    ASSERT_TRUE(c.contains(s)) << s;
    Tensor scale = c.get(s);
    ASSERT_EQ(scale.dtype(), DType::F32);
    for (int64_t i = 0; i < scale.numel(); ++i) EXPECT_TRUE(std::isfinite(scale.f32()[i]) && scale.f32()[i] > 0) << s;
    EXPECT_EQ(c.get(n).shape(), c.info(n).shape);
  }
  EXPECT_GT(fp8, 0);
  EXPECT_EQ(files.size(), 2u);
}

TEST(Safetensors, WriteIntoMissingFolderFailsAndLeavesNothing) {
  TempDir d;
  const std::string p = d / "missing/sub/out.safetensors";
  expect_error([&] { io::write_safetensors(p, {{"x", Tensor::zeros(DType::F32, {1})}}); }, {p});
  EXPECT_FALSE(fs::exists(d / "missing"));
  EXPECT_EQ(d.count(), 0u);
}

TEST(Safetensors, FailedWriteKeepsExistingFile) {
  TempDir d;
  const std::string p = d / "keep.safetensors";
  io::write_safetensors(p, {{"old", Tensor::zeros(DType::F32, {4})}});
  const std::string before = read_bytes(p);
  Tensor x = Tensor::zeros(DType::F32, {2});
  // Rejected before any file is touched.
  expect_error([&] { io::write_safetensors(p, {{"a", x}, {"a", x}}); }, {p, "'a'"});
  expect_error([&] { io::write_safetensors(p, {{"u", Tensor()}}); }, {p, "'u'"});
  expect_error([&] { io::write_safetensors(p, {{"__metadata__", x}}); }, {p});
  expect_error([&] { io::write_safetensors(p, {{"bad\xff", x}}); }, {p});
  // Fails in the middle of writing: a file-size limit makes write() return EFBIG.
  struct rlimit old_lim {};
  getrlimit(RLIMIT_FSIZE, &old_lim);
  auto old_sig = signal(SIGXFSZ, SIG_IGN);
  struct rlimit lim = old_lim;
  lim.rlim_cur = 4096;
  setrlimit(RLIMIT_FSIZE, &lim);
  expect_error([&] { io::write_safetensors(p, {{"big", Tensor::zeros(DType::F32, {1 << 16})}}); }, {p});
  setrlimit(RLIMIT_FSIZE, &old_lim);
  signal(SIGXFSZ, old_sig);
  // A destination that is a folder fails at the rename.
  fs::create_directory(d / "dir.safetensors");
  expect_error([&] { io::write_safetensors(d / "dir.safetensors", {{"x", x}}); }, {d / "dir.safetensors"});
  EXPECT_EQ(read_bytes(p), before);
  EXPECT_EQ(d.count(), 2u);  // keep.safetensors and the folder, no temporaries
}

TEST(Safetensors, FileLevelErrors) {
  TempDir d;
  const std::string p = d / "bad.safetensors";
  auto open_bytes = [&](const std::string& bytes) {
    write_bytes(p, bytes);
    return [&] { SafetensorsFile::open(p); };
  };
  expect_error([&] { SafetensorsFile::open(d / "missing.safetensors"); }, {d / "missing.safetensors", "cannot open"});
  expect_error([&] { SafetensorsFile::open(d.path.string()); }, {d.path.string(), "not a regular file"});
  expect_error(open_bytes(""), {p, "shorter"});
  expect_error(open_bytes("\x02\0\0"), {p, "shorter"});
  expect_error(open_bytes(u64le(100) + "{}"), {p, "header length 100"});
  expect_error(open_bytes(u64le(~0ull) + "{}"), {p, "header length"});
  expect_error(open_bytes(u64le(1ull << 40) + "{}"), {p, "header length"});
  expect_error(open_bytes(raw_file("{\"a\": ")), {p, "invalid JSON"});
  expect_error(open_bytes(raw_file("{} trailing")), {p, "invalid JSON"});
  expect_error(open_bytes(raw_file("{\"a\":\"\xff\xfe\"}")), {p, "invalid JSON"});
  expect_error(open_bytes(raw_file("[1, 2]")), {p, "JSON object"});
  expect_error(open_bytes(raw_file("\"str\"")), {p, "JSON object"});
  expect_error(open_bytes(raw_file(std::string(200, '[') + std::string(200, ']'))), {p, "deeper"});
  expect_error(open_bytes(raw_file(R"({"__metadata__": {"a": 1}})")), {p, "__metadata__", "'a'"});
  expect_error(open_bytes(raw_file(R"({"__metadata__": ["a"]})")), {p, "__metadata__"});
  expect_error(open_bytes(raw_file(R"({"__metadata__": {"a": "1", "a": "2"}})")), {p, "duplicate", "'a'"});
  // Control characters in a name are escaped so the message stays on one line (expect_error checks).
  expect_error(open_bytes(raw_file(R"({"a\nb": 5})")), {p, R"('a\nb')"});
  // A valid file with a few bytes of data opens fine (control for the table below).
  EXPECT_NO_THROW(open_bytes(raw_file(R"({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 8))());
}

TEST(Safetensors, TensorEntryErrors) {
  TempDir d;
  const std::string p = d / "model.safetensors";
  struct Case {
    std::string entry;  // the JSON value for tensor 'x.weight'
    std::string expect;
  };
  const Case cases[] = {
      {R"(5)", "must be an object"},
      {R"([])", "must be an object"},
      {R"({"shape": [2], "data_offsets": [0, 8]})", "missing 'dtype'"},
      {R"({"dtype": "F32", "data_offsets": [0, 8]})", "missing 'shape'"},
      {R"({"dtype": "F32", "shape": [2]})", "missing 'data_offsets'"},
      {R"({"dtype": 5, "shape": [2], "data_offsets": [0, 8]})", "dtype must be a string"},
      {R"({"dtype": "F33", "shape": [2], "data_offsets": [0, 8]})", "unknown dtype \"F33\""},
      {R"({"dtype": "f32", "shape": [2], "data_offsets": [0, 8]})", "unknown dtype"},
      {R"({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]})", "shape must be an array"},
      {R"({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]})", "shape must be an array of integers"},
      {R"({"dtype": "F32", "shape": [null], "data_offsets": [0, 8]})", "shape must be an array of integers"},
      {R"({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]})", "negative dimension"},
      {R"({"dtype": "F32", "shape": [18446744073709551615], "data_offsets": [0, 8]})", "dimension too large"},
      {R"({"dtype": "F32", "shape": [4611686018427387904, 4611686018427387904], "data_offsets": [0, 8]})", "too large"},
      {R"({"dtype": "F64", "shape": [2305843009213693952, 8], "data_offsets": [0, 8]})", "too large"},
      {R"({"dtype": "F32", "shape": [2], "data_offsets": [0]})", "data_offsets must be"},
      {R"({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]})", "data_offsets must be"},
      {R"({"dtype": "F32", "shape": [2], "data_offsets": ["0", 8]})", "data_offsets must be"},
      {R"({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]})", "data_offsets must be"},
      {R"({"dtype": "F32", "shape": [2], "data_offsets": {"b": 0}})", "data_offsets must be"},
      {R"({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]})", "begin > end"},
      {R"({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]})", "run past the data section (8 bytes)"},
      {R"({"dtype": "F32", "shape": [0], "data_offsets": [18446744073709551615, 18446744073709551615]})", "run past"},
      {R"({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]})", "do not match shape [3] x F32 (12 bytes)"},
      {R"({"dtype": "BF16", "shape": [2], "data_offsets": [0, 8]})", "do not match shape [2] x BF16 (4 bytes)"},
      {R"({"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "dtype": "F32"})", "duplicate key 'dtype' in 'x.weight'"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.entry);
    write_bytes(p, raw_file("{\"x.weight\": " + c.entry + "}", 8));
    expect_error([&] { SafetensorsFile::open(p); }, {p, c.expect, "'x.weight'"});
  }
}

TEST(Safetensors, OverlapAndDuplicateTensors) {
  TempDir d;
  const std::string p = d / "m.safetensors";
  write_bytes(p, raw_file(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                              "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}})", 24));
  expect_error([&] { SafetensorsFile::open(p); }, {p, "'a'", "'b'", "overlap"});
  write_bytes(p, raw_file(R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                              "b": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}})", 4));
  expect_error([&] { SafetensorsFile::open(p); }, {p, "overlap"});
  // Empty tensors occupy no bytes, so sitting inside another one is fine.
  write_bytes(p, raw_file(R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                              "e": {"dtype": "U8", "shape": [0], "data_offsets": [2, 2]}})", 4));
  EXPECT_EQ(SafetensorsFile::open(p)->get("e").numel(), 0);
  write_bytes(p, raw_file(R"({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                              "w": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}})", 2));
  expect_error([&] { SafetensorsFile::open(p); }, {p, "duplicate key 'w'"});
  write_bytes(p, raw_file(R"({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}})", 1));
  expect_error([&] { SafetensorsFile::open(p)->info("v"); }, {p, "no tensor 'v'"});
  expect_error([&] { SafetensorsFile::open(p)->get("v"); }, {p, "no tensor 'v'"});
}

TEST(Safetensors, CheckpointErrors) {
  TempDir d;
  const std::string dir = d.path.string(), index = d / "model.safetensors.index.json";
  expect_error([&] { Checkpoint::open(d / "nope"); }, {d / "nope", "does not exist"});
  expect_error([&] { Checkpoint::open(dir); }, {dir, "no *.safetensors"});
  write_bytes(d / "file", "x");
  expect_error([&] { Checkpoint::open(d / "file"); }, {d / "file"});

  io::write_safetensors(d / "s1.safetensors", {{"a", Tensor::zeros(DType::F32, {1})}});
  io::write_safetensors(d / "s2.safetensors", {{"a", Tensor::zeros(DType::F32, {1})}});
  expect_error([&] { Checkpoint::open(dir); }, {dir, "'a'", "s1.safetensors", "s2.safetensors"});
  write_bytes(d / "s2.safetensors", "junk");  // a broken shard names itself
  expect_error([&] { Checkpoint::open(dir); }, {d / "s2.safetensors"});

  const std::pair<std::string, std::vector<std::string>> bad_index[] = {
      {"{not json", {"invalid JSON"}},
      {"[]", {"weight_map"}},
      {R"({"metadata": {}})", {"weight_map"}},
      {R"({"weight_map": ["s1.safetensors"]})", {"weight_map"}},
      {R"({"weight_map": {"a": 3}})", {"'a'", "not a file name"}},
      {R"({"weight_map": {"a": "s1.safetensors", "a": "s1.safetensors"}})", {"duplicate key 'a'"}},
      {R"({"weight_map": {"a": "gone.safetensors"}})", {"'a'", "missing file", "gone.safetensors"}},
      {R"({"weight_map": {"b": "s1.safetensors"}})", {"'b'", "is not in", "s1.safetensors"}},
      {R"({"weight_map": {"a": "s2.safetensors"}})", {"s2.safetensors"}},
  };
  for (const auto& [text, parts] : bad_index) {
    SCOPED_TRACE(text);
    write_bytes(index, text);
    try {
      Checkpoint::open(dir);
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      EXPECT_THAT(e.what(), HasSubstr(dir));
      for (const std::string& part : parts) EXPECT_THAT(e.what(), HasSubstr(part));
    }
  }
  write_bytes(index, R"({"weight_map": {"a": "s1.safetensors"}})");
  EXPECT_EQ(Checkpoint::open(dir).names(), std::vector<std::string>{"a"});  // the broken unlisted shard is never opened
}

// Mutates a valid file many ways; opening and reading every byte of every tensor must either work or throw
// dsv3::Error. Run under ASan/UBSan this also shows no out-of-bounds access.
TEST(Safetensors, MutationFuzz) {
  TempDir d;
  std::mt19937 rng(1234);
  const std::string seed_path = d / "seed.safetensors", p = d / "fuzz.safetensors";
  io::write_safetensors(seed_path,
                        {{"a", random_tensor(DType::F32, {2, 3}, rng)},
                         {"b", random_tensor(DType::BF16, {5}, rng)},
                         {"c", random_tensor(DType::I64, {1, 2}, rng)},
                         {"d", random_tensor(DType::F8_E4M3, {0, 7}, rng)}},
                        {{"format", "pt"}});
  const std::string seed = read_bytes(seed_path);
  uint64_t hlen = 0;
  std::memcpy(&hlen, seed.data(), 8);
  const char kJsonChars[] = "{}[],:\"0123456789-.eE \\ux";
  int ok = 0, errors = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::string b = seed;
    switch (iter % 5) {
      case 0:  // random bytes anywhere in the header
      case 1:  // JSON-ish characters, which get further into the parser and the validation
        for (int k = 0, n = 1 + int(rng() % 4); k < n; ++k) {
          const size_t at = 8 + rng() % hlen;
          b[at] = iter % 5 == 0 ? char(rng()) : kJsonChars[rng() % (sizeof(kJsonChars) - 1)];
        }
        break;
      case 2:  // truncation
        b.resize(rng() % (b.size() + 1));
        break;
      case 3: {  // rewritten header length: near the true one, or anything
        const uint64_t n = rng() % 2 ? hlen + (rng() % 33) - 16 : (uint64_t(rng()) << 32 | rng());
        b.replace(0, 8, u64le(n));
        break;
      }
      case 4:  // a digit changed inside data_offsets / shape, then maybe truncated
        if (size_t at = b.find_first_of("0123456789", 8 + rng() % hlen); at < 8 + hlen) b[at] = char('0' + rng() % 10);
        if (rng() % 2) b.resize(b.size() - rng() % 16);
        break;
    }
    write_bytes(p, b);
    try {
      auto f = SafetensorsFile::open(p);
      uint64_t sum = 0;
      for (const std::string& n : f->names()) {
        Tensor t = f->get(n);
        const auto* q = static_cast<const uint8_t*>(t.raw());
        for (size_t i = 0; i < t.nbytes(); ++i) sum += q[i];
      }
      ok += sum != ~0ull;  // keeps the reads from being optimised away
    } catch (const Error&) {
      ++errors;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "iteration " << iter << ": non-dsv3 exception: " << e.what();
    }
  }
  EXPECT_GT(ok, 30);  // both outcomes are exercised
  EXPECT_GT(errors, 1000);
}

}  // namespace
}  // namespace dsv3
