"""Triton kernels for :func:`cp_core.kernels.correction.state_correction` (reference: ``state_correction_torch``).

Forward, one pass: each program takes ``BL`` tokens of one head, forms ``C . h0`` with a dot
(fp32 accumulation), scales it by ``exp(acum)``, adds ``y0`` in fp32 and stores once. Heads are
the fastest grid axis, so the heads of a group read the same ``C`` tile while it is in L2.

Backward, two passes over ``dy`` (``s = exp(acum) * dy``):

* per (``BL`` tokens, group): ``dC = sum_heads s @ h0`` and ``dacum = sum_p s * (C . h0)``;
* per (head, slice of the tokens): partial ``dh0 = s^T @ C``, summed over the slices in torch
  (no atomics: the result does not depend on scheduling).

``dy0 = dy`` needs no kernel. Set ``TRITON_INTERPRET=1`` to run these on CPU (the tests do).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - CPU installs without triton
    HAVE_TRITON = False

# tokens per program and warps per kernel, picked on an H100 with scripts/correction_tune.py (bf16,
# R 2, L 8192, 128 heads x 64, 8 groups, d_state 128): forward 0.42 ms, backward 1.9 ms (BL 64: 0.60, 2.3)
BL = {"fwd": 128, "bwd": 32}
NUM_WARPS = {"fwd": 4, "dc": 4, "dh0": 4}


def supports(t: torch.Tensor) -> bool:
    return HAVE_TRITON and t.is_cuda and t.dtype in (torch.float16, torch.bfloat16, torch.float32)


def _blk(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot wants every dimension >= 16


if HAVE_TRITON:

    @triton.jit
    def _fwd(
        y0, C, h0, acum, y, L, H, HG, P, N,
        sy0_r, sy0_l, sy0_h, sc_r, sc_l, sc_g, sy_r, sy_l, sy_h,
        BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        rh = tl.program_id(0)
        r, h = rh // H, rh % H
        g = h // HG
        ls = tl.program_id(1) * BL + tl.arange(0, BL)
        ps, ns = tl.arange(0, BP), tl.arange(0, BN)
        lm, pm, nm = ls < L, ps < P, ns < N
        r64, l64 = r.to(tl.int64), ls.to(tl.int64)
        c = tl.load(
            C + r64 * sc_r + l64[:, None] * sc_l + g * sc_g + ns[None, :],
            mask=lm[:, None] & nm[None, :],
            other=0.0,
        )
        hs = tl.load(
            h0 + (rh.to(tl.int64) * P + ps[:, None]) * N + ns[None, :],
            mask=pm[:, None] & nm[None, :],
            other=0.0,
        )
        corr = tl.dot(c.to(tl.float32), tl.trans(hs))  # [BL, BP]
        e = tl.exp(tl.load(acum + rh.to(tl.int64) * L + ls, mask=lm, other=0.0))
        m2 = lm[:, None] & pm[None, :]
        v = tl.load(y0 + r64 * sy0_r + l64[:, None] * sy0_l + h * sy0_h + ps[None, :], mask=m2, other=0.0)
        out = v.to(tl.float32) + e[:, None] * corr
        tl.store(
            y + r64 * sy_r + l64[:, None] * sy_l + h * sy_h + ps[None, :], out.to(y.dtype.element_ty), mask=m2
        )

    @triton.jit
    def _bwd_dc(
        dy, C, h0, acum, dC, dacum, L, H, HG, P, N,
        sd_r, sd_l, sd_h, sc_r, sc_l, sc_g,
        BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        G = H // HG
        rg = tl.program_id(0)
        r, g = rg // G, rg % G
        ls = tl.program_id(1) * BL + tl.arange(0, BL)
        ps, ns = tl.arange(0, BP), tl.arange(0, BN)
        lm, pm, nm = ls < L, ps < P, ns < N
        r64, l64 = r.to(tl.int64), ls.to(tl.int64)
        mc = lm[:, None] & nm[None, :]
        c = tl.load(C + r64 * sc_r + l64[:, None] * sc_l + g * sc_g + ns[None, :], mask=mc, other=0.0).to(
            tl.float32
        )
        dc = tl.zeros((BL, BN), dtype=tl.float32)
        for i in range(HG):
            h = g * HG + i
            rh = r64 * H + h
            hs = tl.load(
                h0 + (rh * P + ps[:, None]) * N + ns[None, :], mask=pm[:, None] & nm[None, :], other=0.0
            )
            e = tl.exp(tl.load(acum + rh * L + ls, mask=lm, other=0.0))
            d = tl.load(
                dy + r64 * sd_r + l64[:, None] * sd_l + h * sd_h + ps[None, :],
                mask=lm[:, None] & pm[None, :],
                other=0.0,
            )
            s = d.to(tl.float32) * e[:, None]  # [BL, BP]
            corr = tl.dot(c, tl.trans(hs))
            tl.store(dacum + rh * L + ls, tl.sum(s * corr, axis=1), mask=lm)
            dc += tl.dot(s, hs)
        # dC is written contiguous [R, L, G, N]
        tl.store(
            dC + ((r64 * L + l64[:, None]) * G + g) * N + ns[None, :], dc.to(dC.dtype.element_ty), mask=mc
        )

    @triton.jit
    def _bwd_dh0(
        dy, C, acum, part, L, H, HG, P, N, per_split,
        sd_r, sd_l, sd_h, sc_r, sc_l, sc_g,
        BL: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
    ):  # fmt: skip
        rh = tl.program_id(0)
        sp = tl.program_id(1)
        r, h = rh // H, rh % H
        g = h // HG
        ps, ns = tl.arange(0, BP), tl.arange(0, BN)
        pm, nm = ps < P, ns < N
        r64 = r.to(tl.int64)
        acc = tl.zeros((BP, BN), dtype=tl.float32)
        start = sp * per_split
        for l0 in range(start, tl.minimum(start + per_split, L), BL):
            ls = l0 + tl.arange(0, BL)
            lm = ls < L
            l64 = ls.to(tl.int64)
            e = tl.exp(tl.load(acum + rh.to(tl.int64) * L + ls, mask=lm, other=0.0))
            d = tl.load(
                dy + r64 * sd_r + l64[:, None] * sd_l + h * sd_h + ps[None, :],
                mask=lm[:, None] & pm[None, :],
                other=0.0,
            )
            s = d.to(tl.float32) * e[:, None]
            c = tl.load(
                C + r64 * sc_r + l64[:, None] * sc_l + g * sc_g + ns[None, :],
                mask=lm[:, None] & nm[None, :],
                other=0.0,
            )
            acc += tl.dot(tl.trans(s), c.to(tl.float32))
        base = (sp.to(tl.int64) * tl.num_programs(0) + rh) * P
        tl.store(part + (base + ps[:, None]) * N + ns[None, :], acc, mask=pm[:, None] & nm[None, :])


def _last_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _Correction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y0, C, h0, acum):
        R, L, H, P = y0.shape
        G, N = C.shape[2:]
        y0, C = _last_unit(y0), _last_unit(C)
        h0, acum = h0.float().contiguous(), acum.float().contiguous()
        y = torch.empty((R, L, H, P), device=y0.device, dtype=y0.dtype)
        if y.numel():
            grid = (R * H, triton.cdiv(L, BL["fwd"]))
            _fwd[grid](
                y0, C, h0, acum, y, L, H, H // G, P, N,
                y0.stride(0), y0.stride(1), y0.stride(2), C.stride(0), C.stride(1), C.stride(2),
                y.stride(0), y.stride(1), y.stride(2),
                BL=BL["fwd"], BP=_blk(P), BN=_blk(N), num_warps=NUM_WARPS["fwd"],
            )  # fmt: skip
        ctx.save_for_backward(C, h0, acum)
        return y

    @staticmethod
    def backward(ctx, dy):
        C, h0, acum = ctx.saved_tensors
        R, L, H, P = dy.shape
        G, N = C.shape[2:]
        dy = _last_unit(dy)
        dC = torch.empty((R, L, G, N), device=C.device, dtype=C.dtype)
        dacum = torch.empty_like(acum)
        if dy.numel() == 0:
            return dy, dC.zero_(), torch.zeros_like(h0), dacum.zero_()
        strides = (dy.stride(0), dy.stride(1), dy.stride(2), C.stride(0), C.stride(1), C.stride(2))
        bl = BL["bwd"]
        blocks = dict(BL=bl, BP=_blk(P), BN=_blk(N))
        _bwd_dc[(R * G, triton.cdiv(L, bl))](
            dy, C, h0, acum, dC, dacum, L, H, H // G, P, N, *strides, **blocks, num_warps=NUM_WARPS["dc"]
        )
        # enough (head, token slice) programs to fill the device, slices a multiple of BL
        n_blocks = triton.cdiv(L, bl)
        splits = max(1, min(n_blocks, triton.cdiv(512, R * H)))
        per_split = triton.cdiv(n_blocks, splits) * bl
        splits = triton.cdiv(L, per_split)
        part = torch.empty((splits, R, H, P, N), device=dy.device, dtype=torch.float32)
        _bwd_dh0[(R * H, splits)](
            dy, C, acum, part, L, H, H // G, P, N, per_split, *strides, **blocks, num_warps=NUM_WARPS["dh0"]
        )
        dh0 = part[0] if splits == 1 else part.sum(0)
        return dy, dC, dh0, dacum


def state_correction_triton(y0, C, h0, acum):
    """Triton :func:`cp_core.kernels.correction.state_correction` (same arguments, same result up to
    fp32 rounding)."""
    return _Correction.apply(y0, C, h0, acum)
