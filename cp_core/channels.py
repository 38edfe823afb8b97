"""Which channels of ``[z | x | B | C | dt]`` each CP rank owns, and the one-pass pack/unpack.

Hidden-parallel CP gives rank ``r`` the heads ``[r*H/cp, (r+1)*H/cp)``: the matching slices of
``z`` and ``x`` (``d_inner/cp`` channels each) and of ``dt`` (``H/cp``), and the groups of ``B``
and ``C`` those heads read. With ``n_groups >= cp`` a rank owns ``n_groups/cp`` groups; with
``n_groups < cp`` the ``cp/n_groups`` ranks that share a group each receive a copy of it
(replication), and the gradients of the copies are summed on the way back.

:func:`pack` writes every destination rank's channels into one ``[cp, N, W_local]`` send buffer
(one strided copy per block: a single pass over the bytes), :func:`unpack` is its adjoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import gather_triton


@dataclass(frozen=True)
class Block:
    """``count`` pieces of ``width`` channels, piece ``i`` starting at ``src + i*step``; piece ``i`` goes
    to ranks ``[i*rep, (i+1)*rep)`` (``rep = cp/count``) at offset ``dst`` of their local width.
    ``stride`` 0 means ``step = width`` (back-to-back pieces); a head chunk of an overlapped layer
    takes every rank's ``j``-th sub-range, ``stride`` apart."""

    src: int
    count: int
    width: int
    dst: int
    stride: int = 0

    @property
    def step(self) -> int:
        return self.stride or self.width


@dataclass(frozen=True)
class ChannelPlan:
    cp_size: int
    blocks: tuple[Block, ...]
    in_width: int
    local_width: int

    @property
    def replicated(self) -> bool:
        """True when some block goes to several ranks (``n_groups < cp``)."""
        return any(b.count != self.cp_size for b in self.blocks)

    @staticmethod
    def single(cp_size: int, local_width: int, chunk: tuple[int, int] = (0, 1)) -> ChannelPlan:
        """Rank ``r`` owns channels ``[r*w, (r+1)*w)`` of a ``cp*w`` wide tensor; with ``chunk=(j, k)``
        only the ``j``-th of ``k`` equal sub-ranges of each rank's channels."""
        j, k = chunk
        w = local_width // k
        return ChannelPlan(cp_size, (Block(j * w, cp_size, w, 0, local_width),), cp_size * local_width, w)


def check_heads(num_heads: int, n_groups: int, cp_size: int) -> None:
    """The head/group constraints of hidden-parallel CP; ValueError naming the values."""
    if cp_size < 1:
        raise ValueError(f"cp_size must be >= 1, got {cp_size}")
    if num_heads < 1 or n_groups < 1:
        raise ValueError(f"num_heads and n_groups must be >= 1, got {num_heads} and {n_groups}")
    if num_heads % n_groups:
        raise ValueError(f"num_heads {num_heads} is not a multiple of n_groups {n_groups}")
    if num_heads % cp_size:
        raise ValueError(
            f"num_heads {num_heads} is not divisible by cp_size {cp_size}: hidden-parallel CP gives every rank "
            f"num_heads/cp_size heads (the state-passing strategy has no such limit)"
        )
    if n_groups >= cp_size and n_groups % cp_size:
        raise ValueError(f"n_groups {n_groups} >= cp_size {cp_size} must be a multiple of it")
    if n_groups < cp_size and cp_size % n_groups:
        raise ValueError(f"n_groups {n_groups} < cp_size {cp_size}: cp_size must be a multiple of n_groups")


def local_groups(n_groups: int, cp_size: int) -> int:
    """Groups of B/C each rank holds (1 when a group is replicated over several ranks)."""
    return max(n_groups // cp_size, 1)


def check_chunks(num_heads: int, n_groups: int, cp_size: int, chunks: int) -> None:
    """Head chunks of an overlapped layer: ``chunks`` must divide the heads each rank holds, and either
    divide its groups of B/C (a chunk holds whole groups) or be a multiple of them (a chunk holds part of
    one group's heads and a copy of that group's B/C: more bytes sent, their gradients summed)."""
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise ValueError(f"overlap_chunks must be a positive int, got {chunks!r}")
    h_loc, g_loc = num_heads // cp_size, local_groups(n_groups, cp_size)
    if h_loc % chunks or (g_loc % chunks and chunks % g_loc):
        raise ValueError(
            f"overlap_chunks {chunks} must divide the heads each rank holds (n_heads {num_heads} / cp_size "
            f"{cp_size} = {h_loc}) and divide, or be a multiple of, its groups of B/C ({g_loc})"
        )


def chunk_groups(g_loc: int, chunks: int, j: int) -> tuple[int, int]:
    """``(first, count)`` of a rank's ``g_loc`` local groups that head chunk ``j`` of ``chunks`` reads."""
    if g_loc % chunks == 0:
        return j * (g_loc // chunks), g_loc // chunks
    return j * g_loc // chunks, 1  # chunks = m * g_loc: m chunks share every group


def mamba_channel_plan(
    cp_size: int,
    num_heads: int,
    head_dim: int,
    n_groups: int,
    d_state: int,
    *,
    with_z: bool = True,
    chunk: tuple[int, int] = (0, 1),
) -> ChannelPlan:
    """Plan for ``[z | x | B | C | dt]`` (or ``[x | B | C | dt]`` with ``with_z=False``). ``chunk=(j, k)``:
    only the ``j``-th of ``k`` head chunks of every rank (its heads, their groups, their ``dt``)."""
    check_heads(num_heads, n_groups, cp_size)
    j, k = chunk
    if k > 1:
        check_chunks(num_heads, n_groups, cp_size, k)
    d_inner = num_heads * head_dim
    gcount = min(n_groups, cp_size)
    g0, gn = chunk_groups(local_groups(n_groups, cp_size), k, j)
    # (total width, pieces, width of this chunk's piece, its index within the rank's piece)
    heads = (d_inner, cp_size, d_inner // cp_size // k, j)
    widths = [heads] * (2 if with_z else 1) + [
        (n_groups * d_state, gcount, gn * d_state, g0 // gn),
        (n_groups * d_state, gcount, gn * d_state, g0 // gn),
        (num_heads, cp_size, num_heads // cp_size // k, j),
    ]
    blocks, src, dst = [], 0, 0
    for total, count, wc, i in widths:
        w = total // count
        blocks.append(Block(src + i * wc, count, wc, dst, w if k > 1 else 0))
        src += total
        dst += wc
    return ChannelPlan(cp_size, tuple(blocks), src, dst)


def _pieces(t: torch.Tensor, b: Block) -> torch.Tensor:
    """The ``[N, count, width]`` strided view of block ``b``'s pieces in the 2-D ``t``."""
    n = t.shape[0]
    s0, s1 = t.stride()
    return t.as_strided((n, b.count, b.width), (s0, b.step * s1, s1), t.storage_offset() + b.src * s1)


def pack(x: torch.Tensor, plan: ChannelPlan) -> torch.Tensor:
    """``x [N, in_width]`` -> send buffer ``[cp, N, local_width]``; slot ``r`` holds rank ``r``'s channels.
    On CUDA one Triton kernel (:mod:`cp_core.kernels.gather_triton`); this torch code is its reference."""
    if _fast(x):
        return gather_triton.pack(x, plan)
    return pack_torch(x, plan)


def unpack(s: torch.Tensor, plan: ChannelPlan, out: torch.Tensor | None = None) -> torch.Tensor:
    """Adjoint of :func:`pack`: ``[cp, N, local_width]`` -> ``[N, in_width]``, replicas summed. With ``out``
    (``[N, in_width]``, last dim contiguous, e.g. a column slice of a wider buffer) only the plan's
    channels are written there (a head chunk fills its columns of the layer's buffer)."""
    if _fast(s) and plan.replicated is False:
        return gather_triton.unpack(s, plan, out)
    return unpack_torch(s, plan, out)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx):
        ctx.save_for_backward(idx)
        ctx.n = x.shape[0]
        return gather_triton.gather_rows(x, idx)

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        return g.new_zeros((ctx.n, g.shape[1])).index_add_(0, idx, g), None


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, idx)`` (rows of a 2-D tensor); one vectorised Triton kernel on CUDA
    (differentiable in ``x``: the gradient is scattered back with ``index_add_``)."""
    if _fast(x):
        if torch.is_grad_enabled() and x.requires_grad:
            return _GatherRows.apply(x, idx)
        return gather_triton.gather_rows(x, idx)
    return x.index_select(0, idx)


def _fast(t: torch.Tensor) -> bool:
    return gather_triton.available(t)


def pack_torch(x: torch.Tensor, plan: ChannelPlan) -> torch.Tensor:
    """Reference :func:`pack`: one strided copy per block."""
    n = x.shape[0]
    cp, w_loc = plan.cp_size, plan.local_width
    out = x.new_empty((cp, n, w_loc))
    for b in plan.blocks:
        rep = cp // b.count
        src = _pieces(x, b).unsqueeze(2).permute(1, 2, 0, 3)
        out.view(b.count, rep, n, w_loc)[..., b.dst : b.dst + b.width].copy_(src)
    return out


def unpack_torch(s: torch.Tensor, plan: ChannelPlan, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reference :func:`unpack`."""
    cp, n, w_loc = s.shape
    if out is None:
        out = s.new_empty((n, plan.in_width))
    for b in plan.blocks:
        rep = cp // b.count
        v = s.view(b.count, rep, n, w_loc)[..., b.dst : b.dst + b.width]
        v = v[:, 0] if rep == 1 else v.sum(1)
        _pieces(out, b).copy_(v.permute(1, 0, 2))
    return out
