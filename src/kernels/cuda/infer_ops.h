// Glue kernels of the CUDA model (src/infer/cuda_model.cpp) on top of cuda_ops.h: dtype-casting RMSNorm, residual
// adds, the MLA key expansion and latent-cache append, per-head products of the absorbed attention, MoE row
// gather/scatter/combine, plus streams and CUDA graphs. Same conventions as cuda_ops.h (raw device pointers,
// element strides, asynchronous on `stream`, failures as dsv3::Error); no CUDA headers needed.
#pragma once
#include <cstddef>
#include <cstdint>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/moe_ops.h"

namespace dsv3::cuda {

// A non-blocking CUDA stream (capturable into a graph, unlike the legacy default stream).
class Stream {
 public:
  Stream();
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

// One captured sequence of stream work, replayed with launch(). begin() starts capturing `stream` (nothing
// runs until launch); end() instantiates. Kernels must not allocate or synchronize while captured.
class Graph {
 public:
  Graph() = default;
  ~Graph();
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  void begin(cudaStream_t stream);
  void end(cudaStream_t stream);
  void launch(cudaStream_t stream) const;
  bool ready() const { return exec_ != nullptr; }
  void reset();

 private:
  void* graph_ = nullptr;
  void* exec_ = nullptr;
};

// Free and total device memory in bytes (cudaMemGetInfo).
void memory_info(size_t* free_bytes, size_t* total_bytes);

// y[m, :D] = rmsnorm(x[m, :D]) · gamma (f32 math as rmsnorm), written as F32 or BF16.
void rmsnorm_to(const float* x, int64_t ldx, const float* gamma, float eps, DType y_type, void* y, int64_t ldy, int64_t M,
                int64_t D, cudaStream_t stream = nullptr);
// y[m, :N] = x[m, :N] as F32 or BF16 (strided rows).
void cast_rows(const float* x, int64_t ldx, DType y_type, void* y, int64_t ldy, int64_t M, int64_t N,
               cudaStream_t stream = nullptr);
// h[m, :N] += d[m, :N].
void add_rows(float* h, int64_t ldh, const float* d, int64_t ldd, int64_t M, int64_t N, cudaStream_t stream = nullptr);
// A decoder-layer boundary in one pass: h[m, :D] += d[m, :D] (skipped when d is null), then rmsnorm(h[m])·gamma written
// to yf (F32, when not null) and to ya (in ya_type, when not null). Bit-identical to add_rows then rmsnorm_to, except
// that from 256 rows (D = 128·2^i up to 2048, 16-byte aligned rows) a warp a row sums the squares in its own order:
// h keeps its bits, the normed outputs may differ in the last bits.
// With `moe` (moe_prefill's deferred routed-expert rows, moe_ops.h), the addend is Σ_j wts[m, j]·eo[slot_row[m, j]] over row m's
// top_k choices in ascending expert order, plus d[m] when d is not null: h as moe_unpermute (accumulating onto d)
// followed by the above gives it, bit for bit, with one pass over h instead of the sum's write and read (any M; the
// warp-a-row kernel). Needs residual_rmsnorm_moe_supported(D, top_k) and 16-byte aligned rows.
void residual_rmsnorm(float* h, int64_t ldh, const float* d, int64_t ldd, const float* gamma, float eps, int64_t M, int64_t D,
                      float* yf, int64_t ldyf, DType ya_type, void* ya, int64_t ldya, cudaStream_t stream = nullptr,
                      const MoeRowsSum* moe = nullptr);
bool residual_rmsnorm_moe_supported(int64_t D, int64_t top_k);

// The expanded-MLA prefill prologue of M new tokens in one kernel (a warp per token), for the flash kernel's bf16
// direct path: from row m of the fused q_a|kv_a product x = [q_a (nq) | c_kv (kvr) | k_rope (dr)],
//   qn[m, :nq] = rmsnorm(q_a)·gq (q_b's input), cn[m, :kvr] = rmsnorm(c_kv)·gkv (kv_b's input), kr[m, :dr] = RoPE(k_rope),
//   all bf16, and pool row rows[m] = [rmsnorm(c_kv)·gkv | RoPE(k_rope)] (F32 or BF16; skipped when pool is null).
// The math of rmsnorm_to (twice) + rope + cast_rows + latent_append, with each norm's sum in another order (ulps).
// Supported: nq, kvr, ldx, ldqn, ldcn multiples of 4, dr and ldkr even, x 16-byte aligned.
bool mla_prefill_prep_supported(const float* x, int64_t ldx, int64_t nq, int64_t kvr, int64_t dr, int64_t ldqn, int64_t ldcn, int64_t ldkr);
void mla_prefill_prep(const float* x, int64_t ldx, int64_t nq, int64_t kvr, int64_t dr, const float* gq, const float* gkv, float eps,
                      const int64_t* pos, const float* table, uint16_t* qn, int64_t ldqn, uint16_t* cn, int64_t ldcn, uint16_t* kr,
                      int64_t ldkr, const int32_t* rows, DType pool_type, void* pool, int64_t M, cudaStream_t stream = nullptr);

// Expanded MLA keys: k[m, h] = [kv[m, h·(dn+dv) : +dn] | k_rope[m]] ([M, H, dn+dr] contiguous), k_rope at
// kr + m·ldkr (dr values, shared by all heads).
void mla_expand_k(const float* kv, int64_t H, int64_t dn, int64_t dv, const float* kr, int64_t ldkr, int64_t dr, float* k,
                  int64_t M, cudaStream_t stream = nullptr);
// Latent cache append: pool row rows[m] (W = kvr + dr values, F32 or BF16) = [c[m, :kvr] | kr[m, :dr]].
void latent_append(const float* c, int64_t ldc, int64_t kvr, const float* kr, int64_t ldkr, int64_t dr, const int32_t* rows,
                   int64_t M, DType pool_type, void* pool, cudaStream_t stream = nullptr);

// The absorbed-MLA decode prologue of M new tokens in one kernel (one block per token):
//   qc[m, h·(kvr+dr) + kvr ..] = RoPE(q[m, h·(dn+dr) + dn ..])        (the queries' rotary part, beside q_nope·W_UK)
//   pool row rows[m] = [rmsnorm(kv[m, :kvr])·gamma | RoPE(kv[m, kvr : kvr+dr])]   (latent cache append)
// pos: positions (int64), table: rope_build_table's. The same math as rope + copy_heads + rmsnorm_to + latent_append.
void mla_decode_prep(const float* q, int64_t ldq, int64_t H, int64_t dn, int64_t dr, const float* kv, int64_t ldkv, int64_t kvr,
                     const float* gamma, float eps, const int64_t* pos, const float* table, const int32_t* rows, DType pool_type,
                     void* pool, float* qc, int64_t ldqc, int64_t M, cudaStream_t stream = nullptr);

// The whole absorbed-MLA decode of M new tokens, one per sequence (s_q = 1), in one kernel (one block per token and
// head): the prologue above (the new latent row appended at pool row rows[m]), q_nope·W_UK, softmax attention over
// rows 0..pos[m] of sequence m (block_table: [M, max_blocks] blocks of block_size rows) and ·W_UVᵀ, written to
// out[m·ldo + h·dv ..] in `act` (the dtype of the pool, wuk and wuv_t too). wuk: kv_b's rows, W_UK_h at
// h·(dn+dv)·kvr with row stride kvr; wuv_t: [H, kvr, dv]. max_len: more than every pos[m]. Supported when a head's
// W_UK and W_UV fit in shared memory beside two cache tiles (small.json's shapes; not DeepSeek-V3's 128 x 512).
// splits > 1: the context is cut into `splits` pieces of rows, each its own block (flash-decoding), and a second
// kernel merges the pieces and applies W_UV; the pieces' partial sums need mla_decode_fused_workspace_bytes.
struct MlaDecodeShape {
  int64_t H = 0, dn = 0, dr = 0, dv = 0, kvr = 0, block_size = 0, max_blocks = 0, max_len = 0, splits = 1;
  float scale = 1.0f;
};
bool mla_decode_fused_supported(const MlaDecodeShape& s, DType act);
size_t mla_decode_fused_workspace_bytes(const MlaDecodeShape& s, int64_t M);
void mla_decode_fused(const MlaDecodeShape& s, const float* q, int64_t ldq, const float* kv, int64_t ldkv, const float* gamma,
                      float eps, const int64_t* pos, const float* table, const int32_t* rows, const int32_t* block_table, DType act,
                      const void* wuk, const void* wuv_t, void* pool, void* out, int64_t ldo, int64_t M,
                      cudaStream_t stream = nullptr, void* workspace = nullptr, size_t workspace_bytes = 0);

// dst[i] = src[i] widened (the sampled ids of one step as the next step's int64 token ids, on the device).
void ids_from_sampled(const int32_t* src, int64_t* dst, int64_t n, cudaStream_t stream = nullptr);

// A decode step's metadata advanced in place on the device to the next step of the same n sequences, one position
// on (step-ahead decoding, cuda_model.cpp; DSV3_DEVICE_ADVANCE=0 off): ids[i] = sampled[i] (widened); pos64[i],
// pos32[i] and dst_rows[i] + 1 (a sequence's rows are contiguous in its cache slot); rng (null, or n (key, counter)
// pairs) counters + 1.
void decode_meta_advance(const int32_t* sampled, int64_t* ids, int64_t* pos64, int32_t* pos32, int32_t* dst_rows, uint64_t* rng,
                         int64_t n, cudaStream_t stream = nullptr);

// A strided operand of contract_weights: element (h, d, x) at p[h·sh + d·sd + x·sx], F32 or BF16.
struct ContractOperand {
  DType type = DType::F32;
  const void* p = nullptr;
  int64_t sh = 0, sd = 0, sx = 0;
};
// out[h·soh + i·soi + k] = Σ_d s[d] · A(h, d, i) · B(h, d, k) for i < ni, k < nk (s null: 1), summed in f64, written
// f32. Load-time only: two decode products folded into one weight (MLA's W_UK into q_b, DeepSeek-V3 §2.1.1's
// absorption; the router's gate into o_proj), so the decode step runs one product instead of two in a row.
void contract_weights(const ContractOperand& A, const ContractOperand& B, const float* s, int64_t nh, int64_t nd, int64_t ni,
                      int64_t nk, float* out, int64_t soh, int64_t soi, cudaStream_t stream = nullptr);

// Per-head products: y[m·ys0 + h·ys1 + n] = Σ_k x[m·xs0 + h·xs1 + k] · w[h·wsh + k·wsk + n] for n < N, k < K;
// w F32 or BF16, f32 accumulation, y written as F32 or BF16 (the absorbed q_nope·W_UK and o_latent·W_UVᵀ).
void head_matmul(const float* x, int64_t xs0, int64_t xs1, int64_t K, DType w_type, const void* w, int64_t wsh, int64_t wsk,
                 int64_t N, DType y_type, void* y, int64_t ys0, int64_t ys1, int64_t M, int64_t H, cudaStream_t stream = nullptr);
// y[i, :D] = x[rows[i], :D] as F32 or BF16 (rows: device int32, n values).
void gather_rows(const float* x, int64_t ldx, const int32_t* rows, int64_t n, int64_t D, DType y_type, void* y, int64_t ldy,
                 cudaStream_t stream = nullptr);
// y[rows[i], :D] = x[i, :D].
void scatter_rows(const float* x, int64_t ldx, const int32_t* rows, int64_t n, int64_t D, float* y, int64_t ldy,
                  cudaStream_t stream = nullptr);
// MoE combine: y[m] = Σ_j w[m, j] · slots[m·K + j] summed in ascending expert order of idx[m, :] (the CPU's
// order), plus the old y[m] when `accumulate` (the shared experts' output).
void moe_combine(const float* slots, const int32_t* idx, const float* w, int64_t M, int64_t K, int64_t D, float* y,
                 int64_t ldy, bool accumulate, cudaStream_t stream = nullptr);

// Causal softmax attention for long prefills on tensor cores: per (sequence, head) S = Q·Kᵀ and O = P·V as
// cuBLASLt bf16 GEMMs (f32 accumulation) around a row softmax written as bf16 P (twin of ops::attention_causal;
// layouts as attention_causal). Workspace: attention_causal_gemm_workspace bytes (bf16 copies of q, k, vᵀ and
// one [T, T] score matrix).
size_t attention_causal_gemm_workspace(int64_t B, int64_t T, int64_t H, int64_t D, int64_t Dv);
void attention_causal_gemm(Gemm& g, const float* q, Strides3 sq, const float* k, Strides3 sk, const float* v, Strides3 sv,
                           float* out, Strides3 so, int64_t B, int64_t T, int64_t H, int64_t D, int64_t Dv, float scale, void* ws,
                           size_t ws_bytes, cudaStream_t stream = nullptr);
// The same attention as one flash kernel (mma.sync, online softmax in registers; no [T, T] matrix): one block per
// 64 or 128 queries of a (sequence, head) walks the key tiles up to its diagonal. Same precision (bf16 q, k, v and P, f32
// accumulation) and layouts. Head dims (D, Dv) with a kernel, as attention_causal_flash_supported says: (64, 64),
// (96, 64), (192, 128). Workspace: attention_causal_flash_workspace bytes (bf16 copies of q, k, v).
// MLA's prefill layout folded into the bf16 packing (DeepSeek-V3 §2.1.1), so that no expanded key or roped query is
// written first: with kr > 0, k holds each head's first D - kr dims (k_nope, inside kv_b's output) and k_rope
// (strides skr, a head stride of 0 for the one decoupled key shared by the heads) its last kr; with q_rope > 0 the
// query's last q_rope dims are rotated by RoPE (pairs (2p, 2p + 1); rope_table [positions][q_rope / 2] cos/sin pairs,
// pos[b·T + t]) as they are read. out_type BF16: out is bf16 (the o_proj GEMM's input, no cast pass).
struct FlashMla {
  const float* k_rope = nullptr;
  Strides3 skr;
  int64_t kr = 0;
  const float* rope_table = nullptr;
  const int64_t* pos = nullptr;
  int64_t q_rope = 0;
  DType out_type = DType::F32;
};
bool attention_causal_flash_supported(int64_t D, int64_t Dv);
size_t attention_causal_flash_workspace(int64_t B, int64_t T, int64_t H, int64_t D, int64_t Dv);
void attention_causal_flash(const float* q, Strides3 sq, const float* k, Strides3 sk, const float* v, Strides3 sv, void* out,
                            Strides3 so, int64_t B, int64_t T, int64_t H, int64_t D, int64_t Dv, float scale, void* ws,
                            size_t ws_bytes, cudaStream_t stream = nullptr, const FlashMla& mla = {});
// The wgmma flash kernel straight on bf16 projections (no packing pass, no workspace): q [B, T, H, D] already roped
// (strides sq), each head's key as its first D - kr dims in k (strides sk: kv_b's k_nope) and its last kr in k_rope
// (strides skr, head stride 0 for MLA's one shared, roped k_rope; kr 0: all D in k), v (strides sv). Every base 16-byte
// aligned and every stride a multiple of 8 elements (whole 16-byte chunks for cp.async); out as attention_causal_flash.
// Supported: D 96 with kr 32, or D 64 with kr 0; Dv 64 (MLA's prefill shapes up to small.json's).
bool attention_causal_flash_direct_supported(int64_t D, int64_t Dv, int64_t kr);
void attention_causal_flash_direct(const uint16_t* q, Strides3 sq, const uint16_t* k, Strides3 sk, const uint16_t* k_rope,
                                   Strides3 skr, int64_t kr, const uint16_t* v, Strides3 sv, void* out, DType out_type, Strides3 so,
                                   int64_t B, int64_t T, int64_t H, int64_t D, int64_t Dv, float scale, cudaStream_t stream = nullptr);

}  // namespace dsv3::cuda
