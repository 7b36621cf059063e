// cuBLASLt GEMMs (bf16, f32, block-scaled FP8) against ops::linear on the CPU.
#include <cstdio>

#include "core/tensor.h"
#include "cuda_test_util.h"
#include "kernels/ops.h"

namespace dsv3::cuda {
namespace {
using namespace test;

std::vector<float> vec(const Tensor& t) { return std::vector<float>(t.f32(), t.f32() + t.numel()); }
template <class T>
Tensor host_raw(const std::vector<T>& v, DType dt, Shape s) {
  Tensor t = Tensor::empty(dt, std::move(s));
  std::memcpy(t.raw(), v.data(), v.size() * sizeof(T));
  return t;
}
std::vector<float> cpu_linear(const std::vector<float>& x, int64_t M, int64_t K, const ops::Weight& w) {
  Tensor y = Tensor::empty(DType::F32, {M, w.rows()});
  ops::linear(Tensor::from_vector(x, {M, K}), w, y);
  return vec(y);
}

// Both operands bf16 (x rounded to bf16 on the host first, so the CPU sees the same values): the products are
// exact, only the f32 summation order differs. Tolerances: f32 output 1e-5, bf16 output 4e-3 (its rounding).
TEST(CudaGemm, Bf16MatchesCpu) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(21);
  Gemm gemm;
  for (auto [M, N, K, pad] : {std::tuple{1, 4096, 7168, 0}, std::tuple{77, 1536, 2048, 8}, std::tuple{5, 24, 40, 0}, std::tuple{256, 512, 576, 64}}) {
    const int64_t ldx = K + pad;
    const std::vector<float> x = round_bf16(randn(size_t(M * ldx), rng));
    const std::vector<uint16_t> wb = to_bf16(randn(size_t(N * K), rng, 0.05f));
    std::vector<float> xc(static_cast<size_t>(M * K));
    for (int64_t m = 0; m < M; ++m) std::copy_n(x.begin() + m * ldx, K, xc.begin() + m * K);
    ops::Weight w;
    w.w = host_raw(wb, DType::BF16, {N, K});
    const std::vector<float> ref = cpu_linear(xc, M, K, w);
    auto dx = upload(to_bf16(x));
    auto dw = upload(wb);
    auto dy = poisoned<float>(size_t(M * N));
    gemm.matmul(DType::BF16, dx.get(), ldx, dw.get(), K, DType::F32, dy.get(), N, M, N, K);
    const auto y = download(dy);
    ASSERT_TRUE(all_finite(y));
    EXPECT_LT(rel_l2(y, ref), 1e-5) << M << "x" << N << "x" << K;
    auto dyb = poisoned<uint16_t>(size_t(M * N));
    gemm.matmul(DType::BF16, dx.get(), ldx, dw.get(), K, DType::BF16, dyb.get(), N, M, N, K);
    const auto yb = from_bf16(download(dyb));
    ASSERT_TRUE(all_finite(yb));
    EXPECT_LT(rel_l2(yb, ref), 4e-3) << M << "x" << N << "x" << K;
  }
  EXPECT_EQ(gemm.cached_plans(), size_t(8));
}

// f32 operands, f32 compute (no TF32): relative L2 < 1e-5.
TEST(CudaGemm, F32MatchesCpu) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(22);
  Gemm gemm;
  for (auto [M, N, K] : {std::tuple{3, 1000, 512}, std::tuple{64, 256, 1024}}) {
    const std::vector<float> x = randn(size_t(M * K), rng), wf = randn(size_t(N * K), rng, 0.05f);
    ops::Weight w;
    w.w = Tensor::from_vector(wf, {N, K});
    const std::vector<float> ref = cpu_linear(x, M, K, w);
    auto dx = upload(x);
    auto dw = upload(wf);
    auto dy = poisoned<float>(size_t(M * N));
    gemm.matmul(DType::F32, dx.get(), K, dw.get(), K, DType::F32, dy.get(), N, M, N, K);
    const auto y = download(dy);
    ASSERT_TRUE(all_finite(y));
    EXPECT_LT(rel_l2(y, ref), 1e-5) << M << "x" << N << "x" << K;
  }
}

// A block-quantized FP8 weight as in the checkpoints: blocks of different magnitudes, scale_inv = amax / 448.
struct Fp8Weight {
  std::vector<uint8_t> q;
  std::vector<float> scale_inv;  // [nb, kb]
  int64_t N, K, nb, kb;
};
Fp8Weight make_fp8_weight(int64_t N, int64_t K, std::mt19937_64& rng) {
  Fp8Weight w{{}, {}, N, K, ceil_div(N, 128), ceil_div(K, 128)};
  std::vector<float> f = randn(size_t(N * K), rng, 0.02f);
  std::uniform_real_distribution<float> mag(0.25f, 4.0f);
  std::vector<float> bm(static_cast<size_t>(w.nb * w.kb));
  for (auto& v : bm) v = mag(rng);
  w.q.resize(f.size());
  w.scale_inv.assign(bm.size(), 0.0f);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) f[size_t(n * K + k)] *= bm[size_t((n / 128) * w.kb + k / 128)];
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      float& s = w.scale_inv[size_t((n / 128) * w.kb + k / 128)];
      s = std::max(s, std::fabs(f[size_t(n * K + k)]) / 448.0f);
    }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const float s = w.scale_inv[size_t((n / 128) * w.kb + k / 128)];
      w.q[size_t(n * K + k)] = f32_to_fp8_e4m3_saturate(f[size_t(n * K + k)] / s);
    }
  return w;
}
ops::Weight host_weight(const Fp8Weight& w) {
  ops::Weight hw;
  hw.w = host_raw(w.q, DType::F8_E4M3, {w.N, w.K});
  hw.scale_inv = Tensor::from_vector(w.scale_inv, {w.nb, w.kb});
  return hw;
}
// The host twin of quantize_fp8_1x128: q [M, K], scales [kb][round_up(M, 4)].
void host_quantize(const std::vector<float>& x, int64_t M, int64_t K, std::vector<uint8_t>& q, std::vector<float>& s) {
  const int64_t kb = ceil_div(K, 128), ld = fp8_act_scale_ld(M);
  q.assign(size_t(M * K), 0);
  s.assign(size_t(kb * ld), 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < kb; ++j) {
      float amax = 0.0f;
      for (int64_t k = j * 128; k < std::min(K, j * 128 + 128); ++k) amax = std::max(amax, std::fabs(x[size_t(m * K + k)]));
      const float sc = amax > 0.0f ? amax / 448.0f : 1.0f;
      s[size_t(j * ld + m)] = sc;
      for (int64_t k = j * 128; k < std::min(K, j * 128 + 128); ++k) q[size_t(m * K + k)] = f32_to_fp8_e4m3_saturate(x[size_t(m * K + k)] / sc);
    }
}
std::vector<float> host_dequant_act(const std::vector<uint8_t>& q, const std::vector<float>& s, int64_t M, int64_t K) {
  std::vector<float> x(q.size());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) x[size_t(m * K + k)] = fp8_e4m3_to_f32(q[size_t(m * K + k)]) * s[size_t((k / 128) * fp8_act_scale_ld(M) + m)];
  return x;
}

TEST(CudaGemm, Fp8QuantizeMatchesHostBitForBit) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(23);
  for (auto [M, K] : {std::tuple{3, 7168}, std::tuple{50, 320}, std::tuple{1, 100}}) {
    std::vector<float> x = randn(size_t(M * K), rng, 3.0f);
    for (int64_t k = 0; k < std::min<int64_t>(K, 128); ++k) x[size_t(k)] = 0.0f;  // an all-zero tile: scale 1
    std::vector<uint8_t> q;
    std::vector<float> s;
    host_quantize(x, M, K, q, s);
    auto dx = upload(x);
    DeviceBuffer<uint8_t> dq(q.size());
    auto ds = poisoned<float>(s.size());
    memset_device(ds.get(), 0, ds.bytes());  // padding rows of the scale tensor are not written
    quantize_fp8_1x128(DType::F32, dx.get(), K, M, K, dq.get(), ds.get());
    EXPECT_EQ(download(dq), q);
    EXPECT_EQ(download(ds), s);
  }
}

// FP8 GEMM: against the CPU on the same quantized activations (rel L2 < 1e-3: f32 accumulation in a different
// order) and against the unquantized f32 product (rel L2 < 6e-2: the e4m3 rounding of the activations).
TEST(CudaGemm, Fp8BlockScaledMatchesCpu) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(24);
  Gemm gemm;
  struct Shape3 { int64_t M, N, K; };
  for (const Shape3 sh : {Shape3{1, 2048, 7168}, Shape3{64, 1536, 7168}, Shape3{128, 576, 7168}, Shape3{33, 384, 320},
                          Shape3{200, 7168, 2048}, Shape3{7, 100, 200}}) {
    const auto [M, N, K] = sh;
    const Fp8Weight w = make_fp8_weight(N, K, rng);
    std::vector<float> x = randn(size_t(M * K), rng);
    for (int64_t m = 0; m < M; ++m)  // rows of different magnitudes
      for (int64_t k = 0; k < K; ++k) x[size_t(m * K + k)] *= float(1 + m % 5);
    std::vector<uint8_t> q;
    std::vector<float> s;
    host_quantize(x, M, K, q, s);
    const ops::Weight hw = host_weight(w);
    const std::vector<float> ref_q = cpu_linear(host_dequant_act(q, s, M, K), M, K, hw);
    const std::vector<float> ref = cpu_linear(x, M, K, hw);
    auto dx = upload(x);
    auto dwq = upload(w.q);
    auto dws = upload(w.scale_inv);
    auto dy = poisoned<float>(size_t(M * N));
    const bool native = gemm.linear_fp8(DType::F32, dx.get(), K, dwq.get(), dws.get(), DType::F32, dy.get(), N, M, N, K);
    const auto y = download(dy);
    ASSERT_TRUE(all_finite(y));
    const double e_q = rel_l2(y, ref_q), e = rel_l2(y, ref);
    std::printf("fp8 GEMM M %lld N %lld K %lld: %s, rel L2 %.2e vs same-quantized CPU, %.2e vs f32\n", (long long)M,
                (long long)N, (long long)K, native ? "native cuBLASLt" : "FALLBACK dequant+bf16", e_q, e);
    EXPECT_LT(e_q, native ? 1e-3 : 8e-3);  // the fallback rounds both operands to bf16
    EXPECT_LT(e, 6e-2);
    auto dyb = poisoned<uint16_t>(size_t(M * N));
    gemm.linear_fp8(DType::F32, dx.get(), K, dwq.get(), dws.get(), DType::BF16, dyb.get(), N, M, N, K);
    const auto yb = from_bf16(download(dyb));
    ASSERT_TRUE(all_finite(yb));
    EXPECT_LT(rel_l2(yb, ref_q), native ? 5e-3 : 1e-2);
  }
  std::printf("fp8 fallbacks: %lld\n", (long long)gemm.fallbacks());
}

// The decode GEMV (bf16 weights, or e4m3 weights with their block scales; activations not quantized) against the
// CPU's f32 product with the same (dequantized) weights: f32 accumulation in another order only (rel L2 < 1e-5);
// bf16 activations and weights are rounded on the host first. Launched back to back (programmatic dependents of
// each other) into one output, so a missing wait would show as a wrong row.
TEST(CudaGemm, GemvMatchesCpu) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(25);
  struct Case { int64_t M, N, K; bool bf16x, fp8w; };
  for (const Case c : {Case{1, 2048, 7168, true, true}, Case{1, 672, 1024, true, true}, Case{8, 1536, 384, true, true},
                       Case{3, 1024, 704, false, true}, Case{5, 100, 208, true, true}, Case{1, 129, 16, false, true},
                       Case{1, 2048, 7168, true, false}, Case{1, 32000, 1024, true, false}, Case{7, 300, 352, false, false},
                       Case{2, 8264, 512, true, true}}) {  // (a head-sized product, its last block partial)
    const Fp8Weight w = make_fp8_weight(c.N, c.K, rng);
    const ops::Weight hw8 = host_weight(w);
    std::vector<float> wf = round_bf16(randn(size_t(c.N * c.K), rng, 0.05f));
    ops::Weight hwb;
    hwb.w = Tensor::from_vector(wf, {c.N, c.K});
    const int64_t ldx = c.K + 8;
    std::vector<float> x = randn(size_t(c.M * ldx), rng);
    if (c.bf16x) x = round_bf16(x);
    std::vector<float> xc(size_t(c.M * c.K));
    for (int64_t m = 0; m < c.M; ++m) std::copy_n(x.data() + m * ldx, c.K, xc.data() + m * c.K);
    const std::vector<float> ref = cpu_linear(xc, c.M, c.K, c.fp8w ? hw8 : hwb);
    auto dxf = upload(x);
    auto dxb = upload(to_bf16(x));
    const void* dx = c.bf16x ? static_cast<const void*>(dxb.get()) : dxf.get();
    const DType xt = c.bf16x ? DType::BF16 : DType::F32;
    ASSERT_TRUE(gemv_supported(xt, dx, ldx, c.M, c.K));
    auto dwq = upload(w.q);
    auto dws = upload(w.scale_inv);
    auto dwb = upload(to_bf16(wf));
    const int64_t ldy = c.N + 3;
    auto dy = poisoned<float>(size_t(c.M * ldy));
    // Two launches: columns [0, h) then [h, N), the second a dependent of the first (FP8: h on a scale block).
    const int64_t h = c.fp8w ? (c.N / 2) / 128 * 128 : c.N / 2;
    for (const auto& [n0, n1] : {std::pair<int64_t, int64_t>{0, h}, {h, c.N}}) {
      const void* wp = c.fp8w ? static_cast<const void*>(dwq.get() + n0 * c.K) : static_cast<const void*>(dwb.get() + n0 * c.K);
      gemv(c.fp8w ? DType::F8_E4M3 : DType::BF16, xt, dx, ldx, c.M, wp, c.fp8w ? dws.get() + (n0 / 128) * w.kb : nullptr, dy.get() + n0,
           ldy, n1 - n0, c.K);
    }
    const auto yp = download(dy);
    std::vector<float> y;
    for (int64_t m = 0; m < c.M; ++m) y.insert(y.end(), yp.begin() + m * ldy, yp.begin() + m * ldy + c.N);
    EXPECT_LT(rel_l2(y, ref), 1e-5) << "M " << c.M << " N " << c.N << " K " << c.K << (c.fp8w ? " fp8" : " bf16");
  }
  // Two FP8 weights stacked at a row count that is not a multiple of 128 (gate | up of a 704-wide MLP): one launch
  // with scale_split equals the two products.
  {
    const int64_t I = 704, K = 1024, M = 2;
    const Fp8Weight g = make_fp8_weight(I, K, rng), u = make_fp8_weight(I, K, rng);
    std::vector<uint8_t> q = g.q;
    q.insert(q.end(), u.q.begin(), u.q.end());
    std::vector<float> sc = g.scale_inv;
    sc.insert(sc.end(), u.scale_inv.begin(), u.scale_inv.end());
    const std::vector<float> x = round_bf16(randn(size_t(M * K), rng));
    std::vector<float> ref = cpu_linear(x, M, K, host_weight(g)), ru = cpu_linear(x, M, K, host_weight(u)), want;
    for (int64_t m = 0; m < M; ++m) {
      want.insert(want.end(), ref.begin() + m * I, ref.begin() + (m + 1) * I);
      want.insert(want.end(), ru.begin() + m * I, ru.begin() + (m + 1) * I);
    }
    auto dx = upload(to_bf16(x));
    auto dq = upload(q);
    auto ds = upload(sc);
    auto dy = poisoned<float>(size_t(M * 2 * I));
    gemv(DType::F8_E4M3, DType::BF16, dx.get(), K, M, dq.get(), ds.get(), dy.get(), 2 * I, 2 * I, K, nullptr, I);
    EXPECT_LT(rel_l2(download(dy), want), 1e-5) << "stacked FP8 weights (scale_split)";
  }
  EXPECT_FALSE(gemv_supported(DType::BF16, nullptr, 200, 9, 1024));  // too many rows
  EXPECT_FALSE(gemv_supported(DType::BF16, nullptr, 200, 1, 200));   // K not a multiple of 16
  EXPECT_THROW(gemv(DType::F8_E4M3, DType::BF16, nullptr, 200, 1, nullptr, nullptr, nullptr, 1, 1, 200), Error);
}

// Which scale layouts cuBLASLt reads: runs one shape with each of the four (weight, activation) layouts and
// checks that the library's choice (weight [nb][kb], activation [kb][M]) is the one that matches the CPU.
TEST(CudaGemm, Fp8ScaleLayoutProbe) {
  DSV3_REQUIRE_GPU();
  std::mt19937_64 rng(25);
  const int64_t M = 256, N = 512, K = 1024, nb = 4, kb = 8;
  const Fp8Weight w = make_fp8_weight(N, K, rng);
  std::vector<float> x = randn(size_t(M * K), rng);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) x[size_t(m * K + k)] *= float(1 + (m + k / 128) % 7);
  std::vector<uint8_t> q;
  std::vector<float> s;
  host_quantize(x, M, K, q, s);
  const std::vector<float> ref = cpu_linear(host_dequant_act(q, s, M, K), M, K, host_weight(w));
  std::vector<float> ws_t(static_cast<size_t>(nb * kb)), s_t(s.size());
  for (int64_t a = 0; a < nb; ++a)
    for (int64_t b = 0; b < kb; ++b) ws_t[size_t(b * nb + a)] = w.scale_inv[size_t(a * kb + b)];
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < kb; ++j) s_t[size_t(m * kb + j)] = s[size_t(j * M + m)];
  Gemm gemm;
  auto dq = upload(q);
  auto dwq = upload(w.q);
  double err[2][2];
  for (int wl = 0; wl < 2; ++wl)
    for (int al = 0; al < 2; ++al) {
      auto dws = upload(wl ? ws_t : w.scale_inv);
      auto dxs = upload(al ? s_t : s);
      auto dy = poisoned<float>(size_t(M * N));
      const bool native = gemm.matmul_fp8(dq.get(), dxs.get(), dwq.get(), dws.get(), DType::F32, dy.get(), N, M, N, K);
      err[wl][al] = rel_l2(download(dy), ref);
      std::printf("scale layout probe: weight %s, activation %s: %s rel L2 %.3e\n", wl ? "[kb][nb]" : "[nb][kb]",
                  al ? "[M][kb]" : "[kb][M]", native ? "native" : "fallback", err[wl][al]);
    }
  EXPECT_LT(err[0][0], 1e-3);
}

}  // namespace
}  // namespace dsv3::cuda

// Diagnostic: which block-scaled FP8 configurations this cuBLASLt's heuristic accepts on this GPU (printed;
// fails only if none of the DeepSeek-style ones is accepted, which would leave every FP8 GEMM on the fallback).
#include <cublasLt.h>
namespace dsv3::cuda {
namespace {
TEST(CudaGemm, Fp8HeuristicSupportMatrix) {
  DSV3_REQUIRE_GPU();
  cublasLtHandle_t lt;
  ASSERT_EQ(cublasLtCreate(&lt), CUBLAS_STATUS_SUCCESS);
  const int64_t M = 256, N = 512, K = 1024;
  DeviceBuffer<float> sa(4096), sb(4096);
  DeviceBuffer<uint8_t> a(size_t(N * K)), b(size_t(M * K));
  DeviceBuffer<float> d(size_t(M * N));
  int accepted = 0;
  const char* names[] = {"SCALAR", "VEC16", "VEC32", "OUTER", "VEC128", "BLK128"};
  for (auto [ma, mb] : {std::pair{5, 4}, std::pair{4, 5}, std::pair{4, 4}, std::pair{0, 0}})
    for (int with_ptr = 0; with_ptr < 2; ++with_ptr)
      for (cudaDataType_t dt : {CUDA_R_16BF, CUDA_R_32F}) {
        cublasLtMatmulDesc_t op;
        cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F);
        const cublasOperation_t tA = CUBLAS_OP_T, tB = CUBLAS_OP_N;
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &tA, sizeof tA);
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tB, sizeof tB);
        const int32_t a_mode = ma, b_mode = mb;
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &a_mode, sizeof a_mode);
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &b_mode, sizeof b_mode);
        if (with_ptr) {
          const void* pa = sa.get();
          const void* pb = sb.get();
          cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &pa, sizeof pa);
          cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &pb, sizeof pb);
        }
        cublasLtMatrixLayout_t la, lb, lc;
        cublasLtMatrixLayoutCreate(&la, CUDA_R_8F_E4M3, uint64_t(K), uint64_t(N), K);
        cublasLtMatrixLayoutCreate(&lb, CUDA_R_8F_E4M3, uint64_t(K), uint64_t(M), K);
        cublasLtMatrixLayoutCreate(&lc, dt, uint64_t(N), uint64_t(M), N);
        cublasLtMatmulPreference_t pref;
        cublasLtMatmulPreferenceCreate(&pref);
        const uint64_t wsb = 32u << 20;
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb);
        cublasLtMatmulHeuristicResult_t res{};
        int n = 0;
        const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 1, &res, &n);
        std::printf("fp8 heuristic: A %-6s B %-6s scale ptrs %s D %s: %s, %d algos\n", names[ma], names[mb], with_ptr ? "set " : "null",
                    dt == CUDA_R_16BF ? "bf16" : "f32 ", cublasLtGetStatusName(st), n);
        if (st == CUBLAS_STATUS_SUCCESS && n > 0 && ma != 0) ++accepted;
        cublasLtMatmulPreferenceDestroy(pref);
        cublasLtMatrixLayoutDestroy(la);
        cublasLtMatrixLayoutDestroy(lb);
        cublasLtMatrixLayoutDestroy(lc);
        cublasLtMatmulDescDestroy(op);
      }
  int ver = int(cublasLtGetVersion());
  std::printf("cuBLASLt version %d\n", ver);
  cublasLtDestroy(lt);
  EXPECT_GT(accepted, 0);
}
}  // namespace
}  // namespace dsv3::cuda
