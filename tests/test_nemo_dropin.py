"""``cp_core.mamba_cp`` as a drop-in for NeMo AutoModel's module on its main branch: a group read through its
own ``size()`` / ``rank()`` (stubs, real groups, a DeviceMesh dimension), the attributes and getters main has,
slices that are views, the cp 1 identity, and errors that are both ValueError and AssertionError."""

from __future__ import annotations

import pytest
import torch
from cases import owned_channels, randn
from ranks import verdict
from torch import nn

from cp_core import comm
from cp_core.layout import shard
from cp_core.mamba_cp import CPConfigError, MambaContextParallel
from cp_core.mixer import Mamba2Config, Mamba2Mixer


class _Group:
    """The least a caller's process group offers: ``size()`` and ``rank()``, nothing registered anywhere."""

    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


class _Mixer:
    """Not an nn.Module: only the four parameters the module slices (as a user's unit test builds them)."""

    def __init__(self, nh, hd, ng, ds, k=4, bias=True, d_per_channel=False):
        conv_dim = nh * hd + 2 * ng * ds
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, k, groups=conv_dim, bias=bias)
        with torch.no_grad():  # every value names its position
            self.conv1d.weight.copy_(torch.arange(conv_dim * k, dtype=torch.float32).view(conv_dim, 1, k))
            if bias:
                self.conv1d.bias.copy_(torch.arange(conv_dim, dtype=torch.float32) + 0.5)
        self.dt_bias = nn.Parameter(torch.arange(nh, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.arange(nh, dtype=torch.float32) + 1000)
        n_d = nh * hd if d_per_channel else nh
        self.D = nn.Parameter(torch.arange(n_d, dtype=torch.float32) + 2000)


def _build(nh, hd, ng, ds, cp, rank=0, **kw):
    return MambaContextParallel(_Group(cp, rank), nh, hd, ng, ds, _Mixer(nh, hd, ng, ds, **kw))


# (num_heads, n_groups, cp) -> (heads per rank, groups per rank, ranks sharing a group)
DIMS = [
    ((8, 8, 2), (4, 4, 1)),
    ((16, 8, 4), (4, 2, 1)),
    ((8, 1, 2), (4, 1, 2)),  # one group, copied to both ranks
    ((8, 2, 4), (2, 1, 2)),
    ((16, 1, 8), (2, 1, 8)),
    ((12, 4, 1), (12, 4, 1)),  # cp 1: nothing is split
]


@pytest.mark.parametrize("dims, want", DIMS, ids=[f"h{d[0]}g{d[1]}cp{d[2]}" for d, _ in DIMS])
def test_dimension_arithmetic(dims, want):
    nh, ng, cp = dims
    hd = 3
    for rank in range(cp):
        m = _build(nh, hd, ng, 2, cp, rank)
        assert (m.cp_size, m.cp_rank) == (cp, rank)
        assert (m.num_heads_local, m.n_groups_local, m.group_repeat_count) == want
        assert m.d_inner == nh * hd and m.d_inner_local == want[0] * hd
        assert m.get_conv1d_weight().shape == (want[0] * hd + 2 * want[1] * 2, 4)


@pytest.mark.parametrize("nh, ng, cp", [(8, 4, 2), (8, 1, 2), (8, 2, 4), (16, 8, 4), (16, 1, 8)])
def test_slices_are_this_ranks_channels(nh, ng, cp):
    """The conv rows of rank r are its heads' x channels and its groups' B and C rows (a copy of the shared
    group where n_groups < cp), built here from the channel definition, not from the module's code."""
    hd, ds = 2, 3
    for rank in range(cp):
        m = _build(nh, hd, ng, ds, cp, rank)
        mixer = m._mixer
        conv_rows = owned_channels(rank, cp, nh, hd, ng, ds, with_z=False)[: -(nh // cp)]
        assert torch.equal(m.get_conv1d_weight(), mixer.conv1d.weight[conv_rows, 0])
        assert torch.equal(m.get_conv1d_bias(), mixer.conv1d.bias[conv_rows])
        heads = slice(rank * nh // cp, (rank + 1) * nh // cp)
        for got, full in (
            (m.get_dt_bias(), mixer.dt_bias),
            (m.get_A_log(), mixer.A_log),
            (m.get_D(), mixer.D),
        ):
            assert torch.equal(got, full[heads])


def test_replicated_group_gives_every_sharing_rank_the_same_rows():
    nh, hd, ng, ds, cp = 8, 2, 1, 3, 4
    bc = [_build(nh, hd, ng, ds, cp, r).get_conv1d_weight()[nh * hd // cp :] for r in range(cp)]
    assert all(torch.equal(b, bc[0]) for b in bc)
    xs = [_build(nh, hd, ng, ds, cp, r).get_conv1d_weight()[: nh * hd // cp] for r in range(cp)]
    assert not torch.equal(xs[0], xs[1])  # the heads' own rows differ


@pytest.mark.parametrize("cp, rank, d_per_channel", [(1, 0, False), (2, 1, False), (4, 2, True)])
def test_vector_slices_are_views_and_carry_gradients(cp, rank, d_per_channel):
    nh, hd = 8, 2
    m = _build(nh, hd, 2 if cp < 4 else 4, 3, cp, rank, d_per_channel=d_per_channel)
    mixer = m._mixer
    for get, full in ((m.get_dt_bias, mixer.dt_bias), (m.get_A_log, mixer.A_log), (m.get_D, mixer.D)):
        k = full.numel() // cp
        got = get()
        assert got.data_ptr() == full[rank * k : (rank + 1) * k].data_ptr() and got._base is full
        (got * 3).sum().backward()
        want = torch.zeros_like(full)
        want[rank * k : (rank + 1) * k] = 3
        assert torch.equal(full.grad, want)


def test_getters_slice_the_tensor_given():
    """main's optional-argument forms: a tensor passed in (e.g. a cast copy) is sliced instead of the mixer's."""
    m = _build(8, 2, 2, 3, 2, rank=1)
    other = torch.arange(8.0) * -1
    assert torch.equal(m.get_dt_bias(other), other[4:]) and m.get_dt_bias(other)._base is other
    assert torch.equal(m.get_A_log(other), other[4:])
    assert torch.equal(m.get_D(other), other[4:])
    assert torch.equal(m.get_dt_bias(None), m._mixer.dt_bias[4:])  # None: the mixer's


def test_conv_without_bias():
    m = _build(8, 2, 2, 3, 2, bias=False)
    assert m._mixer.conv1d.bias is None and m.get_conv1d_bias() is None


@pytest.mark.parametrize("group", [None, _Group(1)], ids=["None", "stub"])
def test_cp1_pre_and_post_return_their_input(group):
    nh, hd, ng, ds = 4, 2, 2, 3
    m = MambaContextParallel(group, nh, hd, ng, ds, _Mixer(nh, hd, ng, ds))
    x = torch.randn(2, 8, 2 * nh * hd + 2 * ng * ds + nh)
    assert m.pre_conv_ssm(x) is x
    y = torch.randn(2, 8, nh * hd)
    assert m.post_conv_ssm(y) is y
    assert m.get_conv1d_weight().shape == (nh * hd + 2 * ng * ds, 4)


@pytest.mark.parametrize(
    "nh, ng, cp, words",
    [
        (7, 1, 4, "num_heads.*must be divisible by cp_size"),
        (12, 3, 4, "cp_size.*must be divisible by n_groups"),
        (12, 5, 4, "n_groups.*must be divisible by cp_size"),  # before the num_heads % n_groups check
        (12, 8, 2, "not a multiple of n_groups"),  # ours beyond NeMo's checks: same type
    ],
)
def test_bad_configuration_is_both_value_and_assertion_error(nh, ng, cp, words):
    for kind in (ValueError, AssertionError, CPConfigError):
        with pytest.raises(kind, match=words):
            _build(nh, 2, ng, 4, cp)


def test_mixer_builds_on_a_stub_group():
    """A mixer on a stub of 2 ranks is built (no collective, no registered group) and has rank 1's shapes."""
    cfg = Mamba2Config(d_model=16, n_heads=4, head_dim=4, n_groups=2, d_state=4, chunk_size=8)
    mixer = Mamba2Mixer(cfg, cp_group=_Group(2, 1))
    assert (mixer.cp_size, mixer.cp._mixer, mixer.cp.cp_rank) == (2, mixer, 1)
    assert torch.equal(mixer.cp.get_dt_bias(), mixer.dt_bias[2:])


def test_group_must_offer_size_and_rank():
    with pytest.raises(ValueError, match="size\\(\\) and rank\\(\\)"):
        MambaContextParallel(object(), 4, 2, 2, 3, None)


# ------------------------------------------------------------------ real groups: a ProcessGroup, a DeviceMesh


def _real_group_case(group):
    from torch.distributed.device_mesh import DeviceMesh

    cp, r = group.size(), group.rank()
    cfg = Mamba2Config(d_model=16, n_heads=4, head_dim=4, n_groups=2, d_state=4, chunk_size=8)
    mesh = DeviceMesh.from_group(group, "cpu", mesh_dim_names=("cp",))
    ok = comm.group_size(mesh) == cp and comm.group_rank(mesh) == r
    ctx = MambaContextParallel(mesh["cp"], 4, 4, 2, 4, None)
    ok &= (ctx.cp_size, ctx.cp_rank) == (cp, r) and ctx.cp_group is group
    x = randn((2, 8 * cp, 16), seed=5)
    outs = []
    for g in (group, mesh, mesh["cp"]):
        torch.manual_seed(0)
        layer = Mamba2Mixer(cfg, cp_group=g, dtype=torch.float32)
        outs.append(layer(shard(x, r, cp, "head_tail")))
        ok &= layer.cp_group is group
    ok &= all(torch.equal(o, outs[0]) for o in outs)
    torch.manual_seed(0)
    want = shard(Mamba2Mixer(cfg, dtype=torch.float32)(x), r, cp, "head_tail")
    ok &= torch.allclose(outs[0], want, rtol=1e-4, atol=1e-5)
    return verdict(bool(ok), group)


def test_process_group_and_device_mesh(ranks):
    assert all(ranks.run(_real_group_case, 2))


def test_two_dimensional_mesh_is_refused():
    class _Mesh2:  # what the check reads of a DeviceMesh
        ndim, mesh_dim_names = 2, ("dp", "cp")

        def get_group(self):
            raise AssertionError("not reached")

    _Mesh2.__name__ = "DeviceMesh"
    with pytest.raises(ValueError, match=r"mesh\['cp'\]"):
        comm.resolve_group(_Mesh2())
