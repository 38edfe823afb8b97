"""A non-finite value stays in its document: kernels (torch SSD, torch conv, the state-passing scan)
and the whole mixer at cp 1 and under both strategies, forward and backward.

The token recurrence is the specification: a NaN (or inf) entering document d at token j makes d's
outputs NaN from j on and leaves every other document exactly as it would be without it.
"""

import pytest
import torch
from cases import cu_from_lengths, randn
from ranks import verdict

from cp_core import comm
from cp_core.kernels import conv1d, ssd
from cp_core.kernels.reference import conv1d_ref, ssd_recurrent_ref
from cp_core.layout import positions, shard
from cp_core.mixer import Mamba2Config, Mamba2Mixer

NAN = float("nan")


def _ssd_inputs(b, l, h=4, p=3, g=2, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen, dtype=torch.float64)
    dt = torch.randn(b, l, h, generator=gen, dtype=torch.float64)
    A = -torch.rand(h, generator=gen, dtype=torch.float64) - 0.2
    B = torch.randn(b, l, g, n, generator=gen, dtype=torch.float64)
    C = torch.randn(b, l, g, n, generator=gen, dtype=torch.float64)
    D = torch.randn(h, generator=gen, dtype=torch.float64)
    bias = torch.randn(h, generator=gen, dtype=torch.float64)
    return dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=bias)


SEQ = torch.tensor([[0] * 7 + [1] * 5 + [2] * 4], dtype=torch.int32)  # documents share chunks of 8


def _run_ssd(inp, seq_idx, gy=None, **kw):
    ts = {k: v.clone().requires_grad_() for k, v in inp.items()}
    y = ssd(
        ts["x"],
        ts["dt"],
        ts["A"],
        ts["B"],
        ts["C"],
        chunk_size=8,
        D=ts["D"],
        dt_bias=ts["dt_bias"],
        seq_idx=seq_idx,
        backend="torch",
        **kw,
    )
    y.backward(torch.ones_like(y) if gy is None else gy)
    return y.detach(), {k: v.grad for k, v in ts.items()}


@pytest.mark.parametrize(
    "name, value", [("x", NAN), ("dt", NAN), ("B", float("inf")), ("C", NAN), ("x", -float("inf"))]
)
def test_torch_ssd_keeps_a_bad_value_in_its_document(name, value):
    inp = _ssd_inputs(1, 16)
    bad = {k: v.clone() for k, v in inp.items()}
    j0 = 4  # document 0 is tokens 0..6
    bad[name][0, j0].view(-1)[0] = value
    y, grads = _run_ssd(bad, SEQ)
    y_clean, grads_clean = _run_ssd(inp, SEQ)
    rec = ssd_recurrent_ref(
        bad["x"], bad["dt"], bad["A"], bad["B"], bad["C"], D=bad["D"], dt_bias=bad["dt_bias"], seq_idx=SEQ
    )
    other = slice(7, 16)
    assert torch.equal(y[:, other], y_clean[:, other])  # other documents: exactly as without the NaN
    assert torch.allclose(y[:, :j0], y_clean[:, :j0], rtol=0, atol=0)  # its earlier tokens too
    assert not torch.isfinite(y[:, j0:7]).any()  # the document from the bad token on
    # the recurrence (the specification) agrees outside [j0, end of document 0), and is not finite at j0
    keep = torch.ones(16, dtype=torch.bool)
    keep[j0:7] = False
    assert torch.allclose(y[:, keep], rec[:, keep], rtol=1e-12, atol=1e-12)
    assert not torch.isfinite(rec[:, j0]).all()
    for k in ("x", "dt", "B", "C"):
        assert torch.equal(grads[k][:, other], grads_clean[k][:, other]), k
        assert not torch.isfinite(grads[k][:, :7]).any(), k  # the whole document's gradients are NaN
    for k in ("A", "D", "dt_bias"):  # shared over documents: NaN, as autograd of the recurrence gives
        assert torch.isnan(grads[k]).all(), k


def test_torch_ssd_bad_upstream_gradient_stays_in_its_document():
    inp = _ssd_inputs(1, 16)
    gy = torch.ones(1, 16, 4, 3, dtype=torch.float64)
    gy_bad = gy.clone()
    gy_bad[0, 9, 1, 2] = NAN  # document 1
    _, grads = _run_ssd(inp, SEQ, gy_bad)
    _, clean = _run_ssd(inp, SEQ, gy)
    for k in ("x", "dt", "B", "C"):
        for docs in (slice(0, 7), slice(12, 16)):
            assert torch.equal(grads[k][:, docs], clean[k][:, docs]), k
        assert not torch.isfinite(grads[k][:, 7:12]).any()


def test_torch_ssd_rows_initial_and_final_states():
    """Without seq_idx every row is a document: a NaN in row 0 leaves row 1 alone and the tokens before
    it; a NaN initial state of row 0 poisons row 0's first document only; final states follow."""
    inp = _ssd_inputs(2, 16)
    bad = {k: v.clone() for k, v in inp.items()}
    bad["x"][0, 10] = NAN
    y, _ = _run_ssd(bad, None)
    y_clean, _ = _run_ssd(inp, None)
    assert torch.equal(y[1], y_clean[1]) and torch.equal(y[0, :10], y_clean[0, :10])
    assert not torch.isfinite(y[0, 10:]).any()
    init = torch.randn(1, 4, 3, 5, dtype=torch.float64)
    init_bad = init.clone()
    init_bad[0, 0, 0, 0] = NAN
    seq = SEQ
    outs = []
    for s in (init, init_bad):
        x = inp["x"][:1]
        outs.append(
            ssd(
                x,
                inp["dt"][:1],
                inp["A"],
                inp["B"][:1],
                inp["C"][:1],
                chunk_size=8,
                D=inp["D"],
                dt_bias=inp["dt_bias"],
                seq_idx=seq,
                initial_states=s,
                return_final_states=True,
                backend="torch",
            )
        )
    (yc, fc), (yb, fb) = outs
    assert not torch.isfinite(yb[:, :7]).any() and torch.equal(yb[:, 7:], yc[:, 7:]) and torch.equal(fb, fc)


def test_torch_conv_keeps_a_bad_value_in_its_document():
    seq = torch.tensor([[0] * 5 + [1] * 6], dtype=torch.int32)
    x = randn((1, 11, 8), 1, torch.float64)
    w, b = randn((8, 4), 2, torch.float64), randn((8,), 3, torch.float64)
    xb = x.clone()
    xb[0, 4, 3] = NAN  # last token of document 0: its taps reach 3 tokens of document 1 without a mask
    outs = []
    for xi, nan_grad in ((x, False), (xb, True)):
        xi = xi.clone().requires_grad_()
        y = conv1d(xi, w, b, seq_idx=seq, backend="torch")
        gy = torch.ones_like(y)
        if nan_grad:
            gy[0, 0, 0] = NAN  # an upstream gradient of document 0
        y.backward(gy)
        outs.append((y.detach(), xi.grad))
    (yc, gc), (yb, gb) = outs
    assert torch.equal(yb[:, 5:], yc[:, 5:]) and torch.equal(yb[:, :4], yc[:, :4])
    assert torch.equal(gb[:, 5:], gc[:, 5:])  # the NaN upstream gradient of token 0 stays in document 0
    assert torch.equal(conv1d_ref(xb, w, b, seq_idx=seq)[:, 5:], yc[:, 5:])


# ----------------------------------------------------------------------------- the mixer, every strategy

CFG = dict(d_model=16, n_heads=4, head_dim=4, n_groups=2, d_state=4, d_conv=4, chunk_size=8)


def isolation_case(
    group,
    strategy,
    layout,
    packed,
    device="cpu",
    ssd_backend="auto",
    tol=(1e-6, 1e-7),
    first=False,
    units=None,
    cp_group=None,
):
    """A NaN in one token of document 0 (or batch row 0): every other document's outputs and input
    gradients equal those of the clean batch; document 0's tokens before it too; from it on, non-finite.
    ``tol``: (rtol, atol) of "equal" (the two runs differ only in the NaN; on CUDA some kernels reduce
    in a run-dependent order). ``first``: the NaN in the very first token (rank 0's local token 0, which
    the state-passing halo and tail lookups read for slots outside a piece before they are selected away).
    ``units``: the packed documents' lengths in multiples of ``g`` (default 3, 0, 2, 1). ``cp_group``: the
    layer's CP group when it is not ``group`` (a grid), ``group`` then spanning its ranks for the verdict."""
    cp_group = group if cp_group is None else cp_group
    cp, r = comm.group_size(cp_group), comm.group_rank(cp_group)
    strategy, _, exchange = strategy.partition(":")
    g = 4 * cp  # a multiple of granule(layout, cp), of 4 tokens at least
    if packed:
        units = units or [3, 0, 2, 1]
        cu = cu_from_lengths([n * g for n in units])
        total = int(cu[-1])
        x = randn((total, 16), 4)
        j0 = 0 if first else (2 * g) + 1  # in document 0, past its first segments when sharded
        x_bad = x.clone()
        x_bad[j0, 5] = NAN
        pos = positions(cp, layout, length=total, cu_seqlens=cu, ranks=r)
        doc0 = pos < units[0] * g
    else:
        cu = None
        x = randn((2, 3 * g, 16), 4)
        j0 = 0 if first else 2 * g + 1
        x_bad = x.clone()
        x_bad[0, j0, 5] = NAN
        pos = positions(cp, layout, length=3 * g, ranks=r)
    m = Mamba2Mixer(
        Mamba2Config(**CFG),
        cp_group=cp_group,
        layout=layout,
        strategy=strategy,
        state_exchange=exchange or "allgather",
        device=device,
        ssd_backend=ssd_backend,
    )
    m.reset_parameters(torch.Generator().manual_seed(3))
    w = randn(x.shape, 5).to(device)
    cu_dev = None if cu is None else cu.to(device)
    res = []
    for xi in (x, x_bad):
        xl = shard(xi.to(device), r, cp, layout, cu_dev).requires_grad_()
        y = m(xl, cu_dev)
        y.backward(shard(w, r, cp, layout, cu_dev))
        res.append((y.detach().cpu(), xl.grad.cpu()))
    rtol, atol = tol
    (yc, gc), (yb, gb) = res
    if packed:
        other, before, after = ~doc0, doc0 & (pos < j0), doc0 & (pos >= j0)
        sel = lambda t, m_: t[m_]  # noqa: E731
    else:
        other = before = after = None
    checks = {}
    if packed:
        checks["other documents: outputs"] = torch.allclose(
            sel(yb, other), sel(yc, other), rtol=1e-6, atol=1e-7
        )
        checks["other documents: input grads"] = torch.allclose(
            sel(gb, other), sel(gc, other), rtol=1e-6, atol=1e-7
        )
        checks["earlier tokens"] = torch.allclose(sel(yb, before), sel(yc, before), rtol=rtol, atol=atol)
        checks["from the NaN on"] = not torch.isfinite(sel(yb, after)).any()
    else:
        checks["other rows: outputs"] = torch.allclose(yb[1], yc[1], rtol=rtol, atol=atol)
        checks["other rows: input grads"] = torch.allclose(gb[1], gc[1], rtol=rtol, atol=atol)
        checks["earlier tokens"] = torch.allclose(yb[0][pos < j0], yc[0][pos < j0], rtol=rtol, atol=atol)
        checks["from the NaN on"] = not torch.isfinite(yb[0][pos >= j0]).any()
    bad = sorted(k for k, v in checks.items() if not v)
    return verdict(not bad, group), bad


@pytest.mark.parametrize(
    "cp, strategy, layout, packed",
    [
        (1, "hidden", "head_tail", True),
        (1, "hidden", "head_tail", False),
        (2, "hidden", "head_tail", True),
        (2, "hidden", "contiguous", False),
        (2, "state_passing", "head_tail", True),
        (2, "state_passing:chain", "contiguous", True),
        (4, "state_passing", "head_tail", True),
        (4, "state_passing", "contiguous", False),
    ],
)
def test_mixer_keeps_a_nan_in_its_document(ranks, cp, strategy, layout, packed):
    for r, (ok, bad) in enumerate(ranks.run(isolation_case, cp, strategy, layout, packed)):
        assert ok, f"rank {r}: {bad}"


@pytest.mark.parametrize(
    "strategy, layout", [("state_passing", "head_tail"), ("state_passing:chain", "contiguous")]
)
def test_state_passing_rows_of_documents_keep_a_nan_in_its_document(ranks, strategy, layout):
    """Documents of one length run as rows of pieces (no seq_idx): still isolated."""
    for first in (False, True):
        for r, (ok, bad) in enumerate(
            ranks.run(isolation_case, 2, strategy, layout, True, first=first, units=[3, 3, 3])
        ):
            assert ok, f"rank {r}, first={first}: {bad}"


@pytest.mark.parametrize(
    "strategy, layout", [("state_passing", "head_tail"), ("state_passing:chain", "contiguous")]
)
def test_state_passing_lookups_never_read_a_nan(ranks, strategy, layout):
    """A NaN in the very first token: the tail and halo slots outside a piece read token 0 and select it away."""
    for r, (ok, bad) in enumerate(ranks.run(isolation_case, 2, strategy, layout, True, first=True)):
        assert ok, f"rank {r}: {bad}"
