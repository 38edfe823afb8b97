"""The state-passing exchange (all-gather and chain) against the token recurrence's segment form, forward and
backward, on real gloo groups: ``s_c = exp(ld_c) s_{c-1} + F_c``, ``h0_c = s_{c-1}``, gradients by float64
autograd of that loop. A NaN in one document's segment reaches that document's later segments only (the
earlier ones in backward), and no other document."""

import pytest
import torch
from cases import randn
from ranks import verdict

from cp_core import comm
from cp_core.state_exchange import ExchangePlan, exchange_bwd, exchange_fwd, payload_buffer

H, S, D = 2, 3, 3


def _reference(F, ld, dh0):
    """``F [D, nseg, H, S]``, ``ld [D, nseg, H]`` (float64): ``h0`` by the forward loop, and the gradients of
    ``sum(dh0 * h0)`` by the reverse loop (what autograd of the forward loop computes, NaN included)."""
    hs = []
    for d in range(F.shape[0]):
        s = torch.zeros(F.shape[2:], dtype=F.dtype)
        row = []
        for c in range(F.shape[1]):
            row.append(s)
            s = torch.exp(ld[d, c]).unsqueeze(-1) * s + F[d, c]
        hs.append(torch.stack(row))
    h0 = torch.stack(hs)
    dF = torch.zeros_like(F)
    dld = torch.zeros_like(ld)
    for d in range(F.shape[0]):
        ds = torch.zeros(F.shape[2:], dtype=F.dtype)
        for c in range(F.shape[1] - 1, -1, -1):
            dF[d, c] = ds  # the gradient of s_c: from the later segments' h0
            dld[d, c] = (torch.exp(ld[d, c]).unsqueeze(-1) * ds * h0[d, c]).sum(-1)
            ds = dh0[d, c] + torch.exp(ld[d, c]).unsqueeze(-1) * ds
    return h0, dF, dld


def exchange_case(group, kind, layout, bad):
    cp, r = comm.group_size(group), comm.group_rank(group)
    xp = ExchangePlan(cp, r, layout)
    Fg = randn((D, xp.nseg, H, S), 1).double()
    ldg = -torch.rand(D, xp.nseg, H, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dhg = randn((D, xp.nseg, H, S), 3).double()
    if bad == "forward":
        Fg[0, 1, 0, 0] = float("nan")
    elif bad == "backward":
        dhg[1, xp.nseg - 1, 1, 2] = float("nan")
    h_ref, dF_ref, dld_ref = _reference(Fg, ldg, dhg)
    Fv, ldv = payload_buffer(D, xp.nps, H, S, "cpu")  # the layer's one buffer
    for m, c in enumerate(xp.mine):
        Fv[:, m], ldv[:, m] = Fg[:, c], ldg[:, c]
    h0, saved = exchange_fwd(kind, Fv, ldv, xp, group)
    dh0 = torch.stack([dhg[:, c] for c in xp.mine], 1).float()
    dF, dld = exchange_bwd(kind, dh0, h0, ldv, saved, xp, group)
    errs = {}
    for m, c in enumerate(xp.mine):
        for name, got, want in (
            ("h0", h0[:, m], h_ref[:, c]),
            ("dF", dF[:, m], dF_ref[:, c]),
            ("dld", dld[:, m], dld_ref[:, c]),
        ):
            if not torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6, equal_nan=True):
                errs[f"{name} segment {c}"] = (got, want)
    return verdict(not errs, group), sorted(errs)


@pytest.mark.parametrize("kind", ["allgather", "chain"])
@pytest.mark.parametrize("layout", ["head_tail", "contiguous"])
@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("bad", [None, "forward", "backward"])
def test_exchange_matches_the_recurrence(ranks, kind, layout, cp, bad):
    for r, (ok, errs) in enumerate(ranks.run(exchange_case, cp, kind, layout, bad)):
        assert ok, f"rank {r}: {errs}"


def test_exchange_plan_pairs():
    xp = ExchangePlan(4, 1, "head_tail")  # rank 1 holds segments 1 and 6 of 8
    assert xp.mine == [1, 6]
    assert xp.before[0] == [(0, 0)]
    assert sorted(xp.segment(o, s) for o, s in xp.before[1]) == [0, 1, 2, 3, 4, 5]
    assert sorted(xp.segment(o, s) for o, s in xp.after[1]) == [7]
    with pytest.raises(ValueError, match="state_exchange must be"):
        exchange_fwd("ring", torch.zeros(1, 2, 1, 1), torch.zeros(1, 2, 1), xp, None)


def test_reference_reverse_loop_is_autograd_of_the_forward_loop():
    gen = torch.Generator().manual_seed(9)
    F = torch.randn(2, 4, H, S, dtype=torch.float64, generator=gen).requires_grad_()
    ld = (-torch.rand(2, 4, H, dtype=torch.float64, generator=gen)).requires_grad_()
    dh = torch.randn(2, 4, H, S, dtype=torch.float64, generator=gen)
    h0, dF, dld = _reference(F.detach(), ld.detach(), dh)
    hs = []
    for d in range(2):
        s, row = torch.zeros(H, S, dtype=torch.float64), []
        for c in range(4):
            row.append(s)
            s = torch.exp(ld[d, c]).unsqueeze(-1) * s + F[d, c]
        hs.append(torch.stack(row))
    want = torch.autograd.grad((torch.stack(hs) * dh).sum(), (F, ld))
    assert torch.allclose(dF, want[0], atol=1e-12) and torch.allclose(dld, want[1], atol=1e-12)
