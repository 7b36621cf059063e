#!/usr/bin/python3
"""Sanity checks of the PyTorch peer.
  check_train.py [config.json] [steps]: its parameter count equals src/model/stats.cpp's (as `dsv3 info`
      prints), and it trains (the main CE falls by > 1 nat over 20 AdamW steps on one repeated small batch).
  check_train.py --compare DSV3_BINARY [config.json]: same weights, same tokens: the loss, MTP loss and every
      gradient of the torch model against `dsv3 grad` (the checkpoint comes from one `dsv3 train` step on
      random tokens, so the e_score_correction_bias is non-zero); relative L2 error per tensor.
Run with /usr/bin/python3 (Debian's python3-torch)."""
import json
import os
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

from dsv3_torch import Config, DeepseekV3, count_params, official_name  # noqa: E402
from train_bench import ROOT, make_optimizer, model_stats, train_step  # noqa: E402


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    dtypes = {"F32": torch.float32, "I64": torch.int64, "I32": torch.int32}
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        b, e = h["data_offsets"]
        out[name] = torch.frombuffer(bytearray(data[b:e]), dtype=dtypes[h["dtype"]]).reshape(h["shape"])
    return out


def write_safetensors(path, tensors):
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.int64: "I64"}[t.dtype], "shape": list(t.shape),
                        "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def compare(dsv3, config):
    cfg = Config(config)
    with tempfile.TemporaryDirectory() as tmp:
        for split in ("train", "val"):
            toks = torch.randint(0, cfg.vocab_size, (20000,), generator=torch.Generator().manual_seed(7))
            with open(os.path.join(tmp, split + ".bin"), "wb") as f:
                f.write(b"DSV3TOK1" + struct.pack("<IIQQ", 1, cfg.vocab_size, len(toks), 3 * len(toks)))
                f.write(toks.to(torch.int32).numpy().tobytes())
        subprocess.run([dsv3, "train", "--config", config, "--data", tmp, "--out", tmp + "/out", "--steps", "1",
                        "--batch", "2", "--seq-len", "32", "--eval-tokens", "64", "--no-plot", "--quiet"], check=True)
        ckpt = tmp + "/out/checkpoint"
        weights = read_safetensors(ckpt + "/model.safetensors")
        ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(3))
        write_safetensors(tmp + "/ids.safetensors", {"input_ids": ids})
        subprocess.run([dsv3, "grad", "--model", ckpt, "--input", tmp + "/ids.safetensors", "--output",
                        tmp + "/grads.safetensors", "--mtp-lambda", "0.3"], check=True)
        ours = read_safetensors(tmp + "/grads.safetensors")
    model = DeepseekV3(cfg)
    state = {n: weights[official_name(cfg, n)] for n in model.state_dict()}
    model.load_state_dict(state)
    loss, main, mtp = model.loss(ids, mtp_lambda=0.3, balance_alpha=0.0)
    loss.backward()

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))

    worst, bad = 0.0, []
    print(f"loss: torch {main.item():.6f} ours {ours['loss'].item():.6f} | mtp_loss: torch {mtp.item():.6f} ours {ours['mtp_loss'].item():.6f}")
    for n, p in model.named_parameters():
        key = "grad." + official_name(cfg, n)
        if p.grad is None:  # an expert no token chose: ours has no gradient or a zero one
            err = 0.0 if key not in ours else float(ours[key].abs().max())
        else:
            err = rel(p.grad, ours[key])
        worst = max(worst, err)
        if err > 1e-4:
            bad.append((key, err))
    for key, err in bad:
        print(f"  {key}: rel L2 {err:.2e}")
    ok = not bad and abs(main.item() - ours["loss"].item()) < 1e-4 and abs(mtp.item() - ours["mtp_loss"].item()) < 1e-4
    print(f"{sum(1 for _ in model.parameters())} gradients, worst rel L2 {worst:.2e} -> {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def main():
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    if len(sys.argv) > 2 and sys.argv[1] == "--compare":
        return compare(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else os.path.join(ROOT, "configs/kjv.json"))
    config = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "configs/kjv.json")
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    torch.manual_seed(1)
    cfg = Config(config)
    model = DeepseekV3(cfg)
    p_main, p_mtp, _ = model_stats(cfg)
    n = count_params(model)
    print(f"parameters: torch {n} | stats.cpp {p_main} main + {p_mtp} MTP = {p_main + p_mtp} -> {'OK' if n == p_main + p_mtp else 'MISMATCH'}")
    opt = make_optimizer(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    first = last = None
    for s in range(steps):
        loss, main, mtp = train_step(model, opt, ids)
        first = main if first is None else first
        last = main
        print(f"step {s:2d}  loss {loss:.4f}  CE {main:.4f}  MTP CE {mtp:.4f}")
    ok = n == p_main + p_mtp and last < first - 1.0
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
