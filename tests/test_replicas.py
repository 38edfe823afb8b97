"""The optional check that the CP ranks still hold one layer: silent when they do, a ValueError on every rank
naming the parameter when one bit of one rank's copy differs."""

from __future__ import annotations

import pytest
import torch
from ranks import raises_everywhere, verdict

from cp_core import comm
from cp_core.mixer import Mamba2Config, Mamba2Mixer
from cp_core.replicas import check_replicas, fingerprint, watch_replicas

CFG = Mamba2Config(d_model=16, n_heads=4, head_dim=4, n_groups=2, d_state=4, chunk_size=8)


def _mixer(group):
    m = Mamba2Mixer(CFG, cp_group=group)
    m.reset_parameters(torch.Generator().manual_seed(0))
    return m


def _agree_case(group):
    check_replicas(_mixer(group), group)
    return verdict(True, group)


def _drift_case(group, rank_off, name):
    m = _mixer(group)
    if comm.group_rank(group) == rank_off:
        with torch.no_grad():
            p = m.get_parameter(name).view(-1)
            p[3] = torch.nextafter(p[3], torch.tensor(float("inf")))  # one ulp of one value
    check_replicas(m, group)


def _hook_case(group):
    m = _mixer(group)
    watch_replicas(m, group, every=2)
    x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    m(x)  # call 0: checked, equal
    with torch.no_grad():
        if comm.group_rank(group) == 1:
            m.out_proj.weight[0, 0] += 1
    m(x)  # call 1: not checked
    m(x)  # call 2: checked, raises


def test_replicas_that_agree_pass(ranks):
    assert all(ranks.run(_agree_case, 4))


@pytest.mark.parametrize("name", ["dt_bias", "in_proj.weight", "norm.weight"])
def test_one_ulp_on_one_rank_is_named_everywhere(ranks, name):
    raises_everywhere(ranks, _drift_case, 4, f"{name} (ranks [0, 1, 3] / ranks [2])", 2, name)


def test_watch_checks_every_nth_call(ranks):
    raises_everywhere(
        ranks,
        _hook_case,
        2,
        "out_proj.weight",
    )


def test_fingerprint_sees_bits_and_order():
    a = torch.randn(1000)
    assert torch.equal(fingerprint(a), fingerprint(a.clone()))
    b = a.clone()
    b[5] = torch.nextafter(b[5], torch.tensor(0.0))
    assert not torch.equal(fingerprint(a), fingerprint(b))
    assert not torch.equal(fingerprint(a), fingerprint(a.flip(0)))
    assert fingerprint(a.bfloat16()).dtype == torch.int64
