"""``torch.compile`` against eager mode at the Nemotron-H layer shape, forward + backward, on one GPU.

    MAMBA_DETERMINISTIC=1 python3 scripts/compile_bench.py [--seq 16384] [--iters 20]

d_model 4096, 128 heads x 64, 8 groups, d_state 128, bf16 parameters, ``B=1``. Cases:

* ``layer``: the Mamba2 layer alone (cp 1);
* ``block``: RMSNorm + the layer + residual, as it sits in a model (what the compiler can fuse around the op);
* ``layer_cp2``: hidden CP at cp 2 in one-GPU projection (``LocalGroup``: rank 0's shapes and kernels, its
  collectives local copies, head chunks on a second stream);
* ``layer_amp``: fp32 parameters under bf16 autocast (the casts are traced and fused).

Each case: eager and ``torch.compile`` (Inductor), the same weights and input; the first calls (compilation,
Triton autotuning) excluded, then the median of ``--iters`` timed forward + backward calls with CUDA events
(min and max beside it), interleaved eager / compiled per iteration so that clock drift hits both. Also
the largest relative difference of the compiled output and gradients from eager (0 for the layer cases). Writes ``$OUT/compile_bench.csv`` / ``.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from cp_core.comm import LocalGroup
from cp_core.mixer import Mamba2Config, Mamba2Mixer

NEMOTRON_H = Mamba2Config(d_model=4096, n_heads=128, head_dim=64, n_groups=8, d_state=128, chunk_size=128)


class Block(nn.Module):
    def __init__(self, mixer):
        super().__init__()
        self.norm, self.mixer = nn.RMSNorm(NEMOTRON_H.d_model, device="cuda", dtype=mixer.D.dtype), mixer

    def forward(self, x):
        return self.mixer(self.norm(x)) + x


def build(case: str) -> tuple[nn.Module, torch.dtype | None]:
    group = LocalGroup(0, 2) if case == "layer_cp2" else None
    dtype = torch.float32 if case == "layer_amp" else torch.bfloat16
    m = Mamba2Mixer(NEMOTRON_H, cp_group=group, device="cuda", dtype=dtype)
    m.reset_parameters(torch.Generator().manual_seed(0))
    return (Block(m) if case == "block" else m), (torch.bfloat16 if case == "layer_amp" else None)


def step(fn, x, amp):
    with torch.autocast("cuda", dtype=amp or torch.bfloat16, enabled=amp is not None):
        y = fn(x)
    y.backward(torch.ones_like(y))
    return y


def bench(case: str, seq: int, iters: int) -> dict:
    torch._dynamo.reset()
    mod, amp = build(case)
    cp = 2 if case == "layer_cp2" else 1
    x = torch.randn(1, seq // cp, NEMOTRON_H.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    comp = torch.compile(mod)
    t0 = time.perf_counter()
    outs = {}
    for name, fn in (("eager", mod), ("compiled", comp)):  # first calls: autotuning, compilation
        for _ in range(3):
            mod.zero_grad(set_to_none=True)
            x.grad = None
            y = step(fn, x, amp)
        outs[name] = [y.detach(), x.grad] + [p.grad for p in mod.parameters()]
    warm_s = time.perf_counter() - t0
    # the layer cases run the same code compiled and eager (equal to the bit); in "block" the compiler fuses
    # the RMSNorm and the residual (their own rounding)
    diff = max(
        float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
        for a, b in zip(outs["eager"], outs["compiled"], strict=True)
    )
    times = {"eager": [], "compiled": []}
    for _ in range(iters):
        for name, fn in (("eager", mod), ("compiled", comp)):
            mod.zero_grad(set_to_none=True)
            x.grad = None
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(fn, x, amp)
            b.record()
            b.synchronize()
            times[name].append(a.elapsed_time(b))
    e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return {
        "case": case,
        "seq_len": seq,
        "eager_ms": round(e, 3),
        "compiled_ms": round(c, 3),
        "compiled_over_eager": round(c / e, 4),
        "eager_min_max_ms": [round(min(times["eager"]), 3), round(max(times["eager"]), 3)],
        "compiled_min_max_ms": [round(min(times["compiled"]), 3), round(max(times["compiled"]), 3)],
        "max_rel_diff": diff,
        "warmup_s": round(warm_s, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--cases", nargs="+", default=["layer", "block", "layer_cp2", "layer_amp"])
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    rows = [bench(case, a.seq, a.iters) for case in a.cases]
    out = Path(os.environ.get("OUT", "results/compile_bench"))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "compile_bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "config": repr(NEMOTRON_H)}
    (out / "compile_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"{meta['gpu']}, torch {meta['torch']}, L {a.seq}, fwd+bwd, median of {a.iters} (CUDA events)")
    print(
        f"{'case':>10} {'eager ms':>9} {'compiled ms':>12} {'ratio':>7} {'max rel diff':>13} {'warm-up s':>10}"
    )
    for r in rows:
        print(
            f"{r['case']:>10} {r['eager_ms']:>9.3f} {r['compiled_ms']:>12.3f} {r['compiled_over_eager']:>7.4f} "
            f"{r['max_rel_diff']:>13.1e} {r['warmup_s']:>10.1f}"
        )


if __name__ == "__main__":
    main()
