"""Causal conv1d backend on causal-conv1d's CUDA kernel ``causal_conv1d_fn`` (optional).

The kernel is called on the channel-last layout: a contiguous token-major ``[b, l, c]`` tensor viewed
as ``x.transpose(1, 2)`` (shape ``[b, c, l]``, stride 1 along ``c``). That is the only layout whose
kernels take ``seq_idx``, and it needs no copy of the activations. The kernel's limits: ``c`` a
multiple of 8, width ``k`` in 2..4, dtypes float32/float16/bfloat16, and the weight (and bias) in the
dtype of ``x`` (they are cast, differentiably, when they are not).
"""

from __future__ import annotations

import functools
import importlib

import torch

from .conv_torch import check_conv_args

__all__ = ["available", "supports", "conv1d_cuda", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=1)
def _load():
    """Returns ``(causal_conv1d_fn or None, reason)``; cached."""
    try:
        mod = importlib.import_module("causal_conv1d")
    except ModuleNotFoundError as exc:
        if exc.name in ("causal_conv1d", None):
            return None, "causal-conv1d is not installed"
        return None, f"causal-conv1d failed to import ({type(exc).__name__}: {exc})"
    except Exception as exc:  # e.g. an extension built for another torch/CUDA
        return None, f"causal-conv1d failed to import ({type(exc).__name__}: {exc})"
    fn = getattr(mod, "causal_conv1d_fn", None)
    if fn is None:
        return None, "causal-conv1d has no causal_conv1d_fn"
    return fn, "causal-conv1d imported"


def available() -> tuple[bool, str]:
    """``(True, how)`` when causal-conv1d imports, else ``(False, why not)``; says nothing of a device."""
    fn, reason = _load()
    return fn is not None, reason


def supports(x: torch.Tensor, weight: torch.Tensor) -> tuple[bool, str]:
    """Whether the kernel can run these shapes/dtypes/device, and why not."""
    if x.device.type != "cuda":
        return False, f"causal_conv1d needs CUDA tensors, got device {x.device}"
    if x.dtype not in SUPPORTED_DTYPES:
        return False, f"causal_conv1d supports dtypes {[str(d) for d in SUPPORTED_DTYPES]}, got {x.dtype}"
    c, k = weight.shape
    if c % 8 != 0:
        return False, f"causal_conv1d's channel-last kernel needs channels % 8 == 0, got c={c}"
    if not 2 <= k <= 4:
        return False, f"causal_conv1d supports kernel widths 2..4, got k={k}"
    return available()


def _token_major_grad(grad: torch.Tensor) -> torch.Tensor:
    # the incoming gradient of y [b, l, c] must be channel-last once transposed, as x is
    return grad.contiguous()


def conv1d_cuda(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = "silu",
    check: bool = True,
) -> torch.Tensor:
    """Causal depthwise conv1d through causal-conv1d; arguments and result as ``conv1d``."""
    if check:
        check_conv_args(x, weight, bias, seq_idx, activation)
    ok, reason = supports(x, weight)
    if not ok:
        raise ValueError(f"conv1d backend 'causal_conv1d' is unavailable: {reason}")
    fn, _ = _load()
    xt = x.contiguous().transpose(1, 2)  # [b, c, l], channel-last memory
    w = weight.to(x.dtype).contiguous()
    bb = None if bias is None else bias.to(x.dtype).contiguous()
    si = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
    y = fn(xt, w, bb, seq_idx=si, activation=activation).transpose(1, 2)
    if y.requires_grad:
        y.register_hook(_token_major_grad)
    return y
