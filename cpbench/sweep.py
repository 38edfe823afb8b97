"""The loop every rank runs over the cases of a sweep, and the rows rank 0 writes.

For each case, every rank of the world (all CP groups of that cp_size at once, one replica each):

1. skips it, identically on every rank, when :meth:`~cpbench.scenario.Case.skip_reason` says so;
2. sets it up (:func:`cpbench.runner.setup_case`), then **agrees**: the statuses of all ranks are
   gathered over the world before any collective of the layer runs, so a setup failure on one rank
   (``ValueError`` -> skipped, out of memory, anything -> error) is every rank's, and no rank waits
   in a collective for one that gave up;
3. runs the iterations and agrees again (an error *inside* a collective cannot be agreed on: the
   other ranks wait in it until the process-group timeout, which then ends the run with a message
   naming the rank, rather than hanging);
4. runs the all-to-all microbenchmark at the case's message sizes on the same groups, if all is well;
5. gathers every rank's payload on rank 0, which aggregates the row
   (:func:`cpbench.metrics.aggregate`) and appends it to ``results.csv`` (flushed, fsync'ed).

On an out-of-memory error the case is released and the CUDA cache emptied before the next case.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from . import metrics, runner, topology
from .results import ResultsWriter, environment, write_meta
from .scenario import Case, Scenario

_SEVERITY = {"ok": 0, "skipped": 1, "error": 2}


class SweepAborted(Exception):
    """The run cannot go on (a collective timed out, a rank died): the message says which and why."""


@dataclass
class DistEnv:
    """What a rank knows of the world it runs in."""

    rank: int
    world_size: int
    backend: str  # "gloo" | "nccl" | "fake"
    device: torch.device
    groups: dict[int, Any]  # cp_size -> ProcessGroup | LocalGroup | None
    distributed: bool = False  # a torch.distributed world exists
    timeout_s: float = 300.0
    hosts: list[str] = field(default_factory=list)

    @property
    def fake(self) -> bool:
        return self.backend == "fake"

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj)
        except Exception as e:
            raise SweepAborted(_collective_failure(self, e)) from None
        return out


def _collective_failure(env: DistEnv, exc: BaseException) -> str:
    return (
        f"rank {env.rank}: a collective failed or did not complete within timeout_s={env.timeout_s:g} s "
        f"({type(exc).__name__}: {_one_line(exc)}); another rank died, hung or diverged; ending the run"
    )


def _one_line(exc: BaseException, limit: int = 400) -> str:
    s = " ".join(str(exc).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _is_collective_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return bool(re.search(r"timed out|timeout|closed by peer|connection reset|broken pipe", str(exc), re.I))


def _agree(env: DistEnv, status: str, error: str) -> tuple[str, str]:
    """Gather every rank's status; the worst wins, its message prefixed with the rank that had it."""
    got = env.all_gather((status, error))
    worst = max(range(len(got)), key=lambda r: (_SEVERITY[got[r][0]], -r))
    st, err = got[worst]
    if st != "ok" and env.world_size > 1 and st == "error":
        err = f"rank {worst}: {err}"
    return st, err


def _error_text(exc: BaseException) -> str:
    if runner.is_oom(exc):
        return f"out of memory: {_one_line(exc, 300)}"
    return f"{type(exc).__name__}: {_one_line(exc)}"


class Sweep:
    """Runs the cases of a scenario on this rank; rank 0 also writes the results."""

    def __init__(
        self,
        scenario: Scenario,
        env: DistEnv,
        out_dir: Path,
        *,
        profile: str | None = None,
        command: list[str] | None = None,
        progress: bool = True,
        on_row: Callable[[dict], None] | None = None,
    ):
        self.scenario = scenario
        self.env = env
        self.out_dir = Path(out_dir)
        self.profile = profile
        self.command = command or list(sys.argv)
        self.progress = progress
        self.on_row = on_row
        self.rows: list[dict[str, Any]] = []
        self.writer: ResultsWriter | None = None
        self._bench_cache: dict[tuple[int, int], list[float]] = {}
        self.fake_busbw = scenario.run.fake_busbw_gbps if env.fake else None
        #: the links of projection mode across nodes (None: one node, the single-link model)
        self.topology = topology.of_run(scenario.run) if env.fake else None

    # ------------------------------------------------------------------------------------------- rows

    def _base_row(self, case: Case, status: str, error: str = "") -> dict[str, Any]:
        env, lay = self.env, self.scenario.layer
        row = case.key(device=env.device.type, world_size=env.world_size, backend=env.backend)
        row.update(
            status=status,
            error=error,
            case=case.index,
            tokens=case.tokens,
            d_model=lay.d_model,
            head_dim=lay.head_dim,
            d_state=lay.d_state,
            d_conv=lay.d_conv,
            chunk_size=lay.chunk_size,
            warmup=self.scenario.run.warmup,
            iters=self.scenario.run.iters,
            comm_model=metrics.comm_model_label(self.fake_busbw if case.cp_size > 1 else None),
        )
        if self.topology is not None and case.cp_size > 1:
            row["comm_model"] = topology.label(self.topology)
        try:
            _, real = runner.case_cu_seqlens(self.scenario, case)
            row["real_tokens"] = real
            row["real_density"] = real / case.tokens
        except ValueError:
            pass
        try:  # the bytes a case would move are known even when it does not run
            cb = runner.comm_bytes_of(self.scenario, case)
            row["comm_bytes_fwd"] = sum(cb.values())
            row["comm_bytes_bwd"] = row["comm_bytes_fwd"] if case.backward else 0
            row["comm_bytes"] = row["comm_bytes_fwd"] + row["comm_bytes_bwd"]
        except Exception:  # an impossible combination: no bytes to speak of
            pass
        return row

    def _emit(self, row: dict[str, Any]) -> None:
        if self.env.rank != 0:
            return
        self.rows.append(row)
        assert self.writer is not None
        self.writer.append(row)
        if self.on_row is not None:
            self.on_row(row)

    # ------------------------------------------------------------------------------------------- one case

    def _rank_context(self, case: Case) -> runner.RankContext:
        env = self.env
        group = env.groups.get(case.cp_size)
        return runner.RankContext(
            device=env.device,
            group=group,
            rank=env.rank,
            profile=self.profile,
            trace_dir=self.out_dir / "traces" if self.profile == "torch" else None,
            real_group=env.distributed and group is not None,
        )

    def run_case(self, case: Case) -> None:
        env = self.env
        reason = case.skip_reason(None if env.fake else env.world_size) or self._topology_skip(case)
        if reason is not None:
            self._emit(self._base_row(case, "skipped", reason))
            return
        runner.fault_point(env.rank, case.index, "start")
        t0 = time.perf_counter()
        ctx = self._rank_context(case)
        prepared = None
        status, error, oom = "ok", "", False
        try:
            prepared = runner.setup_case(self.scenario, case, ctx)
        except runner.CaseSkipped as e:
            status, error = "skipped", str(e)
        except Exception as e:
            status, error, oom = "error", _error_text(e), runner.is_oom(e)
        status, error = _agree(env, status, error)
        payload = None
        if status == "ok":
            try:
                payload = runner.run_iterations(prepared, self.scenario, ctx)
            except Exception as e:
                if env.distributed and _is_collective_failure(e):
                    raise SweepAborted(_collective_failure(env, e)) from None
                status, error, oom = "error", _error_text(e), runner.is_oom(e)
            status, error = _agree(env, status, error)
        # released outside the except blocks: a live traceback would keep the tensors alive
        runner.release(prepared, env.device, oom=oom)
        prepared = None
        bench = self._microbench(case, ctx) if status == "ok" else {}
        gathered = env.all_gather((payload, bench))
        if status != "ok":
            self._emit(self._base_row(case, status, error))
            return
        payloads = [g[0] for g in gathered]
        bench_series: dict[int, list[list[float]]] = {}
        for _, b in gathered:
            for nb, series in b.items():
                bench_series.setdefault(nb, []).append(series)
        row = self._base_row(case, "ok")
        cb = runner.comm_bytes_of(self.scenario, case)
        row.update(
            metrics.aggregate(
                payloads,
                cp_size=case.cp_size,
                backward=case.backward,
                comm_bytes=cb,
                real_tokens=row.get("real_tokens", case.tokens),
                fake_busbw_gbps=self.fake_busbw,
                bench=bench_series,
                chunks=case.overlap_chunks,
                modeled=self._modeled(case, cb),
                model_label=None if self.topology is None else topology.label(self.topology),
            )
        )
        row["wall_s"] = time.perf_counter() - t0
        self._emit(row)

    def _topology_skip(self, case: Case) -> str | None:
        if case.strategy == "hierarchical" and not self.env.fake and case.cp_size > 1:
            return (
                "strategy hierarchical runs in projection here (--backend fake --topology NxG); "
                "tests/test_hierarchical.py runs it on real process groups"
            )
        return topology.skip_reason(self.topology, case.cp_size)

    def _modeled(self, case: Case, cb: dict[str, int]) -> dict[str, float] | None:
        """Modeled seconds per communication region on the topology's links (None: the single-link model)."""
        if self.topology is None or case.cp_size == 1 or not cb:
            return None
        regions = metrics.comm_regions(cb, case.backward)
        return topology.region_seconds(regions, case.strategy, case.cp_size, self.topology)

    def _microbench(self, case: Case, ctx: runner.RankContext) -> dict[int, list[float]]:
        run = self.scenario.run
        if not (run.microbench and ctx.real_group and case.cp_size > 1):
            return {}
        sizes = sorted(
            {b for r, b in runner.comm_bytes_of(self.scenario, case).items() if r.startswith("a2a")}
        )
        out = {}
        for nb in sizes:
            key = (case.cp_size, nb)
            if key not in self._bench_cache:
                try:
                    self._bench_cache[key] = runner.a2a_microbench(nb, ctx, iters=run.microbench_iters)
                except Exception as e:
                    if _is_collective_failure(e):
                        raise SweepAborted(_collective_failure(self.env, e)) from None
                    raise
            out[nb] = self._bench_cache[key]
        return out

    # ------------------------------------------------------------------------------------------- all cases

    def meta(self, started: datetime, **extra) -> dict[str, Any]:
        env = self.env
        return {
            "scenario": self.scenario.name,
            "scenario_source": self.scenario.source,
            "scenario_text": self.scenario.text,
            "scenario_resolved": self.scenario.to_toml(),
            "overrides": list(self.scenario.overrides),
            "command": self.command,
            "start_time": started.isoformat(timespec="seconds"),
            "backend": env.backend,
            "world_size": env.world_size,
            "device": env.device.type,
            "profile": self.profile,
            "fake_busbw_gbps": self.fake_busbw,
            "hosts": env.hosts,
            "env": environment(),
            **extra,
        }

    def run(self) -> int:
        """Run every case; 0 when no case errored, 1 otherwise (on rank 0; other ranks return 0)."""
        env = self.env
        autotune_env(self.scenario.run.autotune)
        cases = self.scenario.cases()
        started = datetime.now()
        meta = None
        if env.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.writer = ResultsWriter(self.out_dir / "results.csv")
            meta = self.meta(started, status="running", n_cases=len(cases))
            write_meta(self.out_dir / "meta.json", meta)
        progress = _progress(len(cases)) if (env.rank == 0 and self.progress) else None
        status = "complete"
        try:
            if progress is not None:
                progress.start()
                task = progress.add_task("sweep", total=len(cases))
            for case in cases:
                if progress is not None:
                    progress.update(task, description=f"[{case.index + 1}/{len(cases)}] {case.describe()}")
                self.run_case(case)
                if progress is not None:
                    progress.advance(task)
        except BaseException:
            status = "aborted"
            raise
        finally:
            if progress is not None:
                progress.stop()
            if env.rank == 0 and meta is not None:
                meta.update(
                    status=status,
                    end_time=datetime.now().isoformat(timespec="seconds"),
                    n_rows=len(self.rows),
                    counts={s: sum(r["status"] == s for r in self.rows) for s in _SEVERITY},
                )
                write_meta(self.out_dir / "meta.json", meta)
        if env.rank != 0:
            return 0
        return 1 if any(r["status"] == "error" for r in self.rows) else 0


def autotune_env(mode: str) -> None:
    """First-call autotuning (``run.autotune``), set before any Triton kernel is imported: ``cached`` lets
    Triton keep each shape's autotuning result on disk (``TRITON_CACHE_AUTOTUNING=1``, in Triton's cache
    folder ``TRITON_CACHE_DIR``), so a repeated shape is not tuned again, in this run or the next;
    ``deterministic`` sets ``MAMBA_DETERMINISTIC=1`` instead (mamba-ssm tunes one configuration per kernel:
    first calls take seconds, not minutes; its kernels then also reduce deterministically); ``full``
    changes nothing. A variable the user set wins."""
    import os

    if mode == "cached":
        os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    if mode == "deterministic":  # (mamba-ssm tunes every configuration again when both are set)
        os.environ.setdefault("MAMBA_DETERMINISTIC", "1")


def _progress(total: int):
    from .progress import make_progress

    return make_progress(total)
