"""CUDA tests of cp_core.kernels: the fast kernels against the torch ones (skipped without CUDA).

The first call of mamba-ssm's Triton kernels per shape and dtype autotunes (minutes for forward and
backward); ``MAMBA_DETERMINISTIC=1`` in the environment makes mamba-ssm pick one config per kernel
and the run short. Shapes are few and small for that reason.
"""

from __future__ import annotations

import pytest
import torch

from cp_core.kernels import conv1d, conv_cuda, resolve_backends, ssd, ssd_mamba

pytestmark = pytest.mark.gpu

RTOL = {torch.float32: 5e-3, torch.bfloat16: 2e-2}  # ||a - b|| / ||b||; fp32 runs as tf32 in Triton


def need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def need(mod, what):
    need_cuda()
    ok, reason = mod.available()
    if not ok:
        pytest.skip(f"{what} unavailable: {reason}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def seq_from_lengths(rows, device):
    out = []
    for lens in rows:
        ids = []
        for d, n in enumerate(lens):
            ids += [d] * n
        out.append(ids)
    return torch.tensor(out, dtype=torch.int32, device=device)


def test_resolve_auto_on_cuda():
    need_cuda()
    want = (
        "mamba_ssm" if ssd_mamba.available()[0] else "torch",
        "causal_conv1d" if conv_cuda.available()[0] else "torch",
    )
    assert resolve_backends("cuda") == want
    assert resolve_backends("cuda", "torch", "torch") == ("torch", "torch")


# ----------------------------------------------------------------------------------------------------
# SSD: mamba-ssm vs torch


def ssd_case(dtype, *, docs, init, D_shape, seed):
    b, l, h, p, g, n, chunk = 2, 200, 8, 32, 2, 32, 64
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, device=dev) * scale + shift).to(dt)

    f32 = torch.float32
    inp = dict(
        x=rnd(b, l, h, p),
        dt=rnd(b, l, h, scale=0.5, shift=-2.0),
        B=rnd(b, l, g, n),
        C=rnd(b, l, g, n),
        # parameters stay float32, as in a Mamba2 layer
        A=-torch.exp(torch.rand(h, generator=gen, device=dev) - 0.5),
        D=rnd(h, dt=f32) if D_shape == "h" else rnd(h, p, dt=f32),
        dt_bias=rnd(h, scale=0.5, dt=f32),
        initial_states=rnd(b, h, p, n, dt=f32) if init else None,
    )
    # boundaries on a chunk boundary (64), several inside chunk 1, one in the padded last chunk
    seq = seq_from_lengths([[64, 30, 3, 1, 50, 52], [190, 10]], dev) if docs else None
    gy = torch.randn(b, l, h, p, generator=gen, device=dev)
    gf = torch.randn(b, h, p, n, generator=gen, device=dev)
    return inp, seq, chunk, gy, gf


def ssd_fwd_bwd(inp, seq, chunk, gy, gf, backend, upcast=False):
    leaves = {}
    for k, v in inp.items():
        if v is None:
            leaves[k] = None
            continue
        leaves[k] = (v.double() if upcast else v).detach().clone().requires_grad_(True)
    y, fs = ssd(
        leaves["x"],
        leaves["dt"],
        leaves["A"],
        leaves["B"],
        leaves["C"],
        chunk_size=chunk,
        D=leaves["D"],
        dt_bias=leaves["dt_bias"],
        seq_idx=seq,
        initial_states=leaves["initial_states"],
        return_final_states=True,
        backend=backend,
    )
    ((y.double() * gy.double()).sum() + (fs.double() * gf.double()).sum()).backward()
    grads = {k: v.grad for k, v in leaves.items() if v is not None}
    return y, fs, grads


@pytest.mark.parametrize(
    "dtype,docs,init,D_shape",
    [
        (torch.float32, True, True, "h"),
        (torch.bfloat16, True, True, "hp"),
        (torch.float32, False, False, "hp"),
    ],
)
def test_ssd_mamba_matches_torch(dtype, docs, init, D_shape):
    need(ssd_mamba, "mamba-ssm")
    inp, seq, chunk, gy, gf = ssd_case(dtype, docs=docs, init=init, D_shape=D_shape, seed=1)
    y, fs, grads = ssd_fwd_bwd(inp, seq, chunk, gy, gf, "mamba_ssm")
    # the torch SSD in float64 on the same (already rounded) inputs is the yardstick
    yr, fsr, gr = ssd_fwd_bwd(inp, seq, chunk, gy, gf, "torch", upcast=True)
    assert y.dtype == dtype and fs.dtype == torch.float32
    errs = {"y": rel_err(y, yr), "final_states": rel_err(fs, fsr)}
    errs.update({f"d{k}": rel_err(grads[k], gr[k]) for k in gr})
    tol = RTOL[dtype]
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"
    # the torch backend in the input dtype meets the same bar
    yt, fst, gt = ssd_fwd_bwd(inp, seq, chunk, gy, gf, "torch")
    assert rel_err(yt, yr) <= tol and rel_err(fst, fsr) <= tol
    assert all(rel_err(gt[k], gr[k]) <= tol for k in gr)


def test_ssd_torch_cuda_matches_cpu():
    need_cuda()
    inp, seq, chunk, gy, gf = ssd_case(torch.float32, docs=True, init=True, D_shape="h", seed=2)
    y, fs = ssd(
        **{k: v for k, v in inp.items() if k in ("x", "dt", "A", "B", "C")},
        chunk_size=chunk,
        D=inp["D"],
        dt_bias=inp["dt_bias"],
        seq_idx=seq,
        initial_states=inp["initial_states"],
        return_final_states=True,
        backend="torch",
    )
    cpu = {k: (v.cpu() if v is not None else None) for k, v in inp.items()}
    yc, fsc = ssd(
        cpu["x"],
        cpu["dt"],
        cpu["A"],
        cpu["B"],
        cpu["C"],
        chunk_size=chunk,
        D=cpu["D"],
        dt_bias=cpu["dt_bias"],
        seq_idx=seq.cpu(),
        initial_states=cpu["initial_states"],
        return_final_states=True,
    )
    assert rel_err(y.cpu(), yc) <= 1e-5 and rel_err(fs.cpu(), fsc) <= 1e-5


# ----------------------------------------------------------------------------------------------------
# conv1d: causal-conv1d vs torch


def conv_case(dtype, seed, c=64, k=4):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    b, l = 2, 300
    x = torch.randn(b, l, c, generator=gen, device="cuda").to(dtype)
    w = torch.randn(c, k, generator=gen, device="cuda") * 0.5
    bias = torch.randn(c, generator=gen, device="cuda")
    seq = seq_from_lengths([[1, 2, 3, 100, 194], [300]], "cuda")  # documents shorter than k
    gy = torch.randn(b, l, c, generator=gen, device="cuda")
    return x, w, bias, seq, gy


def conv_fwd_bwd(x, w, bias, seq, gy, backend, activation="silu", upcast=False):
    leaves = [(t.double() if upcast else t).detach().clone().requires_grad_(True) for t in (x, w, bias)]
    y = conv1d(*leaves, seq_idx=seq, activation=activation, backend=backend)
    (y.double() * gy.double()).sum().backward()
    return y, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", None])
def test_causal_conv1d_matches_torch(dtype, activation):
    need(conv_cuda, "causal-conv1d")
    x, w, bias, seq, gy = conv_case(dtype, seed=3)
    wq = w.to(dtype).float()  # the kernel runs with the weight in x's dtype; compare on that weight
    bq = bias.to(dtype).float()
    y, grads = conv_fwd_bwd(x, wq, bq, seq, gy, "causal_conv1d", activation)
    yr, gr = conv_fwd_bwd(x, wq, bq, seq, gy, "torch", activation, upcast=True)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else RTOL[dtype]
    errs = {"y": rel_err(y, yr)}
    errs.update({f"d{n}": rel_err(g, r) for n, g, r in zip(("x", "weight", "bias"), grads, gr, strict=True)})
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errs})"


def test_conv_auto_falls_back_for_unsupported_shapes():
    need_cuda()
    x, w, bias, seq, gy = conv_case(torch.float32, seed=4, c=12, k=5)  # c % 8 != 0, k > 4
    y = conv1d(x, w, bias, seq_idx=seq)  # auto: torch
    yr = conv1d(x.cpu(), w.cpu(), bias.cpu(), seq_idx=seq.cpu())
    assert rel_err(y.cpu(), yr) <= 1e-6
    if conv_cuda.available()[0]:
        with pytest.raises(ValueError, match="channels % 8"):
            conv1d(x, w, bias, backend="causal_conv1d")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_torch_cuda_matches_cpu(dtype):
    need_cuda()
    x, w, bias, seq, gy = conv_case(dtype, seed=5)
    y, grads = conv_fwd_bwd(x, w, bias, seq, gy, "torch")
    yc, gc = conv_fwd_bwd(x.cpu(), w.cpu(), bias.cpu(), seq.cpu(), gy.cpu(), "torch")
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(y.cpu(), yc) <= tol
    for g, r in zip(grads, gc, strict=True):
        assert rel_err(g.cpu(), r) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "lengths, H, P, G, N",
    [([1000, 0, 3000], 32, 64, 2, 128), ([77, 5, 1, 300], 4, 16, 1, 16), ([5], 6, 12, 3, 20)],
)
def test_piece_products_triton_match_torch(dtype, lengths, H, P, G, N):
    """The Triton per-piece products (the correction, its backward, the final states) against the fp32 torch
    reference, with pieces longer than a superblock (partial sums added in order)."""
    need_cuda()
    from cp_core.kernels import correction as corr

    gen = torch.Generator(device="cuda").manual_seed(0)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    tab = corr.PieceTable(starts, lengths, "cuda")
    T, Pc = sum(lengths), len(lengths)
    r = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    u = r(T, H, P).to(dtype)
    v = r(T, 3 * G * N).to(dtype)[:, G * N : 2 * G * N].reshape(T, G, N)  # strided, as the layer passes it
    M, s, dv0 = r(Pc, H, P, N) / N**0.5, torch.rand(H, T, device="cuda", generator=gen), r(T, G, N).to(dtype)
    res = []
    for be in ("torch", "triton"):
        out = corr.apply(u, v, M, s, tab, backend=be)
        dv, g = corr.tapply(u, v, M, s, tab, dv=dv0.clone(), accumulate=True, backend=be)
        res.append((out, dv, g, corr.outer(u, v, s, tab, backend=be)))
    tol = 2e-3 if dtype == torch.float32 else 1e-2  # tf32 dots; bf16 operands of the dots, one rounding
    for name, a, b in zip(("apply", "tapply dv", "tapply g", "outer"), *res, strict=True):
        assert a.dtype == b.dtype and rel_err(a, b) < tol, (name, rel_err(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("docs", [False, True])
def test_ssd_phases_equal_mamba_combined(dtype, docs):
    """mamba-ssm's SSD run in two phases (final states, then outputs) and its backward with the final states'
    gradient taken late: bit for bit ``_mamba_chunk_scan_combined_fwd`` / ``_bwd``."""
    need(ssd_mamba, "mamba-ssm")
    import os

    from cp_core.kernels.ssd_phases import SSDForward, ssd_backward

    mod = ssd_mamba.load_submodule("mamba_ssm.ops.triton.ssd_combined")[0]
    exact = os.environ.get("MAMBA_DETERMINISTIC") == "1"
    inp, seq, chunk, gy, gf = ssd_case(dtype, docs=docs, init=False, D_shape="h", seed=3)
    x, dt, A, B, C, D, bias = (inp[k] for k in ("x", "dt", "A", "B", "C", "D", "dt_bias"))
    f = SSDForward("mamba_ssm", x, dt, A, B, C, chunk, D=D, dt_bias=bias, seq_idx=seq)
    fin, y = f.states(), f.outputs()
    ref = mod._mamba_chunk_scan_combined_fwd(
        x, dt, A, B, C, chunk, D=D, dt_bias=bias, seq_idx=seq, dt_softplus=True
    )
    assert torch.equal(y, ref[0]) and torch.equal(fin, ref[5])
    gy = gy.to(dtype)
    bufs = [torch.empty_like(t) for t in (x, dt, B, C)]
    dA, dD, dbias = ssd_backward(
        "mamba_ssm", gy, x, dt, A, B, C, chunk, D, bias, seq, dx=bufs[0], ddt=bufs[1], dB=bufs[2], dC=bufs[3],
        dfinal=lambda: gf,
    )  # fmt: skip
    want = mod._mamba_chunk_scan_combined_bwd(
        gy, x, dt, A, B, C, ref[0], chunk, D=D, dt_bias=bias, dfinal_states=gf, seq_idx=seq, dt_softplus=True
    )
    for name, a, w in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "ddt_bias"), (*bufs[:2], dA, *bufs[2:], dD, dbias),
                          [want[i] for i in (0, 1, 2, 3, 4, 5, 7)], strict=True):  # fmt: skip
        # bit for bit where mamba-ssm reduces deterministically (MAMBA_DETERMINISTIC=1); else atomics
        assert torch.equal(a, w) if exact else rel_err(a, w) < 1e-6, (name, rel_err(a, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cp, k", [(2, 1), (2, 2), (4, 2)])
def test_norm_on_slots_triton_bit_identical_to_one_call(dtype, cp, k):
    """mamba-ssm's norm kernels on the returned slots, one launch per slot, give exactly what one call on
    the unpacked y gives: output, statistics, dz, the slots' dy and the recomputed output; the weight
    gradient to the rounding of its sum over other row blocks."""
    from test_kernels import _norm_slots_case

    from cp_core.kernels import norm

    need_cuda()
    if not norm.triton_available()[0]:
        pytest.skip("mamba-ssm's norm kernels unavailable")
    G, eps = 64, 1e-5
    ys, y, z, wt, dout, cols = _norm_slots_case(1000, cp, k, G, dtype, "cuda")
    out, rstd = norm.norm_fwd_slots(ys, cols, z, wt, eps, G, "triton")
    ref, rstd_ref = norm.norm_fwd(y, z, wt, eps, G, "triton")
    assert torch.equal(out, ref)
    M, w = y.shape[0], ys.shape[-1]
    for i, c in enumerate(cols):  # rstd is [group, row]
        assert torch.equal(rstd[i], rstd_ref[c // G * M : (c + w) // G * M]), i
    dz, dys = torch.empty_like(z), torch.empty_like(ys)
    dw, out2 = norm.norm_bwd_slots(dout, ys, cols, z, wt, rstd, eps, G, "triton", dz=dz, dx=dys)
    dz_ref = torch.empty_like(z)
    dy_ref, _, dw_ref, out_ref = norm.norm_bwd(
        dout, y, z, wt, rstd_ref, eps, G, "triton", dz=dz_ref, recompute_output=True
    )
    for i, c in enumerate(cols):
        assert torch.equal(dys[i], dy_ref[:, c : c + w]), i
    assert torch.equal(dz, dz_ref) and torch.equal(out2, out_ref)
    assert rel_err(dw.float(), dw_ref.float()) < (1e-6 if dtype == torch.float32 else 1e-2)
