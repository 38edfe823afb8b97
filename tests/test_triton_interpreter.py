"""The Triton kernels (layout, state correction) run on CPU under Triton's interpreter (``TRITON_INTERPRET=1``) and must equal
the torch references bit for bit. This covers them without a GPU; the GPU tests cover the compiled kernels."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import torch
    from cp_core.channels import ChannelPlan, mamba_channel_plan, pack_torch, unpack_torch
    from cp_core.kernels import gather_triton as g

    torch.manual_seed(0)
    for cp, nh, hd, ng, ds, with_z in [(2, 8, 4, 1, 8, True), (8, 16, 16, 8, 16, True),
                                       (8, 8, 8, 2, 16, False), (4, 8, 16, 4, 8, False), (2, 6, 3, 2, 5, True)]:
        p = mamba_channel_plan(cp, nh, hd, ng, ds, with_z=with_z)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(37, p.in_width + 7).to(dtype)[:, 7:]  # row-strided, like a slice of in_proj's output
            assert torch.equal(g.pack(x, p), pack_torch(x, p)), (cp, nh, hd, ng, ds, with_z, dtype)
            if not p.replicated:
                s = torch.randn(cp, 37, p.local_width).to(dtype)
                assert torch.equal(g.unpack(s, p), unpack_torch(s, p))
        out = ChannelPlan.single(cp, 12)
        s = torch.randn(cp, 9, 12)
        assert torch.equal(g.unpack(s, out), unpack_torch(s, out))
    for width in (1, 6, 96, 2320):
        xr = torch.randn(50, width).to(torch.bfloat16)
        idx = torch.randint(0, 50, (70,))
        assert torch.equal(g.gather_rows(xr, idx), xr.index_select(0, idx))
    from cp_core.kernels import correction as corr
    from cp_core.kernels import correction_triton as ct

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))

    # the per-piece products (fp16: the interpreter's bf16 dots are wrong), one superblock per piece and several
    for lengths, H, P, G, N, dtype, tol, sb in [([5, 0, 37, 2, 70], 4, 4, 2, 8, torch.float32, 1e-5, 2048),
                                                 ([130, 3, 0], 8, 16, 2, 16, torch.float16, 2e-3, 64),
                                                 ([1], 2, 5, 1, 3, torch.float32, 1e-5, 2048)]:
        ct.SUPERBLOCK = sb
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        tab = corr.PieceTable(starts, lengths, "cpu")
        T, Pc = sum(lengths), len(lengths)
        u = torch.randn(T, H, P).to(dtype)
        v = torch.randn(T, 3 * G * N).to(dtype)[:, G * N : 2 * G * N].reshape(T, G, N)  # strided, like the layer's
        M, s, dv0 = torch.randn(Pc, H, P, N), torch.rand(H, T), torch.randn(T, G, N).to(dtype)
        res = []
        for be in ("torch", "triton"):
            out = corr.apply(u, v, M, s, tab, backend=be)
            dv, g = corr.tapply(u, v, M, s, tab, dv=dv0.clone(), accumulate=True, backend=be)
            res.append((out, dv, g, corr.outer(u, v, s, tab, backend=be)))
        for name, a, b in zip(("apply", "tapply dv", "tapply g", "outer"), *res):
            assert a.dtype == b.dtype and rel(a, b) <= tol, (lengths, dtype, name, rel(a, b))
    # a NaN in piece 0 (a token, its matrix, the scale) leaves the other pieces bit for bit
    ct.SUPERBLOCK = 2048
    tab = corr.PieceTable([0, 70, 103], [70, 33, 40], "cpu")
    u, v, M, s = torch.randn(143, 4, 16), torch.randn(143, 2, 16), torch.randn(3, 4, 16, 16), torch.rand(4, 143)
    runs = []
    for bad in (False, True):
        uu, vv, MM, ss = (t.clone() for t in (u, v, M, s))
        if bad:
            uu[5, 1, 2] = vv[9, 0, 0] = MM[0, 0, 0, 0] = ss[1, 11] = float("nan")
        dv, g = corr.tapply(uu, vv, MM, ss, tab, backend="triton")
        runs.append((corr.apply(uu, vv, MM, ss, tab, backend="triton")[70:], dv[70:], g[:, 70:],
                     corr.outer(uu, vv, ss, tab, backend="triton")[1:]))
    for name, clean, bad in zip(("apply", "tapply dv", "tapply g", "outer"), *runs):
        assert torch.equal(bad, clean), name
    print("ok")
    """
)


def test_triton_kernels_match_torch_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


LAYER = textwrap.dedent(
    """
    import contextlib, types
    import torch
    # mamba-ssm's wrappers enter the tensor's CUDA device and read its SM count: neither exists on CPU
    torch.cuda.device = lambda i: contextlib.nullcontext()
    torch.cuda.get_device_properties = lambda d: types.SimpleNamespace(multi_processor_count=4)
    from cp_core.comm import LocalGroup
    from cp_core import state_passing as sp
    from cp_core.kernels.ssd_mamba import load_submodule
    from cp_core.kernels.ssd_phases import SSDForward, ssd_backward
    from cp_core.mixer import Mamba2Config, Mamba2Mixer

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))

    # mamba-ssm's SSD in two phases: its combined forward and backward, bit for bit
    mod = load_submodule("mamba_ssm.ops.triton.ssd_combined")[0]
    g = torch.Generator().manual_seed(0)
    b, l, h, p, ng, n, cs = 2, 40, 4, 4, 2, 8, 16
    x, dt, B, C = (torch.randn(*s, generator=g) for s in ((b, l, h, p), (b, l, h), (b, l, ng, n), (b, l, ng, n)))
    A, D, bias = -torch.rand(h, generator=g) - 0.5, torch.randn(h, generator=g), torch.randn(h, generator=g)
    f = SSDForward("mamba_ssm", x, dt, A, B, C, cs, D=D, dt_bias=bias)
    fin, y = f.states(), f.outputs()
    ref = mod._mamba_chunk_scan_combined_fwd(x, dt, A, B, C, cs, D=D, dt_bias=bias, dt_softplus=True)
    assert torch.equal(y, ref[0]) and torch.equal(fin, ref[5])
    dy, dfin = torch.randn(b, l, h, p, generator=g), torch.randn(b, h, p, n, generator=g)
    bufs = [torch.empty_like(t) for t in (x, dt, B, C)]
    dA, dD, dbias = ssd_backward("mamba_ssm", dy, x, dt, A, B, C, cs, D, bias, None, dx=bufs[0], ddt=bufs[1],
                                 dB=bufs[2], dC=bufs[3], dfinal=lambda: dfin)
    want = mod._mamba_chunk_scan_combined_bwd(dy, x, dt, A, B, C, ref[0], cs, D=D, dt_bias=bias, dfinal_states=dfin,
                                              dt_softplus=True)
    for a, w in zip((bufs[0], bufs[1], dA, bufs[2], bufs[3], dD, dbias), [want[i] for i in (0, 1, 2, 3, 4, 5, 7)]):
        assert torch.equal(a, w)

    # the whole state-passing layer on those kernels (two segments of every document on one rank, so the
    # exchange carries a state) against the torch kernels: rows (batch) and one row of documents (packed)
    cfg = Mamba2Config(d_model=16, n_heads=4, head_dim=4, n_groups=2, d_state=16, d_conv=4, chunk_size=16)
    real = sp._backends
    for cu in (None, torch.tensor([0, 20, 20, 52], dtype=torch.int32)):
        xs = torch.randn(52, 16, generator=g) if cu is not None else torch.randn(2, 34, 16, generator=g)
        outs = []
        for fast in (False, True):
            m = Mamba2Mixer(cfg, strategy="state_passing")
            m.reset_parameters(torch.Generator().manual_seed(1))
            m.cp_group = LocalGroup(0, 1)
            sp._backends = (lambda *a: ("mamba_ssm", "torch")) if fast else real
            xi = xs.clone().requires_grad_()
            yi = sp.state_passing_layer(m, xi, cu, correction_backend="triton" if fast else "torch")
            yi.square().sum().backward()
            outs.append([yi, xi.grad] + [q.grad for q in m.parameters()])
        sp._backends = real
        for i, (a, w) in enumerate(zip(*outs)):
            assert rel(a, w) <= 1e-5, (cu is not None, i, rel(a, w))
    print("ok")
    """
)


def test_state_passing_layer_on_the_triton_kernels_under_the_interpreter():
    """mamba-ssm's SSD in two phases (bit for bit its combined forward and backward) and the state-passing layer
    on it and the Triton per-piece products, against the torch kernels (CPU, ``TRITON_INTERPRET=1``)."""
    env = dict(os.environ, TRITON_INTERPRET="1", MAMBA_DETERMINISTIC="1")
    # a sweep run earlier in this process sets it; cached autotuning benchmarks, which the interpreter cannot
    env.pop("TRITON_CACHE_AUTOTUNING", None)
    import importlib.util

    for need in ("mamba_ssm", "einops"):  # einops: mamba-ssm's Triton modules import it
        if importlib.util.find_spec(need) is None:
            pytest.skip(f"{need} is not installed (pip install --no-deps mamba-ssm runs this on CPU)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [sys.executable, "-c", LAYER], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
