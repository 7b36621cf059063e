#include "core/tensor.h"

#include <malloc.h>

#include <cstdlib>
#include <cstring>

#include <fmt/ranges.h>

namespace dsv3 {

std::string shape_str(const Shape& s) { return fmt::format("[{}]", fmt::join(s, ",")); }

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) {
    DSV3_CHECK(d >= 0, "negative dimension in shape {}", shape_str(s));
    DSV3_CHECK(d == 0 || n <= INT64_MAX / d, "shape {} has too many elements", shape_str(s));
    n *= d;
  }
  return n;
}

static Shape contiguous_strides(const Shape& s) {
  Shape st(s.size());
  int64_t acc = 1;
  for (size_t i = s.size(); i-- > 0;) {
    st[i] = acc;
    acc *= std::max<int64_t>(s[i], 1);
  }
  return st;
}

namespace {
// Activations of tens of MB are allocated and freed every layer; glibc would mmap/munmap each one and the
// process would page-fault them in again every time. Keep freed memory in the heap instead.
const bool kMallocTuned = [] {
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  return true;
}();
}  // namespace

Tensor Tensor::empty(DType dtype, Shape shape) {
  (void)kMallocTuned;
  Tensor t;
  t.dtype_ = dtype;
  t.numel_ = shape_numel(shape);
  t.strides_ = contiguous_strides(shape);
  t.shape_ = std::move(shape);
  size_t bytes = (t.nbytes() + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes ? bytes : 64);
  DSV3_CHECK(p != nullptr, "out of memory allocating {} bytes for a tensor of shape {}", bytes, shape_str(t.shape_));
  t.storage_ = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  t.base_ = p;
  return t;
}

Tensor Tensor::zeros(DType dtype, Shape shape) {
  Tensor t = empty(dtype, std::move(shape));
  std::memset(t.raw(), 0, t.nbytes());
  return t;
}

Tensor Tensor::borrow(void* data, DType dtype, Shape shape, std::shared_ptr<void> owner) {
  Tensor t;
  t.dtype_ = dtype;
  t.numel_ = shape_numel(shape);
  t.strides_ = contiguous_strides(shape);
  t.shape_ = std::move(shape);
  t.storage_ = owner ? std::move(owner) : std::shared_ptr<void>(data, [](void*) {});
  t.base_ = data;
  return t;
}

bool Tensor::is_contiguous() const { return strides_ == contiguous_strides(shape_) || numel_ <= 1; }

Tensor Tensor::reshape(Shape shape) const {
  DSV3_CHECK(is_contiguous(), "reshape of a non-contiguous tensor {}", shape_str(shape_));
  int infer = -1;
  int64_t known = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      DSV3_CHECK(infer < 0, "reshape: more than one -1 in {}", shape_str(shape));
      infer = int(i);
    } else {
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    DSV3_CHECK(known > 0 && numel_ % known == 0, "reshape: cannot infer {} from {} elements", shape_str(shape), numel_);
    shape[size_t(infer)] = numel_ / known;
  }
  DSV3_CHECK(shape_numel(shape) == numel_, "reshape: {} elements cannot be viewed as {}", numel_, shape_str(shape));
  Tensor t = *this;
  t.strides_ = contiguous_strides(shape);
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::slice(int d, int64_t start, int64_t end) const {
  if (d < 0) d += ndim();
  DSV3_CHECK(d >= 0 && d < ndim(), "slice: dim {} out of range for {}", d, shape_str(shape_));
  int64_t n = shape_[size_t(d)];
  DSV3_CHECK(0 <= start && start <= end && end <= n, "slice: [{}, {}) out of range for dim {} of {}", start, end, d,
             shape_str(shape_));
  Tensor t = *this;
  t.offset_ += size_t(start * strides_[size_t(d)]) * dtype_size(dtype_);
  t.shape_[size_t(d)] = end - start;
  t.numel_ = shape_numel(t.shape_);
  return t;
}

Tensor Tensor::select(int d, int64_t index) const {
  if (d < 0) d += ndim();
  Tensor t = slice(d, index, index + 1);
  t.shape_.erase(t.shape_.begin() + d);
  t.strides_.erase(t.strides_.begin() + d);
  return t;
}

Tensor Tensor::transpose(int a, int b) const {
  if (a < 0) a += ndim();
  if (b < 0) b += ndim();
  DSV3_CHECK(a >= 0 && b >= 0 && a < ndim() && b < ndim(), "transpose: dims out of range for {}", shape_str(shape_));
  Tensor t = *this;
  std::swap(t.shape_[size_t(a)], t.shape_[size_t(b)]);
  std::swap(t.strides_[size_t(a)], t.strides_[size_t(b)]);
  return t;
}

// Walks every element of a strided tensor in row-major order, calling f(src_element_ptr, linear_index).
template <class F> static void for_each_element(const Tensor& t, F&& f) {
  const size_t es = dtype_size(t.dtype());
  const int nd = t.ndim();
  std::vector<int64_t> idx(size_t(nd), 0);
  const char* base = static_cast<const char*>(t.raw());
  for (int64_t i = 0; i < t.numel(); ++i) {
    int64_t off = 0;
    for (int k = 0; k < nd; ++k) off += idx[size_t(k)] * t.strides()[size_t(k)];
    f(base + off * int64_t(es), i);
    for (int k = nd - 1; k >= 0; --k) {
      if (++idx[size_t(k)] < t.shape()[size_t(k)]) break;
      idx[size_t(k)] = 0;
    }
  }
}

Tensor Tensor::contiguous() const {
  if (is_contiguous()) return *this;
  Tensor out = empty(dtype_, shape_);
  const size_t es = dtype_size(dtype_);
  char* dst = static_cast<char*>(out.raw());
  for_each_element(*this, [&](const char* p, int64_t i) { std::memcpy(dst + i * int64_t(es), p, es); });
  return out;
}

Tensor Tensor::to(DType dtype) const {
  Tensor src = contiguous();
  Tensor out = empty(dtype, shape_);
  if (dtype == dtype_) {
    std::memcpy(out.raw(), src.raw(), nbytes());
  } else if (dtype_is_float(dtype_) && dtype_is_float(dtype)) {
    if (dtype_ == DType::F32) {
      convert_from_f32(dtype, src.f32(), out.raw(), size_t(numel_));
    } else {
      std::vector<float> tmp(static_cast<size_t>(numel_));
      convert_to_f32(dtype_, src.raw(), tmp.data(), tmp.size());
      convert_from_f32(dtype, tmp.data(), out.raw(), tmp.size());
    }
  } else if ((dtype_ == DType::I32 || dtype_ == DType::I64) && (dtype == DType::I32 || dtype == DType::I64)) {
    for (int64_t i = 0; i < numel_; ++i) {
      int64_t v = dtype_ == DType::I32 ? static_cast<const int32_t*>(src.raw())[i] : static_cast<const int64_t*>(src.raw())[i];
      if (dtype == DType::I32) static_cast<int32_t*>(out.raw())[i] = int32_t(v);
      else static_cast<int64_t*>(out.raw())[i] = v;
    }
  } else {
    fail("cannot convert a {} tensor to {}", dtype_name(dtype_), dtype_name(dtype));
  }
  return out;
}

}  // namespace dsv3
