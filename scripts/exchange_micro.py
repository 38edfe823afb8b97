"""The all-to-all at the layer's message sizes, alone and beside compute.

    torchrun --nproc-per-node 2 scripts/exchange_micro.py [--mib 64,256,680,1360] [--iters 10]

Alone: NCCL's ``all_to_all_single`` (one message per peer), :func:`cp_core.comm.exchange` as grouped
send/recv with 1 and 2 pieces per peer (the copy-engine transport this script also measured is in git
history before the options object; results/README.md has its figures). Beside compute: a chain of bf16 GEMMs on the
current stream while the all-to-all runs on a second stream (``--gemms`` products of ``--gemm`` cubed):
``both`` is the time of the two together, ``exposed`` = both - GEMMs alone (what the compute did not
hide), ``gemm_slowdown`` = the GEMMs' own time beside the transfer over alone.

Each rank sends ``MiB`` per rank in total (``cp`` equal slots). CUDA events, median of ``--iters`` after 3
warm-ups; busbw = bytes per rank * (cp - 1) / cp / time, as nccl-tests reports an all-to-all.
Rank 0 prints CSV lines.
"""

from __future__ import annotations

import argparse
import os
import statistics

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
    ap.add_argument("--gemm", type=int, default=8192)
    ap.add_argument("--gemms", type=int, default=3)
    a = ap.parse_args()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    cp, me = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD
    dev = torch.device("cuda")
    side = torch.cuda.Stream()
    inner: list = []  # the GEMMs' own events in each timed call beside the transfer
    ga = torch.randn(a.gemm, a.gemm, device=dev).to(torch.bfloat16)
    gout = torch.empty_like(ga)

    def gemms():
        for _ in range(a.gemms):
            torch.mm(ga, ga, out=gout)

    gemm_ms = median_ms(gemms, dev, 3, a.iters)
    if me == 0:
        print(f"# {cp} x {torch.cuda.get_device_name()}, NCCL {torch.cuda.nccl.version()}")
        print(f"# beside: {a.gemms} bf16 GEMMs of {a.gemm}^3, {gemm_ms:.3f} ms alone")
        print("MiB_per_rank,way,ms,busbw_GBps,both_ms,exposed_ms,gemm_slowdown")
    for mib in (int(x) for x in a.mib.split(",")):
        n = mib * 2**20 // 2 // cp // 2 * 2  # bf16 elements per slot, even (two pieces)
        send = torch.randn(cp, n, device=dev).to(torch.bfloat16)
        recv = torch.empty_like(send)
        ways = {
            "nccl_all_to_all_single": lambda s=send, r=recv: comm.all_to_all_single(r, s, group),
            "nccl_exchange_1_piece": lambda s=send, r=recv: _pieces(s, r, 1, group),
            "nccl_exchange_2_pieces": lambda s=send, r=recv: _pieces(s, r, 2, group),
        }
        for way, fn in ways.items():
            ms = median_ms(fn, dev, 3, a.iters)
            busbw = send.numel() * 2 * (cp - 1) / cp / ms / 1e6

            def both(fn=fn):
                main = torch.cuda.current_stream()
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    fn()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                gemms()
                e1.record()
                main.wait_stream(side)
                inner.append((e0, e1))

            inner.clear()
            both_ms = median_ms(both, dev, 3, a.iters)
            torch.cuda.synchronize()
            beside = statistics.median(e0.elapsed_time(e1) for e0, e1 in inner[3:])
            if me == 0:
                print(
                    f"{mib},{way},{ms:.3f},{busbw:.1f},{both_ms:.3f},{both_ms - gemm_ms:.3f},{beside / gemm_ms:.3f}",
                    flush=True,
                )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
