"""Kernel microbenchmark (GPU kernels): SSD time per head shard and conv1d backends, on one GPU.

``python -m cpbench.kernel_bench [--seq-len 32768,...] [--cp 1,2,4,8] [--out CSV] [--dry-run]``

It times CUDA kernels (mamba-ssm's Triton SSD, causal-conv1d, and the torch references beside them);
without a CUDA device it refuses (exit 2). ``--dry-run`` lists the cases and stops.

Hidden-parallel CP gives every rank the FULL sequence with ``n_heads/cp`` heads (and
``max(n_groups/cp, 1)`` groups), so the SSD time per rank at cp=N is the time of that head shard.
For each (L, cp): the SSD forward and forward+backward of that shard, and the conv1d over its
``d_inner/cp + 2*groups*d_state`` channels, for every available backend. Times: median of
``--iters`` after ``--warmup`` (Triton autotunes every new shape during warm-up), CUDA events.
``ideal`` is the cp=1 time divided by cp.
"""

from __future__ import annotations

import argparse
import sys

import torch

from cp_core import kernels

from .timing import median_ms


def timed(fn, warmup: int, iters: int) -> float:
    return median_ms(fn, torch.device("cuda"), warmup, iters)


def ssd_inputs(L, nh, hd, ng, ds, dtype, device, grad):
    g = torch.Generator(device=device).manual_seed(0)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, device=device) * scale).to(dtype).requires_grad_(grad)

    x, dt = r(1, L, nh, hd), r(1, L, nh, scale=0.5)
    B, C = r(1, L, ng, ds), r(1, L, ng, ds)
    A = (-torch.rand(nh, generator=g, device=device) * 4 - 1).requires_grad_(grad)
    D = torch.ones(nh, device=device, requires_grad=grad)
    dt_bias = torch.zeros(nh, device=device, requires_grad=grad)
    return x, dt, A, B, C, D, dt_bias


def _ints(ap, flag: str, text: str, n: int | None = None) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        ap.error(f"{flag} {text!r}: expected comma-separated integers")
    if not vals or any(v < 1 for v in vals) or (n is not None and len(vals) != n):
        ap.error(f"{flag} {text!r}: expected {n or 'some'} positive integers")
    return vals


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m cpbench.kernel_bench",
        description=__doc__.splitlines()[0] + " Needs a CUDA device.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--seq-len", default="32768,65536,131072,262144")
    ap.add_argument("--cp", default="1,2,4,8")
    ap.add_argument("--shape", default="128,64,8,128,256", help="n_heads,head_dim,n_groups,d_state,chunk")
    ap.add_argument("--ssd", default="mamba_ssm,torch")
    ap.add_argument("--conv", default="causal_conv1d,torch")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument(
        "--max-torch-len", type=int, default=65536, help="skip the torch SSD and conv above this length"
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true", help="check the arguments, list the cases and stop")
    a = ap.parse_args(argv)
    lengths, cps = _ints(ap, "--seq-len", a.seq_len), _ints(ap, "--cp", a.cp)
    nh, hd, ng, ds, chunk = _ints(ap, "--shape", a.shape, 5)
    if a.dtype not in ("bfloat16", "float16", "float32"):
        ap.error(f"--dtype {a.dtype!r}: expected bfloat16, float16 or float32")
    if a.dry_run:
        print(
            f"kernel_bench: {len(lengths) * len(cps)} case(s): "
            + ", ".join(f"L {L} cp {cp}" for L in lengths for cp in cps)
        )
        return 0
    if not torch.cuda.is_available():
        print("kernel_bench: error: it measures GPU kernels and no CUDA device is visible", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    dtype = getattr(torch, a.dtype)
    print(
        f"device {torch.cuda.get_device_name(dev)}; shape heads {nh}x{hd}, groups {ng}, d_state {ds}, chunk {chunk}"
    )
    rows = []
    for L in lengths:
        for cp in cps:
            h, g = nh // cp, max(ng // cp, 1)
            for name in a.ssd.split(","):
                try:
                    kernels.resolve_backends(dev, ssd_backend=name)
                except ValueError as e:
                    print(f"skip ssd {name}: {e}")
                    continue
                if name == "torch" and L > a.max_torch_len:
                    continue
                args = ssd_inputs(L, h, hd, g, ds, dtype, dev, grad=True)
                x, dt, A, B, C, D, dt_bias = args

                def fwd(name=name, x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias):
                    return kernels.ssd(x, dt, A, B, C, chunk_size=chunk, D=D, dt_bias=dt_bias, backend=name)

                def fwd_bwd(fwd=fwd):
                    fwd().sum().backward()

                with torch.no_grad():
                    t_f = timed(fwd, a.warmup, a.iters)
                t_fb = timed(fwd_bwd, a.warmup, a.iters)
                rows.append(
                    dict(
                        op="ssd",
                        backend=name,
                        seq_len=L,
                        cp=cp,
                        heads=h,
                        groups=g,
                        fwd_ms=t_f,
                        fwd_bwd_ms=t_fb,
                    )
                )
                print(rows[-1], flush=True)
                del args, x, dt, A, B, C, D, dt_bias
            ch = h * hd + 2 * g * ds
            x = torch.randn(1, L, ch, device=dev, dtype=dtype, requires_grad=True)
            w = torch.randn(ch, 4, device=dev, dtype=dtype, requires_grad=True)
            b = torch.randn(ch, device=dev, dtype=dtype, requires_grad=True)
            seq_idx = torch.zeros(1, L, dtype=torch.int32, device=dev)
            for name in a.conv.split(","):
                try:
                    kernels.resolve_backends(dev, conv_backend=name)
                except ValueError as e:
                    print(f"skip conv {name}: {e}")
                    continue
                if name == "torch" and L > a.max_torch_len:
                    continue

                def cf(name=name, x=x, w=w, b=b, seq_idx=seq_idx):
                    return kernels.conv1d(x, w, b, seq_idx=seq_idx, backend=name)

                with torch.no_grad():
                    t_f = timed(cf, a.warmup, a.iters)
                t_fb = timed(lambda cf=cf: cf().sum().backward(), a.warmup, a.iters)
                gbps = 2 * x.numel() * x.element_size() / (t_f * 1e-3) / 1e9
                rows.append(
                    dict(
                        op="conv1d",
                        backend=name,
                        seq_len=L,
                        cp=cp,
                        heads=h,
                        groups=g,
                        fwd_ms=t_f,
                        fwd_bwd_ms=t_fb,
                        fwd_GBps=gbps,
                    )
                )
                print(rows[-1], flush=True)
            del x, w, b
            torch.cuda.empty_cache()
    import pandas as pd

    df = pd.DataFrame(rows)
    base = df[df.cp == 1].set_index(["op", "backend", "seq_len"])[["fwd_ms", "fwd_bwd_ms"]]
    key = list(zip(df.op, df.backend, df.seq_len, strict=True))
    for col in ("fwd_ms", "fwd_bwd_ms"):
        ideal = [base[col].get(k, float("nan")) for k in key]
        df[f"{col}_ideal"] = [i / c for i, c in zip(ideal, df.cp, strict=True)]
        df[f"{col}_x_ideal"] = df[col] / df[f"{col}_ideal"]
    if a.out:
        df.to_csv(a.out, index=False)
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
