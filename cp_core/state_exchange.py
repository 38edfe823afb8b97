"""The exchange of state-passing CP: every piece's true initial state from the ranks' zero-start final states.

A document is cut into ``nseg`` segments (``2*cp`` head-tail, rank ``r`` owning segments ``r`` and
``2cp-1-r``; ``cp`` contiguous). A segment ``c`` is affine in its initial state: from a zero start it
ends in ``F_c`` after a log-decay ``ld_c`` (per head), so ``s_c = exp(ld_c) s_{c-1} + F_c`` and the state
entering segment ``c`` is ``h0_c = s_{c-1} = sum_{j<c} exp(ld_{j+1} + ... + ld_{c-1}) F_j`` (zero for the
first segment: nothing crosses a document). Backward: ``dF_j = sum_{c>j} exp(ld_{j+1} + ... + ld_{c-1})
dh0_c`` and ``d ld_j = exp(ld_j) <dF_j, h0_j>`` (the recurrence's own gradient), both local once ``dF``
is known.

=========  ========================================================================================
exchange   what moves
=========  ========================================================================================
allgather  one all-gather of every piece's ``(F, ld)``; each rank sums the segments before its own
           (fp32, weights formed in float64). Backward: one all-gather of ``dh0``. One step
chain      the states along the chain of segment owners by point-to-point messages: the fewest bytes,
           ``nseg - 1`` sequential hops; backward the same chain reversed
=========  ========================================================================================

Tensors: ``F [D, nps, H, S]`` fp32 (``S = P*N``), ``ld [D, nps, H]`` (``D`` documents, ``nps`` pieces per
document on a rank). A segment's sum only ever adds the segments before it in its own document (the
pairs are chosen on the host, never multiplied by a zero weight), so a NaN reaches the later segments
of its document only, forward and backward. Both functions are plain (no autograd): the state-passing
layer calls them from its hand-written backward, on a communication stream where one is used.
"""

from __future__ import annotations

import torch

from . import comm

__all__ = ["ExchangePlan", "exchange_fwd", "exchange_bwd", "EXCHANGES"]

EXCHANGES = ("allgather", "chain")


class ExchangePlan:
    """Which segment every (rank, piece) holds, and which pairs of segments a rank's sums need."""

    def __init__(self, cp: int, rank: int, layout: str):
        self.cp, self.rank = cp, rank
        self.nps = 2 if layout == "head_tail" else 1
        self.nseg = self.nps * cp
        self.mine = [self.segment(rank, s) for s in range(self.nps)]
        srcs = [(o, s) for o in range(cp) for s in range(self.nps)]
        #: forward: for my piece m, the (owner, piece) of every earlier segment; backward: of every later one
        self.before = [[(o, s) for o, s in srcs if self.segment(o, s) < c] for c in self.mine]
        self.after = [[(o, s) for o, s in srcs if self.segment(o, s) > c] for c in self.mine]
        self.owner_piece = [self.owner(c) for c in range(self.nseg)]

    def segment(self, owner: int, s: int) -> int:
        return owner if s == 0 else 2 * self.cp - 1 - owner

    def owner(self, c: int) -> tuple[int, int]:
        return (c, 0) if c < self.cp else (2 * self.cp - 1 - c, 1)


def _cum(ld_all: torch.Tensor, xp: ExchangePlan) -> torch.Tensor:
    """``ld_all [cp, D, nps, H]`` -> inclusive per-document cumsum over the segments ``[D, nseg, H]``, fp64."""
    seg = torch.stack([ld_all[o, :, s] for o, s in xp.owner_piece], dim=1)
    return seg.double().cumsum(1)


def _weight(cum: torch.Tensor, j: int, c: int) -> torch.Tensor:
    """``exp(ld_{j+1} + ... + ld_{c-1})`` ``[D, H, 1]`` fp32, for segments ``j < c``."""
    return torch.exp((cum[:, c - 1] - cum[:, j]).clamp_max(0)).float().unsqueeze(-1)


def exchange_fwd(kind: str, F: torch.Tensor, ld: torch.Tensor, xp: ExchangePlan, group):
    """``(h0 [D, nps, H, S], saved)``: the true initial state of this rank's pieces; ``saved`` goes to
    :func:`exchange_bwd`. ``F`` and ``ld`` may be views of one buffer (the all-gather sends it once)."""
    if kind == "chain":
        return _chain_fwd(F, ld, xp, group)
    if kind != "allgather":
        raise ValueError(f"state_exchange must be one of {EXCHANGES}, got {kind!r}")
    D, nps, H, S = F.shape
    payload = _payload(F, ld)
    gathered = comm.all_gather_into(payload.new_empty((xp.cp, *payload.shape)), payload, group)
    G = gathered[..., : H * S].view(xp.cp, D, nps, H, S)
    ld_all = gathered[..., H * S :].reshape(xp.cp, D, nps, H).clone()
    cum = _cum(ld_all, xp)
    h0 = F.new_zeros((D, nps, H, S))
    for m, c in enumerate(xp.mine):
        for o, s in xp.before[m]:
            h0[:, m].addcmul_(_weight(cum, xp.segment(o, s), c), G[o, :, s])
    return h0, ld_all


def exchange_bwd(
    kind: str, dh0: torch.Tensor, h0: torch.Tensor, ld: torch.Tensor, saved, xp: ExchangePlan, group
):
    """``(dF [D, nps, H, S], dld [D, nps, H])`` from the gradient of this rank's initial states."""
    if kind == "chain":
        dF = _chain_bwd(dh0, ld, xp, group)
    else:
        D, nps, H, S = dh0.shape
        send = dh0.float().contiguous().view(D * nps, H * S)
        dG = comm.all_gather_into(send.new_empty((xp.cp, *send.shape)), send, group).view(xp.cp, D, nps, H, S)
        cum = _cum(saved, xp)
        dF = dh0.new_zeros((D, nps, H, S), dtype=torch.float32)
        for m, j in enumerate(xp.mine):
            for o, s in xp.after[m]:
                dF[:, m].addcmul_(_weight(cum, j, xp.segment(o, s)), dG[o, :, s])
    dld = torch.exp(ld.float()) * (dF * h0).sum(-1)
    return dF, dld


def _payload(F: torch.Tensor, ld: torch.Tensor) -> torch.Tensor:
    """``[D*nps, H*S + H]``: ``F`` and ``ld`` side by side, without a copy when they are already views of one
    such buffer (the state-passing layer writes them there)."""
    D, nps, H, S = F.shape
    base = F._base if F._base is not None else None
    if (
        base is not None
        and base.dim() == 2
        and base.shape == (D * nps, H * S + H)
        and base.is_contiguous()
        and F.data_ptr() == base.data_ptr()
        and ld.data_ptr() == base.data_ptr() + H * S * base.element_size()
    ):
        return base
    return torch.cat([F.reshape(D * nps, H * S).float(), ld.reshape(D * nps, H).float()], dim=1)


def payload_buffer(D: int, nps: int, H: int, S: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F, ld)`` as views of one ``[D*nps, H*S + H]`` fp32 buffer (what the all-gather sends)."""
    buf = torch.empty((D * nps, H * S + H), dtype=torch.float32, device=device)
    return buf[:, : H * S].view(D, nps, H, S), buf[:, H * S :].view(D, nps, H)


# ----------------------------------------------------------------------------------------------- chain


def _chain_fwd(F, ld, xp: ExchangePlan, group):
    """Rank ``r`` receives the state entering segment ``r`` from rank ``r-1``, passes segment ``r``'s final
    state to rank ``r+1``, and (head-tail) the way back."""
    cp, r = xp.cp, xp.rank
    F = F.float()
    e = torch.exp(ld.float()).unsqueeze(-1)
    zero = torch.zeros_like(F[:, 0])
    h_a = comm.recv(zero, r - 1, group) if r > 0 else zero
    out_a = torch.addcmul(F[:, 0], e[:, 0], h_a)  # one pass
    hs = [h_a]
    if r < cp - 1:
        comm.send(out_a, r + 1, group)
    if xp.nps == 2:
        h_b = comm.recv(zero, r + 1, group) if r < cp - 1 else out_a
        out_b = torch.addcmul(F[:, 1], e[:, 1], h_b)
        if r > 0:
            comm.send(out_b, r - 1, group)
        hs.append(h_b)
    return torch.stack(hs, dim=1), None


def _chain_bwd(dh0, ld, xp: ExchangePlan, group):
    cp, r = xp.cp, xp.rank
    dh0 = dh0.float().contiguous()
    e = torch.exp(ld.float()).unsqueeze(-1)
    zero = torch.zeros_like(dh0[:, 0])
    d_out = [None, None]
    if xp.nps == 1:
        d_out[0] = comm.recv(zero, r + 1, group) if r < cp - 1 else zero
        dh_a = torch.addcmul(dh0[:, 0], e[:, 0], d_out[0])
    else:
        d_out[1] = comm.recv(zero, r - 1, group) if r > 0 else zero
        dh_b = torch.addcmul(dh0[:, 1], e[:, 1], d_out[1])
        if r < cp - 1:
            comm.send(dh_b, r + 1, group)
            d_out[0] = comm.recv(zero, r + 1, group)
        else:
            d_out[0] = dh_b
        dh_a = torch.addcmul(dh0[:, 0], e[:, 0], d_out[0])
    if r > 0:
        comm.send(dh_a, r - 1, group)
    return torch.stack(d_out[: xp.nps], dim=1)
