"""Inputs that disagree across ranks, and a rank that rejects its input alone: every rank raises
ValueError (naming what differs and where) before any collective of the layer, once per batch."""

import pytest
import torch
from cases import cu_from_lengths, randn, setting
from ranks import RankError, raises_everywhere, verdict
from test_mixer_parity import small_cfg

from cp_core import comm, hidden
from cp_core.layout import shard
from cp_core.mamba_cp import MambaContextParallel
from cp_core.mixer import Mamba2Config, Mamba2Mixer

NH, HD, NG, DS = 4, 4, 2, 4
W = NH * HD + 2 * NG * DS + NH  # [x | B | C | dt]


def _mixer(group, strategy="hidden", dtype=torch.float32, **kw):
    strategy, _, exchange = strategy.partition(":")
    cfg = Mamba2Config(**small_cfg(NH, NG))
    return Mamba2Mixer(
        cfg, cp_group=group, strategy=strategy, state_exchange=exchange or "allgather", dtype=dtype, **kw
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
    elif which == "exchange":
        with setting(hidden, "EXCHANGE", "gather" if r == 1 else "direct"):
            _mixer(group)(torch.zeros(1, g // cp, 16))
    elif which == "transport":
        with setting(comm, "TRANSPORT", "ce" if r == 1 else "nccl"):
            _mixer(group)(torch.zeros(1, g // cp, 16))
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
    "dtype": "dtype: rank(s) [0]: 'torch.float32', rank(s) [1]: 'torch.float64'",
    "strategy": "strategy: rank(s) [0]: 'state_passing_chain', rank(s) [1]: 'state_passing'",
    "exchange": "strategy: rank(s) [0]: 'hidden', rank(s) [1]: 'hidden, CP_CORE_EXCHANGE=gather'",
    "transport": "strategy: rank(s) [0]: 'hidden', rank(s) [1]: 'hidden, CP_CORE_TRANSPORT=ce'",
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


def once_case(group, packed):
    """Collectives of the agreement over two batches of a two-layer model, forward and backward."""
    cp, r = comm.group_size(group), comm.group_rank(group)
    layers = [_mixer(group), _mixer(group, "state_passing")]
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


@pytest.mark.parametrize("packed", [False, True])
def test_agreement_runs_once_per_batch(ranks, packed):
    """Packed: one all-gather per batch (a new cu_seqlens); BSHD: once per shape, so none on batch 2.
    (Two calls per batch: the layers' fields differ, the strategy is part of the fingerprint.)"""
    for _ok, counts in ranks.run(once_case, 2, packed):
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
