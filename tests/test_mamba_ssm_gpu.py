"""On CUDA: mamba-ssm's ``Mamba2`` checkpoints load into our mixer (strict) and compute the same layer;
and a NaN stays in its document in the CUDA pieces where that holds (causal-conv1d, our Triton kernels,
the mixer with the torch SSD). mamba-ssm's Triton SSD does not keep it there (see the README).

Marked ``gpu``: skipped without CUDA; the mamba-ssm comparison also skips when mamba-ssm's ``Mamba2``
module or causal-conv1d does not import (the reason is printed).
"""

import importlib

import pytest
import torch
from cases import cu_from_lengths, randn
from test_isolation import isolation_case
from test_mixer_parity import rel_rms

from cp_core.kernels import conv_cuda, correction_triton, gather_triton, ssd_mamba
from cp_core.mixer import Mamba2Config, Mamba2Mixer

pytestmark = pytest.mark.gpu

NAN = float("nan")
CFG = dict(d_model=256, n_heads=8, head_dim=64, n_groups=2, d_state=64, d_conv=4, chunk_size=64)


def _mamba2_class():
    """mamba-ssm's Mamba2, imported with or without the package ``__init__`` (see ``ssd_mamba``)."""
    ok, why = conv_cuda.available()
    if not ok:
        pytest.skip(f"mamba-ssm's Mamba2 needs causal-conv1d: {why}")
    ok, why = ssd_mamba.available()  # registers the bare package when its __init__ cannot run
    if not ok:
        pytest.skip(why)
    try:
        return importlib.import_module("mamba_ssm.modules.mamba2").Mamba2
    except Exception as exc:  # e.g. einops missing
        pytest.skip(f"mamba_ssm.modules.mamba2 does not import: {type(exc).__name__}: {exc}")


def _layers(dtype, mem_eff):
    """theirs (mamba-ssm, ``dtype``), ours (``dtype``, auto backends: the fast kernels), ref (ours in
    fp32 on the torch kernels), all holding the same values: theirs' state_dict loaded strictly."""
    Mamba2 = _mamba2_class()
    c = CFG
    torch.manual_seed(0)
    theirs = Mamba2(
        d_model=c["d_model"],
        d_state=c["d_state"],
        d_conv=c["d_conv"],
        expand=c["n_heads"] * c["head_dim"] // c["d_model"],
        headdim=c["head_dim"],
        ngroups=c["n_groups"],
        chunk_size=c["chunk_size"],
        rmsnorm=True,
        norm_before_gate=False,
        use_mem_eff_path=mem_eff,
        device="cuda",
        dtype=dtype,
    )
    with torch.no_grad():  # every parameter matters: non-trivial D and norm weight
        theirs.D.copy_(randn(theirs.D.shape, 5).to(dtype).float())  # its D is fp32: give it dtype's values
        theirs.norm.weight.copy_((1 + 0.1 * randn(theirs.norm.weight.shape, 6)).to(dtype))
    cfg = Mamba2Config(**c)
    ours = Mamba2Mixer(cfg, device="cuda", dtype=dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ref = Mamba2Mixer(cfg, ssd_backend="torch", conv_backend="torch", device="cuda", dtype=torch.float32)
    ref.load_state_dict({k: v.float() for k, v in theirs.state_dict().items()}, strict=True)
    return theirs, ours, ref


def _run(layer, x, w, cu=None, seq_idx=None):
    xi = x.clone().requires_grad_()
    if seq_idx is not None:  # mamba-ssm: packed documents as [1, T, d] with seq_idx
        y = layer(xi.unsqueeze(0), seq_idx=seq_idx)[0]
    else:
        y = layer(xi, cu) if cu is not None else layer(xi)
    (y.float() * w).sum().backward()
    return {"out": y.detach(), "dx": xi.grad, **{f"grad {n}": p.grad for n, p in layer.named_parameters()}}


@pytest.mark.parametrize("mem_eff", [True, False])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba_ssm_checkpoint_loads_and_matches(dtype, packed, mem_eff):
    """Bound, self-calibrated: mamba-ssm's result must be as close to our fp32 layer on the torch kernels
    as our own ``dtype`` layer on the fast kernels is, within 3x (5x for the per-head vectors dt_bias and
    A_log, whose few entries each sum every token and whose rounding error is noisy) plus a floor of one
    unit roundoff of ``dtype`` (2^-8 bf16; 1e-3 fp32, where Triton's SSD uses tf32 dots); and at most
    5% (bf16) or 1% (fp32) in any case. A different layer (B and C swapped, no SiLU in the gate, no D)
    misses by tens of percent."""
    if packed and not mem_eff:
        pytest.skip(
            "mamba-ssm's unfused Mamba2 path does not pass seq_idx to its conv1d (documents mix there)"
        )
    theirs, ours, ref = _layers(dtype, mem_eff)
    if packed:
        cu = cu_from_lengths([256, 0, 512, 128, 128]).cuda()
        T = int(cu[-1])
        seq_idx = torch.searchsorted(cu, torch.arange(T, device="cuda", dtype=torch.int32), right=True) - 1
        seq_idx = seq_idx.to(torch.int32).view(1, T)
        x = randn((T, CFG["d_model"]), 1).cuda()
    else:
        cu = seq_idx = None
        x = randn((2, 512, CFG["d_model"]), 1).cuda()
    w = randn(x.shape, 2).cuda()
    got_t = _run(theirs, x.to(dtype), w, seq_idx=seq_idx)
    got_o = _run(ours, x.to(dtype), w, cu)
    want = _run(ref, x, w, cu)
    assert ours.backends["ssd"] == "mamba_ssm", ours.backends
    floor, cap = (2**-8, 0.05) if dtype == torch.bfloat16 else (1e-3, 0.01)
    errors, bad = {}, {}
    for k in want:
        e_t, e_o = rel_rms(got_t[k], want[k]), rel_rms(got_o[k], want[k])
        factor = 5 if k in ("grad dt_bias", "grad A_log") else 3
        errors[k] = (round(e_t, 6), round(e_o, 6))
        if not (e_t <= factor * e_o + floor and e_t <= cap * (2 if factor == 5 else 1)):
            bad[k] = errors[k]
    assert not bad, f"(mamba-ssm vs fp32, ours vs fp32) out of bounds: {bad}; all: {errors}"


# ----------------------------------------------------------------------------- NaN isolation on CUDA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_conv1d_keeps_a_nan_in_its_document(dtype):
    ok, why = conv_cuda.available()
    if not ok:
        pytest.skip(why)
    seq = torch.tensor([[0] * 37 + [1] * 27], dtype=torch.int32, device="cuda")
    x = randn((1, 64, 64), 1).to("cuda", dtype)
    w, b = randn((64, 4), 2).cuda().to(dtype), randn((64,), 3).cuda().to(dtype)
    xb = x.clone()
    xb[0, 36, :] = NAN  # the last token of document 0: without seq_idx its taps reach 3 tokens of document 1
    outs = []
    for xi, nan_grad in ((x, False), (xb, True)):
        xi = xi.clone().requires_grad_()
        y = conv_cuda.conv1d_cuda(xi, w, b, seq_idx=seq, activation="silu")
        gy = torch.ones_like(y)
        if nan_grad:
            gy[0, 30, :] = NAN  # an upstream gradient of document 0
        y.backward(gy)
        outs.append((y.detach(), xi.grad))
    (yc, gc), (yb, gb) = outs
    assert torch.equal(yb[:, 37:], yc[:, 37:]) and torch.equal(yb[:, :36], yc[:, :36])
    assert torch.equal(gb[:, 37:], gc[:, 37:])


def test_triton_kernels_keep_a_nan_in_its_row():
    """The per-piece products work piece by piece (a piece is one document's segment on a rank): a NaN in
    piece 0 (tokens, its matrix, the scale) leaves every other piece bit for bit; pack and gather_rows copy."""
    if not correction_triton.supports(torch.empty(1, device="cuda")):
        pytest.skip("triton unavailable")
    from cp_core.kernels import correction as corr

    lengths, H, P, G, N = [70, 33, 100], 4, 16, 2, 16
    T = sum(lengths)
    tab = corr.PieceTable([0, 70, 103], lengths, "cuda")
    u, v = randn((T, H, P), 1).cuda(), randn((T, G, N), 2).cuda()
    M, s = randn((3, H, P, N), 3).cuda(), torch.rand(H, T, device="cuda")
    runs = []
    for bad in (False, True):
        uu, vv, MM, ss = (t.clone() for t in (u, v, M, s))
        if bad:
            uu[5, 1, 2] = vv[9, 0, 0] = MM[0, 0, 0, 0] = ss[1, 11] = NAN
        dv, g = corr.tapply(uu, vv, MM, ss, tab, backend="triton")
        runs.append(
            (
                corr.apply(uu, vv, MM, ss, tab, backend="triton"),
                dv,
                g.t(),
                corr.outer(uu, vv, ss, tab, backend="triton"),
            )
        )
    for name, clean, bad in zip(("apply", "tapply dv", "tapply g", "outer"), *runs, strict=True):
        assert torch.equal(
            bad[70:] if name != "outer" else bad[1:], clean[70:] if name != "outer" else clean[1:]
        ), name
    x = randn((50, 96), 5).cuda().to(torch.bfloat16)
    xb = x.clone()
    xb[7] = NAN
    idx = torch.randint(0, 50, (70,), device="cuda")
    keep = idx != 7
    assert torch.equal(gather_triton.gather_rows(xb, idx)[keep], gather_triton.gather_rows(x, idx)[keep]), (
        "gather"
    )


@pytest.mark.parametrize(
    "cp, strategy", [(1, "hidden"), (2, "hidden"), (2, "state_passing"), (2, "state_passing:chain")]
)
def test_mixer_on_cuda_keeps_a_nan_in_its_document(ranks, cp, strategy):
    """causal-conv1d, the Triton pack/gather/correction and the torch SSD (mamba-ssm's Triton SSD carries
    a NaN across documents, so it is not used here), on one GPU over gloo."""
    res = ranks.run(
        isolation_case, cp, strategy, "head_tail", True, device="cuda", ssd_backend="torch", tol=(1e-4, 1e-5)
    )
    for r, (ok, bad) in enumerate(res):
        assert ok, f"rank {r}: {bad}"


def test_mamba_ssm_triton_ssd_carries_a_nan_across_documents_as_the_readme_says():
    """If this fails, mamba-ssm now keeps documents apart: update the README paragraph."""
    ok, why = ssd_mamba.available()
    if not ok:
        pytest.skip(why)
    b, l, h, p, g, n = 1, 256, 4, 64, 1, 64
    x = randn((b, l, h, p), 1).cuda()
    dt, A = randn((b, l, h), 2).cuda(), -torch.rand(h, device="cuda") - 0.5
    B, C = randn((b, l, g, n), 3).cuda(), randn((b, l, g, n), 4).cuda()
    seq = torch.tensor([[0] * 128 + [1] * 128], dtype=torch.int32, device="cuda")
    x[0, 10] = NAN
    y = ssd_mamba.ssd_mamba(x, dt, A, B, C, chunk_size=256, seq_idx=seq)
    assert not torch.isfinite(y[0, 128:]).all()
