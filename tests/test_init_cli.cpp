// `dsv3 init --config C --random --output DIR [--fp8] [--seed S]`: the checkpoint it writes loads and runs
// (`dsv3 forward`), the same seed gives the same bytes, and a bad config or a busy output folder fails with one
// line on stderr and leaves no output folder (nor a temporary) behind.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "temp_dir.h"
#include "io/safetensors.h"
#include "testutil.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

struct TempDir : test::TempDir {
  TempDir() : test::TempDir("dsv3_init") {}
};

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

struct Result {
  int status = -1;
  std::string err;
};

Result dsv3(const TempDir& t, const std::vector<std::string>& args) {
  std::string cmd = "timeout 120 ";
  cmd += DSV3_BIN;
  cmd += " --threads 1";
  for (const auto& a : args) cmd += " " + quote(a);
  const std::string err = t / "stderr.txt";
  cmd += " > /dev/null 2> " + quote(err);
  const int st = std::system(cmd.c_str());
  return {WIFEXITED(st) ? WEXITSTATUS(st) : -1, slurp(err)};
}

void expect_one_line_error(const Result& r, const std::string& what) {
  EXPECT_EQ(r.status, 1) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << "stderr is not one line:\n" << r.err;
  EXPECT_NE(r.err.find(what), std::string::npos) << "stderr does not mention '" << what << "':\n" << r.err;
}

std::string tiny_config() { return test::golden_dir("tiny") + "/model/config.json"; }

// Runs `dsv3 forward` on a few ids and checks the logits are finite with the config's vocabulary.
void expect_forward_runs(const TempDir& t, const std::string& model) {
  const std::string in = t / "ids.safetensors", out = t / "logits.safetensors";
  io::write_safetensors(in, {{"input_ids", Tensor::from_vector(std::vector<int64_t>{1, 5, 9, 200, 3, 7}, {1, 6})}});
  const Result r = dsv3(t, {"forward", "--model", model, "--input", in, "--output", out});
  ASSERT_EQ(r.status, 0) << r.err;
  auto f = io::SafetensorsFile::open(out);
  Tensor logits = f->get("logits").to(DType::F32);
  ASSERT_EQ(logits.shape(), (Shape{1, 6, 512}));
  double ss = 0;
  for (int64_t i = 0; i < logits.numel(); ++i) {
    ASSERT_TRUE(std::isfinite(logits.f32()[i])) << i;
    ss += double(logits.f32()[i]) * logits.f32()[i];
  }
  EXPECT_GT(ss, 0.0);
}

TEST(InitCli, RandomBf16AndFp8CheckpointsRunForward) {
  TempDir t;
  for (const bool fp8 : {false, true}) {
    const std::string dir = t / (fp8 ? "fp8" : "bf16");
    std::vector<std::string> args{"init", "--config", tiny_config(), "--random", "--output", dir, "--seed", "7"};
    if (fp8) args.push_back("--fp8");
    const Result r = dsv3(t, args);
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_TRUE(fs::exists(dir + "/config.json"));
    EXPECT_TRUE(fs::exists(dir + "/model.safetensors"));
    EXPECT_FALSE(fs::exists(dir + ".tmp"));
    const json cfg = json::parse(slurp(dir + "/config.json"));
    EXPECT_EQ(cfg.contains("quantization_config"), fp8);
    auto ck = io::SafetensorsFile::open(dir + "/model.safetensors");
    EXPECT_EQ(ck->info("model.layers.1.mlp.experts.0.up_proj.weight").dtype, fp8 ? DType::F8_E4M3 : DType::BF16);
    expect_forward_runs(t, dir);
  }
  // Same seed, same bytes; another seed, other weights; --force replaces an existing checkpoint.
  const std::string again = t / "again", other = t / "other";
  ASSERT_EQ(dsv3(t, {"init", "--config", tiny_config(), "--random", "--output", again, "--seed", "7"}).status, 0);
  EXPECT_EQ(slurp(again + "/model.safetensors"), slurp(t / "bf16/model.safetensors"));
  ASSERT_EQ(dsv3(t, {"init", "--config", tiny_config(), "--random", "--output", other, "--seed", "8"}).status, 0);
  EXPECT_NE(slurp(other + "/model.safetensors"), slurp(t / "bf16/model.safetensors"));
  expect_one_line_error(dsv3(t, {"init", "--config", tiny_config(), "--random", "--output", other, "--seed", "7"}),
                        "not empty");
  ASSERT_EQ(dsv3(t, {"init", "--config", tiny_config(), "--random", "--output", other, "--seed", "7", "--force"}).status, 0);
  EXPECT_EQ(slurp(other + "/model.safetensors"), slurp(t / "bf16/model.safetensors"));
}

TEST(InitCli, BadConfigIsRejectedWithOneLine) {
  TempDir t;
  const json good = json::parse(slurp(tiny_config()));
  struct Case {
    std::string name, text, what;
  };
  json bad_groups = good;
  bad_groups["n_routed_experts"] = 15;  // not a multiple of n_group 4
  json bad_type = good;
  bad_type["hidden_size"] = "wide";
  const std::vector<Case> cases{
      {"not_json", "{ \"hidden_size\": ", "not_json.json"},
      {"groups", bad_groups.dump(), "n_group"},
      {"type", bad_type.dump(), "hidden_size"},
  };
  for (const auto& c : cases) {
    const std::string cfg = t / (c.name + ".json"), out = t / ("out_" + c.name);
    std::ofstream(cfg) << c.text;
    expect_one_line_error(dsv3(t, {"init", "--config", cfg, "--random", "--output", out}), c.what);
    EXPECT_FALSE(fs::exists(out)) << c.name;
    EXPECT_FALSE(fs::exists(out + ".tmp")) << c.name;
  }
  expect_one_line_error(dsv3(t, {"init", "--config", t / "missing.json", "--random", "--output", t / "o"}), "missing.json");
  EXPECT_FALSE(fs::exists(t / "o"));
  // --random is required (no other initialisation exists yet).
  EXPECT_NE(dsv3(t, {"init", "--config", tiny_config(), "--output", t / "o"}).status, 0);
  EXPECT_FALSE(fs::exists(t / "o"));
}

}  // namespace
}  // namespace dsv3
