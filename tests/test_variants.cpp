// Config variants of the model, checked against an independent double-precision reference forward
// (tests/reference_forward.h). The reference itself is first validated on the golden data (transformers).
// Tolerances: relative L2 1e-5 on logits / MTP logits / final hidden; routing must match exactly.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "temp_dir.h"
#include "io/config.h"
#include "io/safetensors.h"
#include "model/init.h"
#include "model/transformer.h"
#include "reference_forward.h"
#include "testutil.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;
using IdBatch = std::vector<std::vector<int64_t>>;

constexpr double kTol = 1e-5;

// ----- golden: validate the reference ------------------------------------------------------------------

void check_reference_on_golden(const std::string& name) {
  const std::string dir = test::golden_dir(name);
  auto g = io::SafetensorsFile::open(dir + "/golden.safetensors");
  const Tensor ids_t = g->get("input_ids").contiguous();
  ASSERT_EQ(ids_t.ndim(), 2);
  const int64_t B = ids_t.dim(0), T = ids_t.dim(1);
  IdBatch ids(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) ids[size_t(b)].assign(ids_t.data<const int64_t>() + b * T, ids_t.data<const int64_t>() + (b + 1) * T);

  const ref::RefOutput R = ref::reference_forward(dir + "/model", ids);
  const double e_logits = ref::rel_l2(g->get("logits"), R.logits);
  const double e_hidden = ref::rel_l2(g->get("final_hidden"), R.final_hidden);
  std::printf("[reference vs golden %s] logits %.3g, final_hidden %.3g", name.c_str(), e_logits, e_hidden);
  EXPECT_LT(e_logits, kTol);
  EXPECT_LT(e_hidden, kTol);
  ASSERT_TRUE(R.has_mtp);
  const double e_mtp = ref::rel_l2(g->get("mtp_logits"), R.mtp_logits);
  std::printf(", mtp_logits %.3g\n", e_mtp);
  EXPECT_LT(e_mtp, kTol);

  int compared = 0;
  for (const auto& n : g->names()) {
    if (n.rfind("routing.", 0) != 0) continue;
    const int64_t layer = std::stoll(n.substr(8));
    ASSERT_TRUE(R.routing.count(layer)) << "reference has no routing for layer " << layer;
    const auto want = ref::routing_rows(g->get(n));
    const auto& got = R.routing.at(layer);
    ASSERT_EQ(got.size(), want.size());
    for (size_t r = 0; r < want.size(); ++r)
      EXPECT_EQ(got[r], want[r]) << "layer " << layer << " row " << r << ": "
                                 << ref::router_margin(R.router_trace.at(layer)[r], int64_t(want[r].size()),
                                                       ModelConfig::load(dir + "/model/config.json").topk_group);
    ++compared;
  }
  EXPECT_GT(compared, 0);
}

TEST(Variants, ReferenceMatchesGoldenTiny) { check_reference_on_golden("tiny"); }
TEST(Variants, ReferenceMatchesGoldenFp8) { check_reference_on_golden("fp8"); }

// A negative control: the comparison is sensitive to the conventions it checks. Dropping YaRN from the
// golden tiny config must move the reference far from the golden logits.
TEST(Variants, ReferenceDetectsWrongRope) {
  const std::string gdir = test::golden_dir("tiny");
  const fs::path tmp = fs::temp_directory_path() / ("dsv3_variants_negctl_" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  ModelConfig cfg = ModelConfig::load(gdir + "/model/config.json");
  cfg.rope_scaling.reset();
  {
    std::FILE* f = std::fopen((tmp / "config.json").c_str(), "w");
    ASSERT_TRUE(f);
    const std::string s = cfg.to_json().dump(2);
    std::fwrite(s.data(), 1, s.size(), f);
    std::fclose(f);
  }
  fs::create_symlink(gdir + "/model/model.safetensors", tmp / "model.safetensors");
  auto g = io::SafetensorsFile::open(gdir + "/golden.safetensors");
  const Tensor ids_t = g->get("input_ids").contiguous();
  IdBatch ids(static_cast<size_t>(ids_t.dim(0)));
  for (int64_t b = 0; b < ids_t.dim(0); ++b)
    ids[size_t(b)].assign(ids_t.data<const int64_t>() + b * ids_t.dim(1), ids_t.data<const int64_t>() + (b + 1) * ids_t.dim(1));
  const ref::RefOutput R = ref::reference_forward(tmp.string(), ids);
  const double e = ref::rel_l2(g->get("logits"), R.logits);
  std::error_code ec;
  fs::remove_all(tmp, ec);
  EXPECT_GT(e, 1e-3) << "plain RoPE should not reproduce YaRN golden logits";
}

// ----- variants: the implementation vs the reference ---------------------------------------------------

struct TempDir : test::TempDir {
  explicit TempDir(const std::string& tag) : test::TempDir("dsv3_variants_" + tag, false) {}
};

ModelConfig base_config() {
  ModelConfig c = ModelConfig::load(test::golden_dir("tiny") + "/model/config.json");
  c.initializer_range = 0.2;  // activations well away from zero, routing far from uniform
  return c;
}

IdBatch make_ids(int64_t B, int64_t T, int64_t V, uint64_t seed) {
  IdBatch ids(static_cast<size_t>(B), std::vector<int64_t>(static_cast<size_t>(T)));
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 12345;
  for (auto& row : ids)
    for (auto& v : row) {
      s = s * 6364136223846793005ull + 1442695040888963407ull;
      v = int64_t((s >> 33) % uint64_t(V));
    }
  return ids;
}

void check_variant(const std::string& tag, const ModelConfig& cfg, int64_t T = 12, bool fp8 = false, uint64_t seed = 7) {
  TempDir dir(tag);
  InitOptions opts;
  opts.seed = seed;
  opts.fp8 = fp8;
  opts.bias_scale = 0.05f;
  write_random_checkpoint(cfg, dir.path.string(), opts);

  const int64_t B = 2;
  const IdBatch ids = make_ids(B, T, cfg.vocab_size, seed);
  ASSERT_NE(ids[0], ids[1]);
  const ref::RefOutput R = ref::reference_forward(dir.path.string(), ids);

  auto model = Transformer::load(dir.path.string());
  std::vector<int64_t> flat;
  for (auto& row : ids) flat.insert(flat.end(), row.begin(), row.end());
  ForwardOptions fo;
  fo.routing = true;
  const ForwardResult out = model->forward(Tensor::from_vector(flat, {B, T}), fo);

  ASSERT_EQ(out.logits.shape(), (Shape{B, T, R.V}));
  const double e_logits = ref::rel_l2(out.logits, R.logits);
  const double e_hidden = ref::rel_l2(out.final_hidden, R.final_hidden);
  EXPECT_LT(e_logits, kTol) << tag << ": logits";
  EXPECT_LT(e_hidden, kTol) << tag << ": final_hidden";
  std::printf("[variant %-16s] logits %.3g  final_hidden %.3g", tag.c_str(), e_logits, e_hidden);
  if (R.has_mtp) {
    ASSERT_GE(out.mtp_logits.size(), 1u) << tag << ": no MTP logits";
    ASSERT_EQ(out.mtp_logits[0].shape(), (Shape{B, T - 1, R.V}));
    const double e_mtp = ref::rel_l2(out.mtp_logits[0], R.mtp_logits);
    EXPECT_LT(e_mtp, kTol) << tag << ": mtp_logits";
    std::printf("  mtp_logits %.3g", e_mtp);
  } else {
    EXPECT_TRUE(out.mtp_logits.empty()) << tag << ": MTP logits without MTP layers";
    EXPECT_EQ(model->mtp_layers(), 0);
  }

  int64_t rows = 0, bad = 0;
  for (const auto& [layer, want] : R.routing) {
    const bool is_mtp = layer >= cfg.num_hidden_layers;
    if (!out.routing.count(layer)) {
      if (!is_mtp) ADD_FAILURE() << tag << ": no routing for layer " << layer;
      continue;
    }
    const auto got = ref::routing_rows(out.routing.at(layer));
    ASSERT_EQ(got.size(), want.size()) << tag << ": routing rows of layer " << layer;
    for (size_t r = 0; r < want.size(); ++r, ++rows) {
      if (got[r] == want[r]) continue;
      ++bad;
      ADD_FAILURE() << tag << ": layer " << layer << " row " << r << " routed differently ("
                    << ref::router_margin(R.router_trace.at(layer)[r], cfg.num_experts_per_tok, cfg.topk_group) << ")";
    }
  }
  for (const auto& [layer, t] : out.routing)
    if (!R.routing.count(layer)) ADD_FAILURE() << tag << ": routing for layer " << layer << ", which is not an MoE layer";
  std::printf("  routing %lld/%lld rows equal\n", (long long)(rows - bad), (long long)rows);
  EXPECT_GT(rows, 0) << tag << ": no routed rows compared";
}

TEST(Variants, Base) { check_variant("base", base_config()); }

TEST(Variants, PlainQProj) {  // (a) q_lora_rank null
  ModelConfig c = base_config();
  c.q_lora_rank = 0;
  check_variant("plain_q", c);
}

TEST(Variants, SingleGroup) {  // (b)
  ModelConfig c = base_config();
  c.n_group = 1;
  c.topk_group = 1;
  check_variant("single_group", c);
}

TEST(Variants, NoTopkNorm) {  // (c)
  ModelConfig c = base_config();
  c.norm_topk_prob = false;
  check_variant("no_topk_norm", c);
}

TEST(Variants, NoRopeScaling) {  // (d)
  ModelConfig c = base_config();
  c.rope_scaling.reset();
  check_variant("plain_rope", c);
}

TEST(Variants, AllMoe) {  // (e)
  ModelConfig c = base_config();
  c.first_k_dense_replace = 0;
  check_variant("all_moe", c);
}

TEST(Variants, NoMtp) {  // (f)
  ModelConfig c = base_config();
  c.num_nextn_predict_layers = 0;
  check_variant("no_mtp", c);
}

TEST(Variants, YarnBeyondOriginalContext) {  // (g) T = 40 > original_max_position_embeddings = 16
  ModelConfig c = base_config();
  c.rope_scaling->original_max_position_embeddings = 16;
  c.rope_scaling->factor = 4.0;
  c.max_position_embeddings = 64;  // = factor · original (transformers derives factor from this ratio)
  c.qk_rope_head_dim = 16;
  check_variant("yarn_long", c, 40);
}

TEST(Variants, YarnWideRamp) {  // (g') a ramp with low > 0 and several interpolated dimensions
  ModelConfig c = base_config();
  c.qk_rope_head_dim = 32;  // low = floor(2.83) = 2, high = ceil(8.85) = 9
  c.rope_scaling->original_max_position_embeddings = 1024;
  c.rope_scaling->factor = 4.0;
  c.max_position_embeddings = 4096;
  check_variant("yarn_ramp", c, 16);
}

TEST(Variants, NoSharedExperts) {  // (h)
  ModelConfig c = base_config();
  c.n_shared_experts = 0;
  check_variant("no_shared", c);
}

TEST(Variants, Fp8PartialBlocks) {  // (i) every fp8 weight has partial 128x128 edge blocks
  ModelConfig c = base_config();
  c.hidden_size = 160;
  c.intermediate_size = 300;
  c.moe_intermediate_size = 40;
  c.q_lora_rank = 48;
  c.kv_lora_rank = 144;
  check_variant("fp8", c, 12, /*fp8=*/true);
}

TEST(Variants, MscaleDiffersFromMscaleAllDim) {  // (j) attention_factor = mscale(f,0.7)/mscale(f,1.0)
  ModelConfig c = base_config();
  c.rope_scaling->mscale = 0.7;
  c.rope_scaling->mscale_all_dim = 1.0;
  check_variant("mscale_0.7_1.0", c);
}

TEST(Variants, MscaleAllDimZero) {  // (j) no softmax mscale²; attention_factor = mscale(f, 1), not mscale(f, 0.7)
  ModelConfig c = base_config();
  c.rope_scaling->mscale = 0.7;
  c.rope_scaling->mscale_all_dim = 0.0;
  check_variant("mscale_all_dim_0", c);
}

}  // namespace
}  // namespace dsv3
