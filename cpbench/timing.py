"""The region hook cpbench installs in ``cp_core.regions``: timers, and NVTX ranges under Nsight Systems.

Every region (``a2a_pre``, ``ssm``, ..., and cpbench's own ``layer_fwd`` / ``layer_bwd``)

* with ``nvtx=True`` (``--profile nsys``, or a tool that injects NVTX: ``NVTX_INJECTION64_PATH`` is set)
  opens an NVTX range ``cpbench:<region>`` through ``torch.cuda.nvtx`` (what Nsight Systems shows and
  what ``cpbench nsys-import`` reads back; the ``nvtx`` package's domain ranges do not reach Nsight
  Systems 2023.4.4, see :mod:`cp_core.regions`). Without it no NVTX call is made;
* optionally enters ``torch.profiler.record_function(name)`` (``--profile torch``), so the
  Chrome/Perfetto trace carries the same names;
* is timed while the timer is *active* (the measured iterations): CUDA events on a GPU, recorded
  on the current stream at entry and exit and resolved only after the iteration's synchronize
  (never a sync inside the layer); ``time.perf_counter`` on the CPU, where the work is synchronous.

A region's time in an iteration is the sum of its occurrences in that iteration; regions nest
freely (``layer_fwd`` holds the others). Backward regions run on the autograd thread: NVTX ranges
are per thread, and events record on the stream autograd uses, so both stay correct.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

from cp_core.regions import nvtx_range

#: the prefix of cpbench's NVTX range names
NVTX_PREFIX = "cpbench:"


def nvtx_wanted(profile: str | None, device) -> bool:
    """NVTX ranges on: CUDA, and ``--profile nsys`` or an NVTX-consuming tool attached to the process."""
    import os

    cuda = torch.device(device).type == "cuda"
    return cuda and (profile == "nsys" or bool(os.environ.get("NVTX_INJECTION64_PATH")))


class _Range:
    __slots__ = ("timer", "name", "t0", "ev", "rf")

    def __init__(self, timer: RegionTimer, name: str):
        self.timer = timer
        self.name = name
        self.rf = None

    def __enter__(self):
        t = self.timer
        if t.nvtx:
            torch.cuda.nvtx.range_push(NVTX_PREFIX + self.name)
        if t.record_function:
            self.rf = torch.profiler.record_function(self.name)
            self.rf.__enter__()
        if t.active:
            if t.cuda:
                self.ev = torch.cuda.Event(enable_timing=True)
                self.ev.record()
            else:
                self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        t = self.timer
        if t.active:
            if t.cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                t._pending.append((self.name, self.ev, end))
            else:
                t._done[self.name] += time.perf_counter() - self.t0
        if self.rf is not None:
            self.rf.__exit__(*exc)
            self.rf = None
        if t.nvtx:
            torch.cuda.nvtx.range_pop()
        return False


class RegionTimer:
    """``timer(name)`` is a context manager; install with ``cp_core.regions.set_region_hook(timer)``."""

    def __init__(
        self, device: torch.device | str = "cpu", *, nvtx: bool = False, record_function: bool = False
    ):
        self.cuda = torch.device(device).type == "cuda"
        if nvtx and not self.cuda:
            raise ValueError("NVTX ranges are emitted on CUDA devices only")
        self.nvtx = nvtx
        self.record_function = record_function
        self.active = False
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._done: defaultdict[str, float] = defaultdict(float)

    def __call__(self, name: str) -> _Range:
        return _Range(self, name)

    def start_iteration(self, measure: bool = True) -> None:
        """Begin an iteration; regions are timed only when ``measure``."""
        self._pending.clear()
        self._done.clear()
        self.active = measure

    def stop_iteration(self) -> dict[str, float]:
        """Seconds per region in the iteration. Call AFTER synchronizing the device (events are read here)."""
        self.active = False
        out = dict(self._done)
        for name, start, end in self._pending:
            out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1e3
        self._pending.clear()
        self._done.clear()
        return out

    def mark(self, message: str):
        """An untimed NVTX range ``cpbench:<message>`` (around a case's measured iterations, naming the case)."""
        return nvtx_range(NVTX_PREFIX + message) if self.nvtx else contextlib.nullcontext()


@contextlib.contextmanager
def installed(timer: RegionTimer) -> Iterator[RegionTimer]:
    """Install ``timer`` as cp_core's region hook for the duration of the block."""
    from cp_core.regions import set_region_hook

    previous = set_region_hook(timer)
    try:
        yield timer
    finally:
        set_region_hook(previous)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median time of ``fn()`` in ms over ``iters`` calls after ``warmup`` calls: CUDA events on a GPU
    (each call bracketed by its own pair of events), ``time.perf_counter`` on CPU."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
