"""Cross-rank agreement on a batch's input, once per batch, before the first collective of its layers.

Every rank validates its own input, but ranks that pass *different* valid inputs (another
``cu_seqlens`` with the same total, another local length, shape or dtype) would otherwise run the
layer's collectives on inconsistent data: a silent wrong output, or a transport abort. And a rank that
rejects its input alone would leave the others waiting in a collective until the group timeout.

So when a batch's token plan is first used (:func:`checked_plan`), the group exchanges a fingerprint
of what every rank is about to run: one ``all_gather`` of a fixed ``[62]`` int64 vector per rank (the
call, strategy, layout, batch, local tokens, width, dtype, configuration, number of documents and a
64-bit hash of the ``cu_seqlens`` values, a verdict flag and up to 400 bytes of the local error
message). Then every rank raises the same kind of ``ValueError`` (naming the fields that differ and
on which ranks, or the ranks that rejected their input and why), or none does.

Cost: one small all-gather and one host read of its result per batch (the plan build already reads
``cu_seqlens`` on the host once per batch); every later layer of the batch finds the agreement cached
with the plan (:attr:`~cp_core.plan.TokenPlan.extras`). Packed input: plans are cached per
``cu_seqlens`` tensor, so this runs once per batch. BSHD input has no per-batch tensor: plans, and
with them the agreement, are cached per (shape, dtype), so the check runs when a shape is first seen
(a per-layer check would cost a collective per layer).

Assumption: every rank builds its plan at the same call, i.e. every rank passes a new ``cu_seqlens``
tensor for a new batch (or all reuse theirs), and BSHD shapes change on all ranks at once. A rank whose
input changes while the others' plans are still cached cannot be told apart from a late rank.
:class:`~cp_core.comm.LocalGroup` and cp_size 1 exchange nothing (local errors are raised as they are).
"""

from __future__ import annotations

import hashlib
import zlib

import torch
import torch.distributed as dist

from . import comm
from .plan import TokenPlan, get_plan

__all__ = ["checked_plan", "agree", "FIELDS"]

#: fingerprint fields, in vector order (after the verdict flag)
FIELDS = (
    "call",
    "strategy",
    "layout",
    "batch",
    "local tokens",
    "width",
    "dtype",
    "config",
    "documents",
    "cu_seqlens values",
)
_STRINGS = ("call", "strategy", "layout", "dtype", "config")
_MSG_WORDS = 50  # 400 bytes of error message
_LEN = 1 + len(FIELDS) + 1 + _MSG_WORDS
_NAMES: dict[int, str] = {}  # crc -> string, for naming another rank's value


def _crc(s: str) -> int:
    v = zlib.crc32(s.encode())
    _NAMES[v] = s
    return v


_HIDDEN = [
    h + g + t
    for h in ("hidden", "hidden, seed path")
    for g in ("", ", CP_CORE_EXCHANGE=gather")
    for t in ("", ", CP_CORE_TRANSPORT=ce", ", CP_CORE_TRANSPORT=auto")
]
for _s in ("state_passing", "state_passing_chain", "head_tail", "contiguous", "mixer", "mamba_cp", *_HIDDEN):
    _crc(_s)
for _d in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
    _crc(str(_d))


def _cu_hash(cu: tuple[int, ...] | None) -> int:
    if cu is None:
        return 0
    digest = hashlib.blake2b(repr(cu).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _encode(fields: dict, cu: tuple[int, ...] | None, error: BaseException | None) -> torch.Tensor:
    vec = [0] * _LEN
    vec[0] = 0 if error is not None else 1
    if error is None:
        for i, name in enumerate(FIELDS):
            if name == "documents":
                v = -1 if cu is None else len(cu) - 1
            elif name == "cu_seqlens values":
                v = _cu_hash(cu)
            else:
                v = fields.get(name, "" if name in _STRINGS else -1)
                v = _crc(str(v)) if name in _STRINGS else int(v)
            vec[1 + i] = v
    else:
        msg = f"{type(error).__name__}: {error}".encode()[: 8 * _MSG_WORDS]
        vec[1 + len(FIELDS)] = len(msg)
        raw = torch.frombuffer(bytearray(msg.ljust(8 * _MSG_WORDS, b"\0")), dtype=torch.int64)
        vec[2 + len(FIELDS) :] = raw.tolist()
    return torch.tensor(vec, dtype=torch.int64)


def _message(row: list[int]) -> str:
    n = row[1 + len(FIELDS)]
    words = torch.tensor(row[2 + len(FIELDS) :], dtype=torch.int64)
    return bytes(words.view(torch.uint8).tolist()[:n]).decode(errors="replace")


def _name(field: str, v: int) -> str:
    if field in _STRINGS:
        return repr(_NAMES.get(v, f"#{v:08x}"))
    if field == "cu_seqlens values":
        return f"hash {v & (2**64 - 1):016x}"
    return "-" if v == -1 else str(v)


def _real(group) -> bool:
    return not (group is None or isinstance(group, comm.LocalGroup) or comm.group_size(group) == 1)


def agree(group, fields: dict, cu: tuple[int, ...] | None = None, error: BaseException | None = None) -> None:
    """One all-gather of every rank's fingerprint (``fields`` by :data:`FIELDS` name, the host
    ``cu_seqlens`` values) and verdict (``error``, this rank's rejection of its input, or None).
    Raises ValueError on every rank when some rank rejected its input or the fingerprints differ."""
    if not _real(group):
        if error is not None:
            raise error
        return
    cp, rank = comm.group_size(group), comm.group_rank(group)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    mine = _encode(fields, cu, error).to(device)
    out = mine.new_empty(cp * _LEN)
    comm.COUNTS["agree"] += 1
    comm._all_gather_single(out, mine, group=group)
    rows = out.view(cp, _LEN).tolist()  # the one host read of the check
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
            f"rank {r0} says: {_message(rows[r0])}"
        )
    diffs = []
    for i, name in enumerate(FIELDS):
        vals = [row[1 + i] for row in rows]
        if len(set(vals)) > 1:
            by_value: dict[int, list[int]] = {}
            for r, v in enumerate(vals):
                by_value.setdefault(v, []).append(r)
            diffs.append(
                f"{name}: " + ", ".join(f"rank(s) {rs}: {_name(name, v)}" for v, rs in by_value.items())
            )
    if diffs:
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
    fields: dict | None = None,
    error: BaseException | None = None,
) -> TokenPlan | None:
    """The (cached) token plan of this batch, agreed over ``group``: validate locally, then agree once.

    ``fields``: what else must match across ranks (strategy, width, dtype, ...); the plan's own
    parameters (layout, batch, local tokens, ``cu_seqlens``) are always compared. ``error``: a local
    rejection found by the caller, shared with the group instead of raised alone. Agreements are cached
    in the plan per ``(group, fields)``; a call without ``fields`` is covered by any earlier one."""
    cp = comm.group_size(group)
    plan = None
    if error is None:
        try:
            plan = get_plan(cp, layout, batch, length, device, cu_seqlens)
        except ValueError as e:
            error = e
    fields = dict(fields or {})
    key = (id(group), tuple(sorted(fields.items())))
    base = (id(group), ())
    if plan is not None and key in plan.extras.setdefault("agreed", set()):
        return plan
    fields.update({"layout": layout, "batch": batch, "local tokens": length // max(cp, 1)})
    agree(group, fields, None if plan is None else plan.host_cu, error)
    plan.extras["agreed"].update((key, base))
    return plan
