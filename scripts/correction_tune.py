"""Launch configurations of the Triton per-piece products (cp_core.kernels.correction_triton) on one GPU.

Times ``apply`` (the correction), ``tapply`` (its ``dC`` and scale gradient) and ``outer`` (``dh0``; the final
states of documents) for each tokens-per-block ``BT`` and warp count (CUDA events, median of 20 after 3
warm-ups), on state passing's per-rank stream (default: cp 2, L 128K, BSHD: 2 pieces of 32K tokens;
``--pieces 128`` for 64 documents), Nemotron-H-like layer, bf16; beside the bytes-over-bandwidth floor.

    python3 scripts/correction_tune.py [--tokens 65536] [--pieces 2]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from cp_core.kernels import correction as corr
from cp_core.kernels import correction_triton as ct
from cpbench.timing import median_ms


def med(fn):
    return median_ms(fn, torch.device("cuda"), warmup=3, iters=20)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--pieces", type=int, default=2)
    ap.add_argument("--heads", default="128,64,8,128", help="H,P,G,N")
    args = ap.parse_args(argv)
    H, P, G, N = (int(v) for v in args.heads.split(","))
    T, Pc = args.tokens, args.pieces
    lengths = [T // Pc] * Pc
    lengths[-1] += T - sum(lengths)
    tab = corr.PieceTable([sum(lengths[:i]) for i in range(Pc)], lengths, "cuda")
    dev, dt = "cuda", torch.bfloat16
    u = torch.randn(T, H, P, device=dev, dtype=dt)
    conv = torch.randn(
        T, H * P + 2 * G * N, device=dev, dtype=dt
    )  # the layer's conv output: v is a column slice
    v = conv[:, H * P + G * N :].view(T, G, N)
    M = torch.randn(Pc, H, P, N, device=dev) / N**0.5
    s = torch.rand(H, T, device=dev)
    dv = torch.randn(T, G, N, device=dev, dtype=dt)
    big = u.numel() * u.element_size()
    bw = 4.8e12  # H200 HBM3e
    print(f"# {torch.cuda.get_device_name()}: T {T}, {Pc} pieces, H,P,G,N {args.heads}, bf16; floors at 4.8 TB/s: "
          f"apply (read u, write out) {2 * big / bw * 1e3:.3f} ms, tapply / outer (read u) {big / bw * 1e3:.3f} ms")  # fmt: skip
    ops = {
        "apply": lambda: corr.apply(u, v, M, s, tab, out=u, backend="triton"),
        "tapply": lambda: corr.tapply(u, v, M, s, tab, dv=dv, accumulate=True, backend="triton"),
        "outer": lambda: corr.outer(u, v, s, tab, backend="triton"),
    }
    for name, fn in ops.items():
        for bt, warps in itertools.product((32, 64, 128), (4, 8)):
            ct.BT[name], ct.NUM_WARPS[name] = bt, warps
            try:
                print(f"{name:6s} BT {bt:3d} warps {warps}: {med(fn):.3f} ms", flush=True)
            except Exception as e:  # e.g. out of shared memory for a large tile
                print(f"{name:6s} BT {bt:3d} warps {warps}: failed ({type(e).__name__}: {str(e)[:80]})")


if __name__ == "__main__":
    main()
