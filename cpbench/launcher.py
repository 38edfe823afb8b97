"""How a sweep gets its ranks: torchrun, local spawn, or one process (the fake backend).

* **torchrun** (``WORLD_SIZE`` in the environment): the launched ranks are used as they are, one
  node or many: ``torchrun --nproc-per-node 8 -m cpbench sweep scenarios/h100_node.toml``. NCCL
  on GPUs (``torch.cuda.set_device(LOCAL_RANK)``), gloo on CPU.
* **spawn** (no ``WORLD_SIZE``): cpbench starts ``--nproc`` local ranks itself (default: the
  largest cp_size of the sweep) with ``torch.multiprocessing`` (spawn), rendezvous at
  127.0.0.1 on a free port; gloo on CPU, NCCL with one GPU per rank. One rank runs in-process.
* **fake** (``--backend fake``): one process, no process group; each case runs rank 0's real work
  with ``cp_core.comm.LocalGroup(0, cp_size)`` on the local device (GPU if available) and the
  communication is modeled (see :mod:`cpbench.metrics`). Under ``torchrun --nproc-per-node 1`` it
  runs the same way (on GPU ``LOCAL_RANK``); torchrun with more ranks is refused.

Each cp_size of the sweep is realised as CP subgroups of the world (``world / cp`` replicas of
``cp`` consecutive ranks), all created once, collectively, before the first case. Every process
group gets ``run.timeout_s``: a rank that dies or hangs ends the run with a message instead of
hanging it.

Before any rank starts (not under torchrun, whose ranks exist already) the resource guard
(:mod:`cpbench.guard`) checks the ranks against the machine, then the results folder is checked and
locked (:mod:`cpbench.rundir`); both refuse with one line (exit 2). Spawned ranks ignore SIGINT: on
Ctrl-C (or SIGTERM) the launcher terminates every rank (SIGTERM, then SIGKILL after
:data:`STOP_GRACE_S`), marks the run ``interrupted`` and exits 130. A rank that dies is reported
with its cause (the OOM killer when the kernel's OOM-kill count rose) and the run marked ``failed``.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from . import guard, rundir
from .errors import UserError
from .scenario import Scenario
from .sweep import DistEnv, Sweep, SweepAborted

#: Seconds the ranks get to end after SIGTERM before SIGKILL.
STOP_GRACE_S = 3.0


@dataclass
class LaunchOptions:
    out_dir: Path | None = None  # None: results/<scenario>-<stamp>
    nproc: int | None = None
    backend: str | None = None  # None: the scenario's run.backend
    profile: str | None = None
    progress: bool = True
    command: list[str] | None = None
    resource_check: bool = True


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def local_cuda(index: int | None = None) -> torch.device:
    """An indexed CUDA device (``torch.cuda.set_device`` refuses a bare ``"cuda"``): ``index``, else
    torchrun's ``LOCAL_RANK``, else the current device."""
    if index is None:
        index = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else torch.cuda.current_device()
    return torch.device("cuda", index)


def resolve_device(scenario: Scenario) -> torch.device:
    want = scenario.run.device
    if want == "cuda" and not torch.cuda.is_available():
        raise UserError(f'{scenario.source}: run.device = "cuda" but no CUDA device is available')
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def resolve_backend(requested: str | None, scenario: Scenario, device: torch.device) -> str:
    backend = requested or scenario.run.backend
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise UserError("backend nccl needs CUDA devices (run.device is cpu or no GPU is available)")
    if backend == "gloo" and device.type == "cuda":
        raise UserError("backend gloo runs the layer on the CPU: use --set run.device=cpu, or nccl on GPUs")
    return backend


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_groups(scenario: Scenario, world: int, timeout: datetime.timedelta) -> dict[int, object]:
    """CP subgroups of every cp_size of the sweep that tiles the world (collective: all ranks call it)."""
    import torch.distributed as dist

    groups: dict[int, object] = {1: None}
    for cp in sorted(set(scenario.sweep.cp_size)):
        if cp == 1 or cp > world or world % cp:
            continue
        groups[cp], _ = dist.new_subgroups(group_size=cp, timeout=timeout)
    return groups


def _hosts(env: DistEnv) -> list[str]:
    return sorted(set(env.all_gather(socket.gethostname())))


def _set_threads(nproc_local: int) -> None:
    n = max(1, (os.cpu_count() or 1) // max(1, nproc_local))
    torch.set_num_threads(n)


def _run_rank(scenario: Scenario, env: DistEnv, out_dir: Path | None, opts: LaunchOptions) -> int:
    """One rank's whole sweep, in rank 0's results folder."""
    from .results import default_out_dir

    # every rank takes rank 0's folder (collective: all ranks call it, given a folder or not)
    out_dir = Path(env.all_gather(str(out_dir or default_out_dir(scenario.name)))[0])
    env.hosts = _hosts(env)
    sweep = Sweep(scenario, env, out_dir, profile=opts.profile, command=opts.command, progress=opts.progress)
    code = sweep.run()
    if env.rank == 0:
        _finish(sweep)
    return code


def _finish(sweep: Sweep) -> None:
    from .report import print_sweep_summary

    print_sweep_summary(sweep.rows, sweep.out_dir)


def _init_world(
    backend: str, rank: int, world: int, timeout_s: float, init_method: str | None = None
) -> None:
    import torch.distributed as dist

    kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)}
    if init_method is not None:
        kwargs.update(init_method=init_method, rank=rank, world_size=world)
    dist.init_process_group(backend, **kwargs)


def _teardown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the launcher that spawned it dies, however it dies
    (``prctl(PR_SET_PDEATHSIG)``); a launcher already gone ends it now. Elsewhere nothing."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    if not sys.platform.startswith("linux") or parent is None:
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent.pid:  # the launcher died before the signal was armed
        os._exit(1)


def _spawned_rank(
    local_rank: int,
    nproc: int,
    port: int,
    scenario: Scenario,
    backend: str,
    device_type: str,
    out_dir: str,
    opts: LaunchOptions,
    codes,
) -> None:
    """Entry point of a spawned rank (module level: spawn pickles it by name)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    hold = rundir.hold_shared(out_dir) if local_rank == 0 else None  # noqa: F841  (held until exit)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _set_threads(nproc)
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        _init_world(backend, local_rank, nproc, scenario.run.timeout_s, f"tcp://127.0.0.1:{port}")
        timeout = datetime.timedelta(seconds=scenario.run.timeout_s)
        groups = _make_groups(scenario, nproc, timeout)
        env = DistEnv(
            local_rank, nproc, backend, device, groups, distributed=True, timeout_s=scenario.run.timeout_s
        )
        code = _run_rank(scenario, env, Path(out_dir), opts)
        if local_rank == 0:
            codes.put(code)
    except SweepAborted as e:
        print(f"cpbench: error: {e}", file=sys.stderr, flush=True)
        if local_rank == 0:
            rundir.mark_ended(out_dir, "aborted", str(e))
        os._exit(1)
    except Exception as e:
        print(f"cpbench: rank {local_rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        if local_rank == 0:  # best effort: a full disk may refuse this too
            rundir.mark_ended(out_dir, "failed", f"rank 0 failed: {type(e).__name__}: {e}")
        os._exit(1)
    _teardown()


def launch(scenario: Scenario, opts: LaunchOptions) -> int:
    """Run the sweep; the exit code (0: every case ok or skipped, 1: a case errored or the run failed)."""
    from .results import default_out_dir

    device = resolve_device(scenario)
    backend = resolve_backend(opts.backend, scenario, device)
    fake = backend == "fake"
    if under_torchrun():
        if not fake:
            return _launch_torchrun(scenario, opts)
        if int(os.environ["WORLD_SIZE"]) > 1:
            raise UserError(
                f"--backend fake runs in one process, and torchrun started {os.environ['WORLD_SIZE']}: "
                "run it without torchrun, or with torchrun --nproc-per-node 1"
            )
    if device.type == "cuda":
        device = local_cuda()
    nproc = 1 if fake else (opts.nproc or max(scenario.sweep.cp_size))
    if nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {nproc}")
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise UserError(
            f"--nproc {nproc} > {torch.cuda.device_count()} visible GPUs: one rank per GPU "
            f"(use torchrun for several nodes, or --backend fake to project one GPU to cp_size N)"
        )
    if opts.resource_check:
        guard.check(scenario, device, nproc, fake=fake)
    out_dir = Path(opts.out_dir or default_out_dir(scenario.name))
    lock = rundir.prepare_out_dir(out_dir, "--out" if opts.out_dir else "results folder")
    try:
        if device.type == "cuda" and nproc == 1:  # one process (spawned ranks set their own)
            torch.cuda.set_device(device)
        if fake:
            from cp_core.comm import LocalGroup

            groups = {cp: (LocalGroup(0, cp) if cp > 1 else None) for cp in scenario.sweep.cp_size}
            env = DistEnv(0, 1, "fake", device, groups, distributed=False, timeout_s=scenario.run.timeout_s)
            return _run_rank(scenario, env, out_dir, opts)
        if nproc == 1:
            env = DistEnv(
                0, 1, backend, device, {1: None}, distributed=False, timeout_s=scenario.run.timeout_s
            )
            return _run_rank(scenario, env, out_dir, opts)
        lock.share()
        return _spawn(scenario, opts, nproc, backend, device, out_dir)
    except KeyboardInterrupt:
        rundir.mark_ended(out_dir, "interrupted", "interrupted (Ctrl-C or SIGTERM)")
        raise
    finally:
        lock.release()


class _Terminated(KeyboardInterrupt):
    """SIGTERM to the launcher: handled as Ctrl-C."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _stop(processes) -> None:
    """SIGTERM every live rank, then SIGKILL those still alive after STOP_GRACE_S."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for p in processes:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _spawn(
    scenario: Scenario, opts: LaunchOptions, nproc: int, backend: str, device: torch.device, out_dir: Path
) -> int:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    codes = ctx.SimpleQueue()
    port = free_port()
    oom_before = guard.oom_kills()
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    context = None
    try:
        context = mp.start_processes(
            _spawned_rank,
            args=(nproc, port, scenario, backend, device.type, str(out_dir), opts, codes),
            nprocs=nproc,
            join=False,
            start_method="spawn",
        )
        while not context.join(timeout=0.5, grace_period=STOP_GRACE_S):
            pass
    except KeyboardInterrupt:
        if context is not None:
            _stop(context.processes)
        print(f"cpbench: interrupted: every rank stopped (results so far: {out_dir})", file=sys.stderr)
        rundir.mark_ended(out_dir, "interrupted", "interrupted (Ctrl-C or SIGTERM)")
        raise
    except mp.ProcessExitedException as e:
        _stop(context.processes)
        if e.signal_name:
            how = guard.death_cause(e.signal_name, oom_before, guard.oom_kills())
        else:
            how = f"ended with exit code {e.exit_code}"
        print(
            f"cpbench: error: rank {e.error_index} {how}; the run stopped "
            f"(results so far: {out_dir / 'results.csv'})",
            file=sys.stderr,
        )
        rundir.mark_ended(out_dir, "failed", f"rank {e.error_index} {how}")
        return 1
    except mp.ProcessRaisedException as e:
        _stop(context.processes)
        print(f"cpbench: error: rank {e.error_index} failed: {e}", file=sys.stderr)
        rundir.mark_ended(out_dir, "failed", f"rank {e.error_index} failed")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    return codes.get() if not codes.empty() else 1


def _launch_torchrun(scenario: Scenario, opts: LaunchOptions) -> int:
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = resolve_device(scenario)
    backend = resolve_backend(opts.backend, scenario, device)
    if opts.nproc is not None and opts.nproc != world:
        raise UserError(f"--nproc {opts.nproc} contradicts torchrun's WORLD_SIZE={world}")
    if device.type == "cuda":
        device = local_cuda(local_rank)
        torch.cuda.set_device(device)
    else:
        _set_threads(local_world)
    lock = None
    if rank == 0:
        from .results import default_out_dir

        opts.out_dir = Path(opts.out_dir or default_out_dir(scenario.name))
        lock = rundir.prepare_out_dir(opts.out_dir, "--out")
    try:
        _init_world(backend, rank, world, scenario.run.timeout_s)
        groups = _make_groups(scenario, world, datetime.timedelta(seconds=scenario.run.timeout_s))
        env = DistEnv(
            rank, world, backend, device, groups, distributed=True, timeout_s=scenario.run.timeout_s
        )
        return _run_rank(scenario, env, opts.out_dir, opts)
    except SweepAborted as e:
        print(f"cpbench: error: {e}", file=sys.stderr, flush=True)
        if rank == 0:
            rundir.mark_ended(opts.out_dir, "aborted", str(e))
        return 1
    finally:
        _teardown()
        if lock is not None:
            lock.release()
