#!/usr/bin/python3
"""Training throughput of the PyTorch peer (bench/torch/dsv3_torch.py), comparable with bench/bench_train.cpp:
same config, batch, sequence length, losses (CE + 0.3 MTP CE + sequence-wise balance loss, alpha 1e-4),
AdamW (beta 0.9/0.95, wd 0.1 on matrices, lr 1e-3), grad-norm clipping 1.0, a fresh random batch per step,
one warm-up step, and the same FLOP count (3 x forward FLOPs of the main model + MTP modules, from
src/model/stats.cpp). Usage: /usr/bin/python3 bench/torch/train_bench.py [config.json] [batch] [seq_len] [steps]

Debian's OpenBLAS 0.3.21 (which torch's matmuls go through) misdetects some current Xeons as "Prescott"
(SSE3 kernels, ~4x slower sgemm); like our binary, this script then sets OPENBLAS_CORETYPE (SkylakeX on
AVX-512 CPUs, Haswell on AVX2) and re-executes itself, unless OPENBLAS_CORETYPE is already set.
"""
import os
import sys


def _fix_openblas_core():
    if "OPENBLAS_CORETYPE" in os.environ:
        return
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return
    core = "SkylakeX" if {"avx512f", "avx512bw"} <= set(flags) else "Haswell" if {"avx2", "fma"} <= set(flags) else None
    if core:
        os.environ["OPENBLAS_CORETYPE"] = core
        os.execv(sys.executable, [sys.executable] + sys.argv)


_fix_openblas_core()  # before torch (and with it OpenBLAS) is loaded

import ctypes  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dsv3_torch import Config, DeepseekV3, count_params  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- src/model/stats.cpp, reimplemented -------------------------------------------------------------------
def _layer_params(c, moe):
    H, nh, dqk = c.hidden_size, c.num_attention_heads, c.qk_head_dim
    attn = H * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * nh * dqk if c.q_lora_rank > 0 else H * nh * dqk
    attn += H * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank + c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim)
    attn += nh * c.v_head_dim * H
    norms = 2 * H
    if not moe:
        t = attn + norms + 3 * H * c.intermediate_size
        return t, t
    expert = 3 * H * c.moe_intermediate_size
    shared, gate = c.n_shared_experts * expert, c.n_routed_experts * H
    return (attn + norms + gate + shared + c.n_routed_experts * expert,
            attn + norms + gate + shared + c.num_experts_per_tok * expert)


def model_stats(c, num_hidden_layers=None, first_k_dense_replace=None):
    """(params_main, params_mtp, active_main) as ModelStats, optionally with the layer counts overridden."""
    L = c.num_hidden_layers if num_hidden_layers is None else num_hidden_layers
    K = c.first_k_dense_replace if first_k_dense_replace is None else first_k_dense_replace
    H, V = c.hidden_size, c.vocab_size
    head = 0 if c.tie_word_embeddings else V * H
    params = active = V * H + head + H
    for l in range(L):
        t, a = _layer_params(c, l >= K)
        params, active = params + t, active + a
    mtp = sum(2 * H + 2 * H * H + H + _layer_params(c, L + k >= K)[0] for k in range(c.num_nextn_predict_layers))
    return params, mtp, active


def forward_flops_per_token(c, T, num_hidden_layers=None, first_k_dense_replace=None):
    L = c.num_hidden_layers if num_hidden_layers is None else num_hidden_layers
    _, _, active = model_stats(c, L, first_k_dense_replace)
    matmul = active - c.vocab_size * c.hidden_size - c.hidden_size
    for _ in range(L):
        matmul -= 2 * c.hidden_size + c.kv_lora_rank + (c.q_lora_rank if c.q_lora_rank > 0 else 0)
    attn = L * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * (T + 1) / 2.0
    return 2.0 * (matmul + attn)


def step_flops(c, B, T):
    """bench_train.cpp: 3 x (main model + each MTP module as one MoE layer + eh_proj + the head) x B*T."""
    mtp = forward_flops_per_token(c, T, 1, 0) + 2.0 * 2.0 * c.hidden_size * c.hidden_size
    return 3.0 * (forward_flops_per_token(c, T) + c.num_nextn_predict_layers * mtp) * B * T


# ---- the benchmark ----------------------------------------------------------------------------------------
def blas_core():
    try:
        lib = ctypes.CDLL("libopenblas.so.0")
        lib.openblas_get_corename.restype = ctypes.c_char_p
        return "OpenBLAS " + lib.openblas_get_corename().decode()
    except (OSError, AttributeError):
        return "unknown (not OpenBLAS)"


def sgemm_gflops(n=2048):
    a, b = torch.full((n, n), 0.5), torch.full((n, n), 0.25)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b.t())
        best = max(best, 2.0 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def make_optimizer(model, lr=1e-3):
    decay = [p for p in model.parameters() if p.ndim >= 2]  # as ours: weight decay on matrices, not norm gains
    other = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


def train_step(model, opt, ids):
    opt.zero_grad(set_to_none=True)
    loss, main, mtp = model.loss(ids, mtp_lambda=0.3, balance_alpha=1e-4)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item(), main.item(), mtp.item()


def main():
    config = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "configs/kjv.json")
    B = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    T = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 6
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(1)
    cfg = Config(config)
    model = DeepseekV3(cfg)
    opt = make_optimizer(model)
    flops = step_flops(cfg, B, T)
    times = []
    for s in range(steps + 1):
        ids = torch.randint(0, cfg.vocab_size, (B, T))
        t0 = time.perf_counter()
        train_step(model, opt, ids)
        if s > 0:  # step 0 warms up allocations
            times.append(time.perf_counter() - t0)
    peak = sgemm_gflops()
    mean, best = sum(times) / len(times), min(times)
    p_main, p_mtp, active = model_stats(cfg)
    print(f"torch {torch.__version__} threads {torch.get_num_threads()} | BLAS {blas_core()} | {config} | "
          f"{count_params(model) / 1e6:.1f}M params (stats: {(p_main + p_mtp) / 1e6:.1f}M, {active / 1e6:.1f}M active/token) "
          f"+ MTP {cfg.num_nextn_predict_layers} | batch {B} x {T}")
    print(f"train step: mean {mean:.3f} s (best {best:.3f} s)  {B * T / mean:.0f} tokens/s  {flops / mean / 1e9:.1f} GFLOP/s"
          f" | torch.mm 2048^3: {peak:.1f} GFLOP/s | ratio {100 * flops / mean / 1e9 / peak:.1f}%")
    print("step times (s): " + " ".join(f"{t:.3f}" for t in times))


if __name__ == "__main__":
    main()
