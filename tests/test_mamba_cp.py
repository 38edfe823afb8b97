"""The seed API on real gloo groups: exact permutations, gradients, fused == seed, one all-to-all, bad input."""

import pytest
import torch
from cases import cu_from_lengths, doc_lengths, owned_channels, randn, setting
from ranks import raises_everywhere, verdict
from torch.overrides import TorchFunctionMode

from cp_core import comm
from cp_core import plan as plan_mod
from cp_core.layout import granule, shard
from cp_core.mamba_cp import MambaContextParallel
from cp_core.options import CPOptions
from cp_core.plan import RUNS_MAX, build_plan


def _data(cp, layout, batch, n_docs, width, seed):
    """Global input: [B, L, width] (n_docs None) or packed [T, width] with cu_seqlens."""
    g = granule(layout, cp)
    if n_docs is None:
        return randn((batch, 3 * g, width), seed), None
    cu = cu_from_lengths(doc_lengths(n_docs, g, seed))
    return randn((int(cu[-1]), width), seed), cu


def _case(group, layout, batch, n_docs, nh, hd, ng, ds, with_z, exchange="direct"):
    """Everything the fused path must satisfy, on this rank, against references from the global tensors.
    ``exchange="gather"``: every plan built with no pieces (``RUNS_MAX`` 0): one all-to-all and a row gather."""
    if exchange == "direct":
        return _case_in(group, layout, batch, n_docs, nh, hd, ng, ds, with_z)
    plan_mod.clear_cache()
    try:
        with setting(plan_mod, "RUNS_MAX", 0):
            return _case_in(group, layout, batch, n_docs, nh, hd, ng, ds, with_z)
    finally:
        plan_mod.clear_cache()


def _case_in(group, layout, batch, n_docs, nh, hd, ng, ds, with_z):
    cp, r = comm.group_size(group), comm.group_rank(group)
    d_inner = nh * hd
    width = (2 if with_z else 1) * d_inner + 2 * ng * ds + nh
    x, cu = _data(cp, layout, batch, n_docs, width, seed=11)
    ch = owned_channels(r, cp, nh, hd, ng, ds, with_z)
    wl = len(ch)
    checks = {}
    results = {}
    for fused in (True, False):
        ctx = MambaContextParallel(group, nh, hd, ng, ds, None, layout=layout, fused=fused)
        local = shard(x, r, cp, layout, cu).requires_grad_()
        comm.COUNTS.clear()
        out = ctx.pre_conv_ssm(local, cu, with_z=with_z)
        n_pre = comm.COUNTS["all_to_all"]
        checks[f"pre exact fused={fused}"] = torch.equal(out, x[..., ch])
        # post: the x channels of pre's output go back to exactly this rank's shard of x
        xo = (d_inner // cp) if with_z else 0
        y = out[..., xo : xo + d_inner // cp]
        comm.COUNTS.clear()
        back = ctx.post_conv_ssm(y, cu)
        n_post = comm.COUNTS["all_to_all"]
        x_part = x[..., (d_inner if with_z else 0) : (d_inner if with_z else 0) + d_inner]
        checks[f"post(pre(x)) exact fused={fused}"] = torch.equal(back, shard(x_part, r, cp, layout, cu))
        if fused:
            checks["one all-to-all per direction"] = (n_pre, n_post) == (min(cp - 1, 1), min(cp - 1, 1))
        elif cp > 1:
            checks["seed path: five all-to-alls"] = n_pre == (5 if with_z else 4)
        # gradients through pre and post vs the reference permutation
        w_out = randn((cp, *out.shape), seed=99)
        w_back = randn((cp, *back.shape), seed=98)
        (out * w_out[r]).sum().add_((back * w_back[r]).sum()).backward()
        results[fused] = (out.detach(), back.detach(), local.grad.clone())
    # reference gradient: d/dx of sum_r <x[..., ch_r], w_out[r]> + <post_r, w_back[r]> built on the global tensor
    xg = x.clone().requires_grad_()
    loss = 0
    for s in range(cp):
        ch_s = owned_channels(s, cp, nh, hd, ng, ds, with_z)
        loss = loss + (xg[..., ch_s] * w_out[s]).sum()
        xo = d_inner if with_z else 0
        loss = loss + (shard(xg[..., xo : xo + d_inner], s, cp, layout, cu) * w_back[s]).sum()
    loss.backward()
    want = shard(xg.grad, r, cp, layout, cu)
    for fused in (True, False):
        ok = torch.allclose(results[fused][2], want, rtol=1e-6, atol=1e-6)
        checks[f"input grad fused={fused}"] = ok
    checks["fused == seed forward, bit for bit"] = torch.equal(
        results[True][0], results[False][0]
    ) and torch.equal(results[True][1], results[False][1])
    # replicas of B/C sum in a different order on the two paths: equal to rounding, not bit for bit
    checks["fused == seed grads"] = torch.allclose(results[True][2], results[False][2], rtol=1e-6, atol=1e-6)
    del wl
    bad = sorted(k for k, v in checks.items() if not v)
    return verdict(not bad, group), bad


def _heads(cp, rel):
    ng = {"<": cp // 2, "==": cp, ">": 2 * cp}[rel]
    return 4 * cp, 2, ng, 3  # nh, hd, ng, ds


FORMATS = {"bshd1": (1, None), "bshd2": (2, None), "thd1": (1, 1), "thd3": (1, 3), "thd17": (1, 17)}


def _run(ranks, cp, layout, fmt, rel, with_z=True, exchange="direct"):
    if rel == "<" and cp == 1:
        pytest.skip("n_groups < cp_size needs cp_size > 1")
    batch, n_docs = FORMATS[fmt]
    nh, hd, ng, ds = _heads(cp, rel)
    res = ranks.run(_case, cp, layout, batch, n_docs, nh, hd, ng, ds, with_z, exchange)
    for r, (ok, bad) in enumerate(res):
        assert ok, f"rank {r} failed: {bad}; group verdict False"


@pytest.mark.parametrize("rel", ["<", "==", ">"])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("layout", ["head_tail", "contiguous"])
@pytest.mark.parametrize("cp", [1, 2, 4])
def test_pre_post_exact(ranks, cp, layout, fmt, rel):
    _run(ranks, cp, layout, fmt, rel)


@pytest.mark.parametrize(
    "fmt, rel, layout",
    [("bshd2", "<", "head_tail"), ("thd17", ">", "head_tail"), ("thd3", "==", "contiguous")],
)
def test_pre_post_exact_cp8(ranks, fmt, rel, layout):
    _run(ranks, 8, layout, fmt, rel)


@pytest.mark.parametrize("fmt", ["bshd2", "thd17"])
def test_without_z(ranks, fmt):
    _run(ranks, 4, "head_tail", fmt, "<", with_z=False)


@pytest.mark.parametrize("fmt", ["bshd2", "thd3"])
@pytest.mark.parametrize("layout", ["head_tail", "contiguous"])
def test_gather_exchange_exact(ranks, layout, fmt):
    """The one-message exchange with a row gather (the path of plans with many pieces, and the
    benchmark's baseline) on the formats whose default is the piecewise exchange."""
    _run(ranks, 4, layout, fmt, "==", exchange="gather")


def test_runs_are_the_permutation():
    """``TokenPlan.runs`` moves exactly the rows ``scatter`` does, with one structure on every rank,
    and is ``None`` above ``RUNS_MAX`` pieces."""
    for cp, layout, batch, cu in [
        (4, "head_tail", 2, None),
        (4, "contiguous", 3, None),
        (2, "head_tail", 1, cu_from_lengths([8, 4, 12])),
        (1, "head_tail", 2, None),
    ]:
        length = 16 if cu is None else int(cu[-1])
        plan = build_plan(cp, layout, batch, length, "cpu", cu)
        assert plan.runs is not None
        local = batch * length // cp
        want = plan.scatter.view(cp, local)
        for r in range(cp):
            got = torch.full((local,), -1, dtype=torch.long)
            for q0, g0, n in plan.runs[r]:
                got[q0 : q0 + n] = torch.arange(g0, g0 + n)
            assert torch.equal(got, want[r]), (cp, layout, batch, r)
            assert [(q, n) for q, _, n in plan.runs[r]] == [(q, n) for q, _, n in plan.runs[0]]
    assert len(build_plan(2, "head_tail", 1, 32, "cpu").runs[0]) == 2
    many = cu_from_lengths([4] * (RUNS_MAX // 2 + 1))
    assert build_plan(2, "head_tail", 1, int(many[-1]), "cpu", many).runs is None


# ----------------------------------------------------------------------------- parameter slices


class _Params(torch.nn.Module):
    def __init__(self, nh, hd, ng, ds, d_per_channel):
        super().__init__()
        d_inner = nh * hd
        conv_dim = d_inner + 2 * ng * ds
        self.conv1d = torch.nn.Conv1d(conv_dim, conv_dim, 4, groups=conv_dim)
        self.dt_bias = torch.nn.Parameter(torch.randn(nh))
        self.A_log = torch.nn.Parameter(torch.randn(nh))
        self.D = torch.nn.Parameter(torch.randn(d_inner if d_per_channel else nh))


def _param_case(group, nh, hd, ng, ds, d_per_channel):
    cp, r = comm.group_size(group), comm.group_rank(group)
    torch.manual_seed(0)
    m = _Params(nh, hd, ng, ds, d_per_channel)
    ctx = MambaContextParallel(group, nh, hd, ng, ds, m)
    ch = owned_channels(r, cp, nh, hd, ng, ds, with_z=False)
    conv_ch = ch[: len(ch) - nh // cp]  # x | B | C channels of the conv
    w, b = ctx.get_conv1d_weight(), ctx.get_conv1d_bias()
    ok = torch.equal(w, m.conv1d.weight[conv_ch, 0]) and torch.equal(b, m.conv1d.bias[conv_ch])
    hl = nh // cp
    vec = [ctx.get_dt_bias(), ctx.get_A_log(), ctx.get_D()]
    ok &= torch.equal(vec[0], m.dt_bias[r * hl : (r + 1) * hl]) and torch.equal(
        vec[1], m.A_log[r * hl : (r + 1) * hl]
    )
    k = m.D.numel() // cp
    ok &= torch.equal(vec[2], m.D[r * k : (r + 1) * k])
    ok &= all(
        v._base is p for v, p in zip(vec, (m.dt_bias, m.A_log, m.D), strict=True)
    )  # views of the full parameters
    (w.sum() * 2 + b.sum() * 3 + sum(v.sum() for v in vec)).backward()
    g = torch.zeros_like(m.conv1d.weight)
    g[conv_ch] += 2  # replicated B/C groups: each rank adds its own use
    ok &= torch.equal(m.conv1d.weight.grad, g)
    ok &= torch.equal(m.dt_bias.grad[r * hl : (r + 1) * hl], torch.ones(hl)) and m.dt_bias.grad.sum() == hl
    ok &= m.D.grad.sum() == k
    return verdict(bool(ok), group)


@pytest.mark.parametrize("cp, ng, d_per_channel", [(2, 1, False), (4, 4, True), (4, 8, False), (8, 2, True)])
def test_parameter_slices_are_views_and_grads_land_in_full_params(ranks, cp, ng, d_per_channel):
    assert all(ranks.run(_param_case, cp, 8 * cp, 2, ng, 3, d_per_channel))


# ----------------------------------------------------------------------------- no host syncs

_HOST_READS = ("tolist", "item", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


class _HostReads(TorchFunctionMode):
    """Records every tensor method that brings a value to the host (on a GPU: a sync)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_READS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _no_sync_case(group, packed, fused, mode="batch"):
    cp, r = comm.group_size(group), comm.group_rank(group)
    nh, hd, ng, ds = 8, 4, 2, 4
    x, cu = _data(cp, "head_tail", 2, 9 if packed else None, 2 * nh * hd + 2 * ng * ds + nh, seed=3)
    ctx = MambaContextParallel(group, nh, hd, ng, ds, None, fused=fused, options=CPOptions(agree=mode))
    local = shard(x, r, cp, "head_tail", cu).requires_grad_()
    ctx.post_conv_ssm(ctx.pre_conv_ssm(local, cu)[..., : nh * hd // cp], cu)  # builds and caches the plan
    with (
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof,
        _HostReads() as reads,
    ):
        comm.COUNTS.clear()
        out = ctx.pre_conv_ssm(local, cu)
        back = ctx.post_conv_ssm(out[..., : nh * hd // cp].contiguous(), cu)
        (out.sum() + back.sum()).backward()
    names = {e.name for e in prof.events()}
    syncs = sorted(n for n in names if n in ("aten::_local_scalar_dense", "aten::item")) + sorted(
        set(reads.seen)
    )
    if mode == "call":  # the agreement's one host read of its 16-byte result per call, nothing else
        agreed = comm.COUNTS["agree"]
        return verdict(
            agreed == 2 and reads.seen == ["tolist"] * agreed and syncs == ["tolist"], group
        ), syncs
    return verdict(not syncs, group), syncs


@pytest.mark.parametrize("packed", [False, True])
def test_fused_path_has_no_host_syncs(ranks, packed):
    """With the agreement once per batch (``agree="batch"``) a cached call reads nothing on the host."""
    for ok, syncs in ranks.run(_no_sync_case, 2, packed, True):
        assert ok, syncs


@pytest.mark.parametrize("packed", [False, True])
def test_fused_path_reads_only_the_agreement_per_call(ranks, packed):
    """The default (``agree="call"``): one host read per call, the agreement's result (on NCCL: a wait for the
    work queued before it); nothing else."""
    for ok, syncs in ranks.run(_no_sync_case, 2, packed, True, "call"):
        assert ok, syncs


def test_host_sync_check_catches_the_seed_path(ranks):
    """The check above can fail: the seed path's per-document loops read cu_seqlens on the host."""
    for ok, syncs in ranks.run(_no_sync_case, 2, True, False):
        assert not ok and "tolist" in syncs


# ----------------------------------------------------------------------------- bad input


def _bad_case(group, which):
    cp = comm.group_size(group)
    r = comm.group_rank(group)
    nh, hd, ng, ds = 8, 2, 2, 2
    W = 2 * nh * hd + 2 * ng * ds + nh
    ctx = MambaContextParallel(group, nh, hd, ng, ds, None)
    if which == "heads":
        MambaContextParallel(group, 6, hd, 2, ds, None)
    elif which == "groups":
        MambaContextParallel(group, 12, hd, 3, ds, None)
    elif which == "seq_len":
        ctx.pre_conv_ssm(torch.zeros(1, 3, W))
    elif which == "width":
        ctx.pre_conv_ssm(torch.zeros(1, 4, W + 1))
    elif which == "cu_dtype":
        ctx.pre_conv_ssm(torch.zeros(8, W), torch.tensor([0, 16]))
    elif which == "cu_end":
        ctx.pre_conv_ssm(torch.zeros(8, W), torch.tensor([0, 8], dtype=torch.int32))
    elif which == "doc_len":
        ctx.pre_conv_ssm(torch.zeros(8, W), torch.tensor([0, 6, 16], dtype=torch.int32))
    elif which == "cu_start":
        ctx.pre_conv_ssm(torch.zeros(8, W), torch.tensor([2, 16], dtype=torch.int32))
    elif which == "cu_decreasing":
        ctx.pre_conv_ssm(torch.zeros(8, W), torch.tensor([0, 8, 4, 16], dtype=torch.int32))
    elif which == "dtype":
        ctx.pre_conv_ssm(torch.zeros(1, 4, W, dtype=torch.int64))
    elif which == "post_width":
        ctx.post_conv_ssm(torch.zeros(1, 8, nh * hd))
    elif which == "post_seq":
        MambaContextParallel(group, nh, hd, ng, ds, None, fused=False).post_conv_ssm(
            torch.zeros(1, 6, nh * hd // cp)
        )
    return r


BAD = {
    "heads": "num_heads (6) must be divisible by cp_size (4)",
    "groups": "cp_size (4) must be divisible by n_groups (3)",
    "seq_len": "sequence length 12 is not a multiple of 8",
    "width": f"last-dim width {2 * 16 + 8 + 8 + 1}, expected {2 * 16 + 8 + 8}",
    "cu_dtype": "int32",
    "cu_end": "ends at 8",
    "doc_len": "document 0 has length 6",
    "cu_start": "start at 0",
    "cu_decreasing": "decreasing",
    "dtype": "floating-point",
    "post_width": "width 16, expected 4",
    "post_seq": "sequence length 6 is not a multiple of 8",
}


@pytest.mark.parametrize("which", list(BAD))
def test_bad_input_raises_on_every_rank(ranks, which):
    raises_everywhere(ranks, _bad_case, 4, BAD[which], which)


def test_pool_survives_bad_input(ranks):
    """After the ValueErrors above, the same ranks still run collectives."""
    _run(ranks, 4, "head_tail", "thd3", "==")
