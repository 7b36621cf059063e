// End-to-end tests of the dsv3 binary's contracts (DESIGN.md, "Errors"): bad input gives exit status 1 and ONE
// line on stderr naming the file/field and the problem — never a crash, a hang or a partial output file; every
// subcommand answers --help; `dsv3 info` prints the parameter counts and latent KV cache size that we work out
// here from the checkpoint's config.json (and from its tensors) on our own.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "temp_dir.h"
#include "io/safetensors.h"
#include "model/stats.h"
#include "testutil.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// ----- running the binary -------------------------------------------------------------------------------

struct TempDir : test::TempDir {
  TempDir() : test::TempDir("dsv3_cli") {}
};

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
  ASSERT_TRUE(f.good()) << path;
}

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

struct Result {
  int status = -1;  // exit status; -1 when killed by a signal (a crash)
  std::string out, err;
};

// Runs `dsv3 ARGS...` with stdin from `stdin_text`, capturing stdout and stderr. One thread: the inputs are tiny.
Result dsv3(const std::vector<std::string>& args, const std::string& stdin_text = "") {
  const fs::path tmp = fs::temp_directory_path() / ("dsv3_cli_io_" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  const std::string in = (tmp / "stdin").string(), out = (tmp / "stdout").string(), err = (tmp / "stderr").string();
  write_file(in, stdin_text);
  std::string cmd = "timeout 60 ";
  cmd += DSV3_BIN;
  cmd += " --threads 1";
  for (const auto& a : args) cmd.append(1, ' ').append(shell_quote(a));
  cmd.append(" < ").append(shell_quote(in)).append(" > ").append(shell_quote(out)).append(" 2> ").append(shell_quote(err));
  const int st = std::system(cmd.c_str());
  Result r;
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  r.out = read_file(out);
  r.err = read_file(err);
  fs::remove_all(tmp);
  return r;
}

std::string show(const Result& r) { return "exit " + std::to_string(r.status) + ", stderr:\n" + r.err; }

// The error contract: exit 1 (124 would be `timeout`, -1 a signal), exactly one line on stderr, naming `what`.
void expect_one_line_error(const Result& r, const std::vector<std::string>& what) {
  EXPECT_EQ(r.status, 1) << show(r);
  EXPECT_FALSE(r.err.empty());
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "stderr is not one line:\n" << r.err;
  if (!r.err.empty()) {
    EXPECT_EQ(r.err.back(), '\n');
  }
  for (const auto& w : what)
    EXPECT_NE(r.err.find(w), std::string::npos) << "stderr does not mention '" << w << "':\n" << r.err;
}

std::vector<std::string> folder_listing(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  return names;
}

// ----- fixtures -----------------------------------------------------------------------------------------

std::string tiny_model() { return test::golden_dir("tiny") + "/model"; }
std::string tokenizer_path() { return test::shared_dir() + "/golden/tokenizer/tokenizer.json"; }

// A writable copy of the golden tiny checkpoint (config.json + model.safetensors) to corrupt.
std::string copy_tiny(const TempDir& t, const std::string& name = "model") {
  const std::string dir = t / name;
  fs::create_directories(dir);
  for (const char* f : {"config.json", "model.safetensors"}) {
    fs::copy_file(tiny_model() + "/" + f, dir + "/" + f);
    fs::permissions(dir + "/" + f, fs::perms::owner_write, fs::perm_options::add);
  }
  return dir;
}

void write_input(const std::string& path, const std::string& name, const Tensor& t) {
  io::write_safetensors(path, {{name, t}});
}

Tensor ids_i64(const std::vector<int64_t>& v, Shape shape) { return Tensor::from_vector(v, std::move(shape)); }

// `dsv3 forward` must fail with one line naming `what`, and leave its (otherwise empty) output folder empty:
// no output file, no temporary file beside it.
void expect_forward_fails(const TempDir& t, const std::string& model, const std::string& input,
                          const std::vector<std::string>& what) {
  const std::string out_dir = t / "out";
  fs::remove_all(out_dir);
  fs::create_directories(out_dir);
  const Result r = dsv3({"forward", "--model", model, "--input", input, "--output", out_dir + "/logits.safetensors"});
  expect_one_line_error(r, what);
  const auto left = folder_listing(out_dir);
  EXPECT_TRUE(left.empty()) << "left behind in the output folder: " << left.front();
}

// ----- --help -------------------------------------------------------------------------------------------

// The subcommands `dsv3 --help` lists (CLI11: a "Subcommands:" section, one "  name  description" per line).
std::vector<std::string> listed_subcommands(const std::string& help) {
  std::vector<std::string> subs;
  std::istringstream in(help);
  std::string line;
  bool in_section = false;
  while (std::getline(in, line)) {
    if (line.rfind("Subcommands:", 0) == 0 || line.rfind("SUBCOMMANDS:", 0) == 0) {
      in_section = true;
      continue;
    }
    if (!in_section) continue;
    if (line.empty() || line[0] != ' ') break;
    std::istringstream words(line);
    std::string name;
    words >> name;
    if (!name.empty()) subs.push_back(name);
  }
  return subs;
}

TEST(Cli, HelpForEverySubcommand) {
  const Result top = dsv3({"--help"});
  ASSERT_EQ(top.status, 0) << show(top);
  const auto subs = listed_subcommands(top.out);
  const std::set<std::string> listed(subs.begin(), subs.end());
  for (const char* must : {"forward", "grad", "info", "compare", "generate", "chat", "tokenize"})
    EXPECT_TRUE(listed.count(must)) << "dsv3 --help does not list '" << must << "':\n" << top.out;
  for (const auto& s : subs) {
    const Result r = dsv3({s, "--help"});
    EXPECT_EQ(r.status, 0) << s << " --help: " << show(r);
    EXPECT_NE(r.out.find("Usage:"), std::string::npos) << s << " --help:\n" << r.out;
    EXPECT_NE(r.out.find(s), std::string::npos) << s << " --help:\n" << r.out;
  }
  // No subcommand, or an unknown one: an error, not a crash.
  for (const std::vector<std::string>& args : {std::vector<std::string>{}, std::vector<std::string>{"frobnicate"}}) {
    const Result r = dsv3(args);
    EXPECT_GT(r.status, 0) << show(r);
    EXPECT_FALSE(r.err.empty());
  }
}

// ----- forward --------------------------------------------------------------------------------------------

// The control: the same command line with good inputs succeeds and matches the golden logits, so the failures
// below are the inputs' doing.
TEST(Cli, ForwardSucceedsOnGoodInput) {
  TempDir t;
  auto golden = io::SafetensorsFile::open(test::golden_dir("tiny") + "/golden.safetensors");
  write_input(t / "in.safetensors", "input_ids", golden->get("input_ids"));
  fs::create_directories(t / "out");
  const std::string out = t / "out/logits.safetensors";
  const Result r = dsv3({"forward", "--model", tiny_model(), "--input", t / "in.safetensors", "--output", out});
  ASSERT_EQ(r.status, 0) << show(r);
  EXPECT_EQ(folder_listing(t / "out"), std::vector<std::string>{"logits.safetensors"});
  auto got = io::SafetensorsFile::open(out);
  EXPECT_LT(test::rel_l2(got->get("logits"), golden->get("logits")), 1e-5);
  EXPECT_LT(test::rel_l2(got->get("mtp_logits"), golden->get("mtp_logits")), 1e-5);
}

TEST(Cli, ForwardRejectsBadModels) {
  TempDir t;
  const std::string in = t / "in.safetensors";
  write_input(in, "input_ids", ids_i64({1, 2, 3, 4}, {1, 4}));

  // A model folder that does not exist.
  expect_forward_fails(t, t / "no_such_model", in, {"no_such_model"});

  // config.json that is not JSON.
  {
    const std::string m = copy_tiny(t, "bad_json");
    write_file(m + "/config.json", "{\"model_type\": \"deepseek_v3\", \"hidden_size\": 64,");
    expect_forward_fails(t, m, in, {"config.json", "JSON"});
  }
  // config.json that parses but fails validation: 16 routed experts do not split into 3 groups.
  {
    const std::string m = copy_tiny(t, "bad_groups");
    json c = json::parse(read_file(m + "/config.json"));
    c["n_group"] = 3;
    c["topk_group"] = 1;
    write_file(m + "/config.json", c.dump(2));
    expect_forward_fails(t, m, in, {"config.json", "n_group"});
  }
  // A field of the wrong type.
  {
    const std::string m = copy_tiny(t, "bad_type");
    json c = json::parse(read_file(m + "/config.json"));
    c["num_attention_heads"] = "four";
    write_file(m + "/config.json", c.dump(2));
    expect_forward_fails(t, m, in, {"config.json", "num_attention_heads"});
  }
  // A config that disagrees with the weights (hidden size): the loader names a tensor and its shape.
  {
    const std::string m = copy_tiny(t, "bad_shape");
    json c = json::parse(read_file(m + "/config.json"));
    c["intermediate_size"] = 128;
    write_file(m + "/config.json", c.dump(2));
    expect_forward_fails(t, m, in, {"model.layers.0.mlp"});
  }
  // model.safetensors cut short: its header promises more bytes than the file has.
  {
    const std::string m = copy_tiny(t, "truncated");
    const auto size = fs::file_size(m + "/model.safetensors");
    fs::resize_file(m + "/model.safetensors", size / 2);
    expect_forward_fails(t, m, in, {"model.safetensors"});
    fs::resize_file(m + "/model.safetensors", 5);  // not even the 8-byte header length
    expect_forward_fails(t, m, in, {"model.safetensors"});
  }
  // A sharded fp8 checkpoint whose second shard is cut short.
  {
    const std::string m = t / "fp8_truncated";
    fs::create_directories(m);
    for (const auto& e : fs::directory_iterator(test::golden_dir("fp8") + "/model")) {
      fs::copy_file(e.path(), m + "/" + e.path().filename().string());
      fs::permissions(m + "/" + e.path().filename().string(), fs::perms::owner_write, fs::perm_options::add);
    }
    const std::string shard = m + "/model-00002-of-00002.safetensors";
    fs::resize_file(shard, fs::file_size(shard) - 1000);
    expect_forward_fails(t, m, in, {"model-00002-of-00002.safetensors"});
  }
  // A folder with a config but no weights.
  {
    const std::string m = copy_tiny(t, "no_weights");
    fs::remove(m + "/model.safetensors");
    expect_forward_fails(t, m, in, {"no_weights"});
  }
}

TEST(Cli, ForwardRejectsBadInputIds) {
  TempDir t;
  const std::string model = tiny_model();  // vocab 512
  const std::string in = t / "in.safetensors";

  write_input(in, "tokens", ids_i64({1, 2, 3, 4}, {1, 4}));
  expect_forward_fails(t, model, in, {"in.safetensors", "input_ids"});

  write_input(in, "input_ids", ids_i64({1, 2, 3, 4}, {4}));  // rank 1
  expect_forward_fails(t, model, in, {"in.safetensors", "input_ids", "[4]"});

  write_input(in, "input_ids", ids_i64({1, 2, 3, 4}, {1, 2, 2}));  // rank 3
  expect_forward_fails(t, model, in, {"in.safetensors", "input_ids"});

  write_input(in, "input_ids", ids_i64({}, {1, 0}));  // no tokens
  expect_forward_fails(t, model, in, {"in.safetensors", "input_ids"});

  write_input(in, "input_ids", Tensor::from_vector(std::vector<float>{1, 2, 3, 4}, {1, 4}));  // float ids
  expect_forward_fails(t, model, in, {"in.safetensors", "input_ids", "F32"});

  write_input(in, "input_ids", ids_i64({1, 2, 3, 4, 5, 512}, {2, 3}));  // = vocab_size, at [1, 2]
  expect_forward_fails(t, model, in, {"in.safetensors", "512", "[1,2]", "out of range"});

  write_input(in, "input_ids", ids_i64({1, -1, 3, 4}, {1, 4}));
  expect_forward_fails(t, model, in, {"in.safetensors", "-1", "out of range"});

  write_input(in, "input_ids", Tensor::from_vector(std::vector<int32_t>{7, 1 << 20}, {1, 2}));  // I32, too big
  expect_forward_fails(t, model, in, {"in.safetensors", "1048576", "out of range"});

  expect_forward_fails(t, model, t / "missing.safetensors", {"missing.safetensors"});

  // Good input, an output path that cannot be written.
  write_input(in, "input_ids", ids_i64({1, 2, 3, 4}, {1, 4}));
  expect_one_line_error(
      dsv3({"forward", "--model", model, "--input", in, "--output", t / "no_such_folder/logits.safetensors"}),
      {"no_such_folder/logits.safetensors"});
  fs::create_directories(t / "out2/a_folder");  // the output path is a folder: the rename into place fails
  expect_one_line_error(dsv3({"forward", "--model", model, "--input", in, "--output", t / "out2/a_folder"}), {"a_folder"});
  EXPECT_EQ(folder_listing(t / "out2"), std::vector<std::string>{"a_folder"});  // its temporary file is gone
  EXPECT_TRUE(folder_listing(t / "out2/a_folder").empty());

  write_file(in, "this is not a safetensors file");
  expect_forward_fails(t, model, in, {"in.safetensors"});
}

// ----- generate -------------------------------------------------------------------------------------------

TEST(Cli, GenerateRejectsBadRequests) {
  TempDir t;
  const std::string model = tiny_model();  // vocab 512, context 512, no tokenizer.json in the folder
  auto gen = [&](std::vector<std::string> extra) {
    std::vector<std::string> args{"generate", "--model", model};
    args.insert(args.end(), extra.begin(), extra.end());
    return dsv3(args);
  };

  // The control: a good request generates the number of tokens asked for (ids are printed: no tokenizer).
  {
    const Result r = gen({"--prompt-ids", "5,6,7", "--max-new-tokens", "3", "--ignore-eos"});
    ASSERT_EQ(r.status, 0) << show(r);
    std::string last = r.out;
    while (!last.empty() && last.back() == '\n') last.pop_back();
    last = last.substr(last.rfind('\n') == std::string::npos ? 0 : last.rfind('\n') + 1);
    EXPECT_EQ(std::count(last.begin(), last.end(), ','), 2) << r.out;
    // --host-sampling is accepted everywhere (on the CPU the sampler is the host's anyway): the same text.
    const Result h = gen({"--prompt-ids", "5,6,7", "--max-new-tokens", "3", "--ignore-eos", "--host-sampling"});
    ASSERT_EQ(h.status, 0) << show(h);
    EXPECT_EQ(h.out, r.out);
  }

  expect_one_line_error(gen({"--prompt-ids", "1,2,3", "--max-new-tokens", "0"}), {"--max-new-tokens", "0"});
  expect_one_line_error(gen({"--prompt-ids", "1,2,3", "--max-new-tokens", "-5"}), {"--max-new-tokens", "-5"});

  // A prompt as long as the context (512 tokens) leaves no room to generate.
  std::string long_prompt;
  for (int i = 0; i < 512; ++i) long_prompt.append(i ? "," : "").append(std::to_string(2 + i % 300));
  expect_one_line_error(gen({"--prompt-ids", long_prompt, "--max-new-tokens", "1"}), {"512", "context"});

  expect_one_line_error(gen({"--prompt-ids", "1,2,512"}), {"512", "out of range"});
  expect_one_line_error(gen({"--prompt-ids", "-3,2"}), {"-3", "out of range"});
  expect_one_line_error(gen({"--prompt-ids", "1,two,3"}), {"two", "not an integer"});
  expect_one_line_error(gen({"--prompt-ids", "1,2", "--prompt", "hi"}), {"exactly one"});

  // Text prompts need a tokenizer: none in the model folder, a missing file, a malformed one.
  expect_one_line_error(gen({"--prompt", "hello"}), {"tokenizer.json"});
  expect_one_line_error(gen({"--prompt", "hello", "--tokenizer", t / "nope.json"}), {"nope.json"});
  write_file(t / "broken.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": ");
  expect_one_line_error(gen({"--prompt", "hello", "--tokenizer", t / "broken.json"}), {"broken.json"});
  write_file(t / "empty.json", "{}");
  expect_one_line_error(gen({"--prompt", "hello", "--tokenizer", t / "empty.json"}), {"empty.json"});
  write_file(t / "array.json", "[1, 2, 3]");
  expect_one_line_error(gen({"--prompt", "hello", "--tokenizer", t / "array.json"}), {"array.json"});
  // A prompt that is not UTF-8.
  expect_one_line_error(gen({"--prompt", "caf\xC3", "--tokenizer", tokenizer_path()}), {"UTF-8"});
}

// --device cuda where no GPU is visible (CI, or CUDA_VISIBLE_DEVICES empty), or in a build without CUDA: one
// line naming the cause, no output file.
TEST(Cli, DeviceCudaWithoutGpuIsAClearError) {
  TempDir t;
  auto golden = io::SafetensorsFile::open(test::golden_dir("tiny") + "/golden.safetensors");
  write_input(t / "in.safetensors", "input_ids", golden->get("input_ids"));
  ::setenv("CUDA_VISIBLE_DEVICES", "", 1);
  const Result fwd = dsv3({"forward", "--model", tiny_model(), "--input", t / "in.safetensors", "--output",
                           t / "out.safetensors", "--device", "cuda"});
  const Result gen = dsv3({"generate", "--model", tiny_model(), "--prompt-ids", "1,2", "--device", "cuda", "--dtype", "fp32"});
  const Result bad = dsv3({"generate", "--model", tiny_model(), "--prompt-ids", "1,2", "--device", "tpu"});
  const Result bad8 = dsv3({"generate", "--model", tiny_model(), "--prompt-ids", "1,2", "--device", "cuda", "--fp8-dense", "int4"});
  const Result gen8 = dsv3({"generate", "--model", tiny_model(), "--prompt-ids", "1,2", "--device", "cuda", "--fp8-dense", "fp8"});
  ::unsetenv("CUDA_VISIBLE_DEVICES");
  expect_one_line_error(fwd, {"no CUDA GPU available"});
  EXPECT_FALSE(fs::exists(t / "out.safetensors"));
  expect_one_line_error(gen, {"no CUDA GPU available"});
  EXPECT_GT(bad.status, 0) << show(bad);
  EXPECT_NE(bad.err.find("tpu"), std::string::npos) << bad.err;
  EXPECT_GT(bad8.status, 0) << show(bad8);
  EXPECT_NE(bad8.err.find("fp8-dense"), std::string::npos) << bad8.err;
  expect_one_line_error(gen8, {"no CUDA GPU available"});
}

// ----- tokenize -------------------------------------------------------------------------------------------

TEST(Cli, TokenizeRejectsMalformedLines) {
  const std::vector<std::string> enc{"tokenize", "--tokenizer", tokenizer_path()};
  std::vector<std::string> dec = enc;
  dec.push_back("--decode");

  const Result ok = dsv3(enc, "{\"text\": \"hello\"}\n");
  ASSERT_EQ(ok.status, 0) << show(ok);
  EXPECT_TRUE(json::parse(ok.out)["ids"].is_array()) << ok.out;

  expect_one_line_error(dsv3(enc, "{\"text\": \"ok\"}\n{\"text\": \"unterminated\n"), {"line 2", "JSON"});
  expect_one_line_error(dsv3(enc, "[\"text\", \"x\"]\n"), {"line 1"});
  expect_one_line_error(dsv3(enc, "{\"ids\": [1]}\n"), {"line 1"});
  // Invalid UTF-8: a lone continuation byte, a truncated sequence, an overlong encoding, an encoded surrogate
  // and a code point past U+10FFFF.
  for (const std::string bad : {"a\x80z", "caf\xC3", "\xC0\xAF", "\xED\xA0\x80", "\xF4\x90\x80\x80"}) {
    const Result r = dsv3(enc, "{\"text\": \"fine\"}\n{\"text\": \"" + bad + "\"}\n");
    expect_one_line_error(r, {"line 2", "UTF-8"});
    // The good first line was answered before the bad one stopped the run.
    EXPECT_EQ(std::count(r.out.begin(), r.out.end(), '\n'), 1) << r.out;
  }
  expect_one_line_error(dsv3(enc, "{\"text\": \"\\udc80\"}\n"), {"line 1"});  // escaped lone low surrogate

  expect_one_line_error(dsv3(dec, "{\"ids\": [1, \"x\"]}\n"), {"line 1"});
  expect_one_line_error(dsv3(dec, "{\"ids\": [1, 1.5]}\n"), {"line 1"});
  expect_one_line_error(dsv3(dec, "{\"ids\": [99999999999]}\n"), {"line 1"});
  expect_one_line_error(dsv3(dec, "{\"ids\": [5, 8000]}\n"), {"line 1", "8000"});  // the vocabulary is 8,000
  expect_one_line_error(dsv3(dec, "{\"ids\": [-1]}\n"), {"line 1", "-1"});
  expect_one_line_error(dsv3(dec, "{\"text\": \"x\"}\n"), {"line 1"});

  expect_one_line_error(dsv3({"tokenize", "--tokenizer", "/nonexistent/tokenizer.json"}, "{\"text\": \"x\"}\n"),
                        {"/nonexistent/tokenizer.json"});
}

// ----- info -----------------------------------------------------------------------------------------------

// `dsv3 info` rounds to three significant figures with a K/M/B/T suffix.
std::string human(double n) {
  const char* unit[] = {"", "K", "M", "B", "T"};
  int u = 0;
  while (n >= 1000.0 && u < 4) n /= 1000.0, ++u;
  char buf[64];
  std::snprintf(buf, sizeof buf, u ? "%.2f%s" : "%.0f%s", n, unit[u]);
  return buf;
}

std::string line_starting(const std::string& text, const std::string& key) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key, 0) == 0) return line;
  return "";
}

TEST(Cli, InfoOnGoldenFp8) {
  const std::string dir = test::golden_dir("fp8") + "/model";
  const Result r = dsv3({"info", "--model", dir});
  ASSERT_EQ(r.status, 0) << show(r);

  // Counts worked out from config.json alone.
  const json c = json::parse(read_file(dir + "/config.json"));
  const int64_t V = c["vocab_size"], H = c["hidden_size"], L = c["num_hidden_layers"], dense = c["first_k_dense_replace"],
                nh = c["num_attention_heads"], qr = c["q_lora_rank"], kvr = c["kv_lora_rank"], dn = c["qk_nope_head_dim"],
                dr = c["qk_rope_head_dim"], dv = c["v_head_dim"], I = c["intermediate_size"],
                Im = c["moe_intermediate_size"],
                E = c["n_routed_experts"], K = c["num_experts_per_tok"], S = c["n_shared_experts"],
                nmtp = c["num_nextn_predict_layers"];
  ASSERT_GT(qr, 0);
  ASSERT_EQ(nmtp, 1);
  // q_a_proj, q_a_layernorm, q_b_proj; kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj; o_proj; two layer norms.
  const int64_t attn = H * qr + qr + qr * nh * (dn + dr) + H * (kvr + dr) + kvr + kvr * nh * (dn + dv) + nh * dv * H + 2 * H;
  const int64_t expert = 3 * H * Im;
  const int64_t dense_layer = attn + 3 * H * I;
  const int64_t moe_layer = attn + E * H + S * expert + E * expert;  // router, shared, routed experts
  const int64_t moe_active = attn + E * H + S * expert + K * expert;
  const int64_t main_total = 2 * V * H + H + dense * dense_layer + (L - dense) * moe_layer;
  const int64_t main_active = 2 * V * H + H + dense * dense_layer + (L - dense) * moe_active;
  const int64_t mtp_total = 2 * H + 2 * H * H + H + moe_layer;  // enorm, hnorm, eh_proj, shared_head.norm, layer
  const int64_t kv_values = L * (kvr + dr);

  // The same totals counted from the tensors stored: every weight except fp8 scales, the routers' correction
  // bias (a buffer) and the MTP layer's copies of embed_tokens / shared_head.head.
  const io::Checkpoint ck = io::Checkpoint::open(dir);
  int64_t stored_main = 0, stored_mtp = 0;
  const std::string mtp_prefix = "model.layers." + std::to_string(L) + ".";
  for (const auto& n : ck.names()) {
    if (n.find("weight_scale_inv") != std::string::npos || n.find("e_score_correction_bias") != std::string::npos) continue;
    if (n == mtp_prefix + "embed_tokens.weight" || n == mtp_prefix + "shared_head.head.weight") continue;
    int64_t numel = 1;
    for (int64_t d : ck.info(n).shape) numel *= d;
    (n.rfind(mtp_prefix, 0) == 0 ? stored_mtp : stored_main) += numel;
  }
  EXPECT_EQ(stored_main, main_total);
  EXPECT_EQ(stored_mtp, mtp_total);
  const ModelStats s = model_stats(ModelConfig::load(dir + "/config.json"));
  EXPECT_EQ(s.params_main, main_total);
  EXPECT_EQ(s.params_mtp, mtp_total);
  EXPECT_EQ(s.active_main, main_active);
  EXPECT_EQ(s.kv_cache_values_per_token, kv_values);

  // What the command prints.
  const std::string params = line_starting(r.out, "parameters"), active = line_starting(r.out, "active/token"),
                    kv = line_starting(r.out, "latent KV cache");
  const std::string want_params =
      human(double(main_total + mtp_total)) + " total = " + human(double(main_total)) + " main + " +
      human(double(mtp_total)) + " MTP";
  EXPECT_NE(params.find(want_params), std::string::npos) << "want '" << want_params << "' in:\n" << r.out;
  const std::string want_active = std::string(" ").append(human(double(main_active))).append(" (");
  EXPECT_NE(active.find(want_active), std::string::npos) << "want '" << want_active << "' in:\n" << r.out;
  const std::string want_kv = std::to_string(kv_values) + " values/token = " + std::to_string(L) + " layers x (" +
                              std::to_string(kvr) + " + " + std::to_string(dr) + "); " + std::to_string(2 * kv_values) +
                              " bytes/token in bf16, " + std::to_string(4 * kv_values) + " in f32";
  EXPECT_NE(kv.find(want_kv), std::string::npos) << "want '" << want_kv << "' in:\n" << r.out;
  std::printf("[info fp8] main %lld, MTP %lld, active %lld, KV %lld bytes/token (bf16)\n", (long long)main_total,
              (long long)mtp_total, (long long)main_active, (long long)(2 * kv_values));

  expect_one_line_error(dsv3({"info", "--model", "/nonexistent/model"}), {"/nonexistent/model"});
}

}  // namespace
}  // namespace dsv3
