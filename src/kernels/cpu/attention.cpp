// Causal attention on the CPU, blocked over queries: for each (sequence, head, block of queries) two
// single-threaded sgemms (scores, then probabilities × values) with a softmax in between; the blocks run
// in parallel. Scratch is one [block, T] score tile per thread, never [T, T] per head.
#include <cblas.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kernels/ops.h"

namespace dsv3::ops {

void attention_causal(const Tensor& q, const Tensor& k, const Tensor& v, float scale, Tensor& out) {
  const int64_t B = q.dim(0), T = q.dim(1), H = q.dim(2), D = q.dim(3), Dv = v.dim(3);
  DSV3_CHECK(k.dim(0) == B && k.dim(1) == T && k.dim(2) == H && k.dim(3) == D, "attention: k shape {}", shape_str(k.shape()));
  DSV3_CHECK(v.dim(0) == B && v.dim(1) == T && v.dim(2) == H, "attention: v shape {}", shape_str(v.shape()));
  DSV3_CHECK(out.dim(0) == B && out.dim(1) == T && out.dim(2) == H && out.dim(3) == Dv, "attention: out shape {}",
             shape_str(out.shape()));
  for (const Tensor* t : std::initializer_list<const Tensor*>{&q, &k, &v, &out}) DSV3_CHECK(t->strides()[3] == 1, "attention: inner stride must be 1");
  constexpr int64_t QB = 64;
  const int64_t nqb = (T + QB - 1) / QB;
  const int64_t jobs = B * H * nqb;
#pragma omp parallel if (B * H * T * T * D > (1 << 20))
  {
    std::vector<float> s(size_t(QB * T));
#pragma omp for schedule(dynamic, 1)
    for (int64_t job = 0; job < jobs; ++job) {
      // Later query blocks cost more; handing them out first balances the threads.
      const int64_t qb = nqb - 1 - job % nqb, h = (job / nqb) % H, b = job / (nqb * H);
      const int64_t i0 = qb * QB, i1 = std::min(T, i0 + QB), nq = i1 - i0, nk = i1;
      const float* qp = q.f32() + b * q.strides()[0] + i0 * q.strides()[1] + h * q.strides()[2];
      const float* kp = k.f32() + b * k.strides()[0] + h * k.strides()[2];
      const float* vp = v.f32() + b * v.strides()[0] + h * v.strides()[2];
      float* op = out.f32() + b * out.strides()[0] + i0 * out.strides()[1] + h * out.strides()[2];
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(nq), int(nk), int(D), scale, qp, int(q.strides()[1]), kp,
                  int(k.strides()[1]), 0.0f, s.data(), int(nk));
      for (int64_t i = 0; i < nq; ++i) {
        float* row = s.data() + i * nk;
        const int64_t last = i0 + i;  // keys 0..last are visible
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j <= last; ++j) mx = std::max(mx, row[j]);
        float sum = 0.0f;
        for (int64_t j = 0; j <= last; ++j) sum += (row[j] = std::exp(row[j] - mx));
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j <= last; ++j) row[j] *= inv;
        for (int64_t j = last + 1; j < nk; ++j) row[j] = 0.0f;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(nq), int(Dv), int(nk), 1.0f, s.data(), int(nk), vp,
                  int(v.strides()[1]), 0.0f, op, int(out.strides()[1]));
    }
  }
}

}  // namespace dsv3::ops

namespace dsv3::ops {

void attention_latent(const Tensor& q, const Tensor& cache, const int64_t* positions, float scale, Tensor& out) {
  const int64_t n = q.dim(0), H = q.dim(1), W = q.dim(2), L = cache.dim(0), R = out.dim(2);
  DSV3_CHECK(cache.dim(1) == W && out.dim(0) == n && out.dim(1) == H && R <= W, "attention_latent: shapes q {} cache {} out {}",
             shape_str(q.shape()), shape_str(cache.shape()), shape_str(out.shape()));
  DSV3_CHECK(q.is_contiguous() && out.is_contiguous() && cache.strides()[1] == 1, "attention_latent: layout");
  for (int64_t i = 0; i < n; ++i)
    DSV3_CHECK(positions[i] >= 0 && positions[i] < L, "attention_latent: position {} outside the {} cached rows", positions[i], L);
  // Rows of (query, head) pairs in blocks; one sgemm for the scores of a block, one for the values.
  const int64_t rows = n * H, RB = 64, nblocks = (rows + RB - 1) / RB, ldc = cache.strides()[0];
#pragma omp parallel if (nblocks > 1 && rows * L * W > (1 << 20))
  {
    std::vector<float> s(size_t(RB * L));
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t r0 = blk * RB, r1 = std::min(rows, r0 + RB), nr = r1 - r0;
      int64_t kmax = 0;  // keys the block's latest query sees
      for (int64_t r = r0; r < r1; ++r) kmax = std::max(kmax, positions[r / H] + 1);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(nr), int(kmax), int(W), scale, q.f32() + r0 * W, int(W),
                  cache.f32(), int(ldc), 0.0f, s.data(), int(kmax));
      for (int64_t r = r0; r < r1; ++r) {
        float* row = s.data() + (r - r0) * kmax;
        const int64_t last = positions[r / H];
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j <= last; ++j) mx = std::max(mx, row[j]);
        float sum = 0.0f;
        for (int64_t j = 0; j <= last; ++j) sum += (row[j] = std::exp(row[j] - mx));
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j <= last; ++j) row[j] *= inv;
        for (int64_t j = last + 1; j < kmax; ++j) row[j] = 0.0f;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(nr), int(R), int(kmax), 1.0f, s.data(), int(kmax),
                  cache.f32(), int(ldc), 0.0f, out.f32() + r0 * R, int(R));
    }
  }
}

}  // namespace dsv3::ops
