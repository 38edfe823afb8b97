"""Seeded packs of documents for packed (THD) cases.

A pack has a fixed capacity ``T`` (the case's ``seq_len``) and holds ``D`` documents with
``round(density * T)`` real tokens between them:

1. document weights are drawn from a lognormal distribution (sigma 1: a heavy tail of long
   documents and many short ones, like real corpora); the real tokens are split in proportion
   (largest-remainder rounding, so they add up exactly). A document may get zero tokens: cp_core
   accepts zero-length documents, and they stay in ``cu_seqlens``;
2. each document is padded UP to a multiple of the *granule* ``g`` (pad tokens are padding, not
   real tokens);
3. if the padded documents overflow the capacity (many short documents at a high density), the
   documents with the most padding are rounded DOWN by ``g`` (losing the fewest real tokens) until
   they fit; the achieved density is then below the target, by less than ``D * g / T``;
4. the rest of the capacity becomes one trailing padding document (a multiple of ``g``, since ``T``
   and every document are), so the pack is exactly ``T`` tokens.

The sweep uses one granule for all its cases, ``g = 2 * max(cp_size of the sweep)``: every cp_size
and layout then sees the very same packs (a multiple of ``2*cp`` for every ``cp`` that divides the
largest one), so scaling numbers compare the same work. A pack is a pure function of
``(seed, capacity, docs, density, granule, index)``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

LOGNORMAL_SIGMA = 1.0


@dataclass(frozen=True)
class Pack:
    """One pack: ``lengths`` (padded, what ``cu_seqlens`` holds) and the real tokens of each."""

    capacity: int
    granule: int
    lengths: tuple[int, ...]  # padded document lengths, trailing padding document included
    real: tuple[int, ...]  # real tokens of each entry of ``lengths`` (0 for the padding document)
    docs: int  # documents asked for (``len(lengths)`` may be one more: the padding document)

    @property
    def real_tokens(self) -> int:
        return sum(self.real)

    @property
    def density(self) -> float:
        return self.real_tokens / self.capacity

    @property
    def cu_seqlens(self) -> list[int]:
        out = [0]
        for n in self.lengths:
            out.append(out[-1] + n)
        return out


def _split(total: int, weights: list[float]) -> list[int]:
    """``total`` split in proportion to ``weights``, rounded so the parts add up exactly."""
    s = sum(weights)
    exact = [total * w / s for w in weights]
    parts = [math.floor(x) for x in exact]
    short = total - sum(parts)
    order = sorted(range(len(weights)), key=lambda i: (parts[i] - exact[i], i))
    for i in order[:short]:
        parts[i] += 1
    return parts


def make_pack(capacity: int, docs: int, density: float, granule: int, seed: int | str = 0) -> Pack:
    """One pack of ``docs`` documents in ``capacity`` tokens (see the module docstring)."""
    if granule < 1:
        raise ValueError(f"granule must be >= 1, got {granule}")
    if capacity < 1 or capacity % granule:
        raise ValueError(f"pack capacity {capacity} is not a positive multiple of the granule {granule}")
    if docs < 1:
        raise ValueError(f"a pack needs at least one document, got docs={docs}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    rng = random.Random(f"cpbench-pack:{seed}")
    weights = [rng.lognormvariate(0.0, LOGNORMAL_SIGMA) for _ in range(docs)]
    real = _split(round(density * capacity), weights)
    padded = [-(-n // granule) * granule for n in real]
    while sum(padded) > capacity:
        # round down the document that wastes the most padding (ties: the longest, then the first)
        i = max((j for j in range(docs) if padded[j]), key=lambda j: (padded[j] - real[j], padded[j], -j))
        padded[i] -= granule
        real[i] = min(real[i], padded[i])
    tail = capacity - sum(padded)
    lengths = padded + ([tail] if tail else [])
    reals = real + ([0] if tail else [])
    return Pack(capacity=capacity, granule=granule, lengths=tuple(lengths), real=tuple(reals), docs=docs)


def make_packs(
    capacity: int, docs: int, density: float, granule: int, count: int, seed: int = 0
) -> list[Pack]:
    """``count`` packs (the batch of a THD case), each seeded from ``seed`` and its index."""
    return [
        make_pack(capacity, docs, density, granule, seed=f"{seed}:{capacity}:{docs}:{density!r}:{b}")
        for b in range(count)
    ]


def concat_cu_seqlens(packs: list[Pack]) -> list[int]:
    """Global cumulative lengths of the packs laid end to end (what the layer's ``cu_seqlens`` is)."""
    out = [0]
    for p in packs:
        for n in p.lengths:
            out.append(out[-1] + n)
    return out


def batch_cu_seqlens(
    capacity: int, docs: int, density: float, granule: int, count: int = 1, seed: int = 0, device=None
):
    """``(cu_seqlens, real_tokens)``: int32 tensor ``[D'+1]`` of ``count`` concatenated packs, real tokens."""
    import torch

    packs = make_packs(capacity, docs, density, granule, count, seed)
    cu = torch.tensor(concat_cu_seqlens(packs), dtype=torch.int32, device=device)
    return cu, sum(p.real_tokens for p in packs)
