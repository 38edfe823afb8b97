"""Token layouts of a context-parallel shard, and the helpers that shard/unshard a global batch.

Two layouts, for sequences ``[B, L, ...]`` (sharded along dim 1) and packed documents
``[T, ...]`` with global cumulative lengths ``cu_seqlens`` (sharded along dim 0):

``head_tail`` (DualChunkSwap, the attention load-balancing order)
    a sequence (or each document) is cut into ``2*cp`` equal chunks; rank ``r`` holds
    chunks ``r`` and ``2*cp-1-r``, in that order. Packed input is document-major: rank
    ``r``'s shard is ``[doc0 chunk r | doc0 chunk 2cp-1-r | doc1 chunk r | ...]``, as
    Transformer Engine partitions THD batches.
``contiguous``
    rank ``r`` holds the ``r``-th of ``cp`` equal slices (of each document, when packed).
``torch_head_tail``
    the order of torch's ``context_parallel`` (``_PerDocumentHeadTailLoadBalancer``): every document is cut
    into ``2*cp`` chunks and rearranged to ``[chunk 0, chunk 2cp-1, chunk 1, chunk 2cp-2, ...]`` in place,
    then the rearranged pack is cut into ``cp`` equal contiguous shards. BSHD input (one document per
    row) is the same as ``head_tail``; a pack of several documents is not (a rank's shard may hold whole
    documents and none of another). The hidden strategy takes it as it takes the others (the token plan
    absorbs the order); state passing and the seed path do not.

:func:`positions` is the single definition of both: the global index of every local
token, built with tensor ops on the device of ``cu_seqlens`` (no host sync). Everything
else (shard, unshard, the all-to-all token plans) is derived from it.
"""

from __future__ import annotations

import torch

LAYOUTS = ("head_tail", "contiguous", "torch_head_tail")
#: layouts whose every rank holds the same pieces of every document (what state passing and the seed path need)
PER_DOCUMENT = ("head_tail", "contiguous")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def check_cp(cp_size, cp_rank=None) -> None:
    """``cp_size`` a positive int and ``cp_rank`` (when given) an int in ``[0, cp_size)``; ValueError naming the value."""
    if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size must be a positive int, got {cp_size!r}")
    if cp_rank is not None and (
        isinstance(cp_rank, bool) or not isinstance(cp_rank, int) or not 0 <= cp_rank < cp_size
    ):
        raise ValueError(f"cp_rank must be an int in [0, {cp_size}), got {cp_rank!r}")


def granule(layout: str, cp_size: int) -> int:
    """Every sequence / document length must be a multiple of this (1 at cp_size 1: nothing is sharded)."""
    check_layout(layout)
    if cp_size == 1:
        return 1
    return cp_size if layout == "contiguous" else 2 * cp_size


def check_seq_len(length: int, cp_size: int, layout: str, what: str = "sequence length") -> None:
    g = granule(layout, cp_size)
    if length % g:
        raise ValueError(
            f"{what} {length} is not a multiple of {g} (= {'' if layout == 'contiguous' else '2*'}cp_size "
            f"for layout {layout!r}, cp_size {cp_size}); pad it: nothing is dropped or padded silently"
        )


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, cp_size: int, layout: str) -> tuple[int, ...]:
    """Validate global padded cumulative document lengths; ``total`` = tokens of the global pack.

    Reads the values on the host (one small copy when ``cu_seqlens`` lives on a GPU): call it once
    per batch (the token plans do, and cache the result), not per layer. Returns the values read.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.device.type == "meta":
        raise ValueError("cu_seqlens is on the meta device: it holds no values to validate or plan with")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}"
        )
    cu = cu_seqlens.cpu().tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {cu[0]}")
    g = granule(layout, cp_size)
    for i in range(len(cu) - 1):
        n = cu[i + 1] - cu[i]
        if n < 0:
            raise ValueError(f"cu_seqlens is decreasing at index {i + 1}: {cu[i]} -> {cu[i + 1]}")
        if n % g:
            raise ValueError(
                f"document {i} has length {n} (cu_seqlens[{i}:{i + 2}] = {cu[i]}, {cu[i + 1]}), not a multiple "
                f"of {g} for layout {layout!r}, cp_size {cp_size}: pad each document"
            )
    if cu[-1] != total:
        raise ValueError(
            f"cu_seqlens ends at {cu[-1]} but the packed batch holds {total} tokens "
            f"(local tokens x cp_size): cu_seqlens must be the GLOBAL padded cumulative lengths"
        )
    return tuple(cu)


def positions(
    cp_size: int,
    layout: str = "head_tail",
    *,
    length: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ranks: torch.Tensor | int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Global token index of each local token: ``[len(ranks), local_len]`` (or ``[local_len]`` for one int rank).

    Give ``length`` (tokens per sequence) for ``[B, L]`` input, or ``cu_seqlens`` plus ``length`` (the
    global pack size T) for packed input. No validation here (see :func:`check_cu_seqlens`) and no
    host sync: everything is computed on ``cu_seqlens``' device (or ``device``).
    """
    check_layout(layout)
    if length is None:
        raise ValueError("positions() needs length (tokens per sequence, or of the whole pack)")
    if cu_seqlens is not None:
        device = cu_seqlens.device
    squeeze = isinstance(ranks, int)
    if ranks is None:
        ranks = torch.arange(cp_size, device=device)
    elif isinstance(ranks, int):
        ranks = torch.tensor([ranks], device=device)
    r = ranks.to(device=device, dtype=torch.long).view(-1, 1)
    local = length // cp_size
    j = torch.arange(local, device=device, dtype=torch.long).view(1, -1)
    if cu_seqlens is None:
        if layout == "contiguous":
            pos = r * local + j
        else:  # head_tail, and torch_head_tail (the same for one document per row)
            half = local // 2
            first = j < half
            pos = torch.where(first, r * half + j, (2 * cp_size - 1 - r) * half + (j - half))
    elif layout == "torch_head_tail":
        # rank r holds rows [r*local, (r+1)*local) of the pack rearranged document by document to
        # [c0, c_{2cp-1}, c1, c_{2cp-2}, ...]; q is a row of that rearranged pack
        cu = cu_seqlens.to(torch.long)
        lens = cu[1:] - cu[:-1]
        q = (r * local + j).reshape(-1)
        doc = (torch.searchsorted(cu, q, right=True) - 1).clamp_(0, lens.numel() - 1)
        c = (lens[doc] // (2 * cp_size)).clamp_min(1)
        o = q - cu[doc]
        b, i = o // c, o % c  # chunk of the rearranged document, offset in it
        k = torch.where(b % 2 == 0, b // 2, 2 * cp_size - 1 - b // 2)  # its chunk in the document
        pos = (cu[doc] + k * c + i).view(r.shape[0], local)
    else:
        cu = cu_seqlens.to(torch.long)
        lens = cu[1:] - cu[:-1]
        local_cu = cu // cp_size
        doc = torch.searchsorted(local_cu, j.view(-1), right=True) - 1  # zero-length documents are skipped
        doc = doc.clamp_(0, lens.numel() - 1).view(1, -1)
        o = j - local_cu[doc]
        start = cu[doc]
        if layout == "contiguous":
            pos = start + r * (lens[doc] // cp_size) + o
        else:
            half = lens[doc] // (2 * cp_size)
            first = o < half
            pos = start + torch.where(first, r * half + o, (2 * cp_size - 1 - r) * half + (o - half))
    return pos[0] if squeeze else pos


def _dim_and_length(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[int, int]:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if cu_seqlens is None:
        if x.dim() < 2:
            raise ValueError(f"expected [B, L, ...] input, got shape {tuple(x.shape)}")
        return 1, x.shape[1]
    if x.dim() < 1:
        raise ValueError("expected packed [T, ...] input")
    return 0, x.shape[0]


def shard(
    x: torch.Tensor,
    cp_rank: int,
    cp_size: int,
    layout: str = "head_tail",
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rank ``cp_rank``'s local shard of a global batch (a copy)."""
    check_cp(cp_size, cp_rank)
    check_layout(layout)
    dim, length = _dim_and_length(x, cu_seqlens)
    if cu_seqlens is None:
        check_seq_len(length, cp_size, layout)
    else:
        check_cu_seqlens(cu_seqlens, length, cp_size, layout)
        cu_seqlens = cu_seqlens.to(x.device)
    pos = positions(cp_size, layout, length=length, cu_seqlens=cu_seqlens, ranks=cp_rank, device=x.device)
    return x.index_select(dim, pos)


def unshard(
    shards: list[torch.Tensor] | tuple[torch.Tensor, ...],
    cp_size: int,
    layout: str = "head_tail",
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rebuild the global tensor from every rank's shard (``shards[r]`` from rank ``r``)."""
    check_cp(cp_size)
    check_layout(layout)
    if not isinstance(shards, (list, tuple)):
        raise ValueError(f"shards must be a list or tuple of tensors, got {type(shards).__name__}")
    if len(shards) != cp_size:
        raise ValueError(f"unshard needs one shard per rank: got {len(shards)} shards for cp_size {cp_size}")
    for r, s in enumerate(shards):
        if not isinstance(s, torch.Tensor):
            raise ValueError(f"shard {r} must be a torch.Tensor, got {type(s).__name__}")
    first = shards[0]
    if first.dim() < (1 if cu_seqlens is not None else 2):
        raise ValueError(
            f"shards must be [B, L/cp, ...] (or packed [T/cp, ...]), got shape {tuple(first.shape)}"
        )
    for r, s in enumerate(shards):
        if s.shape != first.shape or s.dtype != first.dtype or s.device != first.device:
            raise ValueError(
                f"shard {r} has shape {tuple(s.shape)}, dtype {s.dtype}, device {s.device}; shard 0 has "
                f"{tuple(first.shape)}, {first.dtype}, {first.device}"
            )
    dim = 0 if cu_seqlens is not None else 1
    length = first.shape[dim] * cp_size
    if cu_seqlens is None:
        check_seq_len(length, cp_size, layout)
    else:
        check_cu_seqlens(cu_seqlens, length, cp_size, layout)
        cu_seqlens = cu_seqlens.to(first.device)
    pos = positions(cp_size, layout, length=length, cu_seqlens=cu_seqlens, device=first.device)
    out_shape = list(first.shape)
    out_shape[dim] = length
    out = first.new_empty(out_shape)
    out.index_copy_(dim, pos.reshape(-1), torch.cat(list(shards), dim=dim))
    return out
