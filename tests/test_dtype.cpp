// Exactness tests for the scalar and bulk dtype conversions in core/dtype.{h,cpp}.
//
// Every expected value here is computed independently of the code under test: decoding straight from
// the format definition (sign / biased exponent / mantissa, subnormals), encoding by an exact
// round-to-nearest-even in double arithmetic (every f32 and every narrow-format value is exact in a
// double, so the comparisons below involve no rounding of their own), plus the compiler's _Float16
// where available.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"

using namespace dsv3;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
const float kNaN = std::numeric_limits<float>::quiet_NaN();

// A binary floating-point format: `ebits` exponent bits, `mbits` explicit mantissa bits, bias.
struct Fmt {
  int ebits, mbits, bias;
  int emin() const { return 1 - bias; }
  int total_bits() const { return 1 + ebits + mbits; }
};
constexpr Fmt kE4M3{4, 3, 7}, kE5M2{5, 2, 15}, kF16{5, 10, 15}, kBF16{8, 7, 127};

// Value of the finite (non-special) code `c` per the format definition.
double ref_decode_finite(uint32_t c, Fmt f) {
  const uint32_t s = (c >> (f.ebits + f.mbits)) & 1u, e = (c >> f.mbits) & ((1u << f.ebits) - 1u),
                 m = c & ((1u << f.mbits) - 1u);
  const double mag = e == 0 ? std::ldexp(double(m), f.emin() - f.mbits)
                            : std::ldexp(double((1u << f.mbits) + m), int(e) - f.bias - f.mbits);
  return s ? -mag : mag;
}

// Exact round-to-nearest-even of a >= 0 to a format with `mbits` mantissa bits, minimum normal exponent
// `emin` and an unbounded exponent range above (overflow is decided by the caller on the result).
double ref_round_mag(double a, int mbits, int emin) {
  if (a == 0) return 0;
  const int e = std::max(std::ilogb(a), emin);
  const double q = std::ldexp(1.0, e - mbits);  // the quantum (ulp) at a
  const double k = std::floor(a / q);           // a / q is exact: division by a power of two
  const double lo = k * q, hi = (k + 1) * q;
  const double twice = 2 * a, mid = lo + hi;    // both exact
  if (twice < mid) return lo;
  if (twice > mid) return hi;
  return std::fmod(k, 2.0) == 0 ? lo : hi;  // tie: the even mantissa
}

// Code (without sign) of an exactly representable finite magnitude.
uint32_t ref_fields(double mag, Fmt f) {
  if (mag == 0) return 0;
  const int e = std::ilogb(mag);
  if (e < f.emin()) return uint32_t(std::ldexp(mag, f.mbits - f.emin()));  // subnormal
  const double m = std::ldexp(mag, f.mbits - e) - double(1u << f.mbits);
  return (uint32_t(e + f.bias) << f.mbits) | uint32_t(m);
}

double max_finite(Fmt f, bool e4m3fn = false) {
  // e4m3fn: the all-ones exponent is a normal binade except S.1111.111; IEEE-like: it's inf/NaN.
  const uint32_t code = e4m3fn ? 0x7eu : ((((1u << f.ebits) - 2u) << f.mbits) | ((1u << f.mbits) - 1u));
  return ref_decode_finite(code, f);
}

// Reference f32 -> narrow encoders. NaN inputs are handled by the callers (NaN codes differ in payload).
uint16_t ref_f32_to_ieee16(float x, Fmt f) {  // f16 or bf16: overflow -> inf
  const uint32_t sign = std::signbit(x) ? (1u << (f.total_bits() - 1)) : 0u;
  const uint32_t inf = ((1u << f.ebits) - 1u) << f.mbits;
  const double a = std::fabs(double(x));
  if (std::isinf(a)) return uint16_t(sign | inf);
  const double mag = ref_round_mag(a, f.mbits, f.emin());
  if (mag > max_finite(f)) return uint16_t(sign | inf);
  return uint16_t(sign | ref_fields(mag, f));
}

uint8_t ref_f32_to_e4m3(float x) {  // torch's e4m3fn cast: inf/NaN/rounds past 448 -> NaN (sign kept)
  const uint32_t sign = std::signbit(x) ? 0x80u : 0u;
  const double a = std::fabs(double(x));
  if (!std::isfinite(a)) return uint8_t(sign | 0x7fu);
  const double mag = ref_round_mag(a, 3, -6);
  if (mag > 448.0) return uint8_t(sign | 0x7fu);
  return uint8_t(sign | ref_fields(mag, kE4M3));
}

uint8_t ref_f32_to_e5m2(float x) {
  const uint32_t sign = std::signbit(x) ? 0x80u : 0u;
  const double a = std::fabs(double(x));
  if (std::isnan(a)) return uint8_t(sign | 0x7fu);
  if (std::isinf(a)) return uint8_t(sign | 0x7cu);
  const double mag = ref_round_mag(a, 2, -14);
  if (mag > 57344.0) return uint8_t(sign | 0x7cu);
  return uint8_t(sign | ref_fields(mag, kE5M2));
}

bool same_bits(float a, float b) { return f32_bits(a) == f32_bits(b); }

// Random f32 with a biased exponent in [elo, ehi] (0 = zero/subnormal, 255 = inf/NaN), random sign and
// mantissa. Mixing in a few mantissas near rounding boundaries makes ties and near-ties frequent.
float random_f32(std::mt19937_64& rng, uint32_t elo, uint32_t ehi) {
  const uint64_t r = rng();
  const uint32_t e = elo + uint32_t(r % (ehi - elo + 1));
  uint32_t m = uint32_t(r >> 16) & 0x7fffffu;
  switch ((r >> 40) & 7u) {  // 3/8 of the time: a structured low part
    case 0: m &= ~0xffffu; m |= 0x8000u; break;             // exact bf16 tie
    case 1: m &= ~0x1fffu; m |= uint32_t(r >> 48) & 1u ? 0x1000u : 0x0fffu; break;  // f16 tie / below
    case 2: m &= ~0xfffffu; m |= uint32_t(r >> 48) & 1u ? 0x80000u : 0x80001u; break;  // e4m3 tie / above
    default: break;
  }
  const uint32_t s = uint32_t(r >> 63) << 31;
  return f32_from_bits(s | (e << 23) | m);
}

// All fp8 / 16-bit codes in increasing value order over the non-negative finite range.
std::vector<uint32_t> positive_finite_codes(uint32_t count, bool (*is_finite)(uint32_t)) {
  std::vector<uint32_t> v;
  for (uint32_t c = 0; c < count; ++c)
    if (is_finite(c)) v.push_back(c);
  return v;
}
bool e4m3_pos_finite(uint32_t c) { return c < 0x7f; }
bool e5m2_pos_finite(uint32_t c) { return c < 0x7c; }
bool f16_pos_finite(uint32_t c) { return c < 0x7c00; }
bool bf16_pos_finite(uint32_t c) { return c < 0x7f80; }

}  // namespace

// ---------------------------------------------------------------- fp8 e4m3fn: decoding

TEST(DtypeFp8, E4M3DecodesAll256Codes) {
  int nans = 0;
  for (uint32_t c = 0; c < 256; ++c) {
    const float got = fp8_e4m3_to_f32(uint8_t(c));
    if ((c & 0x7fu) == 0x7fu) {  // S.1111.111: the only NaN; e4m3fn has no infinity
      ++nans;
      EXPECT_TRUE(std::isnan(got)) << "code " << c;
      EXPECT_EQ(std::signbit(got), c >= 0x80) << "code " << c;
      continue;
    }
    const double want = ref_decode_finite(c, kE4M3);
    EXPECT_EQ(double(got), want) << "code " << c;
    EXPECT_EQ(std::signbit(got), c >= 0x80) << "code " << c;  // -0 included
  }
  EXPECT_EQ(nans, 2);
  // Landmarks from the format definition.
  EXPECT_EQ(fp8_e4m3_to_f32(0x01), std::ldexp(1.0f, -9));     // smallest subnormal
  EXPECT_EQ(fp8_e4m3_to_f32(0x07), 7 * std::ldexp(1.0f, -9)); // largest subnormal
  EXPECT_EQ(fp8_e4m3_to_f32(0x08), std::ldexp(1.0f, -6));     // smallest normal
  EXPECT_EQ(fp8_e4m3_to_f32(0x38), 1.0f);
  EXPECT_EQ(fp8_e4m3_to_f32(0x78), 256.0f);                   // exponent 1111 is a normal binade
  EXPECT_EQ(fp8_e4m3_to_f32(0x7e), 448.0f);
  EXPECT_EQ(fp8_e4m3_to_f32(0xfe), -448.0f);
  EXPECT_EQ(kFp8E4M3Max, 448.0f);
}

TEST(DtypeFp8, E5M2DecodesAll256Codes) {
  for (uint32_t c = 0; c < 256; ++c) {
    const float got = fp8_e5m2_to_f32(uint8_t(c));
    const uint32_t e = (c >> 2) & 0x1fu, m = c & 3u;
    if (e == 0x1f) {
      if (m == 0) EXPECT_EQ(got, c >= 0x80 ? -kInf : kInf) << "code " << c;
      else EXPECT_TRUE(std::isnan(got)) << "code " << c;
      EXPECT_EQ(std::signbit(got), c >= 0x80) << "code " << c;
      continue;
    }
    EXPECT_EQ(double(got), ref_decode_finite(c, kE5M2)) << "code " << c;
    EXPECT_EQ(std::signbit(got), c >= 0x80) << "code " << c;
  }
  EXPECT_EQ(fp8_e5m2_to_f32(0x01), std::ldexp(1.0f, -16));
  EXPECT_EQ(fp8_e5m2_to_f32(0x03), 3 * std::ldexp(1.0f, -16));
  EXPECT_EQ(fp8_e5m2_to_f32(0x04), std::ldexp(1.0f, -14));
  EXPECT_EQ(fp8_e5m2_to_f32(0x3c), 1.0f);
  EXPECT_EQ(fp8_e5m2_to_f32(0x7b), 57344.0f);
  EXPECT_EQ(fp8_e5m2_to_f32(0x7c), kInf);
  EXPECT_EQ(fp8_e5m2_to_f32(0xfc), -kInf);
}

TEST(DtypeFp8, EncodeOfDecodeIsIdentityForEveryNonNaNCode) {
  for (uint32_t c = 0; c < 256; ++c) {
    if ((c & 0x7fu) != 0x7fu) {
      EXPECT_EQ(f32_to_fp8_e4m3(fp8_e4m3_to_f32(uint8_t(c))), c) << "e4m3 code " << c;
      EXPECT_EQ(f32_to_fp8_e4m3_saturate(fp8_e4m3_to_f32(uint8_t(c))), c) << "e4m3 sat code " << c;
    } else {
      EXPECT_EQ(f32_to_fp8_e4m3(fp8_e4m3_to_f32(uint8_t(c))), c) << "e4m3 NaN code " << c;
    }
    const uint32_t e = (c >> 2) & 0x1fu, m = c & 3u;
    if (e != 0x1f || m == 0) EXPECT_EQ(f32_to_fp8_e5m2(fp8_e5m2_to_f32(uint8_t(c))), c) << "e5m2 code " << c;
    else EXPECT_EQ(f32_to_fp8_e5m2(fp8_e5m2_to_f32(uint8_t(c))), 0x7fu | (c & 0x80u)) << "e5m2 NaN " << c;
  }
  EXPECT_EQ(f32_to_fp8_e4m3(0.0f), 0x00);
  EXPECT_EQ(f32_to_fp8_e4m3(-0.0f), 0x80);
  EXPECT_EQ(f32_to_fp8_e5m2(0.0f), 0x00);
  EXPECT_EQ(f32_to_fp8_e5m2(-0.0f), 0x80);
}

// ---------------------------------------------------------------- fp8: rounding

namespace {
// For every pair of adjacent finite codes (both signs): the midpoint goes to the even code, one f32 ulp
// above goes up, one below goes down. `encode` is the function under test.
template <class Encode>
void check_adjacent_midpoints(const std::vector<uint32_t>& codes, Fmt f, uint32_t sign_bit, Encode encode,
                              const char* what) {
  for (size_t i = 0; i + 1 < codes.size(); ++i) {
    const uint32_t a = codes[i], b = codes[i + 1];
    const double va = ref_decode_finite(a, f), vb = ref_decode_finite(b, f);
    ASSERT_LT(va, vb);
    const float mid = float((va + vb) / 2);
    ASSERT_EQ(double(mid), (va + vb) / 2) << "midpoint not exact in f32";
    const uint32_t even = (a & 1u) == 0 ? a : b;
    for (uint32_t s : {0u, sign_bit}) {
      const float m = s ? -mid : mid;
      const float up = std::nextafter(m, s ? -kInf : kInf), down = std::nextafter(m, 0.0f);
      EXPECT_EQ(uint32_t(encode(m)), s | even) << what << " midpoint of " << a << "," << b << " sign " << s;
      EXPECT_EQ(uint32_t(encode(up)), s | b) << what << " above midpoint of " << a << "," << b << " sign " << s;
      EXPECT_EQ(uint32_t(encode(down)), s | a) << what << " below midpoint of " << a << "," << b << " sign " << s;
      // The neighbours themselves and a point strictly inside each half.
      const float qa = float(va + (vb - va) / 4), qb = float(vb - (vb - va) / 4);
      EXPECT_EQ(uint32_t(encode(s ? -qa : qa)), s | a) << what << " quarter above " << a;
      EXPECT_EQ(uint32_t(encode(s ? -qb : qb)), s | b) << what << " quarter below " << b;
    }
  }
}
}  // namespace

TEST(DtypeFp8, E4M3AdjacentMidpointsRoundToEven) {
  const auto codes = positive_finite_codes(256, e4m3_pos_finite);
  ASSERT_EQ(codes.size(), 127u);
  check_adjacent_midpoints(codes, kE4M3, 0x80u, f32_to_fp8_e4m3, "e4m3");
  check_adjacent_midpoints(codes, kE4M3, 0x80u, f32_to_fp8_e4m3_saturate, "e4m3 saturate");
}

TEST(DtypeFp8, E5M2AdjacentMidpointsRoundToEven) {
  auto codes = positive_finite_codes(256, e5m2_pos_finite);
  ASSERT_EQ(codes.size(), 124u);
  check_adjacent_midpoints(codes, kE5M2, 0x80u, f32_to_fp8_e5m2, "e5m2");
}

TEST(DtypeFp8, SubnormalBoundaries) {
  const float s9 = std::ldexp(1.0f, -9);  // e4m3 smallest subnormal
  EXPECT_EQ(f32_to_fp8_e4m3(s9), 0x01);
  EXPECT_EQ(f32_to_fp8_e4m3(s9 / 2), 0x00);                            // tie between 0 and 1: even
  EXPECT_EQ(f32_to_fp8_e4m3(-s9 / 2), 0x80);                           // ... keeping the sign
  EXPECT_EQ(f32_to_fp8_e4m3(std::nextafter(s9 / 2, 1.0f)), 0x01);      // just above half rounds up
  EXPECT_EQ(f32_to_fp8_e4m3(std::nextafter(s9 / 2, 0.0f)), 0x00);
  EXPECT_EQ(f32_to_fp8_e4m3(1.5f * s9), 0x02);                         // tie between 1 and 2
  EXPECT_EQ(f32_to_fp8_e4m3(2.5f * s9), 0x02);                         // tie between 2 and 3
  EXPECT_EQ(f32_to_fp8_e4m3(7 * s9), 0x07);                            // largest subnormal
  EXPECT_EQ(f32_to_fp8_e4m3(7.5f * s9), 0x08);                         // tie with smallest normal: even
  EXPECT_EQ(f32_to_fp8_e4m3(std::nextafter(7.5f * s9, 0.0f)), 0x07);
  EXPECT_EQ(f32_to_fp8_e4m3(std::ldexp(1.0f, -6)), 0x08);              // smallest normal
  EXPECT_EQ(f32_to_fp8_e4m3(std::nextafter(std::ldexp(1.0f, -6), 0.0f)), 0x08);
  EXPECT_EQ(f32_to_fp8_e4m3(std::ldexp(1.0f, -6) * 1.0625f), 0x08);   // tie between 0x08 and 0x09
  EXPECT_EQ(f32_to_fp8_e4m3(-7.5f * s9), 0x88);
  EXPECT_EQ(f32_to_fp8_e4m3(std::numeric_limits<float>::denorm_min()), 0x00);
  EXPECT_EQ(f32_to_fp8_e4m3(-std::numeric_limits<float>::denorm_min()), 0x80);
  EXPECT_EQ(f32_to_fp8_e4m3(FLT_MIN), 0x00);

  const float s16 = std::ldexp(1.0f, -16);  // e5m2 smallest subnormal
  EXPECT_EQ(f32_to_fp8_e5m2(s16), 0x01);
  EXPECT_EQ(f32_to_fp8_e5m2(s16 / 2), 0x00);
  EXPECT_EQ(f32_to_fp8_e5m2(-s16 / 2), 0x80);
  EXPECT_EQ(f32_to_fp8_e5m2(std::nextafter(s16 / 2, 1.0f)), 0x01);
  EXPECT_EQ(f32_to_fp8_e5m2(1.5f * s16), 0x02);
  EXPECT_EQ(f32_to_fp8_e5m2(3 * s16), 0x03);                           // largest subnormal
  EXPECT_EQ(f32_to_fp8_e5m2(3.5f * s16), 0x04);                        // tie with smallest normal
  EXPECT_EQ(f32_to_fp8_e5m2(std::nextafter(3.5f * s16, 0.0f)), 0x03);
  EXPECT_EQ(f32_to_fp8_e5m2(std::ldexp(1.0f, -14)), 0x04);
  EXPECT_EQ(f32_to_fp8_e5m2(-std::numeric_limits<float>::denorm_min()), 0x80);
}

TEST(DtypeFp8, E4M3OverflowFollowsTorch) {
  EXPECT_EQ(f32_to_fp8_e4m3(448.0f), 0x7e);
  EXPECT_EQ(f32_to_fp8_e4m3(449.0f), 0x7e);
  EXPECT_EQ(f32_to_fp8_e4m3(std::nextafter(464.0f, 0.0f)), 0x7e);
  EXPECT_EQ(f32_to_fp8_e4m3(464.0f), 0x7e);  // midpoint of 448 and the NaN slot (480): 448's mantissa is even
  EXPECT_EQ(f32_to_fp8_e4m3(std::nextafter(464.0f, kInf)), 0x7f);
  EXPECT_EQ(f32_to_fp8_e4m3(465.0f), 0x7f);
  EXPECT_EQ(f32_to_fp8_e4m3(std::nextafter(480.0f, 0.0f)), 0x7f);
  EXPECT_EQ(f32_to_fp8_e4m3(480.0f), 0x7f);
  EXPECT_EQ(f32_to_fp8_e4m3(1e6f), 0x7f);
  EXPECT_EQ(f32_to_fp8_e4m3(FLT_MAX), 0x7f);
  EXPECT_EQ(f32_to_fp8_e4m3(kInf), 0x7f);
  EXPECT_EQ(f32_to_fp8_e4m3(kNaN), 0x7f);
  EXPECT_EQ(f32_to_fp8_e4m3(-448.0f), 0xfe);
  EXPECT_EQ(f32_to_fp8_e4m3(-464.0f), 0xfe);
  EXPECT_EQ(f32_to_fp8_e4m3(-465.0f), 0xff);
  EXPECT_EQ(f32_to_fp8_e4m3(-480.0f), 0xff);
  EXPECT_EQ(f32_to_fp8_e4m3(-FLT_MAX), 0xff);
  EXPECT_EQ(f32_to_fp8_e4m3(-kInf), 0xff);
  EXPECT_EQ(f32_to_fp8_e4m3(-kNaN), 0xff);
  // NaN of any payload.
  for (uint32_t m = 1; m < (1u << 23); m += 4099) {
    EXPECT_EQ(f32_to_fp8_e4m3(f32_from_bits(0x7f800000u | m)), 0x7f);
    EXPECT_EQ(f32_to_fp8_e4m3(f32_from_bits(0xff800000u | m)), 0xff);
  }
}

TEST(DtypeFp8, E4M3SaturateClampsToMax) {
  for (float x : {448.0f, 449.0f, 464.0f, 465.0f, 479.0f, 480.0f, 1e6f, FLT_MAX, kInf}) {
    EXPECT_EQ(f32_to_fp8_e4m3_saturate(x), 0x7e) << x;
    EXPECT_EQ(f32_to_fp8_e4m3_saturate(-x), 0xfe) << -x;
  }
  EXPECT_EQ(f32_to_fp8_e4m3_saturate(kNaN), 0x7f);
  EXPECT_EQ(f32_to_fp8_e4m3_saturate(-kNaN), 0x7f);
  EXPECT_EQ(f32_to_fp8_e4m3_saturate(f32_from_bits(0xff800001u)), 0x7f);
  EXPECT_EQ(f32_to_fp8_e4m3_saturate(0.0f), 0x00);
  EXPECT_EQ(f32_to_fp8_e4m3_saturate(-0.0f), 0x80);
  EXPECT_EQ(f32_to_fp8_e4m3_saturate(std::ldexp(1.0f, -10)), 0x00);
}

TEST(DtypeFp8, E5M2OverflowGoesToInf) {
  EXPECT_EQ(f32_to_fp8_e5m2(57344.0f), 0x7b);
  EXPECT_EQ(f32_to_fp8_e5m2(std::nextafter(61440.0f, 0.0f)), 0x7b);
  EXPECT_EQ(f32_to_fp8_e5m2(61440.0f), 0x7c);  // tie: 57344's mantissa (11) is odd, so up to inf
  EXPECT_EQ(f32_to_fp8_e5m2(std::nextafter(61440.0f, kInf)), 0x7c);
  EXPECT_EQ(f32_to_fp8_e5m2(65536.0f), 0x7c);
  EXPECT_EQ(f32_to_fp8_e5m2(FLT_MAX), 0x7c);
  EXPECT_EQ(f32_to_fp8_e5m2(kInf), 0x7c);
  EXPECT_EQ(f32_to_fp8_e5m2(-57344.0f), 0xfb);
  EXPECT_EQ(f32_to_fp8_e5m2(-61440.0f), 0xfc);
  EXPECT_EQ(f32_to_fp8_e5m2(-kInf), 0xfc);
  EXPECT_EQ(f32_to_fp8_e5m2(kNaN), 0x7f);
  EXPECT_EQ(f32_to_fp8_e5m2(-kNaN), 0xff);
  for (uint32_t m = 1; m < (1u << 23); m += 4099) {
    EXPECT_EQ(f32_to_fp8_e5m2(f32_from_bits(0x7f800000u | m)), 0x7f);
    EXPECT_EQ(f32_to_fp8_e5m2(f32_from_bits(0xff800000u | m)), 0xff);
  }
}

TEST(DtypeFp8, RandomF32MatchReference) {
  std::mt19937_64 rng(0xf8f8f8f8u);
  for (int i = 0; i < 600000; ++i) {
    // Mostly the interesting range (2^-20 .. 2^20), sometimes any finite/special f32.
    const float x = (i & 7) == 0 ? random_f32(rng, 0, 255) : random_f32(rng, 107, 147);
    if (std::isnan(x)) continue;
    ASSERT_EQ(f32_to_fp8_e4m3(x), ref_f32_to_e4m3(x)) << "x=" << x << " bits " << std::hex << f32_bits(x);
    const float clamped = std::fmin(std::fmax(x, -448.0f), 448.0f);
    ASSERT_EQ(f32_to_fp8_e4m3_saturate(x), ref_f32_to_e4m3(clamped)) << "x=" << x;
    ASSERT_EQ(f32_to_fp8_e5m2(x), ref_f32_to_e5m2(x)) << "x=" << x << " bits " << std::hex << f32_bits(x);
  }
}

// ---------------------------------------------------------------- f16

TEST(DtypeF16, DecodesAllCodesAndRoundTrips) {
  for (uint32_t c = 0; c < 65536; ++c) {
    const float v = f16_to_f32(uint16_t(c));
    const uint32_t e = (c >> 10) & 0x1fu, m = c & 0x3ffu;
    const bool neg = c >= 0x8000;
    if (e == 0x1f && m != 0) {
      ASSERT_TRUE(std::isnan(v)) << c;
      const uint16_t back = f32_to_f16(v);
      ASSERT_EQ(back & 0x7c00u, 0x7c00u) << c;  // NaN stays NaN (and quiet), sign kept
      ASSERT_NE(back & 0x3ffu, 0u) << c;
      ASSERT_NE(back & 0x200u, 0u) << c;
      ASSERT_EQ(back & 0x8000u, c & 0x8000u) << c;
      continue;
    }
    if (e == 0x1f) ASSERT_EQ(v, neg ? -kInf : kInf) << c;
    else ASSERT_EQ(double(v), ref_decode_finite(c, kF16)) << c;
    ASSERT_EQ(std::signbit(v), neg) << c;
    ASSERT_EQ(f32_to_f16(v), c) << c;
  }
}

TEST(DtypeF16, AdjacentMidpointsAndBoundaries) {
  const auto codes = positive_finite_codes(65536, f16_pos_finite);
  check_adjacent_midpoints(codes, kF16, 0x8000u, f32_to_f16, "f16");
  // Overflow.
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(std::nextafter(65520.0f, 0.0f)), 0x7bff);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);  // tie: 65504's mantissa is odd -> inf
  EXPECT_EQ(f32_to_f16(65536.0f), 0x7c00);
  EXPECT_EQ(f32_to_f16(FLT_MAX), 0x7c00);
  EXPECT_EQ(f32_to_f16(kInf), 0x7c00);
  EXPECT_EQ(f32_to_f16(-65519.0f), 0xfbff);
  EXPECT_EQ(f32_to_f16(-65520.0f), 0xfc00);
  EXPECT_EQ(f32_to_f16(-kInf), 0xfc00);
  // Subnormals.
  const float s24 = std::ldexp(1.0f, -24);
  EXPECT_EQ(f32_to_f16(s24), 0x0001);
  EXPECT_EQ(f32_to_f16(s24 / 2), 0x0000);
  EXPECT_EQ(f32_to_f16(-s24 / 2), 0x8000);
  EXPECT_EQ(f32_to_f16(std::nextafter(s24 / 2, 1.0f)), 0x0001);
  EXPECT_EQ(f32_to_f16(1023 * s24), 0x03ff);
  EXPECT_EQ(f32_to_f16(1023.5f * s24), 0x0400);
  EXPECT_EQ(f32_to_f16(std::nextafter(1023.5f * s24, 0.0f)), 0x03ff);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -14)), 0x0400);
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(f32_to_f16(-std::numeric_limits<float>::denorm_min()), 0x8000);
  EXPECT_EQ(f32_to_f16(0.0f), 0x0000);
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_f16(1.0f), 0x3c00);
  // NaN of any payload -> quiet NaN, sign kept.
  for (uint32_t m = 1; m < (1u << 23); m += 257) {
    for (uint32_t s : {0u, 0x80000000u}) {
      const uint16_t h = f32_to_f16(f32_from_bits(s | 0x7f800000u | m));
      ASSERT_EQ(h & 0x7e00u, 0x7e00u) << m;
      ASSERT_EQ(h & 0x8000u, s >> 16) << m;
    }
  }
}

TEST(DtypeF16, RandomF32MatchReference) {
  std::mt19937_64 rng(0x16161616u);
  for (int i = 0; i < 1000000; ++i) {
    const float x = (i & 3) == 0 ? random_f32(rng, 0, 255) : random_f32(rng, 97, 145);
    if (std::isnan(x)) continue;
    ASSERT_EQ(f32_to_f16(x), ref_f32_to_ieee16(x, kF16)) << "x=" << x << " bits " << std::hex << f32_bits(x);
  }
}

#ifdef __FLT16_MAX__
TEST(DtypeF16, MatchesCompilerFloat16) {
  for (uint32_t c = 0; c < 65536; ++c) {
    const float mine = f16_to_f32(uint16_t(c));
    const float theirs = float(std::bit_cast<_Float16>(uint16_t(c)));
    if (std::isnan(theirs)) ASSERT_TRUE(std::isnan(mine)) << c;
    else ASSERT_TRUE(same_bits(mine, theirs)) << c;
  }
  std::mt19937_64 rng(0x5eed1234u);
  for (int i = 0; i < 3000000; ++i) {
    const uint64_t r = rng();
    // Half fully random bit patterns, half focused on f16's range (exponents 2^-26 .. 2^17).
    const float x = (i & 1) ? f32_from_bits(uint32_t(r)) : random_f32(rng, 101, 144);
    const uint16_t theirs = std::bit_cast<uint16_t>(static_cast<_Float16>(x));
    const uint16_t mine = f32_to_f16(x);
    if (std::isnan(x)) {
      ASSERT_EQ(mine & 0x7c00u, 0x7c00u);
      ASSERT_NE(mine & 0x3ffu, 0u);
      continue;
    }
    ASSERT_EQ(mine, theirs) << "x=" << x << " bits " << std::hex << f32_bits(x);
  }
}
#endif

// ---------------------------------------------------------------- bf16

TEST(DtypeBF16, DecodesAllCodesAndRoundTrips) {
  for (uint32_t c = 0; c < 65536; ++c) {
    const float v = bf16_to_f32(uint16_t(c));
    const uint32_t e = (c >> 7) & 0xffu, m = c & 0x7fu;
    const bool neg = c >= 0x8000;
    if (e == 0xff && m != 0) {
      ASSERT_TRUE(std::isnan(v)) << c;
      const uint16_t back = f32_to_bf16(v);
      ASSERT_EQ(back & 0x7fc0u, 0x7fc0u) << c;  // quiet NaN
      ASSERT_EQ(back & 0x8000u, c & 0x8000u) << c;
      continue;
    }
    if (e == 0xff) ASSERT_EQ(v, neg ? -kInf : kInf) << c;
    else ASSERT_EQ(double(v), ref_decode_finite(c, kBF16)) << c;
    ASSERT_EQ(std::signbit(v), neg) << c;
    ASSERT_EQ(f32_to_bf16(v), c) << c;
  }
}

TEST(DtypeBF16, EveryNaNPayloadGivesQuietNaN) {
  for (uint32_t m = 1; m < (1u << 23); ++m) {
    for (uint32_t s : {0u, 0x80000000u}) {
      const uint16_t h = f32_to_bf16(f32_from_bits(s | 0x7f800000u | m));
      if ((h & 0x7fc0u) != 0x7fc0u || (h & 0x8000u) != (s >> 16)) {
        FAIL() << "NaN payload " << std::hex << m << " sign " << s << " -> " << h;
      }
    }
  }
  EXPECT_EQ(f32_to_bf16(kInf), 0x7f80);
  EXPECT_EQ(f32_to_bf16(-kInf), 0xff80);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(kNaN))));
}

TEST(DtypeBF16, AdjacentMidpointsAndBoundaries) {
  const auto codes = positive_finite_codes(65536, bf16_pos_finite);
  check_adjacent_midpoints(codes, kBF16, 0x8000u, f32_to_bf16, "bf16");
  // The top: FLT_MAX lies above the midpoint between bf16's max (0x7f7f, odd) and 2^128 -> inf.
  EXPECT_EQ(f32_to_bf16(bf16_to_f32(0x7f7f)), 0x7f7f);
  EXPECT_EQ(f32_to_bf16(f32_from_bits(0x7f7f7fffu)), 0x7f7f);
  EXPECT_EQ(f32_to_bf16(f32_from_bits(0x7f7f8000u)), 0x7f80);
  EXPECT_EQ(f32_to_bf16(FLT_MAX), 0x7f80);
  EXPECT_EQ(f32_to_bf16(-FLT_MAX), 0xff80);
  // Subnormals: bf16's smallest is 2^-133; half of it ties to 0.
  EXPECT_EQ(f32_to_bf16(std::ldexp(1.0f, -133)), 0x0001);
  EXPECT_EQ(f32_to_bf16(std::ldexp(1.0f, -134)), 0x0000);
  EXPECT_EQ(f32_to_bf16(-std::ldexp(1.0f, -134)), 0x8000);
  EXPECT_EQ(f32_to_bf16(std::nextafter(std::ldexp(1.0f, -134), 1.0f)), 0x0001);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::denorm_min()), 0x0000);
  EXPECT_EQ(f32_to_bf16(FLT_MIN), 0x0080);
  EXPECT_EQ(f32_to_bf16(std::nextafter(FLT_MIN, 0.0f)), 0x0080);  // rounds up into the normals
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000);
  // Constructed midpoints in every binade: 1.m + half an ulp.
  EXPECT_EQ(f32_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);                            // tie, even down
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);                        // tie, odd up
  EXPECT_EQ(f32_to_bf16(std::nextafter(1.0f + std::ldexp(1.0f, -8), 2.0f)), 0x3f81);
}

TEST(DtypeBF16, RandomF32MatchReference) {
  std::mt19937_64 rng(0xbf16bf16u);
  for (int i = 0; i < 2000000; ++i) {
    const float x = (i & 1) ? f32_from_bits(uint32_t(rng())) : random_f32(rng, 0, 255);
    if (std::isnan(x)) continue;
    ASSERT_EQ(f32_to_bf16(x), ref_f32_to_ieee16(x, kBF16)) << "x=" << x << " bits " << std::hex << f32_bits(x);
  }
}

// ---------------------------------------------------------------- bulk conversions, names, sizes

namespace {
std::vector<float> bulk_inputs() {
  std::vector<float> v = {0.0f, -0.0f, 1.0f, -1.0f, 448.0f, 464.0f, 465.0f, 480.0f, -480.0f, 57344.0f, 61440.0f,
                          65504.0f, 65520.0f, FLT_MAX, -FLT_MAX, FLT_MIN, std::numeric_limits<float>::denorm_min(),
                          std::ldexp(1.0f, -10), std::ldexp(1.0f, -17), kInf, -kInf, kNaN, -kNaN,
                          f32_from_bits(0x7f800001u), f32_from_bits(0xffc12345u)};
  std::mt19937_64 rng(0xb01bu);
  for (int i = 0; i < 20000; ++i) v.push_back(random_f32(rng, i & 1 ? 0 : 100, i & 1 ? 255 : 150));
  for (int i = 0; i < 5000; ++i) v.push_back(f32_from_bits(uint32_t(rng())));
  return v;
}
}  // namespace

TEST(DtypeBulk, ConvertFromF32MatchesScalar) {
  const std::vector<float> in = bulk_inputs();
  const size_t n = in.size();
  {
    std::vector<float> out(n);
    convert_from_f32(DType::F32, in.data(), out.data(), n);
    for (size_t i = 0; i < n; ++i) ASSERT_TRUE(same_bits(out[i], in[i])) << i;
  }
  {
    std::vector<double> out(n);
    convert_from_f32(DType::F64, in.data(), out.data(), n);
    for (size_t i = 0; i < n; ++i) {
      if (std::isnan(in[i])) ASSERT_TRUE(std::isnan(out[i])) << i;
      else ASSERT_EQ(out[i], double(in[i])) << i;
    }
  }
  {
    std::vector<uint16_t> out(n);
    convert_from_f32(DType::BF16, in.data(), out.data(), n);
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(out[i], f32_to_bf16(in[i])) << i;
    convert_from_f32(DType::F16, in.data(), out.data(), n);
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(out[i], f32_to_f16(in[i])) << i;
  }
  {
    std::vector<uint8_t> out(n);
    convert_from_f32(DType::F8_E4M3, in.data(), out.data(), n);
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(out[i], f32_to_fp8_e4m3(in[i])) << i;
    convert_from_f32(DType::F8_E5M2, in.data(), out.data(), n);
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(out[i], f32_to_fp8_e5m2(in[i])) << i;
  }
  std::vector<int32_t> junk(4);
  for (DType t : {DType::I64, DType::I32, DType::I16, DType::I8, DType::U8, DType::BOOL})
    EXPECT_THROW(convert_from_f32(t, in.data(), junk.data(), 1), Error) << dtype_name(t);
}

TEST(DtypeBulk, ConvertToF32MatchesScalar) {
  std::vector<uint16_t> c16(65536);
  for (uint32_t c = 0; c < 65536; ++c) c16[c] = uint16_t(c);
  std::vector<float> out(65536);
  convert_to_f32(DType::BF16, c16.data(), out.data(), 65536);
  for (uint32_t c = 0; c < 65536; ++c) ASSERT_TRUE(same_bits(out[c], bf16_to_f32(uint16_t(c)))) << c;
  convert_to_f32(DType::F16, c16.data(), out.data(), 65536);
  for (uint32_t c = 0; c < 65536; ++c) ASSERT_TRUE(same_bits(out[c], f16_to_f32(uint16_t(c)))) << c;

  std::vector<uint8_t> c8(256);
  for (uint32_t c = 0; c < 256; ++c) c8[c] = uint8_t(c);
  convert_to_f32(DType::F8_E4M3, c8.data(), out.data(), 256);
  for (uint32_t c = 0; c < 256; ++c) ASSERT_TRUE(same_bits(out[c], fp8_e4m3_to_f32(uint8_t(c)))) << c;
  convert_to_f32(DType::F8_E5M2, c8.data(), out.data(), 256);
  for (uint32_t c = 0; c < 256; ++c) ASSERT_TRUE(same_bits(out[c], fp8_e5m2_to_f32(uint8_t(c)))) << c;

  const std::vector<float> in = bulk_inputs();
  std::vector<float> f(in.size());
  convert_to_f32(DType::F32, in.data(), f.data(), in.size());
  for (size_t i = 0; i < in.size(); ++i) ASSERT_TRUE(same_bits(f[i], in[i])) << i;

  const std::vector<double> d = {0.0, -0.0, 1.0, 1.0 + 0x1p-24, 1.0 + 0x1p-24 + 0x1p-40, 1e300, -1e300, 1e-300,
                                 0x1p-150, 0x1.8p-150, 3.0e38, 3.5e38, double(kInf), -double(kInf)};
  std::vector<float> fd(d.size());
  convert_to_f32(DType::F64, d.data(), fd.data(), d.size());
  for (size_t i = 0; i < d.size(); ++i) ASSERT_TRUE(same_bits(fd[i], float(d[i]))) << i;
  EXPECT_EQ(fd[3], 1.0f);                        // tie -> even
  EXPECT_EQ(fd[4], std::nextafter(1.0f, 2.0f));  // above the tie
  EXPECT_EQ(fd[5], kInf);

  std::vector<int32_t> junk(4);
  for (DType t : {DType::I64, DType::I32, DType::I16, DType::I8, DType::U8, DType::BOOL})
    EXPECT_THROW(convert_to_f32(t, junk.data(), out.data(), 1), Error) << dtype_name(t);
}

TEST(DtypeMeta, NamesSizesAndKinds) {
  struct Row { DType t; const char* name; size_t size; bool is_float; };
  const Row rows[] = {
      {DType::F32, "F32", 4, true},          {DType::F64, "F64", 8, true},
      {DType::F16, "F16", 2, true},          {DType::BF16, "BF16", 2, true},
      {DType::F8_E4M3, "F8_E4M3", 1, true},  {DType::F8_E5M2, "F8_E5M2", 1, true},
      {DType::I64, "I64", 8, false},         {DType::I32, "I32", 4, false},
      {DType::I16, "I16", 2, false},         {DType::I8, "I8", 1, false},
      {DType::U8, "U8", 1, false},           {DType::BOOL, "BOOL", 1, false},
  };
  for (const Row& r : rows) {
    EXPECT_STREQ(dtype_name(r.t), r.name);
    EXPECT_EQ(dtype_size(r.t), r.size) << r.name;
    EXPECT_EQ(dtype_is_float(r.t), r.is_float) << r.name;
    const auto back = dtype_from_name(r.name);
    ASSERT_TRUE(back.has_value()) << r.name;
    EXPECT_EQ(*back, r.t) << r.name;
    EXPECT_EQ(dtype_from_name(dtype_name(r.t)), r.t);
  }
  for (const char* bad : {"", "f32", "FP32", "F8_E4M3FN", "F8", "BF16 ", "float32", "?"})
    EXPECT_FALSE(dtype_from_name(bad).has_value()) << '"' << bad << '"';
}
