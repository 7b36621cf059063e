// The forward pass against transformers' float32 reference (../shared/golden): every hidden state, the
// final hidden state, logits and MTP logits within relative L2 1e-5, and identical expert routing.
#include <gtest/gtest.h>

#include "io/safetensors.h"
#include "model/transformer.h"
#include "testutil.h"

using namespace dsv3;

namespace {
constexpr double kTol = 1e-5;

void check_case(const std::string& name) {
  auto model = Transformer::load(test::golden_dir(name) + "/model");
  auto golden = io::SafetensorsFile::open(test::golden_dir(name) + "/golden.safetensors");
  ForwardOptions o;
  o.hidden_states = true;
  o.routing = true;
  ForwardResult r = model->forward(golden->get("input_ids"), o);
  for (size_t i = 0; i < r.hidden_states.size(); ++i) {
    const std::string key = "hidden_states." + std::to_string(i);
    ASSERT_TRUE(golden->contains(key)) << key;
    EXPECT_LT(test::rel_l2(r.hidden_states[i], golden->get(key)), kTol) << name << " " << key;
  }
  EXPECT_FALSE(golden->contains("hidden_states." + std::to_string(r.hidden_states.size())));
  EXPECT_LT(test::rel_l2(r.final_hidden, golden->get("final_hidden")), kTol) << name;
  EXPECT_LT(test::rel_l2(r.logits, golden->get("logits")), kTol) << name;
  ASSERT_EQ(r.mtp_logits.size(), 1u);
  EXPECT_LT(test::rel_l2(r.mtp_logits[0], golden->get("mtp_logits")), kTol) << name;
  int checked = 0;
  for (const auto& [layer, idx] : r.routing) {
    const std::string key = "routing." + std::to_string(layer) + ".experts";
    if (layer >= model->config().num_hidden_layers) continue;
    ASSERT_TRUE(golden->contains(key)) << key;
    Tensor want = golden->get(key);
    ASSERT_EQ(idx.shape(), want.shape());
    int64_t diff = 0;
    for (int64_t i = 0; i < idx.numel(); ++i) diff += idx.data<int64_t>()[i] != want.data<int64_t>()[i];
    EXPECT_EQ(diff, 0) << name << " " << key;
    ++checked;
  }
  EXPECT_EQ(checked, model->config().num_hidden_layers - model->config().first_k_dense_replace);
}
}  // namespace

TEST(GoldenForward, Tiny) { check_case("tiny"); }
TEST(GoldenForward, Fp8) { check_case("fp8"); }
