// CPU linear: weights are dequantised panel by panel into per-thread float32 scratch and multiplied with
// OpenBLAS sgemm. Panels run in parallel (OpenMP); inside the parallel region the OpenMP build of
// OpenBLAS runs single-threaded, so the two levels never oversubscribe. The model is never held in f32.
#include <cblas.h>
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_* (GCC PR 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "kernels/ops.h"

namespace dsv3::ops {

// Pulls blas_runtime.o (and its constructor that selects OpenBLAS's AVX-512 kernels) into every program
// that multiplies matrices: a static library only links object files something refers to.
[[gnu::used]] static std::string (*const keep_blas_runtime)() = &blas_core;

void Weight::dequant_rows(int64_t r0, int64_t r1, float* dst) const {
  const int64_t K = cols();
  const size_t es = dtype_size(w.dtype());
  DSV3_CHECK(w.is_contiguous(), "weight is not contiguous");
  const char* src = static_cast<const char*>(w.raw()) + size_t(r0 * K) * es;
  convert_to_f32(w.dtype(), src, dst, size_t((r1 - r0) * K));
  if (!scale_inv.defined()) return;
  const float* s = scale_inv.f32();
  const int64_t sk = scale_inv.dim(1);
  for (int64_t r = r0; r < r1; ++r) {
    float* row = dst + (r - r0) * K;
    const float* srow = s + (r / block_n) * sk;
    for (int64_t kb = 0; kb < sk; ++kb) {
      const float f = srow[kb];
      for (int64_t k = kb * block_k, ke = std::min(K, k + block_k); k < ke; ++k) row[k] *= f;
    }
  }
}

Tensor Weight::to_f32() const {
  Tensor t = Tensor::empty(DType::F32, {rows(), cols()});
  dequant_rows(0, rows(), t.f32());
  return t;
}

namespace {
// Decode-sized products (a few rows of x) are bound by reading the weights: for bf16 weights, convert
// in registers inside the dot products instead of writing a float32 panel and reading it back.
template <int R>
void gemv_bf16(const float* x, int64_t ldx, const uint16_t* w, int64_t K, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * K;
    float sum[R];
    int64_t k = 0;
#if defined(__AVX512F__)
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k));
      const __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * ldx + k), wv, acc[r]);
    }
    for (int r = 0; r < R; ++r) sum[r] = _mm512_reduce_add_ps(acc[r]);
#else
    for (int r = 0; r < R; ++r) sum[r] = 0.0f;
#endif
    for (; k < K; ++k) {
      const float wv = bf16_to_f32(wr[k]);
      for (int r = 0; r < R; ++r) sum[r] += x[r * ldx + k] * wv;
    }
    for (int r = 0; r < R; ++r) y[r * ldy + n] = sum[r];
  }
}

void linear_gemv_bf16(const float* x, int64_t ldx, int64_t M, const Weight& w, float* y, int64_t ldy) {
  const int64_t N = w.rows(), K = w.cols();
  const auto* wp = static_cast<const uint16_t*>(w.w.raw());
  const int64_t chunk = 64, nchunks = (N + chunk - 1) / chunk;
  // Waking the other threads costs more than a few MB of weights take to stream on this class of machine:
  // only large matrices (the output head) are split across threads.
#pragma omp parallel for schedule(static) if (N * K >= (1 << 22))
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t n0 = c * chunk, n1 = std::min(N, n0 + chunk);
    for (int64_t m = 0; m < M;) {  // rows of x in groups of up to 4 share each weight load
      const int64_t r = std::min<int64_t>(4, M - m);
      const float* xm = x + m * ldx;
      float* ym = y + m * ldy;
      switch (r) {
        case 4: gemv_bf16<4>(xm, ldx, wp, K, n0, n1, ym, ldy); break;
        case 3: gemv_bf16<3>(xm, ldx, wp, K, n0, n1, ym, ldy); break;
        case 2: gemv_bf16<2>(xm, ldx, wp, K, n0, n1, ym, ldy); break;
        default: gemv_bf16<1>(xm, ldx, wp, K, n0, n1, ym, ldy); break;
      }
      m += r;
    }
  }
}

float* thread_scratch(size_t n) {
  thread_local std::vector<float> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}
}  // namespace

void linear(const Tensor& x, const Weight& w, Tensor& y) {
  const int64_t M = x.dim(0), K = x.dim(1), N = w.rows();
  DSV3_CHECK(w.cols() == K, "linear: input has {} features, weight {} expects {}", K, shape_str(w.w.shape()), w.cols());
  DSV3_CHECK(y.dim(0) == M && y.dim(1) == N, "linear: output {} for [{}, {}]", shape_str(y.shape()), M, N);
  DSV3_CHECK(x.strides()[1] == 1 && y.strides()[1] == 1, "linear: inner stride must be 1");
  if (M == 0) return;
  const float* xp = x.f32();
  float* yp = y.f32();
  const int64_t ldx = x.strides()[0], ldy = y.strides()[0];
  if (w.w.dtype() == DType::BF16 && M <= 4 && w.w.is_contiguous()) return linear_gemv_bf16(xp, ldx, M, w, yp, ldy);
  if (w.w.dtype() == DType::F32 && !w.scale_inv.defined()) {  // no conversion needed
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), int(N), int(K), 1.0f, xp, int(ldx), w.w.f32(), int(K),
                0.0f, yp, int(ldy));
    return;
  }
  // Panel rows: enough panels for every thread, a multiple of 16, at most 128 rows (a panel stays in L2).
  const int nt = omp_in_parallel() ? 1 : omp_get_max_threads();
  int64_t panel = std::clamp<int64_t>((N + nt - 1) / nt, 16, 128);
  panel = (panel + 15) / 16 * 16;
  const int64_t npanels = (N + panel - 1) / panel;
// Small products run on one thread: a parallel region costs more than it saves below ~1 MFLOP.
#pragma omp parallel for schedule(dynamic, 1) if (npanels > 1 && M * N * K > (1 << 19))
  for (int64_t p = 0; p < npanels; ++p) {
    const int64_t r0 = p * panel, r1 = std::min(N, r0 + panel);
    float* wf = thread_scratch(size_t((r1 - r0) * K));
    w.dequant_rows(r0, r1, wf);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(M), int(r1 - r0), int(K), 1.0f, xp, int(ldx), wf, int(K),
                0.0f, yp + r0, int(ldy));
  }
}

}  // namespace dsv3::ops
