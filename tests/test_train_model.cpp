// The model as a trainable object: float32 master weights give the same forward, save() writes the
// official layout that loads back identically, and gradient steps lower the loss.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

#include "io/safetensors.h"
#include "model/transformer.h"
#include "testutil.h"

using namespace dsv3;

TEST(TrainModel, TrainableCopySavesAndReloadsExactly) {
  auto golden = io::SafetensorsFile::open(test::golden_dir("fp8") + "/golden.safetensors");
  auto model = Transformer::load(test::golden_dir("fp8") + "/model");
  model->make_trainable();
  const Tensor ids = golden->get("input_ids");
  ForwardResult r = model->forward(ids);
  EXPECT_LT(test::rel_l2(r.logits, golden->get("logits")), 1e-5);
  EXPECT_LT(test::rel_l2(r.mtp_logits[0], golden->get("mtp_logits")), 1e-5);
  const std::string dir = (std::filesystem::temp_directory_path() / ("dsv3-save-" + std::to_string(getpid()))).string();
  model->save(dir, DType::F32);
  model->save(dir, DType::F32);  // over an existing checkpoint
  auto back = Transformer::load(dir);
  ForwardResult r2 = back->forward(ids);
  EXPECT_EQ(test::rel_l2(r2.logits, r.logits), 0.0);
  EXPECT_EQ(test::rel_l2(r2.mtp_logits[0], r.mtp_logits[0]), 0.0);
  EXPECT_TRUE(back->checkpoint().contains("model.layers.2.shared_head.head.weight"));
  EXPECT_FALSE(std::filesystem::exists(dir + ".tmp"));
  EXPECT_FALSE(std::filesystem::exists(dir + ".old"));
  std::filesystem::remove_all(dir);
}

TEST(TrainModel, GradientStepsLowerTheLoss) {
  auto model = Transformer::load(test::golden_dir("tiny") + "/model");
  model->make_trainable();
  std::map<std::string, Tensor> params;
  model->visit({[&](ops::Weight& w) { params[w.name] = w.w; }, [&](const std::string& n, Tensor& t) { params[n] = t; },
                [](const std::string&, Tensor&) {}});
  std::vector<int64_t> seq;
  for (int i = 0; i < 32; ++i) seq.push_back((i * 7) % 13 + 20);  // a short repeating pattern to memorise
  const Tensor ids = Tensor::from_vector(seq, {1, 32});
  double first = 0, last = 0;
  for (int step = 0; step < 30; ++step) {
    Grads g;
    const auto l = model->loss_and_grads(ids, 0.3f, g);
    if (step == 0) first = l.loss;
    last = l.loss;
    for (const auto& [name, grad] : g.all()) {
      ASSERT_TRUE(params.count(name)) << name;
      float* p = params[name].f32();
      for (int64_t i = 0; i < grad.numel(); ++i) p[i] -= 0.5f * grad.f32()[i];
    }
  }
  EXPECT_LT(last, 0.5 * first) << "first " << first << " last " << last;
}
