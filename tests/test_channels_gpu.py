"""The Triton channel pack/unpack against the torch reference, bit for bit (CUDA only)."""

import pytest
import torch

from cp_core.channels import ChannelPlan, mamba_channel_plan, pack_torch, unpack_torch
from cp_core.kernels import gather_triton

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "cp, nh, hd, ng, ds, with_z",
    [(2, 8, 4, 1, 8, True), (4, 8, 16, 4, 8, False), (8, 16, 64, 8, 128, True), (8, 8, 8, 2, 16, False)],
)
def test_triton_pack_unpack_match_torch(cp, nh, hd, ng, ds, with_z, dtype):
    plan = mamba_channel_plan(cp, nh, hd, ng, ds, with_z=with_z)
    full = torch.randn(1000, plan.in_width + 7, device="cuda").to(dtype)
    x = full[:, 7:]  # a row-strided view, as the mixer passes a slice of in_proj's output
    assert torch.equal(gather_triton.pack(x, plan), pack_torch(x, plan))
    out = ChannelPlan.single(cp, 96)
    s = torch.randn(cp, 1000, 96, device="cuda").to(dtype)
    assert torch.equal(gather_triton.unpack(s, out), unpack_torch(s, out))
    if not plan.replicated:
        s = torch.randn(cp, 1000, plan.local_width, device="cuda").to(dtype)
        assert torch.equal(gather_triton.unpack(s, plan), unpack_torch(s, plan))


@pytest.mark.parametrize("width", [1, 6, 96, 2320, 5000])
def test_triton_gather_rows_matches_index_select(width):
    x = torch.randn(777, width, device="cuda").to(torch.bfloat16)
    idx = torch.randint(0, 777, (1000,), device="cuda")
    assert torch.equal(gather_triton.gather_rows(x, idx), x.index_select(0, idx))


def test_gather_rows_is_differentiable():
    from cp_core.channels import gather_rows

    x = torch.randn(50, 24, device="cuda", requires_grad=True)
    idx = torch.randint(0, 50, (80,), device="cuda")
    w = torch.randn(80, 24, device="cuda")
    (gather_rows(x, idx) * w).sum().backward()
    want = torch.zeros(50, 24, device="cuda").index_add_(0, idx, w)
    torch.testing.assert_close(x.grad, want)
