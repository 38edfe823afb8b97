"""The all-to-all three ways at the layer's message sizes: NCCL's ``all_to_all_single`` (one message per
peer), and :func:`cp_core.comm.exchange` (grouped send/recv) with 1 and with 2 pieces per peer.

    torchrun --nproc-per-node 2 scripts/exchange_micro.py [--mib 64,256,680,1360] [--iters 10]

Each rank sends ``MiB`` per rank in total (``cp`` equal slots). CUDA events, median of ``--iters`` after 3
warm-ups; busbw = bytes per rank * (cp - 1) / cp / time, as nccl-tests reports an all-to-all.
Rank 0 prints one line per size.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from cp_core import comm
from cpbench.timing import median_ms


def _pieces(send, recv, k, group):
    cp = send.shape[0]
    comm.exchange(
        [list(send[p].chunk(k)) for p in range(cp)], [list(recv[p].chunk(k)) for p in range(cp)], group
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", default="64,256,680,1360")
    ap.add_argument("--iters", type=int, default=10)
    a = ap.parse_args()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    cp, me = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD
    if me == 0:
        print(f"# {cp} x {torch.cuda.get_device_name()}, NCCL {torch.cuda.nccl.version()}")
        print("MiB_per_rank,way,ms,busbw_GBps")
    for mib in (int(x) for x in a.mib.split(",")):
        n = mib * 2**20 // 2 // cp // 2 * 2  # bf16 elements per slot, even (two pieces)
        send = torch.randn(cp, n, device="cuda").to(torch.bfloat16)
        recv = torch.empty_like(send)

        ways = {
            "all_to_all_single": lambda s=send, r=recv: comm.all_to_all_single(r, s, group),
            "exchange_1_piece": lambda s=send, r=recv: _pieces(s, r, 1, group),
            "exchange_2_pieces": lambda s=send, r=recv: _pieces(s, r, 2, group),
        }
        for way, fn in ways.items():
            ms = median_ms(fn, torch.device("cuda"), 3, a.iters)
            busbw = send.numel() * 2 * (cp - 1) / cp / ms / 1e6
            if me == 0:
                print(f"{mib},{way},{ms:.3f},{busbw:.1f}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
