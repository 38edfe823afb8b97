"""State-passing context parallelism for Mamba2: the sequence stays sharded, only SSD states and a conv halo move.

Every document (a row of ``[B, L]`` input counts as one) is cut into ``nseg`` segments, ``2*cp``
(head-tail: rank ``r`` owns segments ``r`` and ``2cp-1-r``) or ``cp`` (contiguous). A rank's *pieces*
(its segments of every document) lie end to end in its token stream, and that stream is what the
kernels run on, unpadded: ``[pieces, length]`` rows when every piece has one length (``[B, L]`` input),
else one row whose ``seq_idx`` numbers the pieces (packed documents).

The layer after ``in_proj`` is one autograd function with a hand-written backward
(:func:`state_passing_layer`), the same lean core as cp 1 and the hidden strategy
(:mod:`cp_core.pipeline`): it keeps ``zxbcdt``, the SSD output ``y``, the norm statistics, the pieces'
initial states ``h0`` and the small conv halo; the conv output and the normalised activations are
recomputed in backward, the parameter gradients written once. Forward:

1. conv1d + SiLU on the stream, each piece from a zero context, while the halo (the ``d_conv-1`` tokens
   before every piece in its document, the last tokens of other pieces: one small all-gather) is on its
   way; then the first ``d_conv-1`` outputs of every piece are recomputed with their halo.
2. The decay ``acum = cumsum(A dt')`` restarted at every piece (fp64 prefix sums, nothing crosses a
   piece) and every piece's zero-start final state ``F`` and log-decay ``ld``: from mamba-ssm's state
   passing for rows (the SSD's first phase, :class:`~cp_core.kernels.ssd_phases.SSDForward`), from the
   per-piece product ``sum exp(ld - acum) dt' x B^T`` for one row of documents
   (:func:`cp_core.kernels.correction.outer`).
3. The exchange (:mod:`cp_core.state_exchange`: all-gather or chain) turns ``(F, ld)`` into every piece's
   true initial state ``h0``; it runs on a communication stream while the SSD's outputs ``y0`` (from a
   zero state) are computed, and only the correction waits for it.
4. The correction ``y = y0 + exp(acum) C . h0`` (fp32, rounded once, in place), gated RMSNorm and
   ``out_proj`` (:mod:`cp_core.kernels.norm`).

Backward mirrors it: the norm, the conv recomputed, ``dh0 = sum exp(acum) dy^T C`` first, its exchange
(``dh0 -> dF, dld``) launched beside the SSD's backward, which asks for ``dF`` only right before
``state_passing``'s backward (rows) and folds the decay's gradients in before ``chunk_cumsum``'s
(:func:`~cp_core.kernels.ssd_phases.ssd_backward`); the halo's gradient goes back to its owners beside
the conv's backward. Bytes per layer: :func:`cp_core.cost.comm_bytes`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import comm, kernels
from .kernels import conv_cuda, ssd_mamba
from .kernels import correction as corr
from .kernels.norm import norm_bwd, norm_fwd
from .kernels.norm import resolve as resolve_norm
from .kernels.ssd_phases import SSDForward, ssd_backward
from .layout import granule
from .pipeline import _linear_into, _no_autocast, comm_stream, hooks_active, split_in_proj
from .plan import TokenPlan, build_outside_inference, get_plan
from .regions import CONV1D, LAYOUT, NORM_PROJ, SSM, STATE_XCHG, region
from .state_exchange import EXCHANGES, ExchangePlan, exchange_bwd, exchange_fwd, payload_buffer

__all__ = ["state_passing_layer", "SPSpec"]

#: From this many elements of ``zxbcdt`` on, ``z`` and ``[x|B|C|dt]`` are computed as two tensors (the
#: Triton kernels index a strided view with int32 offsets), as the cp 1 path does.
SPLIT_IN_PROJ_ELEMENTS = 2**31


class _Plan:
    """A rank's pieces for one batch, and every index map the layer needs (device tensors; cached with
    the batch's :class:`~cp_core.plan.TokenPlan`)."""

    def __init__(self, doc_lens: list[int], cp: int, rank: int, layout: str, k: int, device):
        xp = self.xp = ExchangePlan(cp, rank, layout)
        nseg, nps = xp.nseg, xp.nps
        D = self.n_docs = len(doc_lens)
        seg = [n // nseg for n in doc_lens]
        P = self.pieces = D * nps
        lengths = [seg[p // nps] for p in range(P)]
        starts, pos = [], 0
        for n in lengths:
            starts.append(pos)
            pos += n
        self.tokens = T = pos
        self.table = corr.PieceTable(starts, lengths, device)
        #: every piece one length: the stream is [pieces, length] rows (no seq_idx); else one row of pieces
        self.rows = P > 0 and min(lengths) == max(lengths) > 0
        self.R, self.m = (P, lengths[0]) if self.rows else (1, T)
        self.seq_idx = None if self.rows else self.table.tok_piece.to(torch.int32).view(1, T)
        self.k = k
        w = k - 1
        # halo: for piece p (document d, segment c) the w global tokens before its start, in its document,
        # each the tail slot of the piece that holds it; tails: every piece's last w tokens
        tail_tok, tail_ok, halo_src, halo_ok, first_tok, first_ok = [], [], [], [], [], []
        fix_tok, fix_src = [], []
        for p in range(P):
            d, s = divmod(p, nps)
            m, c = lengths[p], xp.segment(rank, s)
            for j in range(w):
                t = starts[p] + m - w + j
                tail_tok.append(max(t, 0))
                tail_ok.append(t >= starts[p])
                q = c * m - w + j  # position in the document
                ok = q >= 0 and m > 0
                src = 0
                if ok:
                    c2 = q // m
                    o2, s2 = xp.owner(c2)
                    e = (c2 + 1) * m - 1 - q  # distance from the end of segment c2
                    src = (o2 * P + d * nps + s2) * w + (w - 1 - e)
                halo_src.append(src)
                halo_ok.append(ok)
                first_tok.append(starts[p] + j if j < m else 0)
                first_ok.append(j < m)
                if j < m:
                    fix_tok.append(starts[p] + j)
                    fix_src.append(p * w + j)
        dev = dict(device=device)
        lt = dict(dtype=torch.long, **dev)
        self.tail_tok, self.tail_ok = torch.tensor(tail_tok, **lt), torch.tensor(tail_ok, **dev)
        self.halo_src, self.halo_ok = torch.tensor(halo_src, **lt), torch.tensor(halo_ok, **dev)
        self.first_tok, self.first_ok = torch.tensor(first_tok, **lt), torch.tensor(first_ok, **dev)
        self.fix_tok, self.fix_src = torch.tensor(fix_tok, **lt), torch.tensor(fix_src, **lt)
        ok = [i for i, v in enumerate(tail_ok) if v]
        self.tail_sel = torch.tensor(ok, **lt)  # entries of tail_tok that are tokens
        self.tail_sel_tok = torch.tensor([tail_tok[i] for i in ok], **lt)
        self.halo_dst = torch.tensor(
            [s if v else cp * P * w for s, v in zip(halo_src, halo_ok, strict=True)], **lt
        )


def _get_plan(plan: TokenPlan, doc_lens, cp, rank, layout, k, device) -> _Plan:
    key = ("state_passing", rank, k)
    if key not in plan.extras:
        with build_outside_inference():  # cached with the plan: must serve a later training step too
            plan.extras[key] = _Plan(doc_lens, cp, rank, layout, k, device)
    return plan.extras[key]


@dataclass(frozen=True, eq=False)
class SPSpec:
    """Everything static about one call of the state-passing layer core."""

    plan: _Plan
    group: Any
    exchange: str  # "allgather" | "chain"
    nh: int
    hd: int
    ng: int
    ds: int
    chunk: int
    eps: float
    norm_group: int
    norm_backend: str
    ssd_backend: str  # "mamba_ssm" | "torch"
    conv_backend: str  # "causal_conv1d" | "torch"
    correction_backend: str = "auto"  # the per-piece products: "auto" | "torch" | "triton"
    overlap: bool = False  # the exchanges on the communication stream (CUDA)
    lead: tuple[int, ...] = ()  # the input's leading dims: the output is made in that shape (not a view)

    @property
    def d_inner(self) -> int:
        return self.nh * self.hd

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ng * self.ds


# ----------------------------------------------------------------------------------------------- streams


class _Job:
    def __init__(self, value, event=None):
        self.value, self.event = value, event

    def wait(self):
        if self.event is not None:
            main = torch.cuda.current_stream()
            main.wait_event(self.event)
            for t in _tensors(self.value):
                t.record_stream(main)
            self.event = None
        return self.value


def _tensors(v):
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, (tuple, list)):
        for x in v:
            yield from _tensors(x)


def _launch(spec: SPSpec, fn, *inputs) -> _Job:
    """``fn()`` on the communication stream (after what the current stream queued so far) when the spec
    overlaps, else right here; :meth:`_Job.wait` makes the current stream wait for it."""
    if not spec.overlap:
        return _Job(fn())
    main = torch.cuda.current_stream()
    side = comm_stream(main.device)
    side.wait_stream(main)
    for t in _tensors(inputs):
        t.record_stream(side)
    with torch.cuda.stream(side):
        value = fn()
        event = side.record_event()
    return _Job(value, event)


# ----------------------------------------------------------------------------------------------- conv


def _causal_fns():
    for name in ("causal_conv1d.cpp_functions", "mamba_ssm.ops.triton.ssd_combined"):
        mod = ssd_mamba.load_submodule(name)[0] if name.startswith("mamba") else _try_import(name)
        if mod is not None and getattr(mod, "causal_conv1d_fwd_function", None) is not None:
            return mod.causal_conv1d_fwd_function, mod.causal_conv1d_bwd_function
    return None


def _try_import(name):
    try:
        return importlib.import_module(name)
    except Exception:  # not installed, or an extension built for another torch
        return None


def _channel_last(t: torch.Tensor) -> torch.Tensor:
    """``[b, l, c]`` -> ``[b, c, l]`` view with stride 1 over ``c`` (a copy when the row stride is not a
    multiple of 8, what causal-conv1d's channel-last kernel needs)."""
    if t.stride(1) % 8 or t.stride(2) != 1:
        t = t.contiguous()
    return t.transpose(1, 2)


def _conv_fwd(spec: SPSpec, xbc: torch.Tensor, w, b) -> torch.Tensor:
    """Every piece's conv1d + SiLU from a zero context: ``[T, conv_dim]``, contiguous."""
    pl = spec.plan
    x3 = xbc.view(pl.R, pl.m, xbc.shape[-1])
    if spec.conv_backend == "causal_conv1d":
        fwd, _ = _causal_fns()
        return (
            fwd(_channel_last(x3), w, b, pl.seq_idx, None, None, True).transpose(1, 2).reshape(pl.tokens, -1)
        )
    with torch.no_grad():
        y = kernels.conv1d(x3, w, b, seq_idx=pl.seq_idx, activation="silu", backend="torch")
    return y.reshape(pl.tokens, -1)


def _conv_bwd(spec: SPSpec, xbc, w, b, dout: torch.Tensor, dx: torch.Tensor):
    """Backward of :func:`_conv_fwd`: ``dx`` (``xbc``'s shape, e.g. a column slice) written; ``(dw, db)``."""
    pl = spec.plan
    C = xbc.shape[-1]
    x3, d3, dx3 = (t.view(pl.R, pl.m, C) for t in (xbc, dout, dx))
    if spec.conv_backend == "causal_conv1d":
        _, bwd = _causal_fns()
        given = _channel_last(dx3)
        dnew, dw, db, _ = bwd(
            _channel_last(x3), w, b, _channel_last(d3), pl.seq_idx, None, None, given, False, True
        )
        if dnew.data_ptr() != dx3.data_ptr() or dnew.stride() != dx3.transpose(1, 2).stride():
            dx3.copy_(dnew.transpose(1, 2))
        return dw, db
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (x3, w)] + (
            [b.detach().requires_grad_()] if b is not None else []
        )
        y = kernels.conv1d(leaves[0], leaves[1], leaves[2] if b is not None else None, seq_idx=pl.seq_idx,
                           activation="silu", backend="torch")  # fmt: skip
        g = torch.autograd.grad(y, leaves, d3)
    dx3.copy_(g[0])
    return g[1], (g[2] if b is not None else None)


def _window(spec: SPSpec, xbc, halo):
    """``[P, 2w, C]``: every piece's halo, then its first ``w`` tokens (zero past its end)."""
    pl = spec.plan
    w, C = pl.k - 1, xbc.shape[-1]
    first = torch.where(pl.first_ok[:, None], xbc.index_select(0, pl.first_tok), 0.0).view(pl.pieces, w, C)
    return torch.cat([halo, first], dim=1)


def _fix(spec: SPSpec, xc, xbc, halo, w, b) -> None:
    """The first ``w`` conv outputs of every piece, recomputed with its halo, written into ``xc``."""
    pl = spec.plan
    if pl.k == 1 or not pl.fix_tok.numel():
        return
    win = _window(spec, xbc, halo)
    with torch.no_grad():
        out = kernels.conv1d(win, w, b, activation="silu", backend="torch")[:, pl.k - 1 :]
    xc.index_copy_(0, pl.fix_tok, out.reshape(-1, out.shape[-1]).index_select(0, pl.fix_src).to(xc.dtype))


def _tails(spec: SPSpec, xbc) -> torch.Tensor:
    pl = spec.plan
    return torch.where(pl.tail_ok[:, None], xbc.index_select(0, pl.tail_tok), 0.0).view(
        pl.pieces, pl.k - 1, -1
    )


def _halo(spec: SPSpec, tails) -> torch.Tensor:
    """All-gather every piece's tails, look up this rank's halos ``[P, w, C]`` (zero before a document)."""
    pl = spec.plan
    cp = pl.xp.cp
    with region(STATE_XCHG):
        got = comm.all_gather_into(tails.new_empty((cp, *tails.shape)), tails.contiguous(), spec.group)
    flat = got.reshape(-1, tails.shape[-1])
    return torch.where(pl.halo_ok[:, None], flat.index_select(0, pl.halo_src), 0.0).view(tails.shape)


# ----------------------------------------------------------------------------------------------- decay


def _dtp_a(dt, dt_bias, A):
    """``dt' = softplus(dt + dt_bias)`` and ``a = A dt'``, ``[H, T]`` fp32 (float64 for float64 input)."""
    work = torch.float64 if dt.dtype == torch.float64 else torch.float32
    dtp = F.softplus(dt.to(work) + dt_bias.to(work)).t().contiguous()
    return dtp, dtp * A.to(work)[:, None]


def _decay(spec: SPSpec, dtp, a):
    """``(exp(acum), ld [P, H], exp(ld - acum) dt' or None)`` from ``dt'`` and ``a`` (differentiable)."""
    pl = spec.plan
    tab = pl.table
    if pl.rows:  # one piece per row: a plain cumsum along each row (fp64 sums; a NaN stays in its row)
        H = a.shape[0]
        acum = a.view(H, pl.R, pl.m).double().cumsum(-1).to(a.dtype).view(H, pl.tokens)
    else:
        acum = corr.segmented_cumsum(a, tab)
    ld = torch.where(tab.has_tokens[:, None], acum.index_select(1, tab.last).t(), 0.0)
    s_f = None
    if not pl.rows:
        s_f = torch.exp(ld.t().index_select(1, tab.tok_piece) - acum) * dtp
    return torch.exp(acum), ld, s_f


# ----------------------------------------------------------------------------------------------- core


def _views(spec: SPSpec, zx, xsep):
    if xsep is not None:
        return zx.reshape(-1, zx.shape[-1]), xsep.reshape(-1, xsep.shape[-1])
    z2 = zx.reshape(-1, zx.shape[-1])
    return z2[:, : spec.d_inner], z2[:, spec.d_inner :]


def _split(spec: SPSpec, xc):
    """conv output ``[T, conv_dim]`` -> ``x [T, H, P]``, ``B``, ``C`` ``[T, G, N]`` (views)."""
    x, B, C = xc.split([spec.d_inner, spec.ng * spec.ds, spec.ng * spec.ds], dim=-1)
    return (
        x.unflatten(-1, (spec.nh, spec.hd)),
        B.unflatten(-1, (spec.ng, spec.ds)),
        C.unflatten(-1, (spec.ng, spec.ds)),
    )


def _rows(spec: SPSpec, t):
    """A stream tensor ``[T, ...]`` as the SSD's ``[R, m, ...]`` (a view)."""
    return t.view(spec.plan.R, spec.plan.m, *t.shape[1:])


def mid_forward(spec: SPSpec, xbc, dt, conv_w, conv_b, dt_bias, A, D):
    """The state-passing middle of the layer on a rank's stream: conv1d + SiLU (with the halo), the SSD,
    the state exchange over ``spec.group`` (beside the SSD's outputs) and the correction. ``xbc [T, conv_dim]``
    and ``dt [T, nh]`` (views of ``in_proj``'s output, or of a head slice after an all-to-all) -> ``(y [T,
    d_inner], kept)``; ``kept`` (the halo, ``h0``, ``ld``, the exchange's saved tensor) goes to
    :func:`mid_backward`. No autograd: the layer's functions call it (:class:`_SPCore`,
    :mod:`cp_core.hierarchical`)."""
    pl, tab = spec.plan, spec.plan.table
    cb = spec.correction_backend
    H, Pd, N = spec.nh, spec.hd, spec.ds
    halo = None
    if pl.k > 1:
        with region(LAYOUT):
            tails = _tails(spec, xbc)
        halo_job = _launch(spec, lambda: _halo(spec, tails), tails)
    with region(CONV1D):
        xc = _conv_fwd(spec, xbc, conv_w, conv_b)
    if pl.k > 1:
        halo = halo_job.wait()
        with region(LAYOUT):
            _fix(spec, xc, xbc, halo, conv_w, conv_b)
    x, B, C = _split(spec, xc)
    with region(SSM):
        dtp, a = _dtp_a(dt, dt_bias, A)
        s_corr, ld, s_f = _decay(spec, dtp, a)
        Fv, ldv = payload_buffer(pl.n_docs, pl.xp.nps, H, Pd * N, xbc.device)
        ldv.copy_(ld.view(ldv.shape))
        ssd = SSDForward(
            spec.ssd_backend, _rows(spec, x), _rows(spec, dt), A, _rows(spec, B), _rows(spec, C), spec.chunk,
            D=D, dt_bias=dt_bias, seq_idx=pl.seq_idx,
        )  # fmt: skip
        if pl.rows:
            Fv.copy_(ssd.states().view(Fv.shape))
        else:
            corr.outer(x, B, s_f, tab, out=Fv.view(pl.pieces, H, Pd, N), backend=cb)
        del s_f, dtp, a
    job = _launch(spec, lambda: _exchange_fwd(spec, Fv, ldv), Fv, ldv)
    with region(SSM):
        y = ssd.outputs().reshape(pl.tokens, H, Pd).contiguous()  # while the exchange runs
    h0, saved = job.wait()
    with region(SSM):
        corr.apply(y, C, h0.view(pl.pieces, H, Pd, N), s_corr, tab, out=y, backend=cb)
    del s_corr, xc, x, B, C, ssd
    return y.view(pl.tokens, spec.d_inner), [halo, h0, ld, saved]


def mid_backward(spec: SPSpec, dy_box: list, xbc, dt, dxbc, ddt, conv_w, conv_b, dt_bias, A, D, kept):
    """Backward of :func:`mid_forward`: ``dy_box[0]`` (``dy [T, d_inner]``, taken out of the list so it is
    freed once used) -> ``dxbc`` and ``ddt`` written (column slices of the caller's buffer); returns
    ``(dconv_w, dconv_b, ddt_bias, dA, dD)``. The conv output is recomputed; ``dh0``'s exchange runs beside
    the SSD's backward and the halo's gradient goes back beside the conv's."""
    pl = spec.plan
    halo, h0, ld, saved = kept
    kept.clear()
    with region(CONV1D + "_bwd"):
        xc = _conv_fwd(spec, xbc, conv_w, conv_b)
        if pl.k > 1:
            _fix(spec, xc, xbc, halo, conv_w, conv_b)
    dxc = torch.empty_like(xc)
    dA, dD, ddt_bias = _ssd_and_correction_backward(
        spec, dy_box.pop(), xc, dxc, dt, ddt, A, D, dt_bias, h0, ld, saved
    )
    del xc, h0, ld, saved
    dconv_w, dconv_b = _conv_backward(spec, xbc, dxc, dxbc, halo, conv_w, conv_b)
    return dconv_w, dconv_b, ddt_bias, dA, dD


class _SPCore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zx, xsep, conv_w, conv_b, dt_bias, A, D, norm_w, out_w, spec: SPSpec):
        z, xbcdt = _views(spec, zx, xsep)
        xbc, dt = xbcdt[:, : spec.conv_dim], xbcdt[:, spec.conv_dim :]
        y, (halo, h0, ld, saved) = mid_forward(spec, xbc, dt, conv_w, conv_b, dt_bias, A, D)
        with region(NORM_PROJ):
            normed, rstd = norm_fwd(y, z, norm_w, spec.eps, spec.norm_group, spec.norm_backend)
            # a tensor of its own in the input's leading shape, not a view (in-place residual adds work)
            out = _linear_into(normed, out_w, spec.lead or zx.shape[:-1])
        ctx.spec = spec
        ctx.shapes = (zx.shape, None if xsep is None else xsep.shape)
        params = (zx, xsep, conv_w, conv_b, dt_bias, A, D, norm_w, out_w)
        if hooks_active():  # checkpointing / offloading: everything kept goes through the hooks
            ctx.save_for_backward(*params, y, rstd, halo, h0, ld, saved)
            ctx.inter = "saved"
        else:
            ctx.save_for_backward(*params)
            # held rather than saved, so that backward can drop each one once it is used
            ctx.inter = [y, rstd, halo, h0, ld, saved]
        return out

    @staticmethod
    def backward(ctx, dout):
        with _no_autocast(dout):  # the dtypes forward chose, also when backward() runs under autocast
            return _SPCore._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        spec: SPSpec = ctx.spec
        pl = spec.plan
        if ctx.inter is None:
            raise RuntimeError(
                "the state-passing layer's backward runs once per forward (its intermediates are freed)"
            )
        kept = ctx.saved_tensors  # once: checkpointing's hooks unpack each tensor once
        zx, xsep, conv_w, conv_b, dt_bias, A, D, norm_w, out_w = kept[:9]
        if ctx.inter == "saved":
            y, rstd, halo, h0, ld, saved = kept[9:]
        else:
            y, rstd, halo, h0, ld, saved = ctx.inter
        del kept
        ctx.inter = None
        zshape, xshape = ctx.shapes
        z, xbcdt = _views(spec, zx, xsep)
        xbc, dt = xbcdt[:, : spec.conv_dim], xbcdt[:, spec.conv_dim :]
        T = pl.tokens
        # gradient buffers: dz and d[x|B|C|dt] as the column ranges of one d zxbcdt (or two tensors)
        if xshape is None:
            dzx = torch.empty((T, zx.shape[-1]), dtype=zx.dtype, device=zx.device)
            dz, dxbcdt, dxs = dzx[:, : spec.d_inner], dzx[:, spec.d_inner :], None
        else:
            dzx = dz = torch.empty((T, zx.shape[-1]), dtype=zx.dtype, device=zx.device)
            dxbcdt = dxs = torch.empty((T, xsep.shape[-1]), dtype=xsep.dtype, device=xsep.device)
        dxbc, ddt = dxbcdt[:, : spec.conv_dim], dxbcdt[:, spec.conv_dim :]
        with region(NORM_PROJ + "_bwd"):
            d2 = dout.reshape(T, -1)
            dnormed = d2 @ out_w
            dy, _, dnorm_w, normed = norm_bwd(
                dnormed, y, z, norm_w, rstd, spec.eps, spec.norm_group, spec.norm_backend, dz=dz,
                recompute_output=True,
            )  # fmt: skip
            del dnormed, y, rstd
            dout_w = d2.t() @ normed
            del normed
        box, kept = [dy], [halo, h0, ld, saved]
        del dy, halo, h0, ld, saved  # mid_backward frees each once used
        dconv_w, dconv_b, ddt_bias, dA, dD = mid_backward(
            spec, box, xbc, dt, dxbc, ddt, conv_w, conv_b, dt_bias, A, D, kept
        )
        dx_out = None if xshape is None else dxs.view(xshape)
        return dzx.view(zshape), dx_out, dconv_w, dconv_b, ddt_bias, dA, dD, dnorm_w, dout_w, None


def _ssd_and_correction_backward(spec: SPSpec, dy, xc, dxc, dt, ddt, A, D, dt_bias, h0, ld, saved):
    """The correction's, the exchange's and the SSD's backward: ``dxc`` (the conv output's gradient) and
    ``ddt`` written; returns ``(dA, dD, ddt_bias)``. ``dh0`` is formed first and its exchange runs beside
    the SSD's backward, which takes ``dF`` (rows) and the decay's gradients as late as it can."""
    pl, tab, cb = spec.plan, spec.plan.table, spec.correction_backend
    H, Pd, N, T = spec.nh, spec.hd, spec.ds, spec.plan.tokens
    x, B, C = _split(spec, xc)
    dy3 = dy.view(T, H, Pd)
    M0 = h0.view(pl.pieces, H, Pd, N)
    with region(SSM + "_bwd"):
        dtp, a = (t.detach().requires_grad_() for t in _dtp_a(dt, dt_bias, A))
        with torch.enable_grad():
            s_corr, ld_g, s_f = _decay(spec, dtp, a)
        dh0 = corr.outer(dy3, C, s_corr.detach(), tab, backend=cb)
    job = _launch(spec, lambda: _exchange_bwd(spec, dh0, h0, ld, saved), dh0, h0, ld)
    dx, dB, dC = _split(spec, dxc)
    got = {}

    def exchanged():
        if "dF" not in got:
            got["dF"], got["dld"] = job.wait()
        return got["dF"], got["dld"]

    def dfinal():  # rows: the final states' gradient enters mamba-ssm's state passing backward
        return exchanged()[0].view(pl.R, H, Pd, N)

    def extra(_dx, dB32, dC32):  # the SSD's dx written, its dB, dC in fp32: the correction's and F's terms
        dC32, dB32 = dC32.view(T, spec.ng, N), dB32.view(T, spec.ng, N)
        _, g_corr = corr.tapply(dy3, C, M0, s_corr.detach(), tab, dv=dC32, accumulate=True, backend=cb)
        dF, dld = exchanged()
        outs, grads = [s_corr, ld_g], [g_corr, dld.view(pl.pieces, H)]
        if s_f is not None:  # one row of documents: the final states came from the per-piece product
            dFp = dF.view(pl.pieces, H, Pd, N)
            corr.apply(dx, B, dFp, s_f.detach(), tab, out=dx, backend=cb)
            _, g_f = corr.tapply(x, B, dFp, s_f.detach(), tab, dv=dB32, accumulate=True, backend=cb)
            outs.append(s_f)
            grads.append(g_f)
        with torch.enable_grad():
            d_dtp, d_a = torch.autograd.grad(outs, (dtp, a), grads, allow_unused=True)
        return d_dtp, d_a

    with region(SSM + "_bwd"):
        return ssd_backward(
            spec.ssd_backend, _rows(spec, dy3), _rows(spec, x), _rows(spec, dt), A, _rows(spec, B),
            _rows(spec, C), spec.chunk, D, dt_bias, pl.seq_idx, dx=_rows(spec, dx), ddt=_rows(spec, ddt),
            dB=_rows(spec, dB), dC=_rows(spec, dC), dfinal=dfinal if pl.rows else None, extra=extra,
        )  # fmt: skip


def _exchange_fwd(spec: SPSpec, Fv, ldv):
    with region(STATE_XCHG):
        return exchange_fwd(spec.exchange, Fv, ldv, spec.plan.xp, spec.group)


def _exchange_bwd(spec: SPSpec, dh0, h0, ld, saved):
    pl = spec.plan
    with region(STATE_XCHG + "_bwd"):
        return exchange_bwd(
            spec.exchange, dh0.view(h0.shape), h0, ld.view(h0.shape[:3]), saved, pl.xp, spec.group
        )


def _conv_backward(spec: SPSpec, xbc, dxc, dxbc, halo, w, b):
    """conv1d's backward: the first outputs of every piece through their window (the halo's gradient goes
    back to its owners beside the main backward), the rest through the conv of the stream."""
    pl = spec.plan
    k = pl.k
    with region(CONV1D + "_bwd"):
        dw2 = db2 = job = None
        if k > 1 and pl.fix_tok.numel():
            C = xbc.shape[-1]
            with torch.enable_grad():
                win = _window(spec, xbc, halo).detach().requires_grad_()
                lw = w.detach().requires_grad_()
                lb = None if b is None else b.detach().requires_grad_()
                out = kernels.conv1d(win, lw, lb, activation="silu", backend="torch")[:, k - 1 :]
                gout = torch.zeros_like(out).view(-1, C)
                gout.index_copy_(0, pl.fix_src, dxc.index_select(0, pl.fix_tok).to(gout.dtype))
                wrt = [win, lw] + ([lb] if lb is not None else [])
                g = torch.autograd.grad(out, wrt, gout.view(out.shape))
            dwin, dw2 = g[0], g[1]
            db2 = g[2] if lb is not None else None
            dxc.index_fill_(0, pl.fix_tok, 0.0)  # those outputs came from the window
            d_halo, d_first = dwin[:, : k - 1].reshape(-1, C), dwin[:, k - 1 :].reshape(-1, C)
            cp = pl.xp.cp
            back = d_halo.new_zeros((cp * pl.pieces * (k - 1) + 1, C))
            back.index_add_(0, pl.halo_dst, d_halo)
            job = _launch(spec, lambda: _halo_back(spec, back), back)
        dw, db = _conv_bwd(spec, xbc, w, b, dxc, dxbc)
        if job is not None:
            sel = pl.first_ok.nonzero().view(-1)
            dxbc.index_add_(0, pl.first_tok.index_select(0, sel), d_first.index_select(0, sel).to(dxbc.dtype))
            d_tails = job.wait()
            dxbc.index_add_(0, pl.tail_sel_tok, d_tails.index_select(0, pl.tail_sel).to(dxbc.dtype))
            dw = dw + dw2.to(dw.dtype)
            if db is not None:
                db = db + db2.to(db.dtype)
    return dw, db


def _halo_back(spec: SPSpec, back):
    """Sum every rank's halo gradients and keep this rank's tails' ``[P*w, C]``."""
    pl = spec.plan
    n = pl.pieces * (pl.k - 1)
    with region(STATE_XCHG + "_bwd"):
        full = comm.all_reduce_(back[:-1].contiguous(), spec.group)
    return full[pl.xp.rank * n : (pl.xp.rank + 1) * n]


# ----------------------------------------------------------------------------------------------- entry


def _backends(mixer, x, conv_w) -> tuple[str, str]:
    ssd_name, conv_name = kernels.resolve_backends(x.device, mixer.ssd_backend, mixer.conv_backend)
    if ssd_name == "mamba_ssm" and (
        not ssd_mamba.supports(x)[0]
        or ssd_mamba.load_submodule("mamba_ssm.ops.triton.ssd_combined")[0] is None
    ):
        if mixer.ssd_backend != "auto":
            raise ValueError(f"SSD backend 'mamba_ssm' cannot run here: {ssd_mamba.supports(x)[1]}")
        ssd_name = "torch"
    if conv_name == "causal_conv1d" and (not conv_cuda.supports(x, conv_w)[0] or _causal_fns() is None):
        if mixer.conv_backend != "auto":
            raise ValueError(
                f"conv backend 'causal_conv1d' cannot run here: {conv_cuda.supports(x, conv_w)[1]}"
            )
        conv_name = "torch"
    return ssd_name, conv_name


def state_passing_layer(
    mixer,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    *,
    correction_backend: str = "auto",
    overlap: bool | None = None,
    params=None,
) -> torch.Tensor:
    """The whole Mamba2 layer of ``mixer`` (``in_proj`` to ``out_proj``) on this rank's shard
    ``[B, L/cp, d_model]`` (or packed ``[T/cp, d_model]`` with the global ``cu_seqlens``) under the
    state-passing strategy; returns the output shard of the same shape (a tensor of its own).

    ``correction_backend``: the per-piece products (:mod:`cp_core.kernels.correction`); ``overlap``: the
    exchanges on a communication stream (default: on CUDA); ``params``: the
    :class:`~cp_core.mixer.Weights` to use (under autocast: copies in the compute dtype), default the mixer's."""
    w = mixer.weights() if params is None else params
    c = mixer.config
    group, layout = mixer.cp_group, mixer.layout
    cp, rank = comm.group_size(group), comm.group_rank(group)
    dev = hidden_states.device
    x2 = hidden_states.reshape(-1, c.d_model)
    tokens = x2.shape[0]
    if cu_seqlens is None:
        batch, local = hidden_states.shape[0], hidden_states.shape[1]
        length = local * cp
        plan = get_plan(cp, layout, batch, length, dev)
        doc_lens = [length] * batch
    else:
        length = tokens * cp
        plan = get_plan(cp, layout, 1, length, dev, cu_seqlens)
        cu = plan.host_cu
        doc_lens = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
    if mixer.state_exchange not in EXCHANGES:
        raise ValueError(f"state_exchange must be one of {EXCHANGES}, got {mixer.state_exchange!r}")
    nseg = granule(layout, cp) if cp > 1 else (2 if layout == "head_tail" else 1)
    if any(
        n % nseg for n in doc_lens
    ):  # the mixer checked it (at cp 1 a direct call may cut one rank's rows)
        raise ValueError(f"every document length must be a multiple of {nseg} segments, got {doc_lens}")
    pl = _get_plan(plan, doc_lens, cp, rank, layout, c.d_conv, dev)
    conv_w = w.conv.squeeze(1)
    ssd_name, conv_name = _backends(mixer, hidden_states, conv_w)
    if dev.type == "cuda":  # the same shapes on every rank: all raise before the first collective
        kernels.check_int32_extent(
            f"a rank's layer tensors (cp {cp}, {tokens} local tokens)",
            tokens * max(c.conv_dim + c.n_heads, c.d_inner),
            "use a larger cp_size or shorter sequences",
        )
    norm_backend = resolve_norm("auto", hidden_states)
    mixer.backends = {
        "ssd": ssd_name,
        "conv": conv_name,
        "norm": norm_backend,
        "correction": correction_backend,
    }
    spec = SPSpec(
        plan=pl, group=group, exchange=mixer.state_exchange, nh=c.n_heads, hd=c.head_dim, ng=c.n_groups,
        ds=c.d_state, chunk=c.chunk_size, eps=c.norm_eps, norm_group=c.d_inner // c.n_groups,
        norm_backend=norm_backend, ssd_backend=ssd_name, conv_backend=conv_name,
        correction_backend=correction_backend, overlap=dev.type == "cuda" if overlap is None else overlap,
        lead=tuple(hidden_states.shape[:-1]),
    )  # fmt: skip
    with region(NORM_PROJ):
        if tokens * c.d_in_proj >= SPLIT_IN_PROJ_ELEMENTS:
            zx, xsep = split_in_proj(x2, w.in_proj, c.d_inner)
        else:
            zx, xsep = F.linear(x2, w.in_proj), None
    A = -torch.exp(w.A_log.float())
    D = w.D.view(c.n_heads, c.head_dim) if c.D_has_hdim else w.D
    # the output is made in the input's shape (spec.lead): no view of it is returned
    return _SPCore.apply(zx, xsep, conv_w, w.conv_bias, w.dt_bias, A, D, w.norm, w.out_proj, spec)
