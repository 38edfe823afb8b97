"""Seeded global test data shared by the multi-rank tests: every rank builds the same tensors."""

from __future__ import annotations

import contextlib
import random

import torch


@contextlib.contextmanager
def setting(module, name: str, value):
    """``module.name = value`` inside the block (a rank function switching a module-level option)."""
    before = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, before)


def doc_lengths(n_docs: int, granule: int, seed: int, max_units: int = 3) -> list[int]:
    """``n_docs`` lengths, multiples of ``granule``, some zero (the first doc is never empty)."""
    rnd = random.Random(seed)
    lens = [granule * rnd.randint(0, max_units) for _ in range(n_docs)]
    lens[0] = max(lens[0], granule)
    if n_docs > 2:
        lens[1] = 0  # always one zero-length document
    return lens


def cu_from_lengths(lens: list[int]) -> torch.Tensor:
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32)


def randn(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)


def owned_channels(
    rank: int, cp: int, nh: int, hd: int, ng: int, ds: int, with_z: bool = True
) -> torch.Tensor:
    """Naive list of the ``[z|x|B|C|dt]`` channels rank ``rank`` owns, in its local order."""
    d_inner = nh * hd
    dl, hl = d_inner // cp, nh // cp
    idx = []
    off = 0
    for _ in range(2 if with_z else 1):  # z, x
        idx += list(range(off + rank * dl, off + (rank + 1) * dl))
        off += d_inner
    if ng >= cp:
        gl = ng // cp
        groups = range(rank * gl, (rank + 1) * gl)
    else:
        groups = [rank // (cp // ng)]
    for _ in range(2):  # B, C
        for g in groups:
            idx += list(range(off + g * ds, off + (g + 1) * ds))
        off += ng * ds
    idx += list(range(off + rank * hl, off + (rank + 1) * hl))
    return torch.tensor(idx, dtype=torch.long)
