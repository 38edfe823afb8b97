"""Chunked SSD (Mamba2 state-space duality) in plain torch.

This is the portable backend: it runs on any device torch runs on, it is the fallback when mamba-ssm's
Triton kernel is unavailable, and it is what the tests hold against the naive per-token recurrence of
:mod:`cp_core.kernels.reference`. Gradients come from autograd through ordinary torch ops.

Semantics (those of ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined`` with ``z=None``)::

    dt'_t = softplus(dt_t + dt_bias)                  (only the bias when dt_softplus=False)
    h_t   = exp(A * dt'_t) * h_{t-1} + dt'_t * x_t B_t^T
    y_t   = C_t h_t + D * x_t

Documents: the state is reset at every change of ``seq_idx`` between consecutive tokens, so no state
crosses a document boundary. ``initial_states`` is the state of a virtual token just before the first
one, carrying document id 0; it therefore reaches the first document only when ``seq_idx[:, 0] == 0``
(this is what mamba-ssm's kernel does). Callers that pass ``initial_states`` together with ``seq_idx``
must number the documents of each row from 0. ``final_states`` is the state after the last token.

Algorithm (per chunk of ``chunk_size`` tokens, the tail padded with ``dt' = 0``, which neither decays
nor feeds the state):

* intra-chunk output: ``(C B^T) * exp(segsum(A dt'))`` masked to causal pairs of the same document;
* chunk states: each chunk's own contribution to the state at its last token;
* inter-chunk state passing, vectorised over chunks: the chunk-level recurrence is written as a
  lower-triangular decay matrix (built from a cumulative sum over chunks, as in mamba's
  ``ssd_minimal_discrete``), masked where a document boundary lies in between, and applied with one
  batched matmul; the initial state enters as chunk "-1";
* output from the incoming state: ``C_t h_in exp(cumsum(A dt'))`` for tokens of the incoming document.

Non-finite values: the chunked sums multiply other documents' tokens by zero, and ``0 * NaN`` is NaN,
so the kernel runs inside a :class:`~cp_core.kernels.isolation.DocumentGuard`: a NaN or inf never
leaves its document (nor reaches its document's earlier tokens), in the outputs or the gradients.

Accumulation is in float32 whatever the input dtype (float64 when any input is float64). Memory is
dominated by a few ``[b, nchunks, h, chunk_size, chunk_size]`` intermediates, like any chunked SSD.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .isolation import DocumentGuard

__all__ = ["ssd_torch", "ssd_torch_phases", "check_ssd_args", "compute_dtype"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}"
        )


def check_seq_idx(seq_idx: torch.Tensor | None, b: int, l: int, device: torch.device) -> None:
    """Validate a ``[b, l]`` integer document-id tensor (``None`` is accepted)."""
    if seq_idx is None:
        return
    if not isinstance(seq_idx, torch.Tensor):
        raise ValueError(f"seq_idx must be a torch.Tensor or None, got {type(seq_idx).__name__}")
    if seq_idx.dtype not in _INDEX_DTYPES:
        raise ValueError(f"seq_idx must have dtype torch.int32 (or torch.int64), got {seq_idx.dtype}")
    if _shape(seq_idx) != (b, l):
        raise ValueError(f"seq_idx must have shape [b, l] = {[b, l]}, got {list(seq_idx.shape)}")
    if seq_idx.device != device:
        raise ValueError(f"seq_idx is on {seq_idx.device} but x is on {device}")


def check_ssd_args(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, seq_idx=None, initial_states=None):
    """Validate the arguments of :func:`cp_core.kernels.ssd`; returns ``(b, l, h, p, g, n)``.

    Raises ValueError naming the offending argument and value. Only metadata is inspected (no device
    synchronisation), so ``seq_idx`` being non-decreasing is not checked.
    """
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        _check_float(name, t)
    if x.dim() != 4:
        raise ValueError(f"x must have shape [b, l, h, p], got {list(x.shape)}")
    b, l, h, p = x.shape
    if l < 1:
        raise ValueError(f"x must hold at least one token, got sequence length {l}")
    if _shape(dt) != (b, l, h):
        raise ValueError(f"dt must have shape [b, l, h] = {[b, l, h]}, got {list(dt.shape)}")
    if _shape(A) != (h,):
        raise ValueError(f"A must have shape [h] = {[h]}, got {list(A.shape)}")
    if B.dim() != 4 or _shape(B)[:2] != (b, l):
        raise ValueError(f"B must have shape [b, l, g, n] with b, l = {b}, {l}, got {list(B.shape)}")
    g, n = B.shape[2], B.shape[3]
    if g < 1 or h % g != 0:
        raise ValueError(f"the number of heads h={h} must be a multiple of the number of groups g={g} (B/C)")
    if _shape(C) != _shape(B):
        raise ValueError(f"C must have the shape of B {list(B.shape)}, got {list(C.shape)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if D is not None:
        _check_float("D", D)
        if _shape(D) not in ((h,), (h, p)):
            raise ValueError(f"D must have shape [h] = {[h]} or [h, p] = {[h, p]}, got {list(D.shape)}")
    if dt_bias is not None:
        _check_float("dt_bias", dt_bias)
        if _shape(dt_bias) != (h,):
            raise ValueError(f"dt_bias must have shape [h] = {[h]}, got {list(dt_bias.shape)}")
    if initial_states is not None:
        _check_float("initial_states", initial_states)
        if _shape(initial_states) != (b, h, p, n):
            raise ValueError(
                f"initial_states must have shape [b, h, p, n] = {[b, h, p, n]}, got {list(initial_states.shape)}"
            )
    for name, t in (
        ("dt", dt),
        ("A", A),
        ("B", B),
        ("C", C),
        ("D", D),
        ("dt_bias", dt_bias),
        ("initial_states", initial_states),
    ):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    check_seq_idx(seq_idx, b, l, x.device)
    return b, l, h, p, g, n


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any given tensor is float64, else float32 (the accumulation dtype)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def document_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """Segment ids ``[b, l]`` (int64) that grow by one at every change of ``seq_idx``.

    The virtual token before the first one has document id 0 and segment 0, so a row whose first
    ``seq_idx`` is not 0 starts in segment 1 (its first token does not see ``initial_states``).
    """
    s = seq_idx.long()
    prev = torch.cat([torch.zeros_like(s[:, :1]), s[:, :-1]], dim=1)
    return torch.cumsum((s != prev).long(), dim=1)


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum_{j < m <= i} x[..., m]`` for ``i >= j``, ``-inf`` above the diagonal.

    Built from masked cumulative sums (no difference of large prefix sums), so it stays accurate over
    long ranges.
    """
    T = x.size(-1)
    xx = x[..., None].expand(*x.shape, T)  # xx[..., i, j] = x[..., i]
    strict = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    xx = xx.masked_fill(~strict, 0.0)
    out = torch.cumsum(xx, dim=-2)
    lower = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(0)
    return out.masked_fill(~lower, float("-inf"))


def ssd_torch(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    check: bool = True,
):
    """Chunked SSD in torch; arguments and result as :func:`cp_core.kernels.ssd`.

    ``final_states`` is float32 (float64 when the computation ran in float64).
    """
    run = _TorchSSD(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, seq_idx, initial_states, check)
    final_states = run.states()
    y = run.outputs()
    if return_final_states:
        return run.guard.exit(y, final_states.reshape(run.b, run.h, run.p, run.n))
    return run.guard.exit(y)[0]


def ssd_torch_phases(x, dt, A, B, C, *, chunk_size, D=None, dt_bias=None, dt_softplus=True, seq_idx=None):
    """The torch SSD in the order mamba-ssm's chunked kernels run it: ``states()`` (chunk states, state
    passing: the final state ``[b, h, p, n]``, NaN for a row whose last document holds a non-finite
    input) first, then ``outputs()`` (``y``), so a caller can start an exchange of the final states
    before the outputs are computed. Same numbers as :func:`ssd_torch`; for forward passes without
    autograd (backward: autograd through :func:`ssd_torch`)."""
    return _Phases(_TorchSSD(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, seq_idx, None, True))


class _Phases:
    def __init__(self, run: _TorchSSD):
        self.run = run

    def states(self) -> torch.Tensor:
        r = self.run
        final = r.states().reshape(r.b, r.h, r.p, r.n)
        g = r.guard
        last_bad = g.doc_bad.gather(1, g.seg[:, -1:])[:, 0]
        return torch.where(last_bad.view(-1, 1, 1, 1), float("nan"), final)

    def outputs(self) -> torch.Tensor:
        return self.run.guard.exit(self.run.outputs())[0]


class _TorchSSD:
    """One torch SSD call, prepared (inputs guarded, chunked, ``cumsum(A dt')``); :meth:`states` (steps 2
    and 3 of the module docstring) must run before :meth:`outputs` (steps 1 and 4, and ``D``)."""

    def __init__(self, x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, seq_idx, initial_states, check):
        if check:
            b, l, h, p, g, n = check_ssd_args(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, initial_states)
        else:
            b, l, h, p = x.shape
            g, n = B.shape[2], B.shape[3]
        # a non-finite value stays in its document (and after its token): see .isolation
        guard = DocumentGuard(seq_idx, b, l, x.device)
        (x, dt, B, C), initial_states, (A, D, dt_bias) = guard.enter(
            [x, dt, B, C], initial_states, [A, D, dt_bias]
        )
        r = h // g
        T = chunk_size
        nc = math.ceil(l / T)
        pad = nc * T - l
        cdt = compute_dtype(x, dt, A, B, C, D, dt_bias, initial_states)

        # dt' = softplus(dt + bias), in the accumulation dtype
        dtp = dt.to(cdt)
        if dt_bias is not None:
            dtp = dtp + dt_bias.to(cdt)
        if dt_softplus:
            dtp = F.softplus(dtp)
        xf, Bf, Cf = x.to(cdt), B.to(cdt), C.to(cdt)
        if pad:
            # padded tokens: dt' = 0 (no decay, no input), x = B = C = 0
            dtp = F.pad(dtp, (0, 0, 0, pad))
            xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
            Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
            Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))

        self.xc = xf.view(b, nc, T, g, r, p)
        self.Bc = Bf.view(b, nc, T, g, n)
        self.Cc = Cf.view(b, nc, T, g, n)
        self.dtc = dtp.view(b, nc, T, g, r).permute(0, 1, 3, 4, 2)  # [b, c, g, r, T]
        dA = self.dtc * A.to(cdt).view(1, 1, g, r, 1)
        self.dA_cs = torch.cumsum(dA, dim=-1)  # [b, c, g, r, T]

        seg = None
        if seq_idx is not None:
            seg = document_ids(seq_idx)
            if pad:
                seg = torch.cat([seg, seg[:, -1:].expand(b, pad)], dim=1)
            seg = seg.view(b, nc, T)
        self.seg = seg
        self.guard, self.init, self.D, self.x_dtype, self.cdt = guard, initial_states, D, x.dtype, cdt
        self.b, self.l, self.h, self.p, self.g, self.n, self.r, self.T, self.nc = b, l, h, p, g, n, r, T, nc
        self.prev_states = None

    def states(self) -> torch.Tensor:
        """Steps 2 and 3: the state entering every chunk (kept for :meth:`outputs`); returns the final
        state ``[b, g, r, p, n]``."""
        b, g, r, p, n = self.b, self.g, self.r, self.p, self.n
        seg, dA_cs, dtc, xc, Bc = self.seg, self.dA_cs, self.dtc, self.xc, self.Bc
        # 2. each chunk's own state at its last token (tokens of the last token's document only)
        to_end = dA_cs[..., -1:] - dA_cs  # [b, c, g, r, T], <= 0
        if seg is not None:
            same_as_last = (seg == seg[:, :, -1:])[:, :, None, None, :]
            to_end = to_end.masked_fill(~same_as_last, float("-inf"))
        w = torch.exp(to_end) * dtc  # [b, c, g, r, T]
        xw = xc * w.permute(0, 1, 4, 2, 3)[..., None]  # [b, c, T, g, r, p]
        states = torch.einsum("bcjgn,bcjgrp->bcgrpn", Bc, xw)  # [b, c, g, r, p, n]

        # 3. inter-chunk state passing over chunks -1 (initial state), 0, ..., nc-1, vectorised
        if self.init is not None:
            init = self.init.to(self.cdt).view(b, 1, g, r, p, n)
        else:
            init = states.new_zeros(b, 1, g, r, p, n)
        states_ext = torch.cat([init, states], dim=1)  # [b, c+1, g, r, p, n]
        chunk_decay = F.pad(dA_cs[..., -1], (0, 0, 0, 0, 1, 0))  # [b, c+1, g, r]; the virtual chunk: 0
        ss = _segsum(chunk_decay.permute(0, 2, 3, 1))  # [b, g, r, z, k]
        self.seg_last = None
        if seg is not None:
            self.seg_last = F.pad(seg[:, :, -1], (1, 0))  # [b, c+1]: segment at the end of each chunk
            same = (self.seg_last[:, :, None] == self.seg_last[:, None, :])[:, None, None]  # [b, 1, 1, z, k]
            ss = ss.masked_fill(~same, float("-inf"))
        passed = torch.einsum("bgrzk,bkgrpn->bzgrpn", torch.exp(ss), states_ext)  # state after chunk z-1
        self.prev_states = passed[:, :-1]  # [b, c, g, r, p, n]: state entering chunk c
        return passed[:, -1]  # [b, g, r, p, n]

    def outputs(self) -> torch.Tensor:
        """Steps 1 and 4 and ``D``: ``y [b, l, h, p]`` in ``x``'s dtype (before the guard's exit)."""
        if self.prev_states is None:
            raise RuntimeError("_TorchSSD.outputs needs states() first")
        b, g, r, p, T, nc = self.b, self.g, self.r, self.p, self.T, self.nc
        seg, dA_cs, dtc, xc, Bc, Cc = self.seg, self.dA_cs, self.dtc, self.xc, self.Bc, self.Cc
        # 1. intra-chunk (diagonal blocks): y_i = sum_{j<=i, same doc} C_i.B_j exp(cs_i - cs_j) dt'_j x_j
        causal = torch.ones(T, T, dtype=torch.bool, device=xc.device).tril(0)
        if seg is not None:
            keep = causal & (seg[:, :, :, None] == seg[:, :, None, :])  # [b, c, i, j]
            keep = keep[:, :, None, None]
        else:
            keep = causal
        decay = torch.exp((dA_cs[..., :, None] - dA_cs[..., None, :]).masked_fill(~keep, float("-inf")))
        CB = torch.einsum("bcign,bcjgn->bcgij", Cc, Bc)  # [b, c, g, i, j]
        M = CB[:, :, :, None] * decay * dtc[..., None, :]  # [b, c, g, r, i, j]
        y = torch.einsum("bcgrij,bcjgrp->bcigrp", M, xc)

        # 4. contribution of the incoming state: y_i += exp(cs_i) C_i h_in, tokens of the incoming document
        from_start = dA_cs
        if seg is not None:
            seg_in = self.seg_last[:, :-1]  # [b, c]
            same_in = (seg == seg_in[:, :, None])[:, :, None, None, :]
            from_start = from_start.masked_fill(~same_in, float("-inf"))
        y_off = torch.einsum("bcign,bcgrpn->bcigrp", Cc, self.prev_states)
        y = y + y_off * torch.exp(from_start).permute(0, 1, 4, 2, 3)[..., None]

        D = self.D
        if D is not None:
            Dv = D.to(self.cdt).view(g, r, 1) if D.dim() == 1 else D.to(self.cdt).view(g, r, p)
            y = y + xc * Dv

        return y.reshape(b, nc * T, self.h, p)[:, : self.l].to(self.x_dtype)
