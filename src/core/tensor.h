// Tensor: a dtype, a shape, element strides and a reference to storage that is either owned (allocated
// here) or borrowed (an mmap'd checkpoint, kept alive by the shared_ptr). Views (reshape of contiguous
// data, slice, select, transpose) share storage. Only CPU storage exists today; `device` is carried so
// the CUDA backend plugs in without changing module code.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"

namespace dsv3 {

using Shape = std::vector<int64_t>;
enum class Device : uint8_t { CPU, CUDA };

std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::F32; }
template <> constexpr DType dtype_of<double>() { return DType::F64; }
template <> constexpr DType dtype_of<int64_t>() { return DType::I64; }
template <> constexpr DType dtype_of<int32_t>() { return DType::I32; }
template <> constexpr DType dtype_of<uint8_t>() { return DType::U8; }

class Tensor {
 public:
  Tensor() = default;

  // Uninitialised (empty) or zero-filled owned storage, 64-byte aligned.
  static Tensor empty(DType dtype, Shape shape);
  static Tensor zeros(DType dtype, Shape shape);
  // A contiguous view of memory owned elsewhere; `owner` keeps it alive (may be null for static data).
  static Tensor borrow(void* data, DType dtype, Shape shape, std::shared_ptr<void> owner = {});
  template <class T> static Tensor from_vector(const std::vector<T>& v, Shape shape) {
    Tensor t = empty(dtype_of<T>(), std::move(shape));
    DSV3_CHECK(int64_t(v.size()) == t.numel(), "from_vector: {} values for shape {}", v.size(), shape_str(t.shape()));
    std::memcpy(t.raw(), v.data(), v.size() * sizeof(T));
    return t;
  }

  bool defined() const { return storage_ != nullptr; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int ndim() const { return int(shape_.size()); }
  int64_t dim(int i) const { return shape_.at(size_t(i < 0 ? i + ndim() : i)); }
  int64_t numel() const { return numel_; }
  size_t nbytes() const { return size_t(numel_) * dtype_size(dtype_); }
  bool is_contiguous() const;

  void* raw() const { return static_cast<char*>(base_) + offset_; }
  template <class T> T* data() const {
    static_assert(!std::is_same_v<T, void>);
    DSV3_CHECK(dtype_of<std::remove_const_t<T>>() == dtype_, "tensor holds {}, not the requested type", dtype_name(dtype_));
    return static_cast<T*>(raw());
  }
  float* f32() const { return data<float>(); }

  // Views.
  Tensor reshape(Shape shape) const;  // contiguous only; one -1 allowed
  Tensor slice(int dim, int64_t start, int64_t end) const;
  Tensor select(int dim, int64_t index) const;
  Tensor transpose(int a, int b) const;

  // Copies.
  Tensor contiguous() const;
  Tensor to(DType dtype) const;  // converted contiguous copy (floats through f32)
  Tensor clone() const { return to(dtype_); }

 private:
  DType dtype_ = DType::F32;
  Device device_ = Device::CPU;
  Shape shape_, strides_;
  int64_t numel_ = 0;
  std::shared_ptr<void> storage_;
  void* base_ = nullptr;
  size_t offset_ = 0;  // bytes from base_
};

}  // namespace dsv3
