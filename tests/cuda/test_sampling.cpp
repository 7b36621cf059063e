// GPU sampling (sample_rows) against (1) its CPU twin — the same procedure on the host: softmax with the
// kernel's summation order, the stable sorted kept set, fixed-point mass, the same Philox draw — which must give
// the same token for every (seed, step, row), and (2) the CPU sampler's distribution (Sampler::distribution):
// every drawn token lies in its support, and over N draws the total-variation distance between the empirical
// and the CPU distribution stays under 4·sqrt(K / N) (K = support size; the expected TV is about
// 0.4·sqrt(K / N), so a correct kernel fails this with negligible probability), with Pearson's chi-square (cells expecting < 5 draws pooled) under
// C + 6·sqrt(2C) for C cells as a second check (about 6 standard deviations above its mean C - 1).
#include <algorithm>
#include <numeric>

#include "cuda_test_util.h"
#include "infer/sampler.h"
#include "kernels/cuda/moe_ops.h"

namespace dsv3::cuda::test {
namespace {

constexpr int kBlock = 1024;  // the kernel's threads per row (its summation order)

// The CPU twin of k_sample for one row.
int32_t twin_sample(const float* l, int64_t V, const GpuSampling& sp, uint64_t seed, uint64_t step, uint64_t row) {
  const int64_t best = std::max_element(l, l + V) - l;
  if (!(sp.temperature > 0.0f)) return int32_t(best);
  const float mx = l[best];
  std::vector<float> p(static_cast<size_t>(V));
  // Per-thread strided partial sums, the xor butterfly within each warp (lane 0's value), warps in order.
  std::vector<double> part(kBlock, 0.0);
  for (int64_t i = 0; i < V; ++i) {
    const float e = float(std::exp(double((l[i] - mx) / sp.temperature)));
    p[size_t(i)] = e;
    part[size_t(i % kBlock)] += double(e);
  }
  double sum = 0.0;
  for (int w = 0; w < kBlock / 32; ++w) {
    double v[32];
    for (int t = 0; t < 32; ++t) v[t] = part[size_t(w * 32 + t)];
    for (int o = 16; o > 0; o >>= 1) {
      double nv[32];
      for (int t = 0; t < 32; ++t) nv[t] = v[t] + v[t ^ o];
      std::copy(nv, nv + 32, v);
    }
    sum += v[0];
  }
  for (float& q : p) q = float(double(q) / sum);
  const float pmax = float(1.0 / sum);
  std::vector<int32_t> order(static_cast<size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[size_t(a)] > p[size_t(b)]; });
  int64_t keep = V;
  if (sp.top_k > 0) keep = std::min<int64_t>(keep, sp.top_k);
  if (sp.top_p < 1.0f) {
    const uint64_t target = prob_fixed(sp.top_p);
    uint64_t acc = 0;
    for (int64_t i = 0; i < V; ++i) {
      acc += prob_fixed(p[size_t(order[size_t(i)])]);
      if (acc >= target) {
        keep = std::min(keep, i + 1);
        break;
      }
    }
  }
  if (sp.min_p > 0.0f) {
    const float floor_p = sp.min_p * pmax;
    int64_t c = 0;
    for (float q : p) c += q >= floor_p;
    keep = std::min(keep, std::max<int64_t>(1, c));
  }
  std::vector<char> kept(size_t(V), 0);
  for (int64_t i = 0; i < keep; ++i) kept[size_t(order[size_t(i)])] = 1;
  uint64_t total = 0;
  for (int64_t i = 0; i < V; ++i)
    if (kept[size_t(i)]) total += prob_fixed(p[size_t(i)]);
  const double u = philox_uniform(seed, step, row);
  const uint64_t target = std::min<uint64_t>(uint64_t(u * double(total)), total ? total - 1 : 0);
  uint64_t run = 0;
  for (int64_t i = 0; i < V; ++i) {
    if (!kept[size_t(i)]) continue;
    run += prob_fixed(p[size_t(i)]);
    if (run > target) return int32_t(i);
  }
  return int32_t(best);
}

std::vector<float> logits_row(int64_t V, std::mt19937_64& rng, float sd) {
  auto l = randn(size_t(V), rng, sd);
  // A few ties and a clear head, as real logits have.
  for (int64_t i = 0; i + 7 < V; i += 97) l[size_t(i + 7)] = l[size_t(i)];
  return l;
}

struct Case {
  GpuSampling p;
  const char* what;
};
const Case kCases[] = {
    {{0.0f, 0, 1.0f, 0.0f}, "greedy"},
    {{1.0f, 0, 1.0f, 0.0f}, "T 1"},
    {{0.7f, 40, 1.0f, 0.0f}, "T 0.7 top-k 40"},
    {{0.8f, 0, 0.9f, 0.0f}, "T 0.8 top-p 0.9"},
    {{1.2f, 0, 1.0f, 0.05f}, "T 1.2 min-p 0.05"},
    {{0.9f, 50, 0.8f, 0.02f}, "T 0.9 top-k 50 top-p 0.8 min-p 0.02"},
    {{1.0f, 1, 1.0f, 0.0f}, "top-k 1"},
};

TEST(CudaSampling, MatchesCpuTwinTokenForToken) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(5);
  const int64_t B = 16;
  // 1001: rows not 16-byte aligned (every other one) and a tail past the last float4: the greedy pass's scalar path.
  for (const int64_t V : {int64_t(1000), int64_t(1001), int64_t(32000), int64_t(129280)}) {
    std::vector<float> l(size_t(B * V));
    for (int64_t b = 0; b < B; ++b) {
      auto r = logits_row(V, rng, b % 2 ? 3.0f : 1.0f);
      std::copy(r.begin(), r.end(), l.begin() + b * V);
    }
    auto dl = upload(l);
    DeviceBuffer<int32_t> out(static_cast<size_t>(B));
    DeviceBuffer<uint8_t> ws(sample_workspace_bytes(B, V));
    for (const Case& c : kCases) {
      std::vector<uint64_t> st(size_t(2 * B));
      for (int64_t b = 0; b < B; ++b) st[size_t(2 * b)] = 1234 + uint64_t(b % 3), st[size_t(2 * b + 1)] = 10;
      auto drng = upload(st);
      int mismatches = 0;
      for (int step = 0; step < 8; ++step) {
        sample_rows(dl.get(), V, B, V, c.p, drng.get(), true, out.get(), ws.get(), ws.bytes());
        const auto got = download(out);
        for (int64_t b = 0; b < B; ++b) {
          const int32_t want = twin_sample(l.data() + b * V, V, c.p, st[size_t(2 * b)], 10 + uint64_t(step), uint64_t(b));
          mismatches += got[size_t(b)] != want;
        }
      }
      EXPECT_EQ(mismatches, 0) << c.what << " V " << V;
      const auto after = download(drng);
      EXPECT_EQ(after[1], 18u) << "step not advanced";
    }
  }
}

TEST(CudaSampling, DistributionEqualsCpuSampler) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(6);
  const int64_t V = 2000, B = 4096, steps = 50, N = B * steps;
  const auto row = logits_row(V, rng, 2.5f);
  std::vector<float> l(size_t(B * V));
  for (int64_t b = 0; b < B; ++b) std::copy(row.begin(), row.end(), l.begin() + b * V);
  auto dl = upload(l);
  DeviceBuffer<int32_t> out(static_cast<size_t>(B));
  DeviceBuffer<uint8_t> ws(sample_workspace_bytes(B, V));
  for (const Case& c : kCases) {
    SamplingParams sp;
    sp.temperature = c.p.temperature, sp.top_k = c.p.top_k, sp.top_p = c.p.top_p, sp.min_p = c.p.min_p;
    const std::vector<float> want = Sampler(sp).distribution(row.data(), V, {});
    std::vector<uint64_t> st(size_t(2 * B));
    for (int64_t b = 0; b < B; ++b) st[size_t(2 * b)] = 99, st[size_t(2 * b + 1)] = 0;
    auto drng = upload(st);
    std::vector<int64_t> hist(size_t(V), 0);
    for (int64_t s = 0; s < steps; ++s) {
      sample_rows(dl.get(), V, B, V, c.p, drng.get(), true, out.get(), ws.get(), ws.bytes());
      for (int32_t t : download(out)) ++hist[size_t(t)];
    }
    // Chi-square over the cells expecting >= 5 draws, the others pooled into one cell.
    int64_t K = 0, outside = 0, cells = 0;
    double tv = 0, chi2 = 0, pool_e = 0, pool_o = 0;
    for (int64_t i = 0; i < V; ++i) {
      const double q = double(hist[size_t(i)]) / double(N), pw = want[size_t(i)];
      if (pw > 0) {
        ++K;
        if (pw * N >= 5) {
          ++cells;
          chi2 += (double(hist[size_t(i)]) - pw * N) * (double(hist[size_t(i)]) - pw * N) / (pw * N);
        } else {
          pool_e += pw * N, pool_o += double(hist[size_t(i)]);
        }
      } else {
        outside += hist[size_t(i)];
      }
      tv += 0.5 * std::fabs(q - pw);
    }
    if (pool_e >= 5) ++cells, chi2 += (pool_o - pool_e) * (pool_o - pool_e) / pool_e;
    const double tv_bound = 4.0 * std::sqrt(double(K) / double(N)),
                 chi2_bound = double(cells) + 6.0 * std::sqrt(2.0 * double(cells));
    std::printf("  %-38s support %5lld  TV %.4f (bound %.4f)  chi2 %.1f (bound %.1f)\n", c.what, (long long)K, tv, tv_bound,
                cells > 1 ? chi2 : 0.0, chi2_bound);
    EXPECT_EQ(outside, 0) << c.what << ": draws outside the CPU sampler's support";
    EXPECT_LT(tv, std::max(tv_bound, 1e-9)) << c.what;
    if (cells > 1) {
      EXPECT_LT(chi2, chi2_bound) << c.what;
    }
  }
}

// What a draw also writes (SampleOutputs): the ids into page-locked host memory through its device address, and a
// decode step's metadata advanced one position with the drawn id as the next token.
TEST(CudaSampling, AlsoWritesHostIdsAndNextStep) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(8);
  const int64_t B = 5, V = 32000;
  std::vector<float> l(size_t(B * V));
  for (int64_t b = 0; b < B; ++b) {
    auto r = logits_row(V, rng, 2.0f);
    std::copy(r.begin(), r.end(), l.begin() + b * V);
  }
  auto dl = upload(l);
  DeviceBuffer<int32_t> out(static_cast<size_t>(B));
  DeviceBuffer<uint8_t> ws(sample_workspace_bytes(B, V));
  std::vector<int64_t> ids(static_cast<size_t>(B), -1), pos64(static_cast<size_t>(B));
  std::vector<int32_t> pos32(static_cast<size_t>(B)), dst(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) pos64[size_t(b)] = 10 * b, pos32[size_t(b)] = int32_t(10 * b), dst[size_t(b)] = int32_t(1000 + b);
  auto dids = upload(ids);
  auto dp64 = upload(pos64);
  auto dp32 = upload(pos32);
  auto ddst = upload(dst);
  PinnedBuffer pin;
  auto* host = static_cast<int32_t*>(pin.get(size_t(B) * 4));
  for (int64_t b = 0; b < B; ++b) host[b] = -1;
  for (const Case& c : {kCases[0], kCases[2]}) {
    std::vector<uint64_t> st(size_t(2 * B));
    for (int64_t b = 0; b < B; ++b) st[size_t(2 * b)] = 7 + uint64_t(b), st[size_t(2 * b + 1)] = 3;
    auto drng = upload(st);
    SampleOutputs also;
    also.host = static_cast<int32_t*>(host_pinned_device_pointer(host));
    also.ids = dids.get(), also.pos64 = dp64.get(), also.pos32 = dp32.get(), also.dst_rows = ddst.get();
    sample_rows(dl.get(), V, B, V, c.p, drng.get(), true, out.get(), ws.get(), ws.bytes(), nullptr, also);
    synchronize();
    const auto got = download(out);
    const auto gi = download(dids);
    const auto g64 = download(dp64);
    const auto g32 = download(dp32);
    const auto gd = download(ddst);
    for (int64_t b = 0; b < B; ++b) {
      EXPECT_EQ(got[size_t(b)], twin_sample(l.data() + b * V, V, c.p, 7 + uint64_t(b), 3, uint64_t(b))) << c.what;
      EXPECT_EQ(host[b], got[size_t(b)]) << c.what << " row " << b;
      EXPECT_EQ(gi[size_t(b)], int64_t(got[size_t(b)])) << c.what;
      pos64[size_t(b)] += 1, pos32[size_t(b)] += 1, dst[size_t(b)] += 1;
      EXPECT_EQ(g64[size_t(b)], pos64[size_t(b)]);
      EXPECT_EQ(g32[size_t(b)], pos32[size_t(b)]);
      EXPECT_EQ(gd[size_t(b)], dst[size_t(b)]);
    }
    EXPECT_EQ(download(drng)[1], 4u) << "counter not advanced";
  }
}

}  // namespace
}  // namespace dsv3::cuda::test
