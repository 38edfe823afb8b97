"""Communication primitives of the CP group, autograd-aware.

Every collective of ``cp_core`` goes through this module, so that

* a group can be a real ``torch.distributed`` process group or a :class:`LocalGroup`,
  which stands in for rank ``rank`` of a group of ``size`` ranks inside one process
  (the collective becomes a local copy of the same size: one-GPU projection mode);
* the number of collectives per layer can be counted (:data:`COUNTS`).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

# torch >= 2.13 renames all_gather_into_tensor (same arguments)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

#: How many collectives of each kind were issued since the last ``COUNTS.clear()``.
COUNTS: Counter = Counter()

_SUPPRESSED = False


@contextlib.contextmanager
def suppressed():
    """Inside the block every collective of every group moves nothing (as ``LocalGroup(copy=False)``: the
    received buffer aliases the sent one; values are not meaningful). Every rank of a group must enter it
    together. A benchmark times the layer with and without it: the difference is the communication that
    compute did not hide (the *exposed* communication)."""
    global _SUPPRESSED
    previous, _SUPPRESSED = _SUPPRESSED, True
    try:
        yield
    finally:
        _SUPPRESSED = previous


def _skip(group) -> bool:
    return _SUPPRESSED or (isinstance(group, LocalGroup) and not group.copy)


@dataclass(frozen=True)
class LocalGroup:
    """Rank ``rank`` of a CP group of ``size`` ranks, simulated in one process.

    Collectives move the same number of bytes through local copies, so the kernels,
    gathers and copies of rank ``rank`` run on real shapes; the values received
    from "other ranks" are this rank's own (fine for timing, not for parity).
    """

    rank: int
    size: int
    #: False: collectives move nothing at all (the received buffer aliases the sent one), to time
    #: everything but the communication itself.
    copy: bool = True

    def __post_init__(self):
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"LocalGroup needs 0 <= rank < size, got rank={self.rank}, size={self.size}")


def _is_mesh(group) -> bool:
    return type(group).__name__ == "DeviceMesh" and hasattr(group, "get_group")


def resolve_group(group):
    """The process group behind ``group``: a 1-D ``DeviceMesh`` (e.g. ``mesh["cp"]``, one named dimension
    of a larger mesh) becomes its ``ProcessGroup``; ``None``, a :class:`LocalGroup`, a ``ProcessGroup`` or
    any object with ``size()`` and ``rank()`` (a test stub) are returned as they are."""
    if _is_mesh(group):
        if group.ndim != 1:
            raise ValueError(
                f"cp_group: a DeviceMesh must be 1-D, got {group.ndim} dimensions {group.mesh_dim_names}; "
                f"pass its CP dimension, e.g. mesh['cp']"
            )
        return group.get_group()
    if group is None or isinstance(group, LocalGroup):
        return group
    if not (callable(getattr(group, "size", None)) and callable(getattr(group, "rank", None))):
        raise ValueError(
            f"cp_group must be None, a ProcessGroup, a 1-D DeviceMesh, a LocalGroup or an object with size() "
            f"and rank(), got {type(group).__name__}"
        )
    return group


def group_size(group) -> int:
    """Ranks in ``group``, read through the group's own ``size()`` (a ProcessGroup, a stub with ``size()``
    and ``rank()``, a 1-D DeviceMesh); 1 for ``None``."""
    if group is None:
        return 1
    if isinstance(group, LocalGroup):
        return group.size
    return int(group.size())


def group_rank(group) -> int:
    """This process's rank in ``group`` (``rank()``; ``get_local_rank()`` of a 1-D DeviceMesh); 0 for ``None``."""
    if group is None:
        return 0
    if isinstance(group, LocalGroup):
        return group.rank
    if _is_mesh(group):
        return int(group.get_local_rank())
    return int(group.rank())


def check_buffers(what: str, sends, recvs) -> None:
    """Every send buffer of a collective and the receive buffer it pairs with have one dtype and one size
    (``sends[i]`` with ``recvs[i]``); ValueError naming the pair otherwise, raised before anything is sent.
    The layer allocates both from one dtype (:attr:`cp_core.pipeline.CoreSpec.dtype`) and one agreed plan,
    so a mismatch is a bug every rank meets at the same call: every rank raises, none waits or aborts."""
    for i, (a, b) in enumerate(zip(sends, recvs, strict=True)):
        if a.dtype != b.dtype or a.numel() != b.numel():
            raise ValueError(
                f"{what}: send buffer {i} is {a.dtype} x {a.numel()} but its receive buffer is {b.dtype} x "
                f"{b.numel()}; no collective was issued"
            )


def all_to_all_single(output: torch.Tensor, input_: torch.Tensor, group) -> torch.Tensor:
    """Equal-split ``all_to_all_single`` along dim 0 (no autograd)."""
    check_buffers("all_to_all_single", [input_], [output])
    COUNTS["all_to_all"] += 1
    if _skip(group):
        return input_
    if group is None or isinstance(group, LocalGroup) or group_size(group) == 1:
        output.copy_(input_)
    else:
        dist.all_to_all_single(output, input_, group=group)
    return output


def exchange(sends: list[list[torch.Tensor]], recvs: list[list[torch.Tensor]], group) -> None:
    """An all-to-all in pieces: ``sends[p]`` (contiguous tensors, in order) go to group rank ``p``, which
    receives them into its ``recvs[me]`` (same count and sizes, in order); ``recvs[p]`` is filled from rank
    ``p``. The pieces can be views into the final buffers (row ranges), so a permutation that moves whole
    row ranges costs no copy. One grouped launch of point-to-point operations (what NCCL's all-to-all is
    made of); the own pieces are copied locally. A :class:`LocalGroup` copies ``sends[p]`` into
    ``recvs[p]`` (the same bytes moved, values this rank's own). The pieces are symmetric (rank ``p``
    sends this rank pieces of the sizes this rank sends it), so ``sends[p][i]`` is checked against
    ``recvs[p][i]`` before anything moves (:func:`check_buffers`)."""
    if len(sends) != len(recvs) or any(len(a) != len(b) for a, b in zip(sends, recvs, strict=False)):
        raise ValueError("exchange: sends and recvs must hold the same number of pieces per rank")
    check_buffers("exchange", [t for ts in sends for t in ts], [t for ts in recvs for t in ts])
    COUNTS["all_to_all"] += 1
    if _skip(group):
        return
    cp = group_size(group)
    if group is None or isinstance(group, LocalGroup) or cp == 1:
        for p in range(cp):
            for a, b in zip(sends[p], recvs[p], strict=True):
                b.copy_(a)
        return
    me = group_rank(group)
    if sends[me] and sends[me][0].is_cuda and dist.get_backend(group) == "gloo":
        # gloo moves CUDA tensors in collectives but not point to point: stage through the host (a test
        # set-up, e.g. two ranks sharing one GPU; it synchronises, NCCL never takes this branch)
        hs = [[t.cpu() for t in ts] for ts in sends]
        hr = [[torch.empty(t.shape, dtype=t.dtype) for t in ts] for ts in recvs]
        COUNTS["all_to_all"] -= 1
        exchange(hs, hr, group)
        for ts, hts in zip(recvs, hr, strict=True):
            for t, h in zip(ts, hts, strict=True):
                t.copy_(h)
        return
    ops = []
    for step in range(1, cp):
        dst, src = (me + step) % cp, (me - step) % cp
        ops += [dist.P2POp(dist.isend, t, dist.get_global_rank(group, dst), group) for t in sends[dst]]
        ops += [dist.P2POp(dist.irecv, t, dist.get_global_rank(group, src), group) for t in recvs[src]]
    reqs = dist.batch_isend_irecv(ops)
    for a, b in zip(sends[me], recvs[me], strict=True):  # while the transfers run
        b.copy_(a)
    for req in reqs:
        req.wait()


def all_gather_into(output: torch.Tensor, input_: torch.Tensor, group) -> torch.Tensor:
    """``output[r] = input_ of rank r``; ``output`` has a new leading dim of size cp."""
    if output.dtype != input_.dtype or output.numel() != input_.numel() * group_size(group):
        raise ValueError(
            f"all_gather: input {input_.dtype} x {input_.numel()} does not fill the output {output.dtype} x "
            f"{output.numel()} over {group_size(group)} ranks; no collective was issued"
        )
    COUNTS["all_gather"] += 1
    if _skip(group):
        return input_.unsqueeze(0).expand_as(output)
    if group is None or isinstance(group, LocalGroup) or group_size(group) == 1:
        output.copy_(input_.unsqueeze(0).expand_as(output))
    else:
        flat = output.view(-1, *input_.shape[1:]) if input_.dim() else output
        _all_gather_single(flat, input_.contiguous(), group=group)
    return output


def all_reduce_(tensor: torch.Tensor, group) -> torch.Tensor:
    """In-place sum over the group."""
    COUNTS["all_reduce"] += 1
    if not (_SUPPRESSED or group is None or isinstance(group, LocalGroup) or group_size(group) == 1):
        dist.all_reduce(tensor, group=group)
    return tensor


def send(tensor: torch.Tensor, dst: int, group) -> None:
    """Point-to-point send to group rank ``dst`` (a :class:`LocalGroup` sends nothing)."""
    COUNTS["send"] += 1
    if _SUPPRESSED or isinstance(group, LocalGroup) or group is None:
        return
    t = tensor.contiguous()
    if t.is_cuda and dist.get_backend(group) == "gloo":  # gloo has no CUDA point to point (see exchange)
        t = t.cpu()
    dist.send(t, dst=dist.get_global_rank(group, dst), group=group)


def recv(like: torch.Tensor, src: int, group) -> torch.Tensor:
    """Point-to-point receive from group rank ``src`` into a new tensor shaped like ``like``.
    A :class:`LocalGroup` returns a copy of ``like`` (same bytes moved, values not meaningful)."""
    COUNTS["recv"] += 1
    out = torch.empty_like(like)
    if _SUPPRESSED:
        return like
    if isinstance(group, LocalGroup) or group is None:
        return out.copy_(like) if not isinstance(group, LocalGroup) or group.copy else like
    if out.is_cuda and dist.get_backend(group) == "gloo":
        host = torch.empty(out.shape, dtype=out.dtype)
        dist.recv(host, src=dist.get_global_rank(group, src), group=group)
        return out.copy_(host)
    dist.recv(out, src=dist.get_global_rank(group, src), group=group)
    return out


class _AllToAllFn(torch.autograd.Function):
    """Equal-split all-to-all along dim 0; its own inverse, so backward is another one."""

    @staticmethod
    def forward(ctx, input_: torch.Tensor, group):
        ctx.group = group
        input_ = input_.contiguous()
        return all_to_all_single(torch.empty_like(input_), input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        grad_output = grad_output.contiguous()
        return all_to_all_single(torch.empty_like(grad_output), grad_output, ctx.group), None


def all_to_all(input_: torch.Tensor, group) -> torch.Tensor:
    """Autograd-aware equal-split all-to-all along dim 0."""
    return _AllToAllFn.apply(input_, group)


class _AllGatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_: torch.Tensor, group):
        ctx.group = group
        ctx.rank = group_rank(group)
        out = input_.new_empty((group_size(group), *input_.shape))
        return all_gather_into(out, input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        grad = all_reduce_(grad_output.contiguous().clone(), ctx.group)
        return grad[ctx.rank], None


def all_gather(input_: torch.Tensor, group) -> torch.Tensor:
    """Autograd-aware all-gather: ``[cp, *input_.shape]``; gradients are summed back to the owner."""
    return _AllGatherFn.apply(input_, group)
