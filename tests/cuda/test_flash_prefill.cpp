// The flash prefill attention (kernels/cuda/flash_prefill.cu: mma.sync, online softmax in registers; and the wgmma
// kernel of flash_wgmma.cuh with 64- and 128-key tiles, where it has the head dims) against the CPU twin ops::attention_causal in f32 on the same inputs: bf16 rounding of q, k, v and P bounds the error
// (~3e-3, as attention_causal_gemm); stated tolerance 1e-2. Lengths off the 64- and 128-row tiles (partial query
// and key tiles), one token, packed strided q/k/v views (also misaligned for float4), separate tensors, a strided output.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <vector>

#include "core/error.h"
#include "core/tensor.h"
#include "causal_inputs.h"
#include "cuda_test_util.h"
#include "kernels/cuda/infer_ops.h"
#include "kernels/ops.h"

namespace dsv3::cuda::test {
namespace {

// The kernels to run a case on: mma.sync always; the wgmma kernel (DSV3_FLASH_WGMMA, key tiles of 64 and 128) where
// it has the head dims. FlashKernel sets the variable for its scope.
std::vector<const char*> wgmma_variants(int64_t D, int64_t Dv) {
  if ((D == 64 || D == 96) && Dv == 64) return {"", "64", "128"};
  return {""};
}
struct FlashKernel {
  explicit FlashKernel(const char* v) : v_(v) {
    if (*v_) setenv("DSV3_FLASH_WGMMA", v_, 1);
  }
  ~FlashKernel() { unsetenv("DSV3_FLASH_WGMMA"); }
  const char* name() const {
    return !*v_ ? "mma.sync" : v_[0] == '6' ? "wgmma, 64-key tiles" : "wgmma, 128-key tiles";
  }
  const char* v_;
};

// MLA's pieces expanded for the CPU twin: each head's key [k_nope (kv's first dn dims) | the shared k_rope (dr)]
// and its value (kv's last dv), from kv [B·T, H, dn + dv] and kr [B·T, dr], into k [B·T, H, dn + dr] and v.
void expand_mla(const std::vector<float>& kv, const std::vector<float>& kr, int64_t BT, int64_t H, int64_t dn, int64_t dr, int64_t dv,
                std::vector<float>& k, std::vector<float>& v) {
  const int64_t D = dn + dr, hd = dn + dv;
  k.assign(size_t(BT * H * D), 0.0f);
  v.assign(size_t(BT * H * dv), 0.0f);
  for (int64_t m = 0; m < BT; ++m)
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t d = 0; d < dn; ++d) k[size_t((m * H + h) * D + d)] = kv[size_t((m * H + h) * hd + d)];
      for (int64_t d = 0; d < dr; ++d) k[size_t((m * H + h) * D + dn + d)] = kr[size_t(m * dr + d)];
      for (int64_t d = 0; d < dv; ++d) v[size_t((m * H + h) * dv + d)] = kv[size_t((m * H + h) * hd + dn + d)];
    }
}

struct FlashCase {
  int64_t B, T, H, D, Dv;
  bool packed;  // q, k, v as slices of one [B, T, H, D + D + Dv + pad] buffer; else three contiguous tensors
  int64_t pad;  // packed: extra floats per row (odd: rows off 16 bytes, the pack kernel's scalar path)
};

TEST(CudaFlashPrefill, CausalFlashAttentionMatchesCpu) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(43);
  for (const FlashCase c : {FlashCase{2, 77, 3, 96, 64, true, 0}, FlashCase{1, 300, 3, 96, 64, false, 0},
                            FlashCase{2, 1029, 2, 96, 64, true, 1}, FlashCase{1, 128, 2, 96, 64, false, 0},
                            FlashCase{2, 1, 3, 192, 128, false, 0}, FlashCase{2, 300, 3, 192, 128, true, 0},
                            FlashCase{1, 1029, 2, 192, 128, false, 0}, FlashCase{2, 65, 3, 192, 128, true, 3},
                            FlashCase{2, 130, 3, 64, 64, true, 0}, FlashCase{1, 64, 1, 64, 64, false, 0}}) {
    const auto [B, T, H, D, Dv, packed, pad] = c;
    ASSERT_TRUE(attention_causal_flash_supported(D, Dv));
    const CausalInputs in = causal_inputs(B, T, H, D, Dv, packed, pad, rng);
    for (const char* kernel : wgmma_variants(D, Dv)) {
      FlashKernel use(kernel);
      const int64_t orow = Dv + pad;  // a padded output row when pad > 0 (the pad stays poisoned)
      const Strides3 so{T * H * orow, H * orow, orow};
      auto out = poisoned<float>(size_t(B * T * H * orow));
      const size_t wsb = attention_causal_flash_workspace(B, T, H, D, Dv);
      DeviceBuffer<uint8_t> ws(wsb);
      attention_causal_flash(in.pq, in.sq, in.pk, in.sk, in.pv, in.sv, out.get(), so, B, T, H, D, Dv, in.scale, ws.get(), wsb);
      const auto all_out = download(out);
      std::vector<float> got;
      got.reserve(size_t(B * T * H * Dv));
      for (int64_t r = 0; r < B * T * H; ++r) got.insert(got.end(), all_out.begin() + r * orow, all_out.begin() + r * orow + Dv);
      ASSERT_TRUE(all_finite(got)) << B << "x" << T << "x" << H << " D " << D << " Dv " << Dv;
      const double e = rel_l2(got, vec(in.o));
      std::printf("  flash attention (%s) B %lld T %lld H %lld D %lld Dv %lld %s: rel L2 %.3g\n", use.name(), (long long)B,
                  (long long)T, (long long)H, (long long)D, (long long)Dv, packed ? "packed" : "separate", e);
      EXPECT_LT(e, 1e-2) << use.name() << " " << B << "x" << T << "x" << H << " D " << D << " Dv " << Dv;
    }
  }
}

// MLA's pieces folded into the packing (FlashMla): the key as kv_b's k_nope next to one k_rope shared by the heads,
// RoPE on the query's last dims from a table and per-row positions, a bf16 output; against the CPU twin on the
// expanded, rotated tensors. The bf16 output's own rounding (2^-9 relative) adds to the bf16 inputs' error: 1e-2.
TEST(CudaFlashPrefill, MlaPiecesRopeAndBf16OutputMatchCpu) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(44);
  struct C {
    int64_t B, T, H, dn, dr, dv;
  };
  for (const C c : {C{2, 300, 3, 64, 32, 64}, C{1, 1029, 2, 64, 32, 64}, C{2, 77, 2, 128, 64, 128}, C{1, 130, 2, 32, 32, 64}}) {
    const int64_t B = c.B, T = c.T, H = c.H, dn = c.dn, dr = c.dr, dv = c.dv, D = dn + dr, hd = dn + dv, half = dr / 2;
    const std::vector<float> qh = randn(size_t(B * T * H * D), rng), kvh = randn(size_t(B * T * H * hd), rng),
                             krh = randn(size_t(B * T * dr), rng);
    // Positions 3.. within each sequence (a prompt after a cached prefix), a table of 3 + T positions.
    std::vector<int64_t> pos(size_t(B * T));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t) pos[size_t(b * T + t)] = 3 + t;
    std::vector<float> table(size_t((T + 3) * half * 2));
    for (int64_t p = 0; p < T + 3; ++p)
      for (int64_t i = 0; i < half; ++i) {
        const double a = double(p) * std::pow(10000.0, -2.0 * double(i) / double(dr));
        table[size_t((p * half + i) * 2)] = float(std::cos(a));
        table[size_t((p * half + i) * 2 + 1)] = float(std::sin(a));
      }
    std::vector<float> qr = qh, kx(size_t(B * T * H * D)), vx(size_t(B * T * H * dv));
    for (int64_t m = 0; m < B * T; ++m)
      for (int64_t h = 0; h < H; ++h) {
        float* qv = qr.data() + (m * H + h) * D + dn;
        for (int64_t i = 0; i < half; ++i) {
          const float cs = table[size_t((pos[size_t(m)] * half + i) * 2)], sn = table[size_t((pos[size_t(m)] * half + i) * 2 + 1)];
          const float a = qv[2 * i], bb = qv[2 * i + 1];
          qv[2 * i] = a * cs - bb * sn;
          qv[2 * i + 1] = bb * cs + a * sn;
        }
      }
    expand_mla(kvh, krh, B * T, H, dn, dr, dv, kx, vx);
    const float scale = 1.0f / std::sqrt(float(D)) * 1.7f;
    Tensor ref = Tensor::empty(DType::F32, {B, T, H, dv});
    ops::attention_causal(Tensor::from_vector(qr, {B, T, H, D}), Tensor::from_vector(kx, {B, T, H, D}),
                          Tensor::from_vector(vx, {B, T, H, dv}), scale, ref);
    ASSERT_TRUE(attention_causal_flash_supported(D, dv));
    auto dq = upload(qh), dkv = upload(kvh), dkr = upload(krh), dtab = upload(table);
    auto dpos = upload(pos);
    FlashMla fm;
    fm.k_rope = dkr.get(), fm.skr = Strides3{T * dr, dr, 0}, fm.kr = dr;
    fm.rope_table = dtab.get(), fm.pos = dpos.get(), fm.q_rope = dr, fm.out_type = DType::BF16;
    const Strides3 sq{T * H * D, H * D, D}, skv{T * H * hd, H * hd, hd}, so{T * H * dv, H * dv, dv};
    const size_t wsb = attention_causal_flash_workspace(B, T, H, D, dv);
    DeviceBuffer<uint8_t> ws(wsb);
    for (const char* kernel : wgmma_variants(D, dv)) {
      FlashKernel use(kernel);
      auto out = poisoned<uint16_t>(size_t(B * T * H * dv));
      attention_causal_flash(dq.get(), sq, dkv.get(), skv, dkv.get() + dn, skv, out.get(), so, B, T, H, D, dv, scale, ws.get(), wsb,
                             nullptr, fm);
      const std::vector<float> got = from_bf16(download(out));
      ASSERT_TRUE(all_finite(got)) << use.name();
      const double e = rel_l2(got, vec(ref));
      std::printf("  flash attention (%s; MLA pieces, bf16 out) B %lld T %lld H %lld D %lld Dv %lld: rel L2 %.3g\n", use.name(),
                  (long long)B, (long long)T, (long long)H, (long long)D, (long long)dv, e);
      EXPECT_LT(e, 1e-2) << use.name() << " " << B << "x" << T << "x" << H << " D " << D;
    }
  }
}

// The wgmma kernel straight on bf16 projections (attention_causal_flash_direct): q rows with padding (a row stride
// past H·D), k_nope and v inside kv_b's rows, one shared k_rope (head stride 0); and D 64 with the whole key in k.
// Against the CPU twin on the same bf16 values (expanded keys): P in bf16 and the output's rounding, 1e-2 (as above).
TEST(CudaFlashPrefill, DirectBf16ProjectionsMatchCpu) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(45);
  struct C {
    int64_t B, T, H, dn, dr;
  };
  for (const C c : {C{2, 300, 3, 64, 32}, C{1, 1029, 2, 64, 32}, C{2, 77, 2, 64, 0}, C{1, 128, 2, 64, 32}})
    for (const char* nk : {"64", "128"}) {
      FlashKernel use(nk);
      const int64_t B = c.B, T = c.T, H = c.H, dn = c.dn, dr = c.dr, dv = 64, D = dn + dr, hd = dn + dv, ldq = H * D + 8;
      const std::vector<float> qh = round_bf16(randn(size_t(B * T * ldq), rng)), kvh = round_bf16(randn(size_t(B * T * H * hd), rng)),
                               krh = round_bf16(randn(size_t(B * T * std::max<int64_t>(dr, 8)), rng));
      std::vector<float> qx(size_t(B * T * H * D)), kx(size_t(B * T * H * D)), vx(size_t(B * T * H * dv));
      for (int64_t m = 0; m < B * T; ++m)
        for (int64_t h = 0; h < H; ++h) {
          for (int64_t d = 0; d < D; ++d) qx[size_t((m * H + h) * D + d)] = qh[size_t(m * ldq + h * D + d)];
        }
      expand_mla(kvh, krh, B * T, H, dn, dr, dv, kx, vx);
      const float scale = 1.0f / std::sqrt(float(D)) * 1.7f;
      Tensor ref = Tensor::empty(DType::F32, {B, T, H, dv});
      ops::attention_causal(Tensor::from_vector(qx, {B, T, H, D}), Tensor::from_vector(kx, {B, T, H, D}),
                            Tensor::from_vector(vx, {B, T, H, dv}), scale, ref);
      ASSERT_TRUE(attention_causal_flash_direct_supported(D, dv, dr));
      auto dq = upload(to_bf16(qh)), dkv = upload(to_bf16(kvh)), dkr = upload(to_bf16(krh));
      auto out = poisoned<uint16_t>(size_t(B * T * H * dv));
      const Strides3 sq{T * ldq, ldq, D}, skv{T * H * hd, H * hd, hd}, skr{T * dr, dr, 0}, so{T * H * dv, H * dv, dv};
      attention_causal_flash_direct(dq.get(), sq, dkv.get(), skv, dkr.get(), skr, dr, dkv.get() + dn, skv, out.get(), DType::BF16, so,
                                    B, T, H, D, dv, scale);
      const std::vector<float> got = from_bf16(download(out));
      ASSERT_TRUE(all_finite(got)) << use.name();
      const double e = rel_l2(got, vec(ref));
      std::printf("  flash attention direct (%s) B %lld T %lld H %lld D %lld: rel L2 %.3g\n", use.name(), (long long)B, (long long)T,
                  (long long)H, (long long)D, e);
      EXPECT_LT(e, 1e-2) << use.name() << " " << B << "x" << T << "x" << H << " D " << D;
    }
  // Misaligned strides and unsupported dims are one-line errors.
  DeviceBuffer<uint16_t> buf(4096);
  const Strides3 s{96 * 4, 96, 8}, bad{96 * 4, 90, 8};
  EXPECT_FALSE(attention_causal_flash_direct_supported(96, 64, 16));
  EXPECT_THROW(attention_causal_flash_direct(buf.get(), bad, buf.get(), s, buf.get(), s, 32, buf.get(), s, buf.get(), DType::BF16, s, 1,
                                             4, 1, 96, 64, 0.1f),
               dsv3::Error);
  EXPECT_THROW(attention_causal_flash_direct(buf.get(), s, buf.get(), s, buf.get(), s, 16, buf.get(), s, buf.get(), DType::BF16, s, 1,
                                             4, 1, 96, 64, 0.1f),
               dsv3::Error);
}

// Head dims without a kernel and a short workspace are one-line errors, before anything runs.
TEST(CudaFlashPrefill, RejectsUnsupportedDimsAndShortWorkspace) {
  DSV3_REQUIRE_GPU();
  EXPECT_FALSE(attention_causal_flash_supported(24, 40));
  EXPECT_FALSE(attention_causal_flash_supported(192, 64));
  const int64_t B = 1, T = 100, H = 2;
  DeviceBuffer<float> buf(size_t(B * T * H * 512));
  const Strides3 s{T * H * 512, H * 512, 512};
  const size_t wsb = attention_causal_flash_workspace(B, T, H, 192, 128);
  DeviceBuffer<uint8_t> ws(wsb);
  EXPECT_THROW(attention_causal_flash(buf.get(), s, buf.get() + 128, s, buf.get() + 256, s, buf.get(), s, B, T, H, 128, 128,
                                      0.1f, ws.get(), wsb),
               dsv3::Error);
  EXPECT_THROW(attention_causal_flash(buf.get(), s, buf.get() + 192, s, buf.get() + 384, s, buf.get(), s, B, T, H, 192, 128,
                                      0.1f, ws.get(), wsb - 1),
               dsv3::Error);
  FlashMla odd;  // a k_rope width off the packing's 4-value steps
  odd.k_rope = buf.get(), odd.kr = 30;
  EXPECT_THROW(attention_causal_flash(buf.get(), s, buf.get() + 192, s, buf.get() + 384, s, buf.get(), s, B, T, H, 192, 128,
                                      0.1f, ws.get(), wsb, nullptr, odd),
               dsv3::Error);
  synchronize();
}

}  // namespace
}  // namespace dsv3::cuda::test
