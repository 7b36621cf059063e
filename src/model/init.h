// Random-weight checkpoints in the official layout, for tests and benchmarks (and, later, training from
// scratch): config.json + model.safetensors with official names, bf16 weights or fp8 e4m3 with
// 128x128 weight_scale_inv blocks where the official release quantizes.
#pragma once
#include <cstdint>
#include <string>

#include "io/config.h"

namespace dsv3 {

struct InitOptions {
  uint64_t seed = 0;
  bool fp8 = false;        // quantize the layer linears as the official FP8 release does
  float bias_scale = 0.0f;  // e_score_correction_bias ~ U(-bias_scale, bias_scale)
};

// Writes DIR/config.json and DIR/model.safetensors (creates DIR). Weights ~ N(0, initializer_range),
// norms = 1. With opts.fp8 the written config carries quantization_config.
void write_random_checkpoint(const ModelConfig& cfg, const std::string& dir, const InitOptions& opts = {});

}  // namespace dsv3
