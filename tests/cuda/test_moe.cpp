// Routed-expert kernels (moe_ops.h) against a CPU twin of Moe::forward's routed part (src/model/modules.cpp):
// y[m] = Σ_j w[m,j] · down(silu(gate·x) * (up·x)), summed in ascending expert order, + y when accumulating.
// The twin computes in float64 from the same (dequantized) weights.
//   permutation: exact (counts, offsets, perm, inverse)
//   decode (bf16 and fp8 weights, f32 x and sums): rel. L2 <= 1e-5, bitwise identical between two runs and
//     between a direct call and a CUDA-graph replay
//   prefill (x and h rounded to bf16 for cuBLASLt): <= 2e-3 against a twin that rounds at the same points,
//     <= 1e-2 against the exact twin; fp8 (activations quantized 1x128): <= 6e-2 against the exact twin
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <numeric>

#include "cuda_test_util.h"
#include "kernels/cuda/infer_ops.h"
#include "kernels/cuda/moe_ops.h"

namespace dsv3::cuda::test {
namespace {

struct HostExperts {
  int64_t E, D, I;
  bool fp8 = false;
  std::vector<std::vector<float>> gu, dn;  // dequantized f32 values: [2I, D], [D, I]
  // stored form
  std::vector<std::vector<uint16_t>> gu16, dn16;
  std::vector<std::vector<uint8_t>> gu8, dn8;
  std::vector<std::vector<float>> gus, dns;
};

// DeepSeek's block quantization of a [N, K] matrix: e4m3 values, scale = amax / 448 per 128x128 block.
void quantize_blocks(const std::vector<float>& w, int64_t N, int64_t K, std::vector<uint8_t>& q, std::vector<float>& s,
                     std::vector<float>& deq) {
  const int64_t nb = ceil_div(N, 128), kb = ceil_div(K, 128);
  q.assign(size_t(N * K), 0);
  s.assign(size_t(nb * kb), 1.0f);
  deq.assign(size_t(N * K), 0.0f);
  for (int64_t i = 0; i < nb; ++i)
    for (int64_t j = 0; j < kb; ++j) {
      float amax = 0;
      for (int64_t r = i * 128; r < std::min(N, i * 128 + 128); ++r)
        for (int64_t c = j * 128; c < std::min(K, j * 128 + 128); ++c) amax = std::max(amax, std::fabs(w[size_t(r * K + c)]));
      const float sc = amax > 0 ? amax / kFp8E4M3Max : 1.0f;
      s[size_t(i * kb + j)] = sc;
      for (int64_t r = i * 128; r < std::min(N, i * 128 + 128); ++r)
        for (int64_t c = j * 128; c < std::min(K, j * 128 + 128); ++c) {
          const uint8_t v = f32_to_fp8_e4m3_saturate(w[size_t(r * K + c)] / sc);
          q[size_t(r * K + c)] = v;
          deq[size_t(r * K + c)] = fp8_e4m3_to_f32(v) * sc;
        }
    }
}

HostExperts make_experts(int64_t E, int64_t D, int64_t I, bool fp8, std::mt19937_64& rng) {
  HostExperts h{E, D, I, fp8, {}, {}, {}, {}, {}, {}, {}, {}};
  for (int64_t e = 0; e < E; ++e) {
    auto g = randn(size_t(2 * I * D), rng, 1.0f / std::sqrt(float(D)));
    auto d = randn(size_t(D * I), rng, 1.0f / std::sqrt(float(I)));
    if (!fp8) {
      h.gu16.push_back(to_bf16(g));
      h.dn16.push_back(to_bf16(d));
      h.gu.push_back(from_bf16(h.gu16.back()));
      h.dn.push_back(from_bf16(h.dn16.back()));
    } else {
      // gate and up quantized separately (each its own blocks), scale rows stacked gate then up.
      std::vector<float> gpart(g.begin(), g.begin() + I * D), upart(g.begin() + I * D, g.end());
      std::vector<uint8_t> qg, qu, qd;
      std::vector<float> sg, su, sd, dg, du, dd;
      quantize_blocks(gpart, I, D, qg, sg, dg);
      quantize_blocks(upart, I, D, qu, su, du);
      quantize_blocks(d, D, I, qd, sd, dd);
      qg.insert(qg.end(), qu.begin(), qu.end());
      sg.insert(sg.end(), su.begin(), su.end());
      dg.insert(dg.end(), du.begin(), du.end());
      h.gu8.push_back(qg), h.gus.push_back(sg), h.gu.push_back(dg);
      h.dn8.push_back(qd), h.dns.push_back(sd), h.dn.push_back(dd);
    }
  }
  return h;
}

struct DeviceExperts {
  std::vector<DeviceBuffer<uint16_t>> b16;
  std::vector<DeviceBuffer<uint8_t>> b8;
  std::vector<DeviceBuffer<float>> sc;
  MoeExperts view;
};
std::unique_ptr<DeviceExperts> upload_experts(const HostExperts& h) {
  auto d = std::make_unique<DeviceExperts>();
  std::vector<const void*> gu, dn;
  std::vector<const float*> gus, dns;
  for (int64_t e = 0; e < h.E; ++e) {
    if (!h.fp8) {
      d->b16.push_back(upload(h.gu16[size_t(e)]));
      gu.push_back(d->b16.back().get());
      d->b16.push_back(upload(h.dn16[size_t(e)]));
      dn.push_back(d->b16.back().get());
    } else {
      d->b8.push_back(upload(h.gu8[size_t(e)]));
      gu.push_back(d->b8.back().get());
      d->b8.push_back(upload(h.dn8[size_t(e)]));
      dn.push_back(d->b8.back().get());
      d->sc.push_back(upload(h.gus[size_t(e)]));
      gus.push_back(d->sc.back().get());
      d->sc.push_back(upload(h.dns[size_t(e)]));
      dns.push_back(d->sc.back().get());
    }
  }
  d->view = MoeExperts(h.E, h.D, h.I, h.fp8 ? DType::F8_E4M3 : DType::BF16, gu, dn, gus, dns);
  return d;
}

// top_k distinct experts per token; with `skew` most tokens pick from the first few experts (large groups).
void make_routing(int64_t M, int64_t k, int64_t E, bool skew, std::mt19937_64& rng, std::vector<int32_t>& idx,
                  std::vector<float>& w) {
  idx.resize(size_t(M * k));
  w.resize(size_t(M * k));
  std::uniform_real_distribution<float> ud(0.05f, 1.0f);
  for (int64_t m = 0; m < M; ++m) {
    std::vector<int32_t> pool(static_cast<size_t>(E));
    std::iota(pool.begin(), pool.end(), 0);
    if (skew) std::shuffle(pool.begin(), pool.begin() + std::min<int64_t>(E, k + 2), rng);
    else std::shuffle(pool.begin(), pool.end(), rng);
    for (int64_t j = 0; j < k; ++j) idx[size_t(m * k + j)] = pool[size_t(j)], w[size_t(m * k + j)] = ud(rng);
  }
}

// DeepSeek's act_quant on one row (quantize_fp8_1x128): per 128-wide tile s = amax / 448 (1 if all zero), the
// values replaced by e4m3(v / s) · s, the f32 division as the kernel does it.
template <class V>
void quantize_row_1x128(V& row) {
  const size_t n = row.size();
  for (size_t j0 = 0; j0 < n; j0 += 128) {
    const size_t j1 = std::min(n, j0 + 128);
    float amax = 0;
    for (size_t j = j0; j < j1; ++j) amax = std::max(amax, std::fabs(float(row[j])));
    const float s = amax > 0 ? amax / kFp8E4M3Max : 1.0f;
    for (size_t j = j0; j < j1; ++j) row[j] = fp8_e4m3_to_f32(f32_to_fp8_e4m3_saturate(float(row[j]) / s)) * s;
  }
}

// The twin: float64, ascending expert order per token; round_x / round_h mimic the prefill's bf16 operands;
// quant_acts its e4m3 ones (FP8 path): x quantized per 1x128 tile, h rounded to bf16 and then quantized; round_out
// the bf16 expert outputs of the grouped bf16-activation path.
std::vector<float> reference(const HostExperts& h, const std::vector<float>& x, const std::vector<int32_t>& idx,
                             const std::vector<float>& w, int64_t M, int64_t k, const std::vector<float>* y0,
                             bool round_x = false, bool round_h = false, bool quant_acts = false, bool round_out = false) {
  const int64_t D = h.D, I = h.I;
  std::vector<float> y(size_t(M * D));
  std::vector<double> hv(static_cast<size_t>(I)), acc(static_cast<size_t>(D));
  for (int64_t m = 0; m < M; ++m) {
    std::vector<int64_t> order(static_cast<size_t>(k));
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return idx[size_t(m * k + a)] < idx[size_t(m * k + b)]; });
    std::fill(acc.begin(), acc.end(), 0.0);
    std::vector<float> xr(x.begin() + m * D, x.begin() + (m + 1) * D);
    if (round_x) xr = round_bf16(xr);
    if (quant_acts) quantize_row_1x128(xr);
    for (int64_t j : order) {
      const auto& gu = h.gu[size_t(idx[size_t(m * k + j)])];
      const auto& dn = h.dn[size_t(idx[size_t(m * k + j)])];
      for (int64_t i = 0; i < I; ++i) {
        double g = 0, u = 0;
        for (int64_t d = 0; d < D; ++d) g += double(gu[size_t(i * D + d)]) * xr[size_t(d)], u += double(gu[size_t((I + i) * D + d)]) * xr[size_t(d)];
        double hh = g / (1.0 + std::exp(-g)) * u;
        if (round_h) hh = double(bf16_to_f32(f32_to_bf16(float(hh))));
        hv[size_t(i)] = hh;
      }
      if (quant_acts) quantize_row_1x128(hv);
      for (int64_t d = 0; d < D; ++d) {
        double o = 0;
        for (int64_t i = 0; i < I; ++i) o += double(dn[size_t(d * I + i)]) * hv[size_t(i)];
        if (round_out) o = double(bf16_to_f32(f32_to_bf16(float(o))));
        acc[size_t(d)] += double(w[size_t(m * k + j)]) * o;
      }
    }
    for (int64_t d = 0; d < D; ++d) y[size_t(m * D + d)] = float(acc[size_t(d)] + (y0 ? double((*y0)[size_t(m * D + d)]) : 0.0));
  }
  return y;
}

TEST(CudaMoe, PermutationIsExactAndStable) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(11);
  struct C {
    int64_t M, k, E;
    bool skew;
  };
  // (40000 x 8: 157 chunks of 2048 slots, eight steps of 256 each; 30000 x 9: 1024 experts, the largest tables)
  for (const C c : {C{1, 6, 64, false}, C{300, 6, 64, false}, C{1000, 8, 256, true}, C{37, 3, 1000, false},
                    C{40000, 8, 64, true}, C{30000, 9, 1024, false}}) {
    std::vector<int32_t> idx;
    std::vector<float> w;
    make_routing(c.M, c.k, c.E, c.skew, rng, idx, w);
    const int64_t S = c.M * c.k;
    auto didx = upload(idx);
    auto counts = poisoned<int32_t>(size_t(c.E)), offsets = poisoned<int32_t>(size_t(c.E + 1));
    auto perm = poisoned<int32_t>(size_t(S)), slot_row = poisoned<int32_t>(size_t(S));
    DeviceBuffer<int32_t> scratch(size_t(moe_permute_chunks(c.M, c.k) * c.E));
    moe_permute(didx.get(), c.M, c.k, c.E, counts.get(), offsets.get(), perm.get(), slot_row.get(), scratch.get());
    // Host: stable sort of slots by expert.
    std::vector<int32_t> hp(static_cast<size_t>(S));
    std::iota(hp.begin(), hp.end(), 0);
    std::stable_sort(hp.begin(), hp.end(), [&](int32_t a, int32_t b) { return idx[size_t(a)] < idx[size_t(b)]; });
    std::vector<int32_t> hc(size_t(c.E), 0), ho(size_t(c.E + 1), 0), hinv(static_cast<size_t>(S));
    for (int32_t e : idx) ++hc[size_t(e)];
    for (int64_t e = 0; e < c.E; ++e) ho[size_t(e + 1)] = ho[size_t(e)] + hc[size_t(e)];
    for (int64_t r = 0; r < S; ++r) hinv[size_t(hp[size_t(r)])] = int32_t(r);
    EXPECT_EQ(download(counts), hc) << c.M;
    EXPECT_EQ(download(offsets), ho) << c.M;
    EXPECT_EQ(download(perm), hp) << c.M;
    EXPECT_EQ(download(slot_row), hinv) << c.M;
  }
}

TEST(CudaMoe, GatherAndUnpermuteMatchCpu) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(12);
  const int64_t M = 50, k = 4, E = 16, D = 72;
  std::vector<int32_t> idx;
  std::vector<float> w;
  make_routing(M, k, E, false, rng, idx, w);
  auto x = randn(size_t(M * D), rng);
  auto didx = upload(idx);
  auto dw = upload(w);
  auto dx = upload(x);
  DeviceBuffer<int32_t> counts(E), offsets(E + 1), perm(M * k), slot_row(M * k), scratch(moe_permute_chunks(M, k) * E);
  moe_permute(didx.get(), M, k, E, counts.get(), offsets.get(), perm.get(), slot_row.get(), scratch.get());
  auto g32 = poisoned<float>(size_t(M * k * D));
  moe_gather(dx.get(), D, perm.get(), M * k, k, D, DType::F32, g32.get(), D);
  const auto hp = download(perm);
  const auto hg = download(g32);
  for (int64_t r = 0; r < M * k; ++r)
    for (int64_t d = 0; d < D; ++d) ASSERT_EQ(hg[size_t(r * D + d)], x[size_t(hp[size_t(r)] / k * D + d)]);
  // Un-permute of a random expert output, accumulate onto y0.
  auto eo = randn(size_t(M * k * D), rng);
  auto y0 = randn(size_t(M * D), rng);
  auto deo = upload(eo);
  auto dy = upload(y0);
  moe_unpermute(deo.get(), D, slot_row.get(), didx.get(), dw.get(), M, k, D, dy.get(), D, true);
  const auto hs = download(slot_row);
  std::vector<float> ref(size_t(M * D));
  for (int64_t m = 0; m < M; ++m) {
    std::vector<int64_t> order(static_cast<size_t>(k));
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return idx[size_t(m * k + a)] < idx[size_t(m * k + b)]; });
    for (int64_t d = 0; d < D; ++d) {
      float a = 0;
      for (int64_t j : order) a += eo[size_t(hs[size_t(m * k + j)] * D + d)] * w[size_t(m * k + j)];
      ref[size_t(m * D + d)] = a + y0[size_t(m * D + d)];
    }
  }
  // Same order of f32 operations; only FMA contraction (nvcc fuses, the host build may not) can differ.
  const auto got = download(dy);
  EXPECT_LT(rel_l2(got, ref), 1e-6);
  // An output off 16 bytes takes the one-column-a-thread path: the same sums, bit for bit.
  std::vector<float> y1(size_t(M * D + 1), 0.0f);
  std::copy(y0.begin(), y0.end(), y1.begin() + 1);
  auto dy1 = upload(y1);
  moe_unpermute(deo.get(), D, slot_row.get(), didx.get(), dw.get(), M, k, D, dy1.get() + 1, D, true);
  const auto got1 = download(dy1);
  EXPECT_TRUE(std::equal(got.begin(), got.end(), got1.begin() + 1));
}

struct DecodeCase {
  int64_t M, k, E, D, I;
  bool fp8, skew, accumulate;
};

class CudaMoeDecode : public ::testing::TestWithParam<DecodeCase> {};

TEST_P(CudaMoeDecode, MatchesCpuTwin) {
  DSV3_REQUIRE_GPU();
  const DecodeCase c = GetParam();
  std::mt19937_64 rng(100 + c.M * 7 + c.D);
  const HostExperts h = make_experts(c.E, c.D, c.I, c.fp8, rng);
  auto dev = upload_experts(h);
  std::vector<int32_t> idx;
  std::vector<float> w;
  make_routing(c.M, c.k, c.E, c.skew, rng, idx, w);
  const int64_t ldx = c.D + 8, ldy = c.D + 4;
  std::vector<float> x(size_t(c.M * ldx)), xc(size_t(c.M * c.D));
  auto xr = randn(size_t(c.M * c.D), rng);
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t d = 0; d < c.D; ++d) x[size_t(m * ldx + d)] = xc[size_t(m * c.D + d)] = xr[size_t(m * c.D + d)];
  auto y0 = randn(size_t(c.M * c.D), rng);
  std::vector<float> y0s(size_t(c.M * ldy), 0.0f);
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t d = 0; d < c.D; ++d) y0s[size_t(m * ldy + d)] = y0[size_t(m * c.D + d)];
  auto dx = upload(x);
  auto didx = upload(idx);
  auto dw = upload(w);
  const size_t wsb = moe_decode_workspace_bytes(c.M, c.k, c.E, c.I, 0, c.D);
  DeviceBuffer<uint8_t> ws(wsb);
  auto run = [&](cudaStream_t s) {
    DeviceBuffer<float> dy = c.accumulate ? upload(y0s) : poisoned<float>(y0s.size());
    moe_decode(dev->view, dx.get(), ldx, didx.get(), dw.get(), c.M, c.k, dy.get(), ldy, c.accumulate, ws.get(), wsb, s);
    synchronize(s);
    auto out = download(dy);
    std::vector<float> o(size_t(c.M * c.D));
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t d = 0; d < c.D; ++d) o[size_t(m * c.D + d)] = out[size_t(m * ldy + d)];
    return o;
  };
  const auto got = run(nullptr);
  const auto ref = reference(h, xc, idx, w, c.M, c.k, c.accumulate ? &y0 : nullptr);
  ASSERT_TRUE(all_finite(got));
  const double err = rel_l2(got, ref);
  std::printf("  decode M %lld k %lld E %lld D %lld I %lld %s%s: rel L2 %.2e\n", (long long)c.M, (long long)c.k, (long long)c.E,
              (long long)c.D, (long long)c.I, c.fp8 ? "fp8" : "bf16", c.skew ? " skewed" : "", err);
  EXPECT_LT(err, 1e-5);
  EXPECT_EQ(run(nullptr), got) << "not reproducible";
  if (c.M > kGemvMaxM) {  // the grouped down kernel's per-slot rows need the model width in the workspace size
    const size_t small = moe_decode_workspace_bytes(c.M, c.k, c.E, c.I);
    DeviceBuffer<uint8_t> ws_small(small);
    DeviceBuffer<float> dy(y0s.size());
    EXPECT_THROW(moe_decode(dev->view, dx.get(), ldx, didx.get(), dw.get(), c.M, c.k, dy.get(), ldy, false, ws_small.get(), small), Error);
  }
  // The same call captured in a CUDA graph replays to the same bits.
  Stream stream;
  cudaStream_t s = stream.get();
  DeviceBuffer<float> dy = c.accumulate ? upload(y0s) : poisoned<float>(y0s.size());
  synchronize();
  Graph g;
  g.begin(s);
  moe_decode(dev->view, dx.get(), ldx, didx.get(), dw.get(), c.M, c.k, dy.get(), ldy, false, ws.get(), wsb, s);
  g.end(s);
  g.launch(s);
  synchronize(s);
  if (!c.accumulate) {
    auto out = download(dy);
    std::vector<float> o(size_t(c.M * c.D));
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t d = 0; d < c.D; ++d) o[size_t(m * c.D + d)] = out[size_t(m * ldy + d)];
    EXPECT_EQ(o, got) << "graph replay differs";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaMoeDecode,
    ::testing::Values(DecodeCase{1, 6, 64, 1024, 352, false, false, false}, DecodeCase{3, 6, 64, 1024, 352, false, false, true},
                      DecodeCase{17, 6, 64, 1024, 352, false, true, false}, DecodeCase{64, 6, 64, 1024, 352, false, false, true},
                      DecodeCase{5, 3, 10, 264, 40, false, false, true}, DecodeCase{2, 8, 256, 512, 2304, false, false, false},
                      DecodeCase{1, 6, 64, 1024, 352, true, false, false}, DecodeCase{9, 6, 64, 1024, 352, true, true, true},
                      DecodeCase{4, 4, 16, 384, 200, true, false, true}),
    [](const ::testing::TestParamInfo<DecodeCase>& i) {
      const DecodeCase& c = i.param;
      return "M" + std::to_string(c.M) + "k" + std::to_string(c.k) + "E" + std::to_string(c.E) + "D" + std::to_string(c.D) +
             "I" + std::to_string(c.I) + (c.fp8 ? "_fp8" : "_bf16") + (c.skew ? "_skew" : "") + (c.accumulate ? "_acc" : "");
    });

// The shared expert folded into moe_decode: y = Σ routed + shared(x) (+ y), against the twin with the shared expert's
// output as y0; with M up to 64 and a shared width (2·I, 3·I + 8) unlike the routed experts'.
TEST(CudaMoeDecodeShared, MatchesCpuTwin) {
  DSV3_REQUIRE_GPU();
  struct Case {
    int64_t M, k, E, D, I, Is;
    bool fp8, accumulate;
  };
  for (const Case c : {Case{1, 6, 64, 1024, 352, 704, false, false}, Case{1, 6, 64, 1024, 352, 704, true, false},
                       Case{64, 6, 64, 1024, 352, 704, false, true}, Case{5, 3, 10, 264, 40, 128, true, true},
                       Case{3, 8, 256, 512, 2304, 2304, false, false}}) {
    std::mt19937_64 rng(300 + c.M + c.Is);
    const HostExperts h = make_experts(c.E, c.D, c.I, c.fp8, rng);
    const HostExperts hs = make_experts(1, c.D, c.Is, c.fp8, rng);
    auto dev = upload_experts(h);
    auto devs = upload_experts(hs);
    std::vector<int32_t> idx;
    std::vector<float> w;
    make_routing(c.M, c.k, c.E, false, rng, idx, w);
    const auto x = randn(size_t(c.M * c.D), rng), y0 = randn(size_t(c.M * c.D), rng);
    // shared(x) (+ y0): the twin of one expert of weight 1 per token.
    std::vector<float> base = reference(hs, x, std::vector<int32_t>(size_t(c.M), 0), std::vector<float>(size_t(c.M), 1.0f), c.M, 1,
                                        c.accumulate ? &y0 : nullptr);
    const auto ref = reference(h, x, idx, w, c.M, c.k, &base);
    auto dx = upload(x);
    auto didx = upload(idx);
    auto dw = upload(w);
    MoeSharedExpert sh;
    sh.gate_up = devs->view.gate_up[0], sh.down = devs->view.down[0], sh.I = c.Is;
    if (c.fp8) sh.gate_up_scale = devs->view.gate_up_scale[0], sh.down_scale = devs->view.down_scale[0];
    const size_t wsb = moe_decode_workspace_bytes(c.M, c.k, c.E, c.I, c.Is, c.D);
    DeviceBuffer<uint8_t> ws(wsb);
    DeviceBuffer<float> dy = c.accumulate ? upload(y0) : poisoned<float>(y0.size());
    moe_decode(dev->view, dx.get(), c.D, didx.get(), dw.get(), c.M, c.k, dy.get(), c.D, c.accumulate, ws.get(), wsb, nullptr, &sh);
    const auto got = download(dy);
    ASSERT_TRUE(all_finite(got));
    const double err = rel_l2(got, ref);
    std::printf("  decode + shared M %lld I %lld Is %lld %s: rel L2 %.2e\n", (long long)c.M, (long long)c.I, (long long)c.Is,
                c.fp8 ? "fp8" : "bf16", err);
    EXPECT_LT(err, 1e-5);
    EXPECT_THROW(moe_decode(dev->view, dx.get(), c.D, didx.get(), dw.get(), c.M, c.k, dy.get(), c.D, false, ws.get(),
                            moe_decode_workspace_bytes(c.M, c.k, c.E, c.I), nullptr, &sh),
                 Error)
        << "a workspace without room for the shared expert";
  }
}

// The grouped kernels round x, the dequantized FP8 weights and h to bf16 (f32 accumulation): against a float64
// twin that rounds at the same points, relative L2 < 2e-3 for both checkpoint types; < 1e-2 against the exact
// twin. Cases: 32 experts with skewed routing (empty experts, I = 352 leaves a partial column tile) and 8
// experts x ~450 rows (several row tiles per expert, partial last ones).
// rows_gemm (a dense product of decode batches on the grouped kernel, K split over a cluster): y = x · Wᵀ with W
// bf16, or e4m3 dequantized to bf16 in the kernel (bf16(e4m3 · block scale)); the twin rounds at the same point
// and sums in float64, so only the kernel's f32 accumulation differs: rel L2 <= 1e-5. Padded row strides: the
// columns past N stay untouched. Two runs give the same bits (the cluster sums in rank order).
TEST(CudaRowsGemm, MatchesCpuTwin) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(91);
  struct Case { int64_t M, N, K, ldx, ldy; };
  for (const Case c : {Case{1, 200, 128, 128, 200}, Case{5, 672, 1024, 1032, 674}, Case{33, 1536, 384, 384, 1542},
                       Case{64, 1024, 704, 704, 1024}, Case{128, 300, 352, 368, 300}}) {
    const auto wf = randn(size_t(c.N * c.K), rng, 1.0f / std::sqrt(float(c.K)));
    std::vector<uint8_t> q;
    std::vector<float> sc, deq;
    quantize_blocks(wf, c.N, c.K, q, sc, deq);
    deq = round_bf16(deq);
    const auto xf = round_bf16(randn(size_t(c.M * c.ldx), rng));
    std::vector<float> want(size_t(c.M * c.N));
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t n = 0; n < c.N; ++n) {
        double a = 0;
        for (int64_t k = 0; k < c.K; ++k) a += double(xf[size_t(m * c.ldx + k)]) * deq[size_t(n * c.K + k)];
        want[size_t(m * c.N + n)] = float(a);
      }
    for (const bool fp8 : {true, false}) {
      auto dx = upload(to_bf16(xf));
      auto dq = upload(q);
      auto dw16 = upload(to_bf16(deq));  // bf16 weights: the same (already bf16) values
      auto ds = upload(sc);
      auto dy = poisoned<float>(size_t(c.M * c.ldy));
      ASSERT_TRUE(rows_gemm_supported(dx.get(), c.ldx, c.M, c.K, dy.get(), c.ldy));
      const void* wp = fp8 ? static_cast<const void*>(dq.get()) : static_cast<const void*>(dw16.get());
      rows_gemm(fp8 ? DType::F8_E4M3 : DType::BF16, dx.get(), c.ldx, c.M, wp, ds.get(), c.N, c.K, dy.get(), c.ldy);
      const auto y = download(dy);
      rows_gemm(fp8 ? DType::F8_E4M3 : DType::BF16, dx.get(), c.ldx, c.M, wp, ds.get(), c.N, c.K, dy.get(), c.ldy);
      EXPECT_EQ(std::memcmp(y.data(), download(dy).data(), y.size() * 4), 0) << "two runs differ";
      std::vector<float> got(size_t(c.M * c.N));
      bool pad_untouched = true;
      for (int64_t m = 0; m < c.M; ++m) {
        for (int64_t n = 0; n < c.N; ++n) got[size_t(m * c.N + n)] = y[size_t(m * c.ldy + n)];
        for (int64_t n = c.N; n < c.ldy; ++n) pad_untouched = pad_untouched && std::isnan(y[size_t(m * c.ldy + n)]);
      }
      const double e = rel_l2(got, want);
      std::printf("  rows_gemm %s M %lld N %lld K %lld: rel L2 %.2e\n", fp8 ? "fp8" : "bf16", (long long)c.M, (long long)c.N,
                  (long long)c.K, e);
      EXPECT_TRUE(all_finite(got));
      EXPECT_LT(e, 1e-5);
      EXPECT_TRUE(pad_untouched);
    }
  }
  EXPECT_FALSE(rows_gemm_supported(nullptr, 128, kRowsGemmMaxRows + 1, 128, nullptr, 128));
  EXPECT_FALSE(rows_gemm_fp8_supported(kRowsGemmMaxRows + 1, 128, nullptr, 128));
  EXPECT_FALSE(rows_gemm_fp8_supported(4, 100, nullptr, 128));
}

// rows_gemm_fp8 (the e4m3 x e4m3 kernel as one group, K split over a cluster): x quantized per 1x128 tile by
// quantize_fp8_1x128, W e4m3 with its block scales. The twin quantizes x the same way and sums exact products in
// float64, so only the f32 accumulation (per 128-wide k block, then promoted) differs: rel L2 <= 1e-5. Padded
// output rows stay untouched; two runs give the same bits.
TEST(CudaRowsGemm, Fp8ActivationsMatchCpuTwin) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(92);
  struct Case { int64_t M, N, K, ldx, ldy; };
  for (const Case c : {Case{1, 200, 128, 128, 200}, Case{9, 672, 1024, 1032, 674}, Case{33, 1536, 384, 384, 1542},
                       Case{64, 1024, 704, 704, 1024}, Case{128, 300, 352, 368, 300}, Case{17, 256, 176, 176, 256},
                       // the golden FP8 model's 40-row products: MTP eh_proj (K 2·D), q_a | kv_a, q_b, o_proj, shared down
                       Case{40, 256, 512, 512, 256}, Case{40, 336, 256, 256, 336}, Case{40, 192, 192, 192, 192},
                       Case{40, 256, 128, 128, 256}, Case{40, 256, 192, 192, 256}}) {
    const auto wf = randn(size_t(c.N * c.K), rng, 1.0f / std::sqrt(float(c.K)));
    std::vector<uint8_t> q;
    std::vector<float> sc, deq;
    quantize_blocks(wf, c.N, c.K, q, sc, deq);
    const auto xf = round_bf16(randn(size_t(c.M * c.ldx), rng));
    std::vector<float> want(size_t(c.M * c.N));
    for (int64_t m = 0; m < c.M; ++m) {
      std::vector<float> xr(xf.begin() + m * c.ldx, xf.begin() + m * c.ldx + c.K);
      quantize_row_1x128(xr);
      for (int64_t n = 0; n < c.N; ++n) {
        double a = 0;
        for (int64_t k = 0; k < c.K; ++k) a += double(xr[size_t(k)]) * deq[size_t(n * c.K + k)];
        want[size_t(m * c.N + n)] = float(a);
      }
    }
    auto dx = upload(to_bf16(xf));
    auto dq = upload(q);
    auto ds = upload(sc);
    DeviceBuffer<uint8_t> xq(size_t(c.M * c.K));
    DeviceBuffer<float> xs(size_t(fp8_act_scale_count(c.M, c.K)));
    auto dy = poisoned<float>(size_t(c.M * c.ldy));
    ASSERT_TRUE(rows_gemm_fp8_supported(c.M, c.K, dy.get(), c.ldy));
    quantize_fp8_1x128(DType::BF16, dx.get(), c.ldx, c.M, c.K, xq.get(), xs.get());
    rows_gemm_fp8(xq.get(), xs.get(), c.M, dq.get(), ds.get(), c.N, c.K, dy.get(), c.ldy);
    const auto y = download(dy);
    rows_gemm_fp8(xq.get(), xs.get(), c.M, dq.get(), ds.get(), c.N, c.K, dy.get(), c.ldy);
    EXPECT_EQ(std::memcmp(y.data(), download(dy).data(), y.size() * 4), 0) << "two runs differ";
    std::vector<float> got(size_t(c.M * c.N));
    bool pad_untouched = true;
    for (int64_t m = 0; m < c.M; ++m) {
      for (int64_t n = 0; n < c.N; ++n) got[size_t(m * c.N + n)] = y[size_t(m * c.ldy + n)];
      for (int64_t n = c.N; n < c.ldy; ++n) pad_untouched = pad_untouched && std::isnan(y[size_t(m * c.ldy + n)]);
    }
    const double e = rel_l2(got, want);
    std::printf("  rows_gemm_fp8 M %lld N %lld K %lld: rel L2 %.2e\n", (long long)c.M, (long long)c.N, (long long)c.K, e);
    EXPECT_TRUE(all_finite(got));
    EXPECT_LT(e, 1e-5);
    EXPECT_TRUE(pad_untouched);
  }
  EXPECT_FALSE(rows_gemm_supported(nullptr, 128, 4, 100, nullptr, 128));
}

// Three ways through the grouped kernels: bf16 experts; FP8 experts dequantized to bf16 in the kernel (bf16
// activations); FP8 experts on e4m3 activations (moe_grouped_*_fp8). Against a twin that rounds and quantizes
// at the same points (the bf16-activation paths also round the expert outputs to bf16), only the f32 accumulation
// order differs (and, rarely, a bf16 or e4m3 rounding of h that
// flips): relative L2 < 2e-3 for all three. Against the exact twin: < 1e-2 for bf16 activations; e4m3
// activations lose ~2.6e-2 per product (test_cuda_gemm's measurement for cuBLASLt's FP8 GEMM), two in a chain:
// < 6e-2. The FP8 path gives the same bits twice (no atomics, fixed order).
// The wgmma tiles (the default for prefill-sized groups) against a float64 host loop, one expert: 128 rows, down K 64 (one k slice:
// descriptors and swizzle) and gate|up K 128; 300 rows (a partial row tile), down K 192 (every stage once) into N 224
// (a partial column tile), gate|up K 224 (a half last slice); gate|up K 256 (four slices: a stage refilled) into
// I 160 (a partial SwiGLU tile) and down K 160 (a half last slice). 1e-5 for f32 out, 4e-3 for bf16 h. Each case in
// each pipeline (DSV3_GROUPED_WGMMA unset: ws256 with TMA weights; wgmma, ws, ws256: 128 x 256 tiles; the
// persistent ones also on one block, and with cp.async weights).
// (ptxas reports no serialised wgmma and no injected warpgroup.arrive for these kernels.)
TEST(CudaMoe, GroupedWgmmaTilesMatchHost) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(79);
  struct Case { int64_t rows, D, I; };
  for (const Case c : {Case{128, 128, 64}, Case{300, 224, 192}, Case{300, 256, 160}}) {
    const int64_t R = c.rows, D = c.D, I = c.I;
    const HostExperts h = make_experts(1, D, I, false, rng);
    auto dev = upload_experts(h);
    const std::vector<float> hd = round_bf16(randn(size_t(R * I), rng)), xd = round_bf16(randn(size_t(R * D), rng));
    auto dh = upload(to_bf16(hd));
    auto dxx = upload(to_bf16(xd));
    auto doff = upload(std::vector<int32_t>{0, int32_t(R)});
    std::vector<float> ref(size_t(R * D)), refh(size_t(R * I));
    const std::vector<float>& dn = h.dn[0];
    const std::vector<float>& gu = h.gu[0];
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t n = 0; n < D; ++n) {
        double a = 0;
        for (int64_t k = 0; k < I; ++k) a += double(hd[size_t(r * I + k)]) * dn[size_t(n * I + k)];
        ref[size_t(r * D + n)] = float(a);
      }
      for (int64_t n = 0; n < I; ++n) {
        double g = 0, u = 0;
        for (int64_t k = 0; k < D; ++k) {
          g += double(xd[size_t(r * D + k)]) * gu[size_t(n * D + k)];
          u += double(xd[size_t(r * D + k)]) * gu[size_t((I + n) * D + k)];
        }
        refh[size_t(r * I + n)] = float(g / (1.0 + std::exp(-g)) * u);
      }
    }
    // The pipelines: k_moe_grouped_wgmma (3 stages, each slice's products waited for), the persistent
    // warp-specialised one (ws) and its 128 x 256 tiles (ws256), each also on one block (every tile of the product
    // in turn, the ring running on across them).
    // With tma, the persistent tiles' weights by TMA copies (the default; DSV3_GROUPED_TMA=0 for cp.async). The
    // default pipeline is ws256 with TMA; wgmma is k_moe_grouped_wgmma.
    // tma_a: the down product's activation rows by TMA too (DSV3_GROUPED_TMA_A=1; not yet GPU-run).
    struct Pipe { const char *mode, *grid; bool tma, tma_a = false; };
    for (const Pipe pp : {Pipe{"", "", true}, Pipe{"wgmma", "", false}, Pipe{"ws", "", false}, Pipe{"ws256", "", false},
                          Pipe{"ws", "1", false}, Pipe{"ws256", "1", false}, Pipe{"ws", "", true}, Pipe{"ws", "1", true},
                          Pipe{"ws256", "1", true}, Pipe{"ws", "", true, true}, Pipe{"ws256", "", true, true},
                          Pipe{"ws256", "1", true, true}}) {
      const char* v = pp.mode;
      if (*v) setenv("DSV3_GROUPED_WGMMA", v, 1);
      if (*pp.grid) setenv("DSV3_GROUPED_WS_GRID", pp.grid, 1);
      if (!pp.tma) setenv("DSV3_GROUPED_TMA", "0", 1);
      if (pp.tma_a) setenv("DSV3_GROUPED_TMA_A", "1", 1);
      auto out = poisoned<float>(size_t(R * D));
      auto hgu = poisoned<uint16_t>(size_t(R * I));
      moe_grouped_down(dev->view, dh.get(), doff.get(), R, out.get());
      moe_grouped_swiglu(dev->view, dxx.get(), doff.get(), R, hgu.get());
      unsetenv("DSV3_GROUPED_WGMMA");
      unsetenv("DSV3_GROUPED_WS_GRID");
      unsetenv("DSV3_GROUPED_TMA");
      unsetenv("DSV3_GROUPED_TMA_A");
      const auto got = download(out);
      const auto goth = from_bf16(download(hgu));
      ASSERT_TRUE(all_finite(got) && all_finite(goth)) << v;
      const double e = rel_l2(got, ref), eh = rel_l2(goth, refh);
      std::printf("  wgmma tiles%s%s%s%s rows %lld D %lld I %lld: down rel L2 %.2e, gate|up + SwiGLU (bf16 h) %.2e\n", *v ? " " : "", v,
                  pp.tma_a ? " (TMA weights and rows)" : pp.tma ? " (TMA weights)" : "", *pp.grid ? " on one block" : "", (long long)R, (long long)D, (long long)I, e, eh);
      EXPECT_LT(e, 1e-5) << v << " " << R << " " << D << " " << I;
      EXPECT_LT(eh, 4e-3) << v << " " << R << " " << D << " " << I;  // h rounded to bf16
    }
  }
}

// The FP8 grouped tiles (moe_grouped_*_fp8) on their own, against a float64 host loop over the same e4m3 values
// (activations quantized on the GPU by quantize_fp8_1x128, read back and dequantized exactly; the experts'
// dequantized blocks): two experts of 200 and 260 rows (partial row tiles), down K 192 / 160 (a partial k block)
// into D 256 / 384, gate|up K 256 / 384. The mma.sync tiles (DSV3_GROUPED_FP8_WGMMA=0) sum each k block's products
// in f32: 1e-5 for f32 out, 4e-3 for bf16 h (its rounding). The wgmma tiles (the default for prefill-sized groups)
// sum a k block inside the tensor core with ~14 significant bits (DeepSeek-V3 §3.3.2; promoted to f32 every 128-wide
// k block, as DeepGEMM does): a few roundings of 2^-13 of the block's sum, 1.1e-4 measured on an H200 (the worst row
// 1.6e-4: no slice or scale misplaced); 1e-3 for f32 out, and h's bf16 rounding still dominates its 4e-3.
TEST(CudaMoe, GroupedFp8TilesMatchHost) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(83);
  struct Case { int64_t D, I; };
  for (const Case c : {Case{256, 192}, Case{384, 160}}) {
    const int64_t E = 2, D = c.D, I = c.I, R = 460;
    const std::vector<int32_t> off{0, 200, int32_t(R)};
    const HostExperts h = make_experts(E, D, I, true, rng);
    auto dev = upload_experts(h);
    auto doff = upload(off);
    // e4m3 activations with their 1x128 scales, as the GPU quantizes them; the host reads back the exact values.
    auto quantized = [&](int64_t K, DeviceBuffer<uint8_t>& q, DeviceBuffer<float>& sc) {
      auto dx = upload(randn(size_t(R * K), rng));
      q = DeviceBuffer<uint8_t>(size_t(R * K));
      sc = DeviceBuffer<float>(size_t(fp8_act_scale_count(R, K)));
      quantize_fp8_1x128(DType::F32, dx.get(), K, R, K, q.get(), sc.get());
      const auto hq = download(q);
      const auto hs = download(sc);
      std::vector<double> v(size_t(R * K));
      for (int64_t r = 0; r < R; ++r)
        for (int64_t k = 0; k < K; ++k)
          v[size_t(r * K + k)] = double(fp8_e4m3_to_f32(hq[size_t(r * K + k)])) * hs[size_t((k / 128) * fp8_act_scale_ld(R) + r)];
      return v;
    };
    DeviceBuffer<uint8_t> xq(1), hq(1);
    DeviceBuffer<float> xs(1), hs(1);
    const std::vector<double> xd = quantized(D, xq, xs), hd = quantized(I, hq, hs);
    std::vector<float> ref(size_t(R * D)), refh(size_t(R * I));
    for (int64_t e = 0; e < E; ++e)
      for (int64_t r = off[size_t(e)]; r < off[size_t(e) + 1]; ++r) {
        const std::vector<float>& dn = h.dn[size_t(e)];
        const std::vector<float>& gu = h.gu[size_t(e)];
        for (int64_t n = 0; n < D; ++n) {
          double a = 0;
          for (int64_t k = 0; k < I; ++k) a += hd[size_t(r * I + k)] * dn[size_t(n * I + k)];
          ref[size_t(r * D + n)] = float(a);
        }
        for (int64_t n = 0; n < I; ++n) {
          double g = 0, u = 0;
          for (int64_t k = 0; k < D; ++k) {
            g += xd[size_t(r * D + k)] * gu[size_t(n * D + k)];
            u += xd[size_t(r * D + k)] * gu[size_t((I + n) * D + k)];
          }
          refh[size_t(r * I + n)] = float(g / (1.0 + std::exp(-g)) * u);
        }
      }
    for (const bool wgmma : {false, true}) {
      if (!wgmma) setenv("DSV3_GROUPED_FP8_WGMMA", "0", 1);
      auto out = poisoned<float>(size_t(R * D));
      auto hgu = poisoned<uint16_t>(size_t(R * I));
      moe_grouped_down_fp8(dev->view, hq.get(), hs.get(), doff.get(), R, out.get());
      moe_grouped_swiglu_fp8(dev->view, xq.get(), xs.get(), fp8_act_scale_ld(R), nullptr, 1, doff.get(), R, hgu.get());
      unsetenv("DSV3_GROUPED_FP8_WGMMA");
      const auto got = download(out);
      const auto goth = from_bf16(download(hgu));
      ASSERT_TRUE(all_finite(got) && all_finite(goth)) << wgmma;
      const double e = rel_l2(got, ref), eh = rel_l2(goth, refh);
      double worst = 0;  // (printed: a slice or scale bug would stand out in some rows)
      for (int64_t r = 0; r < R; ++r) {
        const std::vector<float> a(got.begin() + r * D, got.begin() + (r + 1) * D), b(ref.begin() + r * D, ref.begin() + (r + 1) * D);
        worst = std::max(worst, rel_l2(a, b));
      }
      std::printf("  fp8 %s tiles D %lld I %lld: down rel L2 %.2e (worst row %.2e), gate|up + SwiGLU (bf16 h) %.2e\n",
                  wgmma ? "wgmma" : "mma.sync", (long long)D, (long long)I, e, worst, eh);
      EXPECT_LT(e, wgmma ? 1e-3 : 1e-5) << wgmma << " " << D << " " << I;
      EXPECT_LT(eh, 4e-3) << wgmma << " " << D << " " << I;
    }
  }
}

TEST(CudaMoe, PrefillMatchesCpuTwinAndDecode) {
  DSV3_REQUIRE_GPU();
  struct Case { int64_t M, E, D, I; };
  for (const Case c : {Case{160, 32, 512, 352}, Case{600, 8, 256, 192}, Case{700, 8, 384, 160}})
  for (const int mode : {0, 1, 2}) {
    const bool fp8 = mode > 0, fp8_acts = mode == 2;
    std::mt19937_64 rng(fp8 ? 77 : 78);
    const int64_t M = c.M, k = 6, E = c.E, D = c.D, I = c.I;
    const HostExperts h = make_experts(E, D, I, fp8, rng);
    auto dev = upload_experts(h);
    EXPECT_TRUE(moe_grouped_supported(dev->view));
    EXPECT_EQ(moe_grouped_fp8_supported(dev->view), fp8);
    std::vector<int32_t> idx;
    std::vector<float> w;
    make_routing(M, k, E, true, rng, idx, w);
    auto x = randn(size_t(M * D), rng);
    auto y0 = randn(size_t(M * D), rng);
    auto dx = upload(x);
    auto didx = upload(idx);
    auto dw = upload(w);
    auto dy = upload(y0);
    Gemm gemm;
    const size_t wsb = moe_prefill_workspace_bytes(M, k, E, D, I);
    DeviceBuffer<uint8_t> ws(wsb);
    // e4m3 activations: `got` from the mma.sync e4m3 tiles (each k block's products summed exactly in f32, as the
    // rounding twin); the default wgmma tiles (got_fw) are held to their own bound below.
    if (fp8_acts) setenv("DSV3_GROUPED_FP8_WGMMA", "0", 1);
    moe_prefill(gemm, dev->view, dx.get(), D, didx.get(), dw.get(), M, k, dy.get(), D, true, ws.get(), wsb, nullptr, fp8_acts);
    const auto got = download(dy);
    ASSERT_TRUE(all_finite(got));
    if (!fp8_acts) {  // the gate|up kernel reading the tokens through the permutation: the same products
      auto dy_ng = upload(y0);
      moe_prefill(gemm, dev->view, dx.get(), D, didx.get(), dw.get(), M, k, dy_ng.get(), D, true, ws.get(), wsb, nullptr, false, true);
      EXPECT_EQ(std::memcmp(got.data(), download(dy_ng).data(), got.size() * 4), 0) << "no_gather differs, mode " << mode;
    }
    // The wgmma tiles (the default for prefill-sized groups, here the cases with 64+ slots an expert; the first
    // case's 32-row tiles compare with themselves) vs mma.sync's (DSV3_GROUPED_WGMMA=0): each k16 step's
    // sum is the tensor core's own, so an h value can round to bf16 the other way at a boundary; 1e-4 (the kernels
    // are 2e-3 from the exact twin).
    if (mode == 0) {
      setenv("DSV3_GROUPED_WGMMA", "0", 1);
      auto dy_mma = upload(y0);
      moe_prefill(gemm, dev->view, dx.get(), D, didx.get(), dw.get(), M, k, dy_mma.get(), D, true, ws.get(), wsb, nullptr, false, true);
      unsetenv("DSV3_GROUPED_WGMMA");
      const auto mma = download(dy_mma);
      ASSERT_TRUE(all_finite(mma));
      const double e_mma = rel_l2(mma, got);
      std::printf("  prefill bf16 M %lld E %lld D %lld I %lld: wgmma tiles vs mma.sync rel L2 %.2e\n", (long long)M, (long long)E,
                  (long long)D, (long long)I, e_mma);
      EXPECT_LT(e_mma, 1e-4) << "wgmma tiles";
      // The persistent warp-specialised wgmma tiles (DSV3_GROUPED_WGMMA=ws, and ws256: 128 x 256), reading the tokens
      // through the permutation, on the SMs' resident blocks, on 3 blocks (many tiles each) and a block a tile: the
      // same k16 products in the same order for every output (those left out add only zeros), the same bits.
      // Their weights by TMA (the default) or cp.async (DSV3_GROUPED_TMA=0): the same bytes in the same swizzle;
      // and k_moe_grouped_wgmma (=wgmma, the default before).
      // (tma 2: the down product's rows by TMA too, DSV3_GROUPED_TMA_A=1, not yet GPU-run.)
      for (const char* v : {"ws", "ws256", "wgmma"})
        for (const char* grid : {"", "3", "0"})
          for (int tma : {0, 1, 2}) {
            if (std::string(v) == "wgmma" && (*grid || tma)) continue;
            setenv("DSV3_GROUPED_WGMMA", v, 1);
            if (*grid) setenv("DSV3_GROUPED_WS_GRID", grid, 1);
            if (!tma) setenv("DSV3_GROUPED_TMA", "0", 1);
            if (tma == 2) setenv("DSV3_GROUPED_TMA_A", "1", 1);
            auto dy_ws = upload(y0);
            moe_prefill(gemm, dev->view, dx.get(), D, didx.get(), dw.get(), M, k, dy_ws.get(), D, true, ws.get(), wsb, nullptr, false, true);
            unsetenv("DSV3_GROUPED_WGMMA");
            unsetenv("DSV3_GROUPED_WS_GRID");
            unsetenv("DSV3_GROUPED_TMA");
            unsetenv("DSV3_GROUPED_TMA_A");
            EXPECT_EQ(std::memcmp(got.data(), download(dy_ws).data(), got.size() * 4), 0)
                << v << " tiles differ, grid " << grid << (tma == 2 ? ", TMA weights and rows" : tma ? ", TMA weights" : "");
          }
    }
    std::vector<float> got_fw;  // e4m3 activations on the default (wgmma) tiles, checked below
    if (fp8_acts) {
      auto dy_again = upload(y0);
      moe_prefill(gemm, dev->view, dx.get(), D, didx.get(), dw.get(), M, k, dy_again.get(), D, true, ws.get(), wsb, nullptr, true);
      EXPECT_EQ(std::memcmp(got.data(), download(dy_again).data(), got.size() * 4), 0) << "two runs differ";
      unsetenv("DSV3_GROUPED_FP8_WGMMA");
      auto dy_fw = upload(y0);
      moe_prefill(gemm, dev->view, dx.get(), D, didx.get(), dw.get(), M, k, dy_fw.get(), D, true, ws.get(), wsb, nullptr, true);
      got_fw = download(dy_fw);
      ASSERT_TRUE(all_finite(got_fw));
      auto dy_fw2 = upload(y0);
      moe_prefill(gemm, dev->view, dx.get(), D, didx.get(), dw.get(), M, k, dy_fw2.get(), D, true, ws.get(), wsb, nullptr, true);
      EXPECT_EQ(std::memcmp(got_fw.data(), download(dy_fw2).data(), got.size() * 4), 0) << "two wgmma runs differ";
    }
    const auto exact = reference(h, x, idx, w, M, k, &y0);
    const double e_exact = rel_l2(got, exact);
    HostExperts hr = h;  // dequantizing kernel: the FP8 weights as it multiplies them, e4m3 x scale rounded to bf16
    if (mode == 1)
      for (int64_t e = 0; e < E; ++e) hr.gu[size_t(e)] = round_bf16(hr.gu[size_t(e)]), hr.dn[size_t(e)] = round_bf16(hr.dn[size_t(e)]);
    const auto rounded = fp8_acts ? reference(h, x, idx, w, M, k, &y0, false, true, true) : reference(hr, x, idx, w, M, k, &y0, true, true, false, true);
    const double e_round = rel_l2(got, rounded);
    const char* what = mode == 0 ? "bf16" : mode == 1 ? "fp8 (bf16 activations)" : "fp8 (e4m3 activations)";
    std::printf("  prefill %s M %lld E %lld D %lld I %lld: rel L2 %.2e vs the rounding twin, %.2e vs the exact twin\n", what,
                (long long)M, (long long)E, (long long)D, (long long)I, e_round, e_exact);
    EXPECT_LT(e_round, 2e-3) << what;
    EXPECT_LT(e_exact, fp8_acts ? 6e-2 : 1e-2) << what;
    // The default tiles on wgmma (the cases with 64+ slots an expert; the first takes the 32-row tiles): FP8 wgmma
    // sums a k block's products inside the tensor core with ~14 significant bits, not f32 (DeepSeek-V3 §3.3.2; hence
    // the promotion to f32 every 128-wide k block, as DeepGEMM does and as this kernel does): 1.1e-4 per product on
    // fixed inputs (GroupedFp8TilesMatchHost). Here h is rounded to bf16 and re-quantized to e4m3 between the two
    // products, so an h value that difference moves across a rounding boundary moves by a bf16 or e4m3 step (1/16):
    // 2.6-2.9e-3 from the exact-sum twin on an H200, the worst row 1.2-1.8e-2 (a few such steps, printed); bound 6e-3.
    // The exact twin's FP8 bound is the same as above.
    if (!got_fw.empty()) {
      const double f_round = rel_l2(got_fw, rounded), f_exact = rel_l2(got_fw, exact);
      double worst_row = 0;
      for (int64_t m = 0; m < M; ++m) {
        const std::vector<float> a(got_fw.begin() + m * D, got_fw.begin() + (m + 1) * D), b(rounded.begin() + m * D, rounded.begin() + (m + 1) * D);
        worst_row = std::max(worst_row, rel_l2(a, b));
      }
      std::printf("  prefill %s on the wgmma tiles: rel L2 %.2e vs the rounding twin (worst row %.2e), %.2e vs the exact twin\n", what,
                  f_round, worst_row, f_exact);
      EXPECT_LT(f_round, 6e-3) << what << " (wgmma)";
      EXPECT_LT(f_exact, 6e-2) << what << " (wgmma)";
    }
    EXPECT_EQ(gemm.fallbacks(), 0);
    // Against the decode kernels on the first 64 tokens.
    const int64_t Md = 64;
    auto dy2 = poisoned<float>(size_t(Md * D));
    const size_t wsd = moe_decode_workspace_bytes(Md, k, E, I, 0, D);
    DeviceBuffer<uint8_t> ws2(wsd);
    moe_decode(dev->view, dx.get(), D, didx.get(), dw.get(), Md, k, dy2.get(), D, false, ws2.get(), wsd);
    const auto dec = download(dy2);
    const std::vector<float> ex64(exact.begin(), exact.begin() + Md * D);
    std::vector<float> dec_plus(dec);
    for (size_t i = 0; i < dec_plus.size(); ++i) dec_plus[i] += y0[i];
    EXPECT_LT(rel_l2(dec_plus, ex64), 1e-5);
  }
}

}  // namespace
}  // namespace dsv3::cuda::test
