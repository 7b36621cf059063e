// The complementary sequence-wise balance loss of DeepSeek-V3 (§2.3.3, eqs. 17-20) and its gradient.
#include <cmath>

#include "kernels/ops.h"

namespace dsv3::ops {

double seq_balance_loss(const Tensor& logits, const Tensor& idx, int64_t T, float alpha, Tensor* dlogits) {
  const int64_t M = logits.dim(0), E = logits.dim(1), K = idx.dim(1), B = M / T;
  DSV3_CHECK(T > 0 && B * T == M, "balance loss: {} rows are not whole sequences of {}", M, T);
  DSV3_CHECK(idx.dim(0) == M && (!dlogits || dlogits->shape() == logits.shape()), "balance loss: shapes do not match");
  const int32_t* ip = idx.data<int32_t>();
  const float* lp = logits.f32();
  double total = 0;
  std::vector<double> f(static_cast<size_t>(E)), P(static_cast<size_t>(E)), s(static_cast<size_t>(E));
  for (int64_t b = 0; b < B; ++b) {
    // f_i = E/(K·T) · (tokens routed to i); P_i = mean over tokens of s_i / Σ_j s_j.
    std::fill(f.begin(), f.end(), 0.0), std::fill(P.begin(), P.end(), 0.0);
    for (int64_t t = b * T; t < (b + 1) * T; ++t) {
      for (int64_t j = 0; j < K; ++j) f[size_t(ip[t * K + j])] += double(E) / double(K * T);
      double sum = 0;
      for (int64_t e = 0; e < E; ++e) sum += s[size_t(e)] = 1.0 / (1.0 + std::exp(-double(lp[t * E + e])));
      for (int64_t e = 0; e < E; ++e) P[size_t(e)] += s[size_t(e)] / sum / double(T);
    }
    for (int64_t e = 0; e < E; ++e) total += alpha * f[size_t(e)] * P[size_t(e)] / double(B);
    if (!dlogits) continue;
    // ∂L/∂s'_{i,t} = α f_i / (T·B); through s' = s / Σs and s = σ(logit).
    for (int64_t t = b * T; t < (b + 1) * T; ++t) {
      double sum = 0, gs = 0;
      for (int64_t e = 0; e < E; ++e) sum += s[size_t(e)] = 1.0 / (1.0 + std::exp(-double(lp[t * E + e])));
      for (int64_t e = 0; e < E; ++e) gs += alpha * f[size_t(e)] / double(T * B) * s[size_t(e)] / sum;
      for (int64_t e = 0; e < E; ++e) {
        const double ds = (alpha * f[size_t(e)] / double(T * B) - gs) / sum;
        dlogits->f32()[t * E + e] = float(ds * s[size_t(e)] * (1.0 - s[size_t(e)]));
      }
    }
  }
  return total;
}

}  // namespace dsv3::ops
