"""The pieces of the layer core on CPU: the explicit forward/backward pairs against autograd of their
references, the split projection, suppressed collectives, the overlap model, and the peer/overlap
tables of ``cpbench report``."""

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from cases import randn

from cp_core import comm
from cp_core.kernels import conv1d, ssd
from cp_core.kernels.conv_ssd import ConvSSDSpec, conv_ssd
from cp_core.kernels.norm import gated_norm_out_proj, gated_rmsnorm_torch, norm_bwd, norm_fwd
from cp_core.pipeline import split_in_proj
from cpbench.metrics import exposed_model
from cpbench.peers import skip_reason
from cpbench.report import overlap_table, peer_ratios, scaling_table


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def test_gated_norm_pair_and_fused_out_proj_match_autograd_of_the_reference():
    y, z = randn((6, 5, 16), 1, torch.float64), randn((6, 5, 16), 2, torch.float64)
    w, wo = 1 + 0.1 * randn((16,), 3, torch.float64), randn((8, 16), 4, torch.float64)
    g = randn((6, 5, 8), 5, torch.float64)
    a = _leaves(y, z, w, wo)
    (F.linear(gated_rmsnorm_torch(a[0], a[1], a[2], 1e-5, 4), a[3]) * g).sum().backward()
    b = _leaves(y, z, w, wo)
    (gated_norm_out_proj(b[0], b[1], b[2], b[3], 1e-5, 4, "torch") * g).sum().backward()
    for x, r in zip(b, a, strict=True):
        torch.testing.assert_close(x.grad, r.grad, rtol=1e-12, atol=1e-12)
    # the explicit pair writes dz into a column slice of a wider buffer
    y2, z2 = y.reshape(30, 16), z.reshape(30, 16)
    out, _ = norm_fwd(y2, z2, w, 1e-5, 4, "torch")
    torch.testing.assert_close(out, gated_rmsnorm_torch(y2, z2, w, 1e-5, 4))
    buf = torch.full((30, 24), float("nan"), dtype=torch.float64)
    dy, dz, dw, again = norm_bwd(
        torch.ones_like(out), y2, z2, w, None, 1e-5, 4, "torch", dz=buf[:, :16], recompute_output=True
    )
    assert (
        dz.data_ptr() == buf.data_ptr()
        and torch.isnan(buf[:, 16:]).all()
        and torch.isfinite(buf[:, :16]).all()
    )
    torch.testing.assert_close(again, out)


@pytest.mark.parametrize("packed", [False, True])
def test_conv_ssd_pair_matches_autograd_of_its_parts(packed):
    nh, hd, ng, ds = 4, 4, 2, 8
    spec = ConvSSDSpec(nh, hd, ng, ds, 8, "autograd")
    b, l = (1, 24) if packed else (2, 24)
    w = spec.width
    xbcdt = randn((b, l, w + 3), 1)[..., 3:]  # a column slice of a wider tensor, as in the layer
    cw, cb = randn((spec.conv_dim, 4), 2), randn((spec.conv_dim,), 3)
    dtb, A, D = (
        randn((nh,), 4),
        -torch.rand(nh, generator=torch.Generator().manual_seed(5)) - 0.1,
        randn((nh,), 6),
    )
    seq_idx = torch.tensor([[0] * 10 + [1] * 14], dtype=torch.int32) if packed else None
    g = randn((b, l, nh * hd), 7)
    a = _leaves(xbcdt, cw, cb, dtb, A, D)
    xbc, dt = a[0].split([spec.conv_dim, nh], -1)
    xbc = conv1d(xbc, a[1], a[2], seq_idx=seq_idx)
    x, B, C = xbc.split([nh * hd, ng * ds, ng * ds], -1)
    y = ssd(x.unflatten(-1, (nh, hd)), dt, a[4], B.unflatten(-1, (ng, ds)), C.unflatten(-1, (ng, ds)),
            chunk_size=8, D=a[5], dt_bias=a[3], seq_idx=seq_idx)  # fmt: skip
    (y.reshape(b, l, -1) * g).sum().backward()
    c = _leaves(xbcdt, cw, cb, dtb, A, D)
    (conv_ssd(spec, *c, seq_idx) * g).sum().backward()
    for x, r in zip(c, a, strict=True):
        torch.testing.assert_close(x.grad, r.grad, rtol=1e-5, atol=1e-6)


def test_split_in_proj_is_one_linear():
    u, w = randn((3, 5, 8), 1, torch.float64), randn((12, 8), 2, torch.float64)
    g1, g2 = randn((3, 5, 4), 3, torch.float64), randn((3, 5, 8), 4, torch.float64)
    a = _leaves(u, w)
    out = F.linear(a[0], a[1])
    ((out[..., :4] * g1).sum() + (out[..., 4:] * g2).sum()).backward()
    b = _leaves(u, w)
    z, x = split_in_proj(b[0], b[1], 4)
    assert z.is_contiguous() and x.is_contiguous()
    ((z * g1).sum() + (x * g2).sum()).backward()
    torch.testing.assert_close(b[0].grad, a[0].grad)
    torch.testing.assert_close(b[1].grad, a[1].grad)


def test_suppressed_collectives_move_nothing():
    t = torch.arange(6.0)
    with comm.suppressed():
        assert comm.all_to_all_single(torch.zeros(6), t, comm.LocalGroup(0, 2)) is t
    out = comm.all_to_all_single(torch.zeros(6), t, comm.LocalGroup(0, 2))
    assert out is not t and torch.equal(out, t)


def test_exposed_model():
    assert exposed_model(10.0, 100.0, 1) == 10.0  # blocking: all of it
    assert exposed_model(10.0, 100.0, 2) == 5.0  # compute-bound: the first and last chunk's transfers
    assert exposed_model(10.0, 4.0, 2) == 8.0  # communication-bound: what compute cannot cover
    assert exposed_model(8.0, 100.0, 4) == 2.0


def test_peer_skip_reasons():
    assert skip_reason("cp_core", 2, "state_passing", "seed", "contiguous", 4) is None
    assert "cp 1 only" in skip_reason("mamba_ssm", 2, "hidden", "fused", "head_tail", 1)
    assert skip_reason("mamba_ssm", 1, "hidden", "fused", "head_tail", 1) is None
    assert "head-tail" in skip_reason("nemo", 2, "hidden", "fused", "contiguous", 1)
    assert "not applicable" in skip_reason("nemo", 2, "state_passing", "fused", "head_tail", 1)


def _rows():
    base = dict(scenario="s", seq_len=1024, batch=1, n_heads=8, n_groups=4, packing="none", docs=0, density=1.0,
                layout="head_tail", path="fused", pass_="fwd+bwd", strategy="hidden", dtype="bfloat16",
                device="cuda", world_size=2, backend="nccl", status="ok")  # fmt: skip
    base["pass"] = base.pop("pass_")
    rows = [
        dict(base, cp_size=2, impl="cp_core", overlap_chunks=1, layer_ms=10.0, peak_mem_GiB=2.0, comm_ms=2.0, exposed_comm_ms=2.0),
        dict(base, cp_size=2, impl="cp_core", overlap_chunks=2, layer_ms=9.0, peak_mem_GiB=1.5, comm_ms=3.0, exposed_comm_ms=1.0),
        dict(base, cp_size=2, impl="nemo", overlap_chunks=1, layer_ms=12.0, peak_mem_GiB=2.0, comm_ms=0.0, exposed_comm_ms=math.nan),
        dict(base, cp_size=2, impl="cp_core", overlap_chunks=1, layer_ms=11.0, peak_mem_GiB=2.0, comm_ms=2.0,
             exposed_comm_ms=2.0, seq_len=2048),  # no peer row for this case
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_report_peer_ratios_and_overlap_table():
    r = peer_ratios(_rows(), "nemo")
    assert list(r["k"]) == [1, 2]
    assert r["time ratio"].tolist() == pytest.approx([10 / 12, 9 / 12])
    assert r["memory ratio"].tolist() == pytest.approx([1.0, 0.75])
    assert peer_ratios(_rows(), "mamba_ssm") is None
    ov = overlap_table(_rows())
    row = ov[(ov["seq_len"] == 1024) & (ov["k"] == 2)].iloc[0]
    assert row["vs k=1"] == pytest.approx(0.9) and row["exposed vs k=1"] == pytest.approx(0.5)


def test_report_scaling_against_cp1():
    """cp > 1 rows against the same case at cp 1 (layout, strategy and k do not change a cp 1 run); a case
    without a cp 1 row, a peer's cp 1 row and results without cp 1 give no row / no table."""
    rows = _rows()
    cp1 = rows.iloc[0].to_dict() | dict(cp_size=1, world_size=1, backend="none", layer_ms=19.0, strategy="x")
    peer1 = cp1 | dict(impl="nemo", layer_ms=30.0)
    both = pd.concat([rows, pd.DataFrame([cp1, peer1])], ignore_index=True)
    sc = scaling_table(both)
    ours = sc[sc["impl"] == "cp_core"]
    assert list(ours["k"]) == [1, 2] and list(ours["seq_len"]) == [1024, 1024]  # 2048 has no cp 1 row
    assert ours["vs cp 1 / cp"].tolist() == pytest.approx([10 / 9.5, 9 / 9.5])
    assert sc[sc["impl"] == "nemo"]["vs cp 1 / cp"].tolist() == pytest.approx([12 / 15])
    assert scaling_table(rows) is None


def test_int32_extent_guard_names_the_tensor():
    from cp_core.kernels import INT32_ELEMENTS, check_int32_extent

    check_int32_extent("x", INT32_ELEMENTS - 1, "hint")
    with pytest.raises(ValueError, match=r"the rows would hold 2,147,483,648 elements.*use a larger cp_size"):
        check_int32_extent("the rows", INT32_ELEMENTS, "use a larger cp_size")
