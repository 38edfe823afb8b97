"""Microbenchmark of the layout kernels on one GPU: channel pack/unpack and the row gather, Triton
vs torch, at the Nemotron-like shape (cp 8, 16384 local tokens, bf16). Median of triton.testing.do_bench."""

import torch
from triton.testing import do_bench

from cp_core.channels import mamba_channel_plan, pack_torch, unpack_torch
from cp_core.kernels import gather_triton as g


def bench(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def run(with_z: bool) -> None:
    p = mamba_channel_plan(8, 128, 64, 8, 128, with_z=with_z)
    x = torch.randn(16384, p.in_width, device="cuda", dtype=torch.bfloat16)
    rw = 2 * x.numel() * x.element_size()  # bytes read + written by one pass
    s = g.pack(x, p)
    assert torch.equal(s, pack_torch(x, p))
    rows = s.view(-1, p.local_width)
    idx = torch.randperm(rows.shape[0], device="cuda")
    assert torch.equal(g.gather_rows(rows, idx), rows.index_select(0, idx))
    for name, fn in (
        ("pack triton", lambda: g.pack(x, p)),
        ("pack torch", lambda: pack_torch(x, p)),
        ("row gather triton", lambda: g.gather_rows(rows, idx)),
        ("row gather index_select", lambda: rows.index_select(0, idx)),
        ("unpack triton", lambda: g.unpack(s, p)),
        ("unpack torch", lambda: unpack_torch(s, p)),
        ("plain copy", lambda: x.clone()),
    ):
        ms = bench(fn)
        print(f"with_z={with_z!s:5} {name:24} {ms:7.3f} ms {rw / ms / 1e9:6.2f} TB/s (read+write)")


if __name__ == "__main__":
    run(True)
    run(False)
