"""Caches that outlive a call: safe under ``torch.inference_mode()`` / ``no_grad`` and a switch to training,
and never reused for a CPU ``cu_seqlens`` whose values changed behind autograd's version counter."""

import numpy as np
import pytest
import torch
from cases import cu_from_lengths, randn
from ranks import verdict
from test_mixer_parity import build, small_cfg

from cp_core import comm
from cp_core.layout import shard
from cp_core.mixer import Mamba2Config
from cp_core.plan import clear_cache, get_plan

STRATEGIES = ["hidden", "state_passing"]


def _layer(group, strategy):
    return build(Mamba2Config(**small_cfg(4, 2)), group, "head_tail", torch.float32, strategy)


def eval_then_train_case(group, strategy, packed, separate, mode):
    """An eval pass (``inference_mode`` or ``no_grad``), then a training step on the same shapes (and the same
    ``cu_seqlens``), with the same layer or a separate one: the step runs and its gradient matches a layer
    that never saw the eval pass."""
    cp, r = comm.group_size(group), comm.group_rank(group)
    clear_cache()
    cu = cu_from_lengths([4 * cp, 2 * cp]) if packed else None
    x = randn((6 * cp, 16) if packed else (1, 4 * cp, 16), 5)
    h = shard(x, r, cp, "head_tail", cu)
    evaluator = _layer(group, strategy)
    ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with ctx:
        evaluator(h, cu)
    trained = _layer(group, strategy) if separate else evaluator
    xi = h.clone().requires_grad_()
    trained(xi, cu).square().sum().backward()
    clear_cache()
    fresh = _layer(group, strategy)
    xf = h.clone().requires_grad_()
    fresh(xf, cu).square().sum().backward()
    ok = torch.equal(xi.grad, xf.grad) and torch.equal(trained.in_proj.weight.grad, fresh.in_proj.weight.grad)
    return verdict(ok, group)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("cp", [1, 2])
def test_eval_then_training(ranks, cp, strategy, packed, separate, mode):
    assert all(ranks.run(eval_then_train_case, cp, strategy, packed, separate, mode))


# ----------------------------------------------------------------------------- cu_seqlens refilled in place

A, B = [6, 2], [2, 6]  # two packs of the same total (in units of the layout's granule)


def refill_case(group, strategy, how):
    """Batch 1 with ``cu_seqlens`` of documents ``A``; then batch 2's documents ``B`` written into the SAME
    tensor without bumping its version (as a data loader refilling its buffer does): the layer's output
    must be that of a fresh ``cu_seqlens`` for ``B``."""
    cp, r = comm.group_size(group), comm.group_rank(group)
    clear_cache()
    g = 2 * cp
    first, second = cu_from_lengths([n * g for n in A]), cu_from_lengths([n * g for n in B])
    buf = first.numpy().copy()
    cu = torch.from_numpy(buf)
    x = randn((int(first[-1]), 16), 9)
    m = _layer(group, strategy)
    with torch.no_grad():
        m(shard(x, r, cp, "head_tail", cu), cu)  # builds and caches batch 1's plan
        version = cu._version
        if how == "numpy":
            cu.numpy()[:] = second.numpy()
        elif how == "data":
            cu.data.copy_(second)
        else:  # the buffer the tensor was made from, refilled
            buf[:] = second.numpy()
        assert cu._version == version and torch.equal(cu, second)  # autograd's counter saw nothing
        got = m(shard(x, r, cp, "head_tail", second), cu)
        want = m(shard(x, r, cp, "head_tail", second), second.clone())
    return verdict(torch.equal(got, want), group)


@pytest.mark.parametrize("how", ["numpy", "data", "from_numpy buffer"])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("cp", [1, 2])
def test_refilled_cu_seqlens_is_not_stale(ranks, cp, strategy, how):
    assert all(ranks.run(refill_case, cp, strategy, how))


def test_plan_cache_hit_and_refill():
    """The cached plan is reused while the values hold, rebuilt when they change (the check can fail)."""
    clear_cache()
    buf = np.array([0, 8, 16], dtype=np.int32)
    cu = torch.from_numpy(buf)
    p1 = get_plan(2, "head_tail", 1, 16, "cpu", cu)
    assert get_plan(2, "head_tail", 1, 16, "cpu", cu) is p1
    buf[1] = 4
    p2 = get_plan(2, "head_tail", 1, 16, "cpu", cu)
    assert p2 is not p1 and p2.host_cu == (0, 4, 16) and p1.host_cu == (0, 8, 16)
    assert torch.equal(p1.cu_seqlens, torch.tensor([0, 8, 16], dtype=torch.int32))  # a copy of its own
    assert get_plan(2, "head_tail", 1, 16, "cpu", cu) is p2


def test_plan_built_in_inference_mode_is_a_normal_tensor():
    clear_cache()
    with torch.inference_mode():
        p = get_plan(2, "head_tail", 1, 16, "cpu", torch.tensor([0, 8, 16], dtype=torch.int32))
    assert not any(t.is_inference() for t in (p.gather, p.scatter, p.seq_idx, p.positions, p.cu_seqlens))
