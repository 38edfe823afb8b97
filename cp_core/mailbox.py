"""The copy-engine all-to-all: every rank stages its outgoing pieces in a *mailbox* that its peers can
read, and each rank pulls what is addressed to it with plain memory copies.

On GPUs the mailbox is PyTorch's symmetric memory (a buffer every rank of the group maps), the copies
are ``cudaMemcpyAsync`` (the GPU's copy engines: no streaming multiprocessor is taken from the kernels
that run beside a pipelined transfer) and the barrier is symmetric memory's one-block signal kernel. On
CPU (gloo) the mailbox is a shared memory-mapped file per rank and the barrier is the group's: the same
protocol, so that the offsets and ordering are tested where CI runs.

The protocol of one exchange (:func:`exchange`), every rank sending ``S`` bytes to every peer:

1. barrier: every peer has finished pulling from the previous exchange (the mailbox can be rewritten);
2. stage: the pieces for peer ``d`` are copied, in order, into region ``(d - me) % cp - 1`` of the
   own mailbox (``cp - 1`` regions of ``S`` bytes); the own pieces are copied to their destination;
3. barrier: every mailbox is full;
4. pull: the pieces from peer ``p`` are copied out of region ``(me - p) % cp - 1`` of ``p``'s mailbox.

Everything is issued on the current stream, with no host synchronisation; the mailbox grows (a
collective set-up with the group, the same on every rank because ``S`` is) only when a larger exchange
first comes.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist

_BOXES: dict[tuple, object] = {}


class _CudaBox:
    """Symmetric memory of ``nbytes`` per rank (PyTorch's per-group workspace)."""

    def __init__(self, group, nbytes: int):
        from torch.distributed import _symmetric_memory as symm

        self.handle = symm.get_symm_mem_workspace(group.group_name, min_size=nbytes)
        self.nbytes = nbytes
        self._views: dict[tuple, torch.Tensor] = {}

    def buffer(self, rank: int, dtype: torch.dtype) -> torch.Tensor:
        key = (rank, dtype)
        if key not in self._views:
            n = self.nbytes // dtype.itemsize
            self._views[key] = self.handle.get_buffer(rank, [n], dtype, 0)
        return self._views[key]

    def barrier(self) -> None:
        self.handle.barrier(channel=0)


class _FileBox:
    """A shared memory-mapped file of ``nbytes`` per rank (CPU): what every rank maps of every other."""

    def __init__(self, group, nbytes: int):
        me = dist.get_rank(group)
        where = [tempfile.mkdtemp(prefix="cp_core_mailbox_") if me == 0 else None]
        dist.broadcast_object_list(where, src=dist.get_global_rank(group, 0), group=group)
        path = os.path.join(where[0], f"{me}-{nbytes}")
        torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)  # creates it
        dist.barrier(group=group)
        cp = dist.get_world_size(group)
        self.maps = [
            torch.from_file(
                os.path.join(where[0], f"{r}-{nbytes}"), shared=True, size=nbytes, dtype=torch.uint8
            )
            for r in range(cp)
        ]
        dist.barrier(group=group)  # every rank has mapped every file: they can go
        os.unlink(path)
        if me == 0:
            dist.barrier(group=group)
            os.rmdir(where[0])
        else:
            dist.barrier(group=group)
        self.group, self.nbytes = group, nbytes

    def buffer(self, rank: int, dtype: torch.dtype) -> torch.Tensor:
        n = self.nbytes // dtype.itemsize
        return self.maps[rank][: n * dtype.itemsize].view(dtype)

    def barrier(self) -> None:
        dist.barrier(group=self.group)


def _box(group, nbytes: int, cuda: bool):
    key = (getattr(group, "group_name", None) or id(group), cuda)
    box = _BOXES.get(key)
    if box is None or box.nbytes < nbytes:
        if box is not None and cuda:
            torch.cuda.synchronize()  # the old mailbox may still be read by queued copies (once per size)
        box = (_CudaBox if cuda else _FileBox)(group, nbytes)
        _BOXES[key] = box
    return box


_PEAK = 0


def peak_bytes(reset: bool = False) -> int:
    """The largest GPU mailbox an exchange needed since the last reset (it lives outside PyTorch's caching
    allocator, so ``torch.cuda.max_memory_allocated`` does not see it); ``reset=True`` starts over."""
    global _PEAK
    peak = _PEAK
    if reset:
        _PEAK = 0
    return peak


def usable(t: torch.Tensor, group) -> bool:
    """Whether this transport applies: CUDA tensors over NCCL, or CPU tensors (gloo)."""
    backend = dist.get_backend(group)
    return (backend == "nccl") if t.is_cuda else (backend == "gloo")


def _bytes(ts: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def exchange(sends: list[list[torch.Tensor]], recvs: list[list[torch.Tensor]], group) -> None:
    """:func:`cp_core.comm.exchange` through the mailboxes (same contract). Every rank must send the same
    number of bytes to every peer (equal-split all-to-alls and the token plans' pieces do)."""
    global _PEAK
    cp, me = dist.get_world_size(group), dist.get_rank(group)
    sizes = {_bytes(sends[d]) for d in range(cp)} | {_bytes(recvs[p]) for p in range(cp)}
    if len(sizes) != 1:
        raise ValueError(
            f"the copy-engine exchange needs equal bytes to and from every rank, got {sorted(sizes)}"
        )
    dtypes = {t.dtype for ts in sends + recvs for t in ts}
    if len(dtypes) > 1:
        raise ValueError(
            f"the copy-engine exchange moves one dtype at a time, got {sorted(map(str, dtypes))}"
        )
    (region,), dtype = sizes, next(iter(dtypes), None)
    if region == 0 or cp == 1:
        for a, b in zip(sends[me], recvs[me], strict=True):
            b.copy_(a)
        return
    first = next(t for ts in sends for t in ts)
    box = _box(group, (cp - 1) * region, first.is_cuda)
    if first.is_cuda:
        _PEAK = max(_PEAK, (cp - 1) * region)
    n = region // dtype.itemsize
    box.barrier()  # 1: the peers have pulled the previous exchange
    mine = box.buffer(me, dtype)
    for step in range(1, cp):  # 2: stage
        at = (step - 1) * n
        for t in sends[(me + step) % cp]:
            mine[at : at + t.numel()].view(t.shape).copy_(t)
            at += t.numel()
    for a, b in zip(sends[me], recvs[me], strict=True):
        b.copy_(a)
    box.barrier()  # 3: every mailbox is full
    for step in range(1, cp):  # 4: pull
        src = (me - step) % cp
        theirs, at = box.buffer(src, dtype), (step - 1) * n
        for t in recvs[src]:
            t.copy_(theirs[at : at + t.numel()].view(t.shape))
            at += t.numel()
