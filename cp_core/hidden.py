"""The fused hidden-parallel redistribution: one all-to-all and two one-pass copies per direction.

``pre``:  ``[B, L/cp, W]`` sequence shard -> pack each rank's channels into one ``[cp, N, W/cp]``
buffer -> one ``all_to_all_single`` -> one row gather (the cached :class:`~cp_core.plan.TokenPlan`)
-> ``[B, L, W/cp]`` in global token order.
``post``: the exact adjoint: row gather with the inverse index -> one all-to-all -> unpack.

When the token permutation moves a few whole row ranges (:attr:`TokenPlan.runs`: BSHD, or a few packed
documents) the row gather disappears: the all-to-all is sent in those pieces (:func:`cp_core.comm.exchange`)
and every piece is received straight into its global rows (and sent from them on the way back); for the
contiguous layout of one sequence the slots of a plain all-to-all already are the global order. The
layer core (:mod:`cp_core.pipeline`) starts from :func:`_to_heads` with the send buffers that ``in_proj``
wrote (no pack either). Plans with many pieces (``runs`` None) keep one all-to-all and a row gather.

Each is a ``torch.autograd.Function`` whose backward is the other direction, so a forward and a
backward move the same bytes through the same three steps.
"""

from __future__ import annotations

import torch

from . import comm
from .channels import ChannelPlan, gather_rows, pack, unpack
from .plan import TokenPlan
from .regions import A2A_POST, A2A_PRE, LAYOUT, region


def _mode(tok: TokenPlan) -> str:
    """How this plan's rows move: ``"identity"`` (contiguous layout, one sequence: the all-to-all's slots
    already are the global order), ``"pieces"`` (a few row ranges, :attr:`TokenPlan.runs`) or ``"gather"``
    (one all-to-all and a row gather: plans with too many pieces, :data:`~cp_core.plan.RUNS_MAX`)."""
    if tok.runs is None:
        return "gather"
    n = tok.batch * tok.local_length
    return "identity" if all(len(r) == 1 and r[0][1] == s * n for s, r in enumerate(tok.runs)) else "pieces"


def _rows(t: torch.Tensor, pieces, col: int) -> list[torch.Tensor]:
    """Row ranges of the 2-D ``t`` (column ``col`` of a ``(q0, g0, n)`` piece is its first row)."""
    return [t[p[col] : p[col] + p[2]] for p in pieces]


def _to_heads(send: torch.Tensor, chan: ChannelPlan, tok: TokenPlan, group, a2a: str, lay: str):
    """The packed send buffer ``[cp, N, w]`` -> ``[B*L, w]`` in global token order."""
    mode = _mode(tok)
    if mode == "identity":
        with region(a2a):
            out = comm.all_to_all_single(torch.empty_like(send), send, group)
        return out.view(-1, chan.local_width)
    if mode == "pieces":
        # every piece lands in its global rows: no row gather
        runs, me = tok.runs, comm.group_rank(group)
        out = send.new_empty((tok.batch * tok.length, chan.local_width))
        with region(a2a):
            comm.exchange(
                [_rows(send[r], runs[me], 0) for r in range(chan.cp_size)],
                [_rows(out, runs[s], 1) for s in range(chan.cp_size)],
                group,
            )
        return out
    with region(a2a):
        recv = comm.all_to_all_single(torch.empty_like(send), send, group)
    with region(lay):
        return gather_rows(recv.view(-1, chan.local_width), tok.gather)


def _to_seq(y2d: torch.Tensor, chan: ChannelPlan, tok: TokenPlan, group, a2a: str, lay: str, recv=None):
    """``[B*L, w]`` in global token order -> the received buffer ``[cp, N, w]`` (slot ``s`` from rank
    ``s``; into ``recv`` when given), the adjoint of :func:`_to_heads`."""
    cp = chan.cp_size
    if recv is None:
        recv = y2d.new_empty((cp, tok.batch * tok.local_length, chan.local_width))
    mode = _mode(tok)
    if mode == "identity":
        with region(a2a):
            return comm.all_to_all_single(recv, y2d.contiguous().view(recv.shape), group).view(recv.shape)
    if mode == "pieces":
        # every piece is sent from its global rows: no row gather
        runs, me = tok.runs, comm.group_rank(group)
        y2d = y2d.contiguous()
        with region(a2a):
            comm.exchange(
                [_rows(y2d, runs[r], 1) for r in range(cp)],
                [_rows(recv[s], runs[me], 0) for s in range(cp)],
                group,
            )
        return recv
    with region(lay):
        send = gather_rows(y2d, tok.scatter)
    with region(a2a):
        return comm.all_to_all_single(recv.view_as(send), send, group).view(recv.shape)


def _seq_to_heads(x2d: torch.Tensor, chan: ChannelPlan, tok: TokenPlan, group, a2a: str, lay: str):
    with region(lay):
        send = pack(x2d, chan)
    return _to_heads(send, chan, tok, group, a2a, lay)


def _heads_to_seq(y2d: torch.Tensor, chan: ChannelPlan, tok: TokenPlan, group, a2a: str, lay: str, out=None):
    recv = _to_seq(y2d, chan, tok, group, a2a, lay)
    with region(lay):
        return unpack(recv, chan, out)


class _Pre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, chan, tok, group):
        ctx.chan, ctx.tok, ctx.group, ctx.shape = chan, tok, group, x.shape
        out = _seq_to_heads(x.reshape(-1, chan.in_width), chan, tok, group, A2A_PRE, LAYOUT)
        return out.view(*x.shape[:-2], tok.length, chan.local_width)

    @staticmethod
    def backward(ctx, g):
        chan, tok = ctx.chan, ctx.tok
        gx = _heads_to_seq(
            g.reshape(-1, chan.local_width), chan, tok, ctx.group, A2A_PRE + "_bwd", LAYOUT + "_bwd"
        )
        return gx.view(ctx.shape), None, None, None


class _Post(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, chan, tok, group):
        ctx.chan, ctx.tok, ctx.group, ctx.shape = chan, tok, group, y.shape
        out = _heads_to_seq(y.reshape(-1, chan.local_width), chan, tok, group, A2A_POST, LAYOUT)
        return out.view(*y.shape[:-2], tok.local_length, chan.in_width)

    @staticmethod
    def backward(ctx, g):
        chan, tok = ctx.chan, ctx.tok
        gy = _seq_to_heads(
            g.reshape(-1, chan.in_width), chan, tok, ctx.group, A2A_POST + "_bwd", LAYOUT + "_bwd"
        )
        return gy.view(ctx.shape), None, None, None


def seq_to_heads(x: torch.Tensor, chan: ChannelPlan, tok: TokenPlan, group) -> torch.Tensor:
    """``[B, L/cp, in_width]`` (or ``[T/cp, in_width]``) -> ``[B, L, local_width]`` (or ``[T, ...]``)."""
    return _Pre.apply(x, chan, tok, group)


def heads_to_seq(y: torch.Tensor, chan: ChannelPlan, tok: TokenPlan, group) -> torch.Tensor:
    """``[B, L, local_width]`` (or ``[T, ...]``) -> ``[B, L/cp, in_width]`` (or ``[T/cp, ...]``)."""
    return _Post.apply(y, chan, tok, group)
