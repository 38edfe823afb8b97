"""The resource guard: will a sweep's ranks fit this machine? Asked before any rank starts.

Three checks, each against what the machine reports now:

* **cores**: CPU ranks (gloo) get at most one core each (the cores this process may run on). More
  ranks than cores time-slice the cores: a collective then waits for a rank that is not scheduled,
  and every figure measures the scheduler.
* **GPUs**: one rank per GPU (the launcher refuses more ranks than GPUs).
* **memory**: an estimate of the largest runnable case, per rank (:func:`case_bytes`), times the
  local ranks, against the available RAM (``MemAvailable``) on CPU, or against each GPU's free
  memory. Every rank of the world runs every case (``world / cp_size`` replicas), so the largest
  case sets the peak. On CUDA with mamba-ssm and causal-conv1d installed (the layer's fast kernels)
  the estimate walks the tensors the layer's code allocates, kernels' transient buffers included
  (:mod:`cpbench.memory`; held within 0.7x-1.5x of every committed ``peak_mem_GiB`` by the tests);
  elsewhere (CPU, or the torch reference kernels) it is the sum below.

A scenario that fails a check is refused (exit 2) with the numbers and the way out
(``--no-resource-check``, a smaller ``--nproc``, smaller ``--set`` values). The estimate is the sum
of the tensors the layer holds at its peak, from the layer's shape; it is an estimate, checked
against the measured peak resident memory of real CPU runs by the tests, not a bound.

A rank that dies of SIGKILL is named as killed by the kernel's out-of-memory killer when the
kernel's OOM-kill counters (``/proc/vmstat`` ``oom_kill``; the cgroup's ``memory.events``) rose
during the run (:func:`oom_kills`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .scenario import Case, Scenario

GIB = 2**30
ELEMENT_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Machine:
    cpus: int
    ram_available: int | None  # bytes, None when unknown
    gpu_free: list[int]  # bytes free per visible GPU


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def ram_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (bytes), lowered to a cgroup memory limit when one is set."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v2: the limit minus what the group uses
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            room = int(limit) - used
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def machine(device: torch.device) -> Machine:
    gpu_free = []
    if device.type == "cuda":
        for i in range(torch.cuda.device_count()):
            gpu_free.append(int(torch.cuda.mem_get_info(i)[0]))
    return Machine(cpus=cpu_cores(), ram_available=ram_available(), gpu_free=gpu_free)


def fast_kernels() -> bool:
    """mamba-ssm and causal-conv1d are installed (looked up, not imported: importing mamba-ssm's Triton
    modules fixes their autotuning before the sweep sets ``MAMBA_DETERMINISTIC``)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("mamba_ssm", "causal_conv1d"))


def case_bytes(scenario: Scenario, case: Case, device: str = "cpu") -> int:
    """Estimated peak bytes one rank holds while running ``case``: on ``device="cuda"`` with the fast
    kernels, :func:`cpbench.memory.case_peak`; else the sum of the layer's tensors at its peak:

    * parameters: in_proj, out_proj, conv1d, per-head A/D/dt_bias, the norm (x3 with a backward:
      gradients, and the gradient buffers of the step);
    * activations over the rank's tokens ``T``: the input and output ``[T, d_model]``, the projection
      ``[T, d_in_proj]`` and its re-laid-out copy around the collective, the conv input and output
      ``[T, conv_dim]``, the SSD output, the gate, the norm and its fp32 products ``[T, d_inner]``;
    * the SSD (hidden-parallel: every token of the sequence for ``n_heads / cp`` heads; state
      passing: the rank's tokens for all heads), in fp32: four ``[chunk, chunk]`` matrices per
      chunk and head (log-decay differences, decay, scores, masked scores) and a boolean mask, the
      chunk states ``[head_dim, d_state]`` per chunk and head, and an fp32 output;
    * with a backward, autograd keeps the forward's activations and makes their gradients: x2.
    """
    if device == "cuda" and fast_kernels():
        from .memory import case_peak

        return case_peak(scenario, case)
    lay = scenario.layer
    elem = ELEMENT_SIZE.get(case.dtype, 4)
    nh, ng, hd, ds, ch = case.n_heads, case.n_groups, lay.head_dim, lay.d_state, lay.chunk_size
    d_inner = nh * hd
    conv_dim = d_inner + 2 * ng * ds
    d_in_proj = 2 * d_inner + 2 * ng * ds + nh
    cp = case.cp_size
    tokens = case.tokens // cp  # this rank's tokens (all sequences of the batch, or the packs)
    params = lay.d_model * d_in_proj + d_inner * lay.d_model + conv_dim * (lay.d_conv + 1) + 4 * nh + d_inner
    act = tokens * (2 * lay.d_model + 2 * d_in_proj + 2 * conv_dim + 5 * d_inner)
    if case.strategy == "hidden" and cp > 1:
        ssd_tokens, ssd_heads = tokens * cp, max(1, nh // cp)
    else:
        ssd_tokens, ssd_heads = tokens, nh
    ssd = 4 * ssd_tokens * ssd_heads * (4 * ch + hd) + 4 * (ssd_tokens // ch + 1) * ssd_heads * hd * ds
    ssd += ssd_tokens * ssd_heads * ch  # the boolean causal/document mask
    total = params * elem + act * elem + ssd
    if case.backward:
        total = 3 * params * elem + 2 * (act * elem + ssd)
    return int(total)


def largest_case(scenario: Scenario, world: int | None, device: str = "cpu") -> tuple[Case, int] | None:
    """The runnable case with the largest estimate, and the estimate (``None``: nothing runs). On CUDA a
    case the layer refuses before allocating (a tensor past 2^31 elements) does not count."""
    best = None
    walk = device == "cuda" and fast_kernels()
    for case in scenario.cases():
        if case.skip_reason(world) is not None:
            continue
        if walk:
            from .memory import layer_of, layer_refuses, work_of

            if layer_refuses(layer_of(scenario, case), work_of(scenario, case)):
                continue
        b = case_bytes(scenario, case, device)
        if best is None or b > best[1]:
            best = (case, b)
    return best


def _gib(b: float) -> str:
    return f"{b / GIB:.1f} GiB" if b >= GIB / 10 else f"{b / 2**20:.0f} MiB"


def check(scenario: Scenario, device: torch.device, nproc: int, fake: bool = False, mach=None) -> None:
    """Raise :class:`UserError` (one line) when ``nproc`` local ranks of ``scenario`` cannot fit."""
    mach = mach or machine(device)
    problems = []
    if device.type == "cpu" and nproc > mach.cpus:
        problems.append(f"{nproc} ranks on {mach.cpus} CPU core(s) (one core per rank at most)")
    largest = largest_case(scenario, None if fake else nproc, device.type)
    if largest is not None:
        case, per_rank = largest
        what = f"case {case.index} ({case.describe()}) needs ~{_gib(per_rank)} per rank (estimate)"
        if device.type == "cuda":
            tight = [i for i, free in enumerate(mach.gpu_free[:nproc]) if per_rank > free]
            if tight:
                free = min(mach.gpu_free[i] for i in tight)
                problems.append(f"{what} > {_gib(free)} free on GPU {tight[0]}")
        elif mach.ram_available is not None and per_rank * nproc > mach.ram_available:
            problems.append(
                f"{what}, x{nproc} rank(s) = {_gib(per_rank * nproc)} > {_gib(mach.ram_available)} "
                f"available RAM"
            )
    if problems:
        raise UserError(
            f"scenario {scenario.name!r} does not fit this machine: {'; '.join(problems)}; "
            f"use a smaller --nproc or --set values, or --no-resource-check to run it anyway"
        )


def oom_kills() -> int | None:
    """The kernel's count of out-of-memory kills (system-wide plus this cgroup's), ``None`` if unknown."""
    total, known = 0, False
    for path, key in (("/proc/vmstat", "oom_kill"), ("/sys/fs/cgroup/memory.events", "oom_kill")):
        try:
            for line in Path(path).read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0] == key:
                    total += int(parts[1])
                    known = True
        except (OSError, ValueError):
            continue
    return total if known else None


def death_cause(signal_name: str | None, oom_before: int | None, oom_after: int | None) -> str:
    """Words for how a rank died: the OOM killer when a SIGKILL came with a rise of the OOM-kill count."""
    if (
        signal_name == "SIGKILL"
        and oom_before is not None
        and oom_after is not None
        and oom_after > oom_before
    ):
        return "was killed by the kernel's out-of-memory killer (SIGKILL): the case needs more memory than is free"
    if signal_name == "SIGKILL":
        return "ended with signal SIGKILL (the kernel's OOM-kill count did not rise: killed by someone)"
    if signal_name:
        return f"ended with signal {signal_name}"
    return ""
