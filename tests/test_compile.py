"""``torch.compile``: the layer's forward traces as one graph with no break at cp 1 and under hidden CP (the
layer is one custom op, :mod:`cp_core.compiled`), computes what eager mode computes (output, input and
parameter gradients, a new ``cu_seqlens`` every batch, autocast), and its op's fake agrees with the real op
(``torch.library.opcheck``)."""

from __future__ import annotations

import pytest
import torch
from cases import cu_from_lengths, doc_lengths, randn, setting
from ranks import verdict

from cp_core import comm, compiled
from cp_core.layout import granule, shard
from cp_core.mixer import Mamba2Config, Mamba2Mixer

CFG_GPU = Mamba2Config(d_model=64, n_heads=8, head_dim=16, n_groups=2, d_state=16, chunk_size=16)
CFG = Mamba2Config(d_model=32, n_heads=8, head_dim=4, n_groups=2, d_state=8, chunk_size=8)


def _layer(group, strategy="hidden", device="cpu"):
    cfg = CFG_GPU if device == "cuda" else CFG  # the Triton kernels want head_dim, d_state >= 16
    m = Mamba2Mixer(cfg, cp_group=group, strategy=strategy, device=device)
    m.reset_parameters(torch.Generator().manual_seed(3))
    return m


def _batches(cp, packed, n=2, d_model=CFG.d_model):
    g = granule("head_tail", cp)
    out = []
    for i in range(n):
        if packed:  # a new cu_seqlens tensor (and documents) every batch
            cu = cu_from_lengths(doc_lengths(4, g, seed=20 + i, max_units=2) + [g])
            out.append((randn((int(cu[-1]), d_model), 30 + i), cu))
        else:
            out.append((randn((2, 4 * g, d_model), 30 + i), None))
    return out


def _breaks(m, x, cu):
    torch._dynamo.reset()
    e = torch._dynamo.explain(m)(x, cu) if cu is not None else torch._dynamo.explain(m)(x)
    return e.graph_count, e.graph_break_count, [b.reason.splitlines()[0][:120] for b in e.break_reasons]


def _compile_case(group, packed, amp, strategy="hidden"):
    cp, r = comm.group_size(group), comm.group_rank(group)
    batches = _batches(cp, packed)
    m = _layer(group, strategy)
    x0, cu0 = batches[0]
    graphs, breaks, reasons = _breaks(m, shard(x0, r, cp, "head_tail", cu0), cu0)
    torch._dynamo.reset()
    cm = torch.compile(m, backend="aot_eager")  # AOTAutograd with the op and its fake; no C++ codegen
    ok = True
    for x, cu in batches:
        res = []
        for fn in (cm, m):
            m.zero_grad()
            xl = shard(x, r, cp, "head_tail", cu).requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                y = fn(xl, cu)
            y.float().square().sum().backward()
            res.append([y.detach(), xl.grad] + [p.grad.clone() for p in m.parameters()])
        # the op runs eager mode's code; what is traced (casts, slices) is exact: equal to the bit
        ok &= all(torch.equal(a, b) for a, b in zip(*res, strict=True))
    return verdict(bool(ok), group), graphs, breaks, reasons


@pytest.mark.parametrize(
    "cp, packed, amp", [(1, False, False), (1, True, True), (2, False, True), (2, True, False)]
)
def test_compiled_forward_has_no_graph_break_and_matches_eager(ranks, cp, packed, amp):
    for ok, graphs, breaks, reasons in ranks.run(_compile_case, cp, packed, amp):
        assert (graphs, breaks) == (1, 0), reasons
        assert ok


def test_the_break_count_sees_breaks():
    """The same count on the layer without the op (the compiler meets its autograd function and the norm
    backward's autograd.grad) finds the break: the check above can fail."""
    x, _ = _batches(1, False, 1)[0]
    with setting(Mamba2Mixer, "COMPILE_AS_OP", False):
        graphs, breaks, reasons = _breaks(_layer(None), x, None)
    assert breaks > 0, reasons


def _opcheck_case(group, packed, device="cpu"):
    cp, r = comm.group_size(group), comm.group_rank(group)
    m = _layer(group, device=device)
    x, cu = _batches(cp, packed, 1, m.config.d_model)[0]
    xl = shard(x, r, cp, "head_tail", cu).to(device).requires_grad_()
    cu = None if cu is None else cu.to(device)
    w = m.weights()
    params = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in m._local_slices(w)]
    w_in, w_norm, w_out = (t.detach().clone().requires_grad_() for t in (w.in_proj, w.norm, w.out_proj))
    args = (xl, w_in, *params, w_norm, w_out, cu, m._uid, False)
    torch.library.opcheck(compiled.mamba2_layer, args)
    return verdict(True, group)


@pytest.mark.parametrize("cp, packed", [(1, True), (2, False)])
def test_the_ops_fake_agrees_with_the_op(ranks, cp, packed):
    assert all(ranks.run(_opcheck_case, cp, packed))
