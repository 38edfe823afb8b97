"""CPU tests of cp_core.kernels: the torch SSD and conv1d against naive per-token references."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cp_core import kernels
from cp_core.kernels import CONV_BACKENDS, SSD_BACKENDS, conv1d, conv_cuda, resolve_backends, ssd, ssd_mamba
from cp_core.kernels.reference import conv1d_ref, ssd_recurrent_ref

# ----------------------------------------------------------------------------------------------------
# inputs and comparisons


def ssd_inputs(b, l, h, p, g, n, *, seed, dtype=torch.float32, D_shape="h", bias=True, init=False):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)

    inp = dict(
        x=rnd(b, l, h, p),
        dt=rnd(b, l, h, scale=0.5, shift=-1.0),
        A=(-torch.exp(torch.rand(h, generator=gen, dtype=torch.float64) * 1.5 - 0.5)).to(dtype),
        B=rnd(b, l, g, n),
        C=rnd(b, l, g, n),
    )
    inp["D"] = {"h": rnd(h), "hp": rnd(h, p), None: None}[D_shape]
    inp["dt_bias"] = rnd(h, scale=0.5) if bias else None
    inp["initial_states"] = rnd(b, h, p, n) if init else None
    return inp


def seq_from_lengths(rows: list[list[int]], start: int = 0) -> torch.Tensor:
    """[b, l] int32 document ids from per-row document lengths (ids count from ``start``)."""
    out = []
    for lens in rows:
        ids = []
        for d, n in enumerate(lens):
            ids += [start + d] * n
        out.append(ids)
    return torch.tensor(out, dtype=torch.int32)


def f64(inp: dict) -> dict:
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}


def assert_rel_close(actual, expected, rtol, what=""):
    """Elementwise rtol, with an absolute floor of rtol times the largest |expected|."""
    expected = expected.to(torch.float64)
    atol = rtol * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(
        actual.to(torch.float64), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


def run_ssd(fn, inp, chunk_size, seq_idx=None, **kw):
    return fn(
        inp["x"],
        inp["dt"],
        inp["A"],
        inp["B"],
        inp["C"],
        chunk_size=chunk_size,
        D=inp["D"],
        dt_bias=inp["dt_bias"],
        seq_idx=seq_idx,
        initial_states=inp["initial_states"],
        return_final_states=True,
        **kw,
    )


# chunk_size 8, l = 37 (not a multiple of 8). Row 0: boundaries exactly on chunk boundaries (8, 16),
# three inside chunk 2 (17, 19, 22) including a one-token document, one crossing a chunk boundary;
# row 1: one document, then a tail starting in the padded last chunk.
LAYOUT_37 = [[8, 8, 1, 2, 3, 15], [33, 4]]
LAYOUT_32 = [[8, 8, 1, 2, 3, 10], [32]]


# ----------------------------------------------------------------------------------------------------
# torch SSD vs the naive recurrence


@pytest.mark.parametrize("l", [37, 32])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("D_shape", ["h", "hp", None])
@pytest.mark.parametrize("g", [1, 2, 4])
def test_ssd_torch_fp32_matches_recurrence(l, docs, init, D_shape, g):
    inp = ssd_inputs(2, l, 4, 3, g, 5, seed=1000 + l + 7 * g, D_shape=D_shape, init=init)
    seq = seq_from_lengths(LAYOUT_37 if l == 37 else LAYOUT_32) if docs else None
    y, fs = run_ssd(ssd, inp, 8, seq, backend="torch")
    yr, fsr = run_ssd(ssd_recurrent_ref, f64(inp), 8, seq)
    assert y.dtype == torch.float32 and fs.dtype == torch.float32
    assert y.shape == (2, l, 4, 3) and fs.shape == (2, 4, 3, 5)
    assert_rel_close(y, yr, 1e-5, "y")
    assert_rel_close(fs, fsr, 1e-5, "final_states")


@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 5, 8, 64])
def test_ssd_torch_fp64_tight(docs, chunk_size):
    inp = f64(ssd_inputs(2, 37, 4, 3, 2, 5, seed=7 + chunk_size, D_shape="hp", init=True))
    seq = seq_from_lengths(LAYOUT_37) if docs else None
    y, fs = run_ssd(ssd, inp, chunk_size, seq)
    yr, fsr = run_ssd(ssd_recurrent_ref, inp, chunk_size, seq)
    assert y.dtype == torch.float64 and fs.dtype == torch.float64
    assert_rel_close(y, yr, 1e-11, "y")
    assert_rel_close(fs, fsr, 1e-11, "final_states")


def test_ssd_torch_long_sequence_many_chunks():
    """Inter-chunk state passing over 40 chunks with several documents."""
    inp = ssd_inputs(1, 317, 2, 4, 1, 8, seed=3, init=True)
    inp["dt"] = inp["dt"] - 2.0  # slow decay, so that states travel far
    seq = seq_from_lengths([[100, 96, 1, 120]])
    y, fs = run_ssd(ssd, inp, 8, seq)
    yr, fsr = run_ssd(ssd_recurrent_ref, f64(inp), 8, seq)
    assert_rel_close(y, yr, 1e-5, "y")
    assert_rel_close(fs, fsr, 1e-5, "final_states")


def test_ssd_no_softplus_no_bias_and_int64_seq_idx():
    inp = ssd_inputs(2, 21, 2, 2, 1, 3, seed=11, bias=False, init=True)
    inp["dt"] = inp["dt"].abs() * 0.3  # already positive: used as is
    seq = seq_from_lengths([[5, 16], [21]]).long()
    y, fs = run_ssd(ssd, inp, 4, seq, dt_softplus=False)
    yr, fsr = run_ssd(ssd_recurrent_ref, f64(inp), 4, seq, dt_softplus=False)
    assert_rel_close(y, yr, 1e-5, "y")
    assert_rel_close(fs, fsr, 1e-5, "final_states")


def test_ssd_bf16_inputs():
    inp = ssd_inputs(1, 30, 4, 4, 2, 4, seed=5, init=True)
    low = {k: (v.bfloat16() if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    y, fs = run_ssd(ssd, low, 8)
    assert y.dtype == torch.bfloat16 and fs.dtype == torch.float32
    yr, fsr = run_ssd(ssd_recurrent_ref, f64(low), 8)  # same bf16-rounded inputs, in float64
    assert_rel_close(y, yr, 1e-2, "y")
    assert_rel_close(fs, fsr, 1e-5, "final_states")  # fp32 accumulation: the state is not rounded


def test_initial_states_belong_to_document_zero():
    """mamba-ssm convention: with seq_idx starting at 1 the initial state reaches no token."""
    inp = ssd_inputs(1, 12, 2, 2, 1, 3, seed=2, init=True)
    for start, expect_effect in ((0, True), (1, False)):
        seq = seq_from_lengths([[5, 7]], start=start)
        y, _ = run_ssd(ssd, inp, 4, seq)
        yr, _ = run_ssd(ssd_recurrent_ref, f64(inp), 4, seq)
        assert_rel_close(y, yr, 1e-5, f"start={start}")
        y0, _ = run_ssd(ssd, {**inp, "initial_states": None}, 4, seq)
        changed = not torch.allclose(y[:, :5], y0[:, :5], rtol=0, atol=1e-6)
        assert changed == expect_effect
        torch.testing.assert_close(y[:, 5:], y0[:, 5:], rtol=0, atol=0)  # 2nd document never sees it


# ----------------------------------------------------------------------------------------------------
# gradients


GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_states")


def _grads(fn, inp, chunk_size, seq, gy, gf):
    leaves = {
        k: v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v
        for k, v in inp.items()
    }
    y, fs = run_ssd(fn, leaves, chunk_size, seq)
    loss = (y * gy).sum() + (fs * gf).sum()
    names = [k for k in GRAD_NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return dict(zip(names, grads, strict=True))


@pytest.mark.parametrize(
    "g,D_shape,docs,l",
    [(2, "h", False, 37), (4, "hp", True, 37), (1, "hp", True, 32), (2, "h", True, 29)],
)
def test_ssd_torch_grads_match_recurrence(g, D_shape, docs, l):
    inp = f64(ssd_inputs(2, l, 4, 3, g, 5, seed=500 + l + g, D_shape=D_shape, init=True))
    seq = None
    if docs:
        seq = seq_from_lengths(LAYOUT_37 if l == 37 else LAYOUT_32 if l == 32 else [[3, 10, 16], [29]])
    gen = torch.Generator().manual_seed(99)
    gy = torch.randn(2, l, 4, 3, generator=gen, dtype=torch.float64)
    gf = torch.randn(2, 4, 3, 5, generator=gen, dtype=torch.float64)
    got = _grads(ssd, inp, 8, seq, gy, gf)
    ref = _grads(ssd_recurrent_ref, inp, 8, seq, gy, gf)
    assert set(got) == set(GRAD_NAMES)
    for k in GRAD_NAMES:
        assert got[k].abs().max() > 0, k
        assert_rel_close(got[k], ref[k], 1e-9, f"grad {k}")


def test_ssd_final_states_gradient_flows_alone():
    inp = f64(ssd_inputs(1, 19, 2, 2, 1, 3, seed=8, init=True))
    x = inp["x"].clone().requires_grad_(True)
    init = inp["initial_states"].clone().requires_grad_(True)
    _, fs = ssd(
        x,
        inp["dt"],
        inp["A"],
        inp["B"],
        inp["C"],
        chunk_size=4,
        initial_states=init,
        return_final_states=True,
    )
    fs.sum().backward()
    assert x.grad.abs().sum() > 0 and init.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------
# chaining: two halves with initial_states / return_final_states equal one full run


@pytest.mark.parametrize("split", [16, 21])
@pytest.mark.parametrize("docs", [False, True])
def test_ssd_chaining_two_halves(split, docs):
    inp = ssd_inputs(2, 37, 4, 3, 2, 5, seed=77, D_shape="hp", init=True)
    seq = seq_from_lengths(LAYOUT_37) if docs else None
    y, fs = run_ssd(ssd, inp, 8, seq)

    def part(sl, init, s):
        sub = {k: (v[:, sl] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
        sub["initial_states"] = init
        return run_ssd(ssd, sub, 8, s)

    s1 = s2 = None
    if seq is not None:
        # number each half's documents relative to the document of the token before it, so that
        # the carried state reaches exactly the continuing document (id 0), if any
        s1 = seq[:, :split]
        s2 = (seq[:, split:] - seq[:, split - 1 : split]).to(torch.int32)
    y1, f1 = part(slice(0, split), inp["initial_states"], s1)
    y2, f2 = part(slice(split, None), f1, s2)
    assert_rel_close(torch.cat([y1, y2], dim=1), y, 1e-5, "y")
    assert_rel_close(f2, fs, 1e-5, "final_states")


# ----------------------------------------------------------------------------------------------------
# hypothesis: random document layouts


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lens=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    chunk_size=st.sampled_from([2, 4, 8]),
    g=st.sampled_from([1, 2]),
    init=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_ssd_torch_random_document_layouts(lens, chunk_size, g, init, seed):
    inp = ssd_inputs(1, sum(lens), 2, 2, g, 3, seed=seed, init=init, D_shape="h")
    seq = seq_from_lengths([lens])
    y, fs = run_ssd(ssd, inp, chunk_size, seq)
    yr, fsr = run_ssd(ssd_recurrent_ref, f64(inp), chunk_size, seq)
    assert_rel_close(y, yr, 1e-5, "y")
    assert_rel_close(fs, fsr, 1e-5, "final_states")


# ----------------------------------------------------------------------------------------------------
# conv1d


def conv_inputs(b, l, c, k, *, seed, dtype=torch.float32, bias=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, c, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(c, k, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    bb = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    return x, w, bb


CONV_LAYOUT = [[1, 2, 5, 1, 3, 8], [20]]  # documents shorter than k, a one-token document at the start


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_torch_matches_naive(k, docs, activation, bias):
    x, w, bb = conv_inputs(2, 20, 6, k, seed=10 * k + docs, bias=bias)
    seq = seq_from_lengths(CONV_LAYOUT) if docs else None
    y = conv1d(x, w, bb, seq_idx=seq, activation=activation, backend="torch")
    yr = conv1d_ref(x, w, bb, seq_idx=seq, activation=activation)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)


def test_conv_seq_idx_really_masks():
    x, w, bb = conv_inputs(1, 12, 4, 4, seed=1)
    seq = seq_from_lengths([[4, 8]])
    y = conv1d(x, w, bb, seq_idx=seq)
    alone = conv1d(x[:, 4:], w, bb)  # the second document on its own
    torch.testing.assert_close(y[:, 4:], alone, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(conv1d(x, w, bb)[:, 4:7], alone[:, :3], atol=1e-3)


def test_conv_kernel_longer_than_sequence():
    x, w, bb = conv_inputs(2, 3, 5, 4, seed=4)
    torch.testing.assert_close(conv1d(x, w, bb), conv1d_ref(x, w, bb), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv_low_precision_accumulates_in_fp32(dtype):
    x, w, bb = conv_inputs(2, 20, 8, 4, seed=6, dtype=dtype)
    w32 = w.float()
    seq = seq_from_lengths(CONV_LAYOUT)
    y = conv1d(x, w32, bb.float(), seq_idx=seq)
    assert y.dtype == dtype
    yr = conv1d_ref(x.double(), w32.double(), bb.double(), seq_idx=seq)
    torch.testing.assert_close(y.double(), yr, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("docs", [False, True])
def test_conv_torch_grads_match_naive(activation, docs):
    x, w, bb = conv_inputs(2, 20, 6, 4, seed=21, dtype=torch.float64)
    seq = seq_from_lengths(CONV_LAYOUT) if docs else None
    gy = torch.randn(2, 20, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, bb)]
        y = fn(*leaves, seq_idx=seq, activation=activation)
        return torch.autograd.grad((y * gy).sum(), leaves)

    for name, got, ref in zip(("x", "weight", "bias"), grads(conv1d), grads(conv1d_ref), strict=True):
        assert got.abs().max() > 0
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")


def test_conv_torch_gradcheck():
    x, w, bb = conv_inputs(1, 7, 3, 3, seed=2, dtype=torch.float64)
    seq = seq_from_lengths([[2, 5]])
    leaves = tuple(t.requires_grad_(True) for t in (x, w, bb))
    assert torch.autograd.gradcheck(lambda a, b, c: conv1d(a, b, c, seq_idx=seq), leaves)


def test_conv_mixed_dtype_grads():
    """bf16 activations with an fp32 weight: grads come back in each input's dtype."""
    x, w, bb = conv_inputs(1, 10, 8, 4, seed=3)
    xb = x.bfloat16().requires_grad_(True)
    w.requires_grad_(True)
    bb.requires_grad_(True)
    conv1d(xb, w, bb).float().square().sum().backward()
    assert (
        xb.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32 and bb.grad.dtype == torch.float32
    )


# ----------------------------------------------------------------------------------------------------
# carried-state correction (state-passing CP)


def _rows_table(b, l):
    from cp_core.kernels.correction import PieceTable

    return PieceTable([r * l for r in range(b)], [l] * b, "cpu")


@pytest.mark.parametrize("g, D_shape", [(1, "h"), (2, "hp"), (4, None)])
def test_zero_state_ssd_plus_correction_equals_ssd_with_initial_state(g, D_shape):
    """The identities state passing rests on, exactly (float64): SSD(h0) = SSD(0) + exp(cumsum(A dt)) C . h0,
    and the final state from a zero start is the per-piece sum of exp(ld - acum) dt' x B^T, with
    F(h0) = exp(ld) h0 + F(0)."""
    from cp_core.kernels import correction as corr

    b, l, h, p, n = 2, 27, 4, 3, 5
    inp = f64(ssd_inputs(b, l, h, p, g, n, seed=11, init=True, D_shape=D_shape))
    y_ref, f_ref = run_ssd(ssd, inp, 8)
    y0, f0 = run_ssd(ssd, {**inp, "initial_states": None}, 8)
    table = _rows_table(b, l)
    dtp = torch.nn.functional.softplus(inp["dt"] + inp["dt_bias"])  # [b, l, h]
    a = (dtp * inp["A"]).reshape(b * l, h).t()  # [h, T]
    acum = corr.segmented_cumsum(a, table)
    flat = lambda t: t.reshape(b * l, *t.shape[2:])  # noqa: E731
    y = corr.apply(flat(y0), flat(inp["C"]), inp["initial_states"], torch.exp(acum), table, backend="torch")
    assert_rel_close(y.view_as(y_ref), y_ref, 1e-12, "output")
    ld = acum[:, table.last].t()  # [b, h]
    assert_rel_close(torch.exp(ld)[..., None, None] * inp["initial_states"] + f0, f_ref, 1e-12, "final")
    s_f = torch.exp(ld.t()[:, table.tok_piece] - acum) * dtp.reshape(b * l, h).t()
    F = corr.outer(flat(inp["x"]), flat(inp["B"]), s_f, table, backend="torch")
    assert_rel_close(F, f0, 1e-12, "final from a zero start")


def _pieces_case(seed, lengths=(5, 0, 7, 1, 3), H=4, P=3, G=2, N=6):
    from cp_core.kernels.correction import PieceTable

    gen = torch.Generator().manual_seed(seed)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    table = PieceTable(starts, list(lengths), "cpu")
    T, Pc = sum(lengths), len(lengths)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return table, r(T, H, P), r(T, G, N), r(Pc, H, P, N), torch.rand(H, T, generator=gen, dtype=torch.float64)


def test_piece_products_match_naive_loops():
    from cp_core.kernels import correction as corr

    table, u, v, M, s = _pieces_case(3)
    T, H, P = u.shape
    G = v.shape[1]
    out = corr.apply(u, v, M, s, table, backend="torch")
    dv0 = torch.randn(v.shape, dtype=torch.float64)
    dv, g = corr.tapply(u, v, M, s, table, dv=dv0.clone(), accumulate=True, backend="torch")
    Mo = corr.outer(u, v, s, table, backend="torch")
    piece = table.tok_piece.tolist()
    for t in range(T):
        pc = piece[t]
        want_dv = dv0[t].clone()
        for hh in range(H):
            gg = hh // (H // G)
            mv = M[pc, hh] @ v[t, gg]
            assert torch.allclose(out[t, hh], u[t, hh] + s[hh, t] * mv, atol=1e-12)
            assert torch.allclose(g[hh, t], u[t, hh] @ mv, atol=1e-12)
            want_dv[gg] += s[hh, t] * (M[pc, hh].t() @ u[t, hh])
        assert torch.allclose(dv[t], want_dv, atol=1e-12)
    for pc in range(table.n_pieces):
        want = torch.zeros(H, P, M.shape[-1], dtype=torch.float64)
        for t in [t for t in range(T) if piece[t] == pc]:
            for hh in range(H):
                want[hh] += s[hh, t] * torch.outer(u[t, hh], v[t, hh // (H // G)])
        assert torch.allclose(Mo[pc], want, atol=1e-12)  # zero for the empty piece


def test_segmented_cumsum_restarts_at_every_piece_and_keeps_a_nan_inside():
    from cp_core.kernels import correction as corr

    table, *_ = _pieces_case(4)
    T = table.tokens
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(3, T, dtype=torch.float64, generator=gen).requires_grad_()
    out = corr.segmented_cumsum(a, table)
    parts = [a[:, s : s + n].cumsum(-1) for s, n in zip(table.starts, table.lengths, strict=True) if n]
    ref = torch.cat(parts, -1)
    assert torch.allclose(out, ref, atol=1e-12)
    gy = torch.randn(3, T, dtype=torch.float64, generator=gen)
    (ga,) = torch.autograd.grad(out, a, gy)
    (gr,) = torch.autograd.grad(ref, a, gy)
    assert torch.allclose(ga, gr, atol=1e-12)
    bad = a.detach().clone()
    bad[0, 6] = float("nan")  # piece 2 = tokens 5..11
    o = corr.segmented_cumsum(bad, table)
    # elsewhere the same up to the rounding of the fp64 prefix sums
    same = lambda x, y: torch.allclose(x, y.detach(), rtol=0, atol=1e-13)  # noqa: E731
    assert torch.isnan(o[0, 6:12]).all() and same(o[0, :6], out[0, :6])
    assert same(o[0, 12:], out[0, 12:]) and same(o[1:], out[1:])
    gbad = gy.clone()
    gbad[1, 13] = float("nan")  # piece 4 = tokens 13..15: its gradient is NaN up to token 13 only
    (g2,) = torch.autograd.grad(corr.segmented_cumsum(a, table), a, gbad)
    assert torch.isnan(g2[1, 12:14]).sum() == 1 and torch.isnan(g2[1, 13])
    keep = torch.ones(T, dtype=torch.bool)
    keep[13] = False
    assert same(g2[1, keep], ga[1, keep]) and same(g2[0], ga[0])


def test_piece_products_validation():
    from cp_core.kernels import correction as corr

    table, u, v, M, s = _pieces_case(5)
    with pytest.raises(ValueError, match="v must be"):
        corr.apply(u, v[:-1], M, s, table)
    with pytest.raises(ValueError, match="M must be"):
        corr.apply(u, v, M[:-1], s, table)
    with pytest.raises(ValueError, match="s must be"):
        corr.tapply(u, v, M, s[:, :-1], table)
    with pytest.raises(ValueError, match="divide the heads"):
        corr.outer(u[:, :3], v, s[:3], table)
    with pytest.raises(ValueError, match="backend must be"):
        corr.apply(u, v, M, s, table, backend="x")
    with pytest.raises(ValueError, match="triton piece kernels need"):
        corr.apply(u.float(), v.float(), M, s, table, backend="triton")
    with pytest.raises(ValueError, match="tile the stream"):
        corr.PieceTable([0, 3], [2, 2], "cpu")


def test_torch_ssd_phases_equal_one_call():
    from cp_core.kernels.ssd_torch import ssd_torch, ssd_torch_phases

    inp = ssd_inputs(2, 27, 4, 3, 2, 5, seed=12)
    seq = torch.tensor([[0] * 10 + [1] * 17, [0] * 27], dtype=torch.int32)
    kw = dict(chunk_size=8, D=inp["D"], dt_bias=inp["dt_bias"], seq_idx=seq)
    args = [inp[k] for k in ("x", "dt", "A", "B", "C")]
    y, f = ssd_torch(*args, return_final_states=True, **kw)
    ph = ssd_torch_phases(*args, **kw)
    f2 = ph.states()
    assert torch.equal(f2, f) and torch.equal(ph.outputs(), y)


# ----------------------------------------------------------------------------------------------------
# backends


def test_backend_names():
    assert SSD_BACKENDS == ("torch", "mamba_ssm")
    assert CONV_BACKENDS == ("torch", "causal_conv1d")


def test_resolve_auto_on_cpu():
    assert resolve_backends("cpu") == ("torch", "torch")
    assert resolve_backends(torch.device("cpu"), "auto", "auto") == ("torch", "torch")
    assert resolve_backends(torch.zeros(1), "torch", "torch") == ("torch", "torch")


def test_resolve_explicit_fast_backend_on_cpu_raises():
    with pytest.raises(ValueError, match="mamba_ssm.*CUDA"):
        resolve_backends("cpu", ssd_backend="mamba_ssm")
    with pytest.raises(ValueError, match="causal_conv1d.*CUDA"):
        resolve_backends("cpu", conv_backend="causal_conv1d")
    inp = ssd_inputs(1, 4, 2, 2, 1, 2, seed=0)
    with pytest.raises(ValueError, match="mamba_ssm"):
        ssd(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size=4, backend="mamba_ssm")
    x, w, bb = conv_inputs(1, 4, 8, 4, seed=0)
    with pytest.raises(ValueError, match="causal_conv1d"):
        conv1d(x, w, bb, backend="causal_conv1d")


def test_resolve_unavailable_package_says_why(monkeypatch):
    monkeypatch.setattr(ssd_mamba, "available", lambda: (False, "mamba-ssm is not installed"))
    monkeypatch.setitem(
        kernels._OPS, "ssd", (SSD_BACKENDS, "CP_CORE_SSD_BACKEND", "mamba_ssm", ssd_mamba.available)
    )
    with pytest.raises(ValueError, match="not installed"):
        resolve_backends("cuda", ssd_backend="mamba_ssm")
    assert resolve_backends("cuda", "auto", "torch")[0] == "torch"  # auto falls back


def test_resolve_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="torch, mamba_ssm"):
        resolve_backends("cpu", ssd_backend="triton")
    with pytest.raises(ValueError, match="torch, causal_conv1d"):
        resolve_backends("cpu", conv_backend="cudnn")
    x, w, _ = conv_inputs(1, 4, 8, 4, seed=0)
    with pytest.raises(ValueError, match="valid names"):
        conv1d(x, w, backend="nope")


def test_resolve_ignores_the_environment(monkeypatch):
    """The backend variables set a layer's default options (tests/test_options.py); resolving reads none."""
    monkeypatch.setenv("CP_CORE_SSD_BACKEND", "mamba_ssm")
    monkeypatch.setenv("CP_CORE_CONV_BACKEND", "bogus")
    assert resolve_backends("cpu") == ("torch", "torch")


def test_availability_reports_reason():
    for mod in (ssd_mamba, conv_cuda):
        ok, reason = mod.available()
        assert isinstance(ok, bool) and isinstance(reason, str) and reason


def _fake_mamba(root, init_body):
    pkg = root / "mamba_ssm"
    (pkg / "ops" / "triton").mkdir(parents=True)
    (pkg / "__init__.py").write_text(init_body)
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "__init__.py").write_text("")
    (pkg / "ops" / "triton" / "ssd_combined.py").write_text(
        textwrap.dedent("""
        def mamba_chunk_scan_combined(*args, **kwargs):
            return "fake"
    """)
    )


@pytest.mark.parametrize("broken_init", [True, False])
def test_mamba_loader_handles_both_kinds_of_install(tmp_path, monkeypatch, broken_init):
    if any(m == "mamba_ssm" or m.startswith("mamba_ssm.") for m in sys.modules):
        pytest.skip("a real mamba_ssm is already imported in this process")
    body = "import selective_scan_cuda  # absent in MAMBA_SKIP_CUDA_BUILD installs\n" if broken_init else ""
    _fake_mamba(tmp_path, body)
    monkeypatch.syspath_prepend(str(tmp_path))
    ssd_mamba._load.cache_clear()
    try:
        ok, reason = ssd_mamba.available()
        assert ok, reason
        assert ("without the package __init__" in reason) == broken_init
        assert ssd_mamba._load()[0]() == "fake"
    finally:
        for m in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
            del sys.modules[m]
        ssd_mamba._load.cache_clear()


def test_mamba_loader_reports_missing_package(tmp_path, monkeypatch):
    if any(m == "mamba_ssm" or m.startswith("mamba_ssm.") for m in sys.modules):
        pytest.skip("a real mamba_ssm is already imported in this process")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    ssd_mamba._load.cache_clear()
    try:
        ok, reason = ssd_mamba.available()
        assert not ok and "not installed" in reason
    finally:
        ssd_mamba._load.cache_clear()


# ----------------------------------------------------------------------------------------------------
# validation


def _ssd_call(**over):
    inp = ssd_inputs(2, 6, 4, 3, 2, 5, seed=0)
    args = dict(x=inp["x"], dt=inp["dt"], A=inp["A"], B=inp["B"], C=inp["C"], chunk_size=4)
    args.update(over)
    return ssd(args.pop("x"), args.pop("dt"), args.pop("A"), args.pop("B"), args.pop("C"), **args)


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(x=torch.zeros(2, 6, 4)), r"x must have shape \[b, l, h, p\]"),
        (dict(dt=torch.zeros(2, 6, 3)), r"dt must have shape"),
        (dict(A=torch.zeros(3)), r"A must have shape \[h\]"),
        (dict(B=torch.zeros(2, 6, 3, 5), C=torch.zeros(2, 6, 3, 5)), r"h=4 .* g=3"),
        (dict(C=torch.zeros(2, 6, 2, 4)), r"C must have the shape of B"),
        (dict(D=torch.zeros(4, 2)), r"D must have shape \[h\] = \[4\] or \[h, p\] = \[4, 3\]"),
        (dict(dt_bias=torch.zeros(2)), r"dt_bias must have shape"),
        (dict(seq_idx=torch.zeros(2, 6)), r"seq_idx must have dtype torch.int32.*float32"),
        (dict(seq_idx=torch.zeros(2, 5, dtype=torch.int32)), r"seq_idx must have shape \[b, l\]"),
        (dict(initial_states=torch.zeros(2, 4, 3, 4)), r"initial_states must have shape"),
        (dict(chunk_size=0), r"chunk_size must be a positive int, got 0"),
        (dict(x=torch.zeros(2, 6, 4, 3, dtype=torch.int64)), r"x must be a floating tensor"),
    ],
)
def test_ssd_validation(over, match):
    with pytest.raises(ValueError, match=match):
        _ssd_call(**over)


@pytest.mark.parametrize(
    "args,match",
    [
        (dict(x=torch.zeros(2, 6)), r"x must have shape \[b, l, c\]"),
        (dict(weight=torch.zeros(8, 1, 4)), r"weight must have shape \[c, k\]"),
        (dict(weight=torch.zeros(7, 4)), r"weight must have shape \[c, k\] with c = 8"),
        (dict(bias=torch.zeros(7)), r"bias must have shape \[c\]"),
        (dict(seq_idx=torch.zeros(2, 6, dtype=torch.bool)), r"seq_idx must have dtype"),
        (dict(activation="relu"), r"activation must be one of"),
    ],
)
def test_conv_validation(args, match):
    x, w, bb = conv_inputs(2, 6, 8, 4, seed=0)
    call = dict(x=x, weight=w, bias=bb)
    call.update(args)
    with pytest.raises(ValueError, match=match):
        conv1d(call.pop("x"), call.pop("weight"), call.pop("bias"), **call)


def _norm_slots_case(M, cp, k, G, dtype, device):
    """A y of S = k*cp slots as hidden CP returns it (slot j*cp + r: rank r's head chunk j), the same y laid
    side by side, z as a column slice of a wider tensor, and the slots' first channels."""
    from cp_core.channels import ChannelPlan, unpack_torch

    S, N = k * cp, 4 * G * k * cp // 2  # two norm groups per slot
    w = N // S
    gen = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    ys, zw, wt, dout = rnd(S, M, w), rnd(M, N + 3), 1 + 0.1 * rnd(N), rnd(M, N)
    y = torch.empty(M, N, device=device, dtype=dtype)
    for j in range(k):
        unpack_torch(ys[j * cp : (j + 1) * cp], ChannelPlan.single(cp, N // cp, (j, k)), y)
    cols = tuple(r * (N // cp) + j * w for j in range(k) for r in range(cp))
    return ys, y, zw[:, 3:], wt, dout, cols


@pytest.mark.parametrize("cp, k", [(1, 1), (2, 1), (2, 2), (4, 2)])
def test_norm_on_slots_equals_norm_on_unpacked_y(cp, k):
    """The gated norm read from the returned slots (and its backward written into the slots that are sent)
    equals the norm of the unpacked y: forward and recomputed output, dz, the slots' dy and the weight
    gradient (torch's CPU reductions block by width, so to the last bits; the GPU test asks for the same
    bits from the Triton kernels); the forward also against a float64 definition."""
    from cp_core.kernels.norm import norm_bwd, norm_bwd_slots, norm_fwd, norm_fwd_slots

    G, eps = 8, 1e-5
    ys, y, z, wt, dout, cols = _norm_slots_case(11, cp, k, G, torch.float32, "cpu")

    def close(a, b):
        return torch.allclose(a, b, rtol=1e-6, atol=1e-6)

    out, rstd = norm_fwd_slots(ys, cols, z, wt, eps, G, "torch")
    ref, _ = norm_fwd(y, z, wt, eps, G, "torch")
    assert rstd == [None] * len(cols) and close(out, ref)
    h = (y.double() * torch.nn.functional.silu(z.double())).view(11, -1, G)
    oracle = (h / (h.pow(2).mean(-1, keepdim=True) + eps).sqrt()).view(11, -1) * wt.double()
    assert torch.allclose(out.double(), oracle, rtol=1e-5, atol=1e-6)
    dz, dys = torch.empty_like(z), torch.empty_like(ys)
    dw, out2 = norm_bwd_slots(dout, ys, cols, z, wt, rstd, eps, G, "torch", dz=dz, dx=dys)
    dy_ref, dz_ref, dw_ref, _ = norm_bwd(dout, y, z, wt, None, eps, G, "torch")
    w = ys.shape[-1]
    for i, c in enumerate(cols):
        assert close(dys[i], dy_ref[:, c : c + w]), i
    assert close(dz, dz_ref) and close(out2, ref) and close(dw, dw_ref)


def test_norm_on_slots_needs_whole_groups():
    from cp_core.kernels.norm import norm_fwd_slots

    ys, _, z, wt, _, cols = _norm_slots_case(3, 2, 1, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match="whole norm groups of 32"):
        norm_fwd_slots(ys, cols, z, wt, 1e-5, 32, "torch")
