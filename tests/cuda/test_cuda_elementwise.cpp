// Row-wise CUDA kernels against their CPU twins (src/kernels/cpu) on fresh random inputs.
#include <algorithm>
#include <numeric>

#include "core/tensor.h"
#include "cuda_test_util.h"
#include "kernels/ops.h"

namespace dsv3::cuda {
namespace {
using namespace test;

Tensor host_f32(const std::vector<float>& v, Shape s) { return Tensor::from_vector(v, std::move(s)); }
Tensor host_bf16(const std::vector<uint16_t>& v, Shape s) {
  Tensor t = Tensor::empty(DType::BF16, std::move(s));
  std::memcpy(t.raw(), v.data(), v.size() * 2);
  return t;
}
std::vector<float> vec(const Tensor& t) { return std::vector<float>(t.f32(), t.f32() + t.numel()); }

TEST(CudaOps, ConvertF32Bf16IsBitExact) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(11);
  std::vector<float> h = randn(100003, rng, 3.0f);
  h[5] = INFINITY;
  h[6] = -0.0f;
  h[7] = 1e-40f;  // subnormal
  auto d = upload(h);
  auto b = poisoned<uint16_t>(h.size());
  convert(DType::F32, d.get(), DType::BF16, b.get(), int64_t(h.size()));
  EXPECT_EQ(download(b), to_bf16(h));
  auto f = poisoned<float>(h.size());
  convert(DType::BF16, b.get(), DType::F32, f.get(), int64_t(h.size()));
  EXPECT_EQ(download(f), round_bf16(h));
}

// Tolerance: f32 arithmetic in a different summation order, relative L2 < 1e-6.
TEST(CudaOps, RmsnormMatchesCpu) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(12);
  for (auto [M, D, bf16_gamma] : {std::tuple{1, 7168, true}, std::tuple{37, 512, false}, std::tuple{5, 1536, true}, std::tuple{3, 100, false}}) {
    const int64_t ld = D + 3;
    std::vector<float> x = randn(size_t(M * ld), rng, 2.0f), g = randn(size_t(D), rng, 0.5f, 1.0f);
    const std::vector<uint16_t> gb = to_bf16(g);
    Tensor xt = host_f32(x, {M, ld}).slice(1, 0, D), y = Tensor::empty(DType::F32, {M, D});
    ops::rmsnorm(xt, bf16_gamma ? host_bf16(gb, {D}) : host_f32(g, {D}), 1e-6f, y);
    auto dx = upload(x);
    auto dg = upload(g);
    auto dgb = upload(gb);
    auto dy = poisoned<float>(size_t(M * D));
    rmsnorm(dx.get(), ld, bf16_gamma ? DType::BF16 : DType::F32, bf16_gamma ? static_cast<const void*>(dgb.get()) : dg.get(), 1e-6f,
            dy.get(), D, M, D);
    const auto out = download(dy);
    ASSERT_TRUE(all_finite(out));
    EXPECT_LT(rel_l2(out, vec(y)), 1e-6) << M << "x" << D;
  }
}

// Tolerance: cos/sin of the same f32 angles (CUDA's cosf/sinf are within 2 ulp), relative L2 < 1e-6; the bf16
// form below.
TEST(CudaOps, RopeMatchesCpu) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(13);
  const int64_t M = 19, H = 5, R = 64, half = R / 2, ld1 = R + 128, ld0 = H * ld1, max_pos = 40000;
  ops::RopeTable table;
  for (int64_t i = 0; i < half; ++i) table.inv_freq.push_back(float(std::pow(10000.0, -double(2 * i) / double(R)) * (i < 8 ? 0.025 : 1.0)));
  table.attention_factor = 1.1386f;
  std::vector<int64_t> pos(static_cast<size_t>(M));
  std::uniform_int_distribution<int64_t> pd(0, max_pos - 1);
  for (auto& p : pos) p = pd(rng);
  pos[0] = 0;
  pos[1] = max_pos - 1;
  std::vector<float> x = randn(size_t(M * ld0), rng);
  Tensor xt = host_f32(x, {M, H, ld1}).slice(2, 128, 128 + R);
  ops::rope(xt, pos, table);
  auto dinv = upload(table.inv_freq);
  DeviceBuffer<float> tab(static_cast<size_t>(max_pos * R));
  rope_build_table(dinv.get(), half, table.attention_factor, max_pos, tab.get());
  auto dx = upload(x);
  auto dpos = upload(pos);
  rope(dx.get() + 128, ld0, ld1, M, H, R, dpos.get(), tab.get());
  const auto out = download(dx);
  ASSERT_TRUE(all_finite(out));
  std::vector<float> got, want;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < ld1; ++j) {
        got.push_back(out[size_t(m * ld0 + h * ld1 + j)]);
        want.push_back(static_cast<float*>(xt.raw())[m * ld0 + h * ld1 + j - 128]);
      }
  EXPECT_LT(rel_l2(got, want), 1e-6);
  // On bf16 x (the prefill's q_b output): each pair rotated in f32 from the bf16 inputs and rounded once, so against
  // the f32 rotation of the same rounded inputs the only error is the output's rounding: < 4e-3 (2^-9 relative).
  const std::vector<float> xr = round_bf16(x);
  Tensor xrt = host_f32(xr, {M, H, ld1}).slice(2, 128, 128 + R);
  ops::rope(xrt, pos, table);
  auto dxb = upload(to_bf16(xr));
  rope(dxb.get() + 128, ld0, ld1, M, H, R, dpos.get(), tab.get());
  const std::vector<float> outb = from_bf16(download(dxb));
  std::vector<float> gotb, wantb;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t j = 0; j < ld1; ++j) {
        gotb.push_back(outb[size_t(m * ld0 + h * ld1 + j)]);
        wantb.push_back(j < 128 ? xr[size_t(m * ld0 + h * ld1 + j)] : static_cast<float*>(xrt.raw())[m * ld0 + h * ld1 + j - 128]);
      }
  EXPECT_LT(rel_l2(gotb, wantb), 4e-3);
}

// Tolerance: expf vs glibc expf, relative L2 < 1e-6; the bf16 output is the f32 result rounded (< 4e-3). Widths a
// multiple of 4 (four columns a thread) and not (one); f32 and bf16 gu.
TEST(CudaOps, SiluMulMatchesCpu) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(14);
  for (const int64_t I : {int64_t(2048 + 24), int64_t(2047)}) {
    const int64_t M = 33, ldg = 2 * I + 16;
    std::vector<float> gu = randn(size_t(M * ldg), rng, 3.0f);
    Tensor g = host_f32(gu, {M, ldg}).slice(1, 0, 2 * I), o = Tensor::empty(DType::F32, {M, I});
    ops::silu_mul(g, o);
    auto d = upload(gu);
    auto out = poisoned<float>(size_t(M * I));
    silu_mul(d.get(), ldg, DType::F32, out.get(), I, M, I);
    const auto r = download(out);
    ASSERT_TRUE(all_finite(r));
    EXPECT_LT(rel_l2(r, vec(o)), 1e-6) << I;
    auto outb = poisoned<uint16_t>(size_t(M * I));
    silu_mul(d.get(), ldg, DType::BF16, outb.get(), I, M, I);
    const auto rb = from_bf16(download(outb));
    ASSERT_TRUE(all_finite(rb));
    EXPECT_LT(rel_l2(rb, vec(o)), 4e-3) << I;
    // A bf16 gu (the prefill MLP's): against the CPU op on the same bf16 values, 1e-6 in f32.
    const std::vector<float> gub = round_bf16(gu);
    Tensor ob = Tensor::empty(DType::F32, {M, I});
    ops::silu_mul(host_f32(gub, {M, ldg}).slice(1, 0, 2 * I), ob);
    auto db = upload(to_bf16(gub));
    auto out16 = poisoned<float>(size_t(M * I));
    silu_mul(db.get(), ldg, DType::F32, out16.get(), I, M, I);
    const auto r16 = download(out16);
    ASSERT_TRUE(all_finite(r16));
    EXPECT_LT(rel_l2(r16, vec(ob)), 1e-6) << I << " (bf16 gu)";
  }
}

// Exact: a gather (bf16 -> f32 is exact).
TEST(CudaOps, EmbeddingMatchesCpuAndFlagsBadIds) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(15);
  const int64_t V = 1000, D = 96, M = 50;
  const std::vector<uint16_t> tb = to_bf16(randn(size_t(V * D), rng));
  std::vector<int64_t> ids(static_cast<size_t>(M));
  std::uniform_int_distribution<int64_t> idd(0, V - 1);
  for (auto& i : ids) i = idd(rng);
  ids[3] = V - 1;
  Tensor y = Tensor::empty(DType::F32, {M, D});
  ops::embedding(Tensor::from_vector(ids, {M}), host_bf16(tb, {V, D}), y);
  auto dt = upload(tb);
  auto dids = upload(ids);
  DeviceBuffer<uint32_t> err(1);
  auto dy = poisoned<float>(size_t(M * D));
  embedding_reset_error(err.get());
  embedding(DType::I64, dids.get(), M, DType::BF16, dt.get(), V, D, dy.get(), D, err.get());
  EXPECT_NO_THROW(embedding_check_error(err.get(), DType::I64, dids.get(), V));
  EXPECT_EQ(download(dy), vec(y));
  // int32 ids with two out of range: the first position is reported, as the CPU op does.
  std::vector<int32_t> ids32(ids.begin(), ids.end());
  ids32[7] = int32_t(V);
  ids32[20] = -3;
  auto d32 = upload(ids32);
  embedding_reset_error(err.get());
  embedding(DType::I32, d32.get(), M, DType::BF16, dt.get(), V, D, dy.get(), D, err.get());
  try {
    embedding_check_error(err.get(), DType::I32, d32.get(), V);
    FAIL() << "out-of-range id not reported";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "token id 1000 at position 7 is out of range [0, 1000)");
  }
}

// Router (moe_route, and moe_route_block: the persistent decode kernel's block router): identical expert indices
// in order, weights within relative L2 1e-6 (only expf differs from the CPU).
TEST(CudaOps, RouterMatchesCpu) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(16);
  struct Case { int64_t M, E; int G, TG, K; bool norm; float scale; bool bias; };
  for (const Case c : {Case{64, 256, 8, 4, 8, true, 2.5f, true}, Case{17, 64, 1, 1, 6, false, 1.0f, true},
                       Case{9, 96, 4, 2, 5, true, 1.0f, false}, Case{300, 256, 8, 3, 8, true, 2.5f, true}, Case{5, 16, 4, 4, 16, true, 1.5f, true},
                       Case{7, 30, 3, 2, 4, true, 1.0f, true}}) {
    const std::vector<float> logits = randn(size_t(c.M * c.E), rng, 2.0f), bias = randn(size_t(c.E), rng, 0.3f);
    ops::RouterParams p;
    p.n_group = c.G;
    p.topk_group = c.TG;
    p.top_k = c.K;
    p.norm_topk_prob = c.norm;
    p.routed_scaling_factor = c.scale;
    Tensor idx = Tensor::empty(DType::I32, {c.M, c.K}), w = Tensor::empty(DType::F32, {c.M, c.K});
    ops::moe_route(host_f32(logits, {c.M, c.E}), c.bias ? host_f32(bias, {c.E}) : Tensor(), p, idx, w);
    auto dl = upload(logits);
    auto db = upload(bias);
    DeviceBuffer<int32_t> di(static_cast<size_t>(c.M * c.K));
    auto dw = poisoned<float>(size_t(c.M * c.K));
    moe_route(dl.get(), c.E, c.M, c.E, c.bias ? db.get() : nullptr, RouterConfig{c.G, c.TG, c.K, c.norm, c.scale}, di.get(), dw.get());
    const auto gi = download(di);
    const auto gw = download(dw);
    int mismatches = 0;
    for (int64_t i = 0; i < c.M * c.K; ++i) mismatches += gi[size_t(i)] != idx.data<int32_t>()[i];
    EXPECT_EQ(mismatches, 0) << "E " << c.E << " groups " << c.G;
    ASSERT_TRUE(all_finite(gw));
    EXPECT_LT(rel_l2(gw, vec(w)), 1e-6);
    // The block router (the persistent decode kernel's) on the same logits: the same choices in the same order.
    DeviceBuffer<int32_t> bi(static_cast<size_t>(c.M * c.K));
    auto bw = poisoned<float>(size_t(c.M * c.K));
    moe_route_block(dl.get(), c.E, c.M, c.E, c.bias ? db.get() : nullptr, RouterConfig{c.G, c.TG, c.K, c.norm, c.scale}, bi.get(),
                    bw.get());
    const auto hi = download(bi);
    const auto hw = download(bw);
    int block_mismatches = 0;
    for (int64_t i = 0; i < c.M * c.K; ++i) block_mismatches += hi[size_t(i)] != idx.data<int32_t>()[i];
    EXPECT_EQ(block_mismatches, 0) << "route_block: E " << c.E << " groups " << c.G;
    ASSERT_TRUE(all_finite(hw));
    EXPECT_LT(rel_l2(hw, vec(w)), 1e-6);
  }
}

// The router's logits in float64: x [M, K] (row stride ldx) times gate [E, K]ᵀ.
std::vector<float> logits_f64(const std::vector<float>& x, int64_t ldx, const std::vector<float>& g, int64_t M, int64_t E, int64_t K) {
  std::vector<float> y(size_t(M * E));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t e = 0; e < E; ++e) {
      double a = 0;
      for (int64_t d = 0; d < K; ++d) a += double(x[size_t(m * ldx + d)]) * double(g[size_t(e * K + d)]);
      y[size_t(m * E + e)] = float(a);
    }
  return y;
}

// The one-launch decode router: its logits against a double-precision host product (relative L2 1e-6), its
// choices identical to moe_route's on those logits (weights bit for bit), and the block counter left at 0 so that
// the next launch (a graph replay) works: run twice.
TEST(CudaOps, GateRouteMatchesProductThenRoute) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(18);
  struct Case { int64_t M, E, D; int G, TG, K; bool bias; };
  for (const Case c : {Case{1, 64, 1024, 8, 4, 6, true}, Case{16, 256, 7168, 8, 4, 8, true}, Case{3, 16, 40, 4, 2, 3, false},
                       Case{5, 72, 512, 1, 1, 6, true}}) {
    const int64_t ldx = c.D + 4;
    const auto x = randn(size_t(c.M * ldx), rng), g = randn(size_t(c.E * c.D), rng, 0.05f), bias = randn(size_t(c.E), rng, 0.3f);
    auto dx = upload(x), dg = upload(g), db = upload(bias);
    DeviceBuffer<uint32_t> counter(1);
    memset_device(counter.get(), 0, 4);
    const RouterConfig p{c.G, c.TG, c.K, true, 2.5f};
    for (int run = 0; run < 2; ++run) {
      auto dl = poisoned<float>(size_t(c.M * c.E));
      DeviceBuffer<int32_t> di(static_cast<size_t>(c.M * c.K)), ri(static_cast<size_t>(c.M * c.K));
      auto dw = poisoned<float>(size_t(c.M * c.K)), rw = poisoned<float>(size_t(c.M * c.K));
      moe_gate_route(dx.get(), ldx, c.M, dg.get(), c.D, c.E, c.bias ? db.get() : nullptr, p, dl.get(), counter.get(), di.get(), dw.get());
      moe_route(dl.get(), c.E, c.M, c.E, c.bias ? db.get() : nullptr, p, ri.get(), rw.get());
      const auto logits = download(dl);
      const std::vector<float> want = logits_f64(x, ldx, g, c.M, c.E, c.D);
      EXPECT_LT(rel_l2(logits, want), 1e-6) << "E " << c.E << " D " << c.D;
      EXPECT_EQ(download(di), download(ri)) << "E " << c.E << " run " << run;
      const auto a = download(dw), b = download(rw);
      EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * 4)) << "E " << c.E << " run " << run;
      EXPECT_EQ(download(counter)[0], 0u);
    }
  }
}

TEST(CudaOps, ArgmaxAndSoftmaxMatchHost) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(17);
  const int64_t M = 6, V = 129280, ld = V + 5;
  std::vector<float> x = randn(size_t(M * ld), rng, 3.0f);
  x[size_t(2 * ld + 100)] = 50.0f;  // a tie: the first maximum wins
  x[size_t(2 * ld + 90000)] = 50.0f;
  auto dx = upload(x);
  DeviceBuffer<int32_t> am(static_cast<size_t>(M));
  argmax_rows(dx.get(), ld, M, V, am.get());
  const auto a = download(am);
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x.data() + m * ld;
    EXPECT_EQ(a[size_t(m)], int32_t(std::max_element(r, r + V) - r)) << "row " << m;
  }
  // Softmax at temperature 0.7 against a double-precision host softmax: relative L2 < 1e-5.
  auto dy = poisoned<float>(size_t(M * V));
  softmax_rows(dx.get(), ld, M, V, 0.7f, dy.get(), V);
  const auto y = download(dy);
  std::vector<float> ref(static_cast<size_t>(M * V));
  for (int64_t m = 0; m < M; ++m) {
    const float* r = x.data() + m * ld;
    const float mx = *std::max_element(r, r + V);
    double s = 0;
    for (int64_t j = 0; j < V; ++j) s += std::exp((double(r[j]) - mx) / 0.7);
    for (int64_t j = 0; j < V; ++j) ref[size_t(m * V + j)] = float(std::exp((double(r[j]) - mx) / 0.7) / s);
  }
  ASSERT_TRUE(all_finite(y));
  EXPECT_LT(rel_l2(y, ref), 1e-5);
}

}  // namespace
}  // namespace dsv3::cuda
