"""Cross-rank agreement on a layer call's input, before the first collective of the call.

Every rank validates its own input, but ranks that pass *different* valid inputs (another
``cu_seqlens`` with the same total, another local length, shape, dtype, configuration or option) would
otherwise run the layer's collectives on inconsistent data: a silent wrong output, a transport abort or a
hang. And a rank that rejects its input alone would leave the others waiting in a collective until the
group timeout.

**The fingerprint** of a call is a tuple of ``(name, value)`` pairs:

* the layer's static description, built once per layer by :func:`static_fields` from its structural
  choices (strategy, layout, ``fused``, cp size) and, *field by field* (:func:`dataclasses.fields`), its
  configuration dataclass (:class:`~cp_core.mixer.Mamba2Config`, or the seed API's
  :class:`~cp_core.mamba_cp.SeedConfig`) and its :class:`~cp_core.options.CPOptions`: a field added to
  either is compared without anyone listing it;
* what the call brings: layout, batch, local tokens, compute dtype, device type, width (``with_z`` of the
  seed API), number of documents and the ``cu_seqlens`` values (their hash, computed once per plan).

**One exchange per call** (``CPOptions.agree = "call"``; the default ``"auto"`` where the group gathers
on the host: gloo, or ``backend="cpu:gloo,cuda:nccl"``): every rank sends 16 bytes, its
verdict (accepted its input or not) and a 64-bit hash of its fingerprint, in one ``all_gather``, and
reads the result on the host. Equal hashes and no rejection: the layer runs. Otherwise (every rank sees
the same gathered vector, so every rank takes the same branch) a second exchange (``all_gather_object``)
carries every rank's full fingerprint and error message, and every rank raises the same kind of
``ValueError``: naming each field that differs and the ranks of each value, or the ranks that rejected
their input and why. A rank that rejects its input on any call, the first of a batch or a later one,
therefore raises on every rank and none waits. Cost: docs/design.md (agreement) and
``scripts/agree_cost.py``. On an NCCL-only group the host read of the 16-byte result would wait for the
work queued before it (a device sync per layer), so ``"auto"`` agrees once per batch there: create the CP
group with a CPU backend beside NCCL to keep the per-call check without a sync.

``"batch"`` (documented cheaper mode): the agreement is cached with the batch's token plan per fingerprint
(:attr:`~cp_core.plan.TokenPlan.extras`), so it runs when a plan is first used (packed: a new
``cu_seqlens``; BSHD: a new shape) and the later calls of the batch exchange nothing. The price: a rank
whose input is rejected alone on a *later* call raises alone while the others, whose agreement is cached,
wait in the layer's first collective until the group's timeout.

:class:`~cp_core.comm.LocalGroup` and cp_size 1 exchange nothing (local errors are raised as they are).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import torch
import torch.distributed as dist

from . import comm
from .plan import TokenPlan, get_plan

__all__ = ["checked_plan", "agree", "resolve_mode", "static_fields", "fingerprint_hash"]


def static_fields(call: str, fields: dict, **dataclasses_) -> tuple[tuple[str, str], ...]:
    """A layer's static fingerprint: ``("call", call)``, then ``fields`` (name -> value), then every field
    of every dataclass instance given (``config=...``, ``options=...``) as ``"config.d_state"`` etc. Values
    are compared by ``repr``."""
    items = [("call", call)] + [(k, repr(v)) for k, v in fields.items()]
    for prefix, obj in dataclasses_.items():
        if not dataclasses.is_dataclass(obj):
            raise TypeError(f"static_fields: {prefix} must be a dataclass instance, got {type(obj).__name__}")
        items += [(f"{prefix}.{f.name}", repr(getattr(obj, f.name))) for f in dataclasses.fields(obj)]
    return tuple(items)


def _digest(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "little", signed=True)


@functools.lru_cache(maxsize=256)
def _static_hash(static: tuple) -> int:
    return _digest(repr(static))


def fingerprint_hash(static: tuple, call: tuple) -> int:
    """The 64-bit hash of a fingerprint (its static part hashed once per layer)."""
    return _digest(f"{_static_hash(static)}|{call!r}")


def _cu_hash(plan: TokenPlan | None) -> str:
    if plan is None or plan.host_cu is None:
        return "-"
    h = plan.extras.get("cu hash")
    if h is None:
        h = plan.extras["cu hash"] = f"hash {_digest(repr(plan.host_cu)) & (2**64 - 1):016x}"
    return h


def _real(group) -> bool:
    return not (group is None or isinstance(group, comm.LocalGroup) or comm.group_size(group) == 1)


def _on_host(group) -> bool:
    """Whether ``group`` gathers CPU tensors (gloo, or a CPU backend beside NCCL): no wait for the GPU."""
    return str(dist.get_backend(group)) != "nccl"


def _device(group):
    return "cpu" if _on_host(group) else torch.device("cuda", torch.cuda.current_device())


def resolve_mode(mode: str, group) -> str:
    """``CPOptions.agree`` for ``group``: ``"auto"`` is ``"call"`` where the 16-byte gather runs on the host,
    ``"batch"`` on an NCCL-only group (its per-call host read would be a device sync in every layer)."""
    if mode != "auto":
        return mode
    return "call" if not _real(group) or _on_host(group) else "batch"


def agree(group, static: tuple, call: tuple = (), error: BaseException | None = None) -> None:
    """One 16-byte all-gather of every rank's verdict (``error``: this rank's rejection of its input, or
    None) and fingerprint hash (``static`` + ``call``: ``(name, value)`` pairs); on a rejection or a
    difference, a second exchange of the full fingerprints and messages, then ValueError on every rank."""
    if not _real(group):
        if error is not None:
            raise error
        return
    cp, rank = comm.group_size(group), comm.group_rank(group)
    h = 0 if error is not None else fingerprint_hash(static, call)
    mine = torch.tensor([0 if error is not None else 1, h], dtype=torch.int64).to(_device(group))
    out = mine.new_empty(2 * cp)
    comm.COUNTS["agree"] += 1
    comm._all_gather_single(out, mine, group=group)
    rows = out.view(cp, 2).tolist()  # the one host read of the check
    if all(r[0] == 1 for r in rows) and len({r[1] for r in rows}) == 1:
        return
    # every rank saw the same rows, so every rank is here: the full fingerprints and the messages
    msg = None if error is None else f"{type(error).__name__}: {error}"
    detail: list = [None] * cp
    comm.COUNTS["agree detail"] += 1
    dist.all_gather_object(detail, (msg, static + tuple(call)), group=group)
    rejected = [r for r in range(cp) if rows[r][0] == 0]
    if rejected:
        if error is not None:
            others = [r for r in rejected if r != rank]
            also = f"; rank(s) {others} rejected theirs too" if others else ""
            raise ValueError(
                f"{error} [rank {rank} of the CP group of {cp}{also}; no rank runs the layer]"
            ) from error
        r0 = rejected[0]
        raise ValueError(
            f"rank(s) {rejected} of the CP group of {cp} rejected their input, so no rank runs the layer; "
            f"rank {r0} says: {detail[r0][0]}"
        )
    names: list[str] = []
    for _, items in detail:
        names += [n for n, _ in items if n not in names]
    diffs = []
    for name in names:
        vals = [dict(items).get(name, "(absent)") for _, items in detail]
        if len(set(vals)) > 1:
            by_value: dict[str, list[int]] = {}
            for r, v in enumerate(vals):
                by_value.setdefault(v, []).append(r)
            diffs.append(f"{name}: " + ", ".join(f"rank(s) {rs}: {v}" for v, rs in by_value.items()))
    if not diffs:  # equal fingerprints, different hashes: cannot happen unless the hash itself differs
        diffs = [f"fingerprint hash: {[r[1] for r in rows]}"]
    raise ValueError(
        f"the ranks of the CP group (size {cp}) passed different inputs to the same layer call; every rank "
        f"must pass the same global batch description. Differences: " + "; ".join(diffs)
    )


def checked_plan(
    group,
    layout: str,
    batch: int,
    length: int,
    device,
    cu_seqlens: torch.Tensor | None,
    *,
    static: tuple = (),
    call: dict | None = None,
    error: BaseException | None = None,
    mode: str = "auto",
) -> TokenPlan | None:
    """The (cached) token plan of this call, agreed over ``group``: validate locally, then agree.

    ``static``: the layer's :func:`static_fields`; ``call``: what else this call must match on (dtype,
    device type, width...); the plan's own parameters (layout, batch, local tokens, documents,
    ``cu_seqlens`` values) are always compared. ``error``: a local rejection found by the caller, shared
    with the group instead of raised alone. ``mode``: ``"call"`` (agree now), ``"batch"`` (once per plan
    and fingerprint) or ``"auto"`` (:func:`resolve_mode`; see the module docstring)."""
    cp = comm.group_size(group)
    plan = None
    if error is None:
        try:
            plan = get_plan(cp, layout, batch, length, device, cu_seqlens)
        except ValueError as e:
            error = e
    if not _real(group):
        if error is not None:
            raise error
        return plan
    items = (
        ("layout", repr(layout)),
        ("batch", str(batch)),
        ("local tokens", str(length // max(cp, 1))),
        *((k, repr(v)) for k, v in (call or {}).items()),
        ("documents", "-" if plan is None or plan.host_cu is None else str(len(plan.host_cu) - 1)),
        ("cu_seqlens values", _cu_hash(plan)),
    )
    key = None
    if resolve_mode(mode, group) == "batch" and plan is not None:
        key = (id(group), fingerprint_hash(static, items))
        if key in plan.extras.setdefault("agreed", set()):
            return plan
    agree(group, static, items, error)
    if key is not None:
        plan.extras["agreed"].add(key)
    return plan
