#include "model/rope.h"

#include <algorithm>
#include <cmath>

namespace dsv3 {

namespace {
double yarn_mscale(double factor, double mscale) { return factor <= 1.0 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0; }

// The dimension (of rope_dim) whose wavelength completes `rotations` turns over the original context.
double correction_dim(double rotations, double dim, double base, double max_pos) {
  return dim * std::log(max_pos / (rotations * 2.0 * M_PI)) / (2.0 * std::log(base));
}
}  // namespace

ops::RopeTable make_rope_table(const ModelConfig& cfg) {
  const int64_t dim = cfg.qk_rope_head_dim, half = dim / 2;
  const double base = cfg.rope_theta;
  ops::RopeTable t;
  t.inv_freq.resize(size_t(half));
  for (int64_t i = 0; i < half; ++i) {
    // base^(2i/dim) in float32, as torch evaluates it.
    const float pos_freq = std::pow(float(base), float(2 * i) / float(dim));
    t.inv_freq[size_t(i)] = 1.0f / pos_freq;
  }
  if (!cfg.rope_scaling) return t;
  const RopeScaling& y = *cfg.rope_scaling;
  const double factor = y.factor;
  double low = std::floor(correction_dim(y.beta_fast, double(dim), base, double(y.original_max_position_embeddings)));
  double high = std::ceil(correction_dim(y.beta_slow, double(dim), base, double(y.original_max_position_embeddings)));
  low = std::max(low, 0.0);
  high = std::min(high, double(dim - 1));
  if (low == high) high += 0.001;  // avoid a zero-width ramp
  for (int64_t i = 0; i < half; ++i) {
    const float pos_freq = std::pow(float(base), float(2 * i) / float(dim));
    const float extrapolation = 1.0f / pos_freq, interpolation = 1.0f / (float(factor) * pos_freq);
    const float ramp = std::clamp(float((double(i) - low) / (high - low)), 0.0f, 1.0f);
    const float extra_w = 1.0f - ramp;  // high-frequency dims keep their original frequency
    t.inv_freq[size_t(i)] = interpolation * (1.0f - extra_w) + extrapolation * extra_w;
  }
  t.attention_factor = (y.mscale != 0.0 && y.mscale_all_dim != 0.0)
                           ? float(yarn_mscale(factor, y.mscale) / yarn_mscale(factor, y.mscale_all_dim))
                           : float(yarn_mscale(factor, 1.0));
  return t;
}

float attention_softmax_scale(const ModelConfig& cfg) {
  double scale = 1.0 / std::sqrt(double(cfg.qk_head_dim()));
  if (cfg.rope_scaling && cfg.rope_scaling->mscale_all_dim != 0.0) {
    const double m = yarn_mscale(cfg.rope_scaling->factor, cfg.rope_scaling->mscale_all_dim);
    scale *= m * m;
  }
  return float(scale);
}

}  // namespace dsv3
