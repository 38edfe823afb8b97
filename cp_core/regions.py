"""Named regions of the layer (``a2a_pre``, ``layout``, ``conv1d``, ``ssm``, ...).

``cp_core`` marks the stages of a layer with :func:`region`. By default a region is an
NVTX range (domain ``cp_core``) when the ``nvtx`` package is importable and a no-op
otherwise. A harness that wants timings installs a hook with :func:`set_region_hook`:
``hook(name)`` must return a context manager; it is entered around the region.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager

A2A_PRE = "a2a_pre"
A2A_POST = "a2a_post"
LAYOUT = "layout"
CONV1D = "conv1d"
SSM = "ssm"
NORM_PROJ = "norm_proj"
STATE_XCHG = "state_xchg"

_hook: Callable[[str], ContextManager] | None = None


def set_region_hook(hook: Callable[[str], ContextManager] | None) -> Callable[[str], ContextManager] | None:
    """Install ``hook`` (or ``None`` to remove it); returns the previous hook."""
    global _hook
    previous, _hook = _hook, hook
    return previous


def region(name: str) -> ContextManager:
    """Context manager marking one named stage; cheap when nothing listens."""
    if _hook is not None:
        return _hook(name)
    return contextlib.nullcontext()
