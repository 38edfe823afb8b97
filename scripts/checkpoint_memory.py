"""Activation memory of N Mamba2 layers with and without non-reentrant activation checkpointing, on one GPU.

    python3 scripts/checkpoint_memory.py [--layers 4] [--seq 8192] [--cp 1 2]

For each cp (cp > 1: hidden CP in one-GPU projection, ``LocalGroup``: rank 0's real shapes and kernels, the
collectives local copies) and each mode, a stack of ``--layers`` layers with residuals runs forward and
backward at the Nemotron-H shape (d_model 4096, 128 heads x 64, 8 groups, d_state 128, bf16):

* ``held_MiB``: memory allocated after the forward, less the input: what the graph keeps for backward;
* ``peak_MiB``: the peak of forward + backward above the memory before the forward;
* ``input_MiB``: one layer's input ``[B, L/cp, d_model]``: what checkpointing should keep per layer.

Checkpointed, a layer keeps its input only (``held_MiB`` about ``layers x input_MiB``); the layer core's
``y``, norm statistics and head-sharded conv input go through the saved-tensor hooks and are recomputed.
Writes ``$OUT/checkpoint_memory.csv`` and ``.json`` (default ``results/checkpoint_memory``) and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from cp_core.comm import LocalGroup
from cp_core.mixer import Mamba2Config, Mamba2Mixer

NEMOTRON_H = Mamba2Config(d_model=4096, n_heads=128, head_dim=64, n_groups=8, d_state=128, chunk_size=128)
MiB = 2**20


def measure(cp: int, n_layers: int, seq: int, ckpt: bool) -> dict:
    torch.cuda.empty_cache()
    group = None if cp == 1 else LocalGroup(0, cp)
    layers = [
        Mamba2Mixer(NEMOTRON_H, cp_group=group, device="cuda", dtype=torch.bfloat16) for _ in range(n_layers)
    ]
    x = torch.randn(1, seq // cp, NEMOTRON_H.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def run():
        h = x
        for m in layers:
            y = checkpoint(m, h, use_reentrant=False) if ckpt else m(h)
            h = y + h
        return h

    for _ in range(2):  # warm-up: Triton autotuning, plans, the allocator's pools
        run().float().sum().backward()
    x.grad = None
    for m in layers:
        m.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = run()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base - out.numel() * out.element_size()
    out.float().sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return {
        "cp": cp,
        "layers": n_layers,
        "seq_len": seq,
        "mode": "checkpointed" if ckpt else "plain",
        "held_MiB": round(held / MiB, 1),
        "peak_MiB": round(peak / MiB, 1),
        "input_MiB": round(x.numel() * x.element_size() / MiB, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    rows = [measure(cp, a.layers, a.seq, ckpt) for cp in a.cp for ckpt in (False, True)]
    out = Path(os.environ.get("OUT", "results/checkpoint_memory"))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "checkpoint_memory.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "config": repr(NEMOTRON_H)}
    (out / "checkpoint_memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(
        f"{meta['gpu']}, {a.layers} layers, L {a.seq}, bf16, Nemotron-H layer; MiB above the pre-forward memory"
    )
    print(f"{'cp':>3} {'mode':>13} {'held':>9} {'peak':>9} {'input/layer':>12} {'held/layer/input':>17}")
    for r in rows:
        ratio = r["held_MiB"] / r["layers"] / r["input_MiB"]
        print(
            f"{r['cp']:>3} {r['mode']:>13} {r['held_MiB']:>9.1f} {r['peak_MiB']:>9.1f} {r['input_MiB']:>12.1f} "
            f"{ratio:>17.2f}"
        )


if __name__ == "__main__":
    main()
