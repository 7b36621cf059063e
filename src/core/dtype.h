// Element types and exact scalar conversions. Rounding is round-to-nearest-even everywhere, and the
// special-value rules follow PyTorch (c10) so that a value we round-trip is bit-identical to torch's:
//  - bf16/f16: NaN stays NaN (quiet), ±inf stays ±inf, f16 overflow goes to ±inf.
//  - fp8 e4m3fn (no inf): |x| > 464 rounds past 448 and becomes NaN (0x7f|sign), as torch's cast does;
//    fp8_e4m3_saturate() is the clamp-to-±448 variant used when *we* quantize (DeepSeek's recipe).
//  - fp8 e5m2: overflow goes to ±inf, NaN to 0x7f|sign.
#pragma once
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace dsv3 {

enum class DType : uint8_t { F32, F64, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U8, BOOL };

size_t dtype_size(DType t);
// The safetensors spelling ("F32", "BF16", "F8_E4M3", ...).
const char* dtype_name(DType t);
std::optional<DType> dtype_from_name(std::string_view name);
bool dtype_is_float(DType t);

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float f32_from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);  // quiet NaN, sign kept
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

float fp8_e4m3_to_f32(uint8_t v);
uint8_t f32_to_fp8_e4m3(float f);
uint8_t f32_to_fp8_e4m3_saturate(float f);
float fp8_e5m2_to_f32(uint8_t v);
uint8_t f32_to_fp8_e5m2(float f);

constexpr float kFp8E4M3Max = 448.0f;

// Bulk conversions to float32 (the CPU compute type). `src` holds n elements of `t`.
void convert_to_f32(DType t, const void* src, float* dst, size_t n);
void convert_from_f32(DType t, const float* src, void* dst, size_t n);

}  // namespace dsv3
