#include <gtest/gtest.h>

#include "core/tensor.h"

using namespace dsv3;

TEST(Tensor, ViewsShareStorageAndCopyContiguous) {
  std::vector<float> v(24);
  for (int i = 0; i < 24; ++i) v[size_t(i)] = float(i);
  Tensor t = Tensor::from_vector(v, {2, 3, 4});
  Tensor tr = t.transpose(1, 2);  // [2,4,3]
  EXPECT_FALSE(tr.is_contiguous());
  Tensor c = tr.contiguous();
  EXPECT_EQ(c.shape(), (Shape{2, 4, 3}));
  EXPECT_EQ(c.f32()[1], 4.0f);   // [0][0][1] = t[0][1][0]
  EXPECT_EQ(c.f32()[13], 16.0f);  // [1][0][1] = t[1][1][0] = 12+4
  Tensor s = t.slice(2, 1, 3);     // [2,3,2]
  Tensor sc = s.contiguous();
  EXPECT_EQ(sc.f32()[0], 1.0f);
  EXPECT_EQ(sc.f32()[11], 22.0f);
  Tensor sel = t.select(0, 1).reshape({-1});
  EXPECT_EQ(sel.numel(), 12);
  EXPECT_EQ(sel.f32()[0], 12.0f);
  EXPECT_THROW(t.slice(0, 1, 3), Error);
  EXPECT_THROW(tr.reshape({24}), Error);
  EXPECT_THROW(t.data<int64_t>(), Error);
}

TEST(Tensor, ConvertBetweenDtypes) {
  Tensor t = Tensor::from_vector(std::vector<float>{1.0f, -2.5f, 3.0e-3f}, {3});
  Tensor b = t.to(DType::BF16).to(DType::F32);
  EXPECT_EQ(b.f32()[0], 1.0f);
  EXPECT_EQ(b.f32()[1], -2.5f);
  EXPECT_NEAR(b.f32()[2], 3.0e-3f, 3.0e-3f / 128);
  Tensor i = Tensor::from_vector(std::vector<int64_t>{1, 2, 3}, {3}).to(DType::I32);
  EXPECT_EQ(i.data<int32_t>()[2], 3);
}
