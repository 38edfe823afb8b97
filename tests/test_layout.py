"""Layouts, shard/unshard and token plans against naive constructions from the definition."""

import pytest
import torch
from cases import cu_from_lengths
from hypothesis import given, settings
from hypothesis import strategies as st

from cp_core.layout import granule, positions, shard, unshard
from cp_core.plan import build_plan, get_plan


def naive_positions(rank, cp, layout, length, lens=None):
    """Global indices of rank's tokens, straight from the layout's definition (python lists)."""
    docs = [(0, length)] if lens is None else []
    if lens is not None:
        s = 0
        for n in lens:
            docs.append((s, s + n))
            s += n
    out = []
    for s, e in docs:
        n = e - s
        if cp == 1:  # nothing is sharded: any length
            out += list(range(s, e))
        elif layout == "contiguous":
            k = n // cp
            out += list(range(s + rank * k, s + (rank + 1) * k))
        else:
            c = n // (2 * cp)
            out += list(range(s + rank * c, s + (rank + 1) * c))
            out += list(range(s + (2 * cp - 1 - rank) * c, s + (2 * cp - rank) * c))
    return out


@pytest.mark.parametrize("layout", ["head_tail", "contiguous"])
@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
def test_bshd_shard_matches_definition(cp, layout):
    L = granule(layout, cp) * 3
    x = torch.randn(2, L, 5)
    shards = [shard(x, r, cp, layout) for r in range(cp)]
    for r in range(cp):
        assert torch.equal(shards[r], x[:, naive_positions(r, cp, layout, L)])
    assert torch.equal(unshard(shards, cp, layout), x)


@pytest.mark.parametrize("layout", ["head_tail", "contiguous"])
@pytest.mark.parametrize("cp", [1, 2, 4, 8])
def test_thd_shard_matches_definition(cp, layout):
    g = granule(layout, cp)
    lens = [g, 0, 3 * g, 0, 0, 2 * g, g]
    cu = cu_from_lengths(lens)
    x = torch.randn(sum(lens), 3)
    shards = [shard(x, r, cp, layout, cu) for r in range(cp)]
    for r in range(cp):
        assert torch.equal(shards[r], x[naive_positions(r, cp, layout, sum(lens), lens)])
    assert torch.equal(unshard(shards, cp, layout, cu), x)


@settings(max_examples=60, deadline=None)
@given(
    cp=st.sampled_from([1, 2, 3, 4, 8]),
    layout=st.sampled_from(["head_tail", "contiguous"]),
    units=st.lists(st.integers(0, 4), min_size=1, max_size=12),
    batch=st.integers(1, 3),
)
def test_plan_is_a_permutation_and_round_trips(cp, layout, units, batch):
    g = granule(layout, cp)
    lens = [g * u for u in units]
    if sum(lens) == 0:
        lens[0] = g
    T = sum(lens)
    cu = cu_from_lengths(lens)
    x = torch.arange(T)
    shards = [shard(x, r, cp, layout, cu) for r in range(cp)]
    assert torch.equal(torch.sort(torch.cat(shards)).values, x)  # nothing dropped, nothing duplicated
    assert torch.equal(unshard(shards, cp, layout, cu), x)
    for r in range(cp):
        assert shards[r].tolist() == naive_positions(r, cp, layout, T, lens)
    plan = build_plan(cp, layout, 1, T, "cpu", cu)
    n = T
    assert torch.equal(torch.sort(plan.gather).values, torch.arange(n))
    assert torch.equal(plan.gather[plan.scatter], torch.arange(n))
    # rank-major received rows -> global order, exactly what the all-to-all + gather do
    received = torch.cat(shards)
    assert torch.equal(received[plan.gather], x)
    assert torch.equal(x[plan.scatter], received)
    # seq_idx: the document of every token
    want = [d for d, n_ in enumerate(lens) for _ in range(n_)]
    assert plan.seq_idx.view(-1).tolist() == want
    # BSHD with a batch
    L = g * max(1, units[0])
    xb = torch.arange(batch * L).view(batch, L)
    pb = build_plan(cp, layout, batch, L, "cpu")
    recv = torch.stack([shard(xb, r, cp, layout) for r in range(cp)])  # [cp, B, L/cp]
    assert torch.equal(recv.reshape(-1)[pb.gather].view(batch, L), xb)


def test_plan_cache_reuses_and_invalidates():
    cu = cu_from_lengths([4, 8])
    p1 = get_plan(2, "head_tail", 1, 12, "cpu", cu)
    assert get_plan(2, "head_tail", 1, 12, "cpu", cu) is p1
    cu2 = cu_from_lengths([8, 4])  # same shape, other values: a different batch
    p2 = get_plan(2, "head_tail", 1, 12, "cpu", cu2)
    assert p2 is not p1 and not torch.equal(p2.gather, p1.gather)
    cu.copy_(cu_from_lengths([8, 4]))  # mutated in place: the version counter invalidates
    assert torch.equal(get_plan(2, "head_tail", 1, 12, "cpu", cu).gather, p2.gather)
    assert positions(2, "head_tail", length=8, ranks=1).tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.zeros(1, 6), cp=2, layout="head_tail"), "not a multiple of 4"),
        (dict(x=torch.zeros(1, 6), cp=4, layout="contiguous"), "not a multiple of 4"),
        (dict(x=torch.zeros(8), cp=2, cu=torch.tensor([0, 8], dtype=torch.int64)), "int32"),
        (dict(x=torch.zeros(8), cp=2, cu=torch.tensor([1, 8], dtype=torch.int32)), "start at 0"),
        (dict(x=torch.zeros(8), cp=2, cu=torch.tensor([0, 8, 4], dtype=torch.int32)), "decreasing"),
        (
            dict(x=torch.zeros(8), cp=2, cu=torch.tensor([0, 4, 6, 8], dtype=torch.int32)),
            "document 1 has length 2",
        ),
        (dict(x=torch.zeros(8), cp=2, cu=torch.tensor([0, 4], dtype=torch.int32)), "ends at 4"),
        (dict(x=torch.zeros(8), cp=2, cu=torch.tensor([[0, 8]], dtype=torch.int32)), "1-D"),
        (dict(x=torch.zeros(1, 8), cp=2, layout="zigzag"), "layout must be one of"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        shard(kwargs["x"], 0, kwargs["cp"], kwargs.get("layout", "head_tail"), kwargs.get("cu"))


def test_unshard_rejects_wrong_rank_count_and_mismatched_shards():
    with pytest.raises(ValueError, match="one shard per rank"):
        unshard([torch.zeros(1, 4)], 2)
    with pytest.raises(ValueError, match="shard 1 has"):
        unshard([torch.zeros(1, 4), torch.zeros(1, 4, dtype=torch.float64)], 2)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: shard(torch.zeros(1, 4), 0.5, 2), "cp_rank must be an int in \\[0, 2\\), got 0.5"),
        (lambda: shard(torch.zeros(1, 4), 2, 2), "got 2"),
        (lambda: shard(torch.zeros(1, 4), 0, 0), "cp_size must be a positive int, got 0"),
        (lambda: shard(torch.zeros(1, 4), True, 2), "got True"),
        (lambda: shard([[0.0]], 0, 1), "x must be a torch.Tensor, got list"),
        (lambda: shard(torch.zeros(1, 4), 0, 2, "zigzag"), "layout must be one of"),
        (lambda: unshard([], 0), "cp_size must be a positive int, got 0"),
        (lambda: unshard([], 1), "one shard per rank: got 0 shards"),
        (lambda: unshard(torch.zeros(2, 1, 4), 2), "list or tuple of tensors, got Tensor"),
        (lambda: unshard([torch.zeros(1, 4), 3], 2), "shard 1 must be a torch.Tensor, got int"),
        (lambda: unshard([torch.zeros(4)], 1), "shards must be \\[B, L/cp, ...\\]"),
        (
            lambda: shard(
                torch.zeros(4), 0, 1, cu_seqlens=torch.tensor([0, 4], dtype=torch.int32, device="meta")
            ),
            "meta device",
        ),
    ],
)
def test_bad_shard_arguments_raise_value_error_naming_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cp1_accepts_any_length():
    x = torch.randn(2, 7, 3)
    assert torch.equal(shard(x, 0, 1), x) and torch.equal(unshard([x], 1), x)
    cu = cu_from_lengths([3, 0, 5])
    t = torch.randn(8, 3)
    assert torch.equal(shard(t, 0, 1, "head_tail", cu), t) and torch.equal(
        get_plan(1, "head_tail", 1, 8, "cpu", cu).gather, torch.arange(8)
    )
