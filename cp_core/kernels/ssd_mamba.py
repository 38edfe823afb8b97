"""SSD backend on mamba-ssm's Triton kernel ``mamba_chunk_scan_combined`` (CUDA only, optional).

mamba-ssm is an optional accelerator. Two kinds of install are supported:

* a full build: ``import mamba_ssm`` works and the kernel is imported the ordinary way;
* a build made with ``MAMBA_SKIP_CUDA_BUILD=TRUE``: the package has no ``selective_scan_cuda``
  extension, so ``import mamba_ssm`` fails (its ``__init__`` imports it), although the Triton SSD
  kernels need nothing compiled. Then the package is located with ``importlib.util.find_spec``, an
  empty module object with its ``__path__`` and ``__spec__`` is registered as ``sys.modules["mamba_ssm"]``
  without running the ``__init__``, and ``mamba_ssm.ops.triton.ssd_combined`` is imported below it.
  (Afterwards ``import mamba_ssm`` returns that empty package object; its submodules import normally.)

The import is attempted once per process; :func:`available` reports the outcome and why.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys

import torch

from .ssd_torch import check_ssd_args

__all__ = ["available", "ssd_mamba", "load_submodule", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SUBMODULE = "mamba_ssm.ops.triton.ssd_combined"


def _import_without_package_init(submodule: str = _SUBMODULE):
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("mamba-ssm is not installed")
    pkg = importlib.util.module_from_spec(spec)  # a module object with __path__/__spec__; not executed
    sys.modules["mamba_ssm"] = pkg
    try:
        return importlib.import_module(submodule)
    except BaseException:
        if sys.modules.get("mamba_ssm") is pkg:
            del sys.modules["mamba_ssm"]
        raise


@functools.cache
def load_submodule(name: str):
    """``(module or None, reason)`` for a submodule of mamba-ssm (e.g. ``mamba_ssm.ops.triton.layernorm_gated``),
    imported the ordinary way or, for a build without CUDA extensions, without the package ``__init__``."""
    try:
        return importlib.import_module(name), "imported"
    except Exception as first:  # ImportError, or anything a broken install raises
        first_error = f"{type(first).__name__}: {first}"
    if "mamba_ssm" in sys.modules:  # the package imported (or was registered): the submodule itself failed
        return None, f"{name} failed to import ({first_error})"
    try:
        if importlib.util.find_spec("mamba_ssm") is None:
            return None, "mamba-ssm is not installed"
        return _import_without_package_init(name), "imported without the package __init__"
    except Exception as second:
        return None, f"{name} failed to import ({first_error}; without the package __init__: {second})"


@functools.lru_cache(maxsize=1)
def _load():
    """Returns ``(mamba_chunk_scan_combined or None, reason)``; cached."""
    try:
        mod = importlib.import_module(_SUBMODULE)
        return mod.mamba_chunk_scan_combined, "mamba-ssm imported"
    except ImportError as first:  # includes ModuleNotFoundError
        first_error = f"{type(first).__name__}: {first}"
    except Exception as first:  # a broken install can raise anything at import
        first_error = f"{type(first).__name__}: {first}"
    if "mamba_ssm" in sys.modules:  # the package itself imported; the kernel module is what failed
        return None, f"mamba-ssm's Triton SSD kernel failed to import ({first_error})"
    try:
        if importlib.util.find_spec("mamba_ssm") is None:
            return None, "mamba-ssm is not installed"
    except (ImportError, ValueError) as exc:
        return None, f"mamba-ssm could not be located ({exc})"
    try:
        mod = _import_without_package_init()
        return (
            mod.mamba_chunk_scan_combined,
            "mamba-ssm's Triton kernels imported without the package __init__",
        )
    except Exception as second:
        return None, (
            f"mamba-ssm is installed but its Triton SSD kernel failed to import ({first_error}; without the "
            f"package __init__: {type(second).__name__}: {second})"
        )


def available() -> tuple[bool, str]:
    """``(True, how)`` when mamba-ssm's Triton SSD kernel imports, else ``(False, why not)``.

    Says nothing about a device: the kernel also needs CUDA tensors.
    """
    fn, reason = _load()
    return fn is not None, reason


def supports(x: torch.Tensor) -> tuple[bool, str]:
    """Whether this backend can run on ``x``'s device and dtype, and why not."""
    if x.device.type != "cuda":
        return False, f"mamba_ssm needs CUDA tensors, got device {x.device}"
    if x.dtype not in SUPPORTED_DTYPES:
        return False, f"mamba_ssm supports dtypes {[str(d) for d in SUPPORTED_DTYPES]}, got {x.dtype}"
    ok, reason = available()
    return ok, reason


def ssd_mamba(
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
    check: bool = True,
):
    """SSD through ``mamba_chunk_scan_combined``; arguments and result as :func:`cp_core.kernels.ssd`.

    Inputs are made contiguous in the layouts the kernel expects (``x`` ``[b, l, h, p]``, ``B``/``C``
    ``[b, l, g, n]`` with the last dim contiguous, ``dt`` ``[b, l, h]``), ``seq_idx`` is passed as
    contiguous int32 and ``final_states`` is returned as float32.
    """
    if check:
        check_ssd_args(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, initial_states)
    ok, reason = supports(x)
    if not ok:
        raise ValueError(f"SSD backend 'mamba_ssm' is unavailable: {reason}")
    fn, _ = _load()

    def _c(t):
        return None if t is None else t.contiguous()

    if seq_idx is not None:
        seq_idx = seq_idx.to(torch.int32).contiguous()
    out = fn(
        x.contiguous(),
        dt.contiguous(),
        A.contiguous(),
        B.contiguous(),
        C.contiguous(),
        chunk_size,
        D=_c(D),
        z=None,
        dt_bias=_c(dt_bias),
        initial_states=_c(initial_states),
        seq_idx=seq_idx,
        dt_softplus=dt_softplus,
        return_final_states=return_final_states,
    )
    if return_final_states:
        y, final_states = out
        return y, final_states.float()
    return out
