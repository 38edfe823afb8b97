"""One-pass channel pack / unpack for the hidden-parallel all-to-all, in Triton (CUDA only).

Both directions are one "table gather":  ``out[a, n, b] = src[ra[a, b] * s_slab + n * s_n + jb[a, b]]``
with a small int32 table ``(ra, jb)`` per (channel plan, direction). Consecutive ``b`` read
consecutive ``jb`` inside each block of channels, so loads and stores are coalesced and the copy runs
in one pass near the device's copy bandwidth (a strided ``copy_`` per block ran far below it).
The portable reference is :func:`cp_core.channels.pack` / :func:`cp_core.channels.unpack`; the
tests compare the two bit for bit.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - CPU installs without triton
    HAVE_TRITON = False


def available(t: torch.Tensor) -> bool:
    return HAVE_TRITON and t.is_cuda


if HAVE_TRITON:

    @triton.jit
    def _table_gather(src, out, ra, jb, n_rows, width, s_slab, s_n, BN: tl.constexpr, BB: tl.constexpr):
        a = tl.program_id(0)
        rows = tl.program_id(1) * BN + tl.arange(0, BN)
        cols = tl.program_id(2) * BB + tl.arange(0, BB)
        cmask = cols < width
        r = tl.load(ra + a * width + cols, mask=cmask, other=0).to(tl.int64)
        j = tl.load(jb + a * width + cols, mask=cmask, other=0).to(tl.int64)
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        offs = (r * s_slab + j)[None, :] + rows.to(tl.int64)[:, None] * s_n
        vals = tl.load(src + offs, mask=mask)
        dst = (a * n_rows + rows.to(tl.int64))[:, None] * width + cols[None, :]
        tl.store(out + dst, vals, mask=mask)


def _launch(src, out, ra, jb, n_rows, width, s_slab, s_n, a_count):
    if n_rows == 0 or width == 0:
        return out
    BB = 128 if width >= 128 else triton.next_power_of_2(width)
    BN = max(1, 8192 // BB) if src.element_size() <= 2 else max(1, 4096 // BB)
    grid = (a_count, triton.cdiv(n_rows, BN), triton.cdiv(width, BB))
    _table_gather[grid](src, out, ra, jb, n_rows, width, s_slab, s_n, BN=BN, BB=BB, num_warps=4)
    return out


@functools.lru_cache(maxsize=64)
def _tables(plan, direction: str, device: str):
    """``(ra, jb)`` int32 tables for a :class:`~cp_core.channels.ChannelPlan`."""
    cp, w_loc = plan.cp_size, plan.local_width
    if direction == "pack":  # out[r, n, j] = x[n, col[r, j]]
        col = torch.empty(cp, w_loc, dtype=torch.int32)
        for b in plan.blocks:
            rep = cp // b.count
            for r in range(cp):
                piece = r // rep
                col[r, b.dst : b.dst + b.width] = torch.arange(
                    b.src + piece * b.width, b.src + (piece + 1) * b.width
                )
        return torch.zeros_like(col).to(device), col.to(device)
    # unpack (no replication): out[0, n, c] = s[rank(c), n, j(c)]
    ra = torch.empty(1, plan.in_width, dtype=torch.int32)
    jb = torch.empty(1, plan.in_width, dtype=torch.int32)
    for b in plan.blocks:
        for piece in range(b.count):
            cols = slice(b.src + piece * b.width, b.src + (piece + 1) * b.width)
            ra[0, cols] = piece
            jb[0, cols] = torch.arange(b.dst, b.dst + b.width)
    return ra.to(device), jb.to(device)


def pack(x: torch.Tensor, plan) -> torch.Tensor:
    """Triton :func:`cp_core.channels.pack`: ``x [N, in_width]`` (row-strided ok) -> ``[cp, N, local_width]``."""
    n = x.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    ra, jb = _tables(plan, "pack", str(x.device))
    out = x.new_empty((plan.cp_size, n, plan.local_width))
    return _launch(x, out, ra, jb, n, plan.local_width, 0, x.stride(0), plan.cp_size)


def unpack(s: torch.Tensor, plan) -> torch.Tensor:
    """Triton :func:`cp_core.channels.unpack` for plans without replication: ``[cp, N, local_width]`` -> ``[N, in_width]``."""
    cp, n, w_loc = s.shape
    s = s.contiguous()
    ra, jb = _tables(plan, "unpack", str(s.device))
    out = s.new_empty((n, plan.in_width))
    return _launch(s, out.view(1, n, plan.in_width), ra, jb, n, plan.in_width, n * w_loc, w_loc, 1).view(
        n, -1
    )
