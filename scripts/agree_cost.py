"""Cost of the cross-rank input agreement (cp_core.agree) per layer call, against one mixer layer, on gloo/CPU.

    python3 scripts/agree_cost.py [--cp 2] [--iters 200]

Every rank runs the same loop; rank 0 prints medians (after a warm-up) of:

* ``agree``: the 16-byte all-gather (verdict + fingerprint hash) and the host read of the result;
* ``checked_plan, cached plan, agree="call"``: what every layer call pays by default (plan lookup, the
  CPU ``cu_seqlens`` value check, the fingerprint hash, the all-gather);
* ``checked_plan, cached plan, agree="batch"``: the same with the agreement cached with the plan;
* ``get_plan, cached``: the plan lookup alone (including the CPU ``cu_seqlens`` value check);
* ``get_plan, new batch``: a plan build (reads ``cu_seqlens`` once);
* ``one mixer layer forward`` at the shape below, ``agree="call"`` and ``"batch"``.
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
    from cp_core.agree import agree, checked_plan, static_fields
    from cp_core.layout import shard
    from cp_core.mixer import Mamba2Config, Mamba2Mixer
    from cp_core.options import CPOptions
    from cp_core.plan import get_plan

    group = dist.group.WORLD
    g = 2 * cp
    lens = [g * (1 + i % 7) for i in range(64)]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    total = int(cu[-1])
    cfg = Mamba2Config(d_model=256, n_heads=8, head_dim=32, n_groups=2, d_state=64, chunk_size=64)
    static = static_fields("mixer", {"strategy": "hidden"}, config=cfg, options=CPOptions())
    call = {"dtype": torch.float32, "device type": "cpu"}
    items = tuple((k, repr(v)) for k, v in call.items())
    res = {"agree (16-byte all-gather + host read)": _median_s(lambda: agree(group, static, items), iters)}
    for mode in ("call", "batch"):
        res[f"checked_plan, cached plan, agree={mode!r}"] = _median_s(
            lambda mode=mode: checked_plan(
                group, "head_tail", 1, total, "cpu", cu, static=static, call=call, mode=mode
            ),
            iters,
        )
    res["get_plan, cached (CPU cu_seqlens value check)"] = _median_s(
        lambda: get_plan(cp, "head_tail", 1, total, "cpu", cu), iters
    )
    res["get_plan, new batch"] = _median_s(
        lambda: get_plan(cp, "head_tail", 1, total, "cpu", cu.clone()), iters
    )
    x = shard(torch.randn(total, 256, generator=torch.Generator().manual_seed(1)), rank, cp, "head_tail", cu)
    for mode in ("call", "batch"):
        m = Mamba2Mixer(cfg, cp_group=group, options=CPOptions(agree=mode))
        m.reset_parameters(torch.Generator().manual_seed(0))
        with torch.no_grad():
            res[f"one mixer layer forward, agree={mode!r} ({x.shape[0]} tokens/rank)"] = _median_s(
                lambda m=m: m(x, cu), 20, warmup=3
            )
    if rank == 0:
        print(
            f"gloo on CPU, cp {cp}, torch {torch.__version__}, {os.cpu_count()} CPUs; median of {iters} (layer: 20)"
        )
        for k, v in res.items():
            print(f"  {k:62s} {v * 1e6:10.1f} us")
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
