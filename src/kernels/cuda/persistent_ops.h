// The whole batch-1 decode step of a bf16 or FP8 model (every layer, then the final norm) as one persistent kernel:
// one block per SM, the stages of a layer separated by grid-wide barriers instead of kernel boundaries.
//
// Why: at batch 1 a decode layer is ~14 dependent launches of a few µs each for kilobytes of work; the GPU waits
// on launch and drain latency, not on memory (small.json: 0.73 ms per step against an 81 µs bandwidth bound).
// Inside one kernel a stage boundary is a barrier (~1 µs), and every stage's weights are copied into shared
// memory (bulk copies) while the stage before runs, so a stage starts with its operands on chip.
//
// Stages of a layer (one grid barrier after each, 7 in all): [q_a | kv_a] product of the normed input; q_a norm +
// the absorbed query product (q_b with W_UK folded in, so the query comes out in latent space; one block appends the
// new latent row to the paged cache); latent attention over the context split into blocks (RoPE on the query as it
// is loaded, online softmax, f32 partials); merge + ·W_UVᵀ per head (for contexts up to 288 rows the attention is
// split by head as well, and the last split of each head to finish merges it: no merge stage, 6 barriers); o_proj; every block normalises, routes the
// token itself (the router's two terms come with [q_a | kv_a] and o_proj: PersistentLayer::w_rg), then gate|up +
// SwiGLU over the chosen experts and the fixed one (shared experts, or the dense MLP) while the down rows are copied
// in; down products weighted and summed. The roundings are the graph path's (bf16 norm outputs, o and, in dense
// layers, the MLP's input and activations; f32 everywhere else, as in cuda_model.cpp's decode graph).
//
// Same conventions as cuda_ops.h: raw device pointers, no CUDA headers needed, failures as dsv3::Error.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "kernels/cuda/cuda_ops.h"

namespace dsv3::cuda {

// One decoder layer's weights (device pointers). W: row-major [out, in]; the projections (w_in, w_o, the FFN's)
// bf16, or with PersistentShape::fp8 e4m3 with the checkpoint's 128x128 block scales (s_*: [⌈out/128⌉, ⌈in/128⌉]
// f32; a stacked weight keeps each part's scale rows, as cuda_model.cpp's Lin::split). wuv_t is bf16; w_qc and w_lg (folded at load) f32.
struct PersistentLayer {
  const float* ln1 = nullptr;      // [D]
  const float* ln2 = nullptr;      // [D]
  const void* w_in = nullptr;      // [nq + kvr + dr, D]: q_a_proj | kv_a_proj_with_mqa
  const float* q_a_ln = nullptr;   // [nq]
  const float* kv_a_ln = nullptr;  // [kvr]
  // q_b with W_UK absorbed (contract_weights, f32): [H·(kvr + dr), nq], head h's rows h·(kvr + dr) + j: for j < kvr
  // Σ_d W_UK_h[d, j]·q_b[h·(dn + dr) + d, :] (the query in latent space), then its dr rope rows of q_b as they are.
  const float* w_qc = nullptr;
  const void* wuv_t = nullptr;     // [H, kvr, dv]
  const void* w_o = nullptr;       // [D, H·dv]
  int64_t cache_layer = 0;         // index of the layer in the latent pool
  // FFN: a fixed expert (the dense MLP, or the shared experts as one) plus, in MoE layers, top_k routed ones.
  const void* fix_gu = nullptr;  // [2·fix_I, D] gate | up, or null
  const void* fix_dn = nullptr;  // [D, fix_I]
  int64_t fix_I = 0;
  const float* gate = nullptr;  // router [E, D] f32; null: a dense layer
  // The router split over the residual stream h = h_in + o_proj(o) (f32): w_rg [E, D] = gate ⊙ ln2 (per column) and
  // w_lg [E, H·dv] = Σ_d gate[e, d]·ln2[d]·w_o[d, :]. The logits gate·rmsnorm(h) are then rms(h)·(w_rg·h_in + w_lg·o):
  // the first term with [q_a | kv_a], the second with o_proj, so no stage waits for the post-attention norm before
  // the router.
  const float* w_rg = nullptr;
  const float* w_lg = nullptr;
  const float* bias = nullptr;  // [E] or null
  const void* const* exp_gu = nullptr;  // device table of E pointers, each [2·exp_I, D]
  const void* const* exp_dn = nullptr;  // device table of E pointers, each [D, exp_I]
  int64_t exp_I = 0;
  // FP8 only: the scale grids (gate_up: gate's rows, then up's, split at I).
  const float* s_in = nullptr;  // w_in's; its rows split at split_in (q_a | kv_a stacked)
  int64_t split_in = 0;
  const float* s_o = nullptr;
  const float* s_fix_gu = nullptr;
  const float* s_fix_dn = nullptr;
  const float* const* exp_gu_s = nullptr;  // device tables of E pointers
  const float* const* exp_dn_s = nullptr;
};

struct PersistentShape {
  int64_t D = 0, H = 0, dn = 0, dr = 0, dv = 0, kvr = 0, nq = 0, E = 0, layers = 0, block_size = 64, max_blocks = 0;
  int64_t max_units = 0;  // largest fix_I + top_k·exp_I over the layers
  float eps = 1e-6f, scale = 1.0f;
  RouterConfig router;
  bool fp8 = false;          // the projections are e4m3 with block scales (PersistentLayer)
  int64_t scale_floats = 0;  // FP8: the largest scale-grid set one stage stages (see cuda_model.cpp), floats
};

// One step's inputs and outputs (device pointers).
struct PersistentIO {
  const float* h = nullptr;         // [D] the embedded token (f32), unless `embed` is set
  const uint16_t* embed = nullptr;  // or: the bf16 embedding table [vocab, D], the token's row read by the kernel
  const int64_t* ids = nullptr;     // (with embed) the token's id, in [0, vocab)
  int64_t vocab = 0;
  const int64_t* pos = nullptr;     // the token's position
  const int32_t* table = nullptr;   // the sequence's block table [max_blocks]
  const int32_t* dst_row = nullptr;  // the pool row of the new token
  const float* rope = nullptr;      // [max_pos, dr/2] (cos, sin) pairs
  void* pool = nullptr;             // latent pool, bf16 [layers][rows, kvr + dr]
  int64_t pool_layer_bytes = 0;
  const float* final_norm = nullptr;  // [D]
  float* fin = nullptr;             // [D] final hidden state (f32)
  void* xa = nullptr;               // [D] the same in bf16 (the head's input)
  // With DSV3_PERSIST_HEAD builds (the default; decode_persistent_folds_head()): the head's bf16 weight [head_rows, D], and
  // the logits [head_rows] (f32) the kernel writes after the final norm (no head GEMV launch); null: not folded.
  const uint16_t* head = nullptr;
  float* logits = nullptr;
  int64_t head_rows = 0;
};
// Whether this build's kernel computes the head itself when PersistentIO::head is set (compile-time variant).
bool decode_persistent_folds_head();

// Empty when the shape runs on this device (blocks: the grid size, 0 = one per SM), else why not.
std::string decode_persistent_unsupported(const PersistentShape& s, int blocks = 0);
size_t decode_persistent_workspace_bytes(const PersistentShape& s, int blocks = 0);
// `layers`: device array of s.layers entries; `barrier`: kDecodePersistentBarrierWords device uint32 that are 0
// before the launch (and are 0 again after it). A cooperative launch (every block resident), capturable in a CUDA graph.
constexpr int kDecodePersistentBarrierWords = 32;
void decode_persistent(const PersistentShape& s, const PersistentLayer* layers, const PersistentIO& io, uint32_t* barrier,
                       void* workspace, size_t workspace_bytes, cudaStream_t stream, int blocks = 0);

// DSV3_PERSISTENT_TRACE=1: stage and barrier times of the last launch on stderr (benchmarks).
void decode_persistent_trace_report();

}  // namespace dsv3::cuda
