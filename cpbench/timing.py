"""The region hook cpbench installs in ``cp_core.regions``: NVTX ranges plus timers.

Every region (``a2a_pre``, ``ssm``, ..., and cpbench's own ``layer_fwd`` / ``layer_bwd``)

* opens an NVTX range in domain ``cpbench`` with a registered string (what Nsight Systems shows,
  and what ``cpbench nsys-import`` reads back), when the ``nvtx`` package is importable;
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

try:
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - nvtx is a dependency, but keep timing usable without it
    _nvtx = None

NVTX_DOMAIN = "cpbench"


class _Range:
    __slots__ = ("timer", "name", "t0", "ev", "rf")

    def __init__(self, timer: RegionTimer, name: str):
        self.timer = timer
        self.name = name
        self.rf = None

    def __enter__(self):
        t = self.timer
        if t._domain is not None:
            t._domain.push_range(t._attributes(self.name))
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
        if t._domain is not None:
            t._domain.pop_range()
        return False


class RegionTimer:
    """``timer(name)`` is a context manager; install with ``cp_core.regions.set_region_hook(timer)``."""

    def __init__(
        self, device: torch.device | str = "cpu", *, use_nvtx: bool = True, record_function: bool = False
    ):
        self.cuda = torch.device(device).type == "cuda"
        self.record_function = record_function
        self.active = False
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._done: defaultdict[str, float] = defaultdict(float)
        self._domain = _nvtx.get_domain(NVTX_DOMAIN) if (use_nvtx and _nvtx is not None) else None
        self._attrs: dict[str, object] = {}

    def _attributes(self, name: str):
        a = self._attrs.get(name)
        if a is None:
            a = self._attrs[name] = self._domain.get_event_attributes(message=name)
        return a

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

    @contextlib.contextmanager
    def mark(self, message: str) -> Iterator[None]:
        """An untimed NVTX range (e.g. around a case's measured iterations, naming the case)."""
        if self._domain is not None:
            self._domain.push_range(self._domain.get_event_attributes(message=message))
        try:
            yield
        finally:
            if self._domain is not None:
                self._domain.pop_range()


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
