"""Do the CP ranks still hold the same layer? An optional, cheap check of replicated parameters.

Under context parallelism every rank of a CP group computes with the same parameters: the gradient of each
must be reduced over the data-parallel *and* the CP ranks (docs/training.md). When a set-up misses the CP
ranks (FSDP2 sharded over the dp dimension only, DDP over dp only), nothing fails: the replicas drift apart
one step at a time. :func:`check_replicas` catches that: every rank reduces every parameter to a 128-bit
fingerprint of its exact bits (two integer sums over the values read as integers, one of them position
weighted), one all-gather over the group, and every rank raises the same ``ValueError`` naming the
parameters that differ and on which ranks. :func:`watch_replicas` runs it from a forward pre-hook every
``every`` calls (off unless installed).

Cost: one read of the parameters (as an optimizer step's) and an all-gather of 16 bytes per parameter.
Parameters that are sharded over the CP ranks (FSDP2 over the flattened dp x cp mesh) differ legitimately
between steps' shards: install the hook on the module FSDP unshards (its parameters are then whole in
forward, when the hook runs), or call the check on whole parameters.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist

from . import comm

__all__ = ["fingerprint", "check_replicas", "watch_replicas"]

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """``[2]`` int64: the sum of ``t``'s values read as integers, and the same sum weighted by position
    (``1 + i mod 65521``): equal on two ranks exactly when the bits almost surely are (any single changed
    bit changes the first sum; a permutation changes the second)."""
    if hasattr(t, "to_local"):  # a DTensor: this rank's piece
        t = t.to_local()
    t = t.detach().contiguous().reshape(-1)
    bits = t.view(_INT[t.element_size()]).long() if t.is_floating_point() else t.long()
    w = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
    return torch.stack([bits.sum(), (bits * w).sum()])


def _device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_replicas(module: torch.nn.Module, group) -> None:
    """ValueError on every rank of ``group`` (a ProcessGroup or a 1-D DeviceMesh) when ``module``'s
    parameters are not bit for bit the same on all of them, naming each parameter that differs and the ranks
    that hold each version. Nothing to check at cp_size 1, for ``None`` and for a :class:`~cp_core.comm.LocalGroup`."""
    group = comm.resolve_group(group)
    if group is None or isinstance(group, comm.LocalGroup) or comm.group_size(group) == 1:
        return
    cp = comm.group_size(group)
    named = list(module.named_parameters())
    dev = _device(group)
    # the same parameter list on every rank first (the fingerprints are gathered in that order)
    head = torch.tensor([len(named), zlib.crc32(",".join(n for n, _ in named).encode())], dtype=torch.int64)
    heads = torch.empty(cp * 2, dtype=torch.int64, device=dev)
    comm._all_gather_single(heads, head.to(dev), group=group)
    heads = heads.view(cp, 2).tolist()
    if any(h != heads[0] for h in heads):
        raise ValueError(
            f"the ranks of the CP group (size {cp}) hold different parameter lists (count, name hash per rank: "
            f"{heads}): check_replicas must be called on the same module on every rank"
        )
    if not named:
        return
    mine = torch.stack([fingerprint(p).to(dev) for _, p in named])  # [n, 2]
    every = torch.empty((cp, *mine.shape), dtype=torch.int64, device=dev)
    comm._all_gather_single(every.view(-1, 2), mine, group=group)
    every = every.cpu()
    diffs = []
    for i, (name, _) in enumerate(named):
        versions: dict[tuple, list[int]] = {}
        for r in range(cp):
            versions.setdefault(tuple(every[r, i].tolist()), []).append(r)
        if len(versions) > 1:
            diffs.append(f"{name} (" + " / ".join(f"ranks {rs}" for rs in versions.values()) + ")")
    if diffs:
        raise ValueError(
            f"parameters differ across the CP group (size {cp}): {', '.join(diffs)}. The ranks of a CP group "
            f"must stay replicas: reduce every gradient over the data-parallel and the CP ranks (FSDP2 on the "
            f"flattened ('dp', 'cp') mesh, HSDP, or DDP over dp x cp; docs/training.md)"
        )


def watch_replicas(module: torch.nn.Module, group, every: int = 1):
    """Run :func:`check_replicas` from a forward pre-hook of ``module``, on calls ``0, every, 2*every, ...``
    (every rank counts the same calls). Returns the hook's handle (``.remove()`` stops it)."""
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    calls = [0]

    def hook(mod, args):
        if calls[0] % every == 0:
            check_replicas(mod, group)
        calls[0] += 1

    return module.register_forward_pre_hook(hook)
