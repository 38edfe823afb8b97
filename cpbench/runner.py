"""One case on one rank: build the layer and its inputs, warm up, time the measured iterations.

The work is split so the sweep can make every rank agree before anything can diverge:

* :func:`setup_case` builds the ``cp_core.mixer.Mamba2Mixer`` (a ``ValueError`` from its
  constructor is an impossible combination: :class:`CaseSkipped`), this rank's local input shard
  (random: values do not change the timing; generated directly in its local shape), the global
  padded ``cu_seqlens`` of packed cases (:mod:`cpbench.packing`), and the output gradient;
* :func:`run_iterations` runs ``warmup`` untimed then ``iters`` timed iterations. Each one starts
  with a device synchronize and a tiny all-reduce over the CP group (so ranks enter the layer
  together and a collective's time is not another rank's lateness), then ``layer_fwd``
  (``mixer(x, cu_seqlens)``; under ``torch.no_grad`` for the ``fwd`` pass) and for ``fwd+bwd``
  ``layer_bwd`` (``out.backward(grad)``), then a synchronize, then the timer's events are read;
* :func:`a2a_microbench` times ``dist.all_to_all_single`` with equal splits at a given message
  size on the same group: the achievable baseline of the layer's all-to-alls.

Profilers: ``nsys`` wraps the measured iterations in ``torch.cuda.profiler.start()/stop()``
(cudaProfilerStart/Stop, for ``nsys profile -c cudaProfilerApi``) inside an NVTX range naming the
case; ``torch`` runs them under ``torch.profiler.profile`` and writes one Chrome/Perfetto trace per
case and rank, the regions appearing as ``record_function`` ranges of the same names (kineto's own
console lines are silenced with ``KINETO_LOG_LEVEL=6`` unless the variable is set).

Load reference (``run.load_ref``, default on): every measured iteration also times
:class:`LoadReference`, a fixed torch workload that calls no ``cp_core`` code (a two-layer MLP's
forward and backward on a ``[256, 64]`` float32 batch, 4 times: the same on every case, rank and
run, about 2.8 ms on one idle core of the 2-core CPU; each pass ends in a one-element all-reduce on
the case's group where it has more than one rank), once just before the layer (after the group's
line-up) and once just after it (after another), outside every region and outside the slow-down
hook below. The two halves bracket the layer in time, so they share the load it ran under; the row's ``ref_ms``
/ ``ref_ms_samples`` are the pair's time per iteration, like ``layer_ms`` (the slowest rank per
iteration; its median). ``cpbench compare`` judges ``layer_ms / ref_ms`` where both sides have it
(:mod:`cpbench.compare`). It adds about 5.6 ms per measured iteration (none to warm-up ones: the
first measured iteration's reference runs after one untimed call). Its size was chosen by measurement
(exploratory runs before ``results/cpu-compare-gate-20261202``, not kept): a 0.7 ms half moved more between runs of the same code
than the layer did, under load.

Fault injection for tests of the harness: ``CPBENCH_FAULT=RANK:CASE:WHAT`` makes global rank RANK,
at case index CASE, ``raise`` in setup, ``exit`` (the process dies) or ``hang`` (sleeps).

Slow-down hook for tests of ``cpbench compare``: ``CPBENCH_SLOWDOWN=F`` (a number >= 1) makes every
rank spin, inside ``layer_fwd`` and ``layer_bwd``, for ``F - 1`` times the time the layer's work in
that region took, so the layer's measured time is ``F`` times what it was (a busy wait on the CPU,
like extra compute; on a GPU after a synchronize). Read here only, never by ``cp_core``; a run made
with it records the value in ``meta.json`` (``env.settings``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import trace
from .metrics import NAN
from .packing import batch_cu_seqlens
from .scenario import Case, Scenario
from .timing import RegionTimer, nvtx_wanted, synchronize

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CaseSkipped(Exception):
    """The layer refused the combination (``ValueError`` from its constructor): the reason."""


@dataclass
class RankContext:
    """Where one rank runs a case."""

    device: torch.device
    group: Any  # torch ProcessGroup, cp_core.comm.LocalGroup, or None (cp_size 1)
    rank: int = 0  # global rank
    profile: str | None = None  # None | "nsys" | "torch"
    trace_dir: Path | None = None
    timer: RegionTimer | None = None
    real_group: bool = False  # group is a torch.distributed group (barriers and microbenchmarks use it)


@dataclass
class Prepared:
    case: Case
    mixer: Any
    config: Any
    x: torch.Tensor
    cu_seqlens: torch.Tensor | None
    grad: torch.Tensor | None
    real_tokens: int
    extra: dict = field(default_factory=dict)


def fault_point(rank: int, case_index: int, where: str) -> None:
    spec = os.environ.get("CPBENCH_FAULT")
    if not spec:
        return
    try:
        r, c, what = spec.split(":")
        r, c = int(r), int(c)
    except ValueError:
        return
    if r != rank or c != case_index:
        return
    if what == "raise" and where == "setup":
        raise RuntimeError(f"injected fault (CPBENCH_FAULT={spec})")
    if what == "exit" and where == "start":
        os._exit(3)
    if what == "hang" and where == "run":
        while True:
            time.sleep(1)


def mixer_config(scenario: Scenario, case: Case):
    from cp_core.mixer import Mamba2Config

    lay = scenario.layer
    return Mamba2Config(
        d_model=lay.d_model,
        n_heads=case.n_heads,
        head_dim=lay.head_dim,
        n_groups=case.n_groups,
        d_state=lay.d_state,
        d_conv=lay.d_conv,
        chunk_size=lay.chunk_size,
    )


def case_cu_seqlens(scenario: Scenario, case: Case, device=None) -> tuple[torch.Tensor | None, int]:
    """``(cu_seqlens or None, real tokens)`` of a case: packs are the same on every rank and cp_size."""
    if not case.packing.packed:
        return None, case.tokens
    return batch_cu_seqlens(
        case.seq_len,
        case.packing.docs,
        case.packing.density,
        case.pack_granule,
        count=case.batch,
        seed=scenario.run.seed,
        device=device,
    )


def comm_bytes_of(scenario: Scenario, case: Case, config=None) -> dict[str, int]:
    """Bytes per rank per forward of each communication region (cp_core.cost.comm_bytes)."""
    from cp_core.cost import comm_bytes

    if case.cp_size == 1:
        return {}
    config = config if config is not None else mixer_config(scenario, case)
    elem = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    n_docs = None
    if case.packing.packed:
        cu, _ = case_cu_seqlens(scenario, case)
        n_docs = cu.numel() - 1
    out = comm_bytes(
        config,
        case.cp_size,
        case.local_tokens,
        elem,
        strategy=case.strategy,
        batch=case.comm_batch,
        layout=case.layout,
        n_docs=n_docs,
        grid=grid_of(scenario, case) if case.strategy == "hierarchical" else None,
    )
    return {k: int(v) for k, v in out.items() if v}


def grid_of(scenario: Scenario, case: Case) -> tuple[int, int]:
    """``(nodes, gpus)`` of a hierarchical case: the nodes of ``run.topology`` it fills (one node without one)."""
    from .topology import of_run

    topo = of_run(scenario.run)
    grid = None if topo is None else topo.grid(case.cp_size)
    return grid if grid is not None else (1, case.cp_size)


def _cp_group(scenario: Scenario, case: Case, group):
    """The layer's CP group: the rank's group, or for a hierarchical case its (node, gpu) pair of one-process
    groups (projection mode: rank 0 of node 0)."""
    if case.strategy != "hierarchical":
        return group
    from cp_core.comm import LocalGroup

    if case.cp_size > 1 and not isinstance(group, LocalGroup):
        raise CaseSkipped("strategy hierarchical runs in projection here (--backend fake)")
    nodes, gpus = grid_of(scenario, case)
    copy = group.copy if isinstance(group, LocalGroup) else True
    return tuple(LocalGroup(0, n, copy) if n > 1 else None for n in (nodes, gpus))


def setup_case(scenario: Scenario, case: Case, ctx: RankContext) -> Prepared:
    from cp_core.mixer import Mamba2Mixer

    from .peers import PeerUnavailable, build_peer

    fault_point(ctx.rank, case.index, "setup")
    dtype = DTYPES[case.dtype]
    config = mixer_config(scenario, case)
    torch.manual_seed(scenario.run.seed)  # the same (replicated) parameters on every rank
    try:
        mixer = Mamba2Mixer(
            config,
            cp_group=_cp_group(scenario, case, ctx.group),
            layout=case.layout,
            device=ctx.device,
            dtype=dtype,
            strategy=case.strategy,
            fused=case.path == "fused",
            overlap_chunks=case.overlap_chunks,
        )
    except ValueError as e:
        raise CaseSkipped(str(e)) from None
    if case.impl != "cp_core":  # a peer with our weights (mamba-ssm's parameter names)
        try:
            mixer = build_peer(case.impl, mixer, ctx.group, ctx.device, dtype)
        except PeerUnavailable as e:
            raise CaseSkipped(f"impl {case.impl}: {e}") from None
    cu, real_tokens = case_cu_seqlens(scenario, case, device=ctx.device)
    shape = (
        (case.local_tokens, scenario.layer.d_model)
        if cu is not None
        else (
            case.batch,
            case.seq_len // case.cp_size,
            scenario.layer.d_model,
        )
    )
    gen = torch.Generator(device=ctx.device)
    gen.manual_seed(scenario.run.seed * 1_000_003 + ctx.rank)
    x = torch.randn(shape, generator=gen, device=ctx.device, dtype=dtype)
    grad = None
    if case.backward:
        x.requires_grad_(True)
        grad = torch.randn(shape, generator=gen, device=ctx.device, dtype=dtype)
    return Prepared(case, mixer, config, x, cu, grad, real_tokens)


def _group_sync(ctx: RankContext) -> None:
    """Synchronize the device, then line the group's ranks up (outside every timed region)."""
    synchronize(ctx.device)
    if ctx.real_group:
        import torch.distributed as dist

        t = torch.zeros(1, device=ctx.device)
        dist.all_reduce(t, group=ctx.group)
        synchronize(ctx.device)


SLOWDOWN_ENV = "CPBENCH_SLOWDOWN"


def slowdown_factor() -> float:
    """``CPBENCH_SLOWDOWN`` as a number >= 1 (1: unset); a malformed value is a ``ValueError``."""
    text = os.environ.get(SLOWDOWN_ENV, "").strip()
    if not text:
        return 1.0
    try:
        f = float(text)
    except ValueError:
        f = float("nan")
    if not (f >= 1.0 and f < float("inf")):
        raise ValueError(
            f"{SLOWDOWN_ENV}={text!r}: expected a number >= 1 (the factor the layer is slowed by)"
        )
    return f


@contextlib.contextmanager
def _slowed(device: torch.device, factor: float):
    """Inside a timed region: after the work, spin for ``factor - 1`` times its duration."""
    if factor == 1.0:
        yield
        return
    synchronize(device)
    t0 = time.perf_counter()
    yield
    synchronize(device)
    until = time.perf_counter() + (factor - 1.0) * (time.perf_counter() - t0)
    while time.perf_counter() < until:
        pass


class LoadReference:
    """A fixed workload that tracks how fast this process runs right now (the machine's load), and no
    ``cp_core`` code: a two-layer MLP (``64 -> 256 -> 64``, SiLU, tanh and a residual) forward and
    backward on a fixed ``[256, 64]`` float32 batch, seeded, on the case's device. Its size does not
    depend on the case, so its time is a series of the load over a run and comparable between runs.

    With a ``group`` of more than one rank (the case's CP group), every pass ends in a one-element
    all-reduce on it, so the reference also pays what the layer's exchanges pay when the ranks are not
    all running at once: on an oversubscribed CPU a rendezvous waits for a descheduled peer, a cost a
    rank-local workload never sees (the compare gate's same-code run under a load burst failed in CI on
    2026-12-02 with the cp 2 cases x1.75 against a compute-only reference, the cp 1 cases x0.92-1.04)."""

    ROWS, WIDTH, HIDDEN = 256, 64, 256
    REPEATS = 4  # per call: a call takes about 2.8 ms on one idle core of the 2-core CPU

    def __init__(self, device: torch.device, group: Any = None):
        gen = torch.Generator().manual_seed(12345)
        self.device = device
        self.group = group
        self.token = torch.zeros(1, device=device)
        self.x = torch.randn(self.ROWS, self.WIDTH, generator=gen).to(device)
        self.w1 = (torch.randn(self.WIDTH, self.HIDDEN, generator=gen) / 8).to(device).requires_grad_(True)
        self.w2 = (torch.randn(self.HIDDEN, self.WIDTH, generator=gen) / 16).to(device).requires_grad_(True)
        self._run()  # untimed: the first call allocates (and forms the group's connection)

    def _run(self) -> None:
        with torch.enable_grad():
            for _ in range(self.REPEATS):
                h = torch.nn.functional.silu(self.x @ self.w1)
                y = torch.tanh(h @ self.w2) + self.x
                y.sum().backward()
                self.w1.grad = self.w2.grad = None
                if self.group is not None:
                    import torch.distributed as dist

                    dist.all_reduce(self.token, group=self.group)

    def __call__(self) -> float:
        """Run the workload once; its seconds (device synchronized at both ends)."""
        synchronize(self.device)
        t0 = time.perf_counter()
        self._run()
        synchronize(self.device)
        return time.perf_counter() - t0


def _ref_group(ctx: RankContext) -> Any:
    """The group the load reference meets on: the case's, where it is a real one of more than one rank."""
    if not ctx.real_group:
        return None
    import torch.distributed as dist

    return ctx.group if dist.get_world_size(ctx.group) > 1 else None


def _step(p: Prepared, timer: RegionTimer, slow: float = 1.0) -> None:
    dev = p.x.device
    if p.case.backward:
        with timer("layer_fwd"), _slowed(dev, slow):
            out = p.mixer(p.x, p.cu_seqlens) if p.cu_seqlens is not None else p.mixer(p.x)
        with timer("layer_bwd"), _slowed(dev, slow):
            out.backward(p.grad)
    else:
        with torch.no_grad(), timer("layer_fwd"), _slowed(dev, slow):
            out = p.mixer(p.x, p.cu_seqlens) if p.cu_seqlens is not None else p.mixer(p.x)
    del out


def _clear_grads(p: Prepared) -> None:
    p.x.grad = None
    for param in p.mixer.parameters():
        param.grad = None


def run_iterations(p: Prepared, scenario: Scenario, ctx: RankContext) -> dict[str, Any]:
    """Warm up, then time ``iters`` iterations; the rank's payload for :func:`cpbench.metrics.aggregate`."""
    from cp_core.comm import COUNTS

    from .timing import installed

    run = scenario.run
    slow = slowdown_factor()
    timer = ctx.timer or RegionTimer(
        ctx.device, nvtx=nvtx_wanted(ctx.profile, ctx.device), record_function=ctx.profile == "torch"
    )
    cuda = ctx.device.type == "cuda"
    ref = LoadReference(ctx.device, _ref_group(ctx)) if run.load_ref else None
    ref_s: list[float] = []
    fault_point(ctx.rank, p.case.index, "run")
    with installed(timer):
        t_warm = time.perf_counter()
        if ctx.rank == 0 and cuda and run.warmup:
            print(
                f"case {p.case.index}: warming up ({run.warmup} iterations; the first call of each new shape "
                f"autotunes Triton kernels, autotune={run.autotune})",
                file=sys.stderr,
                flush=True,
            )
        for _ in range(run.warmup):
            _group_sync(ctx)
            timer.start_iteration(measure=False)
            _step(p, timer, slow)
            synchronize(ctx.device)
            timer.stop_iteration()
            _clear_grads(p)
        warmup_s = time.perf_counter() - t_warm
        if ctx.rank == 0 and cuda and run.warmup:
            print(f"case {p.case.index}: warm-up took {warmup_s:.1f} s", file=sys.stderr, flush=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        regions: dict[str, list[float]] = {}
        n_coll = 0
        traced = None
        with contextlib.ExitStack() as stack:
            if ctx.profile == "nsys" and cuda:
                # the capture starts first: nsys records no NVTX range opened before it (the case's range
                # was missing from the H200 session's reports of 2026-12-02)
                torch.cuda.profiler.start()
                stack.callback(torch.cuda.profiler.stop)
            stack.enter_context(timer.mark(f"case {p.case.index}: {p.case.describe()}"))
            prof = None
            if ctx.profile == "torch":
                # kineto prints a "USDT: ... profiler_start/stop" line per case and rank at its level 5;
                # 6 keeps the console quiet (a user's own KINETO_LOG_LEVEL wins)
                os.environ.setdefault("KINETO_LOG_LEVEL", "6")
                acts = [torch.profiler.ProfilerActivity.CPU]
                if cuda:
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                prof = stack.enter_context(torch.profiler.profile(activities=acts))
            for it in range(run.iters):
                _group_sync(ctx)
                COUNTS.clear()
                before = ref() if ref is not None else 0.0  # outside the iteration's regions and trace range
                timer.start_iteration(measure=True)
                with (
                    torch.profiler.record_function(trace.ITERATION)
                    if prof is not None
                    else contextlib.nullcontext()
                ):
                    _step(p, timer, slow)
                synchronize(ctx.device)
                times = timer.stop_iteration()
                if ref is not None:
                    _group_sync(ctx)  # untimed: a rank that left the layer first does not wait inside ref
                    ref_s.append(before + ref())
                n_coll = sum(COUNTS.values())
                for name in set(regions) | set(times):
                    regions.setdefault(name, [0.0] * it).append(times.get(name, 0.0))
                _clear_grads(p)
        if prof is not None and ctx.trace_dir is not None:
            ctx.trace_dir.mkdir(parents=True, exist_ok=True)
            path = ctx.trace_dir / f"case{p.case.index:04d}-rank{ctx.rank}.json"
            prof.export_chrome_trace(str(path))
            traced = trace.case_stats(path)
        peak = float(torch.cuda.max_memory_allocated(ctx.device)) if cuda else NAN
        nocomm, nocomm_fwd = (
            _layer_without_comm(p, scenario, ctx, timer) if _wants_nocomm(p, scenario) else (None, None)
        )
    backends = dict(getattr(p.mixer, "backends", {}) or {})
    return {
        "iters": run.iters,
        "regions": regions,
        "ref": ref_s,
        "peak_mem_bytes": peak,
        "backends": backends,
        "n_collectives": n_coll,
        "warmup_s": warmup_s,
        "nocomm": nocomm,
        "nocomm_fwd": nocomm_fwd,
        "trace": traced,
    }


def _wants_nocomm(p: Prepared, scenario: Scenario) -> bool:
    return scenario.run.exposed_comm and p.case.cp_size > 1 and p.case.impl == "cp_core"


def _layer_without_comm(
    p: Prepared, scenario: Scenario, ctx: RankContext, timer: RegionTimer
) -> tuple[list[float], list[float]]:
    """Per-iteration layer seconds with every collective of cp_core suppressed (after one warm-up
    iteration): the layer's compute and copies alone, and the forward's part of it. ``layer - this`` is
    the exposed communication."""
    from cp_core.comm import suppressed

    out, fwd = [], []
    with suppressed():
        for it in range(scenario.run.iters + 1):
            _group_sync(ctx)
            timer.start_iteration(measure=it > 0)
            _step(p, timer, slowdown_factor())
            synchronize(ctx.device)
            times = timer.stop_iteration()
            _clear_grads(p)
            if it > 0:
                out.append(times.get("layer_fwd", 0.0) + times.get("layer_bwd", 0.0))
                fwd.append(times.get("layer_fwd", 0.0))
    return out, fwd


def a2a_microbench(nbytes: int, ctx: RankContext, *, warmup: int = 5, iters: int = 20) -> list[float]:
    """Seconds of each of ``iters`` equal-split ``all_to_all_single`` of ``nbytes`` per rank on the group."""
    import torch.distributed as dist

    cp = dist.get_world_size(ctx.group)
    numel = -(-nbytes // cp) * cp
    src = torch.empty(numel, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    cuda = ctx.device.type == "cuda"
    for _ in range(warmup):
        dist.all_to_all_single(dst, src, group=ctx.group)
    _group_sync(ctx)
    out = []
    if cuda:
        events = []
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dist.all_to_all_single(dst, src, group=ctx.group)
            b.record()
            events.append((a, b))
        synchronize(ctx.device)
        out = [a.elapsed_time(b) / 1e3 for a, b in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            dist.all_to_all_single(dst, src, group=ctx.group)
            out.append(time.perf_counter() - t0)
    return out


def release(p: Prepared | None, device: torch.device, oom: bool = False) -> None:
    """Drop a case's tensors; after an out-of-memory error, also return the cached blocks."""
    if p is not None:
        p.mixer = p.x = p.grad = p.cu_seqlens = None
    if device.type == "cuda":
        if oom:
            import gc

            gc.collect()
            torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()
