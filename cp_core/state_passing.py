"""State-passing context parallelism for Mamba2: the sequence stays sharded, only SSD states and a conv halo move.

Every document (a row of ``[B, L]`` input counts as one) is cut into ``nseg`` segments, ``2*cp``
(head-tail: rank ``r`` owns segments ``r`` and ``2cp-1-r``) or ``cp`` (contiguous). A rank works on
its *pieces* (its segments of every document), laid out as the rows of a left-padded
``[R, lrow]`` batch, so the SSD kernel runs them as independent sequences (a piece longer than
``lrow`` takes several rows, chained locally before the exchange; see :class:`_Pieces`):

1. conv1d: each piece is preceded by a halo, the ``d_conv-1`` tokens before it in its document
   (zeros at the document start), looked up in an all-gather of every piece's last ``d_conv-1``
   tokens; the kernel's zero padding then equals the true causal context.
2. SSD from a zero initial state: local outputs ``y0`` and final states ``F`` (fp32), and the
   segment's log-decay ``sum(A * dt)`` per head. A Mamba2 segment is affine in its initial state,
   ``final = exp(logdecay) * initial + F``.
3. One all-gather of ``(F, logdecay)``; an exclusive scan over each document's segments gives every
   piece its true initial state ``h0`` (zero for the first segment: nothing crosses a document).
4. Exact correction ``y_t += exp(cumsum(A dt)_t) * C_t . h0`` on the piece's tokens, in fp32
   (:mod:`cp_core.kernels.correction`: one fused Triton pass on CUDA beside a torch reference).

Backward is autograd through the same steps; the all-gather's backward sums the gradients of every
state and halo token back to the rank that owns it, so earlier segments receive the gradient of
later segments' initial states. Bytes per layer: :func:`cp_core.cost.comm_bytes`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import comm, kernels
from .layout import granule
from .plan import TokenPlan, get_plan
from .regions import CONV1D, LAYOUT, SSM, STATE_XCHG, region

#: Tokens per SSD row when pieces are split (``None``: chosen per batch, see :class:`_Pieces`);
#: ``CP_CORE_ROW_TOKENS`` at import (tests force short rows with it).
ROW_TOKENS: int | None = (
    int(os.environ["CP_CORE_ROW_TOKENS"]) if os.environ.get("CP_CORE_ROW_TOKENS") else None
)


class _Pieces:
    """Index maps between this rank's token stream and its left-padded SSD rows (device tensors).

    A *piece* is one of this rank's segments of a document (``pieces = n_docs * nps``). Padding every
    piece to the longest one costs ``pieces * Lmax`` slots, which many uneven documents blow up (64
    documents at L 64K: 6.3e9 conv elements for 64K tokens). So when that padding would pass twice the
    tokens, a piece is split into ``q = ceil(m / lrow)`` consecutive *rows* of ``lrow`` tokens (the last
    row of a piece left-padded), ``lrow`` the mean piece length rounded up to ``chunk``: each row runs
    the SSD from a zero state, the rows of a piece are chained here (:meth:`compose`) into the piece's
    ``(final state, log-decay)`` that the ranks exchange, and the piece's true initial state is carried
    back into each row's (:meth:`row_states`). Rows after the first take their conv halo from the stream
    (the previous row of the same piece); first rows take it from the exchanged tails, as before."""

    def __init__(self, doc_lens: list[int], cp: int, rank: int, layout: str, k: int, device, chunk: int = 1):
        nseg = granule(layout, cp)
        nps = nseg // cp  # pieces per document on each rank: 2 (head-tail) or 1
        n_docs = len(doc_lens)
        seg = [n // nseg for n in doc_lens]
        self.n_docs, self.nseg, self.nps, self.pieces = n_docs, nseg, nps, n_docs * nps
        self.lmax = max(seg + [0])
        self.k = k
        t_loc = sum(doc_lens) // cp
        self.t_loc = t_loc
        P = self.pieces
        dev = dict(device=device, dtype=torch.long)
        # rows per piece
        if ROW_TOKENS is not None:
            lrow = ROW_TOKENS
        elif P * self.lmax <= 2 * t_loc:
            lrow = self.lmax
        else:
            lrow = -(-max(-(-t_loc // max(P, 1)), 1) // chunk) * chunk
        lrow = max(lrow, k - 1, 1)
        piece_len = [seg[p // nps] for p in range(P)]
        q = [max(1, -(-m // lrow)) for m in piece_len]
        if max(q + [1]) == 1:
            lrow = max(self.lmax, 1)
        self.lrow, self.q = lrow, q
        self.rows = sum(q)
        R = self.rows
        lc = lrow + k - 1  # conv row: [pad | halo (k-1) | tokens]
        seg_t = torch.tensor(seg, **dev)
        starts = torch.tensor([0] + doc_lens, **dev).cumsum(0)[:-1]  # global document starts
        lstart = starts // cp  # document starts in the local stream
        piece = torch.arange(P, **dev)
        d, s = piece // nps, piece % nps
        m = seg_t[d]  # piece length
        pstart = lstart[d] + s * m  # piece start in the local stream
        chunk_of = (
            torch.full_like(s, rank)
            if layout == "contiguous"
            else torch.where(s == 0, rank, 2 * cp - 1 - rank)
        )
        self.row_chunk = chunk_of
        # rows, piece-major: row -> (piece, sub-row j); row j covers piece tokens [j*lrow, min((j+1)*lrow, m))
        q_t = torch.tensor(q, **dev)
        self.row_piece = torch.repeat_interleave(piece, q_t)
        first_row = q_t.cumsum(0) - q_t
        jrow = torch.arange(R, **dev) - first_row[self.row_piece]
        sub0 = jrow * lrow  # offset of the row's first token in its piece
        rlen = (m[self.row_piece] - sub0).clamp(0, lrow)  # tokens in the row
        rstart = pstart[self.row_piece] + sub0  # stream index of the row's first token
        # stream -> rows (SSD layout, [R, lrow]); pad slots point at token 0 and are selected to zero
        col = torch.arange(lrow, **dev).view(1, -1)
        o = col - (lrow - rlen).view(-1, 1)
        self.valid = o >= 0  # [R, lrow]
        # every piece one row, as long as the longest, in order in the stream (always for [B, L] input):
        # the rows are then a view of the stream and nothing is gathered or padded
        self.uniform = R == P and all(v == lrow for v in seg) and R * lrow == t_loc
        # padding slots read token 0 and are then selected to zero (rows_of), so a non-finite token 0
        # never reaches another document's row; B is zero there too, so padding adds nothing to the state
        self.to_rows = torch.where(self.valid, rstart.view(-1, 1) + o, 0).reshape(-1)
        self.from_rows = torch.empty(t_loc, **dev)
        flat = torch.arange(R * lrow, **dev).view(R, lrow)
        self.from_rows[self.to_rows.view(R, lrow)[self.valid]] = flat[self.valid]
        self.valid_f = self.valid.unsqueeze(-1)
        # conv rows: the tokens right-aligned, halo slots just before them. Halo of a piece's first row:
        # the exchanged tails ([xbc; halo; zero] index t_loc + piece*(k-1) + slot); of a later row: the
        # stream tokens before it (same piece, since lrow >= k-1)
        colc = torch.arange(lc, **dev).view(1, -1)
        oc = colc - (lc - rlen).view(-1, 1)
        halo_slot = oc + (k - 1)  # 0..k-2 inside the halo
        is_tok, is_halo = oc >= 0, (oc < 0) & (halo_slot >= 0)
        n_halo = P * (k - 1)
        halo_idx = torch.where(
            (jrow == 0).view(-1, 1),
            t_loc + self.row_piece.view(-1, 1) * (k - 1) + halo_slot,
            rstart.view(-1, 1) + oc,
        )
        self.to_conv = torch.where(
            is_tok, rstart.view(-1, 1) + oc, torch.where(is_halo, halo_idx, t_loc + n_halo)
        ).reshape(-1)
        # the last k-1 tokens of every piece (zero slot t_loc before its start), for the other ranks
        tq = (pstart + m).view(-1, 1) + torch.arange(-(k - 1), 0, **dev).view(1, -1)
        self.tail_idx = torch.where(tq >= pstart.view(-1, 1), tq, t_loc).reshape(-1)
        # halo lookup into the all-gathered tails [cp, P, k-1] (+1 zero slot at the end)
        qg = (starts[d] + chunk_of * m).view(-1, 1) + torch.arange(-(k - 1), 0, **dev).view(1, -1)  # [P, k-1]
        in_doc = (qg >= starts[d].view(-1, 1)) & (m.view(-1, 1) > 0)
        mm = m.clamp_min(1).view(-1, 1)
        c2 = (qg - starts[d].view(-1, 1)).clamp_min(0) // mm
        end = starts[d].view(-1, 1) + (c2 + 1) * mm - 1
        e = end - qg  # distance from the end of the source segment, < k-1
        if layout == "contiguous":
            owner, s2 = c2, torch.zeros_like(c2)
        else:
            owner = torch.where(c2 < cp, c2, 2 * cp - 1 - c2)
            s2 = (c2 >= cp).long()
        src_piece = d.view(-1, 1) * nps + s2
        self.halo_src = torch.where(in_doc, (owner * P + src_piece) * (k - 1) + (k - 2 - e), cp * n_halo)
        self.halo_src = self.halo_src.reshape(-1)
        # scan: for document d, segment c lives on rank owner(c), piece d*nps + s(c)
        cs = torch.arange(nseg, **dev)
        if layout == "contiguous":
            own_c, s_c = cs, torch.zeros_like(cs)
        else:
            own_c = torch.where(cs < cp, cs, 2 * cp - 1 - cs)
            s_c = (cs >= cp).long()
        docs = torch.arange(n_docs, **dev).view(-1, 1)
        self.seg_src = (own_c.view(1, -1) * P + docs * nps + s_c.view(1, -1)).reshape(-1)  # [D*nseg]
        self.my_seg = d * nseg + chunk_of  # [P] index into [D*nseg]
        # chaining the rows of a piece: pieces sorted by row count (descending), so that the pieces with
        # a j-th row are a prefix [0, n[j]) of that order; rows_at[j] are those pieces' j-th rows
        if R > P:
            order = sorted(range(P), key=lambda i: -q[i])
            self.n = [sum(1 for i in order if q[i] > j) for j in range(max(q))]
            fr = first_row.tolist()
            self.order = torch.tensor(order, **dev)
            self.unorder = torch.empty_like(self.order)
            self.unorder[self.order] = torch.arange(P, **dev)
            self.rows_at = [
                torch.tensor([fr[i] + j for i in order[: self.n[j]]], **dev) for j in range(len(self.n))
            ]
            # rows in step-major order (j, then sorted piece) -> row order
            step_major = torch.cat(self.rows_at)
            self.unstep = torch.empty_like(step_major)
            self.unstep[step_major] = torch.arange(R, **dev)

    def compose(self, F_rows: torch.Tensor, ld_rows: torch.Tensor):
        """Rows' zero-state finals ``F [R, H, P, N]`` and log-decays ``ld [R, H]`` -> the pieces' ``(F, ld)``
        and, per row, the state ``h_pre`` reached from a zero state at its piece's start and the log-decay
        ``d_pre`` accumulated before it (both zero for a first row)."""
        if self.rows == self.pieces:
            return F_rows, ld_rows, None, None
        st = F_rows.new_zeros((self.n[0], *F_rows.shape[1:]))
        dc = ld_rows.new_zeros((self.n[0], ld_rows.shape[1]))
        h_pre, d_pre, done_F, done_ld = [], [], [], []
        for j, rows in enumerate(self.rows_at):
            nj = self.n[j]
            if nj < st.shape[0]:  # pieces without a j-th row are final
                done_F.append(st[nj:])
                done_ld.append(dc[nj:])
                st, dc = st[:nj], dc[:nj]
            h_pre.append(st)
            d_pre.append(dc)
            ldj = ld_rows.index_select(0, rows)
            st = torch.exp(ldj)[..., None, None] * st + F_rows.index_select(0, rows)
            dc = dc + ldj
        done_F.append(st)
        done_ld.append(dc)
        # done_* run from the pieces with the fewest rows (end of the order) to the most: reverse blocks
        F_sorted = torch.cat(done_F[::-1])
        ld_sorted = torch.cat(done_ld[::-1])
        F_p, ld_p = F_sorted.index_select(0, self.unorder), ld_sorted.index_select(0, self.unorder)
        h_pre = torch.cat(h_pre).index_select(0, self.unstep)
        d_pre = torch.cat(d_pre).index_select(0, self.unstep)
        return F_p, ld_p, h_pre, d_pre

    def row_states(self, h0_pieces: torch.Tensor, h_pre, d_pre) -> torch.Tensor:
        """The true initial state of every row from its piece's: ``exp(d_pre) * h0 + h_pre``."""
        if h_pre is None:
            return h0_pieces
        h0 = h0_pieces.index_select(0, self.row_piece)
        return torch.exp(d_pre)[..., None, None] * h0 + h_pre


def _pieces(plan: TokenPlan | None, doc_lens, cp, rank, layout, k, device, chunk) -> _Pieces:
    if plan is None:
        return _Pieces(doc_lens, cp, rank, layout, k, device, chunk)
    key = ("state_passing", rank, k, chunk, ROW_TOKENS)
    if key not in plan.extras:
        plan.extras[key] = _Pieces(doc_lens, cp, rank, layout, k, device, chunk)
    return plan.extras[key]


def _exclusive_scan(F_seg: torch.Tensor, ld_seg: torch.Tensor) -> torch.Tensor:
    """``F_seg [D, nseg, H, P, N]``, ``ld_seg [D, nseg, H]`` -> initial state of every segment (same shape).

    ``h_c = sum_{j<c} exp(ld_{j+1} + ... + ld_{c-1}) F_j``: one batched product with the ``[nseg, nseg]``
    weights per (document, head), whose exponents are formed in float64 (differences of long sums).
    The product multiplies later segments by zero, so non-finite segments are computed as zeros and the
    states after them selected to NaN: a NaN reaches the later segments of its document only."""
    D, nseg, H = ld_seg.shape
    bad = ~(torch.isfinite(F_seg).flatten(2).all(-1) & torch.isfinite(ld_seg).all(-1))  # [D, nseg]
    after_bad = (bad.long().cumsum(1) - bad.long()) > 0  # some earlier segment is bad
    F_seg = torch.where(torch.isfinite(F_seg), F_seg, 0.0)
    ld_seg = torch.where(torch.isfinite(ld_seg), ld_seg, 0.0)
    cum = ld_seg.double().cumsum(1)  # [D, nseg, H], inclusive
    expo = cum[:, :-1].unsqueeze(2) - cum.unsqueeze(1)  # [D, c-1 (=0..nseg-2), j, H] : sum_{j<i<=c-1} ld_i
    below = (
        torch.ones(nseg - 1, nseg, dtype=torch.bool, device=ld_seg.device).tril().view(1, nseg - 1, nseg, 1)
    )
    w = torch.where(below, torch.exp(expo.clamp_max(0)), 0.0).to(F_seg.dtype)  # [D, nseg-1, nseg, H]
    h = torch.einsum("dcjh,djhk->dchk", w, F_seg.flatten(3))  # states entering segments 1..nseg-1
    h = torch.cat([torch.zeros_like(F_seg[:, :1]), h.view(D, nseg - 1, *F_seg.shape[2:])], dim=1)
    return torch.where(after_bad.view(D, nseg, 1, 1, 1), float("nan"), h)


class _ChainScan(torch.autograd.Function):
    """Exclusive scan of segment states along the chain of owners, by point-to-point messages.

    ``F [D, nps, H, P, N]`` (fp32 local final states of this rank's pieces, ``nps`` = 2 for head-tail:
    segments ``r`` and ``2cp-1-r``; 1 for contiguous: segment ``r``), ``ld [D, nps, H]`` log-decays
    -> ``h0``, the true initial state of each piece. Rank ``r`` receives the state entering segment
    ``r`` from rank ``r-1``, passes segment ``r``'s final state to rank ``r+1``, and (head-tail) the
    way back. Every rank sends one state per piece: the fewest bytes, over ``nseg-1`` sequential hops.
    Backward runs the chain in reverse with the gradients."""

    @staticmethod
    def forward(ctx, F_loc, ld, group):
        cp, r = comm.group_size(group), comm.group_rank(group)
        e = torch.exp(ld)[..., None, None]
        zero = torch.zeros_like(F_loc[:, 0])
        h_a = comm.recv(zero, r - 1, group) if r > 0 else zero
        out_a = e[:, 0] * h_a + F_loc[:, 0]
        hs = [h_a]
        if F_loc.shape[1] == 1:
            if r < cp - 1:
                comm.send(out_a, r + 1, group)
        else:
            if r < cp - 1:
                comm.send(out_a, r + 1, group)
                h_b = comm.recv(zero, r + 1, group)
            else:
                h_b = out_a
            out_b = e[:, 1] * h_b + F_loc[:, 1]
            if r > 0:
                comm.send(out_b, r - 1, group)
            hs.append(h_b)
        h0 = torch.stack(hs, dim=1)
        ctx.group = group
        ctx.save_for_backward(h0, e)
        return h0

    @staticmethod
    def backward(ctx, dh0):
        group = ctx.group
        cp, r = comm.group_size(group), comm.group_rank(group)
        h0, e = ctx.saved_tensors
        dh0 = dh0.contiguous()
        zero = torch.zeros_like(dh0[:, 0])
        d_out = [None, None]
        if dh0.shape[1] == 1:
            d_out[0] = comm.recv(zero, r + 1, group) if r < cp - 1 else zero
            dh_a = dh0[:, 0] + e[:, 0] * d_out[0]
        else:
            d_out[1] = comm.recv(zero, r - 1, group) if r > 0 else zero
            dh_b = dh0[:, 1] + e[:, 1] * d_out[1]
            if r < cp - 1:
                comm.send(dh_b, r + 1, group)
                d_out[0] = comm.recv(zero, r + 1, group)
            else:
                d_out[0] = dh_b
            dh_a = dh0[:, 0] + e[:, 0] * d_out[0]
        if r > 0:
            comm.send(dh_a, r - 1, group)
        dF = torch.stack(d_out[: dh0.shape[1]], dim=1)
        dld = (dF * e * h0).sum(dim=(-1, -2))
        return dF, dld, None


def state_passing_conv_ssd(
    mixer, xbcdt: torch.Tensor, cu_seqlens: torch.Tensor | None, length: int, params=None
) -> torch.Tensor:
    """conv1d + SSD of ``mixer`` on this rank's shard ``[B, L/cp, x|B|C|dt]`` (or packed ``[T/cp, ...]``)
    with the state-passing strategy; returns ``y`` of shape ``[B, L/cp, d_inner]`` (or ``[T/cp, d_inner]``).
    ``params``: the :class:`~cp_core.mixer.Weights` to use (under autocast: copies in the compute dtype);
    default the mixer's own."""
    w = mixer.weights() if params is None else params
    conv_w, conv_b, dt_bias, A_log, D_p = w.conv.squeeze(1), w.conv_bias, w.dt_bias, w.A_log, w.D
    c = mixer.config
    group, layout = mixer.cp_group, mixer.layout
    cp, rank = comm.group_size(group), comm.group_rank(group)
    k, nh, hd, ng, ns = c.d_conv, c.n_heads, c.head_dim, c.n_groups, c.d_state
    dev = xbcdt.device
    if cu_seqlens is None:
        batch = xbcdt.shape[0]
        plan = get_plan(cp, layout, batch, length, dev)
        doc_lens = [length] * batch
    else:
        batch = 1
        plan = get_plan(cp, layout, 1, length, dev, cu_seqlens)
        cu = plan.host_cu
        doc_lens = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
    pc = _pieces(plan, doc_lens, cp, rank, layout, k, dev, c.chunk_size)
    stream = xbcdt.reshape(-1, xbcdt.shape[-1])  # [T_loc, conv_dim + nh]
    xbc, dt = stream.split([c.conv_dim, nh], dim=-1)
    R, lmax = pc.rows, pc.lrow
    if dev.type == "cuda":  # every rank has the same pieces: all raise before the first collective
        kernels.check_int32_extent(
            f"the padded SSD rows [R={R}, {lmax}+{k - 1}, conv_dim={c.conv_dim}]",
            R * (lmax + k - 1) * c.conv_dim,
            "use a larger cp_size or shorter sequences, or the hidden strategy",
        )

    def rows_of(t):  # stream [T_loc, C] -> left-padded rows [R, Lmax, C], zeros in the padding
        if pc.uniform:
            return t.reshape(R, lmax, t.shape[-1])
        return torch.where(pc.valid_f, t.index_select(0, pc.to_rows).view(R, lmax, t.shape[-1]), 0.0)

    # 1. conv1d with a halo gathered from the owners of the preceding tokens
    with region(LAYOUT):
        xbc_rows_in = rows_of(xbc)
        # the last k-1 tokens of every piece (zeros before its start)
        tails = F.pad(xbc, (0, 0, 0, 1)).index_select(0, pc.tail_idx).view(pc.pieces, k - 1, c.conv_dim)
    with region(STATE_XCHG):
        if k > 1:
            all_tails = comm.all_gather(tails.contiguous(), group).reshape(-1, c.conv_dim)
        else:  # d_conv 1: no halo, nothing to exchange
            all_tails = tails.new_zeros(0, c.conv_dim)
    with region(LAYOUT):
        halo = F.pad(all_tails, (0, 0, 0, 1)).index_select(
            0, pc.halo_src
        )  # [R*(k-1), conv_dim], 0 off-document
        if pc.uniform:
            conv_in = torch.cat([halo.view(R, k - 1, c.conv_dim), xbc_rows_in], dim=1)
        else:
            conv_in = (
                torch.cat([xbc, halo, halo.new_zeros(1, c.conv_dim)])
                .index_select(0, pc.to_conv)
                .view(R, lmax + k - 1, c.conv_dim)
            )
    ssd_name, conv_name = mixer._backends(conv_in, conv_w)
    with region(CONV1D):
        xbc_rows = kernels.conv1d(conv_in, conv_w, conv_b, backend=conv_name)
    x, B, C = xbc_rows[:, k - 1 :].split([c.d_inner, ng * ns, ng * ns], dim=-1)
    if not pc.uniform:
        B = torch.where(pc.valid_f, B, 0.0)  # padding must add nothing to the state
    with region(LAYOUT):
        dt_rows = rows_of(dt)
    A = -torch.exp(A_log.float())
    D = D_p.view(nh, hd) if c.D_has_hdim else D_p
    # 2. local SSD from a zero state
    with region(SSM):
        y0, F_loc = kernels.ssd(
            x.reshape(R, lmax, nh, hd),
            dt_rows,
            A,
            B.reshape(R, lmax, ng, ns),
            C.reshape(R, lmax, ng, ns),
            chunk_size=c.chunk_size,
            D=D,
            dt_bias=dt_bias,
            dt_softplus=True,
            return_final_states=True,
            backend=ssd_name,
        )
        # decay from the piece start, time last ([R, H, Lmax]: an inner-dimension scan is fast)
        a = (F.softplus(dt_rows.float() + dt_bias.float()) * A).transpose(1, 2)
        if not pc.uniform:
            a = torch.where(pc.valid.unsqueeze(1), a, 0.0)  # no decay accumulates over padding
        acum = a.contiguous().cumsum(-1)
        logdecay = acum[..., -1] if lmax else a.new_zeros(R, nh)
        # rows of one piece chained: the piece's (final state, log-decay) from a zero start
        F_loc, logdecay, h_pre, d_pre = pc.compose(F_loc.float(), logdecay)
    # 3. exchange (F, logdecay) of every piece, scan each document's segments
    P = pc.pieces
    if getattr(mixer, "state_exchange", "allgather") == "chain":
        with region(STATE_XCHG):
            h0 = _ChainScan.apply(
                F_loc.float().view(pc.n_docs, pc.nps, nh, hd, ns), logdecay.view(pc.n_docs, pc.nps, nh), group
            ).reshape(P, nh, hd, ns)
    else:
        with region(STATE_XCHG):
            payload = torch.cat([F_loc.float().reshape(P, -1), logdecay], dim=-1)
            gathered = comm.all_gather(payload, group).reshape(cp * P, -1)
        with region(SSM):
            seg = gathered.index_select(0, pc.seg_src).view(pc.n_docs, pc.nseg, -1)
            F_seg = seg[..., : nh * hd * ns].view(pc.n_docs, pc.nseg, nh, hd, ns)
            h0_all = _exclusive_scan(F_seg, seg[..., nh * hd * ns :])
            h0 = h0_all.reshape(pc.n_docs * pc.nseg, nh, hd, ns).index_select(0, pc.my_seg)  # [P, H, P, N]
    with region(SSM):
        h0 = pc.row_states(h0, h_pre, d_pre)  # [R, H, P, N]
        # 4. y_t += exp(acum_t) * C_t . h0, formed in fp32 and rounded once (one fused pass on CUDA)
        y = kernels.state_correction(y0, C.reshape(R, lmax, ng, ns), h0, acum).reshape(R * lmax, nh * hd)
    with region(LAYOUT):
        if not pc.uniform:
            y = y.index_select(0, pc.from_rows)
    return y.view(*xbcdt.shape[:-1], nh * hd)
