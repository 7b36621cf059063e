// CPU backward ops: the transposed products through OpenBLAS, the rest as plain row loops.
#include <cblas.h>

#include <cmath>
#include <algorithm>
#include <limits>
#include <vector>

#include "kernels/ops.h"

namespace dsv3::ops {

void linear_backward(const Tensor& x, const Weight& w, const Tensor& dy, Tensor* dx, Tensor& dw) {
  const int64_t M = x.dim(0), K = x.dim(1), N = w.rows();
  DSV3_CHECK(dy.dim(0) == M && dy.dim(1) == N && dw.dim(0) == N && dw.dim(1) == K, "linear_backward: shapes");
  if (M == 0) return;
  const int64_t ldx = x.strides()[0], ldy = dy.strides()[0];
  // dW += dyᵀ·x
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(N), int(K), int(M), 1.0f, dy.f32(), int(ldy), x.f32(), int(ldx),
              1.0f, dw.f32(), int(K));
  if (!dx) return;
  Tensor wf = w.w.dtype() == DType::F32 && !w.scale_inv.defined() ? w.w : w.to_f32();
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(M), int(K), int(N), 1.0f, dy.f32(), int(ldy), wf.f32(), int(K),
              0.0f, dx->f32(), int(dx->strides()[0]));
}

// Row-parallel loops below are deterministic: each row is written by one thread, and the reductions over
// rows (dgamma, the loss) sum per-thread or per-row partials in a fixed order.
namespace {
constexpr int64_t kParallelWork = 1 << 15;
}

void rmsnorm_backward(const Tensor& x, const Tensor& gamma, float eps, const Tensor& dy, const Tensor& dx, Tensor& dgamma) {
  const int64_t M = x.dim(0), D = x.dim(1);
  std::vector<float> g(static_cast<size_t>(D));
  convert_to_f32(gamma.dtype(), gamma.contiguous().raw(), g.data(), g.size());
  // dgamma partials per fixed block of rows (not per thread), so the sum does not depend on the thread count.
  const int64_t block = 64, nblocks = (M + block - 1) / block;
  std::vector<double> dg(static_cast<size_t>(nblocks * D), 0.0);
#pragma omp parallel for schedule(static) if (M * D > kParallelWork)
  for (int64_t bi = 0; bi < nblocks; ++bi) {
    double* dgb = dg.data() + bi * D;
    for (int64_t i = bi * block; i < std::min(M, (bi + 1) * block); ++i) {
      const float* xr = x.f32() + i * x.strides()[0];
      const float* dyr = dy.f32() + i * dy.strides()[0];
      float* dxr = dx.f32() + i * dx.strides()[0];
      double ss = 0, dot = 0;
      for (int64_t j = 0; j < D; ++j) ss += double(xr[j]) * xr[j];
      const double r = 1.0 / std::sqrt(ss / double(D) + eps);
      for (int64_t j = 0; j < D; ++j) {
        dot += double(g[size_t(j)]) * dyr[j] * xr[j];
        dgb[j] += double(dyr[j]) * xr[j] * r;
      }
      const double c = dot * r * r * r / double(D);
      for (int64_t j = 0; j < D; ++j) dxr[j] = float(r * g[size_t(j)] * dyr[j] - c * xr[j]);
    }
  }
  for (int64_t j = 0; j < D; ++j) {
    double acc = 0;
    for (int64_t bi = 0; bi < nblocks; ++bi) acc += dg[size_t(bi * D + j)];
    dgamma.f32()[j] += float(acc);
  }
}

void embedding_backward(const Tensor& ids, const Tensor& dy, Tensor& dtable) {
  const int64_t D = dtable.dim(1);
  Tensor idc = ids.contiguous().to(DType::I64);
  for (int64_t i = 0; i < idc.numel(); ++i) {
    float* row = dtable.f32() + idc.data<int64_t>()[i] * D;
    const float* g = dy.f32() + i * dy.strides()[0];
    for (int64_t j = 0; j < D; ++j) row[j] += g[j];
  }
}

void silu_mul_backward(const Tensor& gu, const Tensor& dout, Tensor& dgu) {
  const int64_t M = gu.dim(0), I = gu.dim(1) / 2;
#pragma omp parallel for schedule(static) if (M * I > kParallelWork)
  for (int64_t i = 0; i < M; ++i) {
    const float* g = gu.f32() + i * gu.strides()[0];
    const float* u = g + I;
    const float* d = dout.f32() + i * dout.strides()[0];
    float* dg = dgu.f32() + i * dgu.strides()[0];
    float* du = dg + I;
    for (int64_t j = 0; j < I; ++j) {
      const float s = 1.0f / (1.0f + std::exp(-g[j])), silu = g[j] * s;
      du[j] = d[j] * silu;
      dg[j] = d[j] * u[j] * s * (1.0f + g[j] * (1.0f - s));
    }
  }
}

void rope_inverse(const Tensor& x, const std::vector<int64_t>& positions, const RopeTable& table) {
  const int64_t M = x.dim(0), H = x.dim(1), half = x.dim(2) / 2;
#pragma omp parallel for schedule(static) if (M * H * half > kParallelWork)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < half; ++i) {
      const float a = float(positions[size_t(m)]) * table.inv_freq[size_t(i)];
      const float c = std::cos(a) * table.attention_factor, s = std::sin(a) * table.attention_factor;
      for (int64_t h = 0; h < H; ++h) {
        float* v = x.f32() + m * x.strides()[0] + h * x.strides()[1];
        const float p = v[2 * i], q = v[2 * i + 1];
        v[2 * i] = p * c + q * s;  // Rᵀ: the transpose of [[c, -s], [s, c]]
        v[2 * i + 1] = q * c - p * s;
      }
    }
}

void attention_causal_backward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& dout,
                               const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  const int64_t B = q.dim(0), T = q.dim(1), H = q.dim(2), D = q.dim(3), Dv = v.dim(3);
  auto at = [](const Tensor& t, int64_t b, int64_t h) { return t.f32() + b * t.strides()[0] + h * t.strides()[2]; };
  // One job per (sequence, head): it owns that head's dk and dv rows, so jobs never write the same memory.
#pragma omp parallel
  {
    std::vector<float> p(static_cast<size_t>(T * T)), dp(static_cast<size_t>(T * T));
#pragma omp for schedule(dynamic, 1)
    for (int64_t job = 0; job < B * H; ++job) {
      const int64_t b = job / H, h = job % H;
      const int lq = int(q.strides()[1]), lk = int(k.strides()[1]), lv = int(v.strides()[1]), lo = int(dout.strides()[1]);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(T), int(T), int(D), scale, at(q, b, h), lq, at(k, b, h), lk, 0.0f,
                  p.data(), int(T));
      for (int64_t i = 0; i < T; ++i) {
        float* row = p.data() + i * T;
        float mx = -std::numeric_limits<float>::infinity(), sum = 0.0f;
        for (int64_t j = 0; j <= i; ++j) mx = std::max(mx, row[j]);
        for (int64_t j = 0; j <= i; ++j) sum += (row[j] = std::exp(row[j] - mx));
        for (int64_t j = 0; j <= i; ++j) row[j] /= sum;
        for (int64_t j = i + 1; j < T; ++j) row[j] = 0.0f;
      }
      // dV = Pᵀ·dO ; dP = dO·Vᵀ ; dS = P ⊙ (dP − rowsum(dP ⊙ P)) ; dQ = scale·dS·K ; dK = scale·dSᵀ·Q
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(T), int(Dv), int(T), 1.0f, p.data(), int(T), at(dout, b, h), lo,
                  0.0f, at(dv, b, h), int(dv.strides()[1]));
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(T), int(T), int(Dv), 1.0f, at(dout, b, h), lo, at(v, b, h), lv,
                  0.0f, dp.data(), int(T));
      for (int64_t i = 0; i < T; ++i) {
        float* pr = p.data() + i * T;
        float* dr = dp.data() + i * T;
        double dot = 0;
        for (int64_t j = 0; j <= i; ++j) dot += double(pr[j]) * dr[j];
        for (int64_t j = 0; j < T; ++j) dr[j] = j <= i ? pr[j] * (dr[j] - float(dot)) : 0.0f;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(T), int(D), int(T), scale, dp.data(), int(T), at(k, b, h), lk,
                  0.0f, at(dq, b, h), int(dq.strides()[1]));
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(T), int(D), int(T), scale, dp.data(), int(T), at(q, b, h), lq,
                  0.0f, at(dk, b, h), int(dk.strides()[1]));
    }
  }
}

double cross_entropy(const Tensor& logits, const std::vector<int64_t>& targets, Tensor* dlogits, float grad_scale) {
  const int64_t M = logits.dim(0), V = logits.dim(1);
  int64_t count = 0;
  for (int64_t t : targets) {
    DSV3_CHECK(t < V, "cross_entropy: target {} out of range [0, {})", t, V);
    count += t >= 0;
  }
  std::vector<double> row_loss(static_cast<size_t>(M), 0.0);
  const double f = count ? double(grad_scale) / double(count) : 0.0;
#pragma omp parallel for schedule(static) if (M * V > kParallelWork)
  for (int64_t i = 0; i < M; ++i) {
    const float* l = logits.f32() + i * logits.strides()[0];
    float* d = dlogits ? dlogits->f32() + i * dlogits->strides()[0] : nullptr;
    const int64_t t = targets[size_t(i)];
    if (t < 0) {
      if (d) std::fill_n(d, V, 0.0f);
      continue;
    }
    float mx = l[0];
    for (int64_t j = 1; j < V; ++j) mx = std::max(mx, l[j]);
    double sum = 0;
    if (d) {  // keep the exponentials in d, then scale them into probabilities
      for (int64_t j = 0; j < V; ++j) sum += d[j] = std::exp(l[j] - mx);
      const float k = float(f / sum);
      for (int64_t j = 0; j < V; ++j) d[j] *= k;
      d[t] -= float(f);
    } else {
      for (int64_t j = 0; j < V; ++j) sum += std::exp(l[j] - mx);
    }
    row_loss[size_t(i)] = std::log(sum) - double(l[t] - mx);
  }
  double total = 0;
  for (double x : row_loss) total += x;
  return count ? total / double(count) : 0.0;
}

}  // namespace dsv3::ops
