"""Per-piece state products of state-passing CP: the carried-state correction and its relatives.

A rank's tokens ``t`` form *pieces* ``p(t)`` (its segments of every document), laid end to end in one
stream of ``T`` tokens; each piece carries one ``[H, P, N]`` matrix ``M_p`` (an incoming state ``h0``,
a final state, or their gradients). Every product state passing needs is one of three, per head ``h``
of group ``g(h) = h // (H / G)``, with a per-token fp32 scale ``s [H, T]``:

=========  =====================================================================================
op         definition
=========  =====================================================================================
apply      ``out[t, h] = base[t, h] + s[h, t] * M[p(t), h] @ v[t, g]``            (``[P]`` per token)
tapply     ``dv[t, g] = sum_{h in g} s[h, t] * M[p(t), h]^T @ u[t, h]``             (``[N]`` per token)
           and ``g[h, t] = u[t, h] . (M[p(t), h] @ v[t, g])``                   (``[H, T]`` fp32)
outer      ``M[p, h] = sum_{t in p} s[h, t] * u[t, h] (x) v[t, g]``                (``[H, P, N]`` per piece)
=========  =====================================================================================

Shapes: ``u``, ``base`` ``[T, H, P]``; ``v`` ``[T, G, N]`` (strided views are fine where the last
dimension is contiguous, e.g. column slices of the conv output); ``M [Pc, H, P, N]`` fp32; ``s [H, T]``.
The carried-state correction is ``apply(y0, C, h0, exp(acum))``, its backward ``tapply(dy, C, h0, ...)``
(``dC`` and the scale's gradient) and ``outer(dy, C, exp(acum))`` (``dh0``); a piece's final state
from a zero start is ``outer(x, B, exp(ld - acum) * dt)``, its backward ``apply`` and ``tapply`` with
``u = x``, ``v = B``.

``acum [H, T]`` is the decay from each piece's start, ``cumsum(A dt)`` restarted at every piece
(:func:`segmented_cumsum`, fp64 prefix sums and their differences, so nothing crosses a piece, not even
a NaN, forward or backward).

=========  ==========================================================================================
backend    implementation
=========  ==========================================================================================
torch      per-piece einsums in fp32 (float64 for float64 input); the reference, any device
triton     :mod:`.correction_triton`: blocks of tokens inside one piece (:class:`PieceTable`), one
           program per (block, head) or (block, group), fp32 accumulation, no atomics
=========  ==========================================================================================

Every product stays inside its piece (no token of one piece is ever loaded for another), so a
non-finite value never leaves its document.
"""

from __future__ import annotations

import torch

from . import correction_triton

__all__ = ["PieceTable", "apply", "tapply", "outer", "segmented_cumsum", "resolve", "BACKENDS"]

BACKENDS = ("torch", "triton")


class PieceTable:
    """The pieces of a stream of ``sum(lengths)`` tokens, as host lists and device index tensors:
    piece ``p`` holds tokens ``[starts[p], starts[p] + lengths[p])`` (pieces in stream order, every
    token in exactly one; empty pieces allowed). Built once per batch; the Triton block tables are
    made on first use per block size and kept."""

    def __init__(self, starts: list[int], lengths: list[int], device):
        if len(starts) != len(lengths):
            raise ValueError(f"{len(starts)} piece starts but {len(lengths)} lengths")
        self.starts, self.lengths = [int(s) for s in starts], [int(n) for n in lengths]
        self.n_pieces = len(self.starts)
        self.tokens = sum(self.lengths)
        pos = 0
        for s, n in zip(self.starts, self.lengths, strict=True):
            if s != pos or n < 0:
                raise ValueError(f"pieces must tile the stream in order: starts {starts}, lengths {lengths}")
            pos += n
        self.device = torch.device(device)
        self.nonempty = [p for p, n in enumerate(self.lengths) if n > 0]
        lens = torch.tensor(self.lengths, dtype=torch.long)
        piece = torch.repeat_interleave(torch.arange(self.n_pieces), lens)
        first = torch.tensor(self.starts, dtype=torch.long)
        last = first + lens - 1
        dev = dict(device=self.device)
        self.tok_piece = piece.to(**dev)  # [T] piece of every token
        self.tok_first = first[piece].to(**dev)  # [T] first token of the token's piece
        self.tok_last = last[piece].to(**dev)  # [T] last token of the token's piece
        self.last = last.clamp_min(0).to(**dev)  # [Pc] last token of every piece (0 for an empty one)
        self.has_tokens = (lens > 0).to(**dev)  # [Pc]
        self._blocks: dict = {}

    def blocks(self, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(start, length, piece)`` int32 of every block of at most ``block`` tokens inside one piece."""
        key = ("b", block)
        if key not in self._blocks:
            st, ln, pc = [], [], []
            for p in self.nonempty:
                s, n = self.starts[p], self.lengths[p]
                for o in range(0, n, block):
                    st.append(s + o)
                    ln.append(min(block, n - o))
                    pc.append(p)
            with _outside_inference():
                self._blocks[key] = tuple(
                    torch.tensor(v, dtype=torch.int32, device=self.device) for v in (st, ln, pc)
                )
        return self._blocks[key]

    def superblocks(self, size: int):
        """Blocks of at most ``size`` tokens for :func:`outer`: ``(start, length, piece, rounds)`` where
        ``rounds[j] = (superblock indices, their pieces)`` lists each piece's ``j``-th superblock (the partial
        sums are added in that order: deterministic), or ``rounds = None`` when every piece has one."""
        key = ("s", size)
        if key not in self._blocks:
            st, ln, pc, per = [], [], [], []
            for p in self.nonempty:
                s, n = self.starts[p], self.lengths[p]
                per.append([])
                for o in range(0, n, size):
                    per[-1].append(len(st))
                    st.append(s + o)
                    ln.append(min(size, n - o))
                    pc.append(p)
            with _outside_inference():
                self._blocks[key] = self._superblocks(st, ln, pc, per)
        return self._blocks[key]

    def _superblocks(self, st, ln, pc, per):
        dev = dict(dtype=torch.long, device=self.device)
        rounds = None
        if any(len(r) > 1 for r in per):
            rounds = []
            for j in range(max(len(r) for r in per)):
                ids = [r[j] for r in per if len(r) > j]
                rounds.append((torch.tensor(ids, **dev), torch.tensor([pc[i] for i in ids], **dev)))
        return (*(torch.tensor(v, dtype=torch.int32, device=self.device) for v in (st, ln, pc)), rounds)


def _outside_inference():
    """Tensors cached in the table are built outside inference mode (they serve later training steps)."""
    from ..plan import build_outside_inference

    return build_outside_inference()


def _work(*ts) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _check(name: str, table: PieceTable, u=None, v=None, M=None, s=None) -> None:
    T = table.tokens
    if v is not None and (v.dim() != 3 or v.shape[0] != T):
        raise ValueError(f"{name}: v must be [T={T}, G, N], got {tuple(v.shape)}")
    if u is not None and (u.dim() != 3 or u.shape[0] != T):
        raise ValueError(f"{name}: u must be [T={T}, H, P], got {tuple(u.shape)}")
    if s is not None and (s.dim() != 2 or s.shape[1] != T):
        raise ValueError(f"{name}: s must be [H, T={T}], got {tuple(s.shape)}")
    if M is not None and (M.dim() != 4 or M.shape[0] != table.n_pieces):
        raise ValueError(f"{name}: M must be [pieces={table.n_pieces}, H, P, N], got {tuple(M.shape)}")
    if u is not None and v is not None and u.shape[1] % v.shape[1]:
        raise ValueError(f"{name}: the groups of v ({v.shape[1]}) must divide the heads of u ({u.shape[1]})")


def resolve(backend: str, like: torch.Tensor) -> str:
    """The backend ``"auto"`` picks for tensors like ``like`` (an explicit name is checked and returned)."""
    return _backend(backend, like)


def _backend(backend: str, *ts) -> str:
    if backend == "auto":
        return "triton" if all(correction_triton.supports(t) for t in ts if t is not None) else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and not all(correction_triton.runnable(t) for t in ts if t is not None):
        raise ValueError("the triton piece kernels need triton and CUDA fp16/bf16/fp32 tensors")
    return backend


# ----------------------------------------------------------------------------------------------- torch


def _apply_torch(base, v, M, s, table, out):
    T, H, P = base.shape
    G, N = v.shape[1:]
    work = _work(base, v, M)
    for p in table.nonempty:
        a, b = table.starts[p], table.starts[p] + table.lengths[p]
        m = M[p].to(work).view(G, H // G, P, N)
        corr = torch.einsum("tgn,gkpn->tgkp", v[a:b].to(work), m).reshape(b - a, H, P)
        out[a:b] = (base[a:b].to(work) + s[:, a:b].to(work).t().unsqueeze(-1) * corr).to(out.dtype)
    return out


def _tapply_torch(u, v, M, s, table, dv, accumulate):
    T, H, P = u.shape
    G, N = v.shape[1:]
    work = _work(u, v, M)
    g = torch.zeros(H, T, dtype=torch.float32 if work == torch.float32 else work, device=u.device)
    for p in table.nonempty:
        a, b = table.starts[p], table.starts[p] + table.lengths[p]
        m = M[p].to(work).view(G, H // G, P, N)
        uu = u[a:b].to(work).view(b - a, G, H // G, P)
        ss = s[:, a:b].to(work).t().view(b - a, G, H // G, 1)
        d = torch.einsum("tgkp,gkpn->tgn", uu * ss, m)
        if accumulate:
            d = d + dv[a:b].to(work)
        dv[a:b] = d.to(dv.dtype)
        corr = torch.einsum("tgn,gkpn->tgkp", v[a:b].to(work), m)
        g[:, a:b] = (uu * corr).sum(-1).reshape(b - a, H).t().to(g.dtype)
    return dv, g


def _outer_torch(u, v, s, table, out):
    T, H, P = u.shape
    G, N = v.shape[1:]
    work = _work(u, v)
    out.zero_()
    for p in table.nonempty:
        a, b = table.starts[p], table.starts[p] + table.lengths[p]
        uu = u[a:b].to(work).view(b - a, G, H // G, P) * s[:, a:b].to(work).t().view(b - a, G, H // G, 1)
        out[p] = torch.einsum("tgkp,tgn->gkpn", uu, v[a:b].to(work)).reshape(H, P, N).to(out.dtype)
    return out


# ----------------------------------------------------------------------------------------------- public


def apply(base, v, M, s, table: PieceTable, *, out=None, backend: str = "auto") -> torch.Tensor:
    """``out[t, h] = base[t, h] + s[h, t] * M[p(t), h] @ v[t, g(h)]`` (``out`` may be ``base``: in place);
    formed in fp32, rounded once to ``out``'s dtype. No autograd."""
    _check("apply", table, base, v, M, s)
    if out is None:
        out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    if _backend(backend, base, v) == "triton":
        return correction_triton.apply(base, v, M, s, table, out)
    return _apply_torch(base, v, M, s, table, out)


def tapply(u, v, M, s, table: PieceTable, *, dv=None, accumulate: bool = False, backend: str = "auto"):
    """``(dv, g)``: ``dv[t, g] (+)= sum_{h in g} s[h, t] M[p(t), h]^T @ u[t, h]`` (into ``dv`` when given,
    added to its contents with ``accumulate``) and ``g[h, t] = u[t, h] . (M[p(t), h] @ v[t, g])`` fp32.
    No autograd."""
    _check("tapply", table, u, v, M, s)
    if dv is None:
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        accumulate = False
    if _backend(backend, u, v) == "triton":
        return correction_triton.tapply(u, v, M, s, table, dv, accumulate)
    return _tapply_torch(u, v, M, s, table, dv, accumulate)


def outer(u, v, s, table: PieceTable, *, out=None, backend: str = "auto") -> torch.Tensor:
    """``M[p, h] = sum_{t in p} s[h, t] u[t, h] (x) v[t, g(h)]``, fp32 ``[pieces, H, P, N]`` (zero for an
    empty piece; into ``out`` when given, e.g. a view of an exchange buffer). No autograd."""
    _check("outer", table, u, v, None, s)
    T, H, P = u.shape
    N = v.shape[2]
    if out is None:
        out = torch.empty((table.n_pieces, H, P, N), dtype=_work(u, v), device=u.device)
    if _backend(backend, u, v) == "triton":
        return correction_triton.outer(u, v, s, table, out)
    return _outer_torch(u, v, s, table, out)


# ----------------------------------------------------------------------------------------------- decay


class _SegCumsum(torch.autograd.Function):
    """Inclusive cumsum along the last dim restarted at every piece; fp64 prefix sums, non-finite values
    counted apart (a piece's sums are NaN from its first non-finite value on, no other piece sees it)."""

    @staticmethod
    def forward(ctx, a, first, last):
        ctx.save_for_backward(first, last)
        ctx.dtype = a.dtype
        return _seg_prefix(a, first, last, reverse=False).to(a.dtype)

    @staticmethod
    def backward(ctx, g):
        first, last = ctx.saved_tensors
        return _seg_prefix(g, first, last, reverse=True).to(ctx.dtype), None, None


def _seg_prefix(a: torch.Tensor, first: torch.Tensor, last: torch.Tensor, reverse: bool) -> torch.Tensor:
    """``out[..., t] = sum of a[..., u]`` over ``u`` in ``[first[t], t]`` (``[t, last[t]]`` with ``reverse``),
    as differences of fp64 prefix sums; NaN where the range holds a non-finite value."""
    fin = torch.isfinite(a)
    cs = torch.nn.functional.pad(torch.where(fin, a, 0.0).double().cumsum(-1), (1, 0))  # cs[i]: first i
    cb = torch.nn.functional.pad((~fin).to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))
    t = torch.arange(a.shape[-1], device=a.device)
    hi, lo = (last + 1, t) if reverse else (t + 1, first)
    s = cs.index_select(-1, hi) - cs.index_select(-1, lo)
    nb = cb.index_select(-1, hi) - cb.index_select(-1, lo)
    return torch.where(nb > 0, float("nan"), s)


def segmented_cumsum(a: torch.Tensor, table: PieceTable) -> torch.Tensor:
    """``acum[..., t] = sum_{first(t) <= u <= t} a[..., u]`` (``a [..., T]``), differentiable; the sums
    and their gradients never cross a piece (a non-finite value makes its piece's later sums NaN)."""
    if a.shape[-1] != table.tokens:
        raise ValueError(f"segmented_cumsum: a has {a.shape[-1]} tokens, the pieces {table.tokens}")
    return _SegCumsum.apply(a, table.tok_first, table.tok_last)
