// y[M, N] = x[M, K] · W[N, K]ᵀ through cuBLASLt. Row-major y = x·Wᵀ is column-major yᵀ = W·xᵀ with W as the
// transposed A operand ([K, N] column-major, ld = ldw) and x as the plain B operand ([K, M], ld = ldx): the
// "TN" layout, which is also the one Hopper's FP8 kernels require.
//
// FP8 (DeepSeek-V3's recipe, cuBLASLt >= 12.9): A = W e4m3 with CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F,
// one f32 per 128x128 block, [ceil(N/128)][round_up(ceil(K/128), 4)] (the checkpoint's weight_scale_inv,
// re-strided when ceil(K/128) is not a multiple of 4); B = x e4m3 quantized per 1x128 tile with
// CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F, [ceil(K/128)][round_up(M, 4)] (M-major).
#include <cstdio>
#include <cstdlib>
#include <map>
#include <tuple>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_ops.h"

namespace dsv3::cuda {

namespace {
using namespace dev;

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::F32: return CUDA_R_32F;
    case DType::BF16: return CUDA_R_16BF;
    case DType::F16: return CUDA_R_16F;
    case DType::F8_E4M3: return CUDA_R_8F_E4M3;
    default: fail("cuBLASLt GEMM: dtype {} is not supported", dtype_name(t));
  }
}

int alignment(const void* p) {
  const auto u = reinterpret_cast<uintptr_t>(p);
  int a = 1;
  while (a < 256 && (u % uintptr_t(a * 2)) == 0) a *= 2;
  return a;
}

// Activations back to bf16 for the FP8 fallback: x = xq · scale of its 1x128 tile.
__global__ void k_dequant_act(const uint8_t* __restrict__ xq, const float* __restrict__ sc, int64_t M, int64_t K, int64_t sld,
                              uint16_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < M * K; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / K, k = i % K;
    out[i] = f32_to_bf16(fp8e4m3_to_f32(xq[i]) * sc[(k / 128) * sld + m]);
  }
}
unsigned grid_for(int64_t n) {
  const int64_t b = (n + 255) / 256;
  return unsigned(b < 65535 * 32 ? b : 65535 * 32);
}

struct PlanKey {
  int ab, y;  // A/B type, D type
  int64_t M, N, K, ldx, ldw, ldy;
  int align_x, align_w, align_y;
  bool fp8;
  auto tie() const { return std::tie(ab, y, M, N, K, ldx, ldw, ldy, align_x, align_w, align_y, fp8); }
  bool operator<(const PlanKey& o) const { return tie() < o.tie(); }
};

struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool ok = false;
  std::string why;  // when !ok
  ~Plan() {
    if (op) cublasLtMatmulDescDestroy(op);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
  }
};
}  // namespace

struct Gemm::Impl {
  cublasLtHandle_t lt = nullptr;
  DeviceBuffer<uint8_t> workspace;
  std::map<PlanKey, std::unique_ptr<Plan>> plans;
  DeviceBuffer<uint8_t> xq;          // linear_fp8: quantized activations
  DeviceBuffer<float> xscale;        // linear_fp8: their scales
  DeviceBuffer<float> wscale;        // re-strided weight scales (ceil(K/128) % 4 != 0)
  DeviceBuffer<uint16_t> xbf, wbf;   // FP8 fallback operands
  DeviceBuffer<uint8_t> xpad;        // FP8 with M padded to a multiple of 16: activations,
  DeviceBuffer<float> spad, ypad;    // their scales and the output
  int64_t fallbacks = 0;

  template <class T>
  static T* grow(DeviceBuffer<T>& b, size_t n) {
    if (b.size() < n) b = DeviceBuffer<T>(n);
    return b.get();
  }

  // The heuristic of the block-scaled FP8 modes wants the scale pointers set (null is refused): `a_scale` and
  // `b_scale` are attached before the query when given.
  Plan& plan(const PlanKey& k, const void* a_scale = nullptr, const void* b_scale = nullptr) {
    auto it = plans.find(k);
    if (it != plans.end()) return *it->second;
    auto p = std::make_unique<Plan>();
    const cudaDataType_t ab = cudaDataType_t(k.ab), yt = cudaDataType_t(k.y);
    DSV3_CUDA_CHECK(cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t tA = CUBLAS_OP_T, tB = CUBLAS_OP_N;
    DSV3_CUDA_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &tA, sizeof tA));
    DSV3_CUDA_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &tB, sizeof tB));
    if (k.fp8) {
      const cublasLtMatmulMatrixScale_t sa = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, sb = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
      DSV3_CUDA_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &sa, sizeof sa));
      DSV3_CUDA_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &sb, sizeof sb));
      DSV3_CUDA_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale, sizeof a_scale));
      DSV3_CUDA_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale, sizeof b_scale));
    }
    DSV3_CUDA_CHECK(cublasLtMatrixLayoutCreate(&p->a, ab, uint64_t(k.K), uint64_t(k.N), k.ldw));
    DSV3_CUDA_CHECK(cublasLtMatrixLayoutCreate(&p->b, ab, uint64_t(k.K), uint64_t(k.M), k.ldx));
    DSV3_CUDA_CHECK(cublasLtMatrixLayoutCreate(&p->c, yt, uint64_t(k.N), uint64_t(k.M), k.ldy));
    cublasLtMatmulPreference_t pref = nullptr;
    DSV3_CUDA_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t ws = workspace.size();
    const uint32_t ax = uint32_t(k.align_x), aw = uint32_t(k.align_w), ay = uint32_t(k.align_y);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aw, sizeof aw);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ax, sizeof ax);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ay, sizeof ay);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ay, sizeof ay);
    cublasLtMatmulHeuristicResult_t res{};
    int n = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(lt, p->op, p->a, p->b, p->c, p->c, pref, 1, &res, &n);
    cublasLtMatmulPreferenceDestroy(pref);
    if (st == CUBLAS_STATUS_SUCCESS && n > 0) {
      p->algo = res.algo;
      p->ok = true;
    } else {
      p->why = st != CUBLAS_STATUS_SUCCESS ? std::string(cublasLtGetStatusName(st)) : "no algorithm returned";
    }
    return *plans.emplace(k, std::move(p)).first->second;
  }

  void run(Plan& p, const void* x, const void* w, void* y, cudaStream_t s) {
    const float alpha = 1.0f, beta = 0.0f;
    DSV3_CUDA_CHECK(cublasLtMatmul(lt, p.op, &alpha, w, p.a, x, p.b, &beta, y, p.c, y, p.c, &p.algo, workspace.get(),
                                   workspace.size(), s));
  }
};

Gemm::Gemm(size_t workspace_bytes) : impl_(std::make_unique<Impl>()) {
  require_device();
  DSV3_CUDA_CHECK(cublasLtCreate(&impl_->lt));
  impl_->workspace = DeviceBuffer<uint8_t>(workspace_bytes);
}

Gemm::~Gemm() {
  impl_->plans.clear();
  if (impl_->lt) cublasLtDestroy(impl_->lt);
}

size_t Gemm::cached_plans() const { return impl_->plans.size(); }
int64_t Gemm::fallbacks() const { return impl_->fallbacks; }

void Gemm::matmul(DType xw, const void* x, int64_t ldx, const void* w, int64_t ldw, DType yt, void* y, int64_t ldy, int64_t M,
                  int64_t N, int64_t K, cudaStream_t s) {
  DSV3_CHECK(xw == DType::BF16 || xw == DType::F32, "Gemm::matmul: operands must be BF16 or F32, not {}", dtype_name(xw));
  DSV3_CHECK(yt == DType::BF16 || yt == DType::F32, "Gemm::matmul: output must be BF16 or F32, not {}", dtype_name(yt));
  DSV3_CHECK(ldx >= K && ldw >= K && ldy >= N && M >= 0 && N > 0 && K > 0, "Gemm::matmul: bad shape M {} N {} K {} (ld {} {} {})",
             M, N, K, ldx, ldw, ldy);
  if (M == 0) return;
  const PlanKey key{int(cuda_type(xw)), int(cuda_type(yt)), M, N, K, ldx, ldw, ldy, alignment(x), alignment(w), alignment(y), false};
  Plan& p = impl_->plan(key);
  if (!p.ok)
    fail("cuBLASLt has no {} GEMM for M {} N {} K {} (ld {} {} {}): {}", dtype_name(xw), M, N, K, ldx, ldw, ldy, p.why);
  impl_->run(p, x, w, y, s);
}

bool Gemm::matmul_fp8(const uint8_t* xq, const float* x_scale, const uint8_t* w, const float* w_scale_inv, DType yt, void* y,
                      int64_t ldy, int64_t M, int64_t N, int64_t K, cudaStream_t s) {
  DSV3_CHECK(yt == DType::BF16 || yt == DType::F32, "Gemm::matmul_fp8: output must be BF16 or F32, not {}", dtype_name(yt));
  DSV3_CHECK(ldy >= N && M >= 0 && N > 0 && K > 0, "Gemm::matmul_fp8: bad shape M {} N {} K {}", M, N, K);
  if (M == 0) return true;
  Impl& I = *impl_;
  const int64_t kb = ceil_div(K, kFp8Block), nb = ceil_div(N, kFp8Block), kb4 = round_up(kb, 4);
  const PlanKey key{int(CUDA_R_8F_E4M3), int(cuda_type(yt)), M, N, K, K, K, ldy, alignment(xq), alignment(w), alignment(y), true};
  const float* ws = w_scale_inv;
  if (kb4 != kb) {  // re-stride [nb][kb] to [nb][kb4]
    float* dst = Impl::grow(I.wscale, size_t(nb * kb4));
    DSV3_CUDA_CHECK(cudaMemcpy2DAsync(dst, size_t(kb4) * 4, w_scale_inv, size_t(kb) * 4, size_t(kb) * 4, size_t(nb),
                                      cudaMemcpyDeviceToDevice, s));
    ws = dst;
  }
  Plan& p = I.plan(key, ws, x_scale);
  if (p.ok) {
    DSV3_CUDA_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &ws, sizeof ws));
    DSV3_CUDA_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &x_scale, sizeof x_scale));
    I.run(p, xq, w, y, s);
    return true;
  }
  // cuBLASLt 13.1 refuses some small M (decode: M = 1): pad the rows to a multiple of 16 with zeros (zero data,
  // zero scales), multiply into scratch and copy the M rows back.
  const int64_t Mp = round_up(M, 16), sld = fp8_act_scale_ld(M);
  const size_t es = dtype_size(yt);
  const PlanKey keyp{int(CUDA_R_8F_E4M3), int(cuda_type(yt)), Mp, N, K, K, K, N, 256, alignment(w), 256, true};
  if (Mp != M) {
    uint8_t* xp = Impl::grow(I.xpad, size_t(Mp * K));
    float* sp = Impl::grow(I.spad, size_t(ceil_div(K, kFp8Block) * Mp));
    void* yp = Impl::grow(I.ypad, size_t(ceil_div(int64_t(Mp * N * es), 4)));
    Plan& pp = I.plan(keyp, ws, sp);
    if (pp.ok) {
      DSV3_CUDA_CHECK(cudaMemsetAsync(xp + M * K, 0, size_t((Mp - M) * K), s));
      DSV3_CUDA_CHECK(cudaMemcpyAsync(xp, xq, size_t(M * K), cudaMemcpyDeviceToDevice, s));
      DSV3_CUDA_CHECK(cudaMemsetAsync(sp, 0, size_t(ceil_div(K, kFp8Block) * Mp) * 4, s));
      DSV3_CUDA_CHECK(cudaMemcpy2DAsync(sp, size_t(Mp) * 4, x_scale, size_t(sld) * 4, size_t(M) * 4, size_t(ceil_div(K, kFp8Block)),
                                        cudaMemcpyDeviceToDevice, s));
      DSV3_CUDA_CHECK(cublasLtMatmulDescSetAttribute(pp.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &ws, sizeof ws));
      DSV3_CUDA_CHECK(cublasLtMatmulDescSetAttribute(pp.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sp, sizeof sp));
      I.run(pp, xp, w, yp, s);
      DSV3_CUDA_CHECK(cudaMemcpy2DAsync(y, size_t(ldy) * es, yp, size_t(N) * es, size_t(N) * es, size_t(M), cudaMemcpyDeviceToDevice, s));
      return true;
    }
  }
  if (I.fallbacks++ == 0)
    std::fprintf(stderr, "dsv3 cuda: cuBLASLt refused the block-scaled FP8 GEMM M %lld N %lld K %lld (%s); using dequantize + bf16 GEMM\n",
                 (long long)M, (long long)N, (long long)K, p.why.c_str());
  uint16_t* wb = Impl::grow(I.wbf, size_t(N * K));
  uint16_t* xb = Impl::grow(I.xbf, size_t(M * K));
  dequantize_fp8_weight(w, w_scale_inv, N, K, wb, s);
  k_dequant_act<<<grid_for(M * K), 256, 0, s>>>(xq, x_scale, M, K, fp8_act_scale_ld(M), xb);
  DSV3_CUDA_CHECK_LAUNCH("FP8 fallback activation dequantize kernel");
  matmul(DType::BF16, xb, K, wb, K, yt, y, ldy, M, N, K, s);
  return false;
}

bool Gemm::linear_fp8(DType xt, const void* x, int64_t ldx, const uint8_t* w, const float* w_scale_inv, DType yt, void* y,
                      int64_t ldy, int64_t M, int64_t N, int64_t K, cudaStream_t s) {
  if (M == 0) return true;
  uint8_t* q = Impl::grow(impl_->xq, size_t(round_up(M * K, 256)));
  float* sc = Impl::grow(impl_->xscale, size_t(fp8_act_scale_count(M, K)));
  quantize_fp8_1x128(xt, x, ldx, M, K, q, sc, s);
  return matmul_fp8(q, sc, w, w_scale_inv, yt, y, ldy, M, N, K, s);
}

}  // namespace dsv3::cuda
