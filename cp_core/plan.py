"""Token plans: the one permutation that turns the all-to-all's rank-major rows into global order.

After the pre all-to-all, rank ``s`` holds a ``[cp, B, L_local, C/cp]`` buffer whose slot ``r``
came from rank ``r``: ``cp*B*L_local`` rows in rank-major order. The global order wanted by the
conv1d and the SSD kernel is ``[B, L]``. :class:`TokenPlan` holds

* ``gather`` ``[B*L]``: global row ``i`` is received row ``gather[i]`` (applied after the pre all-to-all),
* ``scatter`` ``[cp*B*L_local]``: its inverse, received row ``q`` is global row ``scatter[q]``
  (applied before the post all-to-all),
* ``seq_idx`` ``[B, L]`` int32 (packed input only): the document of every global token,

all built with tensor ops on the data's device (no host sync) and cached per
``(cu_seqlens, cp_size, layout, batch, length, device)``, so every layer of a batch reuses them.
Validating a ``cu_seqlens`` reads it once on the host, when its plan is first built.

**When a cached plan is reused.** A plan is looked up by the ``cu_seqlens`` tensor object (weak reference)
and its autograd version counter (torch's in-place ops bump it). Writes that bypass the counter (a NumPy
view's ``cu.numpy()[:] = ...``, ``cu.data.copy_(...)``, a reused ``torch.from_numpy`` buffer refilled by a
data loader, DLPack) are caught as follows:

* CPU ``cu_seqlens``: the plan keeps a copy of the values it was built from and compares them on every
  lookup (:func:`torch.equal` on the host, no device involved): changed values build a new plan.
* CUDA ``cu_seqlens``: comparing the values would need a device-to-host copy, a host synchronisation per
  layer, so it is not done: **a new batch must come in a new tensor, or be written with a torch in-place op
  on the tensor itself** (``cu.copy_(new)``, which bumps ``cu._version``). Refilling a CUDA ``cu_seqlens``
  through ``.data``, DLPack or a raw pointer while keeping the same tensor reuses the old plan.

**Inference mode.** Cached tensors outlive the call that built them, so they are always built outside
``torch.inference_mode()`` (:func:`build_outside_inference`): a plan first built in an eval pass under
inference mode serves a later training step (an inference tensor cannot be saved for backward).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .layout import check_cu_seqlens, check_layout, check_seq_len, positions


def build_outside_inference():
    """Context for building a cached tensor: ``torch.inference_mode(False)`` (normal tensors, usable by a
    later training step) when inference mode is on, else nothing (no cost)."""
    if torch.is_inference_mode_enabled():
        return torch.inference_mode(False)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class TokenPlan:
    cp_size: int
    layout: str
    batch: int
    length: int  # tokens per sequence (BSHD) or of the whole pack (THD), global
    positions: torch.Tensor  # [cp, length/cp] global position of each rank's local token
    gather: torch.Tensor  # [batch*length]
    scatter: torch.Tensor  # [cp*batch*length/cp]
    seq_idx: torch.Tensor | None  # [batch, length] int32, packed input only
    cu_seqlens: torch.Tensor | None  # int32 on the data's device, packed input only
    host_cu: tuple[int, ...] | None = None  # cu_seqlens read once on the host when it was validated
    #: the permutation as contiguous pieces (host ints), when it has few: ``runs[r]`` lists
    #: ``(q0, g0, n)``: rows ``[q0, q0+n)`` of rank ``r``'s shard are global rows ``[g0, g0+n)``. Every
    #: rank's list has the same ``q0``/``n`` (the ranks' shards have one structure), so a piece sent is
    #: the piece received. ``None``: too many pieces (or a packed plan built without reading
    #: ``cu_seqlens`` on the host): the exchange uses ``gather``/``scatter``.
    runs: tuple[tuple[tuple[int, int, int], ...], ...] | None = None
    extras: dict = field(default_factory=dict, compare=False)  # per-strategy indices cached with the plan

    @property
    def local_length(self) -> int:
        return self.length // self.cp_size


def build_plan(
    cp_size: int,
    layout: str,
    batch: int,
    length: int,
    device: torch.device | str,
    cu_seqlens: torch.Tensor | None = None,
    *,
    validate: bool = True,
) -> TokenPlan:
    """Build (uncached) the token plan; see :func:`get_plan` for the cached entry point."""
    check_layout(layout)
    host_cu = None
    if cu_seqlens is None:
        check_seq_len(length, cp_size, layout)
    else:
        if batch != 1:
            raise ValueError(f"packed input has batch 1, got {batch}")
        if validate:
            host_cu = check_cu_seqlens(cu_seqlens, length, cp_size, layout)
        # a copy of its own: the caller's tensor may be refilled (next batch) while this plan is still in use
        cu_seqlens = cu_seqlens.to(device=device, non_blocking=True, copy=True)
    device = torch.device(device)
    pos = positions(cp_size, layout, length=length, cu_seqlens=cu_seqlens, device=device)  # [cp, Ll]
    local = length // cp_size
    b = torch.arange(batch, device=device, dtype=torch.long).view(1, batch, 1)
    scatter = (b * length + pos.view(cp_size, 1, local)).reshape(-1)  # rows (r, b, j) -> b*L + pos[r, j]
    gather = torch.empty_like(scatter)
    gather[scatter] = torch.arange(scatter.numel(), device=device, dtype=torch.long)
    seq_idx = None
    if cu_seqlens is not None:
        t = torch.arange(length, device=device, dtype=torch.int32)
        seq_idx = (torch.searchsorted(cu_seqlens, t, right=True) - 1).to(torch.int32).view(1, length)
    runs = None
    if cu_seqlens is None or host_cu is not None:
        runs = host_runs(cp_size, layout, batch, length, host_cu)
    return TokenPlan(cp_size, layout, batch, length, pos, gather, scatter, seq_idx, cu_seqlens, host_cu, runs)


#: Above this many pieces per rank the exchange keeps one all-to-all plus a row gather (small pieces
#: move slower than one message and a copy).
RUNS_MAX = 16


def host_runs(
    cp_size: int, layout: str, batch: int, length: int, host_cu: tuple[int, ...] | None = None
) -> tuple[tuple[tuple[int, int, int], ...], ...] | None:
    """:attr:`TokenPlan.runs`, computed on the host (no device tensor is read); ``None`` above
    :data:`RUNS_MAX` pieces. A piece ends wherever the global index of the next local row is not the
    next global row on ANY rank, so that every rank's list has the same local offsets and sizes."""
    cu = None if host_cu is None else torch.tensor(host_cu, dtype=torch.int32)
    pos = positions(cp_size, layout, length=length, cu_seqlens=cu, device="cpu")  # [cp, local]
    local = length // cp_size
    if batch * local == 0:
        return None
    glob = (torch.arange(batch).view(1, batch, 1) * length + pos.view(cp_size, 1, local)).reshape(cp_size, -1)
    cut = (glob[:, 1:] != glob[:, :-1] + 1).any(0)  # [batch*local - 1]: a piece ends after row q
    starts = [0] + (torch.nonzero(cut).view(-1) + 1).tolist()
    if len(starts) > RUNS_MAX:
        return None
    ends = starts[1:] + [batch * local]
    g = glob[:, starts].tolist()
    return tuple(
        tuple((q0, g[r][i], q1 - q0) for i, (q0, q1) in enumerate(zip(starts, ends, strict=True)))
        for r in range(cp_size)
    )


_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 64


def get_plan(
    cp_size: int,
    layout: str,
    batch: int,
    length: int,
    device: torch.device | str,
    cu_seqlens: torch.Tensor | None = None,
) -> TokenPlan:
    """Cached :func:`build_plan`. Packed plans are keyed on the ``cu_seqlens`` tensor object itself
    (held by weak reference, and its in-place version counter; a CPU tensor's values are compared too,
    see the module docstring), so a new batch never reuses a stale plan, while every layer of one batch
    shares one. Built outside inference mode."""
    device = torch.device(device)
    key = (cp_size, layout, batch, length, str(device), None if cu_seqlens is None else id(cu_seqlens))
    hit = _CACHE.get(key)
    if hit is not None:
        ref, version, values, plan = hit
        if ref is None or (
            ref() is cu_seqlens
            and cu_seqlens._version == version
            and (values is None or torch.equal(cu_seqlens, values))
        ):
            _CACHE.move_to_end(key)
            return plan
    with build_outside_inference():
        plan = build_plan(cp_size, layout, batch, length, device, cu_seqlens)
        ref = values = None
        if cu_seqlens is not None:
            ref = weakref.ref(cu_seqlens)
            if cu_seqlens.device.type == "cpu":  # compared on every lookup: host memory, no sync
                values = cu_seqlens.clone()
    _CACHE[key] = (ref, None if cu_seqlens is None else _version(cu_seqlens), values, plan)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return plan


def _version(t: torch.Tensor) -> int:
    """Autograd's in-place version counter (an inference tensor has none: -1, its values are compared)."""
    return -1 if t.is_inference() else t._version


def clear_cache() -> None:
    _CACHE.clear()
