// The whole model: tokens → embedding → decoder layers (MLA + dense FFN or MoE) → norm → head, with the
// MTP modules branching off the final hidden state.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/config.h"
#include "io/safetensors.h"
#include "model/modules.h"

namespace dsv3 {

struct ForwardOptions {
  bool hidden_states = false;  // keep every hidden_states.{i} (0 = embeddings, last = after the final norm)
  bool routing = false;        // keep the chosen experts of every MoE layer
  int mtp_depth = -1;          // MTP modules to run: -1 = all the checkpoint has, 0 = none
};

struct ForwardResult {
  Tensor logits;                       // [B, T, V]
  Tensor final_hidden;                 // [B, T, H] after the final RMSNorm
  std::vector<Tensor> hidden_states;   // [B, T, H] each, when asked
  std::map<int64_t, Tensor> routing;   // layer -> [B·T, top_k] int64, sorted ascending, when asked (the CUDA model
                                       // adds its MTP modules': layer num_hidden_layers + k - 1, [B·(T-k), top_k])
  std::vector<Tensor> mtp_logits;      // depth k (1-based) at [k-1]: [B, T-k, V]
};

class Transformer {
 public:
  Transformer() = default;
  Transformer(const Transformer&) = delete;
  // Loads config.json and the safetensors of a checkpoint folder (official layout; bf16 or fp8 weights).
  static std::unique_ptr<Transformer> load(const std::string& dir);
  const ModelConfig& config() const { return cfg_; }
  const io::Checkpoint& checkpoint() const { return ckpt_; }
  int64_t mtp_layers() const { return int64_t(mtp_.size()); }

  // input_ids: [B, T] int64 or int32.
  ForwardResult forward(const Tensor& input_ids, const ForwardOptions& opts = {}) const;

  // Incremental forward over the latent cache: `tokens` are the new tokens of the sequences in
  // batch.seqs, concatenated; their latents are appended to the cache slots. Returns the hidden states
  // after the final norm [rows, D] (the MTP input) and logits: for every row if all_logits, else for the
  // last new row of each sequence [seqs, V].
  struct Step {
    Tensor hidden, logits;
  };
  Step step(const std::vector<int64_t>& tokens, const Batch& batch, LatentCache& cache, bool all_logits = false) const;
  // MTP depth k (1-based) over the cache: h_prev [rows, D] from depth k-1 (depth 0: Step::hidden) and the
  // tokens one ahead of each row. Returns logits [rows, V] and the module's output in *h_out.
  // Training: L = L_main + λ/D · Σ_k L_mtp_k (§2.2) on input_ids [B, T] (the next tokens are the targets);
  // gradients of every trainable tensor accumulate into g, keyed by official name. The MTP modules' embedding
  // and output head are the main model's (shared, §2.2), so their gradients land there.
  struct LossOptions {
    float mtp_lambda = 0.3f;     // λ of the MTP loss (the report: 0.3, later 0.1)
    float balance_alpha = 0.0f;  // α of the sequence-wise balance loss (0: off)
    bool recompute = false;      // recompute MLA's norms and up-projections in backward (Mla::Ctx::recompute)
  };
  struct Losses {
    double loss = 0, mtp_loss = 0;  // main and mean-over-depths MTP cross-entropy
    double balance_loss = 0;        // summed over MoE layers (MTP modules' included)
    std::map<int64_t, std::vector<int64_t>> expert_load;  // layer index -> tokens per routed expert
  };
  Losses loss_and_grads(const Tensor& input_ids, const LossOptions& opts, Grads& g) const;
  Losses loss_and_grads(const Tensor& input_ids, float mtp_lambda, Grads& g) const {
    return loss_and_grads(input_ids, LossOptions{mtp_lambda, 0.0f, false}, g);
  }

  // Every parameter and buffer, main model first, then the MTP modules.
  void visit(const ParamVisitor& v);
  // Training: replace every weight by an owned float32 master copy (fp8 blocks dequantised), biases too,
  // and tie the MTP modules' embedding and head to the main model's.
  void make_trainable();
  // Writes the checkpoint in the official layout (config.json + model.safetensors; `dtype` F32 or BF16,
  // biases F32; MTP layers carry copies of embed_tokens and shared_head.head as the official release does).
  // Atomic: written to a temporary folder, then renamed over `dir`.
  void save(const std::string& dir, DType dtype) const;
  // The same files, written into an existing folder (for callers that add their own files atomically).
  void write_files(const std::string& dir, DType dtype) const;

  Tensor mtp_step(int64_t k, const Tensor& h_prev, const std::vector<int64_t>& ahead, const Batch& batch, LatentCache& cache,
                  Tensor* h_out = nullptr) const;

 private:
  ModelConfig cfg_;
  io::Checkpoint ckpt_;
  Tensor embed_tokens_, norm_;
  ops::Weight lm_head_;
  std::vector<DecoderLayer> layers_;
  std::vector<MtpModule> mtp_;
};

}  // namespace dsv3
