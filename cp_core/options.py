"""Every tuning choice of a CP layer, in one frozen object.

:class:`CPOptions` is passed to :class:`~cp_core.mixer.Mamba2Mixer` and
:class:`~cp_core.mamba_cp.MambaContextParallel` (``options=``); it is validated once, when it is made
(``ValueError`` naming the field), and every one of its fields is part of the cross-rank agreement's
fingerprint by construction (:mod:`cp_core.agree` iterates :func:`dataclasses.fields`), so an option added
here is compared across the ranks without anyone listing it.

:func:`default_options` is the one place that reads environment variables: ``CP_CORE_SSD_BACKEND`` and
``CP_CORE_CONV_BACKEND`` set the default backends (``"auto"`` when unset). Nothing else in ``cp_core`` reads
the environment.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .kernels import CONV_BACKEND_ENV, CONV_BACKENDS, SSD_BACKEND_ENV, SSD_BACKENDS

__all__ = ["CPOptions", "default_options", "AGREE_MODES", "STATE_EXCHANGES"]

#: ``"call"``: the ranks agree on every call (one 16-byte all-gather; a rank that rejects its input on any
#: call raises on every rank). ``"batch"``: once per token plan (a new ``cu_seqlens`` or a new BSHD shape):
#: no collective on the later calls of a batch, but a rank that rejects its input alone on such a later call
#: raises alone and the others wait in the layer's first collective until the group's timeout. ``"auto"``
#: (the default): ``"call"`` where the group gathers on the host (gloo, or a group made with a CPU backend
#: beside NCCL: ``backend="cpu:gloo,cuda:nccl"``), so the check never waits for the GPU; ``"batch"`` on a
#: group that is NCCL only, where a per-call check would read a CUDA tensor on the host: a device sync in
#: every layer (:func:`cp_core.agree.resolve_mode`).
AGREE_MODES = ("auto", "call", "batch")
STATE_EXCHANGES = ("allgather", "chain")


@dataclass(frozen=True)
class CPOptions:
    """Tuning choices of a CP layer (defaults chosen by measurement; docs/design.md)."""

    #: SSD kernel: ``"auto"`` (mamba-ssm's Triton kernel on CUDA where it imports, else torch) or a name of
    #: :data:`cp_core.kernels.SSD_BACKENDS`
    ssd_backend: str = "auto"
    #: conv1d kernel: ``"auto"`` (causal-conv1d on CUDA where it imports, else torch) or a name of
    #: :data:`cp_core.kernels.CONV_BACKENDS`
    conv_backend: str = "auto"
    #: hidden CP: head chunks pipelined against the all-to-alls; None: 2 on CUDA where the groups allow, else 1
    overlap_chunks: int | None = None
    #: state passing: how the carried states move (``"allgather"``: one step; ``"chain"``: the fewest bytes)
    state_exchange: str = "allgather"
    #: when the ranks agree on their input (:data:`AGREE_MODES`)
    agree: str = "auto"

    def __post_init__(self):
        for name, valid in (("ssd_backend", SSD_BACKENDS), ("conv_backend", CONV_BACKENDS)):
            v = getattr(self, name)
            if v != "auto" and v not in valid:
                raise ValueError(f"CPOptions.{name} must be 'auto' or one of {valid}, got {v!r}")
        k = self.overlap_chunks
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise ValueError(f"CPOptions.overlap_chunks must be None or a positive int, got {k!r}")
        if self.state_exchange not in STATE_EXCHANGES:
            raise ValueError(
                f"CPOptions.state_exchange must be one of {STATE_EXCHANGES}, got {self.state_exchange!r}"
            )
        if self.agree not in AGREE_MODES:
            raise ValueError(f"CPOptions.agree must be one of {AGREE_MODES}, got {self.agree!r}")

    def replace(self, **changes) -> CPOptions:
        """A copy with ``changes`` (validated again); unknown names raise ValueError."""
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(changes) - names)
        if bad:
            raise ValueError(f"CPOptions has no field(s) {bad}; fields: {sorted(names)}")
        return dataclasses.replace(self, **changes)


def default_options(**changes) -> CPOptions:
    """The default :class:`CPOptions`, with ``CP_CORE_SSD_BACKEND`` / ``CP_CORE_CONV_BACKEND`` (when set and
    not empty) as the backends, then ``changes``. A bad environment value raises ValueError naming the
    variable."""
    env, source = {}, {}
    for field, var in (("ssd_backend", SSD_BACKEND_ENV), ("conv_backend", CONV_BACKEND_ENV)):
        v = os.environ.get(var, "").strip()
        if v:
            env[field], source[field] = v, f"{var}={v!r}"
    try:
        base = CPOptions(**env)
    except ValueError as e:
        raise ValueError(f"{e} (from the environment: {', '.join(source.values())})") from None
    return base.replace(**changes) if changes else base
