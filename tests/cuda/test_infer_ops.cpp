// Glue kernels of the CUDA model (kernels/cuda/infer_ops.h) against host loops: the per-head products of the
// absorbed MLA (decode shapes of small.json and DeepSeek-V3, strided operands, F32 and BF16 weights).
#include <gtest/gtest.h>

#include <cstdio>
#include <tuple>

#include "cuda_test_util.h"
#include "core/tensor.h"
#include "kernels/ops.h"
#include "kernels/cuda/infer_ops.h"

namespace dsv3::cuda::test {
namespace {

struct HeadCase {
  int64_t M, H, K, N;
  bool bf16;
};

TEST(CudaInferOps, HeadMatmulMatchesHost) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(5);
  for (const HeadCase c : {HeadCase{1, 16, 64, 256, true}, HeadCase{1, 16, 256, 64, true}, HeadCase{13, 3, 100, 45, false},
                           HeadCase{64, 128, 128, 512, true}, HeadCase{9, 128, 512, 128, false}, HeadCase{2, 5, 7, 33, true}}) {
    // x rows padded (xs0 > H·xs1, xs1 > K) and y strided the same way, as the model's q/o buffers are.
    const int64_t xs1 = c.K + 3, xs0 = c.H * xs1 + 5, ys1 = c.N + 2, ys0 = c.H * ys1 + 1;
    const int64_t wsk = c.N, wsh = c.K * c.N;
    auto x = randn(size_t(c.M * xs0), rng);
    auto wf = randn(size_t(c.H * wsh), rng);
    if (c.bf16) wf = round_bf16(wf);
    std::vector<double> want(size_t(c.M * ys0), 0.0);
    std::vector<float> wantf;
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t n = 0; n < c.N; ++n) {
          double a = 0;
          for (int64_t k = 0; k < c.K; ++k) a += double(x[size_t(m * xs0 + h * xs1 + k)]) * double(wf[size_t(h * wsh + k * wsk + n)]);
          want[size_t(m * ys0 + h * ys1 + n)] = a;
        }
    auto dx = upload(x);
    auto dwf = upload(wf);
    auto dwb = upload(to_bf16(wf));
    auto dy = poisoned<float>(size_t(c.M * ys0));
    head_matmul(dx.get(), xs0, xs1, c.K, c.bf16 ? DType::BF16 : DType::F32, c.bf16 ? static_cast<const void*>(dwb.get()) : dwf.get(),
                wsh, wsk, c.N, dy.get(), ys0, ys1, c.M, c.H);
    const auto got = download(dy);
    std::vector<float> g, r;
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t n = 0; n < c.N; ++n) {
          g.push_back(got[size_t(m * ys0 + h * ys1 + n)]);
          r.push_back(float(want[size_t(m * ys0 + h * ys1 + n)]));
        }
    const double e = rel_l2(g, r);
    EXPECT_LT(e, 1e-5) << "M " << c.M << " H " << c.H << " K " << c.K << " N " << c.N;
  }
}

}  // namespace
}  // namespace dsv3::cuda::test

namespace dsv3::cuda::test {
namespace {
// The long-prefill attention (cuBLASLt bf16 GEMMs + bf16 probabilities) against the CPU twin in f32 on the same
// inputs: bf16 rounding of q, k, v and P bounds the error (~3e-3); stated tolerance 1e-2.
TEST(CudaInferOps, CausalGemmAttentionMatchesCpu) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(41);
  for (auto [B, T, H, D, Dv] : {std::tuple{1, 300, 3, 96, 64}, std::tuple{2, 257, 2, 192, 128}, std::tuple{1, 1, 1, 24, 40}}) {
    const int64_t row = D + D + Dv;  // q, k, v as slices of one [B, T, H, row] buffer
    auto qkv = randn(size_t(B * T * H * row), rng);
    Tensor all = Tensor::from_vector(qkv, {B, T, H, row});
    const float scale = 1.0f / std::sqrt(float(D)) * 1.7f;
    Tensor o = Tensor::empty(DType::F32, {B, T, H, Dv});
    ops::attention_causal(all.slice(3, 0, D), all.slice(3, D, 2 * D), all.slice(3, 2 * D, 2 * D + Dv), scale, o);
    auto d = upload(qkv);
    const Strides3 s{T * H * row, H * row, row}, so{T * H * Dv, H * Dv, Dv};
    auto out = poisoned<float>(size_t(B * T * H * Dv));
    const size_t wsb = attention_causal_gemm_workspace(B, T, H, D, Dv);
    DeviceBuffer<uint8_t> ws(wsb);
    Gemm g;
    attention_causal_gemm(g, d.get(), s, d.get() + D, s, d.get() + 2 * D, s, out.get(), so, B, T, H, D, Dv, scale, ws.get(), wsb);
    const auto got = download(out);
    const std::vector<float> want(o.f32(), o.f32() + o.numel());
    const double e = rel_l2(got, want);
    std::printf("  gemm attention B %lld T %lld H %lld D %lld Dv %lld: rel L2 %.3g\n", (long long)B, (long long)T, (long long)H,
                (long long)D, (long long)Dv, e);
    EXPECT_LT(e, 1e-2);
  }
}
}  // namespace
}  // namespace dsv3::cuda::test
