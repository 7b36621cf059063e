// The model on one CUDA GPU; see cuda_model.h. Host code: it calls the kernel library (cuda_ops.h, infer_ops.h,
// moe_ops.h) only, and needs no CUDA headers.
#ifdef DSV3_HAVE_CUDA
#include "infer/cuda_model.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <tuple>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/infer_ops.h"
#include "kernels/cuda/moe_ops.h"
#include "kernels/cuda/persistent_ops.h"
#include "model/loader.h"
#include "model/rope.h"

namespace dsv3 {

namespace {
template <class T>
using DBuf = cuda::DeviceBuffer<T>;
constexpr int64_t kBlock = 64;  // latent cache rows per block (FlashMLA's block size)
// From this many tokens a bf16 prefill's attention runs as cuBLASLt GEMMs (O(T²) scratch, tensor cores) instead
// of the f32 flash kernel.
constexpr int64_t kGemmAttentionFrom = 256;
// Up to this context a decode step's attention runs as one fused kernel (one block per token and head streams the
// whole context, 32 rows at a time); longer ones split the context over blocks (attention_latent). H200, small.json,
// batch 1: fused 0.90 vs split 1.04 ms/token at context 64, but 1.16 vs 0.99 at 448 (2026-12-02).
constexpr int64_t kFusedMlaMaxLen = 256;
// Above this many rows (prefill, not the GPU-measured decode batches) a bf16 MLP's gate|up product writes bf16 for
// silu_mul: half the bytes out of the GEMM and into the SwiGLU (written 2026-12-03).
constexpr int64_t kBf16GateUpFrom = 64;

std::string gib(double bytes) { return fmt::format("{:.2f} GiB", bytes / double(1ull << 30)); }

// The Philox key of one sequence's draws (step_sampled): splitmix64 of (seed, slot), so that the sequences of a
// batch draw independently and one sequence's draws do not depend on the others.
uint64_t sample_key(uint64_t seed, int64_t slot) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (uint64_t(slot) + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// A linear layer on the device. BF16/F32 weights [N, K]; F8_E4M3 with the checkpoint's 128x128 block scales.
// `split` > 0 (FP8 only): two weights of `split` rows each stacked (gate | up), each with its own scale rows.
struct Lin {
  DType type = DType::BF16;
  DBuf<uint8_t> w;
  DBuf<float> scale;
  int64_t N = 0, K = 0, split = 0;
  int64_t bytes() const { return int64_t(w.bytes() + scale.bytes()); }
};

struct MlpW {
  Lin gu, down;  // gu: gate | up, [2I, D]
  int64_t I = 0;
  int64_t bytes() const { return gu.bytes() + down.bytes(); }
};

struct AttnW {
  bool lora = false;
  // in: the projections of the normed input stacked by rows, one GEMM: [q_a_proj | kv_a_proj_with_mqa] with a q LoRA,
  // [q_proj | kv_a_proj_with_mqa] without; its first nq outputs are q_a (or q), the last kvr + dr the latent and k_rope.
  Lin in, q_b, kv_b, o;
  int64_t nq = 0;
  DBuf<float> q_a_ln, kv_a_ln;
  DBuf<uint8_t> wkv_own;    // kv_b in the compute dtype when kv_b itself is FP8
  const void* wkv = nullptr;  // [H·(dn+dv), kvr] compute dtype: W_UK_h = rows h·hd.., used by the absorbed queries
  DBuf<uint8_t> wuv_t;      // [H, kvr, dv] compute dtype: W_UV_hᵀ
  int64_t bytes() const {
    return in.bytes() + q_b.bytes() + kv_b.bytes() + o.bytes() + int64_t(q_a_ln.bytes()) +
           int64_t(kv_a_ln.bytes());
  }
};

struct MoeW {
  Lin gate;  // router, always F32
  DBuf<float> bias;
  bool has_bias = false;
  std::vector<MlpW> experts;
  std::optional<MlpW> shared;
  cuda::MoeExperts table;  // device pointer tables for moe_decode / moe_prefill (BF16 and FP8 only)
  bool use_table = false;
};

struct LayerW {
  int64_t cache_layer = 0;  // index into the latent cache's layers
  DBuf<float> ln1, ln2;
  AttnW attn;
  std::optional<MlpW> mlp;
  std::optional<MoeW> moe;
};

struct MtpW {
  DBuf<float> enorm, hnorm, head_norm;
  Lin eh;
  LayerW layer;
  DBuf<uint8_t> embed_own;
  std::optional<Lin> head_own;
  const void* embed = nullptr;
  const Lin* head = nullptr;
};

// Grow-only scratch buffers by slot. A grown buffer moves: graphs captured before are invalid (grows counts).
struct Arena {
  std::vector<DBuf<uint8_t>> b;
  int64_t grows = 0;
  void* get(size_t i, size_t bytes) {
    if (b.size() <= i) b.resize(i + 1);
    if (b[i].bytes() < bytes) {
      b[i] = DBuf<uint8_t>(std::max<size_t>(bytes + bytes / 4, 256));
      ++grows;
    }
    return b[i].get();
  }
  template <class T>
  T* as(size_t i, int64_t n) {
    return static_cast<T*>(get(i, size_t(std::max<int64_t>(n, 1)) * sizeof(T)));
  }
};
enum Slot : size_t {
  S_META, S_H, S_XACT, S_QA, S_QAN, S_Q, S_CN, S_KV, S_K, S_O, S_OACT, S_ATT, S_QC, S_OL, S_AWS, S_X2, S_FFN, S_GU,
  S_A, S_LOGIT, S_IDX, S_W, S_SLOTS, S_PERM, S_XG, S_YE, S_MOEWS, S_FINAL, S_ROWS, S_ROWSACT, S_MTPCAT, S_EMB, S_HPREV, S_ERR, S_CNA,
  S_TAKE, S_PERSIST, S_RNG, S_SAMPLED, S_SAMPLEWS, S_XQ, S_COUNT
};

// One execution context: a cuBLASLt handle and the scratch it and the kernels use. Decode steps that are
// captured as graphs have their own, so that a larger prefill never moves memory a graph points to.
struct Exec {
  cuda::Gemm gemm;
  Arena arena;
};

}  // namespace

// The paged latent cache: per layer [slots · max_blocks blocks of 64 rows, W] in the compute dtype; slot s owns
// blocks s·max_blocks .. s·max_blocks + max_blocks - 1 (the block table is built per step, FlashMLA's layout).
struct CudaCache final : StepCache {
  int64_t slots = 0, max_tokens = 0, max_blocks = 0, layers = 0, W = 0;
  DType type = DType::BF16;
  DBuf<uint8_t> pool;
  size_t layer_bytes() const { return size_t(slots * max_blocks * kBlock * W) * dtype_size(type); }
  void* layer(int64_t l) const { return pool.get() + size_t(l) * layer_bytes(); }
};

// Where the rows of one pass sit (device metadata) and how attention runs over them.
struct RowsInfo {
  int64_t M = 0;
  bool cached = false;
  int64_t B = 1, T = 1;  // expanded form
  const int64_t* ids = nullptr;  // device, M (int64)
  const int64_t* pos64 = nullptr;
  const int32_t* pos32 = nullptr;
  const int32_t* dst_rows = nullptr;  // latent pool row of each new token
  const int32_t* table = nullptr;     // block table rows of the sequences, max_blocks each
  const CudaCache* cache = nullptr;
  bool fresh = false;  // cached, every sequence starts at 0 with the same n: attention in the expanded form (B, T)
  struct Call {
    int64_t batch, s_q, row0, seq0, max_len;
  };
  std::vector<Call> calls;
  std::vector<int32_t>* routing = nullptr;  // when set: the chosen experts [M, top_k] (host copy)
};

struct CudaModel::Impl {
  ModelConfig cfg;
  CudaModelOptions opt;
  DType act = DType::BF16;  // GEMM input dtype (= compute dtype)
  int64_t H = 0, dn = 0, dr = 0, dv = 0, kvr = 0, D = 0, V = 0, W = 0, hd = 0, dqk = 0;
  float eps = 1e-6f, scale = 1.0f;
  cuda::RouterConfig router;
  cuda::Stream stream;
  mutable Exec main, dec;
  DBuf<uint8_t> embed;
  Lin head;
  DBuf<float> norm, rope_table;
  DBuf<uint32_t> route_counter;  // moe_gate_route's block counter (0 between launches; one stream runs them all)
  // DSV3_UNFUSED_ROUTER=1 routes decode steps as prefill does (cuBLAS gate product, then moe_route): for A/B
  // benchmarks of the one-launch router in the same run.
  bool fused_router = true;
  // DSV3_NO_BF16_GEMV=1: decode-sized bf16 products through cuBLASLt instead of our GEMV (A/B benchmarks).
  bool bf16_gemv = true;
  // FP8 products of 9..kFp8RowsUpTo rows (decode batches) on the grouped kernel's dequantizing tiles, K split
  // over a cluster (rows_gemm), instead of cuBLASLt's block-scaled GEMM after an activation quantize;
  // DSV3_NO_FP8_ROWS_GEMM=1 keeps cuBLASLt, for A/B runs.
  bool fp8_rows = true;
  // DSV3_BF16_ROWS_GEMM=1: bf16 products of 9..kFp8RowsUpTo rows on rows_gemm too (instead of cuBLASLt), for A/B runs.
  bool bf16_rows = false;
  static constexpr int64_t kFp8RowsUpTo = 64;
  // Decode attention as one fused kernel (mla_decode_fused) or as five (prologue, W_UK, the streaming split
  // attention, merge, W_UV). With the streaming latent kernel the five-launch path is faster for bf16 checkpoints
  // (H200, small.json, context 64: batch 1 0.826 vs 0.855 ms/token, batch 64 11,589 vs 10,459 tokens/s) but not
  // for FP8 ones (batch 64 8,084 vs 9,149), so the fused kernel is the default for FP8 attention weights (see
  // CudaModelOptions::fp8_dense_native). DSV3_UNFUSED_MLA=1 /
  // DSV3_FUSED_MLA=1 force either, for A/B runs.
  bool fused_mla = true;
  // DSV3_FUSED_MLA_SPLIT=1: contexts beyond kFusedMlaMaxLen also take the fused kernel, the context split over blocks
  // (flash-decoding) and merged by a second kernel. Off: slower than the five-launch path with the streaming latent
  // kernel (H200, context 448 / 960: 0.950 / 0.991 vs 0.863 / 0.853 ms per batch-1 token).
  bool fused_mla_split = false;
  // DSV3_MOE_DECODE_KERNEL=1: decode steps of 9+ rows keep moe_decode's grouped-down kernels instead of the grouped
  // expert GEMMs of the prefill path (permute + tensor-core GEMMs, also graph-capturable), for A/B runs.
  bool moe_decode_kernel = false;
  // Native FP8 experts on the grouped path multiply e4m3 activations (1x128 tiles, DeepSeek-V3's recipe,
  // moe_grouped_fp8.cu); DSV3_FP8_BF16_EXPERT_ACTS=1 keeps bf16 activations (weights dequantized in the kernel).
  bool fp8_expert_acts = true;
  // DSV3_FP8_ROWS_E4M3=1: FP8 products of 9..kFp8RowsUpTo rows on rows_gemm_fp8 (e4m3 activations quantized per
  // 1x128 tile) instead of rows_gemm's bf16 activations. Off: faster (H200 batch-64 graph 1.935 vs 1.997 ms) but the
  // golden FP8 forward's 40 rows then quantize every dense product and its MTP logits leave the test's bound
  // (0.29 vs 0.15; GoldenForwardFp8Native).
  bool fp8_rows_e4m3 = false;
  // bf16 MoE prefill reads the tokens through the permutation instead of a gathered copy (moe_prefill's no_gather;
  // H200 prefill T 4096: 298,892-300,459 vs 289,205-292,055 tokens/s). DSV3_MOE_NO_GATHER=0: the gathered copy.
  bool moe_no_gather = true;
  // bf16 prefill attention: the flash kernel (flash_prefill.cu) for its head dims (H200, small.json, T 4096 prefill:
  // 142.9k -> 285.6k tokens/s); DSV3_GEMM_ATTENTION=1 runs per-head cuBLASLt GEMMs around a row softmax instead
  // (from 256 tokens), for A/B runs.
  bool gemm_attention = false;
  // Prefill attention on q_b's and kv_b's bf16 outputs in place (attention_causal_flash_direct) where the dims allow;
  // DSV3_FLASH_DIRECT=0 (or DSV3_FLASH_WGMMA=0): f32 outputs packed to bf16 by attention_causal_flash (the path
  // before 2026-12-03).
  bool flash_direct = true;
  // DSV3_MLA_PREFILL_PREP=0: the direct prefill path's prologue as six launches (two rmsnorm_to, rope, cast_rows,
  // rmsnorm_to + latent_append for the cache) instead of mla_prefill_prep, for A/B runs.
  bool fused_prep = true;
  // DSV3_UNFUSED_SHARED=1: decode steps run the shared experts as their own MLP (three launches), for A/B runs.
  bool fused_shared = true;
  // A cached step's small metadata and outputs (decode steps of a few rows) go through page-locked host buffers
  // (plain DMA, no staging copy by the driver) instead of pageable memory: H200 batch 1, A/B in two calls:
  // 0.749-0.753 -> 0.734-0.739 and 0.742 -> 0.714-0.726 ms per token. DSV3_PINNED_STEP=0: pageable copies always.
  bool pinned_step = true;
  mutable cuda::PinnedBuffer pin_out;
  // Two of each, used in turn, each free again once its event has passed: a step can be enqueued while the one
  // before is still running (step-ahead decoding, below).
  mutable cuda::PinnedBuffer pin_meta[2], pin_sample[2];
  mutable cuda::Event meta_sent[2], sample_done[2];
  mutable int meta_turn = 0, sample_turn = 0;
  // Benchmarking (CudaModel::time_steps): the GPU span of each uncaptured step's kernels, event to event on the
  // stream, against which a bench sets the step's wall time (the difference: host work around the kernels).
  bool time_steps = false;
  mutable std::unique_ptr<cuda::EventTimer> step_timer;
  mutable double last_step_ms = -1.0;
  // Step-ahead decoding (step_sampled): after a decode step is enqueued, the next one (same sequences, one position
  // on, its tokens the ids just sampled, widened on the device) is enqueued too before the host reads this step's
  // ids, so the GPU does not wait for the host between tokens. The next call finds it already running when it asks
  // for exactly that step; any other request discards it (its cache rows lie past what the sequences keep, or are
  // written again). H200, small.json, batch 1: 0.597 ms per token against 0.598-0.608 without (same call; the GPU
  // time between graphs that remains is the sampling and copies around each step's graph). DSV3_STEP_AHEAD=0: off,
  // every step waits for the stream before the next is enqueued.
  struct Ahead {
    bool valid = false;
    const StepCache* cache = nullptr;
    std::vector<int64_t> tokens;  // the ids the step before returned
    std::vector<Batch::Seq> seqs;
    std::vector<uint64_t> draws;
    SamplingParams p;
    int turn = 0;  // its pin_sample / sample_done
  };
  mutable Ahead ahead;
  bool step_ahead = true;
  // A step enqueued ahead gets its metadata and sampling counters advanced in place on the device from the step
  // before's: by that step's draw (sample_rows' SampleOutputs; else decode_meta_advance) instead of two
  // host-to-device copies and the ids' widening. H200 batch 1, ms per token: an advance kernel 0.565-0.566 vs copies
  // 0.569-0.570; the draw advancing and writing the ids to the host 0.532-0.534 vs 0.543-0.544. DSV3_DEVICE_ADVANCE=0:
  // the copies.
  bool device_advance = true;
  // The persistent kernel reads the token's embedding row itself (no embedding launch); DSV3_PERSIST_EMBED=0: off.
  bool persist_embeds = true;
  // The persistent batch-1 decode kernel: its per-layer weight table (device), shape and barrier counters; empty
  // `persist_why` when every layer qualifies.
  DBuf<cuda::PersistentLayer> persist_layers;
  cuda::PersistentShape persist_shape;
  DBuf<uint32_t> persist_bar;
  // Per layer: q_b with W_UK absorbed, the router split over the residual stream (persistent_ops.h), f32. (A bf16
  // query weight measured 2% faster on the H200 but 6x further from the launch path: 4.4e-3 vs 6.8e-4.)
  std::vector<DBuf<float>> persist_folded;
  std::string persist_why = "not built";
  std::vector<LayerW> layers;
  std::vector<MtpW> mtp;
  int64_t weight_bytes = 0, decode_bytes = 0;
  // Decode graphs: key (batch, context bucket, cache pool); only graphs captured after the last eager use of
  // `dec` are valid.
  mutable std::map<std::tuple<int64_t, int64_t, const void*>, std::unique_ptr<cuda::Graph>> graphs;
  mutable int64_t dec_grows_at_capture = -1;
  mutable int64_t replays = 0;

  cudaStream_t s() const { return stream.get(); }

  // ---------------------------------------------------------------------------------------------------
  // Loading
  // ---------------------------------------------------------------------------------------------------
  struct Loader {
    Impl& m;
    const io::Checkpoint& ck;
    WeightLoader wl;
    Loader(Impl& im, const io::Checkpoint& c) : m(im), ck(c), wl(c, im.cfg) {}

    bool native_fp8(const ops::Weight& w) const { return w.scale_inv.defined() && m.keeps_fp8(w.name); }
    // Rows of w converted to `to` (BF16/F32) into device memory at dst, in chunks (never the whole model in f32).
    void upload_rows(const ops::Weight& w, DType to, uint8_t* dst) const {
      const int64_t N = w.rows(), K = w.cols();
      if (w.w.dtype() == to && !w.scale_inv.defined() && w.w.is_contiguous()) {
        cuda::copy_to_device(dst, w.w.raw(), w.w.nbytes());
        return;
      }
      const int64_t R = std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(K, 1));
      std::vector<float> f(size_t(std::min(R, N) * K));
      std::vector<uint16_t> b(to == DType::BF16 ? f.size() : 0);
      for (int64_t r0 = 0; r0 < N; r0 += R) {
        const int64_t r1 = std::min(N, r0 + R), n = (r1 - r0) * K;
        w.dequant_rows(r0, r1, f.data());
        if (to == DType::F32) {
          cuda::copy_to_device(dst + size_t(r0 * K) * 4, f.data(), size_t(n) * 4);
        } else {
          for (int64_t i = 0; i < n; ++i) b[size_t(i)] = f32_to_bf16(f[size_t(i)]);
          cuda::copy_to_device(dst + size_t(r0 * K) * 2, b.data(), size_t(n) * 2);
        }
      }
    }
    // One or more weights stacked by rows into one Lin (all FP8 natively, or all in `to`).
    Lin stacked(const std::vector<ops::Weight>& ws, std::optional<DType> force = std::nullopt) {
      Lin L;
      L.K = ws[0].cols();
      for (const auto& w : ws) L.N += w.rows();
      bool fp8 = !force;
      for (const auto& w : ws) fp8 = fp8 && native_fp8(w);
      if (fp8) {
        DSV3_CHECK(ws[0].block_n == 128 && ws[0].block_k == 128, "FP8 weights on the GPU need 128x128 scale blocks, '{}' has {}x{}",
                   ws[0].name, ws[0].block_n, ws[0].block_k);
        DSV3_CHECK(ws.size() <= 2, "internal error: more than two FP8 weights stacked");
        L.type = DType::F8_E4M3;
        if (ws.size() == 2) L.split = ws[0].rows();
        int64_t sc = 0;
        for (const auto& w : ws) sc += w.scale_inv.numel();
        L.w = DBuf<uint8_t>(size_t(L.N * L.K));
        L.scale = DBuf<float>(size_t(sc));
        int64_t off = 0, soff = 0;
        for (const auto& w : ws) {
          DSV3_CHECK(w.w.dtype() == DType::F8_E4M3, "'{}': only e4m3 FP8 weights run on the GPU", w.name);
          cuda::copy_to_device(L.w.get() + off, w.w.raw(), w.w.nbytes());
          cuda::copy_to_device(L.scale.get() + soff, w.scale_inv.contiguous().raw(), w.scale_inv.nbytes());
          off += int64_t(w.w.nbytes());
          soff += w.scale_inv.numel();
        }
      } else {
        L.type = force ? *force : m.act;
        L.w = DBuf<uint8_t>(size_t(L.N * L.K) * dtype_size(L.type));
        int64_t off = 0;
        for (const auto& w : ws) {
          upload_rows(w, L.type, L.w.get() + off);
          off += w.rows() * L.K * int64_t(dtype_size(L.type));
        }
      }
      m.weight_bytes += L.bytes();
      return L;
    }
    Lin lin(const std::string& name, int64_t n, int64_t k, std::optional<DType> force = std::nullopt) {
      return stacked({wl.linear(name, n, k)}, force);
    }
    DBuf<float> vec(const std::string& name, int64_t n) {
      Tensor t = wl.tensor(name, {n}).to(DType::F32);
      DBuf<float> d(static_cast<size_t>(n));
      cuda::copy_to_device(d.get(), t.raw(), t.nbytes());
      m.weight_bytes += int64_t(d.bytes());
      return d;
    }
    DBuf<uint8_t> table(const std::string& name) {
      Tensor t = wl.tensor(name, {m.V, m.D});
      DBuf<uint8_t> d(size_t(m.V * m.D) * dtype_size(m.act));
      ops::Weight w;
      w.w = t;
      upload_rows(w, m.act, d.get());
      m.weight_bytes += int64_t(d.bytes());
      return d;
    }
    MlpW mlp(const std::string& p, int64_t I) {
      MlpW r;
      r.I = I;
      r.gu = stacked({wl.linear(p + "gate_proj.weight", I, m.D), wl.linear(p + "up_proj.weight", I, m.D)});
      r.down = lin(p + "down_proj.weight", m.D, I);
      return r;
    }
    void attn(AttnW& a, const std::string& p) {
      const ModelConfig& c = m.cfg;
      a.lora = c.q_lora_rank > 0;
      const ops::Weight kva = wl.linear(p + "kv_a_proj_with_mqa.weight", m.kvr + m.dr, m.D);
      if (a.lora) {
        a.in = stacked({wl.linear(p + "q_a_proj.weight", c.q_lora_rank, m.D), kva});
        a.nq = c.q_lora_rank;
        a.q_a_ln = vec(p + "q_a_layernorm.weight", c.q_lora_rank);
        a.q_b = lin(p + "q_b_proj.weight", m.H * m.dqk, c.q_lora_rank);
      } else {
        a.in = stacked({wl.linear(p + "q_proj.weight", m.H * m.dqk, m.D), kva});
        a.nq = m.H * m.dqk;
      }
      a.kv_a_ln = vec(p + "kv_a_layernorm.weight", m.kvr);
      const ops::Weight kvb = wl.linear(p + "kv_b_proj.weight", m.H * m.hd, m.kvr);
      a.kv_b = stacked({kvb});
      // The absorbed form's weights in the compute dtype: W_UK in place (rows of kv_b), W_UV transposed per head.
      const Tensor f = kvb.to_f32();
      const size_t es = dtype_size(m.act);
      if (a.kv_b.type == m.act) {
        a.wkv = a.kv_b.w.get();
      } else {
        a.wkv_own = DBuf<uint8_t>(size_t(m.H * m.hd * m.kvr) * es);
        ops::Weight t;
        t.w = f;
        upload_rows(t, m.act, a.wkv_own.get());
        a.wkv = a.wkv_own.get();
      }
      Tensor uv = Tensor::empty(DType::F32, {m.H * m.kvr, m.dv});
      for (int64_t h = 0; h < m.H; ++h)
        for (int64_t v = 0; v < m.dv; ++v)
          for (int64_t j = 0; j < m.kvr; ++j) uv.f32()[(h * m.kvr + j) * m.dv + v] = f.f32()[(h * m.hd + m.dn + v) * m.kvr + j];
      a.wuv_t = DBuf<uint8_t>(size_t(m.H * m.kvr * m.dv) * es);
      ops::Weight t;
      t.w = uv;
      upload_rows(t, m.act, a.wuv_t.get());
      a.o = lin(p + "o_proj.weight", m.D, m.H * m.dv);
    }
    void layer(LayerW& L, const std::string& p, int64_t index) {
      const ModelConfig& c = m.cfg;
      L.cache_layer = index;
      L.ln1 = vec(p + "input_layernorm.weight", m.D);
      L.ln2 = vec(p + "post_attention_layernorm.weight", m.D);
      attn(L.attn, p + "self_attn.");
      if (!c.is_moe_layer(index)) {
        L.mlp = mlp(p + "mlp.", c.intermediate_size);
        return;
      }
      MoeW& e = L.moe.emplace();
      e.gate = lin(p + "mlp.gate.weight", c.n_routed_experts, m.D, DType::F32);
      if (wl.has(p + "mlp.gate.e_score_correction_bias")) {
        e.bias = vec(p + "mlp.gate.e_score_correction_bias", c.n_routed_experts);
        e.has_bias = true;
      }
      for (int64_t x = 0; x < c.n_routed_experts; ++x)
        e.experts.push_back(mlp(p + "mlp.experts." + std::to_string(x) + ".", c.moe_intermediate_size));
      if (c.n_shared_experts > 0) e.shared = mlp(p + "mlp.shared_experts.", c.n_shared_experts * c.moe_intermediate_size);
      const Lin& g0 = e.experts[0].gu;
      e.use_table = g0.type == DType::BF16 || g0.type == DType::F8_E4M3;
      if (e.use_table) {
        std::vector<const void*> gu, dn;
        std::vector<const float*> gus, dns;
        for (const MlpW& x : e.experts) {
          gu.push_back(x.gu.w.get());
          dn.push_back(x.down.w.get());
          if (g0.type == DType::F8_E4M3) {
            gus.push_back(x.gu.scale.get());
            dns.push_back(x.down.scale.get());
          }
        }
        e.table = cuda::MoeExperts(c.n_routed_experts, m.D, c.moe_intermediate_size, g0.type, gu, dn, gus, dns);
      }
    }
  };

  // Whether an FP8 weight of this name stays e4m3 on the GPU (CudaModelOptions::fp8_dense_native).
  bool keeps_fp8(const std::string& name) const {
    return act == DType::BF16 && opt.fp8_native && (opt.fp8_dense_native || name.find(".mlp.experts.") != std::string::npos);
  }

  void load(const Transformer& host) {
    const ModelConfig& c = cfg;
    H = c.num_attention_heads, dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim, dv = c.v_head_dim, kvr = c.kv_lora_rank;
    D = c.hidden_size, V = c.vocab_size, W = kvr + dr, hd = dn + dv, dqk = dn + dr;
    eps = float(c.rms_norm_eps);
    scale = attention_softmax_scale(c);
    router = {int(c.n_group), int(c.topk_group), int(c.num_experts_per_tok), c.norm_topk_prob, float(c.routed_scaling_factor)};
    DSV3_CHECK(opt.dtype == DType::BF16 || opt.dtype == DType::F32, "--dtype must be bf16 or fp32, not {}", dtype_name(opt.dtype));
    act = opt.dtype;
    if (const char* v = std::getenv("DSV3_FP8_DENSE_NATIVE"); v && *v) opt.fp8_dense_native = std::string(v) != "0";

    // Refuse early when the weights cannot fit (the checkpoint's bytes, scaled to the compute dtype).
    const io::Checkpoint& ck = host.checkpoint();
    double need = 0;
    for (const std::string& n : ck.names()) {
      const io::TensorInfo& i = ck.info(n);
      int64_t numel = 1;
      for (int64_t d : i.shape) numel *= d;
      const bool fp8w = i.dtype == DType::F8_E4M3 || i.dtype == DType::F8_E5M2;
      need += double(numel) * double(fp8w && keeps_fp8(n) ? 1 : dtype_size(act));
    }
    size_t free_b = 0, total_b = 0;
    cuda::memory_info(&free_b, &total_b);
    DSV3_CHECK(need < double(free_b), "the model's weights do not fit on the GPU: about {} in {} needed, {} free of {}", gib(need),
               dtype_name(act), gib(double(free_b)), gib(double(total_b)));

    Loader ld(*this, ck);
    embed = ld.table("model.embed_tokens.weight");
    norm = ld.vec("model.norm.weight", D);
    if (ld.wl.has("lm_head.weight") || !c.tie_word_embeddings) {
      head = ld.lin("lm_head.weight", V, D);
    } else {  // tied: the embedding table is the head
      head.type = act, head.N = V, head.K = D;
      head.w = DBuf<uint8_t>(embed.bytes());
      cuda::copy_on_device(head.w.get(), embed.get(), embed.bytes());
      cuda::synchronize();
      weight_bytes += head.bytes();
    }
    auto env_flag = [](const char* name) {
      const char* v = std::getenv(name);
      return v && *v && std::string(v) != "0";
    };
    fused_router = !env_flag("DSV3_UNFUSED_ROUTER");
    bf16_gemv = !env_flag("DSV3_NO_BF16_GEMV");
    fp8_rows = !env_flag("DSV3_NO_FP8_ROWS_GEMM");
    bf16_rows = env_flag("DSV3_BF16_ROWS_GEMM");
    const bool fp8_attention = !layers.empty() && layers[0].attn.in.type == DType::F8_E4M3;
    fused_mla = env_flag("DSV3_FUSED_MLA") || (fp8_attention && !env_flag("DSV3_UNFUSED_MLA"));
    fused_mla_split = env_flag("DSV3_FUSED_MLA_SPLIT");
    fused_shared = !env_flag("DSV3_UNFUSED_SHARED");
    moe_decode_kernel = env_flag("DSV3_MOE_DECODE_KERNEL");
    fp8_expert_acts = !env_flag("DSV3_FP8_BF16_EXPERT_ACTS");
    fp8_rows_e4m3 = env_flag("DSV3_FP8_ROWS_E4M3");
    if (const char* v = std::getenv("DSV3_MOE_NO_GATHER"); v && std::string(v) == "0") moe_no_gather = false;
    if (const char* v = std::getenv("DSV3_PINNED_STEP"); v && std::string(v) == "0") pinned_step = false;
    if (const char* v = std::getenv("DSV3_STEP_AHEAD"); v && std::string(v) == "0") step_ahead = false;
    if (const char* v = std::getenv("DSV3_DEVICE_ADVANCE"); v && std::string(v) == "0") device_advance = false;
    if (const char* v = std::getenv("DSV3_PERSIST_EMBED"); v && std::string(v) == "0") persist_embeds = false;
    gemm_attention = env_flag("DSV3_GEMM_ATTENTION");
    if (const char* v = std::getenv("DSV3_MLA_PREFILL_PREP"); v && std::string(v) == "0") fused_prep = false;
    for (const char* e : {"DSV3_FLASH_DIRECT", "DSV3_FLASH_WGMMA"})  // (the direct path is the wgmma kernel's)
      if (const char* v = std::getenv(e); v && std::string(v) == "0") flash_direct = false;
    route_counter = DBuf<uint32_t>(1);
    cuda::memset_device(route_counter.get(), 0, 4);
    const ops::RopeTable rt = make_rope_table(c);
    DBuf<float> inv(rt.inv_freq.size());
    cuda::copy_to_device(inv.get(), rt.inv_freq.data(), inv.bytes());
    rope_table = DBuf<float>(size_t(c.max_position_embeddings * dr));
    cuda::rope_build_table(inv.get(), dr / 2, rt.attention_factor, c.max_position_embeddings, rope_table.get());
    cuda::synchronize();

    layers.resize(static_cast<size_t>(c.num_hidden_layers));
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) ld.layer(layers[size_t(i)], "model.layers." + std::to_string(i) + ".", i);
    mtp.resize(static_cast<size_t>(c.num_nextn_predict_layers));
    for (int64_t k = 0; k < c.num_nextn_predict_layers; ++k) {
      MtpW& t = mtp[size_t(k)];
      const int64_t li = c.num_hidden_layers + k;
      const std::string p = "model.layers." + std::to_string(li) + ".";
      t.enorm = ld.vec(p + "enorm.weight", D);
      t.hnorm = ld.vec(p + "hnorm.weight", D);
      t.head_norm = ld.vec(p + "shared_head.norm.weight", D);
      t.eh = ld.lin(p + "eh_proj.weight", D, 2 * D);
      ld.layer(t.layer, p, li);
      // The official layout carries copies of the embedding and head: share the main model's when identical.
      auto same = [&](const std::string& a, const std::string& b) {
        if (!ck.contains(a) || !ck.contains(b)) return false;
        const Tensor x = ck.get(a), y = ck.get(b);
        return x.dtype() == y.dtype() && x.shape() == y.shape() && std::memcmp(x.raw(), y.raw(), x.nbytes()) == 0;
      };
      const std::string e = p + "embed_tokens.weight", hname = p + "shared_head.head.weight";
      if (ck.contains(e) && !same(e, "model.embed_tokens.weight")) {
        t.embed_own = ld.table(e);
        t.embed = t.embed_own.get();
      } else {
        t.embed = embed.get();
      }
      if (ck.contains(hname) && !same(hname, "lm_head.weight")) {
        t.head_own = ld.lin(hname, V, D);
        t.head = &*t.head_own;
      } else {
        t.head = &head;
      }
    }
    cuda::synchronize();

    build_persistent();

    // What one batch-1 decode step reads at least.
    decode_bytes = head.bytes() + int64_t(norm.bytes()) + D * int64_t(dtype_size(act));
    for (const LayerW& L : layers) {
      decode_bytes += int64_t(L.ln1.bytes() + L.ln2.bytes()) + L.attn.bytes();
      if (L.mlp) decode_bytes += L.mlp->bytes();
      if (L.moe) {
        decode_bytes += L.moe->gate.bytes() + int64_t(L.moe->bias.bytes()) + c.num_experts_per_tok * L.moe->experts[0].bytes();
        if (L.moe->shared) decode_bytes += L.moe->shared->bytes();
      }
    }
  }

  // A projection's weight for contract_weights: its own bf16 buffer, or (FP8) dequantized in f32 into `tmp` (e4m3 ×
  // its block scale exactly: the kernel's e4m3 products use the same values).
  cuda::ContractOperand weight_operand(const Lin& l, DBuf<float>& tmp, int64_t sh, int64_t sd, int64_t sx) {
    if (l.type == DType::BF16) return {DType::BF16, l.w.get(), sh, sd, sx};
    DSV3_CHECK(l.type == DType::F8_E4M3 && l.split == 0 && l.scale.get(), "internal: folding a {} weight", dtype_name(l.type));
    const int64_t kb = (l.K + 127) / 128;
    std::vector<uint8_t> q(static_cast<size_t>(l.N * l.K));
    std::vector<float> sc(static_cast<size_t>((l.N + 127) / 128 * kb)), f(q.size());
    cuda::copy_to_host(q.data(), l.w.get(), q.size());
    cuda::copy_to_host(sc.data(), l.scale.get(), sc.size() * 4);
    for (int64_t n = 0; n < l.N; ++n)
      for (int64_t k = 0; k < l.K; ++k)
        f[size_t(n * l.K + k)] = fp8_e4m3_to_f32(q[size_t(n * l.K + k)]) * sc[size_t(n / 128 * kb + k / 128)];
    tmp = DBuf<float>(f.size());
    cuda::copy_to_device(tmp.get(), f.data(), f.size() * 4);
    return {DType::F32, tmp.get(), sh, sd, sx};
  }
  const float* keep_folded(DBuf<float> b) {
    persist_folded.push_back(std::move(b));
    return persist_folded.back().get();
  }
  // The persistent kernel's query weight: q_b with W_UK absorbed, [H·(kvr + dr), nq] f32 (persistent_ops.h).
  const float* fold_query(const AttnW& a) {
    const int64_t nq = a.q_b.K;
    DBuf<float> tmp;
    const cuda::ContractOperand qb = weight_operand(a.q_b, tmp, (dn + dr) * nq, nq, 1);
    DBuf<float> out(static_cast<size_t>(H * W * nq));
    cuda::contract_weights({DType::BF16, a.wkv, (dn + dv) * kvr, kvr, 1}, qb, nullptr, H, dn, kvr, nq, out.get(), W * nq, nq);
    const size_t es = qb.type == DType::F32 ? 4 : 2;
    for (int64_t h = 0; h < H; ++h)  // the rope rows as they are
      cuda::convert(qb.type, static_cast<const uint8_t*>(qb.p) + size_t((h * (dn + dr) + dn) * nq) * es, DType::F32,
                    out.get() + (h * W + kvr) * nq, dr * nq);
    cuda::synchronize();  // before tmp goes
    return keep_folded(std::move(out));
  }
  // The router split over the residual stream (persistent_ops.h): w_rg = gate ⊙ ln2 [E, D] and w_lg =
  // Σ_d gate[e, d]·ln2[d]·w_o[d, :] [E, H·dv], both f32.
  std::pair<const float*, const float*> fold_router(const Lin& o, const float* gate, const float* ln2) {
    const int64_t E = cfg.n_routed_experts;
    DBuf<float> tmp;
    const cuda::ContractOperand wo = weight_operand(o, tmp, 0, o.K, 1);
    DBuf<float> lg(static_cast<size_t>(E * o.K)), rg(static_cast<size_t>(E * D));
    cuda::contract_weights({DType::F32, gate, 0, 1, D}, wo, ln2, 1, D, E, o.K, lg.get(), 0, o.K);
    std::vector<float> g(static_cast<size_t>(E * D)), l2(static_cast<size_t>(D));
    cuda::copy_to_host(g.data(), gate, g.size() * 4);
    cuda::copy_to_host(l2.data(), ln2, l2.size() * 4);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t d = 0; d < D; ++d) g[size_t(e * D + d)] *= l2[size_t(d)];
    cuda::copy_to_device(rg.get(), g.data(), g.size() * 4);
    cuda::synchronize();
    const float* rgp = keep_folded(std::move(rg));
    return {rgp, keep_folded(std::move(lg))};
  }

  // The persistent decode kernel's tables, when the model qualifies: bf16 projections, or (native FP8 checkpoints)
  // e4m3 ones with 128x128 block scales (fp8_dense_native: every projection FP8); the router f32, a q LoRA.
  // DSV3_PERSISTENT_FP8=0 keeps FP8 models on the per-op launches (H200, small.json, every projection FP8: 0.651 ms
  // of graph with the kernel against 0.800 for the default FP8 policy's per-op path, bf16 checkpoint 0.557).
  void build_persistent() {
    const char* off = std::getenv("DSV3_NO_PERSISTENT");
    if (!opt.persistent_decode || (off && *off && std::string(off) != "0")) {
      persist_why = "switched off";
      return;
    }
    if (act != DType::BF16) {
      persist_why = "fp32 compute";
      return;
    }
    const ModelConfig& c = cfg;
    const bool fp8 = !layers.empty() && layers[0].attn.in.type == DType::F8_E4M3;
    if (fp8) {
      const char* v = std::getenv("DSV3_PERSISTENT_FP8");
      if (v && std::string(v) == "0") {
        persist_why = "FP8 weights (DSV3_PERSISTENT_FP8=0)";
        return;
      }
    }
    // On a shape the kernel does not take: why, and no folded weights kept.
    auto fail = [&](std::string why) {
      persist_why = std::move(why);
      persist_folded.clear();
    };
    std::vector<cuda::PersistentLayer> t;
    int64_t units = 0, scf = 0;
    auto cd = [](int64_t n) { return (n + 127) / 128; };
    auto grid = [&](const Lin& l) { return (l.split > 0 ? cd(l.split) + cd(l.N - l.split) : cd(l.N)) * cd(l.K); };
    // bf16 weights are never stacked with a split; FP8 ones keep each part's scale rows (split = the first's rows).
    auto ok = [&](const Lin& l, int64_t split) {
      return fp8 ? l.type == DType::F8_E4M3 && l.split == split && l.scale.get() : l.type == DType::BF16 && l.split == 0;
    };
    for (const LayerW& L : layers) {
      const AttnW& a = L.attn;
      if (!a.lora || !ok(a.in, fp8 ? a.in.split : 0) || !ok(a.q_b, 0) || !ok(a.o, 0)) {
        return fail(fp8 ? "attention weights not all FP8 with a q LoRA" : "attention weights not bf16 with a q LoRA");
      }
      cuda::PersistentLayer p;
      p.ln1 = L.ln1.get(), p.ln2 = L.ln2.get();
      p.w_in = a.in.w.get(), p.q_a_ln = a.q_a_ln.get(), p.kv_a_ln = a.kv_a_ln.get();
      p.wuv_t = a.wuv_t.get(), p.w_o = a.o.w.get(), p.cache_layer = L.cache_layer;
      if (fp8) {
        p.s_in = a.in.scale.get(), p.split_in = a.in.split, p.s_o = a.o.scale.get();
        scf = std::max({scf, grid(a.in), grid(a.o)});
      }
      const MlpW* fixed = L.mlp ? &*L.mlp : (L.moe && L.moe->shared ? &*L.moe->shared : nullptr);
      if (fixed) {
        if (!ok(fixed->gu, fp8 ? fixed->I : 0) || !ok(fixed->down, 0) || (fp8 && fixed->I % 16 != 0)) {
          return fail(fp8 ? "MLP weights not FP8 (or a width not a multiple of 16)" : "MLP weights not bf16");
        }
        p.fix_gu = fixed->gu.w.get(), p.fix_dn = fixed->down.w.get(), p.fix_I = fixed->I;
        if (fp8) p.s_fix_gu = fixed->gu.scale.get(), p.s_fix_dn = fixed->down.scale.get();
      }
      if (L.moe) {
        const MoeW& e = *L.moe;
        const DType et = fp8 ? DType::F8_E4M3 : DType::BF16;
        if (!e.use_table || e.table.type != et || e.gate.type != DType::F32 || (fp8 && e.table.I % 16 != 0)) {
          return fail(fp8 ? "routed experts not FP8 (or a width not a multiple of 16)" : "routed experts not bf16");
        }
        p.gate = reinterpret_cast<const float*>(e.gate.w.get());
        p.bias = e.has_bias ? e.bias.get() : nullptr;
        p.exp_gu = e.table.d_gate_up(), p.exp_dn = e.table.d_down(), p.exp_I = e.table.I;
        if (fp8) p.exp_gu_s = e.table.d_gate_up_scale(), p.exp_dn_s = e.table.d_down_scale();
      }
      if (fp8) {  // the FFN stages' grids: fixed gate|up; the routed gate|ups; every down (kernel's layouts)
        const int64_t k = p.gate ? router.top_k : 0;
        scf = std::max({scf, 2 * cd(p.fix_I) * cd(D), k * 2 * cd(p.exp_I) * cd(D), cd(D) * (cd(p.fix_I) + k * cd(p.exp_I))});
      }
      units = std::max(units, p.fix_I + (p.gate ? router.top_k * p.exp_I : 0));
      t.push_back(p);
    }
    cuda::PersistentShape& sh = persist_shape;
    sh.D = D, sh.H = H, sh.dn = dn, sh.dr = dr, sh.dv = dv, sh.kvr = kvr, sh.nq = c.q_lora_rank, sh.E = c.n_routed_experts;
    sh.layers = int64_t(layers.size()), sh.block_size = kBlock, sh.max_units = units, sh.eps = eps, sh.scale = scale;
    sh.router = router;
    sh.fp8 = fp8, sh.scale_floats = (scf + 3) / 4 * 4;
    if (std::string why = cuda::decode_persistent_unsupported(sh, opt.persistent_blocks); !why.empty()) return fail(why);
    for (size_t i = 0; i < t.size(); ++i) {  // the folded weights, once the kernel takes the shape
      t[i].w_qc = fold_query(layers[i].attn);
      if (t[i].gate) std::tie(t[i].w_rg, t[i].w_lg) = fold_router(layers[i].attn.o, t[i].gate, layers[i].ln2.get());
    }
    persist_why.clear();
    persist_layers = DBuf<cuda::PersistentLayer>(t.size());
    cuda::copy_to_device(persist_layers.get(), t.data(), t.size() * sizeof(cuda::PersistentLayer));
    persist_bar = DBuf<uint32_t>(cuda::kDecodePersistentBarrierWords);
    cuda::memset_device(persist_bar.get(), 0, persist_bar.bytes());
    cuda::synchronize();
  }

  // ---------------------------------------------------------------------------------------------------
  // Building blocks
  // ---------------------------------------------------------------------------------------------------
  // The products of an FP8 linear: run(weights, their scales, first output column, columns) once, or once for each
  // stacked half when the halves meet off a 128-row boundary (each keeps its own scale grid; stacked at a multiple of
  // 128 rows the two grids are one).
  template <class Run>
  static void fp8_products(const Lin& L, Run&& run) {
    if (L.split % 128 != 0) {
      const int64_t kb = cuda::ceil_div(L.K, 128);
      run(L.w.get(), L.scale.get(), int64_t(0), L.split);
      run(L.w.get() + L.split * L.K, L.scale.get() + cuda::ceil_div(L.split, 128) * kb, L.split, L.N - L.split);
    } else {
      run(L.w.get(), L.scale.get(), int64_t(0), L.N);
    }
  }
  void lin(Exec& ex, const Lin& L, const void* x, int64_t ldx, float* y, int64_t ldy, int64_t M) const {
    if (M <= 0) return;
    if (L.type == DType::F8_E4M3) {
      // Decode-sized rows: one GEMV launch on the e4m3 bytes; larger ones: cuBLASLt's block-scaled GEMM.
      if (cuda::gemv_supported(act, x, ldx, M, L.K)) {  // both stacked weights in one launch
        cuda::gemv(DType::F8_E4M3, act, x, ldx, M, L.w.get(), L.scale.get(), y, ldy, L.N, L.K, s(), L.split);
        return;
      }
      const bool rows = fp8_rows && act == DType::BF16 && M <= kFp8RowsUpTo &&
                        cuda::rows_gemm_supported(x, ldx, M, L.K, y, ldy) &&
                        (L.split % 128 == 0 || cuda::rows_gemm_supported(x, ldx, M, L.K, y + L.split, ldy));
      // e4m3 activations (quantized 1x128 here, once for both stacked halves) on the e4m3 x e4m3 kernel.
      const bool rows8 = rows && fp8_rows_e4m3 && cuda::rows_gemm_fp8_supported(M, L.K, y, ldy) &&
                         (L.split % 128 == 0 || cuda::rows_gemm_fp8_supported(M, L.K, y + L.split, ldy));
      uint8_t* xq = nullptr;
      float* xs = nullptr;
      if (rows8) {
        const size_t qbytes = size_t(cuda::round_up(M * L.K, 256));
        xq = static_cast<uint8_t*>(ex.arena.get(S_XQ, qbytes + size_t(cuda::fp8_act_scale_count(M, L.K)) * 4));
        xs = reinterpret_cast<float*>(xq + qbytes);
        cuda::quantize_fp8_1x128(act, x, ldx, M, L.K, xq, xs, s());
      }
      auto run = [&](const uint8_t* w, const float* sc, float* yy, int64_t N) {
        if (rows8) cuda::rows_gemm_fp8(xq, xs, M, w, sc, N, L.K, yy, ldy, s());
        else if (rows) cuda::rows_gemm(DType::F8_E4M3, static_cast<const uint16_t*>(x), ldx, M, w, sc, N, L.K, yy, ldy, s());
        else ex.gemm.linear_fp8(act, x, ldx, w, sc, DType::F32, yy, ldy, M, N, L.K, s());
      };
      fp8_products(L, [&](const uint8_t* w, const float* sc, int64_t n0, int64_t N) { run(w, sc, y + n0, N); });
      return;
    }
    const DType xt = L.type == DType::F32 && act != DType::F32 ? DType::F32 : act;
    DSV3_CHECK(xt == L.type, "internal error: {} activations for a {} weight", dtype_name(xt), dtype_name(L.type));
    if (bf16_gemv && L.type == DType::BF16 && cuda::gemv_supported(act, x, ldx, M, L.K)) {
      cuda::gemv(DType::BF16, act, x, ldx, M, L.w.get(), nullptr, y, ldy, L.N, L.K, s());
      return;
    }
    if (bf16_rows && L.type == DType::BF16 && M <= kFp8RowsUpTo && cuda::rows_gemm_supported(x, ldx, M, L.K, y, ldy)) {
      cuda::rows_gemm(DType::BF16, static_cast<const uint16_t*>(x), ldx, M, L.w.get(), nullptr, L.N, L.K, y, ldy, s());
      return;
    }
    ex.gemm.matmul(L.type, x, ldx, L.w.get(), L.K, DType::F32, y, ldy, M, L.N, L.K, s());
  }
  // y = x·Wᵀ written as yt: F32 through lin; BF16 straight from the large-M GEMMs (cuBLASLt rounds its f32 sums once),
  // for products whose only reader wants bf16.
  void lin_to(Exec& ex, const Lin& L, const void* x, int64_t ldx, DType yt, void* y, int64_t ldy, int64_t M) const {
    if (yt == DType::F32) return lin(ex, L, x, ldx, static_cast<float*>(y), ldy, M);
    DSV3_CHECK(yt == DType::BF16, "internal error: lin_to {}", dtype_name(yt));
    if (M <= 0) return;
    auto* yb = static_cast<uint16_t*>(y);
    if (L.type == DType::F8_E4M3) {
      fp8_products(L, [&](const uint8_t* w, const float* sc, int64_t n0, int64_t N) {
        ex.gemm.linear_fp8(act, x, ldx, w, sc, DType::BF16, yb + n0, ldy, M, N, L.K, s());
      });
      return;
    }
    DSV3_CHECK(L.type == act, "internal error: {} activations for a {} weight", dtype_name(act), dtype_name(L.type));
    ex.gemm.matmul(L.type, x, ldx, L.w.get(), L.K, DType::BF16, yb, ldy, M, L.N, L.K, s());
  }
  // x (f32 rows) in the GEMM input dtype: x itself for F32, else a bf16 copy in `slot`.
  const void* to_act(Exec& ex, const float* x, int64_t ldx, int64_t M, int64_t N, size_t slot, int64_t* ld) const {
    if (act == DType::F32) {
      *ld = ldx;
      return x;
    }
    void* y = ex.arena.get(slot, size_t(M * N) * 2);
    cuda::cast_rows(x, ldx, act, y, N, M, N, s());
    *ld = N;
    return y;
  }

  void mlp_fwd(Exec& ex, const MlpW& w, const void* x, int64_t ldx, int64_t M, float* y) const {
    void* a = ex.arena.get(S_A, size_t(M * w.I) * dtype_size(act));
    if (act == DType::BF16 && M > kBf16GateUpFrom) {  // prefill: gate and up in bf16, as a bf16 model's projections return them
      auto* gu = static_cast<uint16_t*>(ex.arena.get(S_GU, size_t(M * 2 * w.I) * 2));
      lin_to(ex, w.gu, x, ldx, DType::BF16, gu, 2 * w.I, M);
      cuda::silu_mul(gu, 2 * w.I, act, a, w.I, M, w.I, s());
    } else {
      float* gu = ex.arena.as<float>(S_GU, M * 2 * w.I);
      lin(ex, w.gu, x, ldx, gu, 2 * w.I, M);
      cuda::silu_mul(gu, 2 * w.I, act, a, w.I, M, w.I, s());
    }
    lin(ex, w.down, a, w.I, y, D, M);
  }

  // Routed + shared experts of x2 (f32 [M, D]; xa: the same in the GEMM dtype, ld D) into y.
  // defer (or null): the routed experts' weighted sum may be left to the next layer boundary (moe_prefill's defer;
  // defer->eo stays null when it is not). Returns whether y was written (not when deferred without shared experts).
  bool moe_fwd(Exec& ex, const MoeW& e, const float* x2, const void* xa, int64_t M, float* y, const RowsInfo& r, bool no_sync,
               cuda::MoeRowsSum* defer = nullptr) const {
    const int64_t E = cfg.n_routed_experts, K = router.top_k;
    float* logits = ex.arena.as<float>(S_LOGIT, M * E);
    int32_t* idx = ex.arena.as<int32_t>(S_IDX, M * K);
    float* wts = ex.arena.as<float>(S_W, M * K);
    const float* bias = e.has_bias ? e.bias.get() : nullptr;
    if (fused_router && M <= cuda::kGateRouteMaxM && D % 4 == 0) {  // decode: gate product and top-k in one launch
      cuda::moe_gate_route(x2, D, M, reinterpret_cast<const float*>(e.gate.w.get()), D, E, bias, router, logits, route_counter.get(), idx,
                           wts, s());
    } else {
      lin(ex, e.gate, x2, D, logits, E, M);
      cuda::moe_route(logits, E, M, E, bias, router, idx, wts, s());
    }
    // From 9 rows the grouped GEMMs (reading each chosen expert once on the tensor cores) beat moe_decode's kernels.
    const bool grouped = e.use_table && M > cuda::kGemvMaxM && cuda::moe_grouped_supported(e.table) && !moe_decode_kernel;
    const bool decode = e.use_table && M * K <= cuda::kMoeDecodeMaxSlots && M <= 64 && !grouped;
    // Decode: the shared experts ride in moe_decode's two kernels (three launches fewer per layer).
    std::optional<cuda::MoeSharedExpert> fold;
    // Only for GEMV-sized batches: from 9 rows the shared MLP runs on cuBLASLt's GEMMs, faster than the fold.
    if (decode && M <= cuda::kGemvMaxM && e.shared && fused_shared && e.shared->gu.type == e.table.type && e.shared->I % 8 == 0) {
      const MlpW& sw = *e.shared;
      fold = cuda::MoeSharedExpert{sw.gu.w.get(), sw.down.w.get(), sw.gu.scale.get(), sw.down.scale.get(), sw.I};
    }
    if (e.shared && !fold) mlp_fwd(ex, *e.shared, xa, D, M, y);
    const bool acc = e.shared.has_value() && !fold;
    if (r.routing) {
      std::vector<int32_t> h(size_t(M * K));
      cuda::copy_to_host(h.data(), idx, h.size() * 4, s());
      cuda::synchronize(s());
      r.routing->insert(r.routing->end(), h.begin(), h.end());
    }
    if (decode) {
      const size_t wsb = cuda::moe_decode_workspace_bytes(M, K, E, e.table.I, fold ? fold->I : 0, D);
      void* ws = ex.arena.get(S_MOEWS, wsb);
      cuda::moe_decode(e.table, x2, D, idx, wts, M, K, y, D, acc, ws, wsb, s(), fold ? &*fold : nullptr);
      return true;
    }
    DSV3_CHECK(!no_sync || grouped, "internal error: a captured step needs the host-synchronising MoE path");
    if (e.use_table) {  // grouped (no host synchronisation) when supported, else a per-expert cuBLASLt loop
      const size_t wsb = cuda::moe_prefill_workspace_bytes(M, K, E, D, e.table.I);
      void* ws = ex.arena.get(S_MOEWS, wsb);
      // (xa: the norm's bf16 copy of x2, the same rounding as the cast the no-gather path would make)
      const auto* xb = act == DType::BF16 ? static_cast<const uint16_t*>(xa) : nullptr;
      const bool later = defer && cuda::residual_rmsnorm_moe_supported(D, K);
      cuda::moe_prefill(ex.gemm, e.table, x2, D, idx, wts, M, K, y, D, acc, ws, wsb, s(), fp8_expert_acts, moe_no_gather, xb,
                        later ? defer : nullptr);
      return acc || !later;
    }
    // F32 experts: group the slots by expert on the host, then per-expert cuBLASLt GEMMs.
    std::vector<int32_t> hidx(size_t(M * K));
    cuda::copy_to_host(hidx.data(), idx, hidx.size() * 4, s());
    cuda::synchronize(s());
    std::vector<std::vector<int32_t>> by(static_cast<size_t>(E));
    for (int64_t sl = 0; sl < M * K; ++sl) by[size_t(hidx[size_t(sl)])].push_back(int32_t(sl));
    std::vector<int32_t> perm;  // [src token rows | dst slots]
    std::vector<int64_t> off{0};
    for (int64_t x = 0; x < E; ++x) {
      for (int32_t sl : by[size_t(x)]) perm.push_back(int32_t(sl / K));
      off.push_back(int64_t(perm.size()));
    }
    const int64_t n = int64_t(perm.size());
    for (int64_t x = 0; x < E; ++x)
      for (int32_t sl : by[size_t(x)]) perm.push_back(sl);
    int32_t* dperm = ex.arena.as<int32_t>(S_PERM, 2 * n);
    cuda::copy_to_device(dperm, perm.data(), perm.size() * 4, s());
    void* xg = ex.arena.get(S_XG, size_t(n * D) * dtype_size(act));
    cuda::gather_rows(x2, D, dperm, n, D, act, xg, D, s());
    const int64_t I = cfg.moe_intermediate_size;
    float* gu = ex.arena.as<float>(S_GU, n * 2 * I);
    for (int64_t x = 0; x < E; ++x)
      if (off[size_t(x) + 1] > off[size_t(x)])
        lin(ex, e.experts[size_t(x)].gu, static_cast<uint8_t*>(xg) + size_t(off[size_t(x)] * D) * dtype_size(act), D,
            gu + off[size_t(x)] * 2 * I, 2 * I, off[size_t(x) + 1] - off[size_t(x)]);
    void* a = ex.arena.get(S_A, size_t(n * I) * dtype_size(act));
    cuda::silu_mul(gu, 2 * I, act, a, I, n, I, s());
    float* ye = ex.arena.as<float>(S_YE, n * D);
    for (int64_t x = 0; x < E; ++x)
      if (off[size_t(x) + 1] > off[size_t(x)])
        lin(ex, e.experts[size_t(x)].down, static_cast<uint8_t*>(a) + size_t(off[size_t(x)] * I) * dtype_size(act), I,
            ye + off[size_t(x)] * D, D, off[size_t(x) + 1] - off[size_t(x)]);
    float* slots = ex.arena.as<float>(S_SLOTS, M * K * D);
    cuda::scatter_rows(ye, D, dperm + n, n, D, slots, D, s());
    cuda::moe_combine(slots, idx, wts, M, K, D, y, D, acc, s());
    return true;
  }

  // The fused absorbed decode (mla_decode_fused) when every sequence of the pass brings one new token and the
  // context is short enough for one block per head to stream it; nullopt otherwise.
  std::optional<cuda::MlaDecodeShape> fused_mla_shape(const RowsInfo& r) const {
    if (!fused_mla || r.calls.empty()) return std::nullopt;
    cuda::MlaDecodeShape sh;
    for (const RowsInfo::Call& call : r.calls) {
      if (call.s_q != 1) return std::nullopt;
      sh.max_len = std::max(sh.max_len, call.max_len);
    }
    sh.H = H, sh.dn = dn, sh.dr = dr, sh.dv = dv, sh.kvr = kvr, sh.block_size = kBlock, sh.max_blocks = r.cache->max_blocks;
    sh.scale = scale;
    if (sh.max_len > kFusedMlaMaxLen) {
      if (!fused_mla_split) return std::nullopt;
      sh.splits = cuda::ceil_div(sh.max_len, kFusedMlaMaxLen);  // every block streams at most kFusedMlaMaxLen rows
    }
    if (!cuda::mla_decode_fused_supported(sh, act)) return std::nullopt;
    return sh;
  }

  // MLA of the normed input x (GEMM dtype, [M, D]) into out (f32 [M, D]).
  void mla_fwd(Exec& ex, const AttnW& a, int64_t cache_layer, const void* x, int64_t ldx, const RowsInfo& r, float* out) const {
    const int64_t M = r.M, nin = a.in.N;
    float* qkv = ex.arena.as<float>(S_QA, M * nin);
    lin(ex, a.in, x, ldx, qkv, nin, M);
    float* kva = qkv + a.nq;  // [c_kv | k_rope], row stride nin
    float* q = qkv;
    int64_t ldq = nin;
    // A prefill (keys and values expanded per head) on the wgmma flash kernel reads q_b's and kv_b's outputs in
    // bf16 where they are: both products write bf16, no f32 copies and no packing pass.
    const bool direct = flash_direct && !(r.cached && !r.fresh) && act == DType::BF16 && !gemm_attention && a.lora &&
                        cuda::attention_causal_flash_direct_supported(dqk, dv, dr);
    // The direct path's prologue in one kernel: both norms, the key's RoPE and its bf16 copy, and the latent cache
    // rows (six launches before, 2026-12-03).
    const bool prep = direct && fused_prep && cuda::mla_prefill_prep_supported(qkv, nin, a.nq, kvr, dr, a.nq, kvr, dr);
    void* pool = r.cached ? r.cache->layer(cache_layer) : nullptr;
    uint16_t *qb = nullptr, *cnb = nullptr, *krb = nullptr;
    if (a.lora) {
      void* qan = ex.arena.get(S_QAN, size_t(M * a.nq) * dtype_size(act));
      if (prep) {
        cnb = static_cast<uint16_t*>(ex.arena.get(S_CNA, size_t(M * kvr) * 2));
        krb = static_cast<uint16_t*>(ex.arena.get(S_K, size_t(M * dr) * 2));
        cuda::mla_prefill_prep(qkv, nin, a.nq, kvr, dr, a.q_a_ln.get(), a.kv_a_ln.get(), eps, r.pos64, rope_table.get(),
                               static_cast<uint16_t*>(qan), a.nq, cnb, kvr, krb, dr, r.cached ? r.dst_rows : nullptr,
                               r.cached ? r.cache->type : DType::F32, pool, M, s());
      } else {
        cuda::rmsnorm_to(qkv, nin, a.q_a_ln.get(), eps, act, qan, a.nq, M, a.nq, s());
      }
      ldq = H * dqk;
      if (direct) {
        qb = static_cast<uint16_t*>(ex.arena.get(S_Q, size_t(M * H * dqk) * 2));
        lin_to(ex, a.q_b, qan, a.nq, DType::BF16, qb, ldq, M);
      } else {
        q = ex.arena.as<float>(S_Q, M * H * dqk);
        lin(ex, a.q_b, qan, a.nq, q, ldq, M);
      }
    }
    const void* oa = nullptr;
    int64_t ldo = H * dv;
    const std::optional<cuda::MlaDecodeShape> fused = r.cached && !r.fresh ? fused_mla_shape(r) : std::nullopt;
    if (fused) {  // one new token per sequence: one kernel (two with splits)
      void* o = ex.arena.get(S_OACT, size_t(M * H * dv) * dtype_size(act));
      const cuda::MlaDecodeShape& sh = *fused;
      const size_t wsb = cuda::mla_decode_fused_workspace_bytes(sh, M);
      cuda::mla_decode_fused(sh, q, ldq, kva, nin, a.kv_a_ln.get(), eps, r.pos64, rope_table.get(), r.dst_rows, r.table, act, a.wkv,
                             a.wuv_t.get(), pool, o, H * dv, M, s(), wsb ? ex.arena.get(S_AWS, wsb) : nullptr, wsb);
      oa = o;
    } else if (r.cached && !r.fresh) {  // absorbed: queries folded into the latent space, paged decode kernel over the cache
      const CudaCache& c = *r.cache;
      float* qc = ex.arena.as<float>(S_QC, M * H * W);
      cuda::mla_decode_prep(q, ldq, H, dn, dr, kva, nin, kvr, a.kv_a_ln.get(), eps, r.pos64, rope_table.get(), r.dst_rows, c.type,
                            pool, qc, H * W, M, s());
      cuda::head_matmul(q, ldq, dqk, dn, act, a.wkv, hd * kvr, kvr, kvr, DType::F32, qc, H * W, W, M, H, s());
      float* ol = ex.arena.as<float>(S_OL, M * H * kvr);
      for (const RowsInfo::Call& call : r.calls) {
        cuda::LatentAttention p;
        p.batch = call.batch, p.s_q = call.s_q, p.heads = H, p.W = W, p.R = kvr;
        p.block_size = kBlock, p.max_blocks = c.max_blocks, p.max_len = call.max_len, p.scale = scale;
        const size_t wsb = cuda::attention_latent_workspace_bytes(p);
        void* ws = ex.arena.get(S_AWS, wsb);
        cuda::attention_latent(p, qc + call.row0 * H * W, c.type, pool, r.table + call.seq0 * c.max_blocks, r.pos32 + call.row0,
                               ol + call.row0 * H * kvr, ws, wsb, s());
      }
      void* o = ex.arena.get(S_OACT, size_t(M * H * dv) * dtype_size(act));
      cuda::head_matmul(ol, H * kvr, kvr, kvr, act, a.wuv_t.get(), kvr * dv, dv, dv, act, o, H * dv, dv, M, H, s());
      oa = o;
    } else {  // expanded: keys and values per head, causal prefill kernel
      // The flash kernel reads the query's RoPE dims unrotated (it rotates them as it packs) and the keys as kv_b's
      // k_nope next to the one roped k_rope (no expanded key tensor); the other kernels get both written out first.
      const bool flash = act == DType::BF16 && !gemm_attention && cuda::attention_causal_flash_supported(dqk, dv);
      if (direct) cuda::rope(qb + dn, ldq, dqk, M, H, dr, r.pos64, rope_table.get(), s());
      else if (!flash) cuda::rope(q + dn, ldq, dqk, M, H, dr, r.pos64, rope_table.get(), s());
      void* cn = cnb;
      if (!prep) {
        cuda::rope(kva + kvr, nin, 0, M, 1, dr, r.pos64, rope_table.get(), s());
        float* cnf = nullptr;
        if (r.cached) {  // append [kv_a_layernorm(c_kv) | roped k_rope] of the new tokens to the latent cache
          cnf = ex.arena.as<float>(S_CN, M * kvr);
          cuda::rmsnorm_to(kva, nin, a.kv_a_ln.get(), eps, DType::F32, cnf, kvr, M, kvr, s());
          cuda::latent_append(cnf, kvr, kvr, kva + kvr, nin, dr, r.dst_rows, M, r.cache->type, pool, s());
        }
        cn = cnf;
        if (!cn || act != DType::F32) {
          cn = ex.arena.get(S_CNA, size_t(M * kvr) * dtype_size(act));
          cuda::rmsnorm_to(kva, nin, a.kv_a_ln.get(), eps, act, cn, kvr, M, kvr, s());
        }
      }
      const int64_t T = r.T;
      const cuda::Strides3 sq{T * ldq, ldq, dqk}, sv{T * H * hd, H * hd, hd}, so{T * H * dv, H * dv, dv};
      if (direct) {  // bf16 kv_b output and a bf16 copy of the roped k_rope, read in place by the kernel
        auto* kvb = static_cast<uint16_t*>(ex.arena.get(S_KV, size_t(M * H * hd) * 2));
        lin_to(ex, a.kv_b, cn, kvr, DType::BF16, kvb, H * hd, M);
        if (!prep) {
          krb = static_cast<uint16_t*>(ex.arena.get(S_K, size_t(M * dr) * 2));
          cuda::cast_rows(kva + kvr, nin, DType::BF16, krb, dr, M, dr, s());
        }
        void* o = ex.arena.get(S_OACT, size_t(M * H * dv) * 2);
        cuda::attention_causal_flash_direct(qb, sq, kvb, sv, krb, cuda::Strides3{T * dr, dr, 0}, dr, kvb + dn, sv, o, act, so, r.B, T,
                                            H, dqk, dv, scale, s());
        lin(ex, a.o, o, ldo, out, D, M);
        return;
      }
      float* kv = ex.arena.as<float>(S_KV, M * H * hd);
      lin(ex, a.kv_b, cn, kvr, kv, H * hd, M);
      if (flash) {  // tensor cores; RoPE, the key's two pieces and the bf16 output in the kernels' own passes
        cuda::FlashMla fm;
        fm.k_rope = kva + kvr, fm.skr = cuda::Strides3{T * nin, nin, 0}, fm.kr = dr;
        fm.rope_table = rope_table.get(), fm.pos = r.pos64, fm.q_rope = dr;
        fm.out_type = act;
        void* o = ex.arena.get(S_OACT, size_t(M * H * dv) * dtype_size(act));
        const size_t wsb = cuda::attention_causal_flash_workspace(r.B, T, H, dqk, dv);
        cuda::attention_causal_flash(q, sq, kv, sv, kv + dn, sv, o, so, r.B, T, H, dqk, dv, scale, ex.arena.get(S_AWS, wsb), wsb, s(),
                                     fm);
        oa = o;
      } else {  // f32 kernels: the roped query and the expanded key written out first
        float* k = ex.arena.as<float>(S_K, M * H * dqk);
        cuda::mla_expand_k(kv, H, dn, dv, kva + kvr, nin, dr, k, M, s());
        const cuda::Strides3 sk{T * H * dqk, H * dqk, dqk};
        float* o = ex.arena.as<float>(S_O, M * H * dv);
        if (act == DType::BF16 && T >= kGemmAttentionFrom) {  // long prefill: tensor-core GEMMs around a row softmax
          const size_t wsb = cuda::attention_causal_gemm_workspace(r.B, T, H, dqk, dv);
          cuda::attention_causal_gemm(ex.gemm, q, sq, k, sk, kv + dn, sv, o, so, r.B, T, H, dqk, dv, scale, ex.arena.get(S_AWS, wsb),
                                      wsb, s());
        } else {
          cuda::attention_causal(q, sq, k, sk, kv + dn, sv, o, so, r.B, T, H, dqk, dv, scale, s());
        }
        oa = to_act(ex, o, H * dv, M, H * dv, S_OACT, &ldo);
      }
    }
    lin(ex, a.o, oa, ldo, out, D, M);
  }

  // A layer's FFN output not yet added to the residual stream: d (or null), and the routed experts' rows when their
  // weighted sum was left to the next layer boundary (moe.eo set; residual_rmsnorm sums them there).
  struct Pending {
    const float* d = nullptr;
    cuda::MoeRowsSum moe;
    const cuda::MoeRowsSum* rows() const { return moe.eo ? &moe : nullptr; }
  };
  // One decoder layer on the residual stream h [M, D]. `pending` is the previous layer's output, added to h here in
  // the same pass as the input norm; the layer's own MLP/MoE output is returned, not yet added (the caller adds it,
  // or hands it to the next layer or the final norm). defer_moe: a MoE layer's routed sum may stay pending as rows.
  Pending layer_fwd(Exec& ex, const LayerW& L, float* h, const Pending& pending, const RowsInfo& r, bool no_sync,
                    bool defer_moe = false) const {
    const int64_t M = r.M;
    void* xa = ex.arena.get(S_XACT, size_t(M * D) * dtype_size(act));
    cuda::residual_rmsnorm(h, D, pending.d, D, L.ln1.get(), eps, M, D, nullptr, 0, act, xa, D, s(), pending.rows());
    float* att = ex.arena.as<float>(S_ATT, M * D);
    mla_fwd(ex, L.attn, L.cache_layer, xa, D, r, att);
    // The FFN input: f32 for the router and the routed experts, the GEMM dtype for the shared/dense MLP.
    float* x2 = L.moe ? ex.arena.as<float>(S_X2, M * D) : nullptr;
    const bool same = x2 && act == DType::F32;
    cuda::residual_rmsnorm(h, D, att, D, L.ln2.get(), eps, M, D, x2, D, act, same ? nullptr : xa, D, s());
    const void* xa2 = same ? static_cast<const void*>(x2) : xa;
    float* y = ex.arena.as<float>(S_FFN, M * D);
    Pending out;
    out.d = y;
    if (L.moe) {
      if (!moe_fwd(ex, *L.moe, x2, xa2, M, y, r, no_sync, defer_moe ? &out.moe : nullptr)) out.d = nullptr;
    } else {
      mlp_fwd(ex, *L.mlp, xa2, D, M, y);
    }
    return out;
  }

  // The MTP module k on h_prev [M, D] (device) and the embeddings of the tokens one ahead (device ids).
  // Returns its output h (in slot S_H of a fresh buffer) and writes logits [M, V] into `logits`.
  void mtp_fwd(Exec& ex, const MtpW& t, const float* h_prev, const int64_t* ahead, const RowsInfo& r, float* h_out,
               float* logits) const {
    const int64_t M = r.M;
    float* emb = ex.arena.as<float>(S_EMB, M * D);
    uint32_t* err = ex.arena.as<uint32_t>(S_ERR, 1);
    cuda::embedding_reset_error(err, s());
    cuda::embedding(DType::I64, ahead, M, act, t.embed, V, D, emb, D, err, s());
    void* cat = ex.arena.get(S_MTPCAT, size_t(M * 2 * D) * dtype_size(act));
    const size_t es = dtype_size(act);
    cuda::rmsnorm_to(emb, D, t.enorm.get(), eps, act, cat, 2 * D, M, D, s());
    cuda::rmsnorm_to(h_prev, D, t.hnorm.get(), eps, act, static_cast<uint8_t*>(cat) + size_t(D) * es, 2 * D, M, D, s());
    lin(ex, t.eh, cat, 2 * D, h_out, D, M);
    const float* y = layer_fwd(ex, t.layer, h_out, {}, r, false).d;
    void* hn = ex.arena.get(S_ROWSACT, size_t(M * D) * es);
    cuda::residual_rmsnorm(h_out, D, y, D, t.head_norm.get(), eps, M, D, nullptr, 0, act, hn, D, s());
    lin(ex, *t.head, hn, D, logits, V, M);
  }

  // ---------------------------------------------------------------------------------------------------
  // Uncached forward
  // ---------------------------------------------------------------------------------------------------
  // The chosen experts of M rows (host copy, [M, top_k]) as ForwardResult::routing reports them: int64, sorted per row.
  Tensor routing_tensor(const std::vector<int32_t>& routing, int64_t M) const {
    const int64_t k = router.top_k;
    Tensor t = Tensor::empty(DType::I64, {M, k});
    int64_t* p = t.data<int64_t>();
    for (int64_t i = 0; i < M * k; ++i) p[i] = routing[size_t(i)];
    for (int64_t m = 0; m < M; ++m) std::sort(p + m * k, p + (m + 1) * k);
    return t;
  }

  ForwardResult forward(const Tensor& input_ids, const ForwardOptions& opts) const {
    DSV3_CHECK(input_ids.ndim() == 2, "input_ids must be [B, T], got {}", shape_str(input_ids.shape()));
    DSV3_CHECK(input_ids.dtype() == DType::I64 || input_ids.dtype() == DType::I32, "input_ids must be int64 or int32, got {}",
               dtype_name(input_ids.dtype()));
    const int64_t B = input_ids.dim(0), T = input_ids.dim(1), M = B * T;
    DSV3_CHECK(B > 0 && T > 0, "input_ids is empty ({})", shape_str(input_ids.shape()));
    DSV3_CHECK(T <= cfg.max_position_embeddings, "{} tokens exceed the model's context of {} (max_position_embeddings)", T,
               cfg.max_position_embeddings);
    const Tensor ids = input_ids.contiguous().to(DType::I64).reshape({M});
    for (int64_t i = 0; i < M; ++i) {
      const int64_t id = ids.data<int64_t>()[i];
      DSV3_CHECK(id >= 0 && id < V, "token id {} at position {} is out of range [0, {})", id, i, V);
    }
    Exec& ex = main;
    std::vector<int64_t> meta(size_t(2 * M));
    std::copy_n(ids.data<int64_t>(), M, meta.begin());
    for (int64_t i = 0; i < M; ++i) meta[size_t(M + i)] = i % T;
    int64_t* dmeta = ex.arena.as<int64_t>(S_META, 2 * M);
    cuda::copy_to_device(dmeta, meta.data(), meta.size() * 8, s());
    RowsInfo r;
    r.M = M, r.B = B, r.T = T, r.ids = dmeta, r.pos64 = dmeta + M;
    ForwardResult out;
    auto host = [&](const float* d, Shape shape) {
      Tensor t = Tensor::empty(DType::F32, std::move(shape));
      cuda::copy_to_host(t.raw(), d, t.nbytes(), s());
      cuda::synchronize(s());
      return t;
    };
    float* h = ex.arena.as<float>(S_H, M * D);
    uint32_t* err = ex.arena.as<uint32_t>(S_ERR, 1);
    cuda::embedding_reset_error(err, s());
    cuda::embedding(DType::I64, r.ids, M, act, embed.get(), V, D, h, D, err, s());
    if (opts.hidden_states) out.hidden_states.push_back(host(h, {B, T, D}));
    for (size_t i = 0; i < layers.size(); ++i) {
      std::vector<int32_t> routing;
      r.routing = opts.routing && layers[i].moe ? &routing : nullptr;
      cuda::add_rows(h, D, layer_fwd(ex, layers[i], h, {}, r, false).d, D, M, D, s());
      if (r.routing) out.routing[int64_t(i)] = routing_tensor(routing, M);
      if (opts.hidden_states && i + 1 < layers.size()) out.hidden_states.push_back(host(h, {B, T, D}));
    }
    r.routing = nullptr;
    float* fin = ex.arena.as<float>(S_FINAL, M * D);
    cuda::rmsnorm_to(h, D, norm.get(), eps, DType::F32, fin, D, M, D, s());
    out.final_hidden = host(fin, {B, T, D});
    if (opts.hidden_states) out.hidden_states.push_back(out.final_hidden);
    {
      int64_t ldx = 0;
      const void* xa = to_act(ex, fin, D, M, D, S_ROWSACT, &ldx);
      float* lg = ex.arena.as<float>(S_LOGIT, M * V);
      lin(ex, head, xa, ldx, lg, V, M);
      out.logits = host(lg, {B, T, V});
    }
    // MTP depth k: position i (< T-k) reads h^{k-1}_i and token i+k.
    const int64_t depth = opts.mtp_depth < 0 ? int64_t(mtp.size()) : std::min<int64_t>(opts.mtp_depth, int64_t(mtp.size()));
    float* h_prev = fin;  // [B·(T-k+1), D]
    for (int64_t k = 1; k <= depth && k < T; ++k) {
      const int64_t n = T - k, Mn = B * n;
      std::vector<int32_t> take(static_cast<size_t>(Mn));
      std::vector<int64_t> m2(size_t(2 * Mn));
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < n; ++i) {
          take[size_t(b * n + i)] = int32_t(b * (n + 1) + i);
          m2[size_t(b * n + i)] = ids.data<int64_t>()[b * T + i + k];
          m2[size_t(Mn + b * n + i)] = i;
        }
      int32_t* dtake = ex.arena.as<int32_t>(S_PERM, Mn);
      cuda::copy_to_device(dtake, take.data(), take.size() * 4, s());
      int64_t* dm2 = ex.arena.as<int64_t>(S_ROWS, 2 * Mn);
      cuda::copy_to_device(dm2, m2.data(), m2.size() * 8, s());
      float* prev = ex.arena.as<float>(S_HPREV, Mn * D);
      cuda::gather_rows(h_prev, D, dtake, Mn, D, DType::F32, prev, D, s());
      RowsInfo rk;
      rk.M = Mn, rk.B = B, rk.T = n, rk.pos64 = dm2 + Mn;
      float* hk = ex.arena.as<float>(S_H, Mn * D);  // the main residual stream is no longer needed
      float* lg = ex.arena.as<float>(S_LOGIT, Mn * V);
      std::vector<int32_t> routing;
      const bool moe_k = opts.routing && mtp[size_t(k - 1)].layer.moe;
      rk.routing = moe_k ? &routing : nullptr;
      mtp_fwd(ex, mtp[size_t(k - 1)], prev, dm2, rk, hk, lg);
      out.mtp_logits.push_back(host(lg, {B, n, V}));
      // keyed by the module's layer index (num_hidden_layers + k - 1), rows (b, i < T - k)
      if (moe_k) out.routing[int64_t(layers.size()) + k - 1] = routing_tensor(routing, Mn);
      float* keep = ex.arena.as<float>(S_FINAL, Mn * D);
      cuda::copy_on_device(keep, hk, size_t(Mn * D) * 4, s());
      h_prev = keep;
    }
    return out;
  }

  // ---------------------------------------------------------------------------------------------------
  // Cached steps
  // ---------------------------------------------------------------------------------------------------
  // Uploads the rows' metadata of a cached pass into `ex` and describes the attention calls.
  // on_device: the metadata buffer holds the step before's, advanced on the device (step-ahead): nothing
  // is copied in.
  RowsInfo cached_rows(Exec& ex, const std::vector<int64_t>& tokens, const Batch& batch, const CudaCache& c, bool bucket,
                       bool on_device = false) const {
    const int64_t M = int64_t(tokens.size()), S = int64_t(batch.seqs.size());
    DSV3_CHECK(M == batch.rows() && M > 0, "step: {} tokens for a batch of {} rows", M, batch.rows());
    for (int64_t i = 0; i < M; ++i)
      DSV3_CHECK(tokens[size_t(i)] >= 0 && tokens[size_t(i)] < V, "token id {} at position {} is out of range [0, {})",
                 tokens[size_t(i)], i, V);
    // int64: ids | pos64; then int32: pos32 | dst rows | block table [S, max_blocks].
    const size_t bytes = size_t(16 * M + 8 * M + 4 * S * c.max_blocks);
    std::vector<uint8_t> h(bytes);
    auto* i64 = reinterpret_cast<int64_t*>(h.data());
    auto* i32 = reinterpret_cast<int32_t*>(h.data() + 16 * M);
    int64_t row = 0;
    RowsInfo r;
    r.M = M, r.cached = true, r.cache = &c;
    bool uniform = true;
    for (int64_t b = 0; b < S; ++b) {
      const Batch::Seq& q = batch.seqs[size_t(b)];
      DSV3_CHECK(q.slot >= 0 && q.slot < c.slots, "step: cache slot {} outside [0, {})", q.slot, c.slots);
      DSV3_CHECK(q.start + q.n <= c.max_tokens, "sequence of {} tokens exceeds the cache ({} tokens)", q.start + q.n, c.max_tokens);
      for (int64_t j = 0; j < c.max_blocks; ++j) i32[2 * M + b * c.max_blocks + j] = int32_t(q.slot * c.max_blocks + j);
      for (int64_t i = 0; i < q.n; ++i, ++row) {
        const int64_t p = q.start + i;
        i64[row] = tokens[size_t(row)];
        i64[M + row] = p;
        i32[row] = int32_t(p);
        i32[M + row] = int32_t(q.slot * c.max_blocks * kBlock + p);
      }
      uniform = uniform && q.n == batch.seqs[0].n;
    }
    auto len_of = [&](int64_t len) {
      if (!bucket) return len;
      int64_t b = 256;
      while (b < len) b *= 2;
      return std::min(b, c.max_blocks * kBlock);
    };
    bool fresh = uniform;
    for (const auto& q : batch.seqs) fresh = fresh && q.start == 0;
    if (fresh && !bucket) {
      r.fresh = true;
      r.B = S, r.T = batch.seqs[0].n;
    }
    if (uniform) {
      int64_t ml = 0;
      for (const auto& q : batch.seqs) ml = std::max(ml, q.start + q.n);
      r.calls.push_back({S, batch.seqs[0].n, 0, 0, len_of(ml)});
    } else {
      int64_t r0 = 0;
      for (int64_t b = 0; b < S; ++b) {
        const Batch::Seq& q = batch.seqs[size_t(b)];
        r.calls.push_back({1, q.n, r0, b, q.start + q.n});
        r0 += q.n;
      }
    }
    uint8_t* d = static_cast<uint8_t*>(ex.arena.get(S_META, bytes));
    if (!on_device) {
      if (pinned_step && bytes <= (size_t(1) << 16)) {  // each buffer reused every other step, once its copy is done
        const int k = meta_turn;
        meta_turn ^= 1;
        if (step_ahead) meta_sent[k].wait();
        else cuda::synchronize(s());
        void* pm = pin_meta[k].get(bytes);
        std::memcpy(pm, h.data(), bytes);
        cuda::copy_to_device(d, pm, bytes, s());
        meta_sent[k].record(s());
      } else {
        cuda::copy_to_device(d, h.data(), bytes, s());
      }
    }
    r.ids = reinterpret_cast<const int64_t*>(d);
    r.pos64 = r.ids + M;
    r.pos32 = reinterpret_cast<const int32_t*>(d + 16 * M);
    r.dst_rows = r.pos32 + M;
    r.table = r.pos32 + 2 * M;
    return r;
  }

  // The body of a main-model step: embedding, layers, final norm into S_FINAL, logits of `out_rows` rows
  // (gathered by the device list `take`, or all rows when take is null) into S_LOGIT.
  void step_body(Exec& ex, const RowsInfo& r, const int32_t* take, int64_t out_rows, bool no_sync) const {
    const int64_t M = r.M;
    float* h = ex.arena.as<float>(S_H, M * D);
    uint32_t* err = ex.arena.as<uint32_t>(S_ERR, 1);
    const bool persistent = no_sync && M == 1 && persist_why.empty() && r.calls.size() == 1 && r.calls[0].s_q == 1 && !r.fresh;
    if (!persistent || !persist_embeds) {
      cuda::embedding_reset_error(err, s());
      cuda::embedding(DType::I64, r.ids, M, act, embed.get(), V, D, h, D, err, s());
    }
    if (persistent) {
      // One new token of one sequence: the whole stack in one persistent kernel (which reads the token's embedding
      // row itself), then the head's GEMV.
      float* fin = ex.arena.as<float>(S_FINAL, D);
      void* xa = ex.arena.get(S_ROWSACT, size_t(D) * dtype_size(act));
      const size_t wsb = cuda::decode_persistent_workspace_bytes(persist_shape, opt.persistent_blocks);
      cuda::PersistentShape sh = persist_shape;
      sh.max_blocks = r.cache->max_blocks;
      cuda::PersistentIO io;
      if (persist_embeds) io.embed = reinterpret_cast<const uint16_t*>(embed.get()), io.ids = r.ids, io.vocab = V;
      io.h = h, io.pos = r.pos64, io.table = r.table, io.dst_row = r.dst_rows, io.rope = rope_table.get();
      io.pool = r.cache->pool.get(), io.pool_layer_bytes = int64_t(r.cache->layer_bytes());
      io.final_norm = norm.get(), io.fin = fin, io.xa = xa;
      float* lg = ex.arena.as<float>(S_LOGIT, out_rows * V);
      // The default build (DSV3_PERSIST_HEAD on) computes the (bf16) head's logits in the kernel, without a GEMV launch after it.
      const bool fold = cuda::decode_persistent_folds_head() && head.type == DType::BF16 && head.N == V && head.K == D;
      if (fold) io.head = reinterpret_cast<const uint16_t*>(head.w.get()), io.logits = lg, io.head_rows = V;
      cuda::decode_persistent(sh, persist_layers.get(), io, persist_bar.get(), ex.arena.get(S_PERSIST, wsb), wsb, s(),
                              opt.persistent_blocks);
      if (!fold) lin(ex, head, xa, D, lg, V, out_rows);
      return;
    }
    Pending pending;  // (a MoE layer's routed sum summed by the next layer's first norm, 2026-12-03)
    for (const LayerW& L : layers) pending = layer_fwd(ex, L, h, pending, r, no_sync, true);
    float* fin = ex.arena.as<float>(S_FINAL, M * D);
    void* xa = ex.arena.get(S_ROWSACT, size_t(std::max(out_rows, M) * D) * dtype_size(act));
    cuda::residual_rmsnorm(h, D, pending.d, D, norm.get(), eps, M, D, fin, D, act, take ? nullptr : xa, D, s(), pending.rows());
    if (take) cuda::gather_rows(fin, D, take, out_rows, D, act, xa, D, s());
    float* lg = ex.arena.as<float>(S_LOGIT, out_rows * V);
    lin(ex, head, xa, D, lg, V, out_rows);
  }

  // One cached step (a replayed graph for decode steps, else launches); its final hidden states are in ex's
  // S_FINAL ([M, D]) and its logits in S_LOGIT ([out_rows, V]), stream-ordered (not yet synchronised).
  struct Ran {
    Exec* ex;
    int64_t M, out_rows;
    bool advanced = false;  // metadata and sampling counters advanced on the device (step-ahead)
    RowsInfo rows;
  };
  // The last draw (enqueue_sampled) advanced its step's metadata and sampling counters to the next step's, for a
  // step enqueued ahead; any other step clears it.
  mutable bool meta_advanced = false;
  // dev_ids (or null): the tokens are these sampled ids on the device (step-ahead), not `tokens`' values.
  Ran run_step(const std::vector<int64_t>& tokens, const Batch& batch, StepCache& sc, bool all_logits,
               const int32_t* dev_ids = nullptr) const {
    if (!dev_ids) ahead.valid = false;  // any other step: the one enqueued ahead no longer follows
    const bool pre_advanced = meta_advanced && dev_ids;
    meta_advanced = false;
    auto* cp = dynamic_cast<CudaCache*>(&sc);
    DSV3_CHECK(cp != nullptr, "internal error: a cache of another device was given to the CUDA model");
    const CudaCache& c = *cp;
    const int64_t M = int64_t(tokens.size()), S = int64_t(batch.seqs.size());
    bool decode = !all_logits && M == S && M <= 64 && opt.graphs;
    for (const LayerW& L : layers) decode = decode && (!L.moe || L.moe->use_table);
    Exec& ex = decode ? dec : main;
    // A step enqueued ahead follows the step just enqueued (same sequences, same metadata layout and buffer, one
    // position on): with device_advance its metadata and Philox counters are that step's, advanced in place.
    const bool advance = dev_ids && device_advance;
    const RowsInfo r = cached_rows(ex, tokens, batch, c, decode, advance);
    if (advance && !pre_advanced) {  // (normally the step before's draw advanced them)
      cuda::decode_meta_advance(dev_ids, const_cast<int64_t*>(r.ids), const_cast<int64_t*>(r.pos64), const_cast<int32_t*>(r.pos32),
                                const_cast<int32_t*>(r.dst_rows), main.arena.as<uint64_t>(S_RNG, 2 * S), M, s());
    } else if (dev_ids) {
      cuda::ids_from_sampled(dev_ids, const_cast<int64_t*>(r.ids), M, s());
    }
    const int64_t out_rows = all_logits ? M : S;
    if (decode) {
      const auto key = std::make_tuple(S, r.calls[0].max_len, static_cast<const void*>(c.pool.get()));
      auto it = graphs.find(key);
      if (it != graphs.end() && dec.arena.grows == dec_grows_at_capture) {
        it->second->launch(s());
        ++replays;
      } else {
        // Warm-up run (plans, scratch), then capture the same body for the next steps of this shape. The graphs go
        // once none runs (a step enqueued ahead may still be).
        cuda::synchronize(s());
        graphs.clear();
        step_body(ex, r, nullptr, out_rows, true);
        cuda::synchronize(s());
        auto g = std::make_unique<cuda::Graph>();
        const int64_t grows = dec.arena.grows;
        g->begin(s());
        try {
          step_body(ex, r, nullptr, out_rows, true);
        } catch (...) {
          try {
            g->end(s());
          } catch (...) {
          }
          throw;
        }
        g->end(s());
        DSV3_CHECK(dec.arena.grows == grows, "internal error: scratch grew while capturing a decode step");
        dec_grows_at_capture = grows;
        graphs.emplace(key, std::move(g));
      }
    } else {
      int32_t* take = nullptr;
      if (!all_logits) {
        std::vector<int32_t> last;
        int64_t rr = 0;
        for (const auto& q : batch.seqs) last.push_back(int32_t((rr += q.n) - 1));
        take = ex.arena.as<int32_t>(S_TAKE, S);  // not S_PERM: the MoE reuses that slot
        cuda::copy_to_device(take, last.data(), last.size() * 4, s());
      }
      if (time_steps) {
        if (!step_timer) step_timer = std::make_unique<cuda::EventTimer>();
        step_timer->start(s());
      }
      step_body(ex, r, take, out_rows, false);
      if (time_steps) last_step_ms = double(step_timer->stop_ms(s()));  // (synchronizes: benchmarking only)
    }
    return {&ex, M, out_rows, advance, r};
  }

  Transformer::Step step(const std::vector<int64_t>& tokens, const Batch& batch, StepCache& sc, bool all_logits) const {
    const Ran run = run_step(tokens, batch, sc, all_logits);
    Exec& ex = *run.ex;
    const int64_t M = run.M, out_rows = run.out_rows;
    Transformer::Step st;
    st.hidden = Tensor::empty(DType::F32, {M, D});
    st.logits = Tensor::empty(DType::F32, {out_rows, V});
    // Small outputs only (a decode step of a few rows): a big one (prefill's hidden states, batch 64's logits) costs
    // more in the extra host memcpy than the staging saves (H200: prefill T 4096 13.7 -> 15.0 ms, batch 64 -6%).
    if (pinned_step && st.hidden.nbytes() + st.logits.nbytes() <= (size_t(1) << 20)) {
      uint8_t* po = static_cast<uint8_t*>(pin_out.get(st.hidden.nbytes() + st.logits.nbytes()));
      cuda::copy_to_host(po, ex.arena.get(S_FINAL, 0), st.hidden.nbytes(), s());
      cuda::copy_to_host(po + st.hidden.nbytes(), ex.arena.get(S_LOGIT, 0), st.logits.nbytes(), s());
      cuda::synchronize(s());
      std::memcpy(st.hidden.raw(), po, st.hidden.nbytes());
      std::memcpy(st.logits.raw(), po + st.hidden.nbytes(), st.logits.nbytes());
      return st;
    }
    cuda::copy_to_host(st.hidden.raw(), ex.arena.get(S_FINAL, 0), st.hidden.nbytes(), s());
    cuda::copy_to_host(st.logits.raw(), ex.arena.get(S_LOGIT, 0), st.logits.nbytes(), s());
    cuda::synchronize(s());
    return st;
  }

  // The penalty-free filters run on the GPU (sample_rows); penalties read the history, which stays on the host.
  static bool device_samples(const SamplingParams& p) {
    return p.repetition_penalty == 1.0f && p.frequency_penalty == 0.0f && p.presence_penalty == 0.0f && p.top_k >= 0 &&
           p.top_p > 0.0f && p.top_p <= 1.0f && p.min_p >= 0.0f && p.min_p <= 1.0f;
  }

  // One sampled step enqueued (the step, its draw, its ids copied out): returns the pin_sample / sample_done turn
  // that holds its ids once sample_done[turn] has passed.
  int enqueue_sampled(const std::vector<int64_t>& tokens, const Batch& batch, StepCache& sc, const SamplingParams& p,
                      const std::vector<uint64_t>& draws, const int32_t* dev_ids) const {
    const Ran run = run_step(tokens, batch, sc, false, dev_ids);
    const int64_t S = run.out_rows;
    // A decode step (one new token per sequence) also advances its metadata to the next step's in the draw, for the
    // step that step_sampled may enqueue ahead (speculative: any other next step uploads its own).
    bool decode_step = step_ahead && device_advance && run.M == S;
    for (const auto& q : batch.seqs) decode_step = decode_step && q.n == 1;
    // Per row (key, counter) for the Philox draw, and the ids back, through a small page-locked buffer (one of two,
    // free once the step that used it before is done). Scratch from `main`, not the decode context: a grown buffer
    // there would invalidate the captured graphs.
    const int k = sample_turn;
    sample_turn ^= 1;
    sample_done[k].wait();
    const size_t rng_bytes = size_t(S) * 16, out_bytes = size_t(S) * 4;
    auto* pb = static_cast<uint8_t*>(pin_sample[k].get(rng_bytes + out_bytes));
    auto* rng_h = reinterpret_cast<uint64_t*>(pb);
    if (!run.advanced) {
      for (int64_t b = 0; b < S; ++b) {
        rng_h[2 * b] = sample_key(p.seed, batch.seqs[size_t(b)].slot);
        rng_h[2 * b + 1] = draws[size_t(b)];
      }
    }
    auto* rng_d = main.arena.as<uint64_t>(S_RNG, 2 * S);
    auto* out_d = main.arena.as<int32_t>(S_SAMPLED, S);
    const size_t ws_bytes = p.greedy() ? 0 : cuda::sample_workspace_bytes(S, V);
    void* ws = ws_bytes ? main.arena.get(S_SAMPLEWS, ws_bytes) : nullptr;
    if (!run.advanced) cuda::copy_to_device(rng_d, rng_h, rng_bytes, s());  // else: the step before's, advanced
    cuda::GpuSampling gp;
    gp.temperature = p.temperature, gp.top_k = p.top_k, gp.top_p = p.top_p, gp.min_p = p.min_p;
    cuda::SampleOutputs also;
    // The ids straight into the page-locked buffer (no copy after the draw: one stream operation less a token).
    also.host = static_cast<int32_t*>(cuda::host_pinned_device_pointer(pb + rng_bytes));
    if (decode_step) {
      also.ids = const_cast<int64_t*>(run.rows.ids), also.pos64 = const_cast<int64_t*>(run.rows.pos64);
      also.pos32 = const_cast<int32_t*>(run.rows.pos32), also.dst_rows = const_cast<int32_t*>(run.rows.dst_rows);
    }
    cuda::sample_rows(static_cast<const float*>(run.ex->arena.get(S_LOGIT, 0)), V, S, V, gp, rng_d, decode_step, out_d, ws, ws_bytes,
                      s(), also);
    meta_advanced = decode_step;
    sample_done[k].record(s());
    return k;
  }

  bool ahead_is(const std::vector<int64_t>& tokens, const Batch& batch, const StepCache& sc, const SamplingParams& p,
                const std::vector<uint64_t>& draws) const {
    const Ahead& a = ahead;
    if (!a.valid || a.cache != &sc || a.tokens != tokens || a.draws != draws || a.seqs.size() != batch.seqs.size()) return false;
    for (size_t i = 0; i < a.seqs.size(); ++i) {
      const Batch::Seq &x = a.seqs[i], &y = batch.seqs[i];
      if (x.slot != y.slot || x.start != y.start || x.n != y.n) return false;
    }
    return a.p.temperature == p.temperature && a.p.top_k == p.top_k && a.p.top_p == p.top_p && a.p.min_p == p.min_p && a.p.seed == p.seed;
  }

  std::vector<int64_t> step_sampled(const std::vector<int64_t>& tokens, const Batch& batch, StepCache& sc, const SamplingParams& p,
                                    const std::vector<uint64_t>& draws) const {
    DSV3_CHECK(device_samples(p), "internal error: these sampling parameters need the host sampler (penalties or bad filters)");
    DSV3_CHECK(draws.size() == batch.seqs.size(), "step_sampled: {} draw counters for {} sequences", draws.size(), batch.seqs.size());
    int turn;
    if (ahead_is(tokens, batch, sc, p, draws)) {  // enqueued by the call before: running, or done
      turn = ahead.turn;
      ahead.valid = false;
    } else {
      turn = enqueue_sampled(tokens, batch, sc, p, draws, nullptr);
    }
    const int64_t S = int64_t(batch.seqs.size());
    // The next decode step, before this one's ids are read: one new token per sequence, room for one more in each.
    const auto* cc = dynamic_cast<const CudaCache*>(&sc);
    bool next = step_ahead && cc && int64_t(tokens.size()) == S;
    std::vector<Batch::Seq> seqs = batch.seqs;
    for (Batch::Seq& q : seqs) {
      next = next && q.n == 1 && q.start + 2 <= cc->max_tokens;
      ++q.start;
    }
    if (next) {
      std::vector<uint64_t> nd = draws;
      for (uint64_t& d : nd) ++d;
      const int32_t* sampled = main.arena.as<int32_t>(S_SAMPLED, S);  // this step's ids, in stream order
      const int nt = enqueue_sampled(std::vector<int64_t>(size_t(S), 0), Batch::cached(seqs), sc, p, nd, sampled);
      ahead.valid = true, ahead.cache = &sc, ahead.seqs = seqs, ahead.draws = nd, ahead.p = p, ahead.turn = nt;
    }
    if (step_ahead) sample_done[turn].wait();
    else cuda::synchronize(s());
    std::vector<int64_t> ids(static_cast<size_t>(S));
    const auto* o = reinterpret_cast<const int32_t*>(static_cast<uint8_t*>(pin_sample[turn].get(size_t(S) * 20)) + size_t(S) * 16);
    for (int64_t b = 0; b < S; ++b) {
      DSV3_CHECK(o[b] >= 0 && o[b] < V, "internal error: the GPU sampler returned token {} (vocabulary {})", o[b], V);
      ids[size_t(b)] = o[b];
    }
    if (next) ahead.tokens = ids;
    return ids;
  }

  Tensor mtp_step(int64_t k, const Tensor& h_prev, const std::vector<int64_t>& ahead, const Batch& batch, StepCache& sc,
                  Tensor* h_out) const {
    DSV3_CHECK(k >= 1 && k <= int64_t(mtp.size()), "the checkpoint has {} MTP modules, depth {} asked", mtp.size(), k);
    this->ahead.valid = false;
    auto* cp = dynamic_cast<CudaCache*>(&sc);
    DSV3_CHECK(cp != nullptr, "internal error: a cache of another device was given to the CUDA model");
    const int64_t M = int64_t(ahead.size());
    DSV3_CHECK(h_prev.ndim() == 2 && h_prev.dim(0) == M && h_prev.dim(1) == D, "mtp_step: h_prev is {}, expected [{}, {}]",
               shape_str(h_prev.shape()), M, D);
    Exec& ex = main;
    const RowsInfo r = cached_rows(ex, ahead, batch, *cp, false);
    const Tensor hp = h_prev.contiguous().to(DType::F32);
    float* prev = ex.arena.as<float>(S_HPREV, M * D);
    cuda::copy_to_device(prev, hp.raw(), hp.nbytes(), s());
    float* h = ex.arena.as<float>(S_H, M * D);
    float* lg = ex.arena.as<float>(S_LOGIT, M * V);
    mtp_fwd(ex, mtp[size_t(k - 1)], prev, r.ids, r, h, lg);
    Tensor logits = Tensor::empty(DType::F32, {M, V});
    cuda::copy_to_host(logits.raw(), lg, logits.nbytes(), s());
    if (h_out) {
      *h_out = Tensor::empty(DType::F32, {M, D});
      cuda::copy_to_host(h_out->raw(), h, h_out->nbytes(), s());
    }
    cuda::synchronize(s());
    return logits;
  }
};

// -------------------------------------------------------------------------------------------------------
// CudaModel
// -------------------------------------------------------------------------------------------------------

CudaModel::CudaModel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaModel::~CudaModel() = default;

std::unique_ptr<CudaModel> CudaModel::load(const Transformer& host, const CudaModelOptions& opts) {
  cuda::require_device();
  const auto t0 = std::chrono::steady_clock::now();
  auto impl = std::make_unique<Impl>();
  impl->cfg = host.config();
  impl->opt = opts;
  impl->load(host);
  if (opts.verbose) {
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const cuda::DeviceInfo d = cuda::device_info();
    std::fprintf(stderr, "cuda: %s, %s of weights (%s) uploaded in %.1f s\n", d.name.c_str(), gib(double(impl->weight_bytes)).c_str(),
                 dtype_name(impl->act), sec);
    std::fprintf(stderr, "cuda: batch-1 decode as one persistent kernel: %s\n",
                 impl->persist_why.empty() ? "yes" : ("no (" + impl->persist_why + ")").c_str());
  }
  return std::unique_ptr<CudaModel>(new CudaModel(std::move(impl)));
}

ForwardResult CudaModel::forward(const Tensor& ids, const ForwardOptions& o) const { return impl_->forward(ids, o); }
bool CudaModel::can_sample_on_device(const SamplingParams& p) const { return Impl::device_samples(p); }
std::vector<int64_t> CudaModel::step_sampled(const std::vector<int64_t>& tokens, const Batch& batch, StepCache& cache,
                                             const SamplingParams& p, const std::vector<uint64_t>& draws) const {
  return impl_->step_sampled(tokens, batch, cache, p, draws);
}
const ModelConfig& CudaModel::config() const { return impl_->cfg; }
int64_t CudaModel::mtp_layers() const { return int64_t(impl_->mtp.size()); }
int64_t CudaModel::weight_bytes() const { return impl_->weight_bytes; }
int64_t CudaModel::decode_bytes_per_token() const { return impl_->decode_bytes; }
DType CudaModel::dtype() const { return impl_->act; }
int64_t CudaModel::graph_replays() const { return impl_->replays; }
std::string CudaModel::persistent_decode_unavailable() const { return impl_->persist_why; }

double CudaModel::time_last_graph_ms(int reps) const {
  const Impl& m = *impl_;
  if (m.graphs.empty() || reps <= 0) return -1.0;
  const cuda::Graph& g = *m.graphs.begin()->second;
  g.launch(m.s());
  cuda::EventTimer t;
  t.start(m.s());
  for (int i = 0; i < reps; ++i) g.launch(m.s());
  return double(t.stop_ms(m.s())) / reps;
}

void CudaModel::time_steps(bool on) { impl_->time_steps = on; }
double CudaModel::last_step_gpu_ms() const { return impl_->last_step_ms; }

std::unique_ptr<StepCache> CudaModel::make_cache(int64_t slots, int64_t max_tokens) const {
  const Impl& m = *impl_;
  DSV3_CHECK(slots >= 1 && max_tokens >= 1, "cache of {} slots x {} tokens", slots, max_tokens);
  auto c = std::make_unique<CudaCache>();
  c->slots = slots, c->max_tokens = max_tokens, c->max_blocks = cuda::ceil_div(max_tokens, kBlock);
  c->layers = int64_t(m.layers.size() + m.mtp.size()), c->W = m.W, c->type = m.act;
  const size_t bytes = c->layer_bytes() * size_t(c->layers);
  size_t free_b = 0, total_b = 0;
  cuda::memory_info(&free_b, &total_b);
  DSV3_CHECK(double(bytes) < 0.9 * double(free_b), "the latent cache does not fit on the GPU: {} slots x {} tokens need {}, {} free",
             slots, max_tokens, gib(double(bytes)), gib(double(free_b)));
  c->pool = DBuf<uint8_t>(bytes);
  return c;
}

Transformer::Step CudaModel::step(const std::vector<int64_t>& tokens, const Batch& batch, StepCache& cache, bool all_logits) const {
  return impl_->step(tokens, batch, cache, all_logits);
}

Tensor CudaModel::mtp_step(int64_t k, const Tensor& h_prev, const std::vector<int64_t>& ahead, const Batch& batch, StepCache& cache,
                           Tensor* h_out) const {
  return impl_->mtp_step(k, h_prev, ahead, batch, cache, h_out);
}

}  // namespace dsv3
#endif  // DSV3_HAVE_CUDA
