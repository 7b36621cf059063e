#include "model/loader.h"

namespace dsv3 {

Tensor WeightLoader::tensor(const std::string& name, const Shape& shape) const {
  DSV3_CHECK(ckpt_.contains(name), "{}: checkpoint has no tensor '{}'", ckpt_.dir(), name);
  Tensor t = ckpt_.get(name);
  DSV3_CHECK(t.shape() == shape, "{}: tensor '{}' has shape {}, the config implies {}", ckpt_.file_of(name), name,
             shape_str(t.shape()), shape_str(shape));
  DSV3_CHECK(dtype_is_float(t.dtype()) && t.dtype() != DType::F8_E4M3 && t.dtype() != DType::F8_E5M2,
             "{}: tensor '{}' has dtype {}, expected a float type", ckpt_.file_of(name), name, dtype_name(t.dtype()));
  return t;
}

ops::Weight WeightLoader::linear(const std::string& name, int64_t n, int64_t k) const {
  DSV3_CHECK(ckpt_.contains(name), "{}: checkpoint has no tensor '{}'", ckpt_.dir(), name);
  ops::Weight w;
  w.w = ckpt_.get(name);
  w.name = name;
  const std::string& file = ckpt_.file_of(name);
  DSV3_CHECK(w.w.shape() == (Shape{n, k}), "{}: tensor '{}' has shape {}, the config implies [{},{}]", file, name,
             shape_str(w.w.shape()), n, k);
  const DType dt = w.w.dtype();
  if (dt == DType::F8_E4M3 || dt == DType::F8_E5M2) {
    const std::string sname = name + "_scale_inv";
    DSV3_CHECK(ckpt_.contains(sname), "{}: fp8 tensor '{}' has no '{}'", file, name, sname);
    w.scale_inv = ckpt_.get(sname);
    w.block_n = cfg_.quant.block_n;
    w.block_k = cfg_.quant.block_k;
    const Shape want{(n + w.block_n - 1) / w.block_n, (k + w.block_k - 1) / w.block_k};
    DSV3_CHECK(w.scale_inv.shape() == want && w.scale_inv.dtype() == DType::F32,
               "{}: '{}' is {} {}, expected F32 {} for {}x{} blocks", ckpt_.file_of(sname), sname,
               dtype_name(w.scale_inv.dtype()), shape_str(w.scale_inv.shape()), shape_str(want), w.block_n, w.block_k);
  } else {
    DSV3_CHECK(dt == DType::F32 || dt == DType::BF16 || dt == DType::F16, "{}: tensor '{}' has unsupported dtype {}",
               file, name, dtype_name(dt));
  }
  return w;
}

}  // namespace dsv3
