// The kernel interface: every op the model uses, on Tensors. Module code (src/model) calls only these;
// each op dispatches on the tensor's device (cpu/ now, cuda/ next). Kernels know nothing of modules.
// Activations are float32; weights stay as stored (bf16/f16/f32, or fp8 with 128x128 block scales).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace dsv3::ops {

// A linear layer's weight as stored: w is [N, K] (out, in). For fp8, scale_inv is [ceil(N/bn), ceil(K/bk)]
// f32 and the real weight is w * scale_inv per block (partial edge blocks use their block's scale).
struct Weight {
  Tensor w, scale_inv;
  std::string name;  // official tensor name (gradients are keyed by it)
  int64_t block_n = 128, block_k = 128;
  int64_t rows() const { return w.dim(0); }
  int64_t cols() const { return w.dim(1); }
  // Rows [r0, r1) as float32 into dst ([r1-r0, K], row-major).
  void dequant_rows(int64_t r0, int64_t r1, float* dst) const;
  Tensor to_f32() const;  // the whole weight (tests and small tensors only)
};

// The OpenBLAS kernel family in use (e.g. "SkylakeX"); see blas_runtime.cpp for why it is checked.
std::string blas_core();

// y[M,N] = x[M,K] · Wᵀ. x and y are f32 with unit inner stride (row strides may differ from K/N).
void linear(const Tensor& x, const Weight& w, Tensor& y);
// y = x · gammaᵀ... RMSNorm over the last dim in float32: y = x / sqrt(mean(x²) + eps) * gamma.
void rmsnorm(const Tensor& x, const Tensor& gamma, float eps, Tensor& y);
// y[i] = table[ids[i]] as float32; ids int32/int64; an id outside [0, V) is an Error naming it.
void embedding(const Tensor& ids, const Tensor& table, Tensor& y);
// out[M,I] = silu(gu[:, :I]) * gu[:, I:], gu = [M, 2I] (gate | up).
void silu_mul(const Tensor& gu, Tensor& out);

// RoPE on interleaved pairs (x[2i], x[2i+1]) rotated by pos·inv_freq[i], with cos/sin scaled by
// `attention_factor` (YaRN). Kept in the interleaved layout; q and k share it, so dot products match the
// reference's de-interleaved form.
struct RopeTable {
  std::vector<float> inv_freq;  // [rope_dim/2]
  float attention_factor = 1.0f;
};
// x: [M, H, rope_dim] view (unit inner stride); positions: M int64 values.
void rope(Tensor& x, const std::vector<int64_t>& positions, const RopeTable& table);

// Causal softmax attention of one batch of sequences (the expanded MLA form used in prefill/training).
// q, k: [B, T, H, Dqk]; v: [B, T, H, Dv]; out: [B, T, H, Dv]; all views with unit inner stride.
void attention_causal(const Tensor& q, const Tensor& k, const Tensor& v, float scale, Tensor& out);

// DeepSeek-V3 routing (DESIGN.md): s = sigmoid(logits); choice = s + bias; group score = sum of the top-2
// choice scores per group; keep topk_group groups; top-k experts by choice among them (others count as
// 0.0, as in transformers); weights = s of the chosen, normalised if norm_topk_prob, × scaling.
struct RouterParams {
  int64_t n_group = 1, topk_group = 1, top_k = 1;
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.0f;
};
// logits [M, E] f32; bias [E] (may be undefined); idx [M, k] int32 (descending choice score), w [M, k] f32.
void moe_route(const Tensor& logits, const Tensor& bias, const RouterParams& p, Tensor& idx, Tensor& w);

}  // namespace dsv3::ops

namespace dsv3::ops {

// Absorbed MLA attention over the latent cache (§2.1.1; FlashMLA's formulation): every head's query has
// been folded into the latent space, so all heads attend to the same cache rows [c_kv | k_rope] like one
// multi-query head. q: [n, H, W] (W = kv_lora_rank + rope dim), cache: [L, W] rows of one sequence,
// positions: n query positions (query i sees cache rows 0..positions[i]), out: [n, H, kv_lora_rank] =
// softmax(q·cacheᵀ·scale) · cache[:, :kv_lora_rank].
void attention_latent(const Tensor& q, const Tensor& cache, const int64_t* positions, float scale, Tensor& out);

}  // namespace dsv3::ops

// ---- Backward ops (training). Gradients named d*; "accumulate" means added into the existing values. ----
namespace dsv3::ops {

// y = x·Wᵀ: dx = dy·W (written; skipped when dx is undefined), dW += dyᵀ·x (f32 [N, K]).
void linear_backward(const Tensor& x, const Weight& w, const Tensor& dy, Tensor* dx, Tensor& dw);
// y = gamma · x / rms(x): dx written, dgamma accumulated.
void rmsnorm_backward(const Tensor& x, const Tensor& gamma, float eps, const Tensor& dy, const Tensor& dx, Tensor& dgamma);
// dtable[ids[i]] += dy[i].
void embedding_backward(const Tensor& ids, const Tensor& dy, Tensor& dtable);
// out = silu(g)·u with gu = [g | u]: dgu written.
void silu_mul_backward(const Tensor& gu, const Tensor& dout, Tensor& dgu);
// The inverse rotation (RoPE is orthogonal, so its backward rotates the gradient by -θ).
void rope_inverse(const Tensor& x, const std::vector<int64_t>& positions, const RopeTable& table);
// Backward of attention_causal (recomputes the probabilities): dq, dk, dv written.
void attention_causal_backward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, const Tensor& dout,
                               const Tensor& dq, const Tensor& dk, const Tensor& dv);
// Mean cross-entropy of logits [M, V] against targets (M int64; -1 = ignored). Writes dlogits = ∂loss/∂logits
// · grad_scale (scaled by 1/count) when dlogits is given. Returns the mean loss over counted rows.
double cross_entropy(const Tensor& logits, const std::vector<int64_t>& targets, Tensor* dlogits, float grad_scale = 1.0f);
// Sequence-wise balance loss (§2.3.3) over router logits [M, E] (M = sequences × seq_len) and the chosen
// experts idx [M, K] int32: per sequence α Σ_i f_i P_i with f_i = E/(K·T)·count_i and P_i the mean of
// s_i / Σ_j s_j (s = sigmoid), averaged over sequences. Writes ∂loss/∂logits to *dlogits when given
// (the selection is held fixed, as in the reference).
double seq_balance_loss(const Tensor& logits, const Tensor& idx, int64_t seq_len, float alpha, Tensor* dlogits);

}  // namespace dsv3::ops
