"""The mixer against an independent oracle: the float64 per-token Mamba2 layer of
:func:`cp_core.kernels.reference.mamba2_layer_ref`, written from the layer's definition.

Every other mixer test compares the mixer with itself (CP=N against CP=1, fast kernels against torch),
so a mixer-wide math error (B and C swapped, no SiLU in the gate, no D term) passes them; these tests
catch it. cp 1, 2 and 4 on real gloo groups, BSHD and packed, both strategies: forward output, input
gradient and every parameter gradient (summed over the CP group) against float64 autograd of the oracle.

Bound: the fp32 mixer against the float64 oracle, relative RMS <= 2e-5. Measured: at most 1.5e-6 over
these cases (output, dx and every parameter gradient, fp32 roundoff); the smallest of the
known math errors changes the output by 4e-3 relative.
"""

import pytest
import torch
from cases import cu_from_lengths, randn
from ranks import verdict
from test_mixer_parity import _run_layer, rel_rms

from cp_core import comm
from cp_core.kernels.reference import mamba2_layer_ref
from cp_core.layout import granule, shard
from cp_core.mixer import Mamba2Config, Mamba2Mixer

TOL = 2e-5
CFG = dict(d_model=16, n_heads=4, head_dim=4, n_groups=2, d_state=4, d_conv=4, chunk_size=4)


def oracle_layer(cfg, group, layout, strategy):
    """A float32 mixer whose every parameter matters: random D and norm weight, dt of order 1."""
    strategy, _, exchange = strategy.partition(":")
    m = Mamba2Mixer(
        cfg, cp_group=group, layout=layout, strategy=strategy, state_exchange=exchange or "allgather"
    )
    m.reset_parameters(torch.Generator().manual_seed(77))
    with torch.no_grad():
        m.D.copy_(randn(m.D.shape, 5))
        m.norm.weight.copy_(1 + 0.3 * randn(m.norm.weight.shape, 6))
        m.dt_bias.copy_(0.5 * randn(m.dt_bias.shape, 7))  # softplus(dt + dt_bias) of order 1
        m.A_log.copy_(torch.log(0.3 + torch.rand(m.A_log.shape, generator=torch.Generator().manual_seed(8))))
        m.conv1d.bias.copy_(0.5 * randn(m.conv1d.bias.shape, 9))
    return m


def oracle_reference(m, x, w, cu):
    """Float64 autograd through the oracle: (out, dx, {name: grad})."""
    params = {n: p.detach().double().requires_grad_() for n, p in m.named_parameters()}
    xd = x.double().requires_grad_()
    out = mamba2_layer_ref(params, xd, cu, config=m.config)
    (out * w.double()).sum().backward()
    return out.detach(), xd.grad, {n: p.grad for n, p in params.items()}


def oracle_case(group, cfg_kw, layout, batch, lengths, strategy, seq_len=None):
    """This rank's shard through the mixer against the oracle on the global batch; group verdict."""
    cp, r = comm.group_size(group), comm.group_rank(group)
    cfg = Mamba2Config(**cfg_kw)
    if lengths is None:
        x = randn((batch, seq_len or 3 * granule(layout, cp), cfg.d_model), 21)
        cu = None
    else:
        g = granule(layout, cp)
        cu = cu_from_lengths([n * g for n in lengths])
        x = randn((int(cu[-1]), cfg.d_model), 21)
    w = randn(x.shape, 22)
    m = oracle_layer(cfg, group, layout, strategy)
    y, dx, grads = _run_layer(m, x, w, cu, group, layout)
    ref_y, ref_dx, ref_grads = oracle_reference(m, x, w, cu)
    errs = {
        "out": rel_rms(y, shard(ref_y, r, cp, layout, cu)),
        "dx": rel_rms(dx, shard(ref_dx, r, cp, layout, cu)),
    }
    errs.update({f"grad {n}": rel_rms(grads[n], ref_grads[n]) for n in grads})
    bad = {k: v for k, v in errs.items() if not v <= TOL}
    return verdict(not bad, group), bad, max(errs.values())


def check(res):
    for r, (ok, bad, _worst) in enumerate(res):
        assert ok, f"rank {r}: {bad}"


@pytest.mark.parametrize("packed", [False, True])
def test_oracle_cp1_any_length(ranks, packed):
    """cp 1 with odd lengths (nothing is sharded, so any length is accepted), a zero-length document."""
    if packed:
        check(ranks.run(oracle_case, 1, CFG, "head_tail", 1, [5, 0, 7, 3], "hidden"))
    else:
        check(ranks.run(oracle_case, 1, CFG, "head_tail", 2, None, "hidden", seq_len=13))


CASES = [
    (2, "hidden", "head_tail", None),
    (2, "hidden", "contiguous", [2, 0, 3]),
    (2, "state_passing", "contiguous", None),
    (2, "state_passing", "head_tail", [1, 0, 3]),
    (2, "state_passing:chain", "head_tail", [2, 1]),
    (4, "hidden", "head_tail", [1, 2, 0, 1]),
    (4, "state_passing", "head_tail", None),
    (4, "state_passing:chain", "contiguous", [2, 0, 1]),
]


@pytest.mark.parametrize("cp, strategy, layout, lengths", CASES)
def test_oracle_cp(ranks, cp, strategy, layout, lengths):
    batch = 2 if lengths is None else 1
    check(ranks.run(oracle_case, cp, CFG, layout, batch, lengths, strategy))


def test_oracle_D_per_channel_and_one_group(ranks):
    cfg = dict(CFG, n_groups=1, D_has_hdim=True)
    check(ranks.run(oracle_case, 2, cfg, "head_tail", 1, [2, 1], "state_passing"))
    check(ranks.run(oracle_case, 2, cfg, "contiguous", 2, None, "hidden"))


def test_oracle_is_the_definition():
    """The oracle itself against a hand-written single token (conv sees only the bias and its own tap,
    the state starts at zero): guards the oracle against the mistakes it is meant to catch."""
    cfg = Mamba2Config(**CFG)
    m = oracle_layer(cfg, None, "head_tail", "hidden")
    p = {n: t.detach().double() for n, t in m.named_parameters()}
    u = randn((1, 1, cfg.d_model), 3).double()
    H, P, G, N, di = cfg.n_heads, cfg.head_dim, cfg.n_groups, cfg.d_state, cfg.d_inner
    zxbcdt = u[0, 0] @ p["in_proj.weight"].T
    z, xbc, dt = zxbcdt.split([di, cfg.conv_dim, H])
    pre = p["conv1d.bias"] + p["conv1d.weight"][:, 0, -1] * xbc
    act = pre * torch.sigmoid(pre)
    x, B, C = act.split([di, G * N, G * N])
    dtp = torch.nn.functional.softplus(dt + p["dt_bias"])
    y = torch.empty(H, P, dtype=torch.float64)
    for h in range(H):
        g = h // (H // G)
        state = dtp[h] * torch.outer(x.view(H, P)[h], B.view(G, N)[g])  # h_0 = dt x B^T (from zero)
        y[h] = state @ C.view(G, N)[g] + p["D"][h] * x.view(H, P)[h]
    gated = y.reshape(di) * z * torch.sigmoid(z)
    gg = gated.view(G, -1)
    normed = (gg / (gg.pow(2).mean(-1, keepdim=True) + cfg.norm_eps).sqrt()).reshape(di) * p["norm.weight"]
    want = normed @ p["out_proj.weight"].T
    got = mamba2_layer_ref(p, u, config=cfg)[0, 0]
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "cp, strategy", [(1, "hidden"), (2, "hidden"), (2, "state_passing"), (2, "state_passing:chain")]
)
def test_oracle_d_conv_1(ranks, cp, strategy):
    """A width-1 conv (no halo to exchange under state passing) is a per-token affine map + SiLU."""
    check(ranks.run(oracle_case, cp, dict(CFG, d_conv=1), "head_tail", 1, [2, 0, 1], strategy))
