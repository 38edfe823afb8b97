"""``layout="torch_head_tail"``: the order torch's ``context_parallel`` gives a pack (its
``_PerDocumentHeadTailLoadBalancer``, then contiguous shards), held against torch's own load balancers, and
the hidden-parallel layer fed torch-ordered shards against the unsharded layer."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from cases import cu_from_lengths, doc_lengths, randn
from ranks import verdict

from cp_core import comm
from cp_core.layout import granule, positions, shard, unshard
from cp_core.mixer import Mamba2Config, Mamba2Mixer

lb = pytest.importorskip("torch.distributed.tensor.experimental._context_parallel._load_balancer")


def _torch_shards(x: torch.Tensor, lens: list[int], cp: int) -> list[torch.Tensor]:
    """What torch's context_parallel hands each rank: the pack rearranged by its per-document load balancer,
    cut into cp contiguous shards."""
    idx = lb._PerDocumentHeadTailLoadBalancer([lens], cp, "cpu")._generate_indices()[0]
    return list(x.index_select(0, idx).chunk(cp))


@pytest.mark.parametrize("cp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_shards_are_torchs(cp, seed):
    lens = doc_lengths(6, 2 * cp, seed)
    cu = cu_from_lengths(lens)
    x = torch.arange(int(cu[-1]))
    want = _torch_shards(x, lens, cp)
    got = [shard(x, r, cp, "torch_head_tail", cu) for r in range(cp)]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert torch.equal(unshard(want, cp, "torch_head_tail", cu), x)
    # the order differs from Transformer Engine's (head_tail) wherever a pack holds several documents
    if cp > 1 and sum(n > 0 for n in lens) > 1:
        assert not all(torch.equal(a, shard(x, r, cp, "head_tail", cu)) for r, a in enumerate(want))


@pytest.mark.parametrize("cp", [2, 4])
def test_bshd_is_torchs_head_tail(cp):
    length = 6 * cp
    idx = lb._HeadTailLoadBalancer(length, cp, "cpu")._generate_indices()[0]
    x = torch.arange(2 * length).view(2, length)
    want = x[:, idx].chunk(cp, dim=1)
    for r in range(cp):
        assert torch.equal(shard(x, r, cp, "torch_head_tail"), want[r])
        assert torch.equal(positions(cp, "torch_head_tail", length=length, ranks=r), want[r][0])


CFG = Mamba2Config(d_model=32, n_heads=8, head_dim=4, n_groups=2, d_state=8, chunk_size=8)


def _layer_case(group, seed):
    cp, r = comm.group_size(group), comm.group_rank(group)
    lens = doc_lengths(5, granule("torch_head_tail", cp), seed)
    cu = cu_from_lengths(lens)
    x, w = randn((int(cu[-1]), CFG.d_model), seed), randn((int(cu[-1]), CFG.d_model), seed + 1)
    out = []
    for g in (group, None):
        m = Mamba2Mixer(CFG, cp_group=g, layout="torch_head_tail")
        m.reset_parameters(torch.Generator().manual_seed(3))
        xi = (_torch_shards(x, lens, cp)[r] if g is not None else x).clone().requires_grad_()
        y = m(xi, cu)
        (y * (_torch_shards(w, lens, cp)[r] if g is not None else w)).sum().backward()
        grads = [p.grad.clone() for p in m.parameters()]
        if g is not None:
            for t in grads:
                dist.all_reduce(t, group=group)
        out.append((y.detach(), xi.grad, grads))
    (y, dx, gr), (y1, dx1, gr1) = out
    close = dict(rtol=1e-4, atol=1e-5)
    ok = torch.allclose(y, _torch_shards(y1, lens, cp)[r], **close)
    ok &= torch.allclose(dx, _torch_shards(dx1, lens, cp)[r], **close)
    ok &= all(torch.allclose(a, b, **close) for a, b in zip(gr, gr1, strict=True))
    return verdict(bool(ok), group)


@pytest.mark.parametrize("cp", [2, 4])
def test_hidden_layer_takes_torch_ordered_shards(ranks, cp):
    assert all(ranks.run(_layer_case, cp, 11 + cp))


@pytest.mark.parametrize("kw", [dict(strategy="state_passing"), dict(fused=False)])
def test_other_strategies_refuse_the_torch_order(kw):
    with pytest.raises(ValueError, match="torch_head_tail"):
        Mamba2Mixer(CFG, layout="torch_head_tail", **kw)


def _pre_post_case(group):
    """The seed API with torch-ordered shards: pre_conv_ssm gives every rank its channels in global order."""
    from cases import owned_channels

    from cp_core.mamba_cp import MambaContextParallel

    cp, r = comm.group_size(group), comm.group_rank(group)
    nh, hd, ng, ds = 8, 2, 2, 3
    lens = doc_lengths(6, 2 * cp, 5)
    cu = cu_from_lengths(lens)
    x = randn((int(cu[-1]), 2 * nh * hd + 2 * ng * ds + nh), 4)
    ctx = MambaContextParallel(group, nh, hd, ng, ds, None, layout="torch_head_tail")
    out = ctx.pre_conv_ssm(_torch_shards(x, lens, cp)[r], cu)
    ok = torch.equal(out, x[:, owned_channels(r, cp, nh, hd, ng, ds)])
    y = out[:, nh * hd // cp : 2 * nh * hd // cp]  # this rank's x channels
    ok &= torch.equal(ctx.post_conv_ssm(y, cu), _torch_shards(x[:, nh * hd : 2 * nh * hd], lens, cp)[r])
    return verdict(bool(ok), group)


def test_pre_post_take_torch_ordered_shards(ranks):
    assert all(ranks.run(_pre_post_case, 4))
