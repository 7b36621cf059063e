// dsv3 train: train a DeepSeek-V3-architecture model on token shards (see src/train/trainer.h).
#include <cmath>

#include "train/trainer.h"
#include "tools/commands.h"

namespace dsv3::cli {

void add_train(CLI::App& app, Command& run) {
  auto o = std::make_shared<train::TrainOptions>();
  CLI::App* sub = app.add_subcommand("train", "Train a DeepSeek-V3-architecture model on token shards (dsv3 data prepare)");
  sub->add_option("--config", o->config, "config.json of the model (deepseek_v3 schema); not needed with --resume");
  sub->add_option("--data", o->data, "Folder with train.bin and val.bin")->required();
  sub->add_option("--tokenizer", o->tokenizer, "tokenizer.json to copy into the checkpoints")->check(CLI::ExistingFile);
  sub->add_option("--out", o->out, "Output folder: checkpoint/, metrics.jsonl, loss.png")->required();
  sub->add_option("--steps", o->steps, "Optimizer steps")->capture_default_str();
  sub->add_option("--batch", o->batch, "Sequences per step")->capture_default_str();
  sub->add_option("--seq-len", o->seq_len, "Tokens per sequence")->capture_default_str();
  sub->add_option("--lr", o->lr, "Peak learning rate")->capture_default_str();
  sub->add_option("--min-lr", o->min_lr, "Learning rate at the end of the cosine decay")->capture_default_str();
  sub->add_option("--warmup", o->warmup, "Linear warmup steps")->capture_default_str();
  sub->add_option("--decay-start", o->decay_start, "Fraction of the steps after which the cosine decay starts")->capture_default_str();
  sub->add_option("--beta1", o->adam.beta1, "AdamW β1")->capture_default_str();
  sub->add_option("--beta2", o->adam.beta2, "AdamW β2")->capture_default_str();
  sub->add_option("--weight-decay", o->adam.weight_decay, "AdamW decoupled weight decay (matrices only)")->capture_default_str();
  sub->add_flag("--bf16-moments", o->adam.bf16_moments, "Keep AdamW moments in BF16 (the report's memory saving)");
  sub->add_option("--clip", o->clip, "Global gradient-norm clipping (0: off)")->capture_default_str();
  sub->add_option("--bias-gamma", o->bias_gamma, "γ of the auxiliary-loss-free bias update (0: off)")->capture_default_str();
  sub->add_option("--balance-alpha", o->balance_alpha, "α of the sequence-wise balance loss (0: off)")->capture_default_str();
  sub->add_flag("--recompute", o->recompute, "Recompute MLA's RMSNorms and up-projections in backward instead of keeping them");
  sub->add_option("--mtp-lambda", o->mtp_lambda, "λ, weight of the MTP loss")->capture_default_str();
  sub->add_option("--eval-every", o->eval_every, "Steps between validation evaluations")->capture_default_str();
  sub->add_option("--eval-tokens", o->eval_tokens, "Validation tokens per evaluation (the last one uses all)")->capture_default_str();
  sub->add_option("--save-every", o->save_every, "Steps between checkpoints")->capture_default_str();
  sub->add_option("--log-every", o->log_every, "Steps between status lines")->capture_default_str();
  sub->add_option("--seed", o->seed, "Seed of the initial weights and the data order")->capture_default_str();
  sub->add_flag("--resume", o->resume, "Continue from OUT/checkpoint (bit-exact)");
  sub->add_option("--stop-after", o->stop_after, "Stop with a checkpoint after this step (the schedule still spans --steps)");
  sub->add_flag("--no-plot", [o](int64_t) { o->plot = false; }, "Do not write loss.png");
  sub->add_flag("--quiet", o->quiet, "No progress lines");
  sub->callback([o, &run] {
    run = [o] {
      DSV3_CHECK(o->resume || !o->config.empty(), "--config is required unless --resume is given");
      train::train(*o);
      return 0;
    };
  });
}

}  // namespace dsv3::cli
