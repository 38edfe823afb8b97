"""The mixer on CUDA: fast kernels vs the portable torch path, and CP parity with 2 ranks sharing one GPU.

NCCL refuses two ranks on one GPU, so the parity runs over gloo with CUDA tensors (the kernels are
the real CUDA ones; only the transport differs from a multi-GPU run). Marked ``gpu``: skipped without CUDA.
"""

import pytest
import torch
from cases import cu_from_lengths, randn
from test_mixer_parity import check, parity_case, rel_rms

from cp_core.mixer import Mamba2Config, Mamba2Mixer

pytestmark = pytest.mark.gpu

CFG = dict(d_model=256, n_heads=8, head_dim=64, n_groups=2, d_state=64, d_conv=4, chunk_size=64)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixer_cuda_matches_torch_backends(packed, dtype):
    cfg = Mamba2Config(**CFG)
    layers = []
    for ssd, conv in (("auto", "auto"), ("torch", "torch")):
        m = Mamba2Mixer(cfg, ssd_backend=ssd, conv_backend=conv, device="cuda", dtype=dtype)
        m.reset_parameters(torch.Generator().manual_seed(0))
        layers.append(m)
    cu = cu_from_lengths([256, 0, 512, 256]).cuda() if packed else None
    x = randn((1024, 256) if packed else (2, 512, 256), 1, dtype).cuda()
    outs = []
    for m in layers:
        xi = x.clone().requires_grad_()
        y = m(xi, cu)
        y.float().square().sum().backward()
        outs.append((y, xi.grad, [p.grad for p in m.parameters()], dict(m.backends)))
    fast, ref = outs
    tol = 5e-3 if dtype == torch.float32 else 2e-2  # Triton SSD uses tf32 dots
    assert fast[3]["ssd"] == "mamba_ssm", fast[3]
    assert rel_rms(fast[0], ref[0]) < tol and rel_rms(fast[1], ref[1]) < tol
    for a, b in zip(fast[2], ref[2], strict=True):
        assert rel_rms(a, b) < tol


@pytest.mark.parametrize("strategy", ["hidden", "state_passing"])
@pytest.mark.parametrize("fmt", ["bshd", "thd"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cp2_parity_on_one_gpu(ranks, strategy, fmt, dtype):
    batch, n_docs = (2, None) if fmt == "bshd" else (1, 5)
    cfg = dict(CFG, d_model=64, head_dim=16, d_state=16, chunk_size=16)
    check(
        ranks.run(
            parity_case,
            2,
            cfg,
            "head_tail",
            batch,
            n_docs,
            dtype,
            strategy,
            units=8,
            device="cuda",
            tol32=2e-3,
        )
    )
