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
    from cp_core.kernels.correction import state_correction_torch
    from cp_core.kernels.correction_triton import state_correction_triton

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))

    for R, L, H, P, G, N, dtype, tol in [(2, 37, 4, 4, 2, 8, torch.float32, 1e-5), (1, 64, 2, 5, 1, 3, torch.float32, 1e-5),
                                         (3, 130, 8, 16, 2, 16, torch.bfloat16, 1e-2), (1, 1, 2, 4, 2, 4, torch.float32, 1e-5)]:
        y0 = torch.randn(R, L, H, P).to(dtype)
        C = torch.randn(R, L, 3 * G * N).to(dtype)[..., G * N : 2 * G * N].reshape(R, L, G, N)  # strided, like the mixer's
        h0, acum = torch.randn(R, H, P, N), -torch.rand(R, H, L).cumsum(-1) * 0.1
        gy = torch.randn(R, L, H, P).to(dtype)
        res = []
        for fn in (state_correction_torch, state_correction_triton):
            ts = [t.clone().requires_grad_() for t in (y0, C, h0, acum)]
            y = fn(*ts)
            y.backward(gy)
            res.append([y] + [t.grad for t in ts])
        for name, a, b in zip(("y", "dy0", "dC", "dh0", "dacum"), *res):
            assert a.dtype == b.dtype and rel(a, b) <= tol, (R, L, H, P, G, N, dtype, name, rel(a, b))
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
