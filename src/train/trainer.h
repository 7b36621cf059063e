// `dsv3 train`: a DeepSeek-V3-architecture model from token shards, with every training-side mechanism of
// the report — AdamW on float32 masters, warmup/constant/cosine LR, global-norm clipping, the
// auxiliary-loss-free bias update and the sequence-wise balance loss (§2.3.3), MTP (§2.2) — plus atomic
// checkpoints that resume bit-exactly, JSONL metrics and a loss plot.
#pragma once
#include <cstdint>
#include <string>

#include "train/optimizer.h"

namespace dsv3::train {

struct TrainOptions {
  std::string config;     // config.json of a new model (ignored on --resume: the checkpoint's is used)
  std::string data;       // folder with train.bin / val.bin (dsv3 data prepare)
  std::string tokenizer;  // copied into every checkpoint (optional)
  std::string out;        // out/checkpoint, out/metrics.jsonl, out/loss.png
  int64_t steps = 1000, batch = 16, seq_len = 128;
  double lr = 2e-3, min_lr = 2e-4, decay_start = 0.5;  // decay_start: fraction of steps at constant LR
  int64_t warmup = 50;
  AdamWConfig adam;
  double clip = 1.0;
  float bias_gamma = 1e-3f;     // γ of the bias update (0: off)
  float balance_alpha = 1e-4f;  // α of the sequence-wise balance loss (0: off)
  bool recompute = false;       // recompute MLA's norms and up-projections in backward (memory for time)
  float mtp_lambda = 0.3f;
  int64_t eval_every = 100, eval_tokens = 32768, save_every = 200, log_every = 10;
  uint64_t seed = 1;
  bool resume = false;
  int64_t stop_after = 0;  // stop (with a checkpoint) after this step, as if interrupted; 0: run to --steps
  bool plot = true;
  bool quiet = false;
};

struct TrainResult {
  int64_t steps = 0;
  double train_loss = 0, val_loss = 0, val_bpb = 0, tokens_per_s = 0;
};

TrainResult train(const TrainOptions& opts);

// The batch of step `step`: chunks of seq_len tokens at stride seq_len-1 (every token is a target once per
// epoch), visited in a per-epoch permutation derived from the seed alone, so the data position is a
// function of (seed, step) and resuming needs no stored RNG stream.
std::vector<int64_t> batch_chunks(uint64_t seed, int64_t step, int64_t batch, int64_t n_chunks);

}  // namespace dsv3::train
