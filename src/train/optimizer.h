// AdamW over float32 master weights (§3.3 of the report: β1 0.9, β2 0.95, weight decay 0.1), moments
// optionally stored in BF16 (§3.3.3's memory saving), global-norm clipping and the learning-rate schedule.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "model/modules.h"

namespace dsv3::train {

struct AdamWConfig {
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.1f;
  bool bf16_moments = false;
};

// A trainable tensor: the float32 master copy the model computes with (updated in place).
struct Param {
  std::string name;
  Tensor value;
  bool decay = true;  // weight decay on matrices; not on norm gains
};

class AdamW {
 public:
  AdamW(const AdamWConfig& cfg, std::vector<Param> params);
  // One update with learning rate lr. Parameters without a gradient this step (an expert that received no
  // token) are left alone, moments included, as PyTorch does for parameters whose grad is None.
  void step(const Grads& g, float lr);
  int64_t steps() const { return t_; }
  const std::vector<Param>& params() const { return params_; }
  // Moments as "m.<name>" / "v.<name>" (their storage dtype) for checkpoints; load_state checks every name,
  // shape and dtype and fails naming the first mismatch.
  std::vector<std::pair<std::string, Tensor>> state() const;
  void load_state(const std::map<std::string, Tensor>& state, int64_t t);

 private:
  AdamWConfig cfg_;
  std::vector<Param> params_;
  std::vector<Tensor> m_, v_;
  int64_t t_ = 0;
};

// Scales every gradient so that their global L2 norm is at most max_norm (no-op when max_norm <= 0).
// Returns the norm before clipping.
double clip_grad_norm(Grads& g, double max_norm);

// Linear warmup to `peak`, constant until `decay_start`, cosine decay to `min` at `total` (the report's
// shape: warmup → constant → cosine).
struct LrSchedule {
  double peak = 1e-3, min = 1e-4;
  int64_t warmup = 0, decay_start = 0, total = 1;
  double at(int64_t step) const;  // step counts from 0
};

}  // namespace dsv3::train
