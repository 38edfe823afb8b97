"""Named regions of the layer (``a2a_pre``, ``layout``, ``conv1d``, ``ssm``, ...).

``cp_core`` marks the stages of a layer with :func:`region`. By default a region costs one global
lookup and does nothing: no NVTX call is made on the hot path unless asked for.

* A harness that wants timings installs a hook with :func:`set_region_hook`: ``hook(name)`` must
  return a context manager; it is entered around the region (cpbench's timer emits its own NVTX).
* ``set_nvtx(prefix)`` (without a hook) emits every region as an NVTX range ``prefix + name`` through
  ``torch.cuda.nvtx`` (push/pop on the calling thread). That is the form every Nsight Systems version
  records: 2023.4.4 records ``torch.cuda.nvtx`` ranges but not the ``nvtx`` package's ranges in a named
  domain (seen on an H200 with CUDA 13), so no domain is used and the prefix names the source.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager

import torch

A2A_PRE = "a2a_pre"
A2A_POST = "a2a_post"
LAYOUT = "layout"
CONV1D = "conv1d"
SSM = "ssm"
NORM_PROJ = "norm_proj"
STATE_XCHG = "state_xchg"

_hook: Callable[[str], ContextManager] | None = None
_nvtx_prefix: str | None = None
_NULL = contextlib.nullcontext()


class nvtx_range:
    """An NVTX push/pop range through ``torch.cuda.nvtx`` (a CUDA build of torch); ``with nvtx_range(n):``."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        torch.cuda.nvtx.range_push(self.name)
        return self

    def __exit__(self, *exc):
        torch.cuda.nvtx.range_pop()
        return False


def set_region_hook(hook: Callable[[str], ContextManager] | None) -> Callable[[str], ContextManager] | None:
    """Install ``hook`` (or ``None`` to remove it); returns the previous hook."""
    global _hook
    previous, _hook = _hook, hook
    return previous


def set_nvtx(prefix: str | None) -> str | None:
    """Emit regions as NVTX ranges named ``prefix + name`` (``None``: no NVTX, the default); returns the
    previous prefix. ``ValueError`` on a torch without CUDA (its NVTX functions are stubs)."""
    global _nvtx_prefix
    if prefix is not None and not torch.cuda.is_available():
        raise ValueError("NVTX ranges need a CUDA build of torch and a visible GPU")
    previous, _nvtx_prefix = _nvtx_prefix, prefix
    return previous


def region(name: str) -> ContextManager:
    """Context manager marking one named stage; cheap when nothing listens."""
    if _hook is not None:
        return _hook(name)
    if _nvtx_prefix is not None:
        return nvtx_range(_nvtx_prefix + name)
    return _NULL
