"""The contribution of a carried initial state to a segment's SSD outputs (state-passing CP, step 4).

A Mamba2 segment run from a zero state gives ``y0``; with the true initial state ``h0`` its output is

    y[r, t, h, :] = y0[r, t, h, :] + exp(acum[r, h, t]) * h0[r, h] @ C[r, t, g(h)]

where ``acum[r, h, t] = sum_{s<=t} A_h dt_s`` (fp32, the decay from the segment start) and
``g(h) = h // (H / G)``. Shapes: ``y0 [R, L, H, P]``, ``C [R, L, G, N]``, ``h0 [R, H, P, N]``
(fp32), ``acum [R, H, L]`` (fp32, time last). The result has ``y0``'s dtype, rounded once: the sum
is formed in fp32, as the SSD kernel forms its own outputs.

=========  ==================================================================================
backend    implementation
=========  ==================================================================================
torch      :func:`state_correction_torch`: fp32 torch ops, autograd (any device); the reference
triton     :mod:`.correction_triton`: one fused pass forward, two passes backward (CUDA)
=========  ==================================================================================

``CP_CORE_CORRECTION=torch`` forces the torch reference (to compare against it).
"""

from __future__ import annotations

import os

import torch

from . import correction_triton

__all__ = ["state_correction", "state_correction_torch"]


def state_correction_torch(
    y0: torch.Tensor, C: torch.Tensor, h0: torch.Tensor, acum: torch.Tensor
) -> torch.Tensor:
    """Reference: ``y0 + exp(acum) * (C . h0)`` computed in fp32 (float64 for float64 input)."""
    R, L, H, P = y0.shape
    G, N = C.shape[2:]
    work = torch.float64 if y0.dtype == torch.float64 else torch.float32
    corr = torch.einsum("rlgn,rgkn->rlgk", C.to(work), h0.to(work).reshape(R, G, (H // G) * P, N))
    decay = torch.exp(acum.to(work)).transpose(1, 2).unsqueeze(-1)  # [R, L, H, 1]
    return (y0.to(work) + corr.reshape(R, L, H, P) * decay).to(y0.dtype)


def _check(y0, C, h0, acum):
    R, L, H, P = y0.shape
    if C.dim() != 4 or C.shape[:2] != (R, L) or H % C.shape[2]:
        raise ValueError(
            f"C must be [R, L, G, N] with G dividing H; y0 {tuple(y0.shape)}, C {tuple(C.shape)}"
        )
    if tuple(h0.shape) != (R, H, P, C.shape[3]):
        raise ValueError(f"h0 must be [R, H, P, N] = {(R, H, P, C.shape[3])}, got {tuple(h0.shape)}")
    if tuple(acum.shape) != (R, H, L):
        raise ValueError(f"acum must be [R, H, L] = {(R, H, L)}, got {tuple(acum.shape)}")


def state_correction(
    y0: torch.Tensor, C: torch.Tensor, h0: torch.Tensor, acum: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """``y0 + exp(acum) * (C . h0)`` (see the module docstring); differentiable in all four inputs.
    ``backend``: ``"auto"`` (Triton on CUDA when it imports, else torch), ``"torch"`` or ``"triton"``."""
    _check(y0, C, h0, acum)
    if backend == "auto":
        use = os.environ.get("CP_CORE_CORRECTION", "auto") != "torch" and correction_triton.supports(y0)
        backend = "triton" if use else "torch"
    if backend == "triton":
        if not correction_triton.supports(y0):
            raise ValueError(
                f"the triton correction needs triton and a fp16/bf16/fp32 tensor, got {y0.dtype} on {y0.device}"
            )
        return correction_triton.state_correction_triton(y0, C, h0, acum)
    if backend != "torch":
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    return state_correction_torch(y0, C, h0, acum)
