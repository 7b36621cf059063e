// Training gradients against transformers' autograd (../shared/golden/tiny): loss, mtp_loss and the
// gradient of loss + λ·mtp_loss for every trainable tensor, within relative L2 1e-4.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "io/safetensors.h"
#include "model/transformer.h"
#include "testutil.h"

using namespace dsv3;

TEST(GoldenGrad, Tiny) {
  auto model = Transformer::load(test::golden_dir("tiny") + "/model");
  auto golden = io::SafetensorsFile::open(test::golden_dir("tiny") + "/golden.safetensors");
  const float lambda = golden->get("mtp_lambda").f32()[0];
  Grads g;
  const auto losses = model->loss_and_grads(golden->get("input_ids"), lambda, g);
  EXPECT_NEAR(losses.loss, golden->get("loss").f32()[0], 1e-4 * std::fabs(golden->get("loss").f32()[0]));
  EXPECT_NEAR(losses.mtp_loss, golden->get("mtp_loss").f32()[0], 1e-4 * std::fabs(golden->get("mtp_loss").f32()[0]));
  int compared = 0;
  double worst = 0;
  for (const auto& name : golden->names()) {
    if (name.rfind("grad.", 0) != 0) continue;
    const std::string param = name.substr(5);
    auto it = g.all().find(param);
    ASSERT_TRUE(it != g.all().end()) << "no gradient for " << param;
    const double err = test::rel_l2(it->second, golden->get(name));
    EXPECT_LT(err, 1e-4) << param;
    worst = std::max(worst, err);
    ++compared;
  }
  // Nothing trainable is missing from the golden set, and we produce no gradient it lacks.
  for (const auto& [param, t] : g.all()) EXPECT_TRUE(golden->contains("grad." + param)) << "extra gradient " << param;
  EXPECT_GT(compared, 100);
  std::printf("loss %.6f (golden %.6f), mtp_loss %.6f; %d gradients, worst relative L2 %.2e\n", losses.loss,
              golden->get("loss").f32()[0], losses.mtp_loss, compared, worst);
}

// Recomputing MLA's norms and up-projections in backward runs the same operations on the same inputs as
// forward: the loss and every gradient are bit-identical to keeping them.
TEST(GoldenGrad, RecomputeGivesIdenticalGradients) {
  auto model = Transformer::load(test::golden_dir("tiny") + "/model");
  auto golden = io::SafetensorsFile::open(test::golden_dir("tiny") + "/golden.safetensors");
  Grads kept, redone;
  const auto a = model->loss_and_grads(golden->get("input_ids"), Transformer::LossOptions{0.3f, 1e-3f, false}, kept);
  const auto b = model->loss_and_grads(golden->get("input_ids"), Transformer::LossOptions{0.3f, 1e-3f, true}, redone);
  EXPECT_EQ(a.loss, b.loss);
  EXPECT_EQ(a.mtp_loss, b.mtp_loss);
  EXPECT_EQ(a.balance_loss, b.balance_loss);
  ASSERT_EQ(kept.all().size(), redone.all().size());
  for (const auto& [param, t] : kept.all()) {
    auto it = redone.all().find(param);
    ASSERT_TRUE(it != redone.all().end()) << param;
    ASSERT_EQ(t.nbytes(), it->second.nbytes()) << param;
    EXPECT_EQ(std::memcmp(t.raw(), it->second.raw(), t.nbytes()), 0) << param << " differs";
  }
}
