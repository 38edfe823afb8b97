"""Hidden-parallel context parallelism for a Mamba2 mixer: the ``mamba_cp`` API of NeMo AutoModel.

Same names and semantics as ``nemo_automodel.components.distributed.mamba_cp``: before conv1d +
SSD, an all-to-all turns the sequence-sharded ``[B, L/cp, C]`` (or packed ``[T/cp, C]`` with the
global padded ``cu_seqlens``) into head-sharded ``[B, L, C/cp]`` in global token order (undoing
the head-tail / DualChunkSwap order), and :meth:`MambaContextParallel.post_conv_ssm` inverts it.

Two paths return identical tensors:

``fused=True`` (default)
    one ``all_to_all_single`` per direction, every rank's channels packed into one send buffer,
    one cached token permutation (:mod:`cp_core.plan`), no host syncs (:mod:`cp_core.hidden`);
``fused=False``
    the seed's sequence of operations (five all-to-alls, per-chunk reorders, per-document loops),
    kept as the in-project baseline. Unlike the seed it accepts zero-length documents.

Beyond the seed: ``layout="contiguous"``, ``D`` of shape ``[d_inner]``, ``with_z=False`` (the
mixer gates with the local ``z`` after the return trip, so ``z`` need not travel), validation
that raises ``ValueError`` on every rank before any collective, and :class:`~cp_core.comm.LocalGroup`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import comm
from .agree import checked_plan, static_fields
from .channels import ChannelPlan, check_heads, local_groups, mamba_channel_plan
from .hidden import heads_to_seq, seq_to_heads
from .layout import PER_DOCUMENT, check_cu_seqlens, check_layout
from .options import CPOptions, default_options
from .plan import get_plan
from .regions import A2A_POST, A2A_PRE, LAYOUT, region

__all__ = [
    "MambaContextParallel",
    "SeedConfig",
    "CPConfigError",
    "_AllToAll",
    "_all_to_all",
    "_all_to_all_cp2hp",
    "_all_to_all_hp2cp",
    "_reorder_chunks",
    "_deinterleave_packed_seqs",
    "_reinterleave_packed_seqs",
    "_undo_attention_load_balancing",
    "_redo_attention_load_balancing",
]


# --------------------------------------------------------------------------- seed module functions


class _AllToAll(torch.autograd.Function):
    """Autograd wrapper around ``all_to_all_single`` (equal splits along dim 0); backward is another one."""

    @staticmethod
    def forward(ctx, input_: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        input_ = input_.contiguous()
        return comm.all_to_all_single(torch.empty_like(input_), input_, group)

    @staticmethod
    def backward(ctx, grad_output):
        grad_output = grad_output.contiguous()
        return comm.all_to_all_single(torch.empty_like(grad_output), grad_output, ctx.group), None


def _all_to_all(input_: torch.Tensor, group) -> torch.Tensor:
    """Functional entry point for the autograd-aware all-to-all."""
    return _AllToAll.apply(input_, group)


def _all_to_all_cp2hp(input_: torch.Tensor, cp_group, batch_size: int) -> torch.Tensor:
    """``[B, L_local, H]`` (or ``[T, H]``) -> ``[B, L_global, H/cp]`` (or ``[T*cp, H/cp]``), rank-major tokens."""
    cp = comm.group_size(cp_group)
    thd = input_.dim() == 2
    x = input_.unsqueeze(0) if thd else input_
    b, l_loc, h = x.shape
    if b != batch_size:
        raise ValueError(f"batch_size {batch_size} does not match the input's batch {b}")
    if h % cp:
        raise ValueError(f"hidden width {h} is not divisible by cp_size {cp}")
    x = x.reshape(b, l_loc, cp, h // cp).permute(2, 0, 1, 3).contiguous()
    x = _all_to_all(x, cp_group)  # [cp(src), B, L_local, H/cp]
    x = x.permute(1, 0, 2, 3).reshape(b, cp * l_loc, h // cp)
    return x[0] if thd else x


def _all_to_all_hp2cp(input_: torch.Tensor, cp_group, batch_size: int) -> torch.Tensor:
    """Inverse of :func:`_all_to_all_cp2hp`: ``[B, L_global, H/cp]`` -> ``[B, L_local, H]``."""
    cp = comm.group_size(cp_group)
    thd = input_.dim() == 2
    x = input_.unsqueeze(0) if thd else input_
    b, l_glob, h_loc = x.shape
    if b != batch_size:
        raise ValueError(f"batch_size {batch_size} does not match the input's batch {b}")
    if l_glob % cp:
        raise ValueError(f"sequence length {l_glob} is not divisible by cp_size {cp}")
    x = x.reshape(b, cp, l_glob // cp, h_loc).permute(1, 0, 2, 3).contiguous()
    x = _all_to_all(x, cp_group)  # [cp(src), B, L_local, H/cp]
    x = x.permute(1, 2, 0, 3).reshape(b, l_glob // cp, cp * h_loc)
    return x[0] if thd else x


def _doc_bounds(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    cu = cu_seqlens.tolist()
    return [(cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


def _reorder_chunks(
    input_: torch.Tensor, order: list[int], cu_seqlens: torch.Tensor | None = None
) -> torch.Tensor:
    """Reorder ``len(order)`` equal chunks along the sequence (dim 1 of ``[B, L, H]``, or per document
    along dim 0 of ``[T, H]`` when ``cu_seqlens`` is given): output chunk ``i`` is input chunk ``order[i]``."""
    n = len(order)
    if cu_seqlens is None:
        if input_.shape[1] % n:
            raise ValueError(f"sequence length {input_.shape[1]} is not divisible into {n} chunks")
        chunks = input_.chunk(n, dim=1)
        return torch.cat([chunks[i] for i in order], dim=1)
    pieces = []
    for start, end in _doc_bounds(cu_seqlens):
        if end == start:
            continue  # zero-length document: nothing to move
        if (end - start) % n:
            raise ValueError(f"document [{start}, {end}) is not divisible into {n} chunks")
        chunks = input_[start:end].chunk(n, dim=0)
        pieces.extend(chunks[i] for i in order)
    return torch.cat(pieces, dim=0) if pieces else input_[:0].clone()


def _undo_order(cp_size: int) -> list[int]:
    return [2 * i for i in range(cp_size)] + [2 * (cp_size - 1 - i) + 1 for i in range(cp_size)]


def _redo_order(cp_size: int) -> list[int]:
    order = []
    for r in range(cp_size):
        order += [r, 2 * cp_size - 1 - r]
    return order


def _undo_attention_load_balancing(input_, cp_size: int, cu_seqlens=None) -> torch.Tensor:
    """DualChunkSwap (rank-major ``[c0, c_{2cp-1}, c1, c_{2cp-2}, ...]``) -> sequential chunk order."""
    return _reorder_chunks(input_, _undo_order(cp_size), cu_seqlens)


def _redo_attention_load_balancing(input_, cp_size: int, cu_seqlens=None) -> torch.Tensor:
    """Sequential chunk order -> DualChunkSwap (inverse of :func:`_undo_attention_load_balancing`)."""
    return _reorder_chunks(input_, _redo_order(cp_size), cu_seqlens)


def _deinterleave_packed_seqs(input_: torch.Tensor, cu_seqlens: torch.Tensor, cp_size: int) -> torch.Tensor:
    """``[rank0_seq0 | rank0_seq1 | ... | rank1_seq0 | ...]`` -> ``[rank0_seq0 | rank1_seq0 | ... | rank0_seq1 | ...]``.
    ``cu_seqlens`` are the LOCAL (pre-all-to-all) cumulative lengths."""
    bounds = _doc_bounds(cu_seqlens)
    t_loc = input_.shape[0] // cp_size
    pieces = [input_[r * t_loc + s : r * t_loc + e] for s, e in bounds if e > s for r in range(cp_size)]
    return torch.cat(pieces, dim=0) if pieces else input_[:0].clone()


def _reinterleave_packed_seqs(input_: torch.Tensor, cu_seqlens: torch.Tensor, cp_size: int) -> torch.Tensor:
    """Inverse of :func:`_deinterleave_packed_seqs` (``cu_seqlens`` LOCAL)."""
    bounds = _doc_bounds(cu_seqlens)
    pieces = []
    for r in range(cp_size):
        for s, e in bounds:
            if e > s:
                n = e - s
                pieces.append(input_[cp_size * s + r * n : cp_size * s + (r + 1) * n])
    return torch.cat(pieces, dim=0) if pieces else input_[:0].clone()


# --------------------------------------------------------------------------- the class


class CPConfigError(ValueError, AssertionError):
    """A head/group configuration hidden-parallel CP cannot split. A ``ValueError`` (what ``cp_core`` raises
    for bad input) that is also an ``AssertionError`` (what NeMo AutoModel's module raises for the same
    cases), so code catching either keeps working; the messages carry NeMo's wording."""


def _check_config(num_heads: int, n_groups: int, cp_size: int) -> None:
    """NeMo AutoModel's checks, in its order and words, then the rest of :func:`check_heads`."""
    if cp_size >= 1 and num_heads % cp_size:
        raise CPConfigError(
            f"num_heads ({num_heads}) must be divisible by cp_size ({cp_size}): hidden-parallel CP gives every "
            f"rank num_heads/cp_size heads (the state-passing strategy has no such limit)"
        )
    if 1 <= n_groups < cp_size and cp_size % n_groups:
        raise CPConfigError(
            f"cp_size ({cp_size}) must be divisible by n_groups ({n_groups}) when n_groups < cp_size"
        )
    if n_groups >= cp_size >= 1 and n_groups % cp_size:
        raise CPConfigError(f"n_groups ({n_groups}) must be divisible by cp_size ({cp_size})")
    try:
        check_heads(num_heads, n_groups, cp_size)
    except ValueError as e:
        raise CPConfigError(str(e)) from None


@dataclass(frozen=True)
class SeedConfig:
    """What a :class:`MambaContextParallel` is built with that decides its collectives; every field is
    compared across the ranks on every call (:mod:`cp_core.agree`)."""

    num_heads: int
    head_dim: int
    n_groups: int
    d_state: int
    layout: str
    fused: bool


class MambaContextParallel:
    """Hidden-parallel CP for one Mamba2 mixer. Owns no parameters: it slices the mixer's
    ``conv1d``, ``dt_bias``, ``A_log`` and ``D`` on the fly, so gradients land in the full parameters.

    ``cp_group``: a process group (read through its ``size()`` and ``rank()``, so a stub with those two
    works for construction and slicing), a 1-D ``DeviceMesh`` (``mesh["cp"]``), a
    :class:`~cp_core.comm.LocalGroup`, or ``None`` (cp_size 1). A configuration that cannot be split raises
    :class:`CPConfigError` (a ``ValueError`` and an ``AssertionError``).
    """

    def __init__(
        self,
        cp_group,
        num_heads: int,
        head_dim: int,
        n_groups: int,
        d_state: int,
        mixer: torch.nn.Module | None,
        *,
        layout: str = "head_tail",
        fused: bool = True,
        options: CPOptions | None = None,
    ):
        check_layout(layout)
        if options is None:
            options = default_options()
        elif not isinstance(options, CPOptions):
            raise ValueError(f"options must be a cp_core.options.CPOptions, got {type(options).__name__}")
        self.options = options
        if not fused and layout not in PER_DOCUMENT:
            raise ValueError(f"the seed path (fused=False) takes a layout in {PER_DOCUMENT}, got {layout!r}")
        cp_group = comm.resolve_group(cp_group)
        self.cp_group = cp_group
        self.cp_size = comm.group_size(cp_group)
        self.cp_rank = comm.group_rank(cp_group)
        _check_config(num_heads, n_groups, self.cp_size)
        if head_dim < 1 or d_state < 1:
            raise CPConfigError(f"head_dim and d_state must be >= 1, got {head_dim} and {d_state}")
        self.num_heads, self.head_dim, self.n_groups, self.d_state = num_heads, head_dim, n_groups, d_state
        #: the mixer whose parameters are sliced (NeMo AutoModel's attribute name)
        self._mixer = mixer
        self.layout = layout
        self.fused = fused
        self.d_inner = num_heads * head_dim
        self.d_inner_local = self.d_inner // self.cp_size
        self.num_heads_local = num_heads // self.cp_size
        self.n_groups_local = local_groups(n_groups, self.cp_size)
        #: ranks that hold a copy of each group of B/C (``cp_size // n_groups`` when ``n_groups < cp_size``)
        self.group_repeat_count = self.cp_size // n_groups if n_groups < self.cp_size else 1
        self._chan = {
            z: mamba_channel_plan(self.cp_size, num_heads, head_dim, n_groups, d_state, with_z=z)
            for z in (True, False)
        }
        self._chan_out = ChannelPlan.single(self.cp_size, self.d_inner_local)
        self.seed_config = SeedConfig(num_heads, head_dim, n_groups, d_state, layout, fused)
        self._static = static_fields("mamba_cp", {}, config=self.seed_config, options=options)
        #: True when the calling layer has agreed on this call already (the mixer's seed path)
        self._agreed_by_caller = False

    # ------------------------------------------------------------------ validation

    def _check_input(self, t: torch.Tensor, width: int, cu_seqlens, what: str) -> tuple[int, int]:
        """Validate ``t`` (local or global token dim as ``what`` says); returns (batch, global length)."""
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{what} must be a floating-point tensor, got {getattr(t, 'dtype', type(t))}")
        if t.dim() not in (2, 3):
            raise ValueError(f"{what} must be [B, L, C] or packed [T, C], got shape {tuple(t.shape)}")
        if t.shape[-1] != width:
            raise ValueError(f"{what} has last-dim width {t.shape[-1]}, expected {width}")
        if cu_seqlens is not None and t.dim() != 2:
            raise ValueError(f"cu_seqlens given but {what} is not packed [T, C]: shape {tuple(t.shape)}")
        return (1 if t.dim() == 2 else t.shape[0]), t.shape[-2]

    def _plan(self, batch: int, length: int, device, cu_seqlens, call: dict, error=None):
        """The batch's token plan, validated and agreed over the group (:func:`cp_core.agree.checked_plan`,
        every call or once per batch as ``options.agree`` says); ``call``: this call's fields (op, dtype,
        width); ``error``: a local rejection to share with the group."""
        if self._agreed_by_caller:
            if error is not None:
                raise error
            return get_plan(self.cp_size, self.layout, batch, length, device, cu_seqlens)
        return checked_plan(
            self.cp_group, self.layout, batch, length, device, cu_seqlens,
            static=self._static, call=call, error=error, mode=self.options.agree,
        )  # fmt: skip

    def _checked(self, t, width, cu_seqlens, what, call: dict) -> tuple[int, int]:
        """:meth:`_check_input`, with a rejection agreed over the group (so every rank raises) at cp > 1."""
        try:
            return self._check_input(t, width, cu_seqlens, what)
        except ValueError as e:
            if self.cp_size == 1:
                raise
            self._plan(0, 0, "cpu", None, call, error=e)
            raise  # not reached: the agreement raises on every rank

    @staticmethod
    def _call(op: str, t, **more) -> dict:
        """A call's fields for the agreement: the op, the tensor's dtype, device type and width, ``more``."""
        ok = isinstance(t, torch.Tensor)
        return {
            "op": op,
            "dtype": t.dtype if ok else type(t).__name__,
            "device type": t.device.type if ok else "",
            "width": t.shape[-1] if ok and t.dim() else "",
            **more,
        }

    def proj_width(self, with_z: bool = True) -> int:
        return self._chan[with_z].in_width

    # ------------------------------------------------------------------ pre / post

    def pre_conv_ssm(
        self, projected_states: torch.Tensor, cu_seqlens: torch.Tensor | None = None, *, with_z: bool = True
    ) -> torch.Tensor:
        """``[B, L/cp, z|x|B|C|dt]`` (or packed ``[T/cp, ...]`` + global ``cu_seqlens``) ->
        ``[B, L, z_l|x_l|B_l|C_l|dt_l]`` in global token order. ``with_z=False``: no ``z`` in or out."""
        chan = self._chan[with_z]
        call = self._call("pre_conv_ssm", projected_states, with_z=with_z)
        batch, l_loc = self._checked(projected_states, chan.in_width, cu_seqlens, "projected_states", call)
        length = l_loc * self.cp_size
        if self.cp_size == 1:
            if cu_seqlens is not None:
                check_cu_seqlens(cu_seqlens, length, 1, self.layout)
            return projected_states
        plan = self._plan(batch, length, projected_states.device, cu_seqlens, call)  # validated and agreed
        if not self.fused:
            return self._seed_pre(projected_states, cu_seqlens, with_z)
        return seq_to_heads(projected_states, chan, plan, self.cp_group)

    def post_conv_ssm(self, output: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, L, d_inner/cp]`` (or ``[T, d_inner/cp]``) -> ``[B, L/cp, d_inner]`` (or ``[T/cp, d_inner]``)."""
        call = self._call("post_conv_ssm", output)
        batch, length = self._checked(output, self.d_inner_local, cu_seqlens, "output", call)
        if self.cp_size == 1:
            return output
        plan = self._plan(batch, length, output.device, cu_seqlens, call)
        if not self.fused:
            return self._seed_post(output, cu_seqlens)
        return heads_to_seq(output, self._chan_out, plan, self.cp_group)

    # ------------------------------------------------------------------ seed path

    def _split(self, projected_states: torch.Tensor, with_z: bool) -> list[torch.Tensor]:
        gs = self.n_groups * self.d_state
        widths = ([self.d_inner] if with_z else []) + [self.d_inner, gs, gs, self.num_heads]
        return list(torch.split(projected_states, widths, dim=-1))

    def _seed_pre(self, projected_states, cu_seqlens, with_z):
        batch = 1 if projected_states.dim() == 2 else projected_states.shape[0]
        parts = self._split(projected_states, with_z)
        if self.n_groups < self.cp_size:
            parts[-3] = self._repeat_group_state(parts[-3])
            parts[-2] = self._repeat_group_state(parts[-2])
        with region(A2A_PRE):
            parts = [_all_to_all_cp2hp(p, self.cp_group, batch) for p in parts]
        with region(LAYOUT):
            out = torch.cat(parts, dim=-1)
            if cu_seqlens is not None:
                out = _deinterleave_packed_seqs(out, cu_seqlens // self.cp_size, self.cp_size)
            if self.layout == "head_tail":
                out = _undo_attention_load_balancing(out, self.cp_size, cu_seqlens)
        return out

    def _seed_post(self, output, cu_seqlens):
        batch = 1 if output.dim() == 2 else output.shape[0]
        with region(LAYOUT):
            if self.layout == "head_tail":
                output = _redo_attention_load_balancing(output, self.cp_size, cu_seqlens)
            if cu_seqlens is not None:
                output = _reinterleave_packed_seqs(output, cu_seqlens // self.cp_size, self.cp_size)
        with region(A2A_POST):
            return _all_to_all_hp2cp(output, self.cp_group, batch)

    # ------------------------------------------------------------------ parameter slices

    def _repeat_group_state(self, state: torch.Tensor) -> torch.Tensor:
        """``[..., n_groups*d_state]`` -> ``[..., n_groups*repeat*d_state]``, ``repeat = cp/n_groups``."""
        if self.n_groups >= self.cp_size:
            return state
        rep = self.cp_size // self.n_groups
        s = state.reshape(*state.shape[:-1], self.n_groups, self.d_state)
        return s.repeat_interleave(rep, dim=-2).reshape(*state.shape[:-1], self.n_groups * rep * self.d_state)

    def _group_range(self) -> tuple[int, int]:
        """Channels ``[a, b)`` of one ``n_groups*d_state`` block (B or C) this rank uses."""
        if self.n_groups >= self.cp_size:
            w = self.n_groups_local * self.d_state
            return self.cp_rank * w, (self.cp_rank + 1) * w
        g = self.cp_rank // (self.cp_size // self.n_groups)
        return g * self.d_state, (g + 1) * self.d_state

    def _slice_conv_param(self, param: torch.Tensor) -> torch.Tensor:
        """Channels of ``conv1d`` (``[x | B | C]``, dim 0) this rank uses; gradients flow to ``param``."""
        if self.cp_size == 1:
            return param
        r, dl, gs = self.cp_rank, self.d_inner_local, self.n_groups * self.d_state
        a, b = self._group_range()
        x = param[r * dl : (r + 1) * dl]
        bb = param[self.d_inner + a : self.d_inner + b]
        cc = param[self.d_inner + gs + a : self.d_inner + gs + b]
        return torch.cat([x, bb, cc], dim=0)

    def _slice_vector_param(self, param: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a per-head ``[num_heads]`` (or per-channel ``[d_inner]``) vector: a view."""
        n = param.shape[0]
        if n not in (self.num_heads, self.d_inner):
            raise ValueError(
                f"expected a [num_heads]={self.num_heads} or [d_inner]={self.d_inner} vector, got {n}"
            )
        k = n // self.cp_size
        return param[self.cp_rank * k : (self.cp_rank + 1) * k]

    @property
    def mixer(self) -> torch.nn.Module | None:
        """The mixer whose parameters are sliced (``_mixer``, NeMo AutoModel's name)."""
        return self._mixer

    def _require_mixer(self):
        if self._mixer is None:
            raise ValueError("MambaContextParallel was built without a mixer: no parameters to slice")
        return self._mixer

    def get_conv1d_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``conv1d.weight [conv_dim, 1, k]`` (the mixer's, or ``weight``) -> ``[conv_dim_local, k]``."""
        w = self._require_mixer().conv1d.weight if weight is None else weight
        return self._slice_conv_param(w).squeeze(1)

    def get_conv1d_bias(self, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """``conv1d.bias [conv_dim]`` (the mixer's, or ``bias``) -> ``[conv_dim_local]``; None for a conv
        without bias."""
        b = self._require_mixer().conv1d.bias if bias is None else bias
        return None if b is None else self._slice_conv_param(b)

    def get_dt_bias(self, dt_bias: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's heads of ``dt_bias`` (the mixer's, or the tensor given): a view."""
        return self._slice_vector_param(self._require_mixer().dt_bias if dt_bias is None else dt_bias)

    def get_A_log(self, A_log: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's heads of ``A_log`` (the mixer's, or the tensor given): a view."""
        return self._slice_vector_param(self._require_mixer().A_log if A_log is None else A_log)

    def get_D(self, D: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's heads (or channels, for ``D [d_inner]``) of ``D`` (the mixer's, or the tensor given): a view."""
        return self._slice_vector_param(self._require_mixer().D if D is None else D)
