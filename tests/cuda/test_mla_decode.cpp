// mla_decode_fused (one kernel for the absorbed-MLA decode step) against a double-precision host twin: paged cache with a
// shuffled block table, several sequences at positions at and around tile edges, bf16 and f32, small.json's shapes and
// DeepSeek-V3's latent width.
#include <algorithm>
#include <numeric>

#include "cuda_test_util.h"
#include "kernels/cuda/infer_ops.h"

namespace dsv3::cuda::test {
namespace {

TEST(CudaMlaDecode, FusedMatchesHostTwin) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(61);
  struct Case {
    int64_t H, dn, dr, dv, kvr, max_len;
    std::vector<int64_t> pos;
    bool bf16;
  };
  const std::vector<Case> cases = {
      {16, 64, 32, 64, 256, 256, {0, 70, 255}, true},   // small.json
      {16, 64, 32, 64, 256, 256, {95, 96, 191, 192}, true},  // split edges: last row of a piece, first row of the next
      {16, 64, 32, 64, 256, 1024, {31, 32, 900}, false},
      {8, 32, 64, 32, 512, 512, {5, 300}, true},        // DeepSeek-V3's latent width: two columns per thread
      {3, 8, 8, 24, 40, 130, {1, 129}, false},          // odd sizes
  };
  for (const Case& c : cases) {
    // One block per head; ~96-row pieces (some empty); one-tile (32-row) pieces.
    for (const int64_t splits : {int64_t(1), (c.max_len + 95) / 96, (c.max_len + 31) / 32}) {
      const int64_t M = int64_t(c.pos.size()), W = c.kvr + c.dr, half = c.dr / 2, hd = c.dn + c.dv, bs = 64;
      const int64_t max_blocks = (c.max_len + bs - 1) / bs, nblocks = M * max_blocks, dqk = c.dn + c.dr;
      const int64_t ldq = c.H * dqk + 5, ldkv = W + 100, ldo = c.H * c.dv + 8;
      auto rnd = [&](size_t n, float sd, float mean = 0.0f) {
        auto v = randn(n, rng, sd, mean);
        return c.bf16 ? round_bf16(v) : v;
      };
      const auto q = randn(size_t(M * ldq), rng), kv = randn(size_t(M * ldkv), rng), gamma = randn(size_t(c.kvr), rng, 0.3f, 1.0f);
      const auto wuk = rnd(size_t(c.H * hd * c.kvr), 0.1f), wuv = rnd(size_t(c.H * c.kvr * c.dv), 0.1f);
      const auto pool0 = rnd(size_t(nblocks * bs * W), 1.0f);
      std::vector<int32_t> blocks(static_cast<size_t>(nblocks));
      std::iota(blocks.begin(), blocks.end(), 0);
      std::shuffle(blocks.begin(), blocks.end(), rng);
      std::vector<int32_t> rows(static_cast<size_t>(M));
      for (int64_t m = 0; m < M; ++m) {
        const int64_t p = c.pos[size_t(m)];
        rows[size_t(m)] = int32_t(blocks[size_t(m * max_blocks + p / bs)] * bs + p % bs);
      }
      std::vector<float> inv(static_cast<size_t>(half));
      for (int64_t i = 0; i < half; ++i) inv[size_t(i)] = std::pow(10000.0f, -2.0f * float(i) / float(c.dr));
      auto dinv = upload(inv);
      DeviceBuffer<float> table(size_t(c.max_len * c.dr));
      rope_build_table(dinv.get(), half, 1.0f, c.max_len, table.get());
      const auto tab = download(table);

      auto dq = upload(q), dkv = upload(kv), dg = upload(gamma);
      auto dpos = upload(c.pos);
      auto drows = upload(rows), dbt = upload(blocks);
      const DType act = c.bf16 ? DType::BF16 : DType::F32;
      DeviceBuffer<uint16_t> wb_uk, wb_uv, pb, ob;
      DeviceBuffer<float> wf_uk, wf_uv, pf, of;
      const void *duk, *duv;
      void *dpool, *dout;
      if (c.bf16) {
        wb_uk = upload(to_bf16(wuk)), wb_uv = upload(to_bf16(wuv)), pb = upload(to_bf16(pool0)), ob = poisoned<uint16_t>(size_t(M * ldo));
        duk = wb_uk.get(), duv = wb_uv.get(), dpool = pb.get(), dout = ob.get();
      } else {
        wf_uk = upload(wuk), wf_uv = upload(wuv), pf = upload(pool0), of = poisoned<float>(size_t(M * ldo));
        duk = wf_uk.get(), duv = wf_uv.get(), dpool = pf.get(), dout = of.get();
      }
      MlaDecodeShape sh;
      sh.H = c.H, sh.dn = c.dn, sh.dr = c.dr, sh.dv = c.dv, sh.kvr = c.kvr, sh.block_size = bs, sh.max_blocks = max_blocks;
      sh.max_len = c.max_len, sh.scale = 1.0f / std::sqrt(float(dqk)), sh.splits = splits;
      ASSERT_TRUE(mla_decode_fused_supported(sh, act));
      const size_t wsb = mla_decode_fused_workspace_bytes(sh, M);
      auto ws = poisoned<uint8_t>(std::max<size_t>(wsb, 1));  // NaN bytes: every partial must be written
      if (splits > 1) {  // without its workspace a split call is refused
        EXPECT_THROW(mla_decode_fused(sh, dq.get(), ldq, dkv.get(), ldkv, dg.get(), 1e-6f, dpos.get(), table.get(), drows.get(), dbt.get(),
                                      act, duk, duv, dpool, dout, ldo, M),
                     Error);
      }
      mla_decode_fused(sh, dq.get(), ldq, dkv.get(), ldkv, dg.get(), 1e-6f, dpos.get(), table.get(), drows.get(), dbt.get(), act, duk, duv,
                       dpool, dout, ldo, M, nullptr, ws.get(), wsb);
      const auto got_out = c.bf16 ? from_bf16(download(ob)) : download(of);
      const auto got_pool = c.bf16 ? from_bf16(download(pb)) : download(pf);

      std::vector<float> want, got, want_rows, got_rows;
      for (int64_t m = 0; m < M; ++m) {
        const int64_t p = c.pos[size_t(m)];
        const float* cs = tab.data() + p * c.dr;
        const float* kr = kv.data() + m * ldkv;
        double ss = 0;
        for (int64_t j = 0; j < c.kvr; ++j) ss += double(kr[j]) * kr[j];
        const double rr = 1.0 / std::sqrt(ss / double(c.kvr) + 1e-6);
        std::vector<double> cur(static_cast<size_t>(W));
        auto rnd1 = [&](double x) { return c.bf16 ? double(bf16_to_f32(f32_to_bf16(float(x)))) : double(float(x)); };
        for (int64_t j = 0; j < c.kvr; ++j) cur[size_t(j)] = rnd1(double(gamma[size_t(j)]) * kr[j] * rr);
        for (int64_t i = 0; i < half; ++i) {
          const double a = kr[c.kvr + 2 * i], b = kr[c.kvr + 2 * i + 1];
          cur[size_t(c.kvr + 2 * i)] = rnd1(a * cs[2 * i] - b * cs[2 * i + 1]);
          cur[size_t(c.kvr + 2 * i + 1)] = rnd1(b * cs[2 * i] + a * cs[2 * i + 1]);
        }
        for (int64_t j = 0; j < W; ++j) {
          want_rows.push_back(float(cur[size_t(j)]));
          got_rows.push_back(got_pool[size_t(int64_t(rows[size_t(m)]) * W + j)]);
        }
        auto key = [&](int64_t j, int64_t d) {
          if (j == p) return cur[size_t(d)];
          const int64_t phys = int64_t(blocks[size_t(m * max_blocks + j / bs)]) * bs + j % bs;
          return double(pool0[size_t(phys * W + d)]);
        };
        for (int64_t h = 0; h < c.H; ++h) {
          const float* qh = q.data() + m * ldq + h * dqk;
          std::vector<double> qv(static_cast<size_t>(W), 0.0);
          for (int64_t j = 0; j < c.kvr; ++j)
            for (int64_t d = 0; d < c.dn; ++d) qv[size_t(j)] += double(qh[d]) * wuk[size_t((h * hd + d) * c.kvr + j)];
          for (int64_t i = 0; i < half; ++i) {
            const double a = qh[c.dn + 2 * i], b = qh[c.dn + 2 * i + 1];
            qv[size_t(c.kvr + 2 * i)] = a * cs[2 * i] - b * cs[2 * i + 1];
            qv[size_t(c.kvr + 2 * i + 1)] = b * cs[2 * i] + a * cs[2 * i + 1];
          }
          std::vector<double> s(static_cast<size_t>(p + 1));
          double mx = -1e300;
          for (int64_t j = 0; j <= p; ++j) {
            double d = 0;
            for (int64_t e = 0; e < W; ++e) d += qv[size_t(e)] * key(j, e);
            s[size_t(j)] = d * sh.scale;
            mx = std::max(mx, s[size_t(j)]);
          }
          double l = 0;
          for (double& x : s) l += (x = std::exp(x - mx));
          std::vector<double> o(static_cast<size_t>(c.kvr), 0.0);
          for (int64_t j = 0; j <= p; ++j)
            for (int64_t e = 0; e < c.kvr; ++e) o[size_t(e)] += s[size_t(j)] / l * key(j, e);
          for (int64_t v = 0; v < c.dv; ++v) {
            double y = 0;
            for (int64_t e = 0; e < c.kvr; ++e) y += o[size_t(e)] * wuv[size_t((h * c.kvr + e) * c.dv + v)];
            want.push_back(float(y));
            got.push_back(got_out[size_t(m * ldo + h * c.dv + v)]);
          }
        }
      }
      const double tol = c.bf16 ? 4e-3 : 1e-5;  // bf16: the output's own rounding
      EXPECT_TRUE(all_finite(got)) << "H " << c.H;
      EXPECT_LT(rel_l2(got, want), tol) << "H " << c.H << " max_len " << c.max_len << " splits " << splits;
      EXPECT_LT(rel_l2(got_rows, want_rows), c.bf16 ? 4e-3 : 1e-6) << "appended rows, H " << c.H;
      std::printf("  fused MLA decode H %lld kvr %lld %s, %lld splits: rel L2 %.2e (rows %.2e)\n", (long long)c.H, (long long)c.kvr,
                  c.bf16 ? "bf16" : "f32", (long long)splits, rel_l2(got, want), rel_l2(got_rows, want_rows));
    }
  }
}

TEST(CudaMlaDecode, UnsupportedShapesAreRefused) {
  MlaDecodeShape sh;
  sh.H = 16, sh.dn = 64, sh.dr = 32, sh.dv = 64, sh.kvr = 256, sh.block_size = 64, sh.max_blocks = 4, sh.max_len = 256;
  EXPECT_TRUE(mla_decode_fused_supported(sh, DType::BF16));
  EXPECT_TRUE(mla_decode_fused_supported(sh, DType::F32));
  EXPECT_FALSE(mla_decode_fused_supported(sh, DType::F16));
  MlaDecodeShape odd = sh;
  odd.kvr = 260;  // not a multiple of 8
  EXPECT_FALSE(mla_decode_fused_supported(odd, DType::BF16));
  MlaDecodeShape wide = sh;
  wide.dv = 512;  // more output columns than threads
  EXPECT_FALSE(mla_decode_fused_supported(wide, DType::BF16));
  MlaDecodeShape v3 = sh;
  v3.H = 128, v3.dn = 128, v3.dr = 64, v3.dv = 128, v3.kvr = 512;  // a head's W_UK + W_UV: 256 KiB of shared memory
  EXPECT_FALSE(mla_decode_fused_supported(v3, DType::BF16));
  MlaDecodeShape nosplit = sh;
  nosplit.splits = 0;
  EXPECT_FALSE(mla_decode_fused_supported(nosplit, DType::BF16));
  MlaDecodeShape lng = sh;
  lng.max_len = 1 << 20;  // any context: tiles stream through shared memory
  EXPECT_TRUE(mla_decode_fused_supported(lng, DType::BF16));
}

}  // namespace
}  // namespace dsv3::cuda::test
