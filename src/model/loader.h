// Looks up official tensor names in a checkpoint and checks them against the shapes the config implies,
// so a mismatched checkpoint fails at load with one line naming the tensor (never later, mid-forward).
#pragma once
#include <string>

#include "io/config.h"
#include "io/safetensors.h"
#include "kernels/ops.h"

namespace dsv3 {

class WeightLoader {
 public:
  WeightLoader(const io::Checkpoint& ckpt, const ModelConfig& cfg) : ckpt_(ckpt), cfg_(cfg) {}
  bool has(const std::string& name) const { return ckpt_.contains(name); }
  // A float tensor of exactly `shape` (norm weights, embeddings, biases).
  Tensor tensor(const std::string& name, const Shape& shape) const;
  // A linear weight [n, k]: f32/bf16/f16, or fp8 with `<name>_scale_inv` blocks as quantization_config says.
  ops::Weight linear(const std::string& name, int64_t n, int64_t k) const;

 private:
  const io::Checkpoint& ckpt_;
  const ModelConfig& cfg_;
};

}  // namespace dsv3
