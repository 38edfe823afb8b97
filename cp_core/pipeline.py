"""The Mamba2 layer after ``in_proj``, as one autograd function with a hand-written backward.

``zxbcdt`` (this rank's ``in_proj`` output) ->

1. (hidden CP) ``[x | B | C | dt]`` to head-sharded global order: pack, one all-to-all, one row gather
   (:mod:`cp_core.hidden`); ``z`` stays on its rank;
2. conv1d + SiLU + SSD (:mod:`cp_core.kernels.conv_ssd`, keeps only its input);
3. (hidden CP) ``y`` back to the sequence shard: one all-to-all into one slot per rank and head chunk;
4. gated RMSNorm with the local ``z`` and ``out_proj`` (:mod:`cp_core.kernels.norm`; the normalised
   activations are recomputed in backward, not kept). The norm reads ``y`` in the received slots and its
   backward writes ``dy`` in the slots that are sent (no unpack or pack pass) where every norm group
   lies in one slot; otherwise the slots are unpacked into ``y`` first (and ``dy`` packed again).

Why one function: the backward writes ``dz`` (norm backward) and ``d[x|B|C|dt]`` (conv backward, or the
return all-to-all's unpack) straight into the two column ranges of one ``d zxbcdt`` buffer, with no
concatenation; nothing but ``zxbcdt``, the head-sharded input of step 2 (hidden CP), ``y`` and the norm
statistics is kept for backward. At cp 1 the same kernels run as in mamba-ssm's fused ``Mamba2``.

**Overlap** (``chunks = k > 1``, CUDA): the heads of every rank are cut into ``k`` chunks, each of whole
groups or, where a rank holds fewer groups than chunks, of part of one group's heads with a copy of
that group's B and C (whose gradients the chunks then sum); each chunk is an independent problem (its
channels, heads, groups, parameters). All ``k`` forward all-to-alls are queued on a communication
stream up front; chunk ``j``'s conv1d + SSD runs on the compute stream as soon as its own all-to-all is
done, and its return all-to-all is queued on the communication stream right after, so the transfers of
chunk ``j+1`` (and the return of chunk ``j``) run while chunk ``j`` (``j+1``) computes. The backward does
the same in reverse order of data flow: each chunk's ``dy`` transfer starts once its slots' norm
backward is queued (before ``out_proj``'s weight gradient), and the last return of ``d[x|B|C|dt]`` is
left to ``in_proj``'s backward, which first runs its ``dz`` products.
Cross-stream safety: the communication stream waits on an event of the compute stream before it reads
what the compute stream produced and vice versa; every tensor used on the other stream is marked with
``record_stream``. No host synchronisation anywhere. ``k = 1`` runs everything on the current stream,
in the order of the unchunked layer. On CPU (or ``overlap=False``) the chunks run one after the other:
the same arithmetic per head, so every ``k`` gives the same numbers (up to the order in which chunks
that split a group sum its B/C gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .channels import ChannelPlan
from .hidden import _heads_to_seq, _seq_to_heads, _to_heads, _to_seq
from .kernels.conv_ssd import ConvSSDSpec, conv_ssd_bwd, conv_ssd_fwd
from .kernels.norm import norm_bwd, norm_bwd_slots, norm_fwd, norm_fwd_slots
from .plan import TokenPlan
from .regions import A2A_POST, A2A_PRE, LAYOUT, NORM_PROJ, SSM, region

__all__ = ["CoreSpec", "layer_core", "split_in_proj", "slot_in_proj", "slot_rows", "comm_stream"]


@dataclass(frozen=True, eq=False)
class CoreSpec:
    """Everything static about one call of :func:`layer_core` (built once per layer and batch shape)."""

    d_inner: int
    norm_group: int
    eps: float
    norm_backend: str
    conv: ConvSSDSpec  # one head chunk's conv1d + SSD (all chunks have the same shape)
    cp_size: int = 1
    group: Any = None
    tok: TokenPlan | None = None
    batch: int = 1  # rows of the conv/SSD input: B (BSHD) or 1 (packed)
    length: int = 0  # global tokens per row
    seq_idx: torch.Tensor | None = None
    chans: tuple[ChannelPlan, ...] = ()  # [x|B|C|dt] plan of each head chunk
    chans_post: tuple[ChannelPlan, ...] = ()  # y plan of each head chunk
    rows: tuple[torch.Tensor | None, ...] = (None,)  # rows of the local conv weight in each chunk
    overlap: bool = False  # run the chunks on two CUDA streams
    #: hidden CP: ``in_proj``'s rows of every send slot (:func:`slot_rows`); the layer then takes
    #: ``[x|B|C|dt]`` as the send buffers themselves (:func:`slot_in_proj`), with no pack
    slot_rows: torch.Tensor | None = None
    slot_unique: bool = True  # no in_proj row feeds two slots (no B/C group replicated over ranks)
    #: hidden CP: the first channel of every returned ``y`` slot (slot ``j*cp + r``: rank ``r``'s head chunk
    #: ``j``) when the norm reads the slots as received and its backward writes the slots that are sent
    #: (every norm group inside one slot; :func:`~cp_core.kernels.norm.norm_fwd_slots`); empty: the
    #: slots are unpacked into ``y`` first and ``dy`` packed again
    y_cols: tuple[int, ...] = ()
    #: the compute dtype: of the layer's inputs and parameters (``A`` is fp32), and of every buffer the core
    #: allocates and every collective's send and receive buffer (None: the input's)
    dtype: torch.dtype | None = None

    @property
    def chunks(self) -> int:
        return len(self.rows)


_STREAMS: dict[int, torch.cuda.Stream] = {}


def comm_stream(device: torch.device) -> torch.cuda.Stream:
    """The communication stream of ``device`` (one per device and process, created on first use)."""
    idx = torch.device(device).index
    idx = torch.cuda.current_device() if idx is None else idx
    if idx not in _STREAMS:
        _STREAMS[idx] = torch.cuda.Stream(device=idx)
    return _STREAMS[idx]


def _run_chunks(
    spec: CoreSpec,
    pre,
    compute,
    post,
    outs: tuple[torch.Tensor, ...],
    ready=None,
    join: bool = True,
) -> None:
    """``post(j, compute(j, pre(j)))`` for every chunk; with ``spec.overlap`` the ``pre``/``post`` steps
    (the communication) run on the communication stream, overlapped with the other chunks' ``compute``.
    ``ready[j]`` (CUDA events of the current stream), when given, is when chunk ``j``'s input to ``pre`` is
    complete: its transfer may then start before the current stream has finished what it queued later.
    ``join=False``: the current stream does not wait for the last ``post``; whoever reads what it wrote
    must first wait for the communication stream (:class:`_SlotLinear`'s backward does)."""
    k = spec.chunks
    if not spec.overlap:
        for j in range(k):
            post(j, compute(j, pre(j)))
        return
    main = torch.cuda.current_stream()
    side = comm_stream(main.device)
    if ready is None:
        side.wait_stream(main)
    for t in outs:
        t.record_stream(side)
    staged = []
    with torch.cuda.stream(side):
        for j in range(k):
            if ready is not None:
                side.wait_event(ready[j])
            a = pre(j)
            staged.append((a, side.record_event()))
    for j in range(k):
        a, ready_j = staged[j]
        main.wait_event(ready_j)
        a.record_stream(main)
        b = compute(j, a)
        side.wait_event(main.record_event())
        with torch.cuda.stream(side):
            b.record_stream(side)
            post(j, b)
    if join:
        main.wait_stream(side)


def _chunk_params(spec: CoreSpec, j: int, conv_w, conv_b, dt_bias, A, D):
    rows = spec.rows[j]
    if rows is None:
        return conv_w, conv_b, dt_bias, A, D
    h = spec.conv.nh
    hs = slice(j * h, (j + 1) * h)
    return (
        conv_w.index_select(0, rows),
        None if conv_b is None else conv_b.index_select(0, rows),
        dt_bias[hs],
        A[hs],
        None if D is None else D[hs],
    )


def _rows_to_full(like: torch.Tensor, rows, parts, shared: bool) -> torch.Tensor:
    """The chunks' gradients ``parts[j]`` (of ``like``'s rows ``rows[j]``) as one tensor shaped like ``like``;
    ``shared``: some rows belong to several chunks and their gradients are summed."""
    if shared:
        out = torch.zeros_like(like)
        for r, g in zip(rows, parts, strict=True):
            out.index_add_(0, r, g)
        return out
    out = torch.empty_like(like)
    for r, g in zip(rows, parts, strict=True):
        out.index_copy_(0, r, g)
    return out


def _views(spec: CoreSpec, zx: torch.Tensor, xsep: torch.Tensor | None):
    """``(z, xbcdt)`` as 2-D ``[tokens, width]``: column slices of one ``zxbcdt``, or two tensors."""
    if xsep is not None:
        return zx.reshape(-1, zx.shape[-1]), xsep.reshape(-1, xsep.shape[-1])
    z2 = zx.reshape(-1, zx.shape[-1])
    return z2[:, : spec.d_inner], z2[:, spec.d_inner :]


def hooks_active() -> bool:
    """Saved-tensor hooks are installed (non-reentrant activation checkpointing, ``save_on_cpu``, ...): what a
    function keeps for backward must then go through ``save_for_backward`` for the hooks to see it."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return True if top is None else top(False) is not None


def _check_dtypes(spec: CoreSpec, **tensors) -> torch.dtype:
    """Every floating input of the core in one dtype (the compute dtype), so that every buffer and collective
    of the layer has it; ValueError naming the odd one, before any collective (the same on every rank: the
    ranks agreed on the input's dtype)."""
    want = spec.dtype if spec.dtype is not None else tensors["zx"].dtype
    for name, t in tensors.items():
        if t is not None and t.dtype != want:
            raise ValueError(
                f"the layer core computes in {want} but {name} is {t.dtype}: cast the parameters and the input "
                f"to one dtype (under torch.autocast, Mamba2Mixer does it)"
            )
    return want


def _linear_into(normed: torch.Tensor, out_w: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    """``normed @ out_w.T`` written into a new ``[*lead, d_model]`` tensor, returned as it is (not a view of a
    buffer: the caller may add into it in place, e.g. a residual)."""
    out = normed.new_empty((*lead, out_w.shape[0]))
    torch.mm(normed, out_w.t(), out=out.view(-1, out_w.shape[0]))
    return out


def _no_autocast(t: torch.Tensor):
    """Backward passes compute in the dtypes forward chose, also when ``backward()`` is called under autocast."""
    return torch.autocast(t.device.type, enabled=False)


def core_forward(spec: CoreSpec, zx, xsep, conv_w, conv_b, dt_bias, A, D, norm_w, out_w):
    """The core's forward without autograd: ``(out, y, rstd, saved_xh)``, what backward needs besides the
    inputs (:func:`core_backward`): ``y`` (or its slots), the norm statistics, the head-sharded conv input
    of every head chunk (cp > 1)."""
    cs = spec.conv
    dtype = _check_dtypes(
        spec, zx=zx, xbcdt=xsep, conv_weight=conv_w, conv_bias=conv_b, dt_bias=dt_bias, D=D,
        norm_weight=norm_w, out_proj_weight=out_w,
    )  # fmt: skip
    z, xbcdt = _views(spec, zx, xsep)
    n = z.shape[0]
    saved_xh: list[torch.Tensor] = []
    if spec.cp_size == 1:
        with region(SSM):
            y = conv_ssd_fwd(
                cs, xbcdt.view(spec.batch, -1, cs.width), conv_w, conv_b, dt_bias, A, D, spec.seq_idx
            )
        y = y.view(n, spec.d_inner)
    else:
        group, tok, cp = spec.group, spec.tok, spec.cp_size
        # the return all-to-all's receive buffer: the slots as received [k*cp, N, w], or y itself
        shape = (
            (spec.chunks * cp, n, spec.d_inner // (spec.chunks * cp)) if spec.y_cols else (n, spec.d_inner)
        )
        y = torch.empty(shape, dtype=dtype, device=z.device)

        def pre(j):
            if spec.slot_rows is not None:  # xsep holds the send buffers: [k*cp, N, w]
                send = xsep[j * spec.cp_size : (j + 1) * spec.cp_size]
                return _to_heads(send, spec.chans[j], tok, group, A2A_PRE, LAYOUT)
            return _seq_to_heads(xbcdt, spec.chans[j], tok, group, A2A_PRE, LAYOUT)

        def compute(j, xh):
            saved_xh.append(xh)
            with region(SSM):
                yh = conv_ssd_fwd(
                    cs, xh.view(spec.batch, spec.length, cs.width),
                    *_chunk_params(spec, j, conv_w, conv_b, dt_bias, A, D), spec.seq_idx,
                )  # fmt: skip
            return yh.view(-1, cs.dim)

        def post(j, yh):
            if spec.y_cols:
                _to_seq(yh, spec.chans_post[j], tok, group, A2A_POST, LAYOUT, recv=y[j * cp : (j + 1) * cp])
            else:
                _heads_to_seq(yh, spec.chans_post[j], tok, group, A2A_POST, LAYOUT, out=y)

        ready = getattr(xsep, "chunk_ready", None) if spec.slot_rows is not None else None
        _run_chunks(spec, pre, compute, post, (y,), ready)
    with region(NORM_PROJ):
        if spec.y_cols:
            normed, rstd = norm_fwd_slots(
                y, spec.y_cols, z, norm_w, spec.eps, spec.norm_group, spec.norm_backend
            )
        else:
            normed, rstd = norm_fwd(y, z, norm_w, spec.eps, spec.norm_group, spec.norm_backend)
        out = _linear_into(normed, out_w, zx.shape[:-1])
    return out, y, rstd, saved_xh


class _LayerCore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zx, xsep, conv_w, conv_b, dt_bias, A, D, norm_w, out_w, spec: CoreSpec):
        out, y, rstd, saved_xh = core_forward(spec, zx, xsep, conv_w, conv_b, dt_bias, A, D, norm_w, out_w)
        ctx.spec = spec
        # at cp > 1 nothing needs xbcdt after its all-to-all (the conv input kept is the head-sharded one)
        keep_x = xsep if (xsep is not None and spec.cp_size == 1) else None
        ctx.shapes = (zx.shape, None if xsep is None else xsep.shape)
        params = (zx, keep_x, conv_w, conv_b, dt_bias, A, D, norm_w, out_w)
        if hooks_active():
            # checkpointing / offloading: everything kept goes through the hooks, which may drop or move it
            rstds = rstd if isinstance(rstd, list) else [rstd]
            ctx.inter = ("saved", isinstance(rstd, list), len(rstds), len(saved_xh))
            ctx.save_for_backward(*params, y, *rstds, *saved_xh)
        else:
            # intermediates held here rather than saved, so that backward can drop each one as soon as it is used
            ctx.save_for_backward(*params)
            ctx.inter = [y, rstd, saved_xh]
        return out

    @staticmethod
    def backward(ctx, dout):
        with _no_autocast(dout):
            return _LayerCore._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        spec: CoreSpec = ctx.spec
        if ctx.inter is None:
            raise RuntimeError(
                "the layer core's backward runs once per forward (its intermediates are freed)"
            )
        saved = ctx.saved_tensors
        zx, keep_x, conv_w, conv_b, dt_bias, A, D, norm_w, out_w = saved[:9]
        if ctx.inter[0] == "saved":
            _, listed, n_rstd, n_xh = ctx.inter
            y, rest = saved[9], list(saved[10:])
            rstd = rest[:n_rstd] if listed else rest[0]
            saved_xh = rest[n_rstd : n_rstd + n_xh]
            del saved, rest
        else:
            y, rstd, saved_xh = ctx.inter
        ctx.inter = None
        inter = [y, rstd, list(saved_xh)]
        del y, rstd, saved_xh
        params = (conv_w, conv_b, dt_bias, A, D, norm_w, out_w)
        return (*core_backward(spec, dout, zx, ctx.shapes[1], keep_x, *params, inter), None)


def core_backward(
    spec: CoreSpec, dout, zx, xshape, keep_x, conv_w, conv_b, dt_bias, A, D, norm_w, out_w, inter
):
    """Gradients ``(dzx, dxbcdt or None, dconv_w, dconv_b, ddt_bias, dA, dD, dnorm_w, dout_w)`` of
    :func:`core_forward`; ``xshape``: the shape of its ``xsep`` (None: one ``zxbcdt``); ``inter``: the list
    ``[y, rstd, saved_xh]``, emptied here so that each is freed as soon as it has been used."""
    cs = spec.conv
    y, rstd, saved_xh = inter
    inter.clear()
    zshape = zx.shape
    z2 = zx.reshape(-1, zx.shape[-1])
    n = z2.shape[0]
    d2 = dout.reshape(n, -1)
    dz2 = torch.empty_like(z2)
    if xshape is None:
        z, xbcdt = z2[:, : spec.d_inner], z2[:, spec.d_inner :]
        dz, dxbcdt = dz2[:, : spec.d_inner], dz2[:, spec.d_inner :]
    elif spec.slot_rows is not None:
        z, dz, xbcdt = z2, dz2, None
        dxbcdt = torch.empty(xshape, dtype=spec.dtype or z2.dtype, device=z2.device)  # the received slots
    else:
        z, dz = z2, dz2
        xbcdt = None if keep_x is None else keep_x.reshape(n, -1)
        dxbcdt = torch.empty((n, xshape[-1]), dtype=spec.dtype or z2.dtype, device=z2.device)
    with region(NORM_PROJ + "_bwd"):
        dnormed = d2 @ out_w
        dy_ready = []  # per head chunk, when its dy slots are complete (the pipelined layer)

        def chunk_done(i):
            if spec.overlap and (i + 1) % spec.cp_size == 0:
                dy_ready.append(torch.cuda.current_stream().record_event())

        if spec.y_cols:  # dy in the slots that are sent, chunk by chunk
            dy = torch.empty_like(y)
            dnorm_w, normed = norm_bwd_slots(
                dnormed, y, spec.y_cols, z, norm_w, rstd, spec.eps, spec.norm_group, spec.norm_backend,
                dz=dz, dx=dy, on_slot=chunk_done,
            )  # fmt: skip
        else:
            dy, _, dnorm_w, normed = norm_bwd(
                dnormed, y, z, norm_w, rstd, spec.eps, spec.norm_group, spec.norm_backend,
                dz=dz, recompute_output=True,
            )  # fmt: skip
        del dnormed, y, rstd
        if spec.overlap and not dy_ready:  # dy in one piece: every chunk's transfer waits for all of it
            dy_ready = [torch.cuda.current_stream().record_event()] * spec.chunks
        # a chunk's transfer starts as soon as its dy is complete: the first one before out_proj's
        # weight gradient (queued after a norm kernel, NCCL's blocks are not left waiting for a GEMM's)
        dout_w = d2.t() @ normed
        del normed
    if spec.cp_size == 1:
        with region(SSM + "_bwd"):
            _, dconv_w, dconv_b, ddt_bias, dA, dD = conv_ssd_bwd(
                cs, dy.view(spec.batch, -1, cs.dim), xbcdt.view(spec.batch, -1, cs.width),
                conv_w, conv_b, dt_bias, A, D, spec.seq_idx, dxbcdt=dxbcdt.view(spec.batch, -1, cs.width),
            )  # fmt: skip
    else:
        group, tok = spec.group, spec.tok
        k = spec.chunks
        grads: list[tuple] = [()] * k

        def pre(j):
            if spec.y_cols:
                send = dy[j * spec.cp_size : (j + 1) * spec.cp_size]
                return _to_heads(send, spec.chans_post[j], tok, group, A2A_POST + "_bwd", LAYOUT + "_bwd")
            return _seq_to_heads(dy, spec.chans_post[j], tok, group, A2A_POST + "_bwd", LAYOUT + "_bwd")

        def compute(j, dyh):
            xh, saved_xh[j] = saved_xh[j], None  # freed once this chunk's backward is done
            with region(SSM + "_bwd"):
                g = conv_ssd_bwd(
                    cs, dyh.view(spec.batch, spec.length, cs.dim), xh.view(spec.batch, spec.length, cs.width),
                    *_chunk_params(spec, j, conv_w, conv_b, dt_bias, A, D), spec.seq_idx,
                )  # fmt: skip
            del xh
            grads[j] = g[1:]
            return g[0].view(-1, cs.width)

        def post(j, dxh):
            if spec.slot_rows is not None:
                recv = dxbcdt[j * spec.cp_size : (j + 1) * spec.cp_size]
                _to_seq(dxh, spec.chans[j], tok, group, A2A_PRE + "_bwd", LAYOUT + "_bwd", recv=recv)
            else:
                _heads_to_seq(dxh, spec.chans[j], tok, group, A2A_PRE + "_bwd", LAYOUT + "_bwd", out=dxbcdt)

        # the slots' gradients go to in_proj's backward, which runs its dz products before it waits for
        # the last return (so that transfer runs beside them)
        join = spec.slot_rows is None
        _run_chunks(spec, pre, compute, post, (dxbcdt, dy), dy_ready or None, join)
        if k == 1:
            dconv_w, dconv_b, ddt_bias, dA, dD = grads[0]
        else:
            # chunks that split a group's heads share its B/C rows: their gradients are summed
            shared = sum(r.numel() for r in spec.rows) > conv_w.shape[0]
            dconv_w = _rows_to_full(conv_w, spec.rows, [g[0] for g in grads], shared)
            dconv_b = (
                None if conv_b is None else _rows_to_full(conv_b, spec.rows, [g[1] for g in grads], shared)
            )
            ddt_bias = torch.cat([g[2] for g in grads])
            dA = torch.cat([g[3] for g in grads])
            dD = None if D is None else torch.cat([g[4] for g in grads])
    dx_out = None if xshape is None else dxbcdt.view(xshape)
    return dz2.view(zshape), dx_out, dconv_w, dconv_b, ddt_bias, dA, dD, dnorm_w, dout_w


def layer_core(
    spec: CoreSpec, zxbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, out_w, xbcdt=None
) -> torch.Tensor:
    """``out_proj(norm(conv_ssd(...), z))`` of this rank's ``zxbcdt [..., d_in_proj]`` -> ``[..., d_model]``;
    or, with ``xbcdt`` given, of ``z = zxbcdt [..., d_inner]`` and ``xbcdt`` as two tensors (hidden CP with
    :func:`split_in_proj`: ``xbcdt`` is then not kept for backward).

    ``conv_w [c, k]``, ``conv_b``, ``dt_bias``, ``A`` (fp32 ``-exp(A_log)``), ``D`` (``[h]`` or ``[h, p]``)
    are this rank's slices (its heads, their groups), differentiable: their gradients flow to the full
    parameters. With ``spec.slot_rows`` and overlap, the gradient of ``xbcdt`` (the send slots) is
    complete only on the communication stream: its consumer is :func:`slot_in_proj`'s backward."""
    return _LayerCore.apply(zxbcdt, xbcdt, conv_w, conv_b, dt_bias, A, D, norm_w, out_w, spec)


def split_fwd(u, weight, k):
    """``u @ W.T`` as two tensors ``(u @ W[:k].T, u @ W[k:].T)`` (no autograd)."""
    u2 = u.reshape(-1, u.shape[-1])
    a, b = u2 @ weight[:k].t(), u2 @ weight[k:].t()
    return a.view(*u.shape[:-1], k), b.view(*u.shape[:-1], weight.shape[0] - k)


def split_bwd(u, weight, k, da, db):
    """``(du, dW)`` of :func:`split_fwd`: ``dW``'s two row blocks written in place, ``du`` accumulated in one
    buffer (no concatenation, no extra pass)."""
    u2 = u.reshape(-1, u.shape[-1])
    da, db = da.reshape(-1, k), db.reshape(-1, weight.shape[0] - k)
    du = torch.mm(da, weight[:k])
    du.addmm_(db, weight[k:])
    dw = torch.empty_like(weight)
    torch.mm(da.t(), u2, out=dw[:k])
    torch.mm(db.t(), u2, out=dw[k:])
    return du.view_as(u), dw


class _SplitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, weight, k):
        ctx.save_for_backward(u, weight)
        ctx.k = k
        return split_fwd(u, weight, k)

    @staticmethod
    def backward(ctx, da, db):
        u, weight = ctx.saved_tensors
        with _no_autocast(da):
            return (*split_bwd(u, weight, ctx.k, da, db), None)


def split_in_proj(u: torch.Tensor, weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.linear(u, weight)`` split after output ``k`` into two separate tensors (``z`` and ``xbcdt``)."""
    return _SplitLinear.apply(u, weight, k)


def slot_rows(chans: tuple[ChannelPlan, ...], offset: int) -> tuple[torch.Tensor, bool]:
    """The rows of ``in_proj.weight`` behind every send slot of hidden CP, slot ``j*cp + r`` (head chunk
    ``j``, destination rank ``r``) in the order of that rank's local channels; ``offset`` is where
    ``[x|B|C|dt]`` starts (``d_inner``). Also whether every row appears once (no replicated group)."""
    idx = []
    for chan in chans:
        cp = chan.cp_size
        for r in range(cp):
            for b in chan.blocks:
                start = offset + b.src + (r // (cp // b.count)) * b.step
                idx.append(torch.arange(start, start + b.width))
    rows = torch.cat(idx)
    return rows, bool(rows.unique().numel() == rows.numel())


def slot_fwd(u, weight, k, rows, nslots, per_chunk):
    """``z = u @ W[:k].T`` and hidden CP's send buffers ``slots[i] = u @ W[rows_i].T`` (``[S, N, w]``):
    ``in_proj`` writes every destination rank's channels where the all-to-all reads them, so no pack pass
    runs (each slot is a full-depth product, the same arithmetic as one GEMM). No autograd."""
    u2 = u.reshape(-1, u.shape[-1])
    wp = weight.index_select(0, rows).view(nslots, -1, weight.shape[1])
    slots = u2.new_empty((nslots, u2.shape[0], wp.shape[1]))
    ready = []
    for i in range(nslots):
        torch.mm(u2, wp[i].t(), out=slots[i])
        if per_chunk and (i + 1) % per_chunk == 0:
            ready.append(torch.cuda.current_stream().record_event())
    z = u2 @ weight[:k].t()  # after the slots: the first chunk's transfer can run beside it
    if ready:
        slots.chunk_ready = ready  # read by the layer core (a missing attribute only costs overlap)
    return z.view(*u.shape[:-1], k), slots


def slot_bwd(u, weight, k, rows, unique, per_chunk, dz, dslots):
    """``(du, dW)`` of :func:`slot_fwd`. The received gradient slots are laid side by side (one copy, the pass
    the pack saved going forward) so that ``du = dz @ W[:k] + dslots @ W[rows]`` is two GEMMs with fp32
    accumulation, as without slots (one GEMM per slot would round ``du`` once per slot); ``dW`` goes back
    to its rows (summed where a replicated group feeds several slots)."""
    u2 = u.reshape(-1, u.shape[-1])
    dz = dz.reshape(-1, k)
    wp = weight.index_select(0, rows)
    # first what needs only dz: the pipelined layer's last return may still be filling dslots
    dw = torch.empty_like(weight)
    torch.mm(dz.t(), u2, out=dw[:k])
    du = torch.mm(dz, weight[:k])
    if per_chunk:  # the layer core left that transfer unjoined (_run_chunks(join=False))
        torch.cuda.current_stream().wait_stream(comm_stream(dslots.device))
    dside = dslots.transpose(0, 1).reshape(u2.shape[0], -1)  # [N, S*w]: slot i's columns side by side
    del dslots
    du.addmm_(dside, wp)
    dwp = torch.mm(dside.t(), u2)
    if unique:
        dw.index_copy_(0, rows, dwp)
    else:
        dw[k:].zero_()
        dw.index_add_(0, rows, dwp)
    return du.view_as(u), dw


class _SlotLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, weight, k, rows, nslots, unique, per_chunk):
        ctx.save_for_backward(u, weight, rows)
        ctx.cfg = (k, unique, per_chunk)
        return slot_fwd(u, weight, k, rows, nslots, per_chunk)

    @staticmethod
    def backward(ctx, dz, dslots):
        u, weight, rows = ctx.saved_tensors
        k, unique, per_chunk = ctx.cfg
        with _no_autocast(dz):
            return (
                *slot_bwd(u, weight, k, rows, unique, per_chunk, dz, dslots),
                None,
                None,
                None,
                None,
                None,
            )


def slot_in_proj(u: torch.Tensor, weight: torch.Tensor, spec: CoreSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``in_proj`` for hidden CP as ``z [..., d_inner]`` and the send slots ``[k*cp, N, w]`` of ``spec``."""
    nslots = spec.chunks * spec.cp_size
    per_chunk = spec.cp_size if spec.overlap else 0  # an event after each head chunk's slots
    return _SlotLinear.apply(u, weight, spec.d_inner, spec.slot_rows, nslots, spec.slot_unique, per_chunk)
