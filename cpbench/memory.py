"""Peak GPU memory of one sweep case, walked from the tensors its code allocates (the resource guard's
estimate on CUDA, :func:`gpu_peak`).

A case runs as one rank runs it (``--backend fake`` runs rank 0's work: the same tensors): the
parameters, the input shard and its output gradient are live from the start; then the forward and the
backward are walked step by step as :mod:`cp_core.pipeline` (cp 1 and hidden CP), the seed path, state
passing and the peers (mamba-ssm's fused ``mamba_split_conv1d_scan_combined``, NeMo AutoModel's layer)
run them, each tensor added where the code allocates it and dropped where its last reference goes. The
peak is the largest sum of live bytes, which is what ``torch.cuda.max_memory_allocated`` reports after
the warm-up (``peak_mem_GiB``). Inside the kernels the transient buffers of mamba-ssm 2.3's Triton SSD
are walked too (:func:`_ssd_fwd`, :func:`_ssd_bwd`): its backward holds the chunk states and their
gradients in fp32 and in the input dtype at once, ``12 * chunks * heads * head_dim * d_state`` bytes,
the largest transient of the layer at long lengths.

Left out: tensors of ``O(heads)`` or ``O(chunks x heads)`` bytes below the terms kept, the caching
allocator's rounding and cuBLAS workspaces.
``tests/test_guard.py`` holds the walk against every committed measurement.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from cp_core.channels import chunk_groups, local_groups
from cp_core.mixer import Mamba2Config

#: SMs of an H100 / H200 (mamba-ssm's SSD backward sizes some buffers by them)
SM_COUNT = 132
#: the smallest N block of mamba-ssm's backward kernels: deterministic mode keeps one fp32 buffer per block
MIN_BLOCK_N = 32
#: ``zxbcdt`` elements from which cp 1 computes ``z`` and ``[x|B|C|dt]`` as two tensors (cp_core.mixer)
SPLIT_IN_PROJ_ELEMENTS = 2**31


@dataclass(frozen=True)
class Layer:
    """A Mamba2 layer's shape and element size (bytes)."""

    d_model: int
    n_heads: int
    head_dim: int
    n_groups: int
    d_state: int
    d_conv: int
    chunk_size: int
    elem: int

    # the layer's widths, as cp_core's configuration derives them
    d_inner = Mamba2Config.d_inner
    conv_dim = Mamba2Config.conv_dim
    d_in_proj = Mamba2Config.d_in_proj

    @property
    def params(self) -> int:
        """Parameter bytes."""
        n = self.d_model * self.d_in_proj + self.d_inner * self.d_model
        return self.elem * (n + self.conv_dim * (self.d_conv + 1) + 3 * self.n_heads + self.d_inner)


@dataclass(frozen=True)
class Work:
    """What one rank runs: ``rows`` sequences of ``length`` global tokens (packed: one row of every pack's
    tokens), and how.

    ``exchange``: how hidden CP moves rows, ``"pieces"`` / ``"identity"`` (the all-to-all lands in place) or
    ``"gather"`` (an all-to-all and a row gather: plans with many pieces). ``doc_lens``:
    the packed documents (padding document included), for state passing's rows and the exchange."""

    cp: int
    rows: int
    length: int
    backward: bool
    strategy: str = "hidden"  # "hidden" | "state_passing" | "state_passing_chain"
    path: str = "fused"
    impl: str = "cp_core"
    chunks: int = 1
    exchange: str = "pieces"
    slots: bool = True  # in_proj writes the send buffers (False: the pack-pass design, in git history)
    deterministic: bool = False
    layout: str = "head_tail"
    doc_lens: tuple[int, ...] | None = None

    @property
    def local(self) -> int:
        """This rank's tokens."""
        return self.rows * self.length // self.cp


class Timeline:
    """Live bytes of named tensors; the peak and what was live at it."""

    def __init__(self):
        self.live: dict[str, int] = {}
        self.total = 0
        self.peak = 0
        self.at_peak: dict[str, int] = {}

    def add(self, name: str, nbytes: float) -> str:
        if name in self.live:
            raise KeyError(f"{name} is live already")
        self.live[name] = int(nbytes)
        self.total += int(nbytes)
        if self.total > self.peak:
            self.peak, self.at_peak = self.total, dict(self.live)
        return name

    def drop(self, *names: str) -> None:
        for name in names:
            self.total -= self.live.pop(name)

    def drop_prefix(self, prefix: str) -> None:
        self.drop(*[n for n in self.live if n.startswith(prefix)])

    def transient(self, name: str, nbytes: float) -> None:
        self.drop(self.add(name, nbytes))

    def breakdown(self, top: int = 8) -> str:
        """The largest tensors live at the peak, in GiB."""
        items = sorted(self.at_peak.items(), key=lambda kv: -kv[1])[:top]
        return ", ".join(f"{k} {v / 2**30:.2f}" for k, v in items)


# ------------------------------------------------------------------------------------- kernels


def _ssd_dims(s: Layer, rows: int, length: int, h: int):
    q = s.chunk_size
    chunks = rows * -(-length // q)
    states = chunks * h * s.head_dim * s.d_state  # elements of [chunks, h, p, n]
    lh = 4 * chunks * q * h  # bytes of one fp32 [rows, h, chunks, chunk] tensor
    return chunks, states, lh


def _ssd_fwd(
    m: Timeline, tag: str, s: Layer, rows: int, length: int, h: int, g: int, *, z=False, keep_dA=False
):
    """mamba-ssm's ``_mamba_chunk_scan_combined_fwd``: leaves ``{tag}y`` (and ``{tag}y_x`` with a gate
    ``z``; ``{tag}dA_cumsum`` with ``keep_dA``, as the autograd function saves it)."""
    q, e = s.chunk_size, s.elem
    chunks, states, lh = _ssd_dims(s, rows, length, h)
    m.add(f"{tag}dA_cumsum", lh)
    m.add(f"{tag}dt_out", lh)
    m.add(f"{tag}states fp32", 4 * states)
    m.add(f"{tag}passed states", e * states)
    m.drop(f"{tag}states fp32")
    m.add(f"{tag}CB", 4 * chunks * g * q * q)
    out = m.add(f"{tag}y", e * rows * length * h * s.head_dim)
    if z:
        m.add(f"{tag}y_x", e * rows * length * h * s.head_dim)
    m.drop(f"{tag}dt_out", f"{tag}passed states", f"{tag}CB")
    if not keep_dA:
        m.drop(f"{tag}dA_cumsum")
    return out


def _bwd_splits(s: Layer, chunks: int, h: int, g: int) -> int:
    """How many head splits mamba-ssm's ``dB`` / ``dC`` / ``dCB`` kernels write fp32 partials for."""
    per_prog = max(min(-(-chunks * h // SM_COUNT), h // g), 1)
    return -(-(h // g) // per_prog)


def _ddt_db_dc(m: Timeline, tag: str, det: bool, s: Layer, tok: int, lh: int, splits: int, g: int) -> None:
    """``ddt`` (fp32 per ``head_dim`` tile where deterministic, then summed) and ``_chunk_state_bwd_db`` /
    ``_chunk_scan_bwd_dC``: fp32 per split, then summed, with their ``ddA`` terms (left live as
    ``{tag}dB ddA`` / ``{tag}dC ddA``)."""
    p, n = s.head_dim, s.d_state
    tiles_p = -(-p // MIN_BLOCK_N) if det else 1
    tiles_n = -(-n // MIN_BLOCK_N) if det else 1
    m.add(f"{tag}ddt fp32", lh * tiles_p)
    if tiles_p > 1:
        m.add(f"{tag}ddt sum", lh)
        m.drop(f"{tag}ddt fp32")
    for name in ("dB", "dC"):
        m.add(f"{tag}{name} fp32 splits", 4 * tok * splits * g * n)
        m.add(f"{tag}{name} ddA tiles", lh * tiles_n)
        m.add(f"{tag}{name} fp32", 4 * tok * g * n)
        m.drop(f"{tag}{name} fp32 splits")
        if tiles_n > 1:
            m.add(f"{tag}{name} ddA", lh)
            m.drop(f"{tag}{name} ddA tiles")
        else:
            m.live[f"{tag}{name} ddA"] = m.live.pop(f"{tag}{name} ddA tiles")


def _ssd_bwd(
    m: Timeline, tag: str, w: Work, s: Layer, rows: int, length: int, h: int, g: int, *, given=True, z=False
):
    """mamba-ssm's ``_mamba_chunk_scan_combined_bwd``. ``given``: ``dx, ddt, dB, dC`` are the caller's
    buffers; else they are allocated here and left live as ``{tag}dx`` ... (the autograd function's)."""
    q, e, p, n = s.chunk_size, s.elem, s.head_dim, s.d_state
    chunks, states, lh = _ssd_dims(s, rows, length, h)
    tok = rows * length
    det = w.deterministic
    if not given:  # outputs, named "{tag}grad ..." (left live for the caller)
        m.add(f"{tag}grad dB", e * tok * g * n)
        m.add(f"{tag}grad dC", e * tok * g * n)
        m.add(f"{tag}grad ddt", e * tok * h)
    if z:  # _chunk_scan_bwd_dz: the gated output gradient, a new dout
        m.add(f"{tag}dout gated", e * tok * h * p)
    m.add(f"{tag}dt_in", e * tok * h)
    m.add(f"{tag}dA_cumsum", lh)
    m.add(f"{tag}dt_out", lh)
    m.add(f"{tag}CB", 4 * chunks * g * q * q)
    m.add(f"{tag}states fp32", 4 * states)
    m.add(f"{tag}passed fp32", 4 * states)
    m.drop(f"{tag}states fp32")
    m.add(f"{tag}dstates fp32", 4 * states)
    m.add(f"{tag}dstates", e * states)  # _state_passing_bwd: both in the input dtype, beside the fp32 ones
    m.add(f"{tag}states", e * states)
    m.drop(f"{tag}passed fp32", f"{tag}dstates fp32")
    if not given:
        m.add(f"{tag}grad dx", e * tok * h * p)
    splits = _bwd_splits(s, chunks, h, g)
    _ddt_db_dc(m, tag, det, s, tok, lh, splits, g)
    m.add(f"{tag}dCB splits", 4 * chunks * splits * g * q * q)
    m.add(f"{tag}dCB", 4 * chunks * g * q * q)
    m.drop(f"{tag}dCB splits")
    m.transient(f"{tag}ddA stable", lh * -(-q // 32))
    m.drop_prefix(tag + "d")  # every buffer but the outputs
    m.drop(f"{tag}CB", f"{tag}states")


def _conv_fwd(m: Timeline, name: str, s: Layer, tok: int, channels: int, row_stride: int) -> str:
    """causal-conv1d's channel-last forward (a copy first where the row stride is not a multiple of 8)."""
    if row_stride % 8:
        m.add(name + " input copy", s.elem * tok * channels)
    m.add(name, s.elem * tok * channels)
    if row_stride % 8:
        m.drop(name + " input copy")
    return name


# ------------------------------------------------------------------------------------- the layer core


def _core(m: Timeline, s: Layer, w: Work) -> None:
    """cp 1 and hidden CP through :func:`cp_core.pipeline.layer_core` (cp_core's fused path)."""
    e, cp, n, k = s.elem, w.cp, w.local, w.chunks
    D, di, dp = s.d_model, s.d_inner, s.d_in_proj
    tok = w.rows * w.length  # the conv/SSD tokens of one chunk (every token of the sequence at cp > 1)
    hk = s.n_heads // cp // k
    gk = chunk_groups(local_groups(s.n_groups, cp), k, 0)[1] if cp > 1 else s.n_groups
    dim = hk * s.head_dim
    cconv = dim + 2 * gk * s.d_state
    width = cconv + hk
    single = cp == 1 and n * dp < SPLIT_IN_PROJ_ELEMENTS
    overlap = k > 1
    slots = cp > 1 and w.slots
    y_cols = slots and (di // (cp * k)) % (di // s.n_groups) == 0
    # forward: in_proj
    if single:
        m.add("zxbcdt", e * n * dp)
        x_stride = dp
    elif slots:
        m.add("in_proj rows", e * k * cp * width * D)
        m.add("send slots", e * k * cp * n * width)
        m.add("z", e * n * di)
        m.drop("in_proj rows")
    else:
        m.add("z", e * n * di)
        m.add("xbcdt", e * n * (dp - di))
        x_stride = dp - di
    if cp == 1:
        _conv_fwd(m, "conv out", s, tok, cconv, x_stride)
        m.live["y"] = m.live.pop(_ssd_fwd(m, "ssd ", s, w.rows, w.length, s.n_heads, s.n_groups))
        m.drop("conv out")
    else:
        m.add("y", e * n * di)

        def pre(j):
            if w.exchange == "gather" or not slots:
                if not slots:
                    m.add("pack", e * tok * width)
                m.add("recv", e * tok * width)
                if not slots:
                    m.drop("pack")
                m.add(f"xh{j}", e * tok * width)
                m.drop("recv")
            else:
                m.add(f"xh{j}", e * tok * width)

        def compute(j):
            _conv_fwd(m, "conv out", s, tok, cconv, width)
            m.live[f"yh{j}"] = m.live.pop(_ssd_fwd(m, "ssd ", s, w.rows, w.length, hk, gk))
            m.drop("conv out")

        def post(j):
            if w.exchange == "gather":
                m.transient("y send", e * tok * dim)
            if not y_cols:
                m.transient("y recv", e * tok * dim)

        _chunks(m, k, overlap, pre, compute, post, lambda j: f"yh{j}", keep_pre=True)
    m.add("rstd", 4 * n * s.n_groups)
    m.add("normed", e * n * di)
    m.add("out", e * n * D)
    m.drop("normed")
    if cp > 1:
        m.drop("send slots" if slots else "xbcdt")
    if not w.backward:
        return
    # backward
    m.add("dgrad", e * n * (dp if single else di))  # dz (with d[x|B|C|dt] beside it when single)
    if slots:
        m.add("dslots", e * k * cp * n * width)
    elif not single:
        m.add("dxbcdt", e * n * (dp - di))
    m.add("dnormed", e * n * di)
    m.add("dy", e * n * di)
    m.add("normed", e * n * di)
    m.drop("dnormed", "y", "rstd")
    m.add("d out_proj", e * D * di)
    m.drop("normed")
    if cp == 1:
        _conv_fwd(m, "conv out", s, tok, cconv, x_stride)
        m.add("dxbc", e * tok * cconv)
        _ssd_bwd(m, "bwd ", w, s, w.rows, w.length, s.n_heads, s.n_groups)
        if x_stride % 8:
            m.transient("dxbc copy", e * tok * cconv)
        m.drop("conv out", "dxbc")
    else:

        def bpre(j):
            if not y_cols:
                m.add("dy pack", e * tok * dim)
            if w.exchange == "gather":
                m.add("dy recv", e * tok * dim)
            m.add(f"dyh{j}", e * tok * dim)
            for t in ("dy pack", "dy recv"):
                if t in m.live:
                    m.drop(t)

        def bcompute(j):
            m.add(f"dxh{j}", e * tok * width)
            _conv_fwd(m, "conv out", s, tok, cconv, width)
            m.add("dxbc", e * tok * cconv)
            _ssd_bwd(m, "bwd ", w, s, w.rows, w.length, hk, gk)
            m.drop("conv out", "dxbc", f"xh{j}")
            if not overlap:
                m.drop(f"dyh{j}")

        def bpost(j):
            if w.exchange == "gather":
                m.transient("dx send", e * tok * width)
            if not slots:
                m.transient("dx recv", e * tok * width)

        _chunks(m, k, overlap, bpre, bcompute, bpost, lambda j: f"dxh{j}", keep_pre=not overlap)
        if overlap:
            for j in range(k):
                m.drop(f"dyh{j}")
    m.drop("dy")
    m.drop("zxbcdt" if single else "z")
    if cp == 1 and not single:
        m.drop("xbcdt")
    # in_proj's backward
    if slots:
        m.add("in_proj rows", e * k * cp * width * D)
        m.add("d in_proj", e * dp * D)
        m.add("dx", e * n * D)
        m.add("dslots side by side", e * n * k * cp * width)
        m.transient("d in_proj rows", e * k * cp * width * D)
    else:
        m.add("dx", e * n * D)
        m.add("d in_proj", e * dp * D)


def _chunks(m: Timeline, k: int, overlap: bool, pre, compute, post, out_name, keep_pre: bool) -> None:
    """:func:`cp_core.pipeline._run_chunks`: with overlap every ``pre`` first, and each chunk's result
    lives until the next chunk's ``compute`` has returned (the loop variable is rebound then)."""
    if not overlap:
        for j in range(k):
            pre(j)
            compute(j)
            post(j)
            m.drop(out_name(j))
        return
    for j in range(k):
        pre(j)
    for j in range(k):
        compute(j)
        if j:
            m.drop(out_name(j - 1))
        post(j)
    m.drop(out_name(k - 1))


# ------------------------------------------------------------------------------------- composed paths


def _seed(m: Timeline, s: Layer, w: Work) -> None:
    """Hidden CP's seed path (``path = "seed"``): the seed's layout operations through autograd around
    the same conv1d + SSD (:class:`cp_core.kernels.conv_ssd.ConvSSD`) and the gated norm + out_proj."""
    e, cp, n, tok = s.elem, w.cp, w.local, w.rows * w.length
    D, di, dp = s.d_model, s.d_inner, s.d_in_proj
    hl, gl = s.n_heads // cp, local_groups(s.n_groups, cp)
    dim = hl * s.head_dim
    cconv = dim + 2 * gl * s.d_state
    width = cconv + hl
    m.add("zxbcdt", e * n * dp)  # kept: z, a view of it, is saved by the norm
    m.add("parts", e * tok * width)  # every part moved, reordered, then concatenated
    m.add("xh", e * tok * width)
    m.drop("parts")
    _conv_fwd(m, "conv out", s, tok, cconv, width)
    yh = _ssd_fwd(m, "ssd ", s, w.rows, w.length, hl, gl)
    m.drop("conv out")
    m.add("y copies", 2 * e * n * di)
    m.add("y", e * n * di)
    m.drop("y copies", yh)
    m.add("rstd", 4 * n * s.n_groups)
    m.add("normed", e * n * di)
    m.add("out", e * n * D)
    m.drop("normed")
    if not w.backward:
        return
    m.add("dnormed", e * n * di)
    m.add("dy", e * n * di)
    m.add("dz", e * n * di)
    m.add("normed", e * n * di)
    m.add("d out_proj", e * D * di)
    m.drop("normed", "dnormed", "y", "rstd", "zxbcdt")
    m.add("dy copies", 2 * e * n * di)
    m.add("dyh", e * tok * dim)
    m.drop("dy copies", "dy")
    m.add("dxh", e * tok * width)
    _conv_fwd(m, "conv out", s, tok, cconv, width)
    m.add("dxbc", e * tok * cconv)
    _ssd_bwd(m, "bwd ", w, s, w.rows, w.length, hl, gl)
    m.drop("conv out", "dxbc", "xh", "dyh")
    m.add("dx parts", e * n * (dp - di))
    m.drop("dxh")
    m.add("dzxbcdt", e * n * dp)
    m.drop("dz", "dx parts")
    m.add("dx", e * n * D)
    m.add("d in_proj", e * dp * D)


def sp_pieces(w: Work, s: Layer) -> tuple[list[int], int]:
    """State passing's pieces on a rank, as :class:`cp_core.state_passing._Plan` lays them out: the length
    of every piece (this rank's segments of every document, end to end in its token stream, unpadded) and
    the segments per document on a rank (2 head-tail, 1 contiguous)."""
    nps = 2 if w.layout == "head_tail" else 1
    nseg = nps * w.cp
    doc_lens = list(w.doc_lens) if w.doc_lens else [w.length] * w.rows
    return [d // nseg for d in doc_lens for _ in range(nps)], nps


def _sp_decay(m: Timeline, n: int, H: int, rows: bool, grad: bool) -> None:
    """:func:`cp_core.state_passing._dtp_a` and ``_decay``: leaves ``dtp``, ``a``, ``s_corr`` (``exp(acum)``)
    and, for one row of documents, ``s_f`` (``exp(ld - acum) dt'``; with ``grad`` also the exponential
    autograd saves for its product)."""
    f = 4 * n * H  # one fp32 [H, T]
    m.transient("dt float", 2 * f)  # dt.float() + dt_bias, its softplus, then the transposed copy
    m.add("dtp", f)
    m.add("a", f)
    # rows: a float64 cumsum per row; one row: segmented_cumsum's float64 prefix sums and their differences
    m.transient("cumsum work", (4 if rows else 10) * f)
    m.add("acum", f)
    m.add("s_corr", f)
    if not rows:
        m.transient("s_f work", 2 * f)
        if grad:
            m.add("s_f exp", f)
        m.add("s_f", f)
    m.drop("acum")


def _sp_outer(m: Timeline, name: str, lengths: list[int], hpn: int, out: bool) -> None:
    """:func:`cp_core.kernels.correction_triton.outer`: with a piece longer than one superblock, every
    superblock's partial state first (``dest``), then added round by round. ``out``: a new ``[P, H, p, n]``
    result named ``name`` (else the caller's buffer)."""
    from cp_core.kernels.correction_triton import SUPERBLOCK

    if out:
        m.add(name, len(lengths) * hpn)
    per = [-(-n // SUPERBLOCK) for n in lengths if n > 0]
    if per and max(per) > 1:
        m.add(name + " superblocks", sum(per) * hpn)
        m.transient(name + " round", sum(1 for v in per if v > 1) * hpn)
        m.drop(name + " superblocks")


def _sp_exchange(m: Timeline, name: str, w: Work, P: int, nps: int, hpn: int, h0: bool) -> None:
    """:mod:`cp_core.state_exchange`, leaving ``name`` (``[P, H, p*n]`` fp32): forward ``h0``; backward ``dF``
    (and ``dld``'s product ``dF * h0``, formed while the gathered gradients are still referenced)."""
    chain = w.strategy == "state_passing_chain"
    if chain:  # per document: the received state and the one passed on, per piece, then stacked
        m.transient(name + " chain", (2 * nps + 1) * (P // max(nps, 1)) * hpn)
        m.add(name, P * hpn)
    else:  # every rank's payload gathered, summed into this rank's pieces
        m.add(name + " gathered", w.cp * P * hpn)
        m.add(name, P * hpn)
    if not h0:
        m.transient("dF * h0", P * hpn)
    if not chain:
        m.drop(name + " gathered")


def _ssd_phases_bwd(m: Timeline, w: Work, s: Layer, rows: int, length: int, extra) -> None:
    """:func:`cp_core.kernels.ssd_phases.ssd_backward` (mamba-ssm's kernels, ``dx``, ``ddt``, ``dB``, ``dC``
    written into the caller's buffers), in its order: what needs no final-state gradient first, then
    ``_state_passing_bwd``, the rest, ``extra()`` (the caller's terms), the decay's gradients folded in."""
    q, e, p, n, h, g = s.chunk_size, s.elem, s.head_dim, s.d_state, s.n_heads, s.n_groups
    chunks, states, lh = _ssd_dims(s, rows, length, h)
    tok = rows * length
    det = w.deterministic
    m.add("bwd dt_in", e * tok * h)
    m.add("bwd dA_cumsum", lh)
    m.add("bwd dt_out", lh)
    m.add("bwd CB", 4 * chunks * g * q * q)
    m.add("bwd states fp32", 4 * states)
    m.add("bwd passed fp32", 4 * states)
    m.transient("bwd final", 4 * rows * h * p * n)
    m.drop("bwd states fp32")
    m.add("bwd dstates fp32", 4 * states)
    splits = _bwd_splits(s, chunks, h, g)
    m.add("bwd dCB splits", 4 * chunks * splits * g * q * q)
    m.add("bwd dCB", 4 * chunks * g * q * q)
    m.drop("bwd dCB splits")
    m.add("bwd ddA stable", lh * -(-q // 32))
    m.add("bwd ddA", lh)
    m.drop("bwd ddA stable")
    m.add("bwd dstates", e * states)  # _state_passing_bwd: both in the input dtype
    m.add("bwd states", e * states)
    m.drop("bwd passed fp32", "bwd dstates fp32")
    _ddt_db_dc(m, "bwd ", det, s, tok, lh, splits, g)
    extra()
    m.transient("bwd ddA sums", 3 * lh)  # ddA_prev flipped, its cumsum, flipped back
    m.transient("bwd decay grads", 2 * lh)  # the caller's d_a and d_dtp in the chunk layout
    m.drop_prefix("bwd ")


def _state_passing(m: Timeline, s: Layer, w: Work) -> None:
    """State passing (:func:`cp_core.state_passing.state_passing_layer`): ``in_proj``, then the layer core
    ``_SPCore`` (one autograd function, hand-written backward) on the rank's token stream: ``[pieces,
    length]`` rows when every piece has one length (``[B, L]`` input), else one row with ``seq_idx``. Forward
    keeps ``zxbcdt``, ``y``, the norm statistics and ``h0``; backward recomputes the conv output and the
    normalised activations. The exchanges allocate on the host in call order (a communication stream runs
    them, but the caching allocator counts a tensor from its allocation)."""
    e, n = s.elem, w.local
    D, di, dp, H, C = s.d_model, s.d_inner, s.d_in_proj, s.n_heads, s.conv_dim
    lengths, nps = sp_pieces(w, s)
    P = len(lengths)
    rows = P > 0 and min(lengths) == max(lengths) > 0
    R, lrow = (P, lengths[0]) if rows else (1, n)
    hpn = 4 * H * s.head_dim * s.d_state  # one fp32 state
    halo = e * P * (s.d_conv - 1) * C
    split = n * dp >= SPLIT_IN_PROJ_ELEMENTS
    # forward
    m.add("zxbcdt", e * n * dp)  # z [| x B C dt]: two tensors of the same total when split
    m.transient("halo gathered", w.cp * halo)
    m.add("halo", halo)
    _conv_fwd(m, "conv out", s, n, C, dp)
    _sp_decay(m, n, H, rows, grad=False)
    m.add("payload", P * (hpn + 4 * H))  # (F, ld) side by side: what the all-gather sends
    chunks, states, lh = _ssd_dims(s, R, lrow, H)
    m.add("ssd dA_cumsum", lh)  # SSDForward.states(): kept for outputs()
    m.add("ssd dt_out", lh)
    m.add("ssd states fp32", 4 * states)
    m.add("ssd passed states", e * states)
    m.transient("ssd final states", 4 * R * H * s.head_dim * s.d_state)
    m.drop("ssd states fp32")
    if not rows:  # the final states from the per-piece product, straight into the payload
        _sp_outer(m, "F", lengths, hpn, out=False)
        m.drop("s_f")
    m.drop("dtp", "a")
    _sp_exchange(m, "h0", w, P, nps, hpn, h0=True)
    m.add("ssd CB", 4 * chunks * s.n_groups * s.chunk_size**2)  # SSDForward.outputs()
    m.add("y", e * n * di)
    m.drop("ssd CB", "ssd dA_cumsum", "ssd dt_out", "ssd passed states")
    m.drop("s_corr", "conv out")  # the correction applied in place
    m.add("rstd", 4 * n * s.n_groups)
    m.add("normed", e * n * di)
    m.add("out", e * n * D)
    m.drop("normed", "payload")
    if not w.backward:
        return
    # backward
    m.add("dzxbcdt", e * n * dp)
    m.add("dnormed", e * n * di)
    m.add("dy", e * n * di)
    m.add("normed", e * n * di)  # recomputed by the norm's backward
    m.drop("dnormed", "y", "rstd")
    m.add("d out_proj", e * D * di)
    m.drop("normed")
    _conv_fwd(m, "conv out", s, n, C, dp)  # recomputed
    m.add("dconv out", e * n * C)
    _sp_decay(m, n, H, rows, grad=True)
    _sp_outer(m, "dh0", lengths, hpn, out=True)
    _sp_exchange(m, "dF", w, P, nps, hpn, h0=False)

    def extra():  # the correction's and (one row) the final states' terms, then the decay's gradients
        m.add("g_corr", 4 * n * H)
        if not rows:
            m.add("g_f", 4 * n * H)
        m.transient("decay autograd", 2 * 4 * n * H)
        m.add("d_dtp", 4 * n * H)
        m.add("d_a", 4 * n * H)

    _ssd_phases_bwd(m, w, s, R, lrow, extra)
    for t in ("dtp", "a", "s_corr", "s_f", "s_f exp", "dh0", "dF", "g_corr", "g_f", "d_dtp", "d_a"):
        if t in m.live:
            m.drop(t)
    m.drop("dy", "conv out")
    m.transient("halo grads", (w.cp + 2) * halo)  # conv1d's window backward, the halo's all-reduce
    m.drop("dconv out", "halo", "h0", "zxbcdt")
    # in_proj's backward
    m.add("dx", e * n * D)
    if split:  # dz @ W_z + d[x|B|C|dt] @ W_x: one product beside the other
        m.transient("dx part", e * n * D)
    m.add("d in_proj", e * dp * D)


def _fused_peer(m: Timeline, s: Layer, w: Work) -> None:
    """mamba-ssm's ``Mamba2`` (and NeMo AutoModel's layer at cp 1): ``in_proj`` and
    ``mamba_split_conv1d_scan_combined`` with the gated norm and ``out_proj`` inside."""
    e, n = s.elem, w.local
    D, di, dp, C = s.d_model, s.d_inner, s.d_in_proj, s.conv_dim
    m.add("zxbcdt", e * n * dp)
    _conv_fwd(m, "conv out", s, n, C, dp)
    m.live["y"] = m.live.pop(_ssd_fwd(m, "ssd ", s, w.rows, w.length, s.n_heads, s.n_groups))
    m.add("rstd", 4 * n * s.n_groups)
    m.add("normed", e * n * di)
    m.drop("conv out")
    m.add("out", e * n * D)
    m.drop("normed")
    if not w.backward:
        return
    m.add("normed", e * n * di)  # recomputed
    _conv_fwd(m, "conv out", s, n, C, dp)
    m.add("dzxbcdt", e * n * dp)
    m.add("dxbc", e * n * C)
    m.add("dnormed", e * n * di)
    m.add("dy", e * n * di)
    _ssd_bwd(m, "bwd ", w, s, w.rows, w.length, s.n_heads, s.n_groups)
    m.add("d out_proj", e * D * di)
    m.drop("conv out", "dxbc", "normed", "dnormed", "dy", "zxbcdt", "y", "rstd")
    m.add("dx", e * n * D)
    m.add("d in_proj", e * dp * D)


def _nemo(m: Timeline, s: Layer, w: Work) -> None:
    """NeMo AutoModel's layer at cp > 1 (:class:`cpbench.peers._NemoPeer`): every part of ``zxbcdt``
    moved by its module, the fused kernel without the norm (``y * silu(z)``), the module back, mamba-ssm's
    RMSNorm, ``out_proj`` (whose input is saved)."""
    e, cp, n, tok = s.elem, w.cp, w.local, w.rows * w.length
    D, di, dp = s.d_model, s.d_inner, s.d_in_proj
    hl, gl = s.n_heads // cp, local_groups(s.n_groups, cp)
    dim = hl * s.head_dim
    cconv = dim + 2 * gl * s.d_state
    wl = dim + cconv + hl  # [z | x | B | C | dt] of this rank's heads
    m.add("zxbcdt", e * n * dp)
    m.add("parts", e * tok * wl)
    m.drop("zxbcdt")
    m.add("p", e * tok * wl)
    m.drop("parts")
    _conv_fwd(m, "conv out", s, tok, cconv, wl)
    yh = _ssd_fwd(m, "ssd ", s, w.rows, w.length, hl, gl, z=True)
    m.drop("conv out")
    m.add("y copies", 2 * e * n * di)
    m.add("y", e * n * di)
    m.drop("y copies", yh)
    m.add("rstd", 4 * n * s.n_groups)
    m.add("normed", e * n * di)
    m.add("out", e * n * D)
    if not w.backward:
        return
    m.add("dnormed", e * n * di)
    m.add("d out_proj", e * D * di)
    m.add("dy", e * n * di)
    m.drop("dnormed", "normed", "y", "rstd")
    m.add("dy copies", 2 * e * n * di)
    m.add("dyh", e * tok * dim)
    m.drop("dy copies", "dy")
    _conv_fwd(m, "conv out", s, tok, cconv, wl)
    m.add("dp", e * tok * wl)
    m.add("dxbc", e * tok * cconv)
    _ssd_bwd(m, "bwd ", w, s, w.rows, w.length, hl, gl, z=True)
    m.drop("conv out", "dxbc", "dyh", "p", "ssd y_x")
    m.add("dparts", e * n * dp)
    m.drop("dp")
    m.add("dzxbcdt", e * n * dp)
    m.drop("dparts")
    m.add("dx", e * n * D)
    m.add("d in_proj", e * dp * D)


def walk(s: Layer, w: Work) -> Timeline:
    """The timeline of one case on one rank (see the module docstring)."""
    m = Timeline()
    m.add("parameters", s.params)
    m.add("input", s.elem * w.local * s.d_model)
    if w.backward:
        m.add("output gradient", s.elem * w.local * s.d_model)
    if w.impl == "mamba_ssm" or (w.impl == "nemo" and w.cp == 1):
        _fused_peer(m, s, w)
    elif w.impl == "nemo":
        _nemo(m, s, w)
    elif w.strategy != "hidden" and w.cp > 1:
        _state_passing(m, s, w)
    elif w.path == "seed" and w.cp > 1:
        _seed(m, s, w)
    else:
        _core(m, s, w)
    return m


def gpu_peak(s: Layer, w: Work) -> int:
    """Peak bytes of :func:`walk`."""
    return walk(s, w).peak


# ------------------------------------------------------------------------------------- from a sweep case

ELEMENT_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def layer_of(scenario, case) -> Layer:
    lay = scenario.layer
    return Layer(
        lay.d_model, case.n_heads, lay.head_dim, case.n_groups, lay.d_state, lay.d_conv, lay.chunk_size,
        ELEMENT_SIZE.get(case.dtype, 4),
    )  # fmt: skip


def work_of(scenario, case, deterministic: bool | None = None) -> Work:
    """The :class:`Work` of a sweep case (its packs drawn as the sweep draws them)."""
    import os

    from .runner import case_cu_seqlens

    if deterministic is None:
        deterministic = (
            scenario.run.autotune == "deterministic" or os.environ.get("MAMBA_DETERMINISTIC") == "1"
        )
    cu, _ = case_cu_seqlens(scenario, case)
    host_cu = None if cu is None else tuple(int(v) for v in cu.tolist())
    rows, length = (1, case.tokens) if host_cu else (case.batch, case.seq_len)
    exchange = "gather"
    if case.cp_size > 1 and case.strategy == "hidden":
        exchange = _exchange(case.cp_size, case.layout, rows, length, host_cu)
    docs = None if host_cu is None else tuple(b - a for a, b in zip(host_cu[:-1], host_cu[1:], strict=True))
    return Work(
        cp=case.cp_size, rows=rows, length=length, backward=case.backward, strategy=case.strategy,
        path=case.path, impl=case.impl, chunks=case.overlap_chunks or 1, exchange=exchange,
        slots=True, deterministic=deterministic, layout=case.layout, doc_lens=docs,
    )  # fmt: skip


@functools.lru_cache(maxsize=256)
def _exchange(cp: int, layout: str, rows: int, length: int, host_cu) -> str:
    """How hidden CP's all-to-all lands (:func:`cp_core.hidden._mode`)."""
    from cp_core.plan import host_runs

    runs = host_runs(cp, layout, rows, length, host_cu)
    if runs is None:
        return "gather"
    n = rows * length // cp
    return "identity" if all(len(r) == 1 and r[0][1] == i * n for i, r in enumerate(runs)) else "pieces"


def case_peak(scenario, case, deterministic: bool | None = None) -> int:
    """Estimated peak bytes one rank allocates on a GPU while running ``case``."""
    return gpu_peak(layer_of(scenario, case), work_of(scenario, case, deterministic))


def layer_refuses(s: Layer, w: Work) -> bool:
    """Whether the layer refuses the case on CUDA before allocating it: a tensor its kernels index would
    pass 2^31 elements (``cp_core.kernels.check_int32_extent`` in the layer core and state passing)."""
    if w.impl != "cp_core":
        return False
    if w.strategy != "hidden" and w.cp > 1:  # state_passing_layer's check_int32_extent
        return w.local * max(s.conv_dim + s.n_heads, s.d_inner) >= 2**31
    if w.path == "seed" and w.cp > 1:
        return False
    hk = s.n_heads // w.cp // w.chunks
    gk = chunk_groups(local_groups(s.n_groups, w.cp), w.chunks, 0)[1] if w.cp > 1 else s.n_groups
    width = hk * s.head_dim + 2 * gk * s.d_state + hk
    n = w.local
    return max(w.rows * w.length * width, n * max(s.d_inner, s.d_in_proj - s.d_inner)) >= 2**31


# ------------------------------------------------------------------------------------- against a results folder

_KEY = ("cp_size", "seq_len", "batch", "n_heads", "n_groups", "packing", "layout", "path", "pass", "strategy")


@dataclass(frozen=True)
class Measured:
    """One ok CUDA row of a results folder with the sweep case it ran."""

    scenario: object
    case: object
    peak_gib: float
    deterministic: bool
    backend: str


@functools.lru_cache(maxsize=64)
def _scenario(text: str, overrides: tuple[str, ...] = ()):
    import os
    import tempfile

    from .scenario import load_scenario

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        return load_scenario(f.name, list(overrides))
    finally:
        os.unlink(f.name)


def _keyed(scenario) -> dict:
    out = {}
    for c in scenario.cases():
        k = c.key(device="cuda", world_size=0, backend="")
        out[(*[k[x] for x in _KEY], k["impl"], k["overlap_chunks"], k["dtype"])] = c
    return out


def _row_scenario(text: str, scenario, r, impl: str, chunks: int):
    """A folder that joined several runs has one resolved scenario: the row's own axes, over the same cp
    sizes (so that its packs keep their granule)."""
    pack = '"none"' if r["packing"] == "none" else f"{{docs = {int(r['docs'])}, density = {r['density']}}}"
    cps = sorted({*scenario.sweep.cp_size, int(r["cp_size"])})
    sets = (
        f"sweep.cp_size={cps}", f"sweep.seq_len=[{int(r['seq_len'])}]", f"sweep.batch=[{int(r['batch'])}]",
        f"sweep.heads=[[{int(r['n_heads'])}, {int(r['n_groups'])}]]", f"sweep.packing=[{pack}]",
        f'sweep.layout=["{r["layout"]}"]', f'sweep.path=["{r["path"]}"]', f'sweep.pass=["{r["pass"]}"]',
        f'sweep.strategy=["{r["strategy"]}"]', f'sweep.impl=["{impl}"]', f"sweep.overlap_chunks=[{chunks}]",
    )  # fmt: skip
    return _scenario(text, sets)


def measured(folder, min_gib: float = 0.0) -> list[Measured]:
    """The ok CUDA rows of a results folder (its ``results.csv`` and ``meta.json``) with a ``peak_mem_GiB`` of
    ``min_gib`` or more, each with the case of the folder's resolved scenario that ran it."""
    import json
    from pathlib import Path

    import pandas as pd

    folder = Path(folder)
    if not (folder / "meta.json").exists() or not (folder / "results.csv").exists():
        return []
    meta = json.loads((folder / "meta.json").read_text())
    df = pd.read_csv(folder / "results.csv")
    text = meta.get("scenario_resolved")
    if "peak_mem_GiB" not in df or "device" not in df or not text:
        return []
    scenario = _scenario(text)
    det = (meta.get("env", {}).get("settings") or {}).get("MAMBA_DETERMINISTIC") == "1"
    cases = _keyed(scenario)
    out = []
    for _, r in df[(df.status == "ok") & (df.device == "cuda") & (df.peak_mem_GiB >= min_gib)].iterrows():
        impl = r["impl"] if isinstance(r.get("impl"), str) else "cp_core"
        k = r.get("overlap_chunks")
        chunks = 1 if k is None or k != k else int(k)
        key = (*[r[x].item() if hasattr(r[x], "item") else r[x] for x in _KEY], impl, chunks, r["dtype"])
        sc, case = scenario, cases.get(key)
        if case is None:
            sc = _row_scenario(text, scenario, r, impl, chunks)
            case = _keyed(sc).get(key)
        if case is None:
            raise ValueError(f"{folder}: no case of its scenario matches the row {key}")
        out.append(Measured(sc, case, float(r["peak_mem_GiB"]), det, str(r["backend"])))
    return out
