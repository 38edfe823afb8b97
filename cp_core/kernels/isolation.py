"""Keeping a non-finite value inside its document, in kernels that contract over several documents.

A chunked SSD sums over the tokens of a chunk (and over chunks) with weights that are zero across a
document boundary. ``0 * NaN`` is NaN, so one NaN or inf in a document would reach every later
document of the chunk (and, through the chunk-state matmul, of the row). Masking the weights cannot
help: the value itself enters the product. :class:`DocumentGuard` wraps such a kernel instead:

* in (:meth:`DocumentGuard.enter`): every non-finite element of the token inputs (and of a row's
  initial state) is replaced by 0 before the kernel sees it, so the kernel computes on finite data;
* out (:meth:`DocumentGuard.exit`): a document's outputs from its first non-finite input token on
  are NaN (a selection, ``torch.where``), as in the token recurrence; its earlier outputs are exact;
  the final state of a row is NaN when its last document is;
* backward: a non-finite upstream gradient is replaced by 0 before the kernel's backward, and every
  input gradient of a document that held a non-finite input or upstream gradient is NaN (the whole
  document: a conservative superset of the recurrence's NaN gradients, never outside the document).
  The gradients of the shared parameters (``A``, ``D``, ``dt_bias``) sum over every document, so they
  are NaN whenever some document is.

Everything is tensor ops on the data's device: no host sync. For finite data the values are unchanged
bit for bit (the selections pick the inputs and outputs themselves).
"""

from __future__ import annotations

import torch

__all__ = ["DocumentGuard"]


def _segments(seq_idx: torch.Tensor | None, b: int, l: int, device) -> torch.Tensor:
    """``[b, l]`` int64 segment ids growing by one at every change of ``seq_idx`` (0 for the first)."""
    if seq_idx is None:
        return torch.zeros(b, l, dtype=torch.long, device=device)
    s = seq_idx.long()
    prev = torch.cat([torch.zeros_like(s[:, :1]), s[:, :-1]], dim=1)
    return torch.cumsum((s != prev).long(), dim=1)  # same numbering as ssd_torch.document_ids


def _bad_tokens(t: torch.Tensor) -> torch.Tensor:
    """``[b, l]``: True where some element of token ``(b, l)`` of ``t [b, l, ...]`` is not finite."""
    return ~torch.isfinite(t).flatten(2).all(-1) if t.dim() > 2 else ~torch.isfinite(t)


class DocumentGuard:
    """Isolation state of one kernel call over ``[b, l]`` tokens numbered by ``seq_idx`` (None: one
    document per row). Use ``enter`` on the inputs, the kernel, then ``exit`` on its outputs."""

    def __init__(self, seq_idx: torch.Tensor | None, b: int, l: int, device):
        self.seg = _segments(seq_idx, b, l, device)
        self.n_seg = l + 1
        self.doc_bad: torch.Tensor | None = None  # [b, S] forward: a non-finite input in the document
        self.bad_from: torch.Tensor | None = None  # [b, l] at or after the document's first bad token
        self.grad_bad = torch.zeros(b, self.n_seg, dtype=torch.bool, device=device)  # [b, S] backward

    def per_doc(self, flag: torch.Tensor) -> torch.Tensor:
        """``[b, l]`` token flags -> ``[b, S]``: True for a segment holding a flagged token."""
        out = torch.zeros(flag.shape[0], self.n_seg, dtype=torch.long, device=flag.device)
        return out.scatter_add_(1, self.seg, flag.long()) > 0

    def enter(self, tokens: list[torch.Tensor], initial_states: torch.Tensor | None, shared: list):
        """Sanitised ``tokens`` (each ``[b, l, ...]``), ``initial_states`` ``[b, ...]`` (belongs to segment 0)
        and ``shared`` (parameters; passed through, their gradients guarded). Same order, Nones kept."""
        roles = ["tok"] * len(tokens) + ["init"] + ["shared"] * len(shared)
        ts = [*tokens, initial_states, *shared]
        present = [i for i, t in enumerate(ts) if t is not None]
        outs = _Enter.apply(self, tuple(roles[i] for i in present), *(ts[i] for i in present))
        res: list = [None] * len(ts)
        for i, o in zip(present, outs, strict=True):
            res[i] = o
        n = len(tokens)
        return res[:n], res[n], res[n + 1 :]

    def exit(self, y: torch.Tensor, final_states: torch.Tensor | None = None):
        """``y [b, l, ...]`` NaN from each bad document's first bad token on; ``final_states [b, ...]``
        NaN for rows whose last document is bad. Returns ``(y, final_states)``."""
        if final_states is None:
            return _Exit.apply(self, y), None
        return _Exit.apply(self, y, final_states)


class _Enter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, guard: DocumentGuard, roles, *ts):
        bad = torch.zeros_like(guard.seg, dtype=torch.bool)
        init_bad = None
        outs = []
        for role, t in zip(roles, ts, strict=True):
            if role == "tok":
                bad |= _bad_tokens(t)
                outs.append(torch.where(torch.isfinite(t), t, 0.0))
            elif role == "init":
                init_bad = ~torch.isfinite(t).flatten(1).all(-1)
                outs.append(torch.where(torch.isfinite(t), t, 0.0))
            else:
                outs.append(t.clone())
        # bad_from: a bad token at or before t in t's document (counts, so no NaN arithmetic)
        cnt = bad.long().cumsum(1)
        excl = cnt - bad.long()
        start = guard.seg != torch.cat(
            [guard.seg.new_full((guard.seg.shape[0], 1), -1), guard.seg[:, :-1]], 1
        )
        base = torch.cummax(torch.where(start, excl, 0), dim=1).values
        bad_from = (cnt - base) > 0
        doc_bad = guard.per_doc(bad)
        if init_bad is not None:
            bad_from = bad_from | ((guard.seg == 0) & init_bad[:, None])
            doc_bad[:, 0] |= init_bad
        guard.doc_bad, guard.bad_from = doc_bad, bad_from
        ctx.guard, ctx.roles = guard, roles
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        guard = ctx.guard
        poison = guard.doc_bad | guard.grad_bad  # [b, S]
        tok = poison.gather(1, guard.seg)  # [b, l]
        anywhere = poison.any()
        out = []
        for role, g in zip(ctx.roles, grads, strict=True):
            if g is None:
                out.append(None)
            elif role == "tok":
                out.append(torch.where(tok.view(*tok.shape, *([1] * (g.dim() - 2))), float("nan"), g))
            elif role == "init":
                out.append(torch.where(poison[:, 0].view(-1, *([1] * (g.dim() - 1))), float("nan"), g))
            else:
                out.append(torch.where(anywhere, float("nan"), g))
        return (None, None, *out)


class _Exit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, guard: DocumentGuard, y, final_states=None):
        bad_from = guard.bad_from
        ctx.guard = guard
        y = torch.where(bad_from.view(*bad_from.shape, *([1] * (y.dim() - 2))), float("nan"), y)
        if final_states is None:
            return y
        last_bad = guard.doc_bad.gather(1, guard.seg[:, -1:])[:, 0]  # [b]
        ctx.last_bad = last_bad
        shape = (-1, *([1] * (final_states.dim() - 1)))
        return y, torch.where(last_bad.view(shape), float("nan"), final_states)

    @staticmethod
    def backward(ctx, gy, gf=None):
        guard = ctx.guard
        bad_from = guard.bad_from
        gbad = _bad_tokens(gy)
        guard.grad_bad |= guard.per_doc(gbad)
        keep = torch.isfinite(gy) & ~bad_from.view(*bad_from.shape, *([1] * (gy.dim() - 2)))
        gy = torch.where(keep, gy, 0.0)
        if gf is None:
            return None, gy
        f_bad = ~torch.isfinite(gf).flatten(1).all(-1)  # [b]: the last document's gradient
        last = guard.seg[:, -1]
        guard.grad_bad[torch.arange(last.numel(), device=last.device), last] |= f_bad
        shape = (-1, *([1] * (gf.dim() - 1)))
        gf = torch.where(torch.isfinite(gf) & ~ctx.last_bad.view(shape), gf, 0.0)
        return None, gy, gf
