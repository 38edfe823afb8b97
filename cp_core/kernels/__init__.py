"""SSD and causal conv1d kernels: a fast CUDA kernel beside a portable torch reference for each.

=========  ====================  ===============================================================
op         backend               implementation
=========  ====================  ===============================================================
ssd        ``"torch"``           :mod:`.ssd_torch`, chunked SSD in torch (any device)
ssd        ``"mamba_ssm"``       :mod:`.ssd_mamba`, mamba-ssm's Triton ``mamba_chunk_scan_combined``
conv1d     ``"torch"``           :mod:`.conv_torch`, shifted multiply-adds in torch (any device)
conv1d     ``"causal_conv1d"``   :mod:`.conv_cuda`, causal-conv1d's CUDA ``causal_conv1d_fn``
pieces     ``"torch"``           :mod:`.correction`, state passing's per-piece products (the carried-state
                                 correction, its backward, the final states), fp32 torch
pieces     ``"triton"``          :mod:`.correction_triton`, the same over blocks inside one piece
ssd phases ``"mamba_ssm"``       :mod:`.ssd_phases`, the SSD as final states then outputs (mamba-ssm's
                                 kernels, or the torch SSD in that order) and its backward
=========  ====================  ===============================================================

``backend="auto"`` picks the fast kernel when the tensors are on CUDA and the package imports, else
torch. (The environment variables ``CP_CORE_SSD_BACKEND`` / ``CP_CORE_CONV_BACKEND`` set the default of a
layer's backends in :func:`cp_core.options.default_options`; nothing here reads them.) Asking for a backend that cannot run raises ValueError saying why.
:mod:`.reference` holds naive per-token references used by the tests.

Document convention: ``seq_idx`` is a ``[b, l]`` int32 document id per token, non-decreasing along
each row; state (SSD) and taps (conv) never cross a change of ``seq_idx``. For the SSD,
``initial_states`` belongs to document id 0 (this is how mamba-ssm's kernel treats it), so callers
that pass ``initial_states`` must number each row's documents from 0. To continue a sequence from a
carried state (the next chunk of a long sequence, or a context-parallel shard), renumber the chunk's
``seq_idx`` relative to the document of the token just before it (``seq_idx - prev_doc_id``): the
continuing document then has id 0 and receives the state; a chunk that starts a new document starts
at 1 and does not.
"""

from __future__ import annotations

import torch

from . import conv_cuda, conv_torch, correction, reference, ssd_mamba, ssd_torch  # noqa: F401  (submodules)
from .conv_torch import check_conv_args, conv1d_torch
from .ssd_torch import check_ssd_args

__all__ = [
    "ssd",
    "conv1d",
    "resolve_backends",
    "SSD_BACKENDS",
    "CONV_BACKENDS",
    "SSD_BACKEND_ENV",
    "CONV_BACKEND_ENV",
]

SSD_BACKENDS = ("torch", "mamba_ssm")
CONV_BACKENDS = ("torch", "causal_conv1d")
SSD_BACKEND_ENV = "CP_CORE_SSD_BACKEND"
CONV_BACKEND_ENV = "CP_CORE_CONV_BACKEND"

_OPS = {
    "ssd": (SSD_BACKENDS, SSD_BACKEND_ENV, "mamba_ssm", ssd_mamba.available),
    "conv1d": (CONV_BACKENDS, CONV_BACKEND_ENV, "causal_conv1d", conv_cuda.available),
}


def _as_device(device) -> torch.device:
    if isinstance(device, torch.Tensor):
        return device.device
    if device is None:
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"not a device: {device!r}") from exc


def _resolve(op: str, requested, device: torch.device) -> str:
    return _resolve_ex(op, requested, device)[0]


def _resolve_ex(op: str, requested, device: torch.device) -> tuple[str, bool]:
    """``(name, chosen_automatically)``."""
    names, env, fast, available = _OPS[op]
    source = f"argument; a layer's default comes from {env}"
    if requested is None or requested == "auto":
        if device.type == "cuda" and available()[0]:
            return fast, True
        return "torch", True
    if not isinstance(requested, str) or requested not in names:
        raise ValueError(
            f"unknown {op} backend {requested!r} (from {source}); valid names: {', '.join(names)} or 'auto'"
        )
    if requested == fast:
        if device.type != "cuda":
            raise ValueError(
                f"{op} backend {fast!r} (from {source}) needs a CUDA device, got device '{device}'"
            )
        ok, reason = available()
        if not ok:
            raise ValueError(f"{op} backend {fast!r} (from {source}) is unavailable: {reason}")
    return requested, False


#: The CUDA and Triton kernels index their tensors with int32 offsets: no tensor they read or write may
#: hold this many elements (at d_model 4096 the limit is met near 2^31 / 18560 = 115K tokens of one row
#: of ``zxbcdt``).
INT32_ELEMENTS = 2**31


def check_int32_extent(what: str, elements: int, hint: str) -> None:
    """ValueError (before any kernel runs, rather than an illegal memory access) when a tensor a CUDA
    kernel would index holds ``INT32_ELEMENTS`` elements or more."""
    if elements >= INT32_ELEMENTS:
        raise ValueError(
            f"{what} would hold {elements:,} elements, past the 2^31 that the CUDA/Triton kernels can index "
            f"(int32 offsets): {hint}"
        )


def resolve_backends(device, ssd_backend: str | None = "auto", conv_backend: str | None = "auto"):
    """Backend names ``(ssd_name, conv_name)`` for tensors on ``device``.

    ``"auto"`` (or None) gives the fast kernel on CUDA when its package imports, else ``"torch"``.
    An unknown name, or a
    backend that cannot run here (not CUDA, package missing or broken), raises ValueError.
    ``device`` may be a ``torch.device``, a string, or a tensor.
    """
    dev = _as_device(device)
    return _resolve("ssd", ssd_backend, dev), _resolve("conv1d", conv_backend, dev)


def ssd(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
    backend: str = "auto",
):
    """Mamba2 SSD (``mamba_chunk_scan_combined`` semantics with ``z=None``).

    Shapes: ``x [b, l, h, p]``; ``dt [b, l, h]`` raw (before ``dt_bias`` and softplus); ``A [h]``
    (negative); ``B, C [b, l, g, n]`` with ``h % g == 0`` (head ``i`` uses group ``i // (h // g)``);
    ``D [h]`` or ``[h, p]``; ``dt_bias [h]``; ``seq_idx [b, l]`` int32; ``initial_states [b, h, p, n]``.

    ``dt' = softplus(dt + dt_bias)`` (if ``dt_softplus``), ``h_t = exp(A dt'_t) h_{t-1} + dt'_t x_t B_t^T``,
    ``y_t = C_t h_t + D x_t``; the state is reset at each change of ``seq_idx``; ``initial_states`` is
    the state before the first token and belongs to document id 0 (pass ``seq_idx`` starting at 0 in
    each row together with it). Returns ``y [b, l, h, p]`` in ``x``'s dtype, and with
    ``return_final_states`` also ``final_states [b, h, p, n]`` (float32; float64 for float64 inputs on
    the torch backend), the state after the last token. Differentiable in every tensor input.

    With ``backend="auto"`` inputs that the Triton kernel does not take (float64) use torch.
    """
    check_ssd_args(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, initial_states)
    name, auto = _resolve_ex("ssd", backend, x.device)
    if name == "mamba_ssm" and auto and not ssd_mamba.supports(x)[0]:
        name = "torch"
    impl = ssd_mamba.ssd_mamba if name == "mamba_ssm" else ssd_torch.ssd_torch
    return impl(
        x,
        dt,
        A,
        B,
        C,
        chunk_size=chunk_size,
        D=D,
        dt_bias=dt_bias,
        dt_softplus=dt_softplus,
        seq_idx=seq_idx,
        initial_states=initial_states,
        return_final_states=return_final_states,
        check=False,
    )


def conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = "silu",
    backend: str = "auto",
) -> torch.Tensor:
    """Causal depthwise conv1d over token-major ``x [b, l, c]`` with ``weight [c, k]``, ``bias [c]``.

    ``y_t = bias + sum_{j<k} weight[:, k-1-j] * x_{t-j}``, taps before the start or in another
    document (``seq_idx [b, l]`` int32) contributing 0, then SiLU for ``activation="silu"`` (None:
    identity). Returns ``[b, l, c]`` in ``x``'s dtype, differentiable in ``x``, ``weight``, ``bias``.
    Equals ``causal_conv1d_fn(x.transpose(1, 2), weight, bias, seq_idx=..., activation=...)
    .transpose(1, 2)``. With ``backend="auto"`` shapes the CUDA kernel does not take (``c % 8 != 0``,
    ``k`` outside 2..4, float64) use torch.
    """
    check_conv_args(x, weight, bias, seq_idx, activation)
    name, auto = _resolve_ex("conv1d", backend, x.device)
    if name == "causal_conv1d" and auto and not conv_cuda.supports(x, weight)[0]:
        name = "torch"
    impl = conv_cuda.conv1d_cuda if name == "causal_conv1d" else conv1d_torch
    return impl(x, weight, bias, seq_idx=seq_idx, activation=activation, check=False)
