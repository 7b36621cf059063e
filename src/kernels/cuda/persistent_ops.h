// The whole batch-1 decode step of a bf16 or FP8 model (every layer, then the final norm) as one persistent kernel:
// one block per SM, the stages of a layer separated by grid-wide barriers instead of kernel boundaries.
//
// Why: at batch 1 a decode layer is ~14 dependent launches of a few µs each for kilobytes of work; the GPU waits
// on launch and drain latency, not on memory (small.json: 0.73 ms per step against an 81 µs bandwidth bound).
// Inside one kernel a stage boundary is a barrier (~1 µs), and every stage's weights are copied into shared
// memory (bulk copies) while the stage before runs, so a stage starts with its operands on chip.
//
// Stages of a layer (one grid barrier after each): [q_a | kv_a] product of the normed input; q_a norm + q_b
// product (one block also appends the new latent row to the paged cache); q_nope·W_UK + RoPE per head; latent
// attention over the context split into blocks (online softmax, f32 partials); merge + ·W_UVᵀ per head; o_proj;
// router logits (MoE layers); every block routes the token itself, then gate|up + SwiGLU over the chosen experts
// and the fixed one (shared experts, or the dense MLP) while the down rows are copied in; down products weighted
// and summed. The roundings are the graph path's: bf16 norm outputs, o and (dense layers) the MLP's input and
// activations; f32 everywhere else, as in cuda_model.cpp's decode graph.
//
// Same conventions as cuda_ops.h: raw device pointers, no CUDA headers needed, failures as dsv3::Error.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "kernels/cuda/cuda_ops.h"

namespace dsv3::cuda {

// One decoder layer's weights (device pointers). W: row-major [out, in]; the projections (w_in, w_qb, w_o, the FFN's)
// bf16, or with PersistentShape::fp8 e4m3 with the checkpoint's 128x128 block scales (s_*: [⌈out/128⌉, ⌈in/128⌉]
// f32; a stacked weight keeps each part's scale rows, as cuda_model.cpp's Lin::split). wuk / wuv_t are bf16.
struct PersistentLayer {
  const float* ln1 = nullptr;      // [D]
  const float* ln2 = nullptr;      // [D]
  const void* w_in = nullptr;      // [nq + kvr + dr, D]: q_a_proj | kv_a_proj_with_mqa
  const float* q_a_ln = nullptr;   // [nq]
  const void* w_qb = nullptr;      // [H·(dn + dr), nq]
  const float* kv_a_ln = nullptr;  // [kvr]
  const void* wuk = nullptr;       // kv_b_proj [H·(dn + dv), kvr]: W_UK_h = rows h·(dn+dv) .. +dn
  const void* wuv_t = nullptr;     // [H, kvr, dv]
  const void* w_o = nullptr;       // [D, H·dv]
  int64_t cache_layer = 0;         // index of the layer in the latent pool
  // FFN: a fixed expert (the dense MLP, or the shared experts as one) plus, in MoE layers, top_k routed ones.
  const void* fix_gu = nullptr;  // [2·fix_I, D] gate | up, or null
  const void* fix_dn = nullptr;  // [D, fix_I]
  int64_t fix_I = 0;
  const float* gate = nullptr;  // router [E, D] f32; null: a dense layer
  const float* bias = nullptr;  // [E] or null
  const void* const* exp_gu = nullptr;  // device table of E pointers, each [2·exp_I, D]
  const void* const* exp_dn = nullptr;  // device table of E pointers, each [D, exp_I]
  int64_t exp_I = 0;
  // FP8 only: the scale grids (gate_up: gate's rows, then up's, split at I).
  const float* s_in = nullptr;  // w_in's; its rows split at split_in (q_a | kv_a stacked)
  int64_t split_in = 0;
  const float* s_qb = nullptr;
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
  const float* h = nullptr;         // [D] the embedded token (f32)
  const int64_t* pos = nullptr;     // the token's position
  const int32_t* table = nullptr;   // the sequence's block table [max_blocks]
  const int32_t* dst_row = nullptr;  // the pool row of the new token
  const float* rope = nullptr;      // [max_pos, dr/2] (cos, sin) pairs
  void* pool = nullptr;             // latent pool, bf16 [layers][rows, kvr + dr]
  int64_t pool_layer_bytes = 0;
  const float* final_norm = nullptr;  // [D]
  float* fin = nullptr;             // [D] final hidden state (f32)
  void* xa = nullptr;               // [D] the same in bf16 (the head's input)
};

// Empty when the shape runs on this device (blocks: the grid size, 0 = one per SM), else why not.
std::string decode_persistent_unsupported(const PersistentShape& s, int blocks = 0);
size_t decode_persistent_workspace_bytes(const PersistentShape& s, int blocks = 0);
// `layers`: device array of s.layers entries; `barrier`: two device uint32 that are 0 before the launch (and are 0
// again after it). A cooperative launch (every block resident), capturable in a CUDA graph.
void decode_persistent(const PersistentShape& s, const PersistentLayer* layers, const PersistentIO& io, uint32_t* barrier,
                       void* workspace, size_t workspace_bytes, cudaStream_t stream, int blocks = 0);

// DSV3_PERSISTENT_TRACE=1: stage and barrier times of the last launch on stderr (benchmarks).
void decode_persistent_trace_report();

}  // namespace dsv3::cuda
