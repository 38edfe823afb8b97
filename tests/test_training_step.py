"""The layer inside a training step: under ``torch.autocast`` it computes exactly as with parameters in the
autocast dtype (output, input gradient, every parameter gradient: bit for bit), for every strategy at cp 1
and N; its output is a plain tensor (an in-place residual add works); the gradients through activation
checkpointing equal those without. Real gloo groups; verdicts reduced over the group."""

from __future__ import annotations

import pytest
import torch
from cases import cu_from_lengths, doc_lengths, randn
from ranks import verdict
from torch.utils.checkpoint import checkpoint

from cp_core import comm
from cp_core.layout import granule, shard
from cp_core.mixer import Mamba2Config, Mamba2Mixer

CFG = Mamba2Config(d_model=32, n_heads=8, head_dim=4, n_groups=2, d_state=8, chunk_size=8)
#: what mamba-ssm's Triton kernels and causal-conv1d take (head_dim, d_state >= 16; channels % 8)
CFG_GPU = Mamba2Config(d_model=64, n_heads=8, head_dim=16, n_groups=2, d_state=16, chunk_size=16)
STRATEGIES = {  # name -> Mamba2Mixer keywords
    "hidden": dict(strategy="hidden"),
    "hidden_seed": dict(strategy="hidden", fused=False),
    "state_passing": dict(strategy="state_passing"),
    "state_passing_chain": dict(strategy="state_passing_chain"),
}


def layer(group, kind, dtype=torch.float32, layout="head_tail", device="cpu"):
    cfg = CFG_GPU if torch.device(device).type == "cuda" else CFG
    m = Mamba2Mixer(cfg, cp_group=group, layout=layout, dtype=dtype, device=device, **STRATEGIES[kind])
    m.reset_parameters(torch.Generator().manual_seed(7))
    with torch.no_grad():  # non-trivial D and norm weight
        m.D.copy_(randn(m.D.shape, 5).to(m.D))
        m.norm.weight.copy_((1 + 0.1 * randn(m.norm.weight.shape, 6)).to(m.D))
    return m


def data(cp, packed, layout="head_tail", device="cpu"):
    g = granule(layout, cp)
    if packed:
        cu = cu_from_lengths(doc_lengths(5, g, seed=3, max_units=2 if cp < 4 else 1) + [2 * g])
        x = randn((int(cu[-1]), (CFG_GPU if device == "cuda" else CFG).d_model), 1)
        return x.to(device), cu.to(device)
    return randn((2, 4 * g, (CFG_GPU if device == "cuda" else CFG).d_model), 1).to(device), None


def _step(m, x_local, cu, w_local, amp, device="cpu"):
    """Forward (under autocast ``amp`` when given), an in-place residual add, backward of ``sum(y * w)``."""
    x_local = x_local.detach().requires_grad_()
    if amp is None:
        y = m(x_local, cu)
    else:
        with torch.autocast(device, dtype=amp):
            y = m(x_local, cu)
    y += x_local.detach().to(y.dtype)  # the residual add every block does, in place
    (y.float() * w_local).sum().backward()
    return y.detach(), x_local.grad, [p.grad for p in m.parameters()]


def _autocast_case(group, kind, packed, in_dtype, amp=torch.bfloat16, device="cpu"):
    cp, r = comm.group_size(group), comm.group_rank(group)
    x, cu = data(cp, packed, device=device)
    xl, wl = shard(x, r, cp, "head_tail", cu), shard(randn(x.shape, 2).to(device), r, cp, "head_tail", cu)
    m32, mlow = layer(group, kind, device=device), layer(group, kind, amp, device=device)
    with torch.no_grad():  # the low-precision layer holds the autocast copies of the fp32 weights
        for p, q in zip(m32.parameters(), mlow.parameters(), strict=True):
            q.copy_(p.to(amp))
    y, dx, grads = _step(m32, xl.to(in_dtype), cu, wl, amp, device)
    y_ref, dx_ref, grads_ref = _step(mlow, xl.to(amp), cu, wl, None, device)
    checks = {
        "output dtype": y.dtype == amp,
        "output": torch.equal(y, y_ref),
        "input grad": torch.equal(dx, dx_ref.to(in_dtype)),
        "param grads": all(
            g.dtype == torch.float32 and torch.equal(g, gr.float())
            for g, gr in zip(grads, grads_ref, strict=True)
        ),
    }
    # the same error bound as the low-precision layer has: against the fp32 layer at cp 1 (every rank builds it)
    m1 = layer(None, "hidden", device=device)
    y1 = m1(x, cu).detach()
    rel = float((y.double() - (shard(y1, r, cp, "head_tail", cu) + xl).double()).norm() / y1.double().norm())
    checks["within the bf16 bound of fp32"] = rel < 2e-2
    bad = [k for k, v in checks.items() if not v]
    return verdict(not bad, group), bad


CASES = [(k, cp) for k in STRATEGIES for cp in (1, 2)] + [("hidden", 4), ("state_passing", 4)]


@pytest.mark.parametrize("kind, cp", [c for c in CASES if not (c[0] != "hidden" and c[1] == 1)])
@pytest.mark.parametrize("packed", [False, True], ids=["bshd", "thd"])
def test_autocast_bf16_is_the_bf16_layer(ranks, kind, cp, packed):
    for ok, bad in ranks.run(_autocast_case, cp, kind, packed, torch.float32):
        assert ok, bad


@pytest.mark.parametrize("kind", ["hidden", "state_passing"])
def test_autocast_with_bf16_input(ranks, kind):
    """bf16 activations into fp32 parameters under autocast (the case that failed in backward before)."""
    for ok, bad in ranks.run(_autocast_case, 2, kind, False, torch.bfloat16):
        assert ok, bad


def test_autocast_fp16_on_cpu(ranks):
    for ok, bad in ranks.run(_autocast_case, 2, "hidden", True, torch.float32, torch.float16):
        assert ok, bad


def _ranks_disagree_on_autocast(group):
    """Rank 0 under autocast, rank 1 not: the agreement sees two compute dtypes and every rank raises."""
    cp, r = comm.group_size(group), comm.group_rank(group)
    m = layer(group, "hidden")
    x = randn((1, 7 * granule("head_tail", cp), CFG.d_model), 1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r == 0):
        m(shard(x, r, cp, "head_tail"))


def test_ranks_that_disagree_on_autocast_raise_everywhere(ranks):
    from ranks import raises_everywhere

    raises_everywhere(ranks, _ranks_disagree_on_autocast, 2, "dtype: rank(s) [0]: torch.bfloat16")


# ----------------------------------------------------------------------------- the output, checkpointing


def _plain_output_case(group, kind, packed):
    cp, r = comm.group_size(group), comm.group_rank(group)
    m = layer(group, kind)
    x, cu = data(cp, packed)
    y = m(shard(x, r, cp, "head_tail", cu).requires_grad_(), cu)
    ok = not y._is_view() and y._base is None
    y.add_(1)  # raised "Output 0 of _LayerCore is a view and is being modified inplace" before
    y.sum().backward()
    return verdict(ok, group)


@pytest.mark.parametrize("kind, cp", [("hidden", 1), ("hidden", 2), ("hidden_seed", 2), ("state_passing", 2)])
def test_output_is_a_plain_tensor(ranks, kind, cp):
    assert all(ranks.run(_plain_output_case, cp, kind, cp == 2 and kind == "hidden"))


def _checkpoint_case(group, kind, packed):
    """Two layers under non-reentrant checkpointing against the same layers without it: equal outputs and
    gradients (the recomputed forward runs the layer's collectives again, on every rank)."""
    cp, r = comm.group_size(group), comm.group_rank(group)
    x, cu = data(cp, packed)
    xl = shard(x, r, cp, "head_tail", cu)
    outs = []
    for ckpt in (False, True):
        a, b = layer(group, kind), layer(group, kind)
        xi = xl.clone().requires_grad_()
        if ckpt:
            h = checkpoint(a, xi, cu, use_reentrant=False)
            y = checkpoint(b, h, cu, use_reentrant=False)
        else:
            y = b(a(xi, cu), cu)
        y.square().sum().backward()
        outs.append([y.detach(), xi.grad] + [p.grad for p in (*a.parameters(), *b.parameters())])
    ok = all(torch.equal(u, v) for u, v in zip(*outs, strict=True))
    return verdict(ok, group)


@pytest.mark.parametrize(
    "kind, cp, packed", [("hidden", 1, False), ("hidden", 2, True), ("state_passing", 2, False)]
)
def test_checkpointed_gradients_equal_plain_ones(ranks, kind, cp, packed):
    assert all(ranks.run(_checkpoint_case, cp, kind, packed))


def _held_on_ctx(node) -> list[tuple[int, ...]]:
    """Shapes of the tensors a custom function's node holds as attributes (outside its saved tensors)."""
    found = []

    def walk(v):
        if isinstance(v, torch.Tensor):
            found.append(tuple(v.shape))
        elif isinstance(v, (list, tuple)):
            for u in v:
                walk(u)

    for name, v in vars(node).items():
        if name != "spec":  # static: plans and index tensors shared by every call of the batch
            walk(v)
    return found


def _saved_case(group, hooks, kind="hidden"):
    cp, r = comm.group_size(group), comm.group_rank(group)
    m = layer(group, kind)
    x, cu = data(cp, True)
    packed = []

    def pack(t):
        packed.append(tuple(t.shape))
        return t

    xl = shard(x, r, cp, "head_tail", cu).requires_grad_()
    if hooks:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = m(xl, cu)
    else:
        y = m(xl, cu)
    held = _held_on_ctx(y.grad_fn)
    n = xl.shape[0]
    y_shape = (n, CFG.d_inner) if cp == 1 or kind == "state_passing" else None
    y.sum().backward()
    return held, packed, y_shape


@pytest.mark.parametrize("cp, kind", [(1, "hidden"), (2, "hidden"), (2, "state_passing")])
def test_the_core_keeps_nothing_outside_saved_tensor_hooks(ranks, cp, kind):
    """With hooks active (checkpointing, offloading) every activation the core keeps goes through them; the
    same layer without hooks holds y and the conv input on its node (freed one by one in backward), which is
    what this check sees when it fails."""
    for held, packed, y_shape in ranks.run(_saved_case, cp, True, kind):
        assert held == [], held
        if y_shape is not None:
            assert y_shape in packed
    for held, _, _ in ranks.run(_saved_case, cp, False, kind):
        assert held, "without hooks the node holds its intermediates"


# ----------------------------------------------------------------------------- collective buffers


def _mismatch_case(group, kind):
    """A collective whose send and receive buffers differ (the fp32-into-bf16 return that aborted gloo before)
    raises ValueError on every rank before anything is sent; the group still works afterwards."""
    cp = comm.group_size(group)
    a = torch.zeros(cp * 4, 3)
    if kind == "exchange_dtype":
        comm.exchange([[a[:4]]] * cp, [[torch.zeros(4, 3, dtype=torch.bfloat16)]] * cp, group)
    elif kind == "exchange_size":
        comm.exchange([[a[:4]]] * cp, [[torch.zeros(2, 3)]] * cp, group)
    elif kind == "all_to_all":
        comm.all_to_all_single(torch.empty(cp * 4, 3, dtype=torch.bfloat16), a, group)
    elif kind == "all_gather":
        comm.all_gather_into(torch.empty(cp, 4, 3, dtype=torch.float64), a[:4], group)


@pytest.mark.parametrize("kind", ["exchange_dtype", "exchange_size", "all_to_all", "all_gather"])
def test_collective_buffer_mismatch_raises_everywhere(ranks, kind):
    from ranks import raises_everywhere

    raises_everywhere(ranks, _mismatch_case, 2, "no collective was issued", kind)
    assert all(ranks.run(_plain_output_case, 2, "hidden", False))  # the ranks still run collectives
