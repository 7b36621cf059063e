// Attention kernels against ops::attention_causal / ops::attention_latent on the CPU.
#include <algorithm>
#include <numeric>

#include "core/tensor.h"
#include "causal_inputs.h"
#include "cuda_test_util.h"
#include "kernels/ops.h"

namespace dsv3::cuda {
namespace {
using namespace test;

// f32 throughout; only the summation order and expf differ: relative L2 < 1e-5.
TEST(CudaAttention, CausalPrefillMatchesCpu) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(31);
  for (auto [B, T, H, D, Dv, packed] : {std::tuple{2, 77, 3, 192, 128, true}, std::tuple{1, 300, 2, 64, 64, false},
                                        std::tuple{3, 5, 4, 24, 40, true}, std::tuple{1, 1, 1, 192, 128, false}}) {
    const CausalInputs in = causal_inputs(B, T, H, D, Dv, packed, 0, rng);
    auto dout = poisoned<float>(size_t(B * T * H * Dv));
    attention_causal(in.pq, in.sq, in.pk, in.sk, in.pv, in.sv, dout.get(), Strides3{T * H * Dv, H * Dv, Dv}, B, T, H, D, Dv, in.scale);
    const auto out = download(dout);
    ASSERT_TRUE(all_finite(out));
    EXPECT_LT(rel_l2(out, vec(in.o)), 1e-5) << B << "x" << T << "x" << H << " D " << D << " Dv " << Dv;
  }
}

// Contiguous f32 latent cache, as the CPU's: relative L2 < 1e-5.
TEST(CudaAttention, LatentDecodeMatchesCpu) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(32);
  for (auto [n, H, L] : {std::tuple{3, 16, 1000}, std::tuple{1, 128, 4099}, std::tuple{2, 20, 1}}) {
    const int64_t W = 576, R = 512;
    const std::vector<float> q = randn(size_t(n * H * W), rng), cache = randn(size_t(L * W), rng);
    std::vector<int64_t> pos(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) pos[size_t(i)] = std::max<int64_t>(0, L - 1 - i * 317);
    const float scale = 0.0417f;
    Tensor o = Tensor::empty(DType::F32, {n, H, R});
    ops::attention_latent(Tensor::from_vector(q, {n, H, W}), Tensor::from_vector(cache, {L, W}), pos.data(), scale, o);
    LatentAttention p;
    p.batch = 1;
    p.s_q = n;
    p.heads = H;
    p.W = W;
    p.R = R;
    p.max_len = L;
    p.scale = scale;
    auto dq = upload(q);
    auto dc = upload(cache);
    std::vector<int32_t> pos32(pos.begin(), pos.end());
    auto dp = upload(pos32);
    DeviceBuffer<uint8_t> ws(attention_latent_workspace_bytes(p));
    auto dout = poisoned<float>(size_t(n * H * R));
    attention_latent(p, dq.get(), DType::F32, dc.get(), nullptr, dp.get(), dout.get(), ws.get(), ws.size());
    const auto out = download(dout);
    ASSERT_TRUE(all_finite(out));
    EXPECT_LT(rel_l2(out, vec(o)), 1e-5) << "n " << n << " H " << H << " L " << L;
  }
}

// Paged bf16 cache (block size 64, blocks shuffled across sequences) on the tensor-core kernels: q and the
// probabilities are rounded to bf16 for the two products (f32 accumulation), so the tolerance against the f32 CPU
// twin (which sees the same bf16 cache values) is relative L2 < 1e-2. Cases: DeepSeek-V3's width with 20 heads
// (streaming kernel, one padded 16-head group) and 128 (64-head kernel) on 2 query tokens a sequence (MTP
// verification), small.json's width; 70 short sequences (one split each, several laps of the 4-stage ring, rows
// past the end inside the last tile); one long sequence with 3 heads (many two-tile splits); 16 sequences up to 4096
// rows at both widths (two blocks per SM, q in shared memory).
struct PagedCase {
  int64_t H, W, R, s_q;
  std::vector<int64_t> lens;
};
std::vector<int64_t> many_lens() {
  std::mt19937_64 r(5);
  std::vector<int64_t> v(70);
  for (auto& l : v) l = 1 + int64_t(r() % 700);
  return v;
}
// 16 sequences up to 4096 rows: long enough splits that the streaming kernel runs two blocks per SM.
std::vector<int64_t> long_lens() { return {4096, 1, 2500, 4095, 64, 3333, 4096, 129, 4000, 17, 2048, 4096, 700, 3900, 1000, 4096}; }
class PagedDecode : public ::testing::TestWithParam<PagedCase> {};
TEST_P(PagedDecode, MatchesCpu) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(33);
  const PagedCase& pc = GetParam();
  const int64_t W = pc.W, R = pc.R, H = pc.H, bs = 64, s_q = pc.s_q;
  const std::vector<int64_t>& lens = pc.lens;
  const int64_t batch = int64_t(lens.size());
  int64_t max_len = 0, total_blocks = 0;
  for (int64_t l : lens) {
    max_len = std::max(max_len, l);
    total_blocks += ceil_div(l, bs);
  }
  const int64_t max_blocks = ceil_div(max_len, bs), pool_blocks = total_blocks + 5;
  std::vector<int32_t> perm(static_cast<size_t>(pool_blocks));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> table(size_t(batch * max_blocks), -1);
  int64_t next = 0;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t j = 0; j < ceil_div(lens[size_t(b)], bs); ++j) table[size_t(b * max_blocks + j)] = perm[size_t(next++)];
  const std::vector<uint16_t> pool = to_bf16(randn(size_t(pool_blocks * bs * W), rng));
  const std::vector<float> q = randn(size_t(batch * s_q * H * W), rng);
  std::vector<int32_t> pos(static_cast<size_t>(batch * s_q));
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < s_q; ++i) pos[size_t(b * s_q + i)] = int32_t(std::max<int64_t>(0, lens[size_t(b)] - s_q + i));
  const float scale = 0.0417f;
  std::vector<float> ref;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t L = lens[size_t(b)];
    std::vector<float> cache(static_cast<size_t>(L * W));
    for (int64_t r = 0; r < L; ++r) {
      const int64_t phys = int64_t(table[size_t(b * max_blocks + r / bs)]) * bs + r % bs;
      for (int64_t c = 0; c < W; ++c) cache[size_t(r * W + c)] = bf16_to_f32(pool[size_t(phys * W + c)]);
    }
    std::vector<float> qb(q.begin() + b * s_q * H * W, q.begin() + (b + 1) * s_q * H * W);
    std::vector<int64_t> pb(pos.begin() + b * s_q, pos.begin() + (b + 1) * s_q);
    Tensor o = Tensor::empty(DType::F32, {s_q, H, R});
    ops::attention_latent(Tensor::from_vector(qb, {s_q, H, W}), Tensor::from_vector(cache, {L, W}), pb.data(), scale, o);
    const auto ov = vec(o);
    ref.insert(ref.end(), ov.begin(), ov.end());
  }
  LatentAttention p;
  p.batch = batch;
  p.s_q = s_q;
  p.heads = H;
  p.W = W;
  p.R = R;
  p.block_size = bs;
  p.max_blocks = max_blocks;
  p.max_len = max_len;
  p.scale = scale;
  auto dq = upload(q);
  auto dpool = upload(pool);
  auto dt = upload(table);
  auto dp = upload(pos);
  DeviceBuffer<uint8_t> ws(attention_latent_workspace_bytes(p));
  auto dout = poisoned<float>(size_t(batch * s_q * H * R));
  attention_latent(p, dq.get(), DType::BF16, dpool.get(), dt.get(), dp.get(), dout.get(), ws.get(), ws.size());
  const auto out = download(dout);
  ASSERT_TRUE(all_finite(out));
  const double e = rel_l2(out, ref);
  std::printf("paged bf16 decode, H %lld W %lld, %lld sequences x %lld tokens: rel L2 %.2e\n", (long long)H, (long long)W,
              (long long)batch, (long long)s_q, e);
  EXPECT_LT(e, 1e-2);
}
INSTANTIATE_TEST_SUITE_P(CudaAttention, PagedDecode,
                         ::testing::Values(PagedCase{20, 576, 512, 2, {1500, 64, 3001, 2}}, PagedCase{128, 576, 512, 2, {1500, 64, 3001, 2}},
                                           PagedCase{16, 288, 256, 2, {1500, 64, 3001, 2}}, PagedCase{16, 576, 512, 1, many_lens()},
                                           PagedCase{3, 288, 256, 1, {5000}}, PagedCase{16, 576, 512, 1, long_lens()},
                                           PagedCase{16, 288, 256, 1, long_lens()}));

}  // namespace
}  // namespace dsv3::cuda
