"""Gated RMSNorm of Mamba2 (``rmsnorm(y * silu(z))`` over groups of channels) and its fusion with ``out_proj``.

``out = rmsnorm_g(y * silu(z)) * weight`` where ``rmsnorm_g`` normalises every group of ``group_size``
consecutive channels by its own root mean square (mamba-ssm's ``RMSNormGated`` with
``norm_before_gate=False``). Statistics in fp32, the result rounded once to ``y``'s dtype.

=========  ============================================================================================
backend    implementation
=========  ============================================================================================
torch      :func:`gated_rmsnorm_torch`: fp32 torch ops (any device); the reference. Its backward
           recomputes the forward under autograd.
triton     mamba-ssm's ``layernorm_gated`` kernels: one pass forward (``out`` and ``rstd``), one pass
           backward (``dy``, ``dz`` written where the caller asks, ``dweight``; optionally the
           forward output recomputed in the same pass)
=========  ============================================================================================

:func:`norm_fwd` / :func:`norm_bwd` are the explicit pair used by hand-written backwards
(:mod:`cp_core.pipeline`); :func:`gated_norm_out_proj` is an autograd function computing
``out_proj(norm(y, z))`` that does not keep the normalised activations: its backward recomputes
them in the norm's backward pass (as mamba-ssm's fused ``Mamba2`` path does), which saves one
``[tokens, d_inner]`` tensor per layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ssd_mamba import load_submodule

__all__ = [
    "gated_rmsnorm_torch",
    "norm_fwd",
    "norm_bwd",
    "norm_fwd_slots",
    "norm_bwd_slots",
    "gated_norm_out_proj",
    "triton_available",
    "BACKENDS",
]

BACKENDS = ("torch", "triton")
_MODULE = "mamba_ssm.ops.triton.layernorm_gated"


def triton_available() -> tuple[bool, str]:
    mod, reason = load_submodule(_MODULE)
    return mod is not None, reason


def gated_rmsnorm_torch(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int):
    """Reference ``rmsnorm_g(y * silu(z)) * weight`` in fp32 (float64 for float64 input), in ``y``'s dtype."""
    work = torch.float64 if y.dtype == torch.float64 else torch.float32
    h = y.to(work) * F.silu(z.to(work))
    hg = h.view(*h.shape[:-1], -1, group_size)
    hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + eps)
    return (hg.view_as(h) * weight.to(work)).to(y.dtype)


def resolve(backend: str, y: torch.Tensor) -> str:
    if backend == "auto":
        ok = y.is_cuda and y.dtype in (torch.float16, torch.bfloat16, torch.float32) and triton_available()[0]
        return "triton" if ok else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"norm backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and not (y.is_cuda and triton_available()[0]):
        raise ValueError(f"norm backend 'triton' needs CUDA tensors and mamba-ssm ({triton_available()[1]})")
    return backend


def norm_fwd(y, z, weight, eps: float, group_size: int, backend: str, out=None):
    """``(out, rstd)`` for 2-D ``y, z [M, N]`` (last dim contiguous; ``z`` may be a column slice of a
    wider tensor). ``rstd`` is the Triton kernel's per-(row, group) statistic, ``None`` for torch.
    ``out`` (optional, ``[M, N]``, last dim contiguous, e.g. a column slice) receives the result."""
    if backend == "triton":
        mod, _ = load_submodule(_MODULE)
        kw = dict(z=z, out=out, group_size=group_size, norm_before_gate=False, is_rms_norm=True)
        out, _, rstd = mod._layer_norm_fwd(y, weight, None, eps, **kw)
        return out, rstd
    with torch.no_grad():
        res = gated_rmsnorm_torch(y, z, weight, eps, group_size)
    return (res if out is None else out.copy_(res)), None


def norm_bwd(
    dout, y, z, weight, rstd, eps: float, group_size: int, backend: str, *, dz=None, recompute_output=False
):
    """``(dy, dz, dweight, out or None)``; ``dz`` (optional) is written in place (it may be a column
    slice of a wider gradient buffer); ``recompute_output`` also returns the forward output."""
    if backend == "triton":
        mod, _ = load_submodule(_MODULE)
        res = mod._layer_norm_bwd(
            dout.contiguous(), y, weight, None, eps, None, rstd, z=z, group_size=group_size,
            norm_before_gate=False, is_rms_norm=True, recompute_output=recompute_output, dz=dz,
        )  # fmt: skip
        dy, dw, _, dz_out = res[:4]
        return dy, dz_out, dw, (res[4] if recompute_output else None)
    with torch.enable_grad():
        yy, zz, ww = (t.detach().requires_grad_(True) for t in (y, z, weight))
        out = gated_rmsnorm_torch(yy, zz, ww, eps, group_size)
        dy, dz_new, dw = torch.autograd.grad(out, (yy, zz, ww), dout)
    if dz is not None:
        dz.copy_(dz_new)
        dz_new = dz
    return dy, dz_new, dw, (out.detach() if recompute_output else None)


def norm_fwd_slots(ys, cols, z, weight, eps: float, group_size: int, backend: str):
    """The norm of a ``y`` held as *slots*: ``ys [S, M, w]``, slot ``i`` holding the channels
    ``[cols[i], cols[i] + w)`` (hidden CP's received buffers, so no pass lays them side by side first).
    Every norm group lies in one slot (``w`` a multiple of ``group_size``, every ``cols[i]`` too).
    ``(out [M, S*w] in channel order, rstd: one per slot)``; each slot's numbers are those of one call
    on the whole ``y`` (the statistics are per row and group)."""
    S, M, w = ys.shape
    _check_slots(ys, cols, group_size)
    out = ys.new_empty((M, S * w))
    rstd = []
    for i, c in enumerate(cols):
        sl = slice(c, c + w)
        rstd.append(norm_fwd(ys[i], z[:, sl], weight[sl], eps, group_size, backend, out=out[:, sl])[1])
    return out, rstd


def norm_bwd_slots(
    dout, ys, cols, z, weight, rstd, eps: float, group_size: int, backend: str, *, dz, dx, on_slot=None
):
    """Backward of :func:`norm_fwd_slots`: ``dx [S, M, w]`` (slot ``i``'s gradient, in the slots' layout:
    hidden CP sends them as they are) and ``dz [M, N]`` are written in place; returns
    ``(dweight, out)`` with the forward output recomputed. ``dx``, ``dz`` and the output are those of one
    call on the whole ``y``; the weight gradient is summed over other row blocks (its last bits may differ).
    ``on_slot(i)``, when given, is called once slot ``i``'s work is queued (in slot order)."""
    S, M, w = ys.shape
    _check_slots(ys, cols, group_size)
    out = ys.new_empty((M, S * w))
    dw = torch.empty_like(weight)
    mod = load_submodule(_MODULE)[0] if backend == "triton" else None
    for i, c in enumerate(cols):
        sl = slice(c, c + w)
        if mod is not None:
            dw[sl] = _triton_bwd_into(
                mod, dout[:, sl], ys[i], z[:, sl], weight[sl], rstd[i], eps, group_size, dz[:, sl], dx[i], out[:, sl]
            )  # fmt: skip
        else:
            dxi, _, dw[sl], out[:, sl] = norm_bwd(
                dout[:, sl], ys[i], z[:, sl], weight[sl], None, eps, group_size, backend,
                dz=dz[:, sl], recompute_output=True,
            )  # fmt: skip
            dx[i].copy_(dxi)
        if on_slot is not None:
            on_slot(i)
    return dw, out


def _check_slots(ys, cols, group_size: int) -> None:
    S, _, w = ys.shape
    if len(cols) != S or w % group_size or any(c % group_size for c in cols):
        raise ValueError(
            f"slots of width {w} at channels {list(cols)} must hold whole norm groups of {group_size} "
            f"(one start per slot, {S} slots)"
        )


def _triton_bwd_into(mod, dy, x, z, weight, rstd, eps, group_size, dz, dx, out):
    """mamba-ssm's norm backward kernel with ``dx`` written where the caller asks (its wrapper allocates it),
    launched as that wrapper launches it (warps, row blocks per SM count); returns the weight gradient."""
    M, N = x.shape
    if group_size > 65536 // x.element_size():
        raise RuntimeError("the norm kernel takes groups under 64 KB")
    for t in (x, dy, z, dz, dx, out):
        if t.stride(-1) != 1:
            raise ValueError("the norm backward needs every operand's last dim contiguous")
    block_n = 1 << max(group_size - 1, 0).bit_length()  # next power of 2
    num_warps = min(max(block_n // 256, 1), 8)
    ngroups = N // group_size
    sm_count = torch.cuda.get_device_properties(x.device).multi_processor_count
    nrow_groups = math.ceil(sm_count * math.ceil(4 / num_warps) / ngroups)
    dw_part = torch.empty((nrow_groups, N), dtype=torch.float32, device=weight.device)
    with torch.cuda.device(x.device.index):
        mod._layer_norm_bwd_kernel[(nrow_groups, ngroups)](
            x, weight, None, z, out, dy, dx, dw_part, None, dz, None, rstd,
            x.stride(0), z.stride(0), out.stride(0), dy.stride(0), dx.stride(0), dz.stride(0),
            dw_part.stride(0), 0, M, group_size, eps, math.ceil(M / nrow_groups),
            BLOCK_N=block_n, NORM_BEFORE_GATE=False, IS_RMS_NORM=True, num_warps=num_warps,
        )  # fmt: skip
    return dw_part.sum(0).to(weight.dtype)


class _GatedNormOutProj(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, norm_w, out_w, eps, group_size, backend):
        shape = y.shape
        y2, z2 = y.reshape(-1, shape[-1]), z.reshape(-1, shape[-1])
        if y2.stride(-1) != 1:
            y2 = y2.contiguous()
        if z2.stride(-1) != 1:
            z2 = z2.contiguous()
        normed, rstd = norm_fwd(y2, z2, norm_w, eps, group_size, backend)
        # written into the output tensor itself: a plain tensor, not a view of a buffer (in-place adds work)
        out = normed.new_empty((*shape[:-1], out_w.shape[0]))
        torch.mm(normed, out_w.t(), out=out.view(-1, out_w.shape[0]))
        ctx.save_for_backward(y2, z2, norm_w, out_w, rstd)
        ctx.cfg = (eps, group_size, backend, shape, z.shape)
        return out

    @staticmethod
    def backward(ctx, dout):
        with torch.autocast(dout.device.type, enabled=False):  # the dtypes forward chose
            return _GatedNormOutProj._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        y2, z2, norm_w, out_w, rstd = ctx.saved_tensors
        eps, group_size, backend, shape, zshape = ctx.cfg
        d2 = dout.reshape(-1, dout.shape[-1])
        dnormed = d2 @ out_w
        dy, dz, dw, normed = norm_bwd(
            dnormed, y2, z2, norm_w, rstd, eps, group_size, backend, recompute_output=True
        )
        dout_w = d2.t() @ normed
        return dy.view(shape), dz.view(zshape), dw, dout_w, None, None, None


def gated_norm_out_proj(y, z, norm_weight, out_weight, eps: float, group_size: int, backend: str = "auto"):
    """``F.linear(rmsnorm_g(y * silu(z)) * norm_weight, out_weight)``, keeping only ``y``, ``z`` and the
    per-row statistics for backward (the normalised activations are recomputed there)."""
    return _GatedNormOutProj.apply(y, z, norm_weight, out_weight, eps, group_size, resolve(backend, y))
