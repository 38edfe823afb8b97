"""A pool of real gloo ranks on CPU, kept for the whole test session.

``RankPool(world)`` spawns ``world`` processes once; each joins a gloo process group and
creates, collectively, the CP groups ``[0..cp)`` for every ``cp`` in 1, 2, 4, 8 that fits.
``pool.run(fn, cp, *args)`` calls ``fn(group, *args)`` on ranks ``0..cp-1`` and returns their
results in rank order; an exception on any rank is re-raised here with every rank's traceback.
Functions must be importable (module level). Collectives time out (gloo timeout), so a rank that
dies never hangs the suite: the pool is then rebuilt for the next test.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CP_SIZES = (1, 2, 4, 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tasks, results, timeout_s: float) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    groups = {cp: dist.new_group(list(range(cp))) for cp in CP_SIZES if cp <= world}
    results.put((rank, "ready", None))
    while True:
        task = tasks.get()
        if task is None:
            break
        tid, fn, cp, args, kwargs = task
        try:
            out = fn(groups[cp], *args, **kwargs)
            results.put((rank, tid, ("ok", out)))
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            results.put((rank, tid, ("err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world: int = 8, timeout_s: float = 60.0):
        self.world = world
        self.timeout_s = timeout_s
        ctx = mp.get_context("spawn")
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        port = _free_port()
        self.procs = [
            ctx.Process(
                target=_worker, args=(r, world, port, self.tasks[r], self.results, timeout_s), daemon=True
            )
            for r in range(world)
        ]
        for p in self.procs:
            p.start()
        for _ in range(world):
            self.results.get(timeout=180)
        self._tid = 0
        self.broken = False

    def run(self, fn, cp: int, *args, **kwargs) -> list:
        if cp > self.world:
            raise ValueError(f"cp {cp} > pool world {self.world}")
        self._tid += 1
        tid = self._tid
        for r in range(cp):
            self.tasks[r].put((tid, fn, cp, args, kwargs))
        got: dict[int, tuple] = {}
        while len(got) < cp:
            try:
                rank, t, res = self.results.get(timeout=self.timeout_s * 2 + 30)
            except queue.Empty as e:
                self.broken = True
                raise TimeoutError(
                    f"{fn.__name__} on cp={cp}: ranks {sorted(set(range(cp)) - set(got))} never answered"
                ) from e
            if t == tid:
                got[rank] = res
        errors = {r: res[1] for r, res in got.items() if res[0] == "err"}
        if errors:
            if len(errors) < cp:
                self.broken = True  # the others may have timed out in a collective
            raise RankError(errors)
        return [got[r][1] for r in range(cp)]

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


class RankError(Exception):
    def __init__(self, errors: dict[int, str]):
        self.errors = errors
        first = errors[min(errors)]
        super().__init__(f"ranks {sorted(errors)} raised; rank {min(errors)}:\n{first}")

    def all_messages(self) -> list[str]:
        return [self.errors[r] for r in sorted(self.errors)]


def raises_everywhere(pool, fn, cp: int, text: str, *args) -> None:
    """``pool.run(fn, cp, *args)`` must end with a ValueError containing ``text`` on every one of the
    ``cp`` ranks (a rank that did not raise would leave the others waiting in a collective)."""
    try:
        pool.run(fn, cp, *args)
    except RankError as err:
        raised, msgs = sorted(err.errors), err.all_messages()
    else:
        raise AssertionError(f"no rank raised; expected ValueError containing {text!r}")
    assert len(msgs) == cp, f"only ranks {raised} raised: every rank must"
    for m in msgs:
        # CPConfigError: cp_core.mamba_cp's ValueError that is also an AssertionError
        assert m.startswith(("ValueError", "CPConfigError")) and text in m, m


def verdict(ok: bool, group) -> bool:
    """The group's verdict: True only if every rank's ``ok`` is True (so all ranks agree and none hangs)."""
    nccl = dist.get_backend(group) == "nccl"
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device="cuda" if nccl else "cpu")
    if dist.get_world_size(group) > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())
