"""Per-rank compute of the hidden and state-passing strategies on one GPU, kernel by kernel.

Runs rank 0 of a CP group in projection mode (``LocalGroup``, collectives as local copies) on the
Nemotron-H-like layer, times fwd and fwd+bwd with CUDA events (median of ``--iters`` after
``--warmup``) and prints the CUDA kernels of one fwd+bwd from ``torch.profiler``, largest first.

    python3 scripts/strategy_profile.py --cases 8x131072 4x32768 --out prof.txt
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from cp_core.comm import LocalGroup
from cp_core.mixer import Mamba2Config, Mamba2Mixer
from cpbench.timing import median_ms

CFG = dict(d_model=4096, n_heads=128, head_dim=64, n_groups=8, d_state=128, d_conv=4, chunk_size=256)


def _fwd(m, x):
    with torch.no_grad():
        m(x)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["8x131072", "4x32768"], help="CPxL")
    ap.add_argument("--strategies", nargs="+", default=["hidden", "state_passing", "state_passing_chain"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    say(f"# {torch.cuda.get_device_name()} torch {torch.__version__}")
    cfg = Mamba2Config(**CFG)
    for spec in args.cases:
        cp, length = (int(v) for v in spec.split("x"))
        base = {}
        for strategy in args.strategies:
            torch.manual_seed(0)
            m = Mamba2Mixer(cfg, LocalGroup(0, cp), device="cuda", dtype=torch.bfloat16, strategy=strategy)
            x = torch.randn(
                1, length // cp, cfg.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True
            )
            g = torch.randn_like(x)

            f = median_ms(lambda m=m, x=x: _fwd(m, x), torch.device("cuda"), args.warmup, args.iters)
            fb = median_ms(
                lambda m=m, x=x, g=g: m(x).backward(g), torch.device("cuda"), args.warmup, args.iters
            )
            base.setdefault("f", f)
            base.setdefault("fb", fb)
            say(
                f"\n## cp {cp} L {length} {strategy}: fwd {f:.3f} ms ({f / base['f']:.2f}x hidden), "
                f"fwd+bwd {fb:.3f} ms ({fb / base['fb']:.2f}x)  backends {m.backends}"
            )
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                m(x).backward(g)
                torch.cuda.synchronize()
            say(
                prof.key_averages().table(
                    sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=70
                )
            )
            del m, x, g
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
