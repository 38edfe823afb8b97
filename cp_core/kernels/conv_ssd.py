"""conv1d + SiLU + SSD of a Mamba2 layer as one explicit forward/backward pair that keeps nothing but its input.

``y = ssd(silu(conv1d(xBC)), dt)`` on ``xbcdt = [x | B | C | dt]`` (token-major ``[b, l, W]``, the last dim
contiguous; a column slice of a wider tensor is fine). The backward recomputes the conv output instead of
saving it and does not need the SSD output either, so a layer keeps only ``xbcdt`` (as mamba-ssm's fused
``Mamba2`` path keeps ``zxbcdt``), not the ``[l, conv_dim]`` conv output or the ``[l, d_inner]`` SSD output.

=========  ==============================================================================================
backend    implementation
=========  ==============================================================================================
fused      causal-conv1d's CUDA forward/backward and mamba-ssm's Triton SSD passes
           (``_mamba_chunk_scan_combined_fwd/bwd``), called directly; the backward writes ``d xbcdt``
           into a buffer the caller may hand in (a column slice of the layer's ``d zxbcdt``)
autograd   :func:`cp_core.kernels.conv1d` + :func:`cp_core.kernels.ssd` with any of their backends
           (torch on any device): the forward runs without autograd, the backward recomputes it under
           autograd. The reference the fused backend is tested against
=========  ==============================================================================================

``A`` is the fp32 ``-exp(A_log)`` of the heads in ``xbcdt``; ``dt_bias``, ``D`` per head; ``seq_idx [b, l]``
int32 or None. :class:`ConvSSD` wraps the pair as an autograd function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .ssd_mamba import load_submodule

__all__ = ["ConvSSDSpec", "fused_available", "conv_ssd_fwd", "conv_ssd_bwd", "conv_ssd"]

_SSD = "mamba_ssm.ops.triton.ssd_combined"


@dataclass(frozen=True)
class ConvSSDSpec:
    """Static shape of one conv1d + SSD call: heads ``nh`` of ``headdim``, ``ngroups`` of ``dstate``."""

    nh: int
    headdim: int
    ngroups: int
    dstate: int
    chunk_size: int
    backend: str  # "fused" | "autograd"
    ssd_backend: str = "torch"  # for "autograd": the backends of kernels.ssd / kernels.conv1d
    conv_backend: str = "torch"

    @property
    def dim(self) -> int:
        return self.nh * self.headdim

    @property
    def conv_dim(self) -> int:
        return self.dim + 2 * self.ngroups * self.dstate

    @property
    def width(self) -> int:
        return self.conv_dim + self.nh


def fused_available() -> tuple[bool, str]:
    """mamba-ssm's Triton SSD passes and causal-conv1d's CUDA functions both import."""
    mod, reason = load_submodule(_SSD)
    if mod is None:
        return False, reason
    if getattr(mod, "causal_conv1d_fwd_function", None) is None:
        return False, "causal-conv1d is not installed (mamba-ssm's fused path needs its CUDA functions)"
    return True, "mamba-ssm + causal-conv1d"


def _channel_last(t: torch.Tensor) -> torch.Tensor:
    """``[b, l, c]`` -> ``[b, c, l]`` view with stride 1 over ``c``; copies when the row stride is not a
    multiple of 8 (what causal-conv1d's channel-last kernel needs)."""
    if t.stride(1) % 8 or t.stride(2) != 1:
        t = t.contiguous()
    return t.transpose(1, 2)


def _split_xbc(s: ConvSSDSpec, xbc: torch.Tensor):
    b, l = xbc.shape[:2]
    x, B, C = xbc.split([s.dim, s.ngroups * s.dstate, s.ngroups * s.dstate], dim=-1)
    return (
        x.unflatten(-1, (s.nh, s.headdim)),
        B.unflatten(-1, (s.ngroups, s.dstate)),
        C.unflatten(-1, (s.ngroups, s.dstate)),
    )


def _autograd_forward(s: ConvSSDSpec, xbcdt, conv_w, conv_b, dt_bias, A, D, seq_idx):
    from . import conv1d, ssd

    b, l = xbcdt.shape[:2]
    xbc, dt = xbcdt.split([s.conv_dim, s.nh], dim=-1)
    xbc = conv1d(xbc, conv_w, conv_b, seq_idx=seq_idx, activation="silu", backend=s.conv_backend)
    x, B, C = _split_xbc(s, xbc)
    y = ssd(
        x, dt, A, B, C, chunk_size=s.chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True, seq_idx=seq_idx,
        backend=s.ssd_backend,
    )  # fmt: skip
    return y.reshape(b, l, s.dim)


def conv_ssd_fwd(s: ConvSSDSpec, xbcdt, conv_w, conv_b, dt_bias, A, D, seq_idx) -> torch.Tensor:
    """``y [b, l, nh*headdim]`` (contiguous, ``xbcdt``'s dtype); no autograd graph."""
    if s.backend != "fused":
        with torch.no_grad():
            return _autograd_forward(s, xbcdt, conv_w, conv_b, dt_bias, A, D, seq_idx)
    mod, _ = load_submodule(_SSD)
    b, l = xbcdt.shape[:2]
    xbc, dt = xbcdt.split([s.conv_dim, s.nh], dim=-1)
    xbc = mod.causal_conv1d_fwd_function(_channel_last(xbc), conv_w, conv_b, seq_idx, None, None, True)
    x, B, C = _split_xbc(s, xbc.transpose(1, 2))
    out = mod._mamba_chunk_scan_combined_fwd(
        x, dt, A, B, C, s.chunk_size, D=D, z=None, dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=True
    )[0]
    return out.view(b, l, s.dim)


def conv_ssd_bwd(s: ConvSSDSpec, dy, xbcdt, conv_w, conv_b, dt_bias, A, D, seq_idx, *, dxbcdt=None):
    """Gradients ``(dxbcdt, dconv_w, dconv_b, ddt_bias, dA, dD)`` of :func:`conv_ssd_fwd`, each in the
    dtype of its input (``dA`` fp32). ``dxbcdt`` (optional, ``xbcdt``'s shape) receives the first."""
    if s.backend != "fused":
        with torch.enable_grad():
            ins = [
                t.detach().requires_grad_(True) if t is not None else None
                for t in (xbcdt, conv_w, conv_b, dt_bias, A, D)
            ]
            y = _autograd_forward(s, *ins, seq_idx)
            wrt = [t for t in ins if t is not None]
            grads = iter(torch.autograd.grad(y, wrt, dy))
        out = [next(grads) if t is not None else None for t in ins]
        if dxbcdt is not None:
            dxbcdt.copy_(out[0])
            out[0] = dxbcdt
        return tuple(out)
    mod, _ = load_submodule(_SSD)
    b, l = xbcdt.shape[:2]
    xbc, dt = xbcdt.split([s.conv_dim, s.nh], dim=-1)
    xbc_cl = _channel_last(xbc)
    xbc_conv = mod.causal_conv1d_fwd_function(xbc_cl, conv_w, conv_b, seq_idx, None, None, True).transpose(
        1, 2
    )
    x, B, C = _split_xbc(s, xbc_conv)
    if dxbcdt is None:
        dxbcdt = torch.empty_like(xbcdt, memory_format=torch.contiguous_format)
    dxbc_given, ddt_given = dxbcdt.split([s.conv_dim, s.nh], dim=-1)
    dxbc = torch.empty((b, l, s.conv_dim), dtype=xbcdt.dtype, device=xbcdt.device)
    dx, dB, dC = _split_xbc(s, dxbc)
    dy = dy.reshape(b, l, s.nh, s.headdim)
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    # `out` is only read when z is given; x stands in for it (same shape)
    _, _, dA, _, _, dD, _, ddt_bias, _ = mod._mamba_chunk_scan_combined_bwd(
        dy, x, dt, A, B, C, x, s.chunk_size, D=D, z=None, dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=True,
        dx=dx, ddt=ddt_given, dB=dB, dC=dC,
    )  # fmt: skip
    dgiven_cl = _channel_last(dxbc_given)  # a copy when the row stride is not a multiple of 8
    dxbc_new, dconv_w, dconv_b, _ = mod.causal_conv1d_bwd_function(
        xbc_cl, conv_w, conv_b, _channel_last(dxbc), seq_idx, None, None, dgiven_cl, False, True
    )
    if (
        dxbc_new.data_ptr() != dxbc_given.data_ptr()
        or dxbc_new.stride() != dxbc_given.transpose(1, 2).stride()
    ):
        dxbc_given.copy_(dxbc_new.transpose(1, 2))
    if dD is not None:
        dD = dD.to(D.dtype)
    return dxbcdt, dconv_w, dconv_b, ddt_bias.to(dt_bias.dtype), dA, dD


class ConvSSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xbcdt, conv_w, conv_b, dt_bias, A, D, seq_idx, spec):
        ctx.spec = spec
        ctx.save_for_backward(xbcdt, conv_w, conv_b, dt_bias, A, D, seq_idx)
        return conv_ssd_fwd(spec, xbcdt, conv_w, conv_b, dt_bias, A, D, seq_idx)

    @staticmethod
    def backward(ctx, dy):
        xbcdt, conv_w, conv_b, dt_bias, A, D, seq_idx = ctx.saved_tensors
        grads = conv_ssd_bwd(ctx.spec, dy, xbcdt, conv_w, conv_b, dt_bias, A, D, seq_idx)
        return (*grads, None, None)


def conv_ssd(spec: ConvSSDSpec, xbcdt, conv_w, conv_b, dt_bias, A, D, seq_idx=None) -> torch.Tensor:
    """Autograd conv1d + SiLU + SSD (see the module docstring); ``y [b, l, nh*headdim]``."""
    return ConvSSD.apply(xbcdt, conv_w, conv_b, dt_bias, A, D, seq_idx, spec)
