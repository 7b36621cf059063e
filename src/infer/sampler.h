// Next-token selection: penalties over the history, then temperature, top-k, top-p, min-p, and a draw from
// a seeded generator (the same seed gives the same text). temperature 0 is greedy (argmax).
#pragma once
#include <cstdint>
#include <random>
#include <vector>

namespace dsv3 {

struct SamplingParams {
  float temperature = 0.0f;          // 0: greedy
  int top_k = 0;                     // 0: off
  float top_p = 1.0f;                // 1: off
  float min_p = 0.0f;                // 0: off; keep tokens with p >= min_p · p_max
  float repetition_penalty = 1.0f;   // CTRL-style: divide positive logits (multiply negative) of seen tokens
  float frequency_penalty = 0.0f;    // OpenAI-style: subtract count · f
  float presence_penalty = 0.0f;     // subtract p once for any seen token
  uint64_t seed = 0;
  bool greedy() const { return temperature <= 0.0f; }
};

class Sampler {
 public:
  explicit Sampler(SamplingParams p);
  const SamplingParams& params() const { return p_; }
  // The distribution sampling draws from (after penalties and every filter), as V probabilities. For greedy
  // it is one-hot on the argmax. Speculative decoding compares these for draft and target.
  std::vector<float> distribution(const float* logits, int64_t V, const std::vector<int64_t>& history) const;
  // Draws from distribution(); `rng` is the sequence's generator.
  int64_t sample(const float* logits, int64_t V, const std::vector<int64_t>& history, std::mt19937_64& rng) const;
  static int64_t draw(const std::vector<float>& probs, std::mt19937_64& rng);
  static double uniform(std::mt19937_64& rng);

 private:
  SamplingParams p_;
};

}  // namespace dsv3
