"""The pack generator: exact capacity, granular documents, density, determinism, zero-length documents."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpbench.packing import batch_cu_seqlens, concat_cu_seqlens, make_pack, make_packs


@settings(max_examples=150, deadline=None)
@given(
    granule=st.sampled_from([2, 4, 8, 16]),
    units=st.integers(1, 512),
    docs=st.integers(1, 600),
    density=st.floats(0.01, 1.0),
    seed=st.integers(0, 10_000),
)
def test_pack_invariants(granule, units, docs, density, seed):
    cap = granule * units
    p = make_pack(cap, docs, density, granule, seed)
    assert sum(p.lengths) == cap
    assert all(n % granule == 0 and n >= 0 for n in p.lengths)
    assert len(p.lengths) in (docs, docs + 1)
    assert all(0 <= r <= n for r, n in zip(p.real, p.lengths, strict=True))
    if len(p.lengths) == docs + 1:
        assert p.real[-1] == 0 and p.lengths[-1] > 0  # the trailing padding document
    # real tokens never exceed the target; short of it by less than one granule per document
    target = round(density * cap)
    assert p.real_tokens <= target
    assert target - p.real_tokens <= docs * granule
    cu = p.cu_seqlens
    assert cu[0] == 0 and cu[-1] == cap and all(b >= a for a, b in zip(cu, cu[1:], strict=False))


@pytest.mark.parametrize(
    "cap, docs, density", [(32768, 8, 0.9), (32768, 64, 0.9), (32768, 64, 0.5), (4096, 1, 1.0)]
)
def test_density_is_within_tolerance_of_the_target(cap, docs, density):
    g = 16
    p = make_pack(cap, docs, density, g, seed=3)
    assert abs(p.density - density) <= docs * g / cap + 1 / cap
    assert p.docs == docs


def test_deterministic_per_seed_and_varies_with_it():
    a = make_pack(4096, 32, 0.8, 8, seed=1)
    assert a == make_pack(4096, 32, 0.8, 8, seed=1)
    assert a.lengths != make_pack(4096, 32, 0.8, 8, seed=2).lengths
    packs = make_packs(4096, 32, 0.8, 8, count=3, seed=5)
    assert packs == make_packs(4096, 32, 0.8, 8, count=3, seed=5)
    assert len({p.lengths for p in packs}) == 3  # each pack of a batch is its own draw


def test_zero_length_documents_are_kept_and_valid_for_cp_core():
    p = make_pack(128, 64, 0.5, 4, seed=0)  # 64 real tokens among 64 documents: some get none
    assert 0 in p.lengths[: p.docs]
    from cp_core.layout import check_cu_seqlens, shard

    cu = torch.tensor(p.cu_seqlens, dtype=torch.int32)
    check_cu_seqlens(cu, 128, 2, "head_tail")
    x = torch.arange(128.0).unsqueeze(-1)
    assert shard(x, 1, 2, "head_tail", cu_seqlens=cu).shape == (64, 1)


def test_batch_of_packs_concatenates():
    cu, real = batch_cu_seqlens(256, 4, 0.9, 8, count=3, seed=0)
    assert cu.dtype == torch.int32 and cu[0].item() == 0 and cu[-1].item() == 3 * 256
    packs = make_packs(256, 4, 0.9, 8, count=3, seed=0)
    assert cu.tolist() == concat_cu_seqlens(packs)
    assert real == sum(p.real_tokens for p in packs)
    assert all(n % 8 == 0 for n in (cu[1:] - cu[:-1]).tolist())


def test_same_packs_for_every_cp_size_of_a_sweep():
    from cpbench.runner import case_cu_seqlens
    from cpbench.scenario import load_scenario

    s = load_scenario("smoke", ["sweep.cp_size=[1,2,4]", "sweep.seq_len=[256]"])
    packed = [c for c in s.cases() if c.packing.packed]
    got = {c.cp_size: case_cu_seqlens(s, c) for c in packed}
    assert set(got) == {1, 2, 4}
    first = got[1]
    for cu, real in got.values():
        assert torch.equal(cu, first[0]) and real == first[1]
    assert all(n % 8 == 0 for n in (first[0][1:] - first[0][:-1]).tolist())  # 2 * max cp_size


@pytest.mark.parametrize(
    "args, match",
    [
        ((100, 4, 0.5, 8), "not a positive multiple"),
        ((64, 0, 0.5, 8), "at least one"),
        ((64, 4, 0.0, 8), "density"),
        ((64, 4, 1.5, 8), "density"),
        ((64, 4, 0.5, 0), "granule"),
    ],
)
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        make_pack(*args)
