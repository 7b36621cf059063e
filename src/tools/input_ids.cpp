#include "tools/input_ids.h"

#include "io/safetensors.h"

namespace dsv3::cli {

Tensor read_input_ids(const std::string& path, int64_t V, int64_t min_tokens) {
  auto in = io::SafetensorsFile::open(path);
  DSV3_CHECK(in->contains("input_ids"), "{}: no tensor 'input_ids'", path);
  Tensor ids = in->get("input_ids");
  DSV3_CHECK(ids.ndim() == 2 && ids.dim(0) > 0 && ids.dim(1) >= min_tokens,
             "{}: input_ids must be [B, T] with B >= 1 and T >= {}, got {}", path, min_tokens, shape_str(ids.shape()));
  DSV3_CHECK(ids.dtype() == DType::I64 || ids.dtype() == DType::I32, "{}: input_ids must be I64 or I32, got {}", path,
             dtype_name(ids.dtype()));
  Tensor ids64 = ids.to(DType::I64);
  for (int64_t i = 0; i < ids64.numel(); ++i) {
    const int64_t id = ids64.data<int64_t>()[i];
    DSV3_CHECK(id >= 0 && id < V, "{}: input_ids[{},{}] = {} is out of range [0, {})", path, i / ids.dim(1), i % ids.dim(1),
               id, V);
  }
  return ids64;
}

}  // namespace dsv3::cli
