// RoPE frequencies and the attention softmax scale, with YaRN (DeepSeek-V3 §4.3 context extension) as
// transformers computes them.
#pragma once
#include "io/config.h"
#include "kernels/ops.h"

namespace dsv3 {

ops::RopeTable make_rope_table(const ModelConfig& cfg);
float attention_softmax_scale(const ModelConfig& cfg);

}  // namespace dsv3
