"""One-pass channel pack / unpack for the hidden-parallel all-to-all, in Triton (CUDA only).

Both directions copy contiguous runs of channels between two row-major tensors:
``out[dst_slab, n, dst_col + c] = src[src_slab, n, src_col + c]`` for ``c < width``, one run per
(rank, block of ``[z|x|B|C|dt]``). A small int32 table lists the runs, cut into tiles of at most
``BW`` channels; each program copies one tile for ``BN`` rows with contiguous, vectorisable loads
and stores, so the whole pack is one pass near the device's copy bandwidth. The portable
reference is :func:`cp_core.channels.pack_torch` / :func:`cp_core.channels.unpack_torch`; the GPU
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

BW = 256  # channels per tile
BN = 32  # rows per program


def available(t: torch.Tensor) -> bool:
    return HAVE_TRITON and t.is_cuda


if HAVE_TRITON:

    @triton.jit
    def _copy_runs(
        src, out, table, n_rows, s_slab, s_n, d_slab, d_n,
        BN: tl.constexpr, BW: tl.constexpr, ALIGN: tl.constexpr,
    ):  # fmt: skip
        t = tl.program_id(0)
        src_slab = tl.load(table + t * 5 + 0).to(tl.int64)
        src_col = tl.load(table + t * 5 + 1).to(tl.int64)
        dst_slab = tl.load(table + t * 5 + 2).to(tl.int64)
        dst_col = tl.load(table + t * 5 + 3).to(tl.int64)
        width = tl.load(table + t * 5 + 4)
        if ALIGN > 1:  # a mask of known alignment keeps the loads and stores vectorised
            width = tl.multiple_of(width, ALIGN)
        rows = (tl.program_id(1) * BN + tl.arange(0, BN)).to(tl.int64)
        cols = tl.arange(0, BW)
        mask = (rows < n_rows)[:, None] & (cols < width)[None, :]
        s_off = src_slab * s_slab + src_col
        d_off = dst_slab * d_slab + dst_col
        if ALIGN > 1:
            s_off = tl.multiple_of(s_off, ALIGN)
            d_off = tl.multiple_of(d_off, ALIGN)
        s_ptr = src + s_off + rows[:, None] * s_n + cols[None, :]
        d_ptr = out + d_off + rows[:, None] * d_n + cols[None, :]
        tl.store(d_ptr, tl.load(s_ptr, mask=mask), mask=mask)


def _runs(plan, direction: str) -> list[tuple[int, int, int, int, int]]:
    """``(src_slab, src_col, dst_slab, dst_col, width)`` for every run of channels."""
    runs = []
    for b in plan.blocks:
        rep = plan.cp_size // b.count
        for piece in range(b.count):
            col = b.src + piece * b.step
            if direction == "pack":
                runs += [(0, col, piece * rep + k, b.dst, b.width) for k in range(rep)]
            else:
                runs.append((piece, b.dst, 0, col, b.width))
    return runs


@functools.lru_cache(maxsize=64)
def _table(plan, direction: str, device: str) -> tuple[torch.Tensor, int]:
    tiles = []
    for ss, sc, ds, dc, w in _runs(plan, direction):
        for c in range(0, w, BW):
            tiles.append((ss, sc + c, ds, dc + c, min(BW, w - c)))
    with torch.inference_mode(False):  # cached: must serve later training steps too
        table = torch.tensor(tiles, dtype=torch.int32).to(device)
    align = 8
    for _ss, sc, _ds, dc, w in tiles:
        while align > 1 and (sc % align or dc % align or w % align):
            align //= 2
    return table, align


def _launch(src, out, plan, direction, n_rows, s_slab, s_n, d_slab, d_n):
    table, align = _table(plan, direction, str(src.device))
    for stride in (s_slab, s_n, d_slab, d_n):
        while align > 1 and stride % align:
            align //= 2
    if n_rows:
        grid = (table.shape[0], triton.cdiv(n_rows, BN))
        _copy_runs[grid](
            src, out, table, n_rows, s_slab, s_n, d_slab, d_n, BN=BN, BW=BW, ALIGN=align, num_warps=4
        )
    return out


def pack(x: torch.Tensor, plan) -> torch.Tensor:
    """Triton :func:`cp_core.channels.pack`: ``x [N, in_width]`` (row-strided ok) -> ``[cp, N, local_width]``."""
    n = x.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = x.new_empty((plan.cp_size, n, plan.local_width))
    return _launch(x, out, plan, "pack", n, 0, x.stride(0), n * plan.local_width, plan.local_width)


def unpack(s: torch.Tensor, plan, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton :func:`cp_core.channels.unpack` for plans without replication: ``[cp, N, local_width]`` ->
    ``[N, in_width]``, into ``out`` when given (last dim contiguous, any row stride)."""
    cp, n, w_loc = s.shape
    s = s.contiguous()
    if out is None:
        out = s.new_empty((n, plan.in_width))
    elif out.stride(-1) != 1:
        raise ValueError(f"unpack: out must have a contiguous last dim, got strides {out.stride()}")
    return _launch(s, out, plan, "unpack", n, n * w_loc, w_loc, 0, out.stride(0))


if HAVE_TRITON:

    @triton.jit
    def _gather_rows(src, out, idx, n_rows, width, BN: tl.constexpr, BW: tl.constexpr, ALIGN: tl.constexpr):
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        cols = tl.program_id(1) * BW + tl.arange(0, BW)
        rmask = rows < n_rows
        src_rows = tl.load(idx + rows, mask=rmask, other=0).to(tl.int64)
        mask = rmask[:, None] & (cols < width)[None, :]
        s_off = src_rows * width
        d_off = rows.to(tl.int64) * width
        if ALIGN > 1:
            s_off = tl.multiple_of(s_off, ALIGN)
            d_off = tl.multiple_of(d_off, ALIGN)
        vals = tl.load(src + s_off[:, None] + cols[None, :], mask=mask)
        tl.store(out + d_off[:, None] + cols[None, :], vals, mask=mask)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, idx)`` for a contiguous 2-D ``x`` on CUDA, with vectorised row copies."""
    x = x.contiguous()
    n, width = idx.shape[0], x.shape[1]
    out = x.new_empty((n, width))
    if n and width:
        align = 8
        while align > 1 and width % align:
            align //= 2
        bw = min(1024, triton.next_power_of_2(width))
        bn = max(1, 4096 // bw)
        grid = (triton.cdiv(n, bn), triton.cdiv(width, bw))
        _gather_rows[grid](x, out, idx, n, width, BN=bn, BW=bw, ALIGN=align, num_warps=4)
    return out
