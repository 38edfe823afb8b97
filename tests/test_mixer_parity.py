"""Mamba2Mixer at cp_size N against the same weights at cp_size 1 on the full sequence (real gloo groups).

Forward output, input gradient and every parameter gradient (summed over the CP group); fp32 to
1e-5 relative, bf16 by relative RMS. Weights and inputs come from seeded generators, so every rank
builds the same reference; the verdict is reduced over the group.
"""

import pytest
import torch
import torch.distributed as dist
from cases import cu_from_lengths, doc_lengths, randn, setting
from ranks import verdict

from cp_core import comm
from cp_core import plan as plan_mod
from cp_core.layout import granule, shard
from cp_core.mixer import Mamba2Config, Mamba2Mixer


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def build(cfg, group, layout, dtype, strategy="hidden", fused=True, device="cpu"):
    strategy, _, chunks = strategy.partition("@")  # "hidden@2": overlap_chunks 2
    strategy, _, exchange = strategy.partition(":")  # "state_passing:chain"
    m = Mamba2Mixer(
        cfg,
        cp_group=group,
        layout=layout,
        dtype=dtype,
        strategy=strategy,
        fused=fused,
        device=device,
        state_exchange=exchange or "allgather",
        overlap_chunks=int(chunks or 1),
    )
    m.reset_parameters(torch.Generator().manual_seed(1234))
    with torch.no_grad():  # non-trivial D and norm weight, so their gradients are checked for real
        m.D.copy_(randn(m.D.shape, 5, dtype))
        m.norm.weight.copy_(1 + 0.1 * randn(m.norm.weight.shape, 6, dtype))
    return m


def _run_layer(m, x, w, cu, group=None, layout="head_tail"):
    """Forward + backward of ``sum(y * w)``; returns (y, dx, {name: grad summed over the group})."""
    cp, r = comm.group_size(group), comm.group_rank(group)
    xl = shard(x, r, cp, layout, cu).requires_grad_()
    y = m(xl, cu)
    (y.float() * shard(w, r, cp, layout, cu).float()).sum().backward()
    grads = {}
    for name, p in m.named_parameters():
        g = p.grad.float().clone()
        if cp > 1:
            dist.all_reduce(g, group=group)
        grads[name] = g
    return y.detach(), xl.grad, grads


def _errors(got, want, cp, r, layout, cu):
    y, dx, grads = got
    errs = {
        "out": rel_rms(y, shard(want[0], r, cp, layout, cu)),
        "dx": rel_rms(dx, shard(want[1], r, cp, layout, cu)),
    }
    errs.update({f"grad {n}": rel_rms(grads[n], want[2][n]) for n in grads})
    return errs


def parity_case(
    group,
    cfg_kw,
    layout,
    batch,
    n_docs,
    dtype_name,
    strategy="hidden",
    fused=True,
    units=4,
    device="cpu",
    tol32=1e-5,
):
    """fp32: CP=N vs CP=1 to 1e-5 relative. bf16 (hidden): relative RMS <= 2^-8 (one bf16 unit
    roundoff) against bf16 CP=1 (each rank rounds its partial parameter gradients to bf16).
    bf16 (state passing, whose SSD splits the sequence differently): error against an fp32 layer with
    the same weights no worse than 1.5x (+1e-3) the error of the unsharded bf16 layer; 2.5x (+1e-3)
    for the per-head vectors dt_bias and A_log, whose few entries each sum every token (their error
    ratio is noisy: 0.35x to 1.95x over layouts and document draws on CPU, while the output and dx
    stay within 0.96x-1.07x)."""
    dtype = getattr(torch, dtype_name)
    cp, r = comm.group_size(group), comm.group_rank(group)
    cfg = Mamba2Config(**cfg_kw)
    g = granule(layout, cp)
    if n_docs is None:
        x = randn((batch, units * g, cfg.d_model), 21, dtype)
        cu = None
    else:
        cu = cu_from_lengths(doc_lengths(n_docs, g, 7, max_units=units))
        x = randn((int(cu[-1]), cfg.d_model), 21, dtype)
    w = randn(x.shape, 22, dtype)
    x, w = x.to(device), w.to(device)
    cu = None if cu is None else cu.to(device)
    ref = _run_layer(build(cfg, None, layout, dtype, device=device), x, w, cu)
    got = _run_layer(build(cfg, group, layout, dtype, strategy, fused, device), x, w, cu, group, layout)
    errs = _errors(got, ref, cp, r, layout, cu)
    if dtype == torch.float32:
        bad = {k: v for k, v in errs.items() if not v <= tol32}
    elif strategy.startswith("hidden"):
        bad = {k: v for k, v in errs.items() if not v <= 2**-8}
    else:
        m32 = build(cfg, None, layout, torch.float32, device=device)
        with torch.no_grad():
            for p32, p16 in zip(
                m32.parameters(), build(cfg, None, layout, dtype, device=device).parameters(), strict=True
            ):
                p32.copy_(p16.float())
        ref32 = _run_layer(m32, x.float(), w.float(), cu)
        e_cp = _errors(got, ref32, cp, r, layout, cu)
        e_1 = _errors(ref, ref32, 1, 0, layout, cu)
        factor = {"grad dt_bias": 2.5, "grad A_log": 2.5}
        bad = {k: (e_cp[k], e_1[k]) for k in errs if not e_cp[k] <= factor.get(k, 1.5) * e_1[k] + 1e-3}
    return verdict(not bad, group), bad, max(errs.values())


def small_cfg(nh, ng, **kw):
    return dict(d_model=16, n_heads=nh, head_dim=4, n_groups=ng, d_state=8, d_conv=4, chunk_size=8, **kw)


def check(res):
    for r, (ok, bad, _worst) in enumerate(res):
        assert ok, f"rank {r}: {bad}"
    return max(w for _, _, w in res)


@pytest.mark.parametrize("layout", ["head_tail", "contiguous"])
@pytest.mark.parametrize("fmt", ["bshd", "thd"])
@pytest.mark.parametrize("cp, ng", [(2, 1), (2, 2), (2, 4), (4, 2), (4, 4), (4, 8)])
def test_hidden_parity_fp32(ranks, cp, ng, fmt, layout):
    batch, n_docs = (2, None) if fmt == "bshd" else (1, 5)
    check(ranks.run(parity_case, cp, small_cfg(8, ng), layout, batch, n_docs, "float32"))


def test_hidden_parity_cp8(ranks):
    check(ranks.run(parity_case, 8, small_cfg(8, 2), "head_tail", 1, 4, "float32", units=2))


@pytest.mark.parametrize("fmt", ["bshd", "thd"])
def test_hidden_parity_bf16(ranks, fmt):
    batch, n_docs = (2, None) if fmt == "bshd" else (1, 5)
    cfg = small_cfg(8, 2)
    cfg["d_model"] = 32
    check(ranks.run(parity_case, 4, cfg, "head_tail", batch, n_docs, "bfloat16"))


def gather_parity_case(group, *args, **kw):
    """:func:`parity_case` with every plan built with no pieces (``RUNS_MAX`` 0): the all-to-all of the send
    slots and a row gather, the path of plans with many pieces."""
    plan_mod.clear_cache()
    try:
        with setting(plan_mod, "RUNS_MAX", 0):
            return parity_case(group, *args, **kw)
    finally:
        plan_mod.clear_cache()


@pytest.mark.parametrize("fmt", ["bshd", "thd"])
@pytest.mark.parametrize("cp, ng", [(2, 2), (4, 2)])
def test_hidden_parity_gather_exchange(ranks, cp, ng, fmt):
    batch, n_docs = (2, None) if fmt == "bshd" else (1, 5)
    check(ranks.run(gather_parity_case, cp, small_cfg(8, ng), "head_tail", batch, n_docs, "float32"))


def layer_input(cfg, layout, cp, batch, n_docs, units, seed):
    """Seeded global input: ``[batch, units*granule, d_model]``, or a pack of ``n_docs`` documents with its
    ``cu_seqlens`` (every rank builds the same)."""
    g = granule(layout, cp)
    if n_docs is None:
        return randn((batch, units * g, cfg.d_model), seed, torch.float32), None
    cu = cu_from_lengths(doc_lengths(n_docs, g, 7, max_units=units))
    return randn((int(cu[-1]), cfg.d_model), seed, torch.float32), cu


def overlap_case(group, cfg_kw, layout, batch, n_docs, chunks):
    """The layer with ``overlap_chunks`` head chunks against the unchunked layer: output, input gradient and
    parameter gradients within 2e-6 relative (fp32). Each head's arithmetic does not depend on the chunking,
    but torch's CPU contractions block differently for a different number of heads, so the last bits may
    differ here (tests/nccl_parity.py checks the chunked layer on GPUs against cp 1 at the usual bounds)."""
    cp = comm.group_size(group)
    cfg = Mamba2Config(**cfg_kw)
    x, cu = layer_input(cfg, layout, cp, batch, n_docs, 4, 21)
    w = randn(x.shape, 22, torch.float32)
    outs = [
        _run_layer(build(cfg, group, layout, torch.float32, f"hidden@{k}"), x, w, cu, group, layout)
        for k in (1, chunks)
    ]
    (y1, dx1, g1), (yk, dxk, gk) = outs
    errs = {n: rel_rms(gk[n], g1[n]) for n in g1}
    errs.update(out=rel_rms(yk, y1), dx=rel_rms(dxk, dx1))
    bad = {n: e for n, e in errs.items() if not e <= 2e-6}
    return verdict(not bad, group), bad, max(errs.values())


@pytest.mark.parametrize("fmt", ["bshd", "thd"])
# whole groups per chunk ((2, 8, 2): two groups per chunk, the CUDA default there: the C block's offset within a
# chunk is its first group's); (2, 2, 2), (2, 4, 4): chunks split a group's heads; (2, 1, 2), (4, 2, 2): and
# the group is replicated over ranks too
@pytest.mark.parametrize(
    "cp, ng, chunks", [(2, 4, 2), (2, 8, 2), (2, 8, 4), (4, 8, 2), (2, 2, 2), (2, 4, 4), (2, 1, 2), (4, 2, 2)]
)
def test_overlap_chunks_bit_identical(ranks, cp, ng, chunks, fmt):
    batch, n_docs = (2, None) if fmt == "bshd" else (1, 5)
    check(ranks.run(overlap_case, cp, small_cfg(8, ng), "head_tail", batch, n_docs, chunks))


def test_overlap_chunks_parity_with_cp1(ranks):
    check(ranks.run(parity_case, 4, small_cfg(8, 8), "contiguous", 1, 5, "float32", "hidden@2"))


def test_overlap_chunks_must_fit_local_heads_and_groups():
    from cp_core.comm import LocalGroup

    for ng, k in ((8, 3), (2, 8), (4, 3)):
        with pytest.raises(ValueError, match="overlap_chunks"):
            Mamba2Mixer(Mamba2Config(**small_cfg(8, ng)), cp_group=LocalGroup(0, 2), overlap_chunks=k)
    with pytest.raises(ValueError, match="overlap_chunks"):
        Mamba2Mixer(Mamba2Config(**small_cfg(8, 2)), overlap_chunks=0)


def test_cp1_split_in_proj_matches_one_projection(monkeypatch):
    """Past 2^31 elements cp 1 computes z and [x|B|C|dt] as two tensors; same numbers as one projection."""
    import cp_core.mixer as mixer_mod

    cfg = Mamba2Config(**small_cfg(8, 2))
    x, w = randn((2, 32, 16), 3), randn((2, 32, 16), 4)
    ref = _run_layer(build(cfg, None, "head_tail", torch.float32), x, w, None)
    monkeypatch.setattr(mixer_mod, "SPLIT_IN_PROJ_ELEMENTS", 0)
    got = _run_layer(build(cfg, None, "head_tail", torch.float32), x, w, None)
    errs = _errors(got, ref, 1, 0, "head_tail", None)
    assert max(errs.values()) <= 1e-6, errs


def test_seed_path_parity_and_D_per_channel(ranks):
    check(
        ranks.run(parity_case, 2, small_cfg(4, 1, D_has_hdim=True), "head_tail", 1, 3, "float32", fused=False)
    )


# ----------------------------------------------------------------------------- state passing


@pytest.mark.parametrize("exchange", ["allgather", "chain"])
@pytest.mark.parametrize("layout", ["head_tail", "contiguous"])
@pytest.mark.parametrize("fmt", ["bshd", "thd"])
@pytest.mark.parametrize("cp", [2, 4])
def test_state_passing_parity_fp32(ranks, cp, fmt, layout, exchange):
    batch, n_docs = (2, None) if fmt == "bshd" else (1, 5)
    strategy = f"state_passing:{exchange}"
    check(ranks.run(parity_case, cp, small_cfg(4, 2), layout, batch, n_docs, "float32", strategy))


@pytest.mark.parametrize("exchange", ["allgather", "chain"])
def test_state_passing_any_cp_size_and_short_segments(ranks, exchange):
    """cp 8 > n_heads 4 (impossible for the hidden strategy); segments of 1 token, shorter than the conv halo."""
    strategy = f"state_passing:{exchange}"
    check(ranks.run(parity_case, 8, small_cfg(4, 1), "head_tail", 1, 6, "float32", strategy, units=2))


@pytest.mark.parametrize("exchange", ["allgather", "chain"])
def test_state_passing_parity_bf16(ranks, exchange):
    cfg = small_cfg(4, 2)
    cfg["d_model"] = 32
    check(ranks.run(parity_case, 4, cfg, "head_tail", 1, 5, "bfloat16", f"state_passing:{exchange}"))


@pytest.mark.parametrize("exchange", ["allgather", "chain"])
@pytest.mark.parametrize("lengths", [[2, 2, 2], [3, 0, 1, 2]])
def test_state_passing_documents_as_rows_or_one_row(ranks, exchange, lengths):
    """Packed documents of one length run as ``[pieces, length]`` rows (no seq_idx, final states from the
    SSD); otherwise as one row of pieces (seq_idx, final states from the per-piece product). Both against cp 1."""
    cfg = small_cfg(4, 2)
    check(ranks.run(lengths_parity_case, 2, cfg, "head_tail", lengths, f"state_passing:{exchange}"))


def lengths_parity_case(group, cfg_kw, layout, units, strategy):
    """:func:`parity_case` on a pack of documents of ``units[i] * granule`` tokens."""
    cp, r = comm.group_size(group), comm.group_rank(group)
    cfg = Mamba2Config(**cfg_kw)
    cu = cu_from_lengths([n * granule(layout, cp) * 2 for n in units])
    x, w = randn((int(cu[-1]), cfg.d_model), 41), randn((int(cu[-1]), cfg.d_model), 42)
    ref = _run_layer(build(cfg, None, layout, torch.float32), x, w, cu)
    got = _run_layer(build(cfg, group, layout, torch.float32, strategy), x, w, cu, group, layout)
    errs = _errors(got, ref, cp, r, layout, cu)
    bad = {k: v for k, v in errs.items() if not v <= 1e-5}
    return verdict(not bad, group), bad, max(errs.values())


def test_state_passing_layer_is_one_lean_function():
    """Between in_proj and the output there is one autograd node (the hand-written backward), and it keeps
    zxbcdt, y, the pieces' initial states and the halo: nothing of the size of the conv output besides."""
    from cp_core.comm import LocalGroup

    cfg = Mamba2Config(**small_cfg(8, 4))
    for cu in (None, cu_from_lengths([16, 0, 32])):
        m = Mamba2Mixer(cfg, cp_group=LocalGroup(0, 2), strategy="state_passing")
        x = torch.randn(24, 16) if cu is not None else torch.randn(2, 8, 16)
        y = m(x.requires_grad_(), cu)
        node = y.grad_fn
        while type(node).__name__ != "_SPCoreBackward":
            assert type(node).__name__ in ("ViewBackward0", "UnsafeViewBackward0"), type(node).__name__
            node = node.next_functions[0][0]
        assert [type(n).__name__ for n, _ in node.next_functions if n is not None][0] == "MmBackward0"
        tokens = x.numel() // 16
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        held = [t for t in (*node.saved_tensors, *node.inter) if isinstance(t, torch.Tensor)]
        kept = sum(t.numel() for t in held if t.untyped_storage().data_ptr() not in params)
        pieces = 2 * (2 if cu is None else 3)  # head-tail: 2 per document (a batch row is one)
        state = pieces * cfg.n_heads * cfg.head_dim * cfg.d_state
        # zxbcdt, y, the norm statistics (one per token and group), h0, every piece's ld (all ranks'), the
        # halo, A = -exp(A_log)
        small = pieces * (3 * cfg.n_heads + 3 * cfg.conv_dim) + cfg.n_heads
        want = tokens * (cfg.d_in_proj + cfg.d_inner + cfg.n_groups) + state + small
        assert kept <= want < kept + tokens * cfg.conv_dim, (kept, want)  # the conv output is not kept
        y.sum().backward()
        assert node.inter is None  # freed by the backward


def test_projection_mode_runs_every_strategy_in_one_process():
    """LocalGroup: rank 0's real work at cp 4 in one process, shapes preserved (values are not meaningful)."""
    from cp_core.comm import COUNTS, LocalGroup

    cfg = Mamba2Config(**small_cfg(8, 4))
    for strategy in ("hidden", "state_passing", "state_passing_chain"):
        for cu in (None, cu_from_lengths([16, 0, 32])):
            m = Mamba2Mixer(cfg, cp_group=LocalGroup(0, 4), strategy=strategy)
            x = torch.randn(12, 16) if cu is not None else torch.randn(2, 8, 16)
            x.requires_grad_()
            COUNTS.clear()
            y = m(x, cu)
            y.sum().backward()
            assert y.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(x.grad).all()
            assert sum(COUNTS.values()) > 0  # the collectives ran, as local copies


def chain_bytes_case(group, layout, batch, n_docs):
    """Bytes this rank really sends point to point in the chain exchange (forward), and the busiest
    rank's figure from cp_core.cost (state part: the model's total less the halo all-gather)."""
    from cp_core.cost import comm_bytes

    cp = comm.group_size(group)
    cfg = Mamba2Config(**small_cfg(4, 2))
    if n_docs is None:
        x, cu = layer_input(cfg, layout, cp, batch, None, 3, 31)
    else:
        x, cu = layer_input(cfg, layout, cp, batch, n_docs, 4, 31)
    m = build(cfg, group, layout, torch.float32, "state_passing:chain")
    sent = []
    real_send = comm.send
    comm.send = lambda t, dst, grp: (sent.append(t.numel() * t.element_size()), real_send(t, dst, grp))[1]
    try:
        with torch.no_grad():
            xl = shard(x, comm.group_rank(group), cp, layout, cu)
            m(xl, cu)
    finally:
        comm.send = real_send
    busiest = torch.tensor([sum(sent)])
    dist.all_reduce(busiest, op=dist.ReduceOp.MAX, group=group)
    local = xl.shape[-2]
    docs = n_docs if n_docs is not None else batch
    pieces = docs * (2 if layout == "head_tail" else 1)
    halo = cp * pieces * (cfg.d_conv - 1) * cfg.conv_dim * 4
    model = comm_bytes(
        cfg, cp, local, 4, "state_passing_chain", 1 if cu is not None else batch, layout=layout, n_docs=n_docs
    )
    return int(busiest), model["state_xchg"] - halo


@pytest.mark.parametrize("layout", ["head_tail", "contiguous"])
@pytest.mark.parametrize("cp, batch, n_docs", [(2, 2, None), (4, 1, 3), (8, 1, None)])
def test_chain_bytes_model_matches_what_is_sent(ranks, cp, batch, n_docs, layout):
    res = ranks.run(chain_bytes_case, cp, layout, batch, n_docs)
    sent, model = res[0]
    assert sent > 0 and sent == model, (sent, model)
