#include "infer/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <unordered_map>

#include "core/error.h"

namespace dsv3 {

Sampler::Sampler(SamplingParams p) : p_(p) {
  DSV3_CHECK(std::isfinite(p.temperature) && p.temperature >= 0.0f, "temperature must be >= 0, got {}", p.temperature);
  DSV3_CHECK(p.top_k >= 0, "top-k must be >= 0, got {}", p.top_k);
  DSV3_CHECK(p.top_p > 0.0f && p.top_p <= 1.0f, "top-p must be in (0, 1], got {}", p.top_p);
  DSV3_CHECK(p.min_p >= 0.0f && p.min_p <= 1.0f, "min-p must be in [0, 1], got {}", p.min_p);
  DSV3_CHECK(p.repetition_penalty > 0.0f, "repetition penalty must be > 0, got {}", p.repetition_penalty);
}

double Sampler::uniform(std::mt19937_64& rng) { return double(rng() >> 11) * 0x1.0p-53; }

int64_t Sampler::draw(const std::vector<float>& probs, std::mt19937_64& rng) {
  double total = 0;
  for (float q : probs) total += q;
  double u = uniform(rng) * total, acc = 0;
  int64_t last = 0;
  for (size_t i = 0; i < probs.size(); ++i) {
    if (probs[i] <= 0.0f) continue;
    acc += probs[i];
    last = int64_t(i);
    if (u < acc) return last;
  }
  return last;
}

std::vector<float> Sampler::distribution(const float* logits, int64_t V, const std::vector<int64_t>& history) const {
  std::vector<float> l(logits, logits + V);
  if (p_.repetition_penalty != 1.0f || p_.frequency_penalty != 0.0f || p_.presence_penalty != 0.0f) {
    std::unordered_map<int64_t, int> count;
    for (int64_t t : history)
      if (t >= 0 && t < V) ++count[t];
    for (const auto& [t, n] : count) {
      float& x = l[size_t(t)];
      if (p_.repetition_penalty != 1.0f) x = x > 0 ? x / p_.repetition_penalty : x * p_.repetition_penalty;
      x -= float(n) * p_.frequency_penalty + p_.presence_penalty;
    }
  }
  std::vector<float> probs(size_t(V), 0.0f);
  if (p_.greedy()) {
    probs[size_t(std::max_element(l.begin(), l.end()) - l.begin())] = 1.0f;  // first maximum, as torch.argmax
    return probs;
  }
  // Softmax at temperature, then the filters on the sorted distribution.
  const float mx = *std::max_element(l.begin(), l.end());
  double sum = 0;
  for (int64_t i = 0; i < V; ++i) sum += (probs[size_t(i)] = std::exp((l[size_t(i)] - mx) / p_.temperature));
  for (float& q : probs) q = float(q / sum);
  std::vector<int32_t> order(static_cast<size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return probs[size_t(a)] > probs[size_t(b)]; });
  int64_t keep = V;
  if (p_.top_k > 0) keep = std::min<int64_t>(keep, p_.top_k);
  if (p_.top_p < 1.0f) {
    double acc = 0;
    for (int64_t i = 0; i < keep; ++i) {
      acc += probs[size_t(order[size_t(i)])];
      if (acc >= p_.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  if (p_.min_p > 0.0f) {
    const float floor = p_.min_p * probs[size_t(order[0])];
    int64_t i = 1;
    while (i < keep && probs[size_t(order[size_t(i)])] >= floor) ++i;
    keep = i;
  }
  double kept = 0;
  for (int64_t i = 0; i < keep; ++i) kept += probs[size_t(order[size_t(i)])];
  std::vector<float> out(size_t(V), 0.0f);
  for (int64_t i = 0; i < keep; ++i) out[size_t(order[size_t(i)])] = float(probs[size_t(order[size_t(i)])] / kept);
  return out;
}

int64_t Sampler::sample(const float* logits, int64_t V, const std::vector<int64_t>& history, std::mt19937_64& rng) const {
  if (p_.greedy() && p_.repetition_penalty == 1.0f && p_.frequency_penalty == 0.0f && p_.presence_penalty == 0.0f)
    return int64_t(std::max_element(logits, logits + V) - logits);
  return draw(distribution(logits, V, history), rng);
}

}  // namespace dsv3
