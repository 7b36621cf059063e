#include "train/optimizer.h"

#include <cmath>

#include "core/dtype.h"
#include "core/error.h"

namespace dsv3::train {

AdamW::AdamW(const AdamWConfig& cfg, std::vector<Param> params) : cfg_(cfg), params_(std::move(params)) {
  const DType md = cfg_.bf16_moments ? DType::BF16 : DType::F32;
  for (const Param& p : params_) {
    DSV3_CHECK(p.value.dtype() == DType::F32 && p.value.is_contiguous(), "AdamW: {} is not a contiguous float32 master",
               p.name);
    m_.push_back(Tensor::zeros(md, p.value.shape()));
    v_.push_back(Tensor::zeros(md, p.value.shape()));
  }
}

namespace {
// Moments are read and written through these so the same loop serves f32 and bf16 storage.
inline float load(const Tensor& t, int64_t i) {
  return t.dtype() == DType::F32 ? t.f32()[i] : bf16_to_f32(static_cast<const uint16_t*>(t.raw())[i]);
}
inline void store(const Tensor& t, int64_t i, float x) {
  if (t.dtype() == DType::F32)
    t.f32()[i] = x;
  else
    static_cast<uint16_t*>(t.raw())[i] = f32_to_bf16(x);
}
}  // namespace

void AdamW::step(const Grads& g, float lr) {
  ++t_;
  const double bc1 = 1.0 - std::pow(double(cfg_.beta1), double(t_)), bc2 = 1.0 - std::pow(double(cfg_.beta2), double(t_));
  const float b1 = cfg_.beta1, b2 = cfg_.beta2, eps = cfg_.eps;
  const auto& grads = g.all();
  for (size_t p = 0; p < params_.size(); ++p) {
    const auto it = grads.find(params_[p].name);
    if (it == grads.end()) continue;
    const Tensor& gt = it->second;
    DSV3_CHECK(gt.numel() == params_[p].value.numel(), "AdamW: gradient of {} has {} values, parameter {}",
               params_[p].name, gt.numel(), params_[p].value.numel());
    float* w = params_[p].value.f32();
    const float* gr = gt.f32();
    const Tensor &m = m_[p], &v = v_[p];
    const float decay = params_[p].decay ? 1.0f - lr * cfg_.weight_decay : 1.0f;
    const float step_size = float(lr / bc1), inv_sqrt_bc2 = float(1.0 / std::sqrt(bc2));
    const int64_t n = gt.numel();
#pragma omp parallel for schedule(static) if (n > (1 << 16))
    for (int64_t i = 0; i < n; ++i) {
      const float mi = b1 * load(m, i) + (1.0f - b1) * gr[i];
      const float vi = b2 * load(v, i) + (1.0f - b2) * gr[i] * gr[i];
      store(m, i, mi), store(v, i, vi);
      // Decoupled decay (Loshchilov & Hutter), then the bias-corrected Adam step.
      w[i] = w[i] * decay - step_size * mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps);
    }
  }
}

std::vector<std::pair<std::string, Tensor>> AdamW::state() const {
  std::vector<std::pair<std::string, Tensor>> out;
  for (size_t p = 0; p < params_.size(); ++p) {
    out.emplace_back("m." + params_[p].name, m_[p]);
    out.emplace_back("v." + params_[p].name, v_[p]);
  }
  return out;
}

void AdamW::load_state(const std::map<std::string, Tensor>& state, int64_t t) {
  for (size_t p = 0; p < params_.size(); ++p)
    for (auto [prefix, dst] : {std::pair{"m.", &m_[p]}, std::pair{"v.", &v_[p]}}) {
      const std::string name = prefix + params_[p].name;
      const auto it = state.find(name);
      DSV3_CHECK(it != state.end(), "optimizer state has no tensor {}", name);
      DSV3_CHECK(it->second.shape() == dst->shape() && it->second.dtype() == dst->dtype(),
                 "optimizer state tensor {} is {} {}, expected {} {}", name, dtype_name(it->second.dtype()),
                 shape_str(it->second.shape()), dtype_name(dst->dtype()), shape_str(dst->shape()));
      std::memcpy(dst->raw(), it->second.contiguous().raw(), dst->nbytes());
    }
  t_ = t;
}

double clip_grad_norm(Grads& g, double max_norm) {
  double sq = 0;
  for (const auto& [name, t] : g.all()) {
    const float* p = t.f32();
    double s = 0;
    for (int64_t i = 0; i < t.numel(); ++i) s += double(p[i]) * p[i];
    sq += s;
  }
  const double norm = std::sqrt(sq);
  if (max_norm > 0 && norm > max_norm) {
    const float k = float(max_norm / (norm + 1e-6));
    for (const auto& [name, t] : g.all()) {
      float* p = t.f32();
      for (int64_t i = 0; i < t.numel(); ++i) p[i] *= k;
    }
  }
  return norm;
}

double LrSchedule::at(int64_t step) const {
  if (warmup > 0 && step < warmup) return peak * double(step + 1) / double(warmup);
  if (step < decay_start) return peak;
  const double span = double(std::max<int64_t>(total - decay_start, 1));
  const double x = std::min(1.0, double(step - decay_start) / span);
  return min + 0.5 * (peak - min) * (1.0 + std::cos(M_PI * x));
}

}  // namespace dsv3::train
