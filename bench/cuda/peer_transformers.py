"""The PyTorch + transformers peer on the same checkpoint as bench_cuda_decode: greedy decode tokens/s on the GPU.

    python3 bench/cuda/peer_transformers.py CHECKPOINT_DIR [--batch B] [--context C] [--tokens N]

CHECKPOINT_DIR is a bf16 checkpoint in the official layout (bench_cuda_decode --dir writes one with random weights).
Decode rate = (N - 1) new tokens / (time of generate(N) - time of generate(1)) for B sequences of C random prompt
tokens, so the prompt's prefill is not counted, as bench_cuda_decode counts it.
"""
import argparse
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(a.dir, dtype=torch.bfloat16).cuda().eval()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (a.batch, a.context), generator=g).cuda()
    mask = torch.ones_like(ids)

    def run(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0)
        torch.cuda.synchronize()
        assert out.shape[1] == a.context + n, out.shape
        return time.perf_counter() - t0

    run(4)  # warm-up
    t1 = min(run(1) for _ in range(2))
    tn = run(a.tokens)
    rate = a.batch * (a.tokens - 1) / (tn - t1)
    print(f"| transformers {__import__('transformers').__version__} + torch {torch.__version__}, batch-{a.batch} decode "
          f"(context {a.context}, {a.tokens} tokens) | {rate:.1f} tokens/s |")


if __name__ == "__main__":
    main()
