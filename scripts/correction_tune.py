"""Launch configurations of the Triton state correction (cp_core.kernels.correction_triton) on one GPU.

Times forward and backward (CUDA events, median of ``--iters`` after warm-up) for each tokens-per-program
``BL`` and warp count, on the per-rank shape of state passing at cp 8, L 128K (Nemotron-H-like layer),
beside the torch fp32 reference and the bytes-over-bandwidth floor.
"""

from __future__ import annotations

import argparse
import itertools

import torch

from cp_core.kernels import correction_triton as ct
from cp_core.kernels.correction import state_correction_torch
from cpbench.timing import median_ms


def med(fn):
    return median_ms(fn, torch.device("cuda"), warmup=3, iters=20)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="2,8192,128,64,8,128", help="R,L,H,P,G,N")
    args = ap.parse_args(argv)
    R, L, H, P, G, N = (int(v) for v in args.shape.split(","))
    dev, dt = "cuda", torch.bfloat16
    y0 = torch.randn(R, L, H, P, device=dev, dtype=dt)
    C = torch.randn(R, L, 3 * G * N, device=dev, dtype=dt)[..., G * N : 2 * G * N].reshape(R, L, G, N)
    h0 = torch.randn(R, H, P, N, device=dev) / N**0.5
    acum = -torch.rand(R, H, L, device=dev).cumsum(-1) * 0.01
    gy = torch.randn_like(y0)
    big = y0.numel() * y0.element_size()
    floor_f = 2 * big / 3.0e12 * 1e3  # read y0, write y (C and acum are small beside them)
    floor_b = 2 * big / 3.0e12 * 1e3  # read dy twice
    print(
        f"# {torch.cuda.get_device_name()} shape R,L,H,P,G,N={args.shape} bf16; floor at 3.0 TB/s: "
        f"fwd {floor_f:.3f} ms, bwd {floor_b:.3f} ms"
    )
    leaves = [t.clone().requires_grad_() for t in (y0, C, h0, acum)]

    def run(fn):
        y = fn(*leaves)
        tf = med(lambda: fn(*leaves))
        tb = med(lambda: torch.autograd.grad(y, leaves, gy, retain_graph=True))
        return tf, tb

    tf, tb = run(state_correction_torch)
    print(f"torch reference: fwd {tf:.3f} ms, bwd {tb:.3f} ms")
    for bl, wf, wdc, wdh in itertools.product((32, 64, 128), (4, 8), (4, 8), (4, 8)):
        ct.BL, ct.NUM_WARPS = {"fwd": bl, "bwd": bl}, {"fwd": wf, "dc": wdc, "dh0": wdh}
        try:
            tf, tb = run(ct.state_correction_triton)
            print(f"BL {bl:3d} warps fwd {wf} dc {wdc} dh0 {wdh}: fwd {tf:.3f} ms, bwd {tb:.3f} ms")
        except Exception as e:  # e.g. out of shared memory for a large tile
            print(f"BL {bl:3d} warps fwd {wf} dc {wdc} dh0 {wdh}: failed ({type(e).__name__}: {str(e)[:80]})")


if __name__ == "__main__":
    main()
