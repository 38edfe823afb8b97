"""Mixer parity CP=N vs CP=1 over a real multi-process group: NCCL with one GPU per rank, or gloo on CPU.

    torchrun --nproc-per-node 8 tests/nccl_parity.py          # NCCL: cp 2/4/8 on 8 GPUs
    torchrun --nproc-per-node 2 tests/nccl_parity.py --cpu    # gloo on CPU (the CPU suite runs this)

The checks are those of tests/test_mixer_parity.py (``parity_case``: forward output, input gradient and
every parameter gradient summed over the group; fp32 to ``--tol32`` relative, default 2e-3 for the
Triton kernels' tf32 dots; bf16 as in the CPU tests) for every cp <= world size, BSHD and packed
documents, both layouts, the hidden strategy and state passing with both exchanges, fp32 and bf16; and
``hierarchical`` on every grid of nodes x GPUs the world holds (1x2 and 2x1 on 2 ranks; 2x2, 1x4, 4x1 on
4; 2x4 and 4x2 on 8: ``tests/test_hierarchical.py``'s ``grid_case``, against cp 1 and the float64 oracle).
A case of cp ranks runs on ranks 0..cp-1 (a subgroup); the others wait. Rank 0 prints one line per
case and a summary; the exit status is 1 if any case failed.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_hierarchical import GRIDS, grid_case, make_groups  # noqa: E402
from test_mixer_parity import parity_case  # noqa: E402

CFG = dict(d_model=64, n_heads=8, head_dim=16, n_groups=2, d_state=16, d_conv=4, chunk_size=16)
# "@2": 2 overlapped head chunks of whole groups; "@2s": 2 chunks splitting a group's heads (2 groups: one
# per rank at cp 2, replicated at cp 4 / 8)
STRATEGIES = ("hidden", "hidden@2", "hidden@2s", "state_passing", "state_passing:chain", "hierarchical")


def _report(ok: bool, what: str, t0: float, bad) -> None:
    """One case's line on rank 0: verdict, what ran, seconds, and what differed where it failed."""
    verdict = "ok  " if ok else "FAIL"
    print(f"{verdict} {what} ({time.perf_counter() - t0:.1f} s){'' if ok else f'  {bad}'}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU instead of NCCL on GPUs")
    ap.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--tol32", type=float, default=2e-3)
    args = ap.parse_args(argv)
    if args.cpu:
        dist.init_process_group("gloo")
        device = "cpu"
    else:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        device = f"cuda:{local}"
    rank, world = dist.get_rank(), dist.get_world_size()
    cps = [c for c in args.cp if 2 <= c <= world]
    grids = [(n, g) for n, g in GRIDS if n * g <= world] if "hierarchical" in args.strategies else []
    cps_all = sorted(set(cps) | {n * g for n, g in grids})
    groups = {c: dist.new_group(list(range(c))) for c in cps_all}  # every rank takes part in new_group
    make_groups(dist.group.WORLD, world)
    failed = total = 0
    for (nodes, gpus), fmt in itertools.product(grids, ("bshd", "thd")):
        cp = nodes * gpus
        if rank < cp:
            t0 = time.perf_counter()
            ok, bad = grid_case(groups[cp], nodes, gpus, fmt == "thd", device=device, tol=args.tol32)
            total += 1
            failed += not ok
            if rank == 0:
                _report(ok, f"grid {nodes}x{gpus} {fmt} hierarchical float32", t0, bad)
        dist.barrier()
    strategies = [s for s in args.strategies if s != "hierarchical"]
    cases = itertools.product(cps, ("bshd", "thd"), ("head_tail", "contiguous"), strategies, args.dtypes)
    for cp, fmt, layout, strategy, dtype in cases:
        cfg, run_as = CFG, strategy
        if strategy.endswith("s"):  # chunks split the heads of the CFG's groups
            run_as = strategy[:-1]
            if CFG["n_heads"] // cp < int(run_as.partition("@")[2]):
                continue
        elif "@" in strategy:  # head chunks hold whole groups: 8 groups leave every rank enough of them
            cfg = dict(CFG, n_groups=8)
            if 8 // cp < int(strategy.partition("@")[2]):
                continue
        if rank < cp:
            batch, n_docs = (2, None) if fmt == "bshd" else (1, 5)
            t0 = time.perf_counter()
            ok, bad, worst = parity_case(
                groups[cp],
                cfg,
                layout,
                batch,
                n_docs,
                dtype,
                run_as,
                units=8,
                device=device,
                tol32=args.tol32,
            )
            total += 1
            failed += not ok
            if rank == 0:
                what = f"cp {cp} {fmt} {layout:10s} {strategy:19s} {dtype:8s} worst rel. error {worst:.2e}"
                _report(ok, what, t0, bad)
        dist.barrier()
    if rank == 0:
        backend = dist.get_backend()
        where = torch.cuda.get_device_name() if device != "cpu" else "CPU"
        print(f"{total - failed} passed, {failed} failed ({backend}, {world} ranks, {where})", flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
