"""The training-step properties on CUDA (mamba-ssm's Triton SSD and norm, causal-conv1d): autocast bf16/fp16 is
the bf16/fp16-parameter layer to the bit, cp 1 and cp 2 (two ranks sharing one GPU over gloo); the compiled
op's fake agrees with the op (the Triton norm's statistics included) and compiled equals eager; with
saved-tensor hooks the core keeps nothing on its node. Marked ``gpu``: skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from test_compile import _opcheck_case
from test_training_step import CFG_GPU, _autocast_case, _held_on_ctx, layer

from cp_core import compiled

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["hidden", "state_passing"])
@pytest.mark.parametrize("cp", [1, 2])
def test_autocast_on_cuda_is_the_low_precision_layer(ranks, cp, kind, amp):
    if cp == 1 and kind != "hidden":
        pytest.skip("cp 1 runs one core for every strategy")
    for ok, bad in ranks.run(_autocast_case, cp, kind, True, torch.float32, amp, "cuda"):
        assert ok, bad


def test_compiled_op_on_cuda():
    """Inductor on CUDA: the op's fake (Triton norm statistics, head chunks) agrees with the op, and the
    compiled layer equals the eager one."""
    m = layer(None, "hidden", torch.bfloat16, device="cuda")
    x = torch.randn(2, 256, CFG_GPU.d_model, device="cuda", dtype=torch.bfloat16)
    w = m.weights()
    params = [t.detach().clone().requires_grad_() for t in m._local_slices(w)]
    ws = [t.detach().clone().requires_grad_() for t in (w.in_proj, w.norm, w.out_proj)]
    xr = x.clone().requires_grad_()
    torch.library.opcheck(compiled.mamba2_layer, (xr, ws[0], *params, ws[1], ws[2], None, m._uid, False))
    cm = torch.compile(m)
    res = []
    for fn in (cm, m):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.float().square().sum().backward()
        res.append([y.detach(), xi.grad] + [p.grad.clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*res, strict=True))


def test_checkpointing_keeps_nothing_on_the_node_on_cuda():
    m = layer(None, "hidden", torch.bfloat16, device="cuda")
    x = torch.randn(1, 512, CFG_GPU.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        y = m(x)
    assert _held_on_ctx(y.grad_fn) == []
    y.sum().backward()


@pytest.mark.parametrize("cp, packed", [(1, True), (2, False)])
def test_opcheck_on_cuda_ranks(ranks, cp, packed):
    assert all(ranks.run(_opcheck_case, cp, packed, "cuda"))
