#include "core/dtype.h"

#include <cmath>

#include "core/error.h"

namespace dsv3 {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: return 2;
    case DType::F8_E4M3: case DType::F8_E5M2: case DType::I8: case DType::U8: case DType::BOOL: return 1;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F64: return "F64";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::F8_E4M3: return "F8_E4M3";
    case DType::F8_E5M2: return "F8_E5M2";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::I16: return "I16";
    case DType::I8: return "I8";
    case DType::U8: return "U8";
    case DType::BOOL: return "BOOL";
  }
  return "?";
}

std::optional<DType> dtype_from_name(std::string_view n) {
  for (DType t : {DType::F32, DType::F64, DType::F16, DType::BF16, DType::F8_E4M3, DType::F8_E5M2, DType::I64,
                  DType::I32, DType::I16, DType::I8, DType::U8, DType::BOOL})
    if (n == dtype_name(t)) return t;
  return std::nullopt;
}

bool dtype_is_float(DType t) {
  switch (t) {
    case DType::F32: case DType::F64: case DType::F16: case DType::BF16: case DType::F8_E4M3: case DType::F8_E5M2:
      return true;
    default: return false;
  }
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return f32_from_bits(sign | 0x7f800000u | (man << 13));  // inf / NaN (payload kept)
  if (exp == 0) {                                                          // zero / subnormal: man * 2^-24
    float v = std::ldexp(float(man), -24);
    return sign ? -v : v;
  }
  return f32_from_bits(sign | ((exp + 112u) << 23) | (man << 13));
}

// The shared idea of the three narrow-float encoders below: for numbers below the target's smallest
// normal, adding a power of two whose ulp equals the target's subnormal step lets the FPU do the
// round-to-nearest-even for us; for normal numbers, add half an ulp minus one plus the "odd" bit and
// truncate.
uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f), sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((u >> 13) & 0x3ffu));  // NaN stays quiet NaN
  if (u >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (u < 0x38800000u) {                                   // below 2^-14: subnormal or zero
    constexpr uint32_t denorm_magic = 126u << 23;          // 0.5: its ulp is 2^-24
    float r = f32_from_bits(u) + f32_from_bits(denorm_magic);
    return uint16_t(sign | (f32_bits(r) - denorm_magic));
  }
  uint32_t odd = (u >> 13) & 1u;
  u += ((15u - 127u) << 23) + 0xfffu + odd;
  return uint16_t(sign | (u >> 13));
}

float fp8_e4m3_to_f32(uint8_t v) {
  uint32_t sign = uint32_t(v & 0x80u) << 24, exp = (v >> 3) & 0xfu, man = v & 7u;
  if (exp == 0xf && man == 7) return f32_from_bits(sign | 0x7fc00000u);  // the only NaN encoding
  if (exp == 0) {
    float x = std::ldexp(float(man), -9);
    return sign ? -x : x;
  }
  return f32_from_bits(sign | ((exp + 120u) << 23) | (man << 20));
}

uint8_t f32_to_fp8_e4m3(float f) {
  uint32_t u = f32_bits(f), sign = (u >> 24) & 0x80u;
  u &= 0x7fffffffu;
  if (u >= (1087u << 20)) return uint8_t(sign | 0x7fu);  // >= 480 (incl. inf/NaN): NaN, as torch
  if (u < (121u << 23)) {                                  // below 2^-6
    constexpr uint32_t denorm_magic = 141u << 23;          // 2^14: its ulp is 2^-9
    float r = f32_from_bits(u) + f32_from_bits(denorm_magic);
    return uint8_t(sign | (f32_bits(r) - denorm_magic));
  }
  uint32_t odd = (u >> 20) & 1u;
  u += uint32_t(int32_t(7 - 127) * (1 << 23)) + 0x7ffffu + odd;
  return uint8_t(sign | (u >> 20));
}

uint8_t f32_to_fp8_e4m3_saturate(float f) {
  if (std::isnan(f)) return 0x7f;
  f = std::fmin(std::fmax(f, -kFp8E4M3Max), kFp8E4M3Max);
  return f32_to_fp8_e4m3(f);
}

float fp8_e5m2_to_f32(uint8_t v) { return f16_to_f32(uint16_t(v) << 8); }

uint8_t f32_to_fp8_e5m2(float f) {
  uint32_t u = f32_bits(f), sign = (u >> 24) & 0x80u;
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return uint8_t(sign | 0x7fu);
  if (u >= (143u << 23)) return uint8_t(sign | 0x7cu);  // >= 65536 (and 61440 < x rounds up): inf
  if (u < (113u << 23)) {                              // below 2^-14
    constexpr uint32_t denorm_magic = 134u << 23;      // 2^7: its ulp is 2^-16
    float r = f32_from_bits(u) + f32_from_bits(denorm_magic);
    return uint8_t(sign | (f32_bits(r) - denorm_magic));
  }
  uint32_t odd = (u >> 21) & 1u;
  u += uint32_t(int32_t(15 - 127) * (1 << 23)) + 0xfffffu + odd;
  return uint8_t(sign | (u >> 21));
}

namespace {
struct Fp8Tables {
  float e4m3[256], e5m2[256];
  Fp8Tables() {
    for (int i = 0; i < 256; ++i) {
      e4m3[i] = fp8_e4m3_to_f32(uint8_t(i));
      e5m2[i] = fp8_e5m2_to_f32(uint8_t(i));
    }
  }
};
const Fp8Tables& fp8_tables() {
  static const Fp8Tables t;
  return t;
}
}  // namespace

void convert_to_f32(DType t, const void* src, float* dst, size_t n) {
  switch (t) {
    case DType::F32: std::memcpy(dst, src, n * 4); return;
    case DType::BF16: {
      auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f32_from_bits(uint32_t(s[i]) << 16);
      return;
    }
    case DType::F16: {
      auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    case DType::F8_E4M3: case DType::F8_E5M2: {
      const float* lut = t == DType::F8_E4M3 ? fp8_tables().e4m3 : fp8_tables().e5m2;
      auto* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = lut[s[i]];
      return;
    }
    case DType::F64: {
      auto* s = static_cast<const double*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = float(s[i]);
      return;
    }
    default: fail("cannot convert {} to F32", dtype_name(t));
  }
}

void convert_from_f32(DType t, const float* src, void* dst, size_t n) {
  switch (t) {
    case DType::F32: std::memcpy(dst, src, n * 4); return;
    case DType::BF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
      return;
    }
    case DType::F16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
      return;
    }
    case DType::F8_E4M3: {
      auto* d = static_cast<uint8_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_fp8_e4m3(src[i]);
      return;
    }
    case DType::F8_E5M2: {
      auto* d = static_cast<uint8_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_fp8_e5m2(src[i]);
      return;
    }
    case DType::F64: {
      auto* d = static_cast<double*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = src[i];
      return;
    }
    default: fail("cannot convert F32 to {}", dtype_name(t));
  }
}

}  // namespace dsv3
