"""Causal depthwise conv1d on token-major tensors, in plain torch.

``y_t = bias + sum_{j=0..k-1} weight[:, k-1-j] * x_{t-j}`` where a tap contributes nothing when
``t - j < 0`` or when ``seq_idx[t-j] != seq_idx[t]`` (another document), followed by SiLU when
``activation == "silu"``. Taps of another document are selected away (``torch.where``), not multiplied
by zero, so a non-finite value never crosses a document boundary, forward or backward. Same result as causal-conv1d's ``causal_conv1d_fn`` on ``x.transpose(1, 2)``.

Implementation: a sum of ``k`` shifted multiply-adds (``addcmul_``) over the ``[b, l, c]`` tensor into one
float32 accumulator (float64 when an input is float64), the first tap fused with the bias; no depthwise
``F.conv1d``, which needs the channel-major layout and does not know documents. Traffic per element of
``x`` (``s`` bytes per element of ``x``, accumulator 4 bytes):

* bias and tap ``k-1`` (no shift): ``s`` read, 4 written;
* each of the other ``k-1`` taps: ``s`` read, 4 read and 4 written in the accumulator; with ``seq_idx``
  another ``2*s`` for the tap's masked copy of ``x``;
* SiLU in place (4 + 4), then the cast to ``x``'s dtype when it is not float32 (4 read, ``s`` written;
  for float32 inputs the accumulator is the output).

For bf16 and ``k = 4`` that is about 50 bytes per element (62 with ``seq_idx``) against the 4 of a
fused kernel (read ``x``, write ``y``): 12 to 15 times the minimum. On an H100, bf16 ``[4, 8192, 4096]``,
the forward took 3.6 ms (5.4 ms with ``seq_idx``), about 150 GB/s counted as ``x`` read plus ``y``
written; a depthwise ``F.conv1d`` (+ SiLU) on the same data already in channel-major layout took 1.7 ms
and causal-conv1d 0.22 ms. The forward moved its bytes at about 1.9 TB/s, below the copy rate; a likely
cause is that multiply-adds mixing bf16 ``x`` and the float32 accumulator are not vectorised.

The backward recomputes the pre-activation (nothing but the inputs is saved, as in causal-conv1d),
applies SiLU's derivative in one fused pass, masks each tap's output gradient once for both ``dx``
(shifted multiply-adds, as in the forward) and ``dweight`` (one product-and-sum per tap): about 156
bytes per element for bf16, ``k = 4`` (192 with ``seq_idx``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["conv1d_torch", "check_conv_args", "ACTIVATIONS"]

ACTIVATIONS = (None, "silu", "swish")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_conv_args(x, weight, bias=None, seq_idx=None, activation="silu"):
    """Validate the arguments of :func:`cp_core.kernels.conv1d`; returns ``(b, l, c, k)``."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape [b, l, c] (token-major), got {list(x.shape)}")
    b, l, c = x.shape
    if l < 1:
        raise ValueError(f"x must hold at least one token, got sequence length {l}")
    if weight.dim() != 2 or weight.shape[0] != c or weight.shape[1] < 1:
        raise ValueError(f"weight must have shape [c, k] with c = {c} and k >= 1, got {list(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (c,):
        raise ValueError(f"bias must have shape [c] = {[c]}, got {list(bias.shape)}")
    if seq_idx is not None:
        if not isinstance(seq_idx, torch.Tensor):
            raise ValueError(f"seq_idx must be a torch.Tensor or None, got {type(seq_idx).__name__}")
        if seq_idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"seq_idx must have dtype torch.int32 (or torch.int64), got {seq_idx.dtype}")
        if tuple(seq_idx.shape) != (b, l):
            raise ValueError(f"seq_idx must have shape [b, l] = {[b, l]}, got {list(seq_idx.shape)}")
        if seq_idx.device != x.device:
            raise ValueError(f"seq_idx is on {seq_idx.device} but x is on {x.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return b, l, c, weight.shape[1]


def _tap_masks(seq_idx: torch.Tensor | None, k: int, l: int) -> list[torch.Tensor | None]:
    """``masks[j][:, t, None]`` is True where tap ``j`` may read ``x_t`` for output ``t + j``."""
    masks: list[torch.Tensor | None] = [None] * k
    if seq_idx is not None:
        for j in range(1, min(k, l)):
            masks[j] = (seq_idx[:, j:] == seq_idx[:, : l - j])[..., None]
    return masks


def _preact(x, weight, bias, masks, acc_dtype):
    """Pre-activation in ``acc_dtype``: one allocation, ``k`` shifted in-place multiply-adds."""
    l = x.shape[1]
    k = weight.shape[1]
    w = weight.to(acc_dtype)
    if bias is not None:
        acc = torch.addcmul(bias.to(acc_dtype), x, w[:, k - 1])
    else:
        acc = torch.mul(x, w[:, k - 1])
    if acc.dtype != acc_dtype:  # x is float64 but the weight is not, or the like
        acc = acc.to(acc_dtype)
    for j in range(1, min(k, l)):
        xs = x[:, : l - j]
        if masks[j] is not None:
            xs = torch.where(masks[j], xs, 0.0)  # a selection: 0 * NaN would carry NaN across documents
        acc[:, j:].addcmul_(xs, w[:, k - 1 - j])
    return acc


class _CausalConv1dTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, silu):
        acc_dtype = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
        k, l = weight.shape[1], x.shape[1]
        acc = _preact(x, weight, bias, _tap_masks(seq_idx, k, l), acc_dtype)
        if silu:
            F.silu(acc, inplace=True)
        ctx.save_for_backward(x, weight, bias, seq_idx)
        ctx.silu = silu
        ctx.acc_dtype = acc_dtype
        return acc if acc.dtype == x.dtype else acc.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, bias, seq_idx = ctx.saved_tensors
        acc_dtype = ctx.acc_dtype
        l, k = x.shape[1], weight.shape[1]
        masks = _tap_masks(seq_idx, k, l)
        if ctx.silu:
            pre = _preact(x, weight, bias, masks, acc_dtype)
            g = torch.ops.aten.silu_backward(grad_out, pre)  # one fused pass, in the accumulation dtype
        else:
            g = grad_out.to(acc_dtype)
        want_dx, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(acc_dtype)
        dx = torch.mul(g, w[:, k - 1]) if want_dx else None
        dw = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if want_dw else None
        if want_dw:
            dw[:, k - 1] = (g * x).sum(dim=(0, 1))
        for j in range(1, min(k, l)):
            gs = g[:, j:]  # gradient of the outputs that tap j feeds, masked once for dx and dw
            if masks[j] is not None:
                gs = torch.where(masks[j], gs, 0.0)
            if want_dx:
                dx[:, : l - j].addcmul_(gs, w[:, k - 1 - j])
            if want_dw:
                dw[:, k - 1 - j] = (gs * x[:, : l - j]).sum(dim=(0, 1))
        dx = None if dx is None else dx.to(x.dtype)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None
        if bias is not None and ctx.needs_input_grad[2]:
            db = g.sum(dim=(0, 1)).to(bias.dtype)
        return dx, dw, db, None, None


def conv1d_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = "silu",
    check: bool = True,
) -> torch.Tensor:
    """Causal depthwise conv1d; arguments and result as :func:`cp_core.kernels.conv1d`."""
    if check:
        check_conv_args(x, weight, bias, seq_idx, activation)
    return _CausalConv1dTorch.apply(x, weight, bias, seq_idx, activation in ("silu", "swish"))
