"""Context-parallel Mamba2 in a few lines: 2 ranks on the CPU (gloo), BSHD and packed input.

    python examples/quickstart.py                                # spawns 2 gloo ranks itself
    torchrun --nproc-per-node 2 examples/quickstart.py           # or let torchrun start them

Each rank holds a shard of the sequence (``cp_core.layout.shard``: rank r's tokens in the
head-tail layout); the layer's output on each rank is the same shard of what one process computes
on the whole sequence, which the script checks. On GPUs: NCCL, ``device="cuda"``, bf16.
"""

import os

import torch
import torch.distributed as dist

from cp_core.layout import shard
from cp_core.mixer import Mamba2Config, Mamba2Mixer

CFG = Mamba2Config(d_model=32, n_heads=4, head_dim=8, n_groups=2, d_state=8, chunk_size=16)


def main() -> None:
    dist.init_process_group("gloo")  # torchrun (or spawn() below) sets RANK, WORLD_SIZE, MASTER_*
    cp_group, cp_rank, cp_size = dist.group.WORLD, dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same parameters on every rank
    layer = Mamba2Mixer(CFG, cp_group=cp_group, layout="head_tail", strategy="hidden", dtype=torch.float32)
    torch.manual_seed(0)
    reference = Mamba2Mixer(CFG, cp_group=None, dtype=torch.float32)  # one process, whole sequence

    # BSHD: [B, L, d_model], L a multiple of 2 * cp_size; every rank builds the same global batch
    x_global = torch.randn(2, 64, CFG.d_model, generator=torch.Generator().manual_seed(1))
    x_local = shard(x_global, cp_rank, cp_size, "head_tail")  # [B, L/cp, d_model]
    y_local = layer(x_local)  # same shape as x_local
    want = shard(reference(x_global), cp_rank, cp_size, "head_tail")
    torch.testing.assert_close(y_local, want, rtol=1e-4, atol=1e-4)

    # packed (THD): documents laid end to end, [T, d_model]; cu_seqlens: GLOBAL document
    # boundaries, int32, every document a multiple of 2 * cp_size tokens (pad them to that)
    cu_seqlens = torch.tensor([0, 24, 64, 72, 128], dtype=torch.int32)
    t_global = torch.randn(128, CFG.d_model, generator=torch.Generator().manual_seed(2))
    t_local = shard(t_global, cp_rank, cp_size, "head_tail", cu_seqlens=cu_seqlens)  # [T/cp, d_model]
    y_local = layer(t_local, cu_seqlens=cu_seqlens)
    want = shard(
        reference(t_global, cu_seqlens=cu_seqlens), cp_rank, cp_size, "head_tail", cu_seqlens=cu_seqlens
    )
    torch.testing.assert_close(y_local, want, rtol=1e-4, atol=1e-4)

    print(f"rank {cp_rank}/{cp_size}: BSHD {tuple(x_local.shape)} and packed {tuple(t_local.shape)} match")
    dist.destroy_process_group()


def _spawned(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    main()


def spawn(world: int = 2) -> None:
    """Start ``world`` local gloo ranks running :func:`main`."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(world, port), nprocs=world)


if __name__ == "__main__":
    if "RANK" in os.environ:
        main()
    else:
        spawn()
