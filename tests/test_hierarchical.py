"""Hierarchical CP (``strategy="hierarchical"``): the hidden strategy over a node's GPUs, state passing across
the nodes, on grids of real gloo ranks (the pool's ranks ``0..N*G-1``, CP rank ``n*G + g``).

Every grid against cp 1 (fp32, 1e-5 relative) and the float64 oracle (2e-5), BSHD and packed (every
document is cut over all the nodes, so documents cross node boundaries), output, input gradient and every
parameter gradient; ``1 x G`` against the hidden strategy and ``N x 1`` against state passing on the same
ranks; a NaN kept in its document; the grid's agreement (a rank with another batch, a rank that rejects
its input: every rank raises); bad grids raise ValueError at construction.
"""

import pytest
import torch
import torch.distributed as dist
from cases import cu_from_lengths, randn
from ranks import raises_everywhere, verdict
from test_isolation import isolation_case
from test_mixer_parity import build, rel_rms
from test_oracle import TOL, oracle_layer, oracle_reference

from cp_core import hierarchical
from cp_core.comm import LocalGroup
from cp_core.layout import shard
from cp_core.mixer import Mamba2Config, Mamba2Mixer

CFG = dict(d_model=16, n_heads=4, head_dim=4, n_groups=2, d_state=4, d_conv=4, chunk_size=4)
_GROUPS: dict = {}


GRIDS = ((2, 2), (2, 4), (4, 2), (1, 4), (4, 1), (1, 2), (2, 1))


def make_groups(world_group, world: int = 8) -> bool:
    """The node and gpu groups of every grid of at most ``world`` ranks, made collectively by every rank of the
    world (gloo needs them all at each ``new_group``), once per process: later tasks find them."""
    for nodes, gpus in GRIDS:
        if nodes * gpus > world:
            continue
        for key in [tuple(n * gpus + g for n in range(nodes)) for g in range(gpus)] + [
            tuple(n * gpus + g for g in range(gpus)) for n in range(nodes)
        ]:
            if len(key) > 1 and key not in _GROUPS:
                _GROUPS[key] = dist.new_group(list(key))
    return True


@pytest.fixture
def grids(ranks):
    ranks.run(make_groups, 8)
    return ranks


def grid_of(group, nodes: int, gpus: int) -> hierarchical.Grid:
    """This rank's grid over the pool's ranks ``0..nodes*gpus-1`` (node-major; a dimension of one rank: None)."""
    n, g = divmod(dist.get_rank(group), gpus)
    node = tuple(m * gpus + g for m in range(nodes))
    gpu = tuple(n * gpus + h for h in range(gpus))
    return hierarchical.Grid(*(_GROUPS[k] if len(k) > 1 else None for k in (node, gpu)))


def _run(m, x, w, cu, cp, r, layout, flat):
    """Forward + backward of ``sum(y * w)`` on rank ``r``'s shard: (y, dx, {name: grad summed over flat})."""
    xl = shard(x, r, cp, layout, cu).requires_grad_()
    y = m(xl, cu)
    (y.float() * shard(w, r, cp, layout, cu).float()).sum().backward()
    grads = {}
    for name, p in m.named_parameters():
        g = (
            p.grad.float().clone()
        )  # summed in fp32 (each rank's part rounded once, as test_mixer_parity does)
        if cp > 1:
            dist.all_reduce(g, group=flat)
        grads[name] = g
    return y.detach(), xl.grad, grads


def _errs(got, want, cp, r, layout, cu, want_sharded=False):
    y, dx, grads = got
    sh = (lambda t: t) if want_sharded else (lambda t: shard(t, r, cp, layout, cu))
    errs = {"out": rel_rms(y, sh(want[0])), "dx": rel_rms(dx, sh(want[1]))}
    errs.update({f"grad {n}": rel_rms(grads[n], want[2][n]) for n in grads})
    return errs


def _batch(cfg, cp, packed, layout):
    g = 2 * cp if layout == "head_tail" else cp
    if packed:  # documents of 3, 0, 1 and 2 granules: each spans every node
        cu = cu_from_lengths([3 * g, 0, g, 2 * g])
        x = randn((int(cu[-1]), cfg.d_model), 21)
    else:
        cu, x = None, randn((2, 2 * g, cfg.d_model), 21)
    return x, randn(x.shape, 22), cu


def grid_case(flat, nodes, gpus, packed, layout="head_tail", exchange="allgather", device="cpu", tol=1e-5):
    """The grid against cp 1 (``tol``) and the float64 oracle (2e-5, or ``tol`` if larger); group verdict.
    ``device``: where the layers run (tests/nccl_parity.py: the rank's GPU)."""
    cp, r = nodes * gpus, dist.get_rank(flat)
    grid = grid_of(flat, nodes, gpus)
    assert grid.rank() == r and grid.size() == cp
    cfg = Mamba2Config(**CFG)
    x, w, cu = (None if t is None else t.to(device) for t in _batch(cfg, cp, packed, layout))
    m = oracle_layer(cfg, grid, layout, f"hierarchical:{exchange}").to(device)
    got = _run(m, x, w, cu, cp, r, layout, flat)
    m1 = oracle_layer(cfg, None, layout, "hidden").to(device)
    errs = {
        f"cp1 {k}": v
        for k, v in _errs(got, _run(m1, x, w, cu, 1, 0, layout, None), cp, r, layout, cu).items()
    }
    bad = {k: v for k, v in errs.items() if not v <= tol}
    oracle = _errs(got, oracle_reference(m, x, w, cu), cp, r, layout, cu)
    bad.update({f"oracle {k}": v for k, v in oracle.items() if not v <= max(TOL, tol)})
    return verdict(not bad, flat), bad


def bf16_case(flat, nodes, gpus):
    """bf16 as state passing is held in test_mixer_parity: against an fp32 layer of the same weights, no worse
    than 1.5x (+1e-3) the error of the unsharded bf16 layer (2.5x for the per-head dt_bias and A_log)."""
    cp, r = nodes * gpus, dist.get_rank(flat)
    cfg = Mamba2Config(**dict(CFG, d_model=32))
    x, w, cu = _batch(cfg, cp, True, "head_tail")
    xb, wb = x.bfloat16(), w.bfloat16()
    got = _run(build(cfg, grid_of(flat, nodes, gpus), "head_tail", torch.bfloat16, "hierarchical"), xb, wb, cu, cp,
               r, "head_tail", flat)  # fmt: skip
    one = _run(build(cfg, None, "head_tail", torch.bfloat16), xb, wb, cu, 1, 0, "head_tail", None)
    m32 = build(cfg, None, "head_tail", torch.float32)
    with torch.no_grad():
        for p32, p16 in zip(
            m32.parameters(), build(cfg, None, "head_tail", torch.bfloat16).parameters(), strict=True
        ):
            p32.copy_(p16.float())
    ref = _run(m32, xb.float(), wb.float(), cu, 1, 0, "head_tail", None)
    e_cp = _errs(got, ref, cp, r, "head_tail", cu)
    e_1 = _errs(one, ref, 1, 0, "head_tail", None)
    factor = {"grad dt_bias": 2.5, "grad A_log": 2.5}
    bad = {k: (e_cp[k], e_1[k]) for k in e_cp if not e_cp[k] <= factor.get(k, 1.5) * e_1[k] + 1e-3}
    return verdict(not bad, flat), bad


def same_code_case(flat, nodes, gpus, packed, other):
    """``1 x G`` against the hidden strategy, ``N x 1`` against state passing, on the same ranks."""
    cp, r = nodes * gpus, dist.get_rank(flat)
    cfg = Mamba2Config(**CFG)
    x, w, cu = _batch(cfg, cp, packed, "head_tail")
    m = build(cfg, grid_of(flat, nodes, gpus), "head_tail", torch.float32, "hierarchical")
    got = _run(m, x, w, cu, cp, r, "head_tail", flat)
    want = _run(build(cfg, flat, "head_tail", torch.float32, other), x, w, cu, cp, r, "head_tail", flat)
    errs = _errs(got, want, cp, r, "head_tail", cu, want_sharded=True)
    bad = {k: v for k, v in errs.items() if not v <= 1e-6}
    return verdict(not bad, flat), bad


def nan_case(flat, nodes, gpus, layout):
    return isolation_case(flat, "hierarchical", layout, True, cp_group=grid_of(flat, nodes, gpus))


def disagree_case(flat, nodes, gpus, how):
    """One rank passes another batch (``how="cu"``: other document lengths, the same total) or rejects its
    own (``"width"``: a wrong d_model), or a whole node passes another batch (``"node"``: each node agrees
    within, only the agreement across the nodes sees it); the layer must raise on every rank before any
    collective."""
    cp, r = nodes * gpus, dist.get_rank(flat)
    cfg = Mamba2Config(**CFG)
    m = Mamba2Mixer(cfg, cp_group=grid_of(flat, nodes, gpus), strategy="hierarchical")
    g = 2 * cp
    other = (how == "cu" and r == cp - 1) or (how == "node" and r >= gpus)  # one rank, or a whole node
    cu = cu_from_lengths([2 * g, g] if other else [g, 2 * g])
    x = randn((int(cu[-1]), cfg.d_model), 21)
    xl = shard(x, r, cp, "head_tail", cu)
    if how == "width" and r == 1:
        xl = xl[:, :-1]
    m(xl, cu)


@pytest.mark.parametrize("nodes, gpus", [(2, 2), (2, 4), (4, 2)])
@pytest.mark.parametrize("packed", [False, True])
def test_grid_parity_and_oracle(grids, nodes, gpus, packed):
    for r, (ok, bad) in enumerate(grids.run(grid_case, nodes * gpus, nodes, gpus, packed)):
        assert ok, f"rank {r}: {bad}"


def test_grid_contiguous_and_chain(grids):
    for r, (ok, bad) in enumerate(grids.run(grid_case, 4, 2, 2, True, "contiguous", "chain")):
        assert ok, f"rank {r}: {bad}"


@pytest.mark.parametrize("nodes, gpus, other", [(1, 4, "hidden"), (4, 1, "state_passing")])
def test_degenerate_grids_are_the_two_strategies(grids, nodes, gpus, other):
    for packed in (False, True):
        for r, (ok, bad) in enumerate(grids.run(same_code_case, 4, nodes, gpus, packed, other)):
            assert ok, f"rank {r}, packed={packed}: {bad}"


def test_grid_parity_bf16(grids):
    for r, (ok, bad) in enumerate(grids.run(bf16_case, 8, 4, 2)):
        assert ok, f"rank {r}: {bad}"


def test_grid_keeps_a_nan_in_its_document(grids):
    for r, (ok, bad) in enumerate(grids.run(nan_case, 4, 2, 2, "head_tail")):
        assert ok, f"rank {r}: {bad}"


@pytest.mark.parametrize(
    "how, text",
    [
        ("cu", "passed different inputs"),
        ("node", "passed different inputs"),
        ("width", "with d_model 16, got shape"),
    ],
)
def test_grid_agreement_raises_on_every_rank(grids, how, text):
    raises_everywhere(grids, disagree_case, 8, text, 2, 4, how)


def test_bad_grids_raise_at_construction():
    cfg = Mamba2Config(**CFG)
    with pytest.raises(ValueError, match="grid 1x3: num_heads 4 is not divisible by cp_size 3"):
        Mamba2Mixer(cfg, cp_group=(LocalGroup(0, 1), LocalGroup(0, 3)), strategy="hierarchical")
    with pytest.raises(ValueError, match="overlap_chunks must be 1, got 2"):
        Mamba2Mixer(
            cfg, cp_group=(LocalGroup(0, 2), LocalGroup(0, 2)), strategy="hierarchical", overlap_chunks=2
        )
    with pytest.raises(ValueError, match="a pair \\(node_group, gpu_group\\), got LocalGroup"):
        Mamba2Mixer(cfg, cp_group=LocalGroup(0, 4), strategy="hierarchical")
    with pytest.raises(ValueError, match="state passing and the seed path need a layout"):
        Mamba2Mixer(cfg, cp_group=(None, None), strategy="hierarchical", layout="torch_head_tail")
    grid = hierarchical.resolve_grid((LocalGroup(1, 2), LocalGroup(1, 4)))
    assert (grid.size(), grid.rank()) == (8, 5)  # node-major: node 1, gpu 1


def mesh_case(flat):
    """The grid as a 2-D DeviceMesh ("node", "gpu") over the 8 ranks (made once per pool): the output against cp 1."""
    from torch.distributed.device_mesh import init_device_mesh

    if "mesh" not in _GROUPS:
        _GROUPS["mesh"] = init_device_mesh("cpu", (2, 4), mesh_dim_names=("node", "gpu"))
    mesh, r = _GROUPS["mesh"], dist.get_rank(flat)
    cfg = Mamba2Config(**CFG)
    m = Mamba2Mixer(cfg, cp_group=mesh, strategy="hierarchical")
    m.reset_parameters(torch.Generator().manual_seed(3))
    ref = Mamba2Mixer(cfg)
    ref.reset_parameters(torch.Generator().manual_seed(3))
    x, _, cu = _batch(cfg, 8, True, "head_tail")
    with torch.no_grad():
        err = rel_rms(m(shard(x, r, 8, "head_tail", cu), cu), shard(ref(x, cu), r, 8, "head_tail", cu))
    errors = []
    gpu = mesh["gpu"].get_group()
    for bad in (mesh["node"], (gpu, gpu)):  # a 1-D mesh; a pair that is not a node and a GPU column
        try:
            Mamba2Mixer(cfg, cp_group=bad, strategy="hierarchical")
        except ValueError as e:
            errors.append(str(e))
    ok = m.cp_group.rank() == r and err <= 1e-5 and len(errors) == 2
    ok = ok and "2-D DeviceMesh" in errors[0] and "must share exactly one rank" in errors[1]
    return verdict(ok, flat), (m.cp_group.rank(), err, errors)


def test_grid_from_a_2d_device_mesh(grids):
    for r, (ok, info) in enumerate(grids.run(mesh_case, 8)):
        assert ok, f"rank {r}: {info}"


def test_checkpointing_and_autocast_in_one_process():
    """Rank 0 of a 2x2 grid in one process (LocalGroups): non-reentrant checkpointing (everything kept goes
    through save_for_backward) gives the same gradients bit for bit, and under bf16 autocast the layer
    computes as the same layer with bf16 parameters, bit for bit."""
    from torch.utils.checkpoint import checkpoint

    cfg = Mamba2Config(**CFG)
    pair = (LocalGroup(0, 2), LocalGroup(0, 2))
    cu = torch.tensor([0, 24, 40], dtype=torch.int32)
    x = randn((10, cfg.d_model), 3)

    def grads(m, ckpt):
        xl = x.clone().requires_grad_()
        y = checkpoint(m, xl, cu, use_reentrant=False) if ckpt else m(xl, cu)
        y.float().square().sum().backward()
        return [xl.grad, *(p.grad for p in m.parameters())]

    m = build(cfg, pair, "head_tail", torch.float32, "hierarchical")
    plain = grads(m, False)
    m.zero_grad()
    for a, b in zip(plain, grads(m, True), strict=True):
        assert torch.equal(a, b)
    m16 = build(cfg, pair, "head_tail", torch.bfloat16, "hierarchical")
    with torch.no_grad():  # m's parameters, rounded to bf16
        for p16, p32 in zip(m16.parameters(), m.parameters(), strict=True):
            p16.copy_(p32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y_auto = m(x, cu)
    with torch.no_grad():
        y16 = m16(x.bfloat16(), cu)
    assert y_auto.dtype == torch.bfloat16 and torch.equal(y_auto, y16)
