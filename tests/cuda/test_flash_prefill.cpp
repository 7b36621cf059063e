// The flash prefill attention (kernels/cuda/flash_prefill.cu: mma.sync, online softmax in registers) against the
// CPU twin ops::attention_causal in f32 on the same inputs: bf16 rounding of q, k, v and P bounds the error
// (~3e-3, as attention_causal_gemm); stated tolerance 1e-2. Lengths off the 64-row tiles (partial query and key
// tiles), one token, packed strided q/k/v views (also misaligned for float4), separate tensors, a strided output.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"
#include "causal_inputs.h"
#include "cuda_test_util.h"
#include "kernels/cuda/infer_ops.h"
#include "kernels/ops.h"

namespace dsv3::cuda::test {
namespace {

struct FlashCase {
  int64_t B, T, H, D, Dv;
  bool packed;  // q, k, v as slices of one [B, T, H, D + D + Dv + pad] buffer; else three contiguous tensors
  int64_t pad;  // packed: extra floats per row (odd: rows off 16 bytes, the pack kernel's scalar path)
};

TEST(CudaFlashPrefill, CausalFlashAttentionMatchesCpu) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(43);
  for (const FlashCase c : {FlashCase{2, 77, 3, 96, 64, true, 0}, FlashCase{1, 300, 3, 96, 64, false, 0},
                            FlashCase{2, 1029, 2, 96, 64, true, 1}, FlashCase{1, 128, 2, 96, 64, false, 0},
                            FlashCase{2, 1, 3, 192, 128, false, 0}, FlashCase{2, 300, 3, 192, 128, true, 0},
                            FlashCase{1, 1029, 2, 192, 128, false, 0}, FlashCase{2, 65, 3, 192, 128, true, 3},
                            FlashCase{2, 130, 3, 64, 64, true, 0}, FlashCase{1, 64, 1, 64, 64, false, 0}}) {
    const auto [B, T, H, D, Dv, packed, pad] = c;
    ASSERT_TRUE(attention_causal_flash_supported(D, Dv));
    const CausalInputs in = causal_inputs(B, T, H, D, Dv, packed, pad, rng);
    const int64_t orow = Dv + pad;  // a padded output row when pad > 0 (the pad stays poisoned)
    const Strides3 so{T * H * orow, H * orow, orow};
    auto out = poisoned<float>(size_t(B * T * H * orow));
    const size_t wsb = attention_causal_flash_workspace(B, T, H, D, Dv);
    DeviceBuffer<uint8_t> ws(wsb);
    attention_causal_flash(in.pq, in.sq, in.pk, in.sk, in.pv, in.sv, out.get(), so, B, T, H, D, Dv, in.scale, ws.get(), wsb);
    const auto all_out = download(out);
    std::vector<float> got;
    got.reserve(size_t(B * T * H * Dv));
    for (int64_t r = 0; r < B * T * H; ++r) got.insert(got.end(), all_out.begin() + r * orow, all_out.begin() + r * orow + Dv);
    ASSERT_TRUE(all_finite(got)) << B << "x" << T << "x" << H << " D " << D << " Dv " << Dv;
    const double e = rel_l2(got, vec(in.o));
    std::printf("  flash attention B %lld T %lld H %lld D %lld Dv %lld %s: rel L2 %.3g\n", (long long)B, (long long)T,
                (long long)H, (long long)D, (long long)Dv, packed ? "packed" : "separate", e);
    EXPECT_LT(e, 1e-2) << B << "x" << T << "x" << H << " D " << D << " Dv " << Dv;
  }
}

// Head dims without a kernel and a short workspace are one-line errors, before anything runs.
TEST(CudaFlashPrefill, RejectsUnsupportedDimsAndShortWorkspace) {
  DSV3_REQUIRE_GPU();
  EXPECT_FALSE(attention_causal_flash_supported(24, 40));
  EXPECT_FALSE(attention_causal_flash_supported(192, 64));
  const int64_t B = 1, T = 100, H = 2;
  DeviceBuffer<float> buf(size_t(B * T * H * 512));
  const Strides3 s{T * H * 512, H * 512, 512};
  const size_t wsb = attention_causal_flash_workspace(B, T, H, 192, 128);
  DeviceBuffer<uint8_t> ws(wsb);
  EXPECT_THROW(attention_causal_flash(buf.get(), s, buf.get() + 128, s, buf.get() + 256, s, buf.get(), s, B, T, H, 128, 128,
                                      0.1f, ws.get(), wsb),
               dsv3::Error);
  EXPECT_THROW(attention_causal_flash(buf.get(), s, buf.get() + 192, s, buf.get() + 384, s, buf.get(), s, B, T, H, 192, 128,
                                      0.1f, ws.get(), wsb - 1),
               dsv3::Error);
  synchronize();
}

}  // namespace
}  // namespace dsv3::cuda::test
