"""Triton kernels of :mod:`cp_core.kernels.correction` (``apply``, ``tapply``, ``outer``; the torch
functions there are the reference).

Work is cut into *blocks* of at most ``BT`` tokens that never straddle two pieces
(:meth:`~cp_core.kernels.correction.PieceTable.blocks`), so a program reads one piece's matrix and only
its own tokens: no masking by document, no token of another piece loaded.

* ``apply``: one program per (block, head): ``dot(v [BT, N], M^T [N, P])``, times the scale, plus
  ``base``; stored once (in place when ``out`` is ``base``). Heads are the fast grid axis, so the heads
  of a group read the same ``v`` tile while it is in L2.
* ``tapply``: one program per (block, group), a loop over the group's heads: ``dv += dot(s u, M)`` and
  ``g = rowsum(u * dot(v, M^T))``; ``dv`` stored once per program (added to its contents when asked).
* ``outer``: one program per (superblock, head), a loop over the superblock's ``BT``-token steps
  accumulating ``dot((s u)^T, v)`` in fp32; a piece longer than a superblock leaves partial sums that
  are added in a fixed order (no atomics: the result does not depend on scheduling).

Dots take the inputs' dtype (``M`` and ``s u`` cast to it, as mamba-ssm's SSD casts its states) and
accumulate in fp32. ``TRITON_INTERPRET=1`` runs these on CPU (the tests do).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - CPU installs without triton
    HAVE_TRITON = False

#: tokens per block (apply / tapply), per superblock (outer), warps per kernel (to be tuned on the GPU:
#: ``scripts/correction_tune.py``)
BT = {"apply": 64, "tapply": 64, "outer": 64}
SUPERBLOCK = 2048
NUM_WARPS = {"apply": 4, "tapply": 8, "outer": 4}


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: CUDA caps the second grid axis (the blocks here) at 65535 programs; longer grids are launched in parts
_MAX_GRID_Y = 65535


def supports(t: torch.Tensor) -> bool:
    """The kernels run on ``t`` on their own (CUDA; what ``backend="auto"`` picks)."""
    return HAVE_TRITON and t.is_cuda and t.dtype in _DTYPES


def runnable(t: torch.Tensor) -> bool:
    """The kernels can be asked for explicitly: CUDA, or any tensor under ``TRITON_INTERPRET=1``."""
    import os

    return HAVE_TRITON and t.dtype in _DTYPES and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _blk(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot wants every dimension >= 16


if HAVE_TRITON:

    @triton.jit
    def _apply_kernel(
        base, v, M, s, out, bstart, blen, bpiece, boff,
        T, H, HG, P, N,
        sb_t, sb_h, sv_t, sv_g, so_t, so_h,
        BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        blk = tl.program_id(1) + boff
        h = tl.program_id(0)
        g = h // HG
        t0 = tl.load(bstart + blk).to(tl.int64)
        n = tl.load(blen + blk)
        p = tl.load(bpiece + blk).to(tl.int64)
        rows = tl.arange(0, BT)
        ts = t0 + rows
        ps, ns = tl.arange(0, BP), tl.arange(0, BN)
        tm, pm, nm = rows < n, ps < P, ns < N
        vt = tl.load(
            v + ts[:, None] * sv_t + g * sv_g + ns[None, :], mask=tm[:, None] & nm[None, :], other=0.0
        )
        mt = tl.load(
            M + ((p * H + h) * P + ps[:, None]) * N + ns[None, :], mask=pm[:, None] & nm[None, :], other=0.0
        )
        corr = tl.dot(vt, tl.trans(mt.to(vt.dtype)))  # [BT, BP] fp32
        sc = tl.load(s + h.to(tl.int64) * T + ts, mask=tm, other=0.0)
        m2 = tm[:, None] & pm[None, :]
        b = tl.load(base + ts[:, None] * sb_t + h * sb_h + ps[None, :], mask=m2, other=0.0).to(tl.float32)
        res = b + sc[:, None] * corr
        tl.store(out + ts[:, None] * so_t + h * so_h + ps[None, :], res.to(out.dtype.element_ty), mask=m2)

    @triton.jit
    def _tapply_kernel(
        u, v, M, s, dv, gout, bstart, blen, bpiece, boff,
        T, H, HG, P, N,
        su_t, su_h, sv_t, sv_g, sd_t, sd_g,
        ACC: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        blk = tl.program_id(1) + boff
        g = tl.program_id(0)
        t0 = tl.load(bstart + blk).to(tl.int64)
        n = tl.load(blen + blk)
        p = tl.load(bpiece + blk).to(tl.int64)
        rows = tl.arange(0, BT)
        ts = t0 + rows
        ps, ns = tl.arange(0, BP), tl.arange(0, BN)
        tm, pm, nm = rows < n, ps < P, ns < N
        mv = tm[:, None] & nm[None, :]
        vt = tl.load(v + ts[:, None] * sv_t + g * sv_g + ns[None, :], mask=mv, other=0.0)
        acc = tl.zeros((BT, BN), dtype=tl.float32)
        for i in range(HG):
            h = g * HG + i
            ut = tl.load(
                u + ts[:, None] * su_t + h * su_h + ps[None, :], mask=tm[:, None] & pm[None, :], other=0.0
            ).to(tl.float32)
            mt = tl.load(
                M + ((p * H + h) * P + ps[:, None]) * N + ns[None, :],
                mask=pm[:, None] & nm[None, :],
                other=0.0,
            ).to(vt.dtype)
            sc = tl.load(s + h.to(tl.int64) * T + ts, mask=tm, other=0.0)
            acc += tl.dot((ut * sc[:, None]).to(vt.dtype), mt)  # [BT, BN]
            corr = tl.dot(vt, tl.trans(mt))  # [BT, BP]
            tl.store(gout + h.to(tl.int64) * T + ts, tl.sum(ut * corr, axis=1), mask=tm)
        ptr = dv + ts[:, None] * sd_t + g * sd_g + ns[None, :]
        if ACC:
            acc += tl.load(ptr, mask=mv, other=0.0).to(tl.float32)
        tl.store(ptr, acc.to(dv.dtype.element_ty), mask=mv)

    @triton.jit
    def _outer_kernel(
        u, v, s, out, bstart, blen, bslot, boff,
        T, H, HG, P, N,
        su_t, su_h, sv_t, sv_g, so_p,
        BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        sb = tl.program_id(1) + boff
        h = tl.program_id(0)
        g = h // HG
        t0 = tl.load(bstart + sb).to(tl.int64)
        n = tl.load(blen + sb)
        slot = tl.load(bslot + sb).to(tl.int64)
        rows = tl.arange(0, BT)
        ps, ns = tl.arange(0, BP), tl.arange(0, BN)
        pm, nm = ps < P, ns < N
        acc = tl.zeros((BP, BN), dtype=tl.float32)
        for j in range(0, n, BT):
            ts = t0 + j + rows
            tm = (j + rows) < n
            ut = tl.load(
                u + ts[:, None] * su_t + h * su_h + ps[None, :], mask=tm[:, None] & pm[None, :], other=0.0
            )
            vt = tl.load(
                v + ts[:, None] * sv_t + g * sv_g + ns[None, :], mask=tm[:, None] & nm[None, :], other=0.0
            )
            sc = tl.load(s + h.to(tl.int64) * T + ts, mask=tm, other=0.0)
            us = (ut.to(tl.float32) * sc[:, None]).to(vt.dtype)
            acc += tl.dot(tl.trans(us), vt)
        tl.store(
            out + slot * so_p + (h * P + ps[:, None]) * N + ns[None, :], acc, mask=pm[:, None] & nm[None, :]
        )


def _parts(n: int):
    return [(o, min(_MAX_GRID_Y, n - o)) for o in range(0, n, _MAX_GRID_Y)]


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _dims(u_or_base, v):
    T, H, P = u_or_base.shape
    G, N = v.shape[1:]
    return T, H, H // G, P, G, N


def apply(base, v, M, s, table, out):
    T, H, HG, P, G, N = _dims(base, v)
    base, v = _unit(base), _unit(v)
    M, s = M.float().contiguous(), s.float().contiguous()
    start, length, piece = table.blocks(BT["apply"])
    if start.numel():
        for off, nb in _parts(start.numel()):
            _apply_kernel[(H, nb)](
                base, v, M, s, out, start, length, piece, off, T, H, HG, P, N,
                base.stride(0), base.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
                BT=BT["apply"], BP=_blk(P), BN=_blk(N), num_warps=NUM_WARPS["apply"],
            )  # fmt: skip
    return out


def tapply(u, v, M, s, table, dv, accumulate):
    T, H, HG, P, G, N = _dims(u, v)
    u, v = _unit(u), _unit(v)
    M, s = M.float().contiguous(), s.float().contiguous()
    g = torch.empty((H, T), dtype=torch.float32, device=u.device)
    start, length, piece = table.blocks(BT["tapply"])
    if start.numel():
        for off, nb in _parts(start.numel()):
            _tapply_kernel[(G, nb)](
                u, v, M, s, dv, g, start, length, piece, off, T, H, HG, P, N,
                u.stride(0), u.stride(1), v.stride(0), v.stride(1), dv.stride(0), dv.stride(1),
                ACC=bool(accumulate), BT=BT["tapply"], BP=_blk(P), BN=_blk(N), num_warps=NUM_WARPS["tapply"],
            )  # fmt: skip
    return dv, g


def outer(u, v, s, table, out):
    T, H, HG, P, G, N = _dims(u, v)
    u, v = _unit(u), _unit(v)
    s = s.float().contiguous()
    if out.shape[0] and out[0].stride() != (P * N, N, 1):
        raise ValueError("outer: every piece's [H, P, N] block of out must be contiguous")
    out.zero_()  # empty pieces
    start, length, piece, rounds = table.superblocks(SUPERBLOCK)
    if not start.numel():
        return out
    if rounds is None:  # one superblock per piece: straight into its row
        dest, slot = out, piece
    else:
        dest = torch.empty((start.numel(), H, P, N), dtype=torch.float32, device=u.device)
        slot = torch.arange(start.numel(), dtype=torch.int32, device=u.device)
    for off, nb in _parts(start.numel()):
        _outer_kernel[(H, nb)](
            u, v, s, dest, start, length, slot, off, T, H, HG, P, N,
            u.stride(0), u.stride(1), v.stride(0), v.stride(1), dest.stride(0),
            BT=BT["outer"], BP=_blk(P), BN=_blk(N), num_warps=NUM_WARPS["outer"],
        )  # fmt: skip
    if rounds is not None:
        for ids, pieces in rounds:  # each piece at most once per round: a fixed order of additions
            out.index_add_(0, pieces, dest.index_select(0, ids))
    return out
