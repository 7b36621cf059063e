// Glue kernels of the CUDA model (kernels/cuda/infer_ops.h) against host loops: the per-head products of the
// absorbed MLA (decode shapes of small.json and DeepSeek-V3, strided operands, F32 and BF16 weights and outputs),
// the fused residual + RMSNorm (bit-identical to the unfused kernels) and the absorbed-decode prologue.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <tuple>

#include "cuda_test_util.h"
#include "core/tensor.h"
#include "kernels/ops.h"
#include "kernels/cuda/infer_ops.h"
#include "kernels/cuda/moe_ops.h"

namespace dsv3::cuda::test {
namespace {

struct HeadCase {
  int64_t M, H, K, N;
  bool bf16;
};

TEST(CudaInferOps, HeadMatmulMatchesHost) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(5);
  for (const HeadCase c : {HeadCase{1, 16, 64, 256, true}, HeadCase{1, 16, 256, 64, true}, HeadCase{13, 3, 100, 45, false},
                           HeadCase{64, 128, 128, 512, true}, HeadCase{9, 128, 512, 128, false}, HeadCase{2, 5, 7, 33, true}}) {
    // x rows padded (xs0 > H·xs1, xs1 > K) and y strided the same way, as the model's q/o buffers are.
    const int64_t xs1 = c.K + 3, xs0 = c.H * xs1 + 5, ys1 = c.N + 2, ys0 = c.H * ys1 + 1;
    const int64_t wsk = c.N, wsh = c.K * c.N;
    auto x = randn(size_t(c.M * xs0), rng);
    auto wf = randn(size_t(c.H * wsh), rng);
    if (c.bf16) wf = round_bf16(wf);
    std::vector<double> want(size_t(c.M * ys0), 0.0);
    std::vector<float> wantf;
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t n = 0; n < c.N; ++n) {
          double a = 0;
          for (int64_t k = 0; k < c.K; ++k) a += double(x[size_t(m * xs0 + h * xs1 + k)]) * double(wf[size_t(h * wsh + k * wsk + n)]);
          want[size_t(m * ys0 + h * ys1 + n)] = a;
        }
    auto dx = upload(x);
    auto dwf = upload(wf);
    auto dwb = upload(to_bf16(wf));
    // bf16 weights also write bf16 outputs (the model's o_latent·W_UVᵀ feeding o_proj).
    auto dy = poisoned<float>(size_t(c.M * ys0));
    auto dyb = poisoned<uint16_t>(size_t(c.M * ys0));
    head_matmul(dx.get(), xs0, xs1, c.K, c.bf16 ? DType::BF16 : DType::F32, c.bf16 ? static_cast<const void*>(dwb.get()) : dwf.get(),
                wsh, wsk, c.N, c.bf16 ? DType::BF16 : DType::F32, c.bf16 ? static_cast<void*>(dyb.get()) : dy.get(), ys0, ys1, c.M,
                c.H);
    const auto got = c.bf16 ? from_bf16(download(dyb)) : download(dy);
    std::vector<float> g, r;
    for (int64_t m = 0; m < c.M; ++m)
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t n = 0; n < c.N; ++n) {
          g.push_back(got[size_t(m * ys0 + h * ys1 + n)]);
          r.push_back(float(want[size_t(m * ys0 + h * ys1 + n)]));
        }
    // f32 outputs: summation order only (1e-5); bf16 outputs: one rounding (2^-9 relative at most, 4e-3).
    const double e = rel_l2(g, r);
    EXPECT_LT(e, c.bf16 ? 4e-3 : 1e-5) << "M " << c.M << " H " << c.H << " K " << c.K << " N " << c.N;
  }
}

// contract_weights (the persistent kernel's folded weights) against a float64 host loop: the two folds the model
// makes (W_UK into q_b per head, bf16 operands; the router into o_proj, f32 gate read transposed, bf16 W_o, ln2
// as the per-d scale) and an odd-sized case with padded strides. f64 sums on both sides: 1e-6.
TEST(CudaInferOps, ContractWeightsMatchesHost) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(23);
  struct Case {
    int64_t nh, nd, ni, nk;
    bool a_bf16, b_bf16, a_transposed, scaled;
  };
  for (const Case c : {Case{16, 64, 256, 384, true, true, false, false}, Case{1, 1024, 64, 1024, false, true, true, true},
                       Case{3, 17, 29, 45, false, false, false, true}}) {
    // A(h, d, i): rows of d (i contiguous) or, transposed, rows of i (d contiguous); both padded by 3 and per head by 7.
    const int64_t a_sd = c.a_transposed ? 1 : c.ni + 3, a_sx = c.a_transposed ? c.nd + 3 : 1;
    const int64_t a_sh = (c.a_transposed ? c.ni * a_sx : c.nd * a_sd) + 7;
    const int64_t b_sd = c.nk + 2, b_sh = c.nd * b_sd + 5, soi = c.nk + 1, soh = c.ni * soi + 4;
    auto a = randn(size_t(c.nh * a_sh), rng), b = randn(size_t(c.nh * b_sh), rng), sc = randn(size_t(c.nd), rng, 0.3f, 1.0f);
    if (c.a_bf16) a = round_bf16(a);
    if (c.b_bf16) b = round_bf16(b);
    auto da32 = upload(a), db32 = upload(b), ds = upload(sc);
    auto da16 = upload(to_bf16(a)), db16 = upload(to_bf16(b));
    auto dout = poisoned<float>(size_t(c.nh * soh));
    const ContractOperand A{c.a_bf16 ? DType::BF16 : DType::F32, c.a_bf16 ? static_cast<const void*>(da16.get()) : da32.get(), a_sh, a_sd, a_sx};
    const ContractOperand B{c.b_bf16 ? DType::BF16 : DType::F32, c.b_bf16 ? static_cast<const void*>(db16.get()) : db32.get(), b_sh, b_sd, 1};
    contract_weights(A, B, c.scaled ? ds.get() : nullptr, c.nh, c.nd, c.ni, c.nk, dout.get(), soh, soi);
    const auto got = download(dout);
    std::vector<float> g, r;
    for (int64_t h = 0; h < c.nh; ++h)
      for (int64_t i = 0; i < c.ni; ++i)
        for (int64_t k = 0; k < c.nk; ++k) {
          double acc = 0;
          for (int64_t d = 0; d < c.nd; ++d)
            acc += (c.scaled ? double(sc[size_t(d)]) : 1.0) * double(a[size_t(h * a_sh + d * a_sd + i * a_sx)]) *
                   double(b[size_t(h * b_sh + d * b_sd + k)]);
          g.push_back(got[size_t(h * soh + i * soi + k)]);
          r.push_back(float(acc));
        }
    EXPECT_LT(rel_l2(g, r), 1e-6) << "nh " << c.nh << " nd " << c.nd << " ni " << c.ni << " nk " << c.nk;
  }
}

// The fused layer boundary must equal add_rows + rmsnorm_to bit for bit (the model's golden tolerances were
// measured with the unfused kernels), with and without the add, for both outputs and padded rows.
TEST(CudaInferOps, ResidualRmsnormEqualsUnfused) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(17);
  // (From 256 rows with these unaligned strides: still the block kernel.)
  for (auto [M, D] : {std::pair<int64_t, int64_t>{1, 1024}, {5, 256}, {64, 7168}, {3, 100}, {300, 1024}, {261, 256}, {257, 100},
                      {256, 7168}}) {
    for (bool add : {true, false}) {
      const int64_t ldh = D + 3, ldd = D + 1, ldy = D + 2;
      const auto h0 = randn(size_t(M * ldh), rng), d = randn(size_t(M * ldd), rng), g = randn(size_t(D), rng, 0.5f, 1.0f);
      auto dh_ref = upload(h0), dh = upload(h0);
      auto dd = upload(d), dg = upload(g);
      auto yf_ref = poisoned<float>(size_t(M * ldy)), yf = poisoned<float>(size_t(M * ldy));
      auto yb_ref = poisoned<uint16_t>(size_t(M * ldy)), yb = poisoned<uint16_t>(size_t(M * ldy));
      if (add) add_rows(dh_ref.get(), ldh, dd.get(), ldd, M, D);
      rmsnorm_to(dh_ref.get(), ldh, dg.get(), 1e-6f, DType::F32, yf_ref.get(), ldy, M, D);
      rmsnorm_to(dh_ref.get(), ldh, dg.get(), 1e-6f, DType::BF16, yb_ref.get(), ldy, M, D);
      residual_rmsnorm(dh.get(), ldh, add ? dd.get() : nullptr, ldd, dg.get(), 1e-6f, M, D, yf.get(), ldy, DType::BF16, yb.get(), ldy);
      const std::string what = "M " + std::to_string(M) + " D " + std::to_string(D) + (add ? " add" : "");
      EXPECT_EQ(download(dh), download(dh_ref)) << what;
      const auto a = download(yf), b = download(yf_ref);
      for (int64_t m = 0; m < M; ++m)
        EXPECT_EQ(0, std::memcmp(a.data() + m * ldy, b.data() + m * ldy, size_t(D) * 4)) << what << " row " << m;
      const auto ab = download(yb), bb = download(yb_ref);
      for (int64_t m = 0; m < M; ++m)
        EXPECT_EQ(0, std::memcmp(ab.data() + m * ldy, bb.data() + m * ldy, size_t(D) * 2)) << what << " row " << m;
    }
  }
}

// The warp-a-row layer boundary (from 256 rows, and every boundary with MoE rows): its f32 normed output within 1e-6
// of the block kernel's (its own order of the sum of squares; an f32 sum's rounding is ~6e-8 a term), and the bf16
// output that f32 value rounded (both stored from one y).
void expect_warp_norm(const std::vector<float>& yf, const std::vector<float>& yf_ref, const std::vector<uint16_t>& yb,
                      const std::string& what) {
  EXPECT_LT(rel_l2(yf, yf_ref), 1e-6) << what;
  EXPECT_EQ(yb, to_bf16(yf)) << what;
}

TEST(CudaInferOps, ResidualRmsnormWarpRows) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(19);
  for (const int64_t D : {int64_t(1024), int64_t(128), int64_t(256), int64_t(2048)})
    for (bool add : {true, false}) {
      const int64_t M = 300;
      const auto h0 = randn(size_t(M * D), rng), d = randn(size_t(M * D), rng), g = randn(size_t(D), rng, 0.5f, 1.0f);
      auto dh_ref = upload(h0), dh = upload(h0);
      auto dd = upload(d), dg = upload(g);
      auto yf_ref = poisoned<float>(size_t(M * D)), yf = poisoned<float>(size_t(M * D));
      auto yb = poisoned<uint16_t>(size_t(M * D));
      if (add) add_rows(dh_ref.get(), D, dd.get(), D, M, D);
      rmsnorm_to(dh_ref.get(), D, dg.get(), 1e-6f, DType::F32, yf_ref.get(), D, M, D);
      residual_rmsnorm(dh.get(), D, add ? dd.get() : nullptr, D, dg.get(), 1e-6f, M, D, yf.get(), D, DType::BF16, yb.get(), D);
      const std::string what = "D " + std::to_string(D) + (add ? " add" : "");
      EXPECT_EQ(download(dh), download(dh_ref)) << what;
      expect_warp_norm(download(yf), download(yf_ref), download(yb), what);
    }
}

// A MoE layer's routed sum left to the next layer boundary (MoeRowsSum): residual_rmsnorm summing the expert rows
// itself must give moe_unpermute-then-residual_rmsnorm's h to the bit (its normed outputs as the warp kernel's
// above), with and without the shared experts' d, for bf16 and f32 expert outputs, decode- and prefill-sized M, 1 to
// 10 choices a row in no particular expert order.
TEST(CudaInferOps, ResidualRmsnormMoeRowsEqualUnpermute) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(23);
  for (auto [M, D] : {std::pair<int64_t, int64_t>{7, 1024}, {300, 1024}, {300, 256}, {33, 128}})
    for (const int64_t k : {int64_t(6), int64_t(1), int64_t(10)})
      for (bool shared : {true, false})
        for (bool bf16 : {true, false}) {
          const int64_t E = 16, S = M * k + 5;  // (k 10: two rounds of the kernel's 8 rows in flight)  // (some slots no token reads)
          std::vector<int32_t> idx(size_t(M * k)), slot(size_t(M * k));
          std::vector<int32_t> perm(static_cast<size_t>(S));
          for (int64_t i = 0; i < S; ++i) perm[size_t(i)] = int32_t(i);
          std::shuffle(perm.begin(), perm.end(), rng);
          for (int64_t m = 0; m < M; ++m) {
            std::vector<int32_t> ex(static_cast<size_t>(E));
            for (int64_t e = 0; e < E; ++e) ex[size_t(e)] = int32_t(e);
            std::shuffle(ex.begin(), ex.end(), rng);
            for (int64_t j = 0; j < k; ++j) idx[size_t(m * k + j)] = ex[size_t(j)], slot[size_t(m * k + j)] = perm[size_t(m * k + j)];
          }
          const auto wts = randn(size_t(M * k), rng, 0.3f, 0.5f), h0 = randn(size_t(M * D), rng), d = randn(size_t(M * D), rng);
          const auto g = randn(size_t(D), rng, 0.5f, 1.0f);
          const auto eo = randn(size_t(S * D), rng);
          auto didx = upload(idx);
          auto dslot = upload(slot);
          auto dw = upload(wts), dg = upload(g);
          auto deo_f = upload(eo);
          auto deo_b = upload(to_bf16(eo));
          auto dh_ref = upload(h0), dh = upload(h0);
          auto dd_ref = upload(d), dd = upload(d);
          auto yf_ref = poisoned<float>(size_t(M * D)), yf = poisoned<float>(size_t(M * D));
          auto yb_ref = poisoned<uint16_t>(size_t(M * D)), yb = poisoned<uint16_t>(size_t(M * D));
          if (bf16) moe_unpermute(deo_b.get(), D, dslot.get(), didx.get(), dw.get(), M, k, D, dd_ref.get(), D, shared);
          else moe_unpermute(deo_f.get(), D, dslot.get(), didx.get(), dw.get(), M, k, D, dd_ref.get(), D, shared);
          residual_rmsnorm(dh_ref.get(), D, dd_ref.get(), D, dg.get(), 1e-6f, M, D, yf_ref.get(), D, DType::BF16, yb_ref.get(), D);
          MoeRowsSum rows;
          rows.eo_type = bf16 ? DType::BF16 : DType::F32;
          rows.eo = bf16 ? static_cast<const void*>(deo_b.get()) : deo_f.get();
          rows.ld = D, rows.slot_row = dslot.get(), rows.idx = didx.get(), rows.wts = dw.get(), rows.top_k = k;
          ASSERT_TRUE(residual_rmsnorm_moe_supported(D, k));
          residual_rmsnorm(dh.get(), D, shared ? dd.get() : nullptr, D, dg.get(), 1e-6f, M, D, yf.get(), D, DType::BF16, yb.get(), D,
                           nullptr, &rows);
          const std::string what = "M " + std::to_string(M) + " D " + std::to_string(D) + " k " + std::to_string(k) +
                                   (shared ? " shared" : "") + (bf16 ? " bf16" : " f32");
          EXPECT_EQ(download(dh), download(dh_ref)) << what;
          expect_warp_norm(download(yf), download(yf_ref), download(yb), what);
        }
  EXPECT_FALSE(residual_rmsnorm_moe_supported(7168, 8));  // (D above 1024: the block kernel and an un-permute)
}

// The absorbed-decode prologue against a host loop: queries' rotary parts into qc, the normed latent and roped
// k_rope into the paged pool rows (F32 pool: 1e-6; BF16 pool: one rounding, 4e-3).
// The prologue tests' RoPE: a table of max_pos positions for dr rope dims (base 10000, attention factor 1.1) built
// on the device and read back, M tokens' positions, and their cache rows (odd rows in reverse: the even ones stay
// untouched), all uploaded.
struct RopeRows {
  int64_t half, max_pos = 64, pool_rows;
  DeviceBuffer<float> table;
  std::vector<float> tab;
  std::vector<int64_t> pos;
  std::vector<int32_t> rows;
  DeviceBuffer<int64_t> dpos;
  DeviceBuffer<int32_t> drows;
  RopeRows(int64_t M, int64_t dr) : half(dr / 2), pool_rows(2 * M + 1), table(size_t(64 * dr)), pos(size_t(M)), rows(size_t(M)) {
    std::vector<float> inv(static_cast<size_t>(half));
    for (int64_t p = 0; p < half; ++p) inv[size_t(p)] = std::pow(10000.0f, -2.0f * float(p) / float(dr));
    auto dinv = upload(inv);
    rope_build_table(dinv.get(), half, 1.1f, max_pos, table.get());
    tab = download(table);
    for (int64_t m = 0; m < M; ++m) pos[size_t(m)] = (m * 13 + 5) % max_pos, rows[size_t(m)] = int32_t(M - 1 - m) * 2 + 1;
    dpos = upload(pos);
    drows = upload(rows);
  }
  // (cos, sin) of token m's position for pair p
  float cs(int64_t m, int64_t p) const { return tab[size_t((pos[size_t(m)] * half + p) * 2)]; }
  float sn(int64_t m, int64_t p) const { return tab[size_t((pos[size_t(m)] * half + p) * 2 + 1)]; }
};

TEST(CudaInferOps, MlaDecodePrepMatchesHost) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(23);
  struct Case {
    int64_t M, H, dn, dr, kvr;
    bool bf16;
  };
  for (const Case c : {Case{1, 16, 64, 32, 256, true}, Case{3, 128, 128, 64, 512, true}, Case{5, 3, 8, 4, 40, false}}) {
    const int64_t dqk = c.dn + c.dr, W = c.kvr + c.dr, half = c.dr / 2;
    const int64_t ldq = c.H * dqk + 7, ldkv = W + 384, ldqc = c.H * W;
    const auto q = randn(size_t(c.M * ldq), rng), kv = randn(size_t(c.M * ldkv), rng), g = randn(size_t(c.kvr), rng, 0.5f, 1.0f);
    const RopeRows rr(c.M, c.dr);
    const std::vector<int32_t>& rows = rr.rows;
    const int64_t pool_rows = rr.pool_rows;
    auto dq = upload(q), dkv = upload(kv), dg = upload(g);
    auto qc = poisoned<float>(size_t(c.M * ldqc));
    auto pf = poisoned<float>(size_t(pool_rows * W));
    auto pb = poisoned<uint16_t>(size_t(pool_rows * W));
    mla_decode_prep(dq.get(), ldq, c.H, c.dn, c.dr, dkv.get(), ldkv, c.kvr, dg.get(), 1e-6f, rr.dpos.get(), rr.table.get(), rr.drows.get(),
                    c.bf16 ? DType::BF16 : DType::F32, c.bf16 ? static_cast<void*>(pb.get()) : pf.get(), qc.get(), ldqc, c.M);
    const auto gq = download(qc);
    const auto gp = c.bf16 ? from_bf16(download(pb)) : download(pf);
    std::vector<float> got_q, want_q, got_p, want_p;
    auto rot = [&](int64_t m, int64_t p, float a, float b, float* x, float* y) {
      *x = a * rr.cs(m, p) - b * rr.sn(m, p), *y = b * rr.cs(m, p) + a * rr.sn(m, p);
    };
    for (int64_t m = 0; m < c.M; ++m) {
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t p = 0; p < half; ++p) {
          float x, y;
          const float* v = q.data() + m * ldq + h * dqk + c.dn + 2 * p;
          rot(m, p, v[0], v[1], &x, &y);
          want_q.insert(want_q.end(), {x, y});
          const float* o = gq.data() + m * ldqc + h * W + c.kvr + 2 * p;
          got_q.insert(got_q.end(), {o[0], o[1]});
        }
      const float* kr = kv.data() + m * ldkv;
      double ss = 0;
      for (int64_t j = 0; j < c.kvr; ++j) ss += double(kr[j]) * kr[j];
      const double r = 1.0 / std::sqrt(ss / double(c.kvr) + 1e-6);
      const float* row = gp.data() + int64_t(rows[size_t(m)]) * W;
      for (int64_t j = 0; j < c.kvr; ++j) want_p.push_back(float(g[size_t(j)] * kr[j] * r)), got_p.push_back(row[j]);
      for (int64_t p = 0; p < half; ++p) {
        float x, y;
        rot(m, p, kr[c.kvr + 2 * p], kr[c.kvr + 2 * p + 1], &x, &y);
        want_p.insert(want_p.end(), {x, y});
        got_p.insert(got_p.end(), {row[c.kvr + 2 * p], row[c.kvr + 2 * p + 1]});
      }
    }
    EXPECT_LT(rel_l2(got_q, want_q), 1e-6) << "H " << c.H;
    EXPECT_LT(rel_l2(got_p, want_p), c.bf16 ? 4e-3 : 1e-6) << "H " << c.H;
  }
}

// The direct prefill path's prologue (mla_prefill_prep) against float64 host norms and RoPE: small.json's and
// DeepSeek-V3's widths and a small odd one, an f32 and a bf16 latent cache and none, rows of 8 tokens a block and
// a partial last block. bf16 outputs: their rounding, 4e-3 (as the decode prologue's bf16 cache); f32: 1e-6.
TEST(CudaInferOps, MlaPrefillPrepMatchesHost) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(31);
  struct Case {
    int64_t M, nq, kvr, dr;
    int pool;  // 0 none, 1 F32, 2 BF16
  };
  for (const Case c : {Case{37, 384, 256, 32, 2}, Case{16, 1536, 512, 64, 1}, Case{9, 12, 20, 4, 1}, Case{5, 384, 256, 32, 0}}) {
    const int64_t ldx = c.nq + c.kvr + c.dr + 4, W = c.kvr + c.dr, half = c.dr / 2;
    const auto x = randn(size_t(c.M * ldx), rng), gq = randn(size_t(c.nq), rng, 0.5f, 1.0f), gk = randn(size_t(c.kvr), rng, 0.5f, 1.0f);
    const RopeRows rr(c.M, c.dr);
    const std::vector<int32_t>& rows = rr.rows;
    const int64_t pool_rows = rr.pool_rows;
    auto dx = upload(x), dgq = upload(gq), dgk = upload(gk);
    auto qn = poisoned<uint16_t>(size_t(c.M * c.nq)), cn = poisoned<uint16_t>(size_t(c.M * c.kvr)), kr = poisoned<uint16_t>(size_t(c.M * c.dr));
    auto pf = poisoned<float>(size_t(pool_rows * W));
    auto pb = poisoned<uint16_t>(size_t(pool_rows * W));
    ASSERT_TRUE(mla_prefill_prep_supported(dx.get(), ldx, c.nq, c.kvr, c.dr, c.nq, c.kvr, c.dr));
    void* pool = c.pool == 0 ? nullptr : c.pool == 1 ? static_cast<void*>(pf.get()) : static_cast<void*>(pb.get());
    mla_prefill_prep(dx.get(), ldx, c.nq, c.kvr, c.dr, dgq.get(), dgk.get(), 1e-6f, rr.dpos.get(), rr.table.get(), qn.get(), c.nq,
                     cn.get(), c.kvr, kr.get(), c.dr, rr.drows.get(), c.pool == 2 ? DType::BF16 : DType::F32, pool, c.M);
    const auto gqn = from_bf16(download(qn)), gcn = from_bf16(download(cn)), gkr = from_bf16(download(kr));
    const auto gp = c.pool == 2 ? from_bf16(download(pb)) : download(pf);
    std::vector<float> want_q, want_c, want_k, got_p, want_p;
    auto norm = [&](const float* v, int64_t n, const std::vector<float>& g, std::vector<float>& out) {
      double ss = 0;
      for (int64_t j = 0; j < n; ++j) ss += double(v[j]) * v[j];
      const double r = 1.0 / std::sqrt(ss / double(n) + 1e-6);
      for (int64_t j = 0; j < n; ++j) out.push_back(float(g[size_t(j)] * v[j] * r));
    };
    for (int64_t m = 0; m < c.M; ++m) {
      const float* xr = x.data() + m * ldx;
      norm(xr, c.nq, gq, want_q);
      const size_t c0 = want_c.size();
      norm(xr + c.nq, c.kvr, gk, want_c);
      const size_t k0 = want_k.size();
      for (int64_t p = 0; p < half; ++p) {
        const double cs = rr.cs(m, p), sn = rr.sn(m, p);
        const double a = xr[c.nq + c.kvr + 2 * p], b = xr[c.nq + c.kvr + 2 * p + 1];
        want_k.insert(want_k.end(), {float(a * cs - b * sn), float(b * cs + a * sn)});
      }
      if (c.pool) {
        const float* row = gp.data() + int64_t(rows[size_t(m)]) * W;
        got_p.insert(got_p.end(), row, row + W);
        want_p.insert(want_p.end(), want_c.begin() + int64_t(c0), want_c.end());
        want_p.insert(want_p.end(), want_k.begin() + int64_t(k0), want_k.end());
      }
    }
    const std::string what = "nq " + std::to_string(c.nq) + " pool " + std::to_string(c.pool);
    EXPECT_LT(rel_l2(gqn, want_q), 4e-3) << what;
    EXPECT_LT(rel_l2(gcn, want_c), 4e-3) << what;
    EXPECT_LT(rel_l2(gkr, want_k), 4e-3) << what;
    if (c.pool) EXPECT_LT(rel_l2(got_p, want_p), c.pool == 2 ? 4e-3 : 1e-6) << what;
    if (c.pool == 1) {  // the pool rows no token wrote are untouched
      const auto untouched = download(pf);
      for (int64_t i = 0; i < pool_rows; i += 2) EXPECT_TRUE(std::isnan(untouched[size_t(i * W)])) << "pool row " << i;
    }
  }
  EXPECT_FALSE(mla_prefill_prep_supported(nullptr, 8, 6, 4, 2, 6, 4, 2));
}

}  // namespace
}  // namespace dsv3::cuda::test

namespace dsv3::cuda::test {
namespace {
// The long-prefill attention (cuBLASLt bf16 GEMMs + bf16 probabilities) against the CPU twin in f32 on the same
// inputs: bf16 rounding of q, k, v and P bounds the error (~3e-3); stated tolerance 1e-2.
TEST(CudaInferOps, CausalGemmAttentionMatchesCpu) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(41);
  for (auto [B, T, H, D, Dv] : {std::tuple{1, 300, 3, 96, 64}, std::tuple{2, 257, 2, 192, 128}, std::tuple{1, 1, 1, 24, 40}}) {
    const int64_t row = D + D + Dv;  // q, k, v as slices of one [B, T, H, row] buffer
    auto qkv = randn(size_t(B * T * H * row), rng);
    Tensor all = Tensor::from_vector(qkv, {B, T, H, row});
    const float scale = 1.0f / std::sqrt(float(D)) * 1.7f;
    Tensor o = Tensor::empty(DType::F32, {B, T, H, Dv});
    ops::attention_causal(all.slice(3, 0, D), all.slice(3, D, 2 * D), all.slice(3, 2 * D, 2 * D + Dv), scale, o);
    auto d = upload(qkv);
    const Strides3 s{T * H * row, H * row, row}, so{T * H * Dv, H * Dv, Dv};
    auto out = poisoned<float>(size_t(B * T * H * Dv));
    const size_t wsb = attention_causal_gemm_workspace(B, T, H, D, Dv);
    DeviceBuffer<uint8_t> ws(wsb);
    Gemm g;
    attention_causal_gemm(g, d.get(), s, d.get() + D, s, d.get() + 2 * D, s, out.get(), so, B, T, H, D, Dv, scale, ws.get(), wsb);
    const auto got = download(out);
    const std::vector<float> want(o.f32(), o.f32() + o.numel());
    const double e = rel_l2(got, want);
    std::printf("  gemm attention B %lld T %lld H %lld D %lld Dv %lld: rel L2 %.3g\n", (long long)B, (long long)T, (long long)H,
                (long long)D, (long long)Dv, e);
    EXPECT_LT(e, 1e-2);
  }
}
}  // namespace
}  // namespace dsv3::cuda::test
