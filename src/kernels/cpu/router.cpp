// MoE routing (DESIGN.md, DeepSeek-V3 §2.1.2 and auxiliary-loss-free balancing §2.1.2): sigmoid affinities,
// the bias only steers the *choice*; the weights come from the unbiased affinities.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kernels/ops.h"

namespace dsv3::ops {

void moe_route(const Tensor& logits, const Tensor& bias, const RouterParams& p, Tensor& idx, Tensor& w) {
  const int64_t M = logits.dim(0), E = logits.dim(1), K = p.top_k, G = p.n_group, per = E / G;
  DSV3_CHECK(E % G == 0 && p.topk_group <= G && K <= p.topk_group * per, "moe_route: invalid router parameters");
  DSV3_CHECK(idx.dim(0) == M && idx.dim(1) == K && w.dim(0) == M && w.dim(1) == K, "moe_route: output shapes");
  std::vector<float> b(size_t(E), 0.0f);
  if (bias.defined()) convert_to_f32(bias.dtype(), bias.contiguous().raw(), b.data(), size_t(E));
#pragma omp parallel for schedule(static) if (M * E > 8192)
  for (int64_t m = 0; m < M; ++m) {
    const float* l = logits.f32() + m * logits.strides()[0];
    std::vector<float> s(static_cast<size_t>(E)), choice(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e) {
      s[size_t(e)] = 1.0f / (1.0f + std::exp(-l[e]));
      choice[size_t(e)] = s[size_t(e)] + b[size_t(e)];
    }
    if (G > 1) {
      std::vector<float> gscore(static_cast<size_t>(G));
      for (int64_t g = 0; g < G; ++g) {
        float t1 = -INFINITY, t2 = -INFINITY;
        for (int64_t e = g * per; e < (g + 1) * per; ++e) {
          const float c = choice[size_t(e)];
          if (c > t1) { t2 = t1; t1 = c; } else if (c > t2) { t2 = c; }
        }
        gscore[size_t(g)] = t1 + t2;
      }
      std::vector<int64_t> order(static_cast<size_t>(G));
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + p.topk_group, order.end(),
                        [&](int64_t a, int64_t c) { return gscore[size_t(a)] > gscore[size_t(c)] || (gscore[size_t(a)] == gscore[size_t(c)] && a < c); });
      std::vector<char> keep(size_t(G), 0);
      for (int64_t i = 0; i < p.topk_group; ++i) keep[size_t(order[size_t(i)])] = 1;
      // Experts of dropped groups compete with score 0.0, not -inf: transformers' masked_fill(…, 0.0).
      for (int64_t e = 0; e < E; ++e)
        if (!keep[size_t(e / per)]) choice[size_t(e)] = 0.0f;
    }
    std::vector<int32_t> order(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + K, order.end(),
                      [&](int32_t a, int32_t c) { return choice[size_t(a)] > choice[size_t(c)] || (choice[size_t(a)] == choice[size_t(c)] && a < c); });
    int32_t* ip = idx.data<int32_t>() + m * idx.strides()[0];
    float* wp = w.f32() + m * w.strides()[0];
    float sum = 0.0f;
    for (int64_t i = 0; i < K; ++i) {
      ip[i] = order[size_t(i)];
      wp[i] = s[size_t(ip[i])];
      sum += wp[i];
    }
    const float denom = p.norm_topk_prob ? sum + 1e-20f : 1.0f;
    for (int64_t i = 0; i < K; ++i) wp[i] = wp[i] / denom * p.routed_scaling_factor;
  }
}

}  // namespace dsv3::ops
