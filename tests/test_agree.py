"""Inputs, configurations or options that disagree across ranks, and a rank that rejects its input alone
(on the first call of a batch or a later one): every rank raises ValueError (naming what differs and where)
before any collective of the layer."""

import dataclasses
from unittest import mock

import pytest
import torch
from cases import cu_from_lengths, randn
from ranks import RankError, raises_everywhere, verdict
from test_mixer_parity import small_cfg

from cp_core import agree, comm
from cp_core.layout import shard
from cp_core.mamba_cp import MambaContextParallel, SeedConfig
from cp_core.mixer import Mamba2Config, Mamba2Mixer
from cp_core.options import CPOptions

NH, HD, NG, DS = 4, 4, 2, 4
W = NH * HD + 2 * NG * DS + NH  # [x | B | C | dt]


def _mixer(group, strategy="hidden", dtype=torch.float32, agree_mode="call", cfg=None, **kw):
    strategy, _, exchange = strategy.partition(":")
    cfg = cfg or Mamba2Config(**small_cfg(NH, NG))
    return Mamba2Mixer(
        cfg,
        cp_group=group,
        strategy=strategy,
        state_exchange=exchange or "allgather",
        dtype=dtype,
        options=CPOptions(agree=agree_mode),
        **kw,
    )


def disagree_case(group, which):
    """Rank-dependent inputs; every rank must raise."""
    cp, r = comm.group_size(group), comm.group_rank(group)
    g = 2 * cp
    same_total = [cu_from_lengths([2 * g, g]), cu_from_lengths([g, 2 * g])]
    if which in ("cu fused", "cu seed"):
        ctx = MambaContextParallel(group, NH, HD, NG, DS, None, fused=which == "cu fused")
        ctx.pre_conv_ssm(torch.zeros(3 * g // cp, W), same_total[r % 2], with_z=False)
    elif which in ("cu hidden", "cu state_passing"):
        _mixer(group, which.split()[1])(torch.zeros(3 * g // cp, 16), same_total[r % 2])
    elif which == "local length state_passing":
        _mixer(group, "state_passing")(torch.zeros(1, g // cp * (1 + r % 2), 16))
    elif which == "batch hidden":
        _mixer(group)(torch.zeros(1 + r % 2, g // cp, 16))
    elif which == "dtype":
        dtype = torch.float64 if r == 1 else torch.float32
        _mixer(group, dtype=dtype)(torch.zeros(1, g // cp, 16, dtype=dtype))
    elif which == "strategy":
        _mixer(group, "state_passing:chain" if r == 0 else "state_passing")(torch.zeros(1, g // cp, 16))
    elif which == "hidden or state passing":
        _mixer(group, "hidden" if r == 0 else "state_passing")(torch.zeros(1, g // cp, 16))
    elif which == "fused":
        _mixer(group, fused=r == 0)(torch.zeros(1, g // cp, 16))
    elif which == "layout":
        _mixer(group, layout="contiguous" if r == 1 else "head_tail")(torch.zeros(1, g // cp, 16))
    elif which == "invalid cu on one rank":
        cu = cu_from_lengths([g + 1, g - 1]) if r == 1 else cu_from_lengths([g, g])
        _mixer(group, "state_passing")(torch.zeros(2 * g // cp, 16), cu)
    elif which == "wrong width on one rank":
        _mixer(group)(torch.zeros(1, g // cp, 17 if r == 0 else 16))
    elif which == "wrong width on one rank, seed api":
        ctx = MambaContextParallel(group, NH, HD, NG, DS, None)
        ctx.pre_conv_ssm(torch.zeros(1, g // cp, W + (r == cp - 1)), with_z=False)
    return r


DISAGREE = {
    "cu fused": "cu_seqlens values: rank(s) [0]",
    "cu seed": "cu_seqlens values: rank(s) [0]",
    "cu hidden": "cu_seqlens values: rank(s) [0]",
    "cu state_passing": "cu_seqlens values: rank(s) [0]",
    "local length state_passing": "local tokens: rank(s) [0]: 2, rank(s) [1]: 4",
    "batch hidden": "batch: rank(s) [0]: 1, rank(s) [1]: 2",
    "dtype": "dtype: rank(s) [0]: torch.float32, rank(s) [1]: torch.float64",
    "strategy": "options.state_exchange: rank(s) [0]: 'chain', rank(s) [1]: 'allgather'",
    "hidden or state passing": "strategy: rank(s) [0]: 'hidden', rank(s) [1]: 'state_passing'",
    "fused": "fused: rank(s) [0]: True, rank(s) [1]: False",
    "layout": "layout: rank(s) [0]: 'head_tail', rank(s) [1]: 'contiguous'",
    "invalid cu on one rank": "document 0 has length 5",
    "wrong width on one rank": "d_model 16, got shape (1, 2, 17)",
    "wrong width on one rank, seed api": "last-dim width 37, expected 36",
}


@pytest.mark.parametrize("which", list(DISAGREE))
def test_disagreement_raises_on_every_rank(ranks, which):
    raises_everywhere(ranks, disagree_case, 2, DISAGREE[which], which)


def test_disagreement_on_four_ranks_names_the_odd_ones(ranks):
    with pytest.raises(RankError) as err:
        ranks.run(disagree_case, 4, "cu hidden")
    for m in err.value.all_messages():
        assert "rank(s) [0, 2]: hash" in m and "rank(s) [1, 3]: hash" in m, m


def once_case(group, packed, mode="call"):
    """Collectives of the agreement over two batches of a two-layer model, forward and backward."""
    cp, r = comm.group_size(group), comm.group_rank(group)
    layers = [_mixer(group, agree_mode=mode), _mixer(group, "state_passing", agree_mode=mode)]
    counts = []
    for batch in range(2):
        cu = cu_from_lengths([4 * cp, 2 * cp]) if packed else None  # a new tensor per batch
        x = randn((6 * cp, 16) if packed else (2, 4 * cp, 16), batch)
        h = shard(x, r, cp, "head_tail", cu).requires_grad_()
        comm.COUNTS.clear()
        y = h
        for m in layers:
            y = m(y, cu)
        y.sum().backward()
        counts.append(comm.COUNTS["agree"])
    return verdict(True, group), counts


@pytest.mark.parametrize("mode", ["call", "auto"])
@pytest.mark.parametrize("packed", [False, True])
def test_agreement_runs_on_every_call(ranks, packed, mode):
    """``"call"``, and the default ``"auto"`` on a group that gathers on the host (gloo): one all-gather per
    layer call (forward), none in backward."""
    for _ok, counts in ranks.run(once_case, 2, packed, mode):
        assert counts == [2, 2], counts


def mode_case(group):
    real = agree.resolve_mode("auto", group)
    with mock.patch.object(agree.dist, "get_backend", lambda g=None: "nccl"):
        nccl = agree.resolve_mode("auto", group), agree.resolve_mode("call", group)
    with mock.patch.object(agree.dist, "get_backend", lambda g=None: "cpu:gloo,cuda:nccl"):
        both = agree.resolve_mode("auto", group)
    return verdict(True, group), (real, *nccl, both)


def test_auto_agrees_per_call_unless_that_would_sync_the_device(ranks):
    """On an NCCL-only group a per-call check reads a CUDA tensor on the host (a device sync per layer):
    ``"auto"`` agrees once per batch there; gloo or a CPU backend beside NCCL: every call."""
    for _ok, modes in ranks.run(mode_case, 2):
        assert modes == ("call", "batch", "call", "call"), modes
    assert agree.resolve_mode("auto", comm.LocalGroup(0, 2)) == "call"
    assert CPOptions().agree == "auto"


@pytest.mark.parametrize("packed", [False, True])
def test_agreement_batch_mode_runs_once_per_batch(ranks, packed):
    """``agree="batch"``: packed, one all-gather per batch (a new cu_seqlens); BSHD: once per shape, so none
    on batch 2. (Two per batch: the layers' fingerprints differ, the strategy is part of them.)"""
    for _ok, counts in ranks.run(once_case, 2, packed, "batch"):
        assert counts == ([2, 2] if packed else [2, 0]), counts


def test_pool_survives_disagreement(ranks):
    for _ok, counts in ranks.run(once_case, 2, True):
        assert counts == [2, 2]


# ----------------------------------------------------------------------------- bad arguments to the mixer


def bad_mixer_case(group, which):
    cp = comm.group_size(group)
    m = _mixer(group)
    t = 2 * cp  # a valid per-rank token count for any layout
    if which == "batch 0":
        m(torch.zeros(0, t, 16))
    elif which == "0 tokens":
        m(torch.zeros(1, 0, 16))
    elif which == "dtype":
        m(torch.zeros(1, t, 16, dtype=torch.float64))
    elif which == "not a tensor":
        m([[0.0] * 16])
    elif which == "integer input":
        m(torch.zeros(1, t, 16, dtype=torch.int64))
    elif which == "meta cu_seqlens":
        m(torch.zeros(t, 16), torch.tensor([0, t * cp], dtype=torch.int32, device="meta"))
    elif which == "cu_seqlens list":
        m(torch.zeros(t, 16), [0, t * cp])
    elif which == "device":
        m(torch.zeros(1, t, 16, device="meta"))
    return True


BAD_MIXER = {
    "batch 0": "batch size 0",
    "0 tokens": "0 tokens per rank",
    "dtype": "dtype torch.float64 but the layer's parameters are torch.float32",
    "not a tensor": "floating-point tensor, got list",
    "integer input": "floating-point tensor, got torch.int64",
    "meta cu_seqlens": "meta device",
    "cu_seqlens list": "cu_seqlens must be a torch.Tensor or None, got list",
    "device": "hidden_states is on meta",
}


@pytest.mark.parametrize("cp", [1, 2])
@pytest.mark.parametrize("which", list(BAD_MIXER))
def test_bad_mixer_argument_raises_value_error(ranks, cp, which):
    raises_everywhere(ranks, bad_mixer_case, cp, BAD_MIXER[which], which)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(d_conv=0), "d_conv must be a positive int, got 0"),
        (dict(norm_eps=0.0), "norm_eps must be a positive finite number, got 0.0"),
        (dict(dt_min=0.2, dt_max=0.1), "dt_min 0.2 is above dt_max 0.1"),
        (
            dict(A_init_range=(0.0, 16.0)),
            "A_init_range must be \\(lo, hi\\) with 0 < lo <= hi, got \\(0.0, 16.0\\)",
        ),
        (dict(D_has_hdim=1), "D_has_hdim must be a bool, got 1"),
    ],
)
def test_bad_config_raises_value_error(kw, match):
    with pytest.raises(ValueError, match=match):
        Mamba2Config(**dict(small_cfg(NH, NG), **kw))


# ----------------------------------------------------------------------------- every field, by construction

#: a valid other value of every field of the layer's configuration and options: one rank gets it
CONFIG_ALT = dict(
    d_model=24, n_heads=8, head_dim=8, n_groups=1, d_state=4, d_conv=3, chunk_size=4, D_has_hdim=True,
    norm_eps=1e-6, dt_min=2e-3, dt_max=0.2, dt_init_floor=2e-4, A_init_range=(1.0, 8.0),
)  # fmt: skip
OPTIONS_ALT = dict(
    ssd_backend="torch", conv_backend="torch", overlap_chunks=1, state_exchange="chain", agree="batch"
)


def test_every_field_has_an_alternative():
    """A new field of Mamba2Config or CPOptions must get a case here (and is compared by construction)."""
    assert set(CONFIG_ALT) == {f.name for f in dataclasses.fields(Mamba2Config)}
    assert set(OPTIONS_ALT) == {f.name for f in dataclasses.fields(CPOptions)}
    assert {f.name for f in dataclasses.fields(SeedConfig)} == set(SEED_ALT) | {"layout"}


def field_case(group, kind, name):
    """Rank 1 builds its layer with one field changed (its input fits its own layer)."""
    r = comm.group_rank(group)
    cfg, opts = small_cfg(NH, NG), {}
    if r == 1:
        (cfg if kind == "config" else opts)[name] = (CONFIG_ALT if kind == "config" else OPTIONS_ALT)[name]
    c = Mamba2Config(**cfg)
    m = Mamba2Mixer(c, cp_group=group, options=CPOptions(**opts))
    m(torch.zeros(1, 4, c.d_model))


@pytest.mark.parametrize(
    "kind, name",
    [("config", f.name) for f in dataclasses.fields(Mamba2Config)]
    + [("options", f.name) for f in dataclasses.fields(CPOptions)],
)
def test_each_field_differing_on_one_rank_is_named_on_every_rank(ranks, kind, name):
    raises_everywhere(ranks, field_case, 2, f"{kind}.{name}: rank(s) [0]: ", kind, name)


def test_static_fields_cover_every_dataclass_field():
    c, o = Mamba2Config(**small_cfg(NH, NG)), CPOptions()
    names = [n for n, _ in agree.static_fields("mixer", {"x": 1}, config=c, options=o)]
    assert names == ["call", "x"] + [f"config.{f.name}" for f in dataclasses.fields(c)] + [
        f"options.{f.name}" for f in dataclasses.fields(o)
    ]


# ----------------------------------------------------------------------------- the seed API

#: (field, rank 1's value, text of the error): what the seed API's ranks must share
SEED_ALT = {"num_heads": 8, "head_dim": 8, "n_groups": 1, "d_state": 8, "fused": False}


def seed_case(group, which):
    """``MambaContextParallel.pre_conv_ssm`` (and ``post_conv_ssm``) with one thing differing on rank 1."""
    r = comm.group_rank(group)
    kw = dict(num_heads=NH, head_dim=HD, n_groups=NG, d_state=DS)
    dtype, with_z, fused = torch.float32, False, True
    if r == 1:
        if which in SEED_ALT and which != "fused":
            kw[which] = SEED_ALT[which]
        dtype = {"dtype": torch.bfloat16, "dtype fp16/bf16": torch.bfloat16}.get(which, dtype)
        with_z = which == "with_z"
        fused = which != "fused"
    if r == 0 and which == "dtype fp16/bf16":
        dtype = torch.float16
    ctx = MambaContextParallel(group, mixer=None, fused=fused, **kw)
    if which == "post":
        ctx.post_conv_ssm(
            torch.zeros(1, 4, ctx.d_inner_local, dtype=torch.float32 if r == 0 else torch.float64)
        )
    if which == "op" and r == 1:  # rank 0 calls pre, rank 1 post, with the same local tokens
        ctx.post_conv_ssm(torch.zeros(1, 4, ctx.d_inner_local))
        return
    ctx.pre_conv_ssm(torch.zeros(1, 2, ctx.proj_width(with_z), dtype=dtype), with_z=with_z)


SEED = {
    "dtype": "dtype: rank(s) [0]: torch.float32, rank(s) [1]: torch.bfloat16",
    "dtype fp16/bf16": "dtype: rank(s) [0]: torch.float16, rank(s) [1]: torch.bfloat16",
    "with_z": "with_z: rank(s) [0]: False, rank(s) [1]: True",
    "fused": "config.fused: rank(s) [0]: True, rank(s) [1]: False",
    "num_heads": "config.num_heads: rank(s) [0]: 4, rank(s) [1]: 8",
    "head_dim": "config.head_dim: rank(s) [0]: 4, rank(s) [1]: 8",
    "n_groups": "config.n_groups: rank(s) [0]: 2, rank(s) [1]: 1",
    "d_state": "config.d_state: rank(s) [0]: 4, rank(s) [1]: 8",
    "post": "dtype: rank(s) [0]: torch.float32, rank(s) [1]: torch.float64",
    "op": "op: rank(s) [0]: 'pre_conv_ssm', rank(s) [1]: 'post_conv_ssm'",
}


@pytest.mark.parametrize("which", list(SEED))
def test_seed_api_mismatch_raises_on_every_rank(ranks, which):
    raises_everywhere(ranks, seed_case, 2, SEED[which], which)


# ----------------------------------------------------------------------------- a rejection on a later call


def later_case(group, which, packed):
    """Two good calls of a batch (the plan and, in batch mode, the agreement cached), then a third call that
    rank 1 alone rejects: every rank must raise, none may wait in a collective."""
    cp, r = comm.group_size(group), comm.group_rank(group)
    cu = cu_from_lengths([4 * cp, 2 * cp]) if packed else None
    x = randn((6 * cp, 16) if packed else (1, 4 * cp, 16), 3)
    h = shard(x, r, cp, "head_tail", cu)
    if which.startswith("seed"):
        ctx = MambaContextParallel(group, NH, HD, NG, DS, None)
        p = randn(h.shape[:-1] + (W,), 4)
        for _ in range(2):
            ctx.pre_conv_ssm(p, cu, with_z=False)
        if r == 1:
            p = p.double() if which == "seed dtype" else torch.zeros(*p.shape[:-1], W + 1)
        ctx.pre_conv_ssm(p, cu, with_z=False)
        return
    m = _mixer(group, which.split()[0])
    for _ in range(2):
        m(h, cu)
    if r == 1:
        h = h.double() if which.endswith("dtype") else torch.zeros(*h.shape[:-1], 17)
    m(h, cu)


LATER = {
    "hidden dtype": "has dtype torch.float64",
    "hidden width": "with d_model 16, got shape",
    "state_passing dtype": "has dtype torch.float64",
    "state_passing width": "with d_model 16, got shape",
    "seed dtype": "dtype: rank(s) [0]: torch.float32, rank(s) [1]: torch.float64",
    "seed width": "last-dim width 37, expected 36",
}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("which", list(LATER))
def test_rejection_on_a_later_call_raises_on_every_rank(ranks, which, packed):
    raises_everywhere(ranks, later_case, 2, LATER[which], which, packed)
