// Reads and validates `input_ids` ([B, T], I64 or I32, every id in [0, vocab)) from a safetensors file, as
// `dsv3 forward` and `dsv3 grad` take it. Errors name the file and the offending position.
#pragma once
#include <string>

#include "core/tensor.h"

namespace dsv3::cli {

Tensor read_input_ids(const std::string& path, int64_t vocab_size, int64_t min_tokens = 1);

}  // namespace dsv3::cli
