"""What a torch profiler trace says about overlap: the GPU kernels of a chrome trace (``cpbench sweep
--profile torch`` writes one per case and rank), classified as Holistic Trace Analysis does.

* **communication**: NCCL kernels, and peer-to-peer copies (``Memcpy PtoP``: the copy-engine transport);
* **memory**: other copies and memsets;
* **computation**: every other kernel.

:func:`comm_overlap` is HTA's communication-computation overlap: the time during which communication and
computation kernels run at once, over the communication kernels' time (both as unions of intervals, so
concurrent kernels count once). :func:`idle_gaps` finds where the busiest stream (the compute stream)
waits and what ran on the others meanwhile. ``cpbench trace FILE`` prints both.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Kernel:
    start_us: float
    end_us: float
    stream: int | str
    name: str

    @property
    def kind(self) -> str:
        return kind(self.name)


def kind(name: str) -> str:
    """``"communication"``, ``"memory"`` or ``"computation"`` for a GPU event's name."""
    low = name.lower()
    if "nccl" in low or "ptop" in low:
        return "communication"
    if low.startswith(("memcpy", "memset")):
        return "memory"
    return "computation"


#: The range ``cpbench sweep --profile torch`` puts around each measured iteration's layer (not around the
#: group synchronisation between iterations, whose all-reduce is no part of the layer).
ITERATION = "cpbench_iteration"


#: the CPU-side API calls that launch GPU work (their ``args.correlation`` names the kernel or copy they launch)
_LAUNCH_CATS = ("cuda_runtime", "cuda_driver")


def read(path: str | Path, window: str | None = ITERATION) -> tuple[list[Kernel], list[tuple[float, float]]]:
    """One pass over a chrome trace: its GPU events (kernels, copies, memsets) by start time and the GPU
    ranges (us) of the ``window`` annotations, one per measured iteration. When there are such ranges,
    only the events inside them are kept.

    A ``window`` range is found as the GPU ran it (``gpu_user_annotation``) where the trace has one. Kineto
    gives a ``record_function`` range a GPU span only for kernels launched while it was the innermost
    annotation of its thread, and ``--profile torch`` opens the regions (``layer_fwd``, ``layer_bwd``, ...)
    inside the iteration, so there is usually none: then the CPU range (``user_annotation``) is used, every
    GPU event joining the iteration during which the call that launched it ran (``args.correlation``, on
    any thread: autograd launches the backward from its own), and the iteration's GPU range spans its
    events."""
    with open(path) as f:
        events = json.load(f)
    events = events.get("traceEvents", []) if isinstance(events, dict) else events
    gpu: list[tuple[Kernel, object]] = []
    ranges, cpu_ranges, launch_ts = [], [], {}
    for e in events:
        if e.get("ph") != "X":
            continue
        t0 = float(e["ts"])
        t1 = t0 + float(e.get("dur", 0.0))
        cat = e.get("cat")
        args = e.get("args") or {}
        if cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            stream = args.get("stream", e.get("tid"))
            gpu.append((Kernel(t0, t1, stream, str(e.get("name", ""))), args.get("correlation")))
        elif not window:
            continue
        elif cat == "gpu_user_annotation" and e.get("name") == window:
            ranges.append((t0, t1))
        elif cat == "user_annotation" and e.get("name") == window:
            cpu_ranges.append((t0, t1))
        elif cat in _LAUNCH_CATS and args.get("correlation") is not None:
            launch_ts[args["correlation"]] = t0
    out = [k for k, _ in gpu]
    if ranges:
        out = [k for k in out if any(a <= k.start_us and k.end_us <= b for a, b in ranges)]
    elif cpu_ranges:
        cpu_ranges.sort()
        per: list[list[Kernel]] = [[] for _ in cpu_ranges]
        for k, corr in gpu:
            t = launch_ts.get(corr)
            if t is None:
                continue
            for i, (a, b) in enumerate(cpu_ranges):
                if a <= t <= b:
                    per[i].append(k)
                    break
        if any(per):  # else no launch is known (a trace without correlations): every event, no ranges
            ranges = [(min(k.start_us for k in ks), max(k.end_us for k in ks)) for ks in per if ks]
            out = [k for ks in per for k in ks]
    return sorted(out, key=lambda k: (k.start_us, k.end_us)), sorted(ranges)


def load(path: str | Path, window: str | None = ITERATION) -> list[Kernel]:
    """The GPU events of a chrome trace (inside the ``window`` ranges, where it has any): :func:`read`."""
    return read(path, window)[0]


def windows(path: str | Path, window: str = ITERATION) -> list[tuple[float, float]]:
    """The GPU ranges of the ``window`` annotations (none in a trace written without them): :func:`read`."""
    return read(path, window)[1]


def case_stats(path: str | Path, min_gap_ms: float = 0.05) -> dict[str, float]:
    """Per measured iteration: communication kernel time, HTA's overlap and the compute stream's idle time
    in gaps of at least ``min_gap_ms`` inside an iteration (what the sweep's CSV reports from a
    ``--profile torch`` trace)."""
    kernels, ranges = read(path)
    ranges = ranges or [(-math.inf, math.inf)]
    ov = comm_overlap(kernels)
    idle = 0.0
    for a, b in ranges:
        idle += sum(
            g.ms for g in idle_gaps([k for k in kernels if a <= k.start_us and k.end_us <= b], min_gap_ms)
        )
    n = len(ranges)
    return {"comm_ms": ov["comm_ms"] / n, "overlap_pct": ov["overlap_pct"], "idle_ms": idle / n}


def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _length(intervals: Sequence[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(x: Sequence[tuple[float, float]], y: Sequence[tuple[float, float]]) -> float:
    i = j = 0
    total = 0.0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if hi > lo:
            total += hi - lo
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def comm_overlap(kernels: Sequence[Kernel]) -> dict[str, float]:
    """HTA's communication-computation overlap: ``comm_ms`` (communication kernels' busy time),
    ``overlapped_ms`` (of which computation ran at the same time) and ``overlap_pct`` (NaN without
    communication)."""
    comm = _union((k.start_us, k.end_us) for k in kernels if k.kind == "communication")
    comp = _union((k.start_us, k.end_us) for k in kernels if k.kind == "computation")
    c = _length(comm)
    o = _intersection(comm, comp)
    return {"comm_ms": c / 1e3, "overlapped_ms": o / 1e3, "overlap_pct": 100.0 * o / c if c else float("nan")}


@dataclass(frozen=True)
class Gap:
    ms: float
    at_ms: float  # from the first GPU event of the trace
    after: str
    before: str
    beside: dict[str, float]  # short kernel name -> ms it ran on another stream during the gap


def _short(name: str) -> str:
    low = name.lower()
    for key in ("nccl", "ptop", "memcpy", "memset", "barrier", "chunk_scan", "chunk_state", "state_passing",
                "bmm", "cumsum", "causal_conv1d", "rmsnorm", "layer_norm", "gemm", "sm90", "elementwise",
                "gather", "copy"):  # fmt: skip
        if key in low:
            return key
    return name[:40]


def compute_stream(kernels: Sequence[Kernel]):
    """The stream with the most kernel time."""
    busy: dict = defaultdict(float)
    for k in kernels:
        busy[k.stream] += k.end_us - k.start_us
    return max(busy, key=busy.get) if busy else None


def idle_gaps(kernels: Sequence[Kernel], min_gap_ms: float = 0.05) -> list[Gap]:
    """Where the compute stream waits at least ``min_gap_ms`` between two of its kernels, and what ran on
    the other streams meanwhile (in order of time)."""
    if not kernels:
        return []
    main = compute_stream(kernels)
    mains = [k for k in kernels if k.stream == main]
    others = [k for k in kernels if k.stream != main]
    t_first = kernels[0].start_us
    gaps = []
    for prev, nxt in zip(mains, mains[1:], strict=False):
        g0, g1 = prev.end_us, nxt.start_us
        if (g1 - g0) / 1e3 < min_gap_ms:
            continue
        beside: dict[str, float] = defaultdict(float)
        for k in others:
            lo, hi = max(k.start_us, g0), min(k.end_us, g1)
            if hi > lo:
                beside[_short(k.name)] += (hi - lo) / 1e3
        gaps.append(
            Gap((g1 - g0) / 1e3, (g0 - t_first) / 1e3, _short(prev.name), _short(nxt.name), dict(beside))
        )
    return gaps


def summary(kernels: Sequence[Kernel], min_gap_ms: float = 0.05, top: int = 25) -> str:
    """The text ``cpbench trace`` prints."""
    if not kernels:
        return "no GPU events in this trace"
    busy: dict = defaultdict(float)
    for k in kernels:
        busy[k.stream] += (k.end_us - k.start_us) / 1e3
    main = compute_stream(kernels)
    span = (kernels[-1].end_us - kernels[0].start_us) / 1e3
    lines = [f"{len(kernels)} GPU events over {span:.2f} ms; busy ms per stream (compute stream = {main}):"]
    lines += [f"  stream {s}: {b:.2f}" for s, b in sorted(busy.items(), key=lambda x: -x[1])]
    ov = comm_overlap(kernels)
    lines.append(
        f"communication kernels {ov['comm_ms']:.2f} ms, {ov['overlapped_ms']:.2f} ms of it beside computation: "
        f"overlap {ov['overlap_pct']:.1f}% (HTA's definition)"
    )
    gaps = idle_gaps(kernels, min_gap_ms)
    by: dict[str, float] = defaultdict(float)
    for g in gaps:
        for k, v in g.beside.items():
            by[k] += v
        by["(nothing on another stream)"] += max(0.0, g.ms - sum(g.beside.values()))
    lines.append(
        f"compute stream idle in gaps >= {min_gap_ms} ms: {sum(g.ms for g in gaps):.2f} ms in {len(gaps)} gaps; beside them:"
    )
    lines += [f"  {k}: {v:.2f} ms" for k, v in sorted(by.items(), key=lambda x: -x[1])]
    lines.append(f"longest {top} gaps: ms, at ms, after -> before, what ran elsewhere (ms)")
    for g in sorted(gaps, key=lambda g: -g.ms)[:top]:
        beside = ", ".join(f"{k} {v:.2f}" for k, v in sorted(g.beside.items(), key=lambda x: -x[1]))
        lines.append(f"  {g.ms:6.2f} at {g.at_ms:8.2f}  {g.after} -> {g.before}  [{beside}]")
    return "\n".join(lines)
