"""Cost of the cross-rank input agreement (cp_core.agree) per batch, against one mixer layer, on gloo/CPU.

    python3 scripts/agree_cost.py [--cp 2] [--iters 200]

Every rank runs the same loop; rank 0 prints medians (after a warm-up) of:

* ``agree``: the one all-gather of the fingerprints and the host read of the result (64 documents);
* ``checked_plan, new batch``: plan build (reads ``cu_seqlens`` once) + agreement, beside
  ``get_plan, new batch``: the plan build alone, as before the agreement existed;
* ``checked_plan, cached``: what every later layer of the batch pays (a dict lookup);
* ``one mixer layer forward``: hidden strategy, packed, at the shape below.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _median_s(fn, iters: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _worker(rank: int, cp: int, port: int, iters: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=cp,
        timeout=datetime.timedelta(60),
    )
    from cp_core.agree import agree, checked_plan
    from cp_core.layout import shard
    from cp_core.mixer import Mamba2Config, Mamba2Mixer
    from cp_core.plan import get_plan

    group = dist.group.WORLD
    g = 2 * cp
    lens = [g * (1 + i % 7) for i in range(64)]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    total = int(cu[-1])
    fields = {"call": "mixer", "strategy": "hidden", "width": 256, "dtype": "torch.float32", "config": "c"}
    host = tuple(cu.tolist())
    res = {"agree (all-gather + host read)": _median_s(lambda: agree(group, fields, host), iters)}

    def new_batch(check: bool):
        c = cu.clone()  # a new tensor: a plan cache miss, as for a new batch
        if check:
            checked_plan(group, "head_tail", 1, total, "cpu", c, fields)
        else:
            get_plan(cp, "head_tail", 1, total, "cpu", c)

    res["get_plan, new batch (before)"] = _median_s(lambda: new_batch(False), iters)
    res["checked_plan, new batch"] = _median_s(lambda: new_batch(True), iters)
    res["checked_plan, cached (every later layer)"] = _median_s(
        lambda: checked_plan(group, "head_tail", 1, total, "cpu", cu, fields), iters
    )
    cfg = Mamba2Config(d_model=256, n_heads=8, head_dim=32, n_groups=2, d_state=64, chunk_size=64)
    m = Mamba2Mixer(cfg, cp_group=group)
    m.reset_parameters(torch.Generator().manual_seed(0))
    x = shard(torch.randn(total, 256, generator=torch.Generator().manual_seed(1)), rank, cp, "head_tail", cu)
    with torch.no_grad():
        res[f"one mixer layer forward ({x.shape[0]} tokens/rank)"] = _median_s(lambda: m(x, cu), 10, warmup=2)
    if rank == 0:
        print(
            f"gloo on CPU, cp {cp}, torch {torch.__version__}, {os.cpu_count()} CPUs; median of {iters} (layer: 10)"
        )
        for k, v in res.items():
            print(f"  {k:48s} {v * 1e6:10.1f} us")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cp", type=int, default=2)
    ap.add_argument("--iters", type=int, default=200)
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(a.cp, port, a.iters), nprocs=a.cp, start_method="spawn")


if __name__ == "__main__":
    main()
