"""Mamba2 mixer with context parallelism.

Same parameters and math as mamba-ssm's ``Mamba2`` (so its checkpoints map 1:1): ``in_proj`` (no
bias) -> ``[z | x | B | C | dt]``; depthwise causal ``conv1d`` (with bias) over ``xBC`` + SiLU;
the SSD chunked scan with ``softplus(dt + dt_bias)``, ``A = -exp(A_log)`` and ``D``; gated RMSNorm
``norm`` over groups of ``d_inner/n_groups`` of ``y * silu(z)``; ``out_proj`` (no bias).

Context parallelism (``cp_group`` of size > 1), by ``strategy``:

``"hidden"``
    :class:`~cp_core.mamba_cp.MambaContextParallel` moves ``[x | B | C | dt]`` to head-sharded
    global order before conv1d + SSD and ``y`` back after; ``z`` stays local, and the gated norm
    runs after the return trip on whole groups (so ``n_groups < cp_size`` is exact).
``"state_passing"``
    the sequence stays sharded; conv1d takes a halo and the SSD's carried states are exchanged
    (:mod:`cp_core.state_passing`), by one all-gather (``state_exchange="allgather"``, one step) or
    along the chain of segment owners (``"chain"``, the fewest bytes, ``nseg-1`` sequential hops).
    Any ``cp_size``.

Packed documents: ``cu_seqlens`` is the GLOBAL padded cumulative lengths; neither the conv nor
the SSD state crosses a document boundary.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import agree, comm, compiled, hierarchical, kernels
from .channels import ChannelPlan, check_chunks, chunk_groups, local_groups, mamba_channel_plan
from .kernels import conv_cuda, ssd_mamba
from .kernels.conv_ssd import ConvSSDSpec, conv_ssd, fused_available
from .kernels.norm import gated_norm_out_proj, gated_rmsnorm_torch
from .kernels.norm import resolve as resolve_norm
from .layout import PER_DOCUMENT, check_layout, check_seq_len
from .mamba_cp import MambaContextParallel
from .options import CPOptions, default_options
from .pipeline import CoreSpec, layer_core, slot_in_proj, slot_rows, split_in_proj
from .plan import build_outside_inference, get_plan
from .regions import NORM_PROJ, SSM, region
from .state_passing import state_passing_layer

#: From this many elements of ``zxbcdt`` on, cp 1 computes ``z`` and ``[x|B|C|dt]`` as two tensors: the
#: Triton kernels index a strided view with int32 offsets (at d_model 4096 that is past ~115K tokens).
SPLIT_IN_PROJ_ELEMENTS = 2**31

#: ``"state_passing_chain"`` is ``strategy="state_passing", state_exchange="chain"`` in one name.
STRATEGIES = ("hidden", "state_passing", "state_passing_chain", "hierarchical")


class Weights(NamedTuple):
    """The layer's parameters as one forward uses them: the module's own, or (under autocast) copies in the
    compute dtype made once per forward, so gradients flow back to the module's parameters in theirs."""

    in_proj: torch.Tensor
    conv: torch.Tensor  # [conv_dim, 1, d_conv]
    conv_bias: torch.Tensor | None
    dt_bias: torch.Tensor
    A_log: torch.Tensor
    D: torch.Tensor
    norm: torch.Tensor
    out_proj: torch.Tensor


def autocast_dtype(x) -> torch.dtype | None:
    """The dtype autocast computes in on ``x``'s device, or None when autocast is off there."""
    if not isinstance(x, torch.Tensor):
        return None
    kind = x.device.type
    try:
        on = torch.is_autocast_enabled(kind)
    except (TypeError, RuntimeError):  # a device type autocast does not know
        return None
    return torch.get_autocast_dtype(kind) if on else None


@dataclass(frozen=True)
class Mamba2Config:
    d_model: int
    n_heads: int
    head_dim: int
    n_groups: int
    d_state: int
    d_conv: int = 4
    chunk_size: int = 256
    D_has_hdim: bool = False
    norm_eps: float = 1e-5
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_range: tuple[float, float] = (1.0, 16.0)

    def __post_init__(self):
        for name in ("d_model", "n_heads", "head_dim", "n_groups", "d_state", "d_conv", "chunk_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Mamba2Config.{name} must be a positive int, got {v!r}")
        if self.n_heads % self.n_groups:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_groups {self.n_groups}")
        if not isinstance(self.D_has_hdim, bool):
            raise ValueError(f"Mamba2Config.D_has_hdim must be a bool, got {self.D_has_hdim!r}")
        for name in ("norm_eps", "dt_min", "dt_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ValueError(f"Mamba2Config.{name} must be a positive finite number, got {v!r}")
        if self.dt_min > self.dt_max:
            raise ValueError(f"Mamba2Config.dt_min {self.dt_min} is above dt_max {self.dt_max}")
        lo_hi = self.A_init_range
        if (
            not isinstance(lo_hi, (tuple, list))
            or len(lo_hi) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in lo_hi)
            or not 0 < lo_hi[0] <= lo_hi[1] < math.inf
        ):
            raise ValueError(f"Mamba2Config.A_init_range must be (lo, hi) with 0 < lo <= hi, got {lo_hi!r}")

    @property
    def d_inner(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_groups * self.d_state

    @property
    def d_in_proj(self) -> int:
        return 2 * self.d_inner + 2 * self.n_groups * self.d_state + self.n_heads


class GatedRMSNorm(nn.Module):
    """``rmsnorm(y * silu(z))`` over groups of ``group_size`` channels, times ``weight`` (mamba-ssm's
    ``RMSNormGated`` with ``norm_before_gate=False``); fp32 statistics. The module holds the parameter;
    the layer calls the fused kernels of :mod:`cp_core.kernels.norm`, and this forward is the reference."""

    def __init__(self, d: int, group_size: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rmsnorm_torch(y, z, self.weight, self.eps, self.group_size)


class Mamba2Mixer(nn.Module):
    #: under ``torch.compile``, run the layer (cp 1, hidden CP) as one custom op (:mod:`cp_core.compiled`);
    #: False: the compiler meets the autograd functions themselves (graph breaks around them)
    COMPILE_AS_OP = True

    def __init__(
        self,
        config: Mamba2Config,
        cp_group=None,
        layout: str = "head_tail",
        ssd_backend: str | None = None,
        conv_backend: str | None = None,
        device=None,
        dtype=None,
        *,
        strategy: str = "hidden",
        fused: bool = True,
        state_exchange: str | None = None,
        overlap_chunks: int | None = None,
        options: CPOptions | None = None,
    ):
        """``options``: the tuning choices (:class:`~cp_core.options.CPOptions`; default
        :func:`~cp_core.options.default_options`). ``ssd_backend``, ``conv_backend``, ``state_exchange`` and
        ``overlap_chunks``, when given (not None), replace those fields of ``options``."""
        super().__init__()
        check_layout(layout)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if options is None:
            options = default_options()
        elif not isinstance(options, CPOptions):
            raise ValueError(f"options must be a cp_core.options.CPOptions, got {type(options).__name__}")
        given = dict(
            ssd_backend=ssd_backend,
            conv_backend=conv_backend,
            state_exchange=state_exchange,
            overlap_chunks=overlap_chunks,
        )
        if strategy == "state_passing_chain":
            strategy, given["state_exchange"] = "state_passing", "chain"
        options = options.replace(**{k: v for k, v in given.items() if v is not None})
        self.options = options
        if layout not in PER_DOCUMENT and (strategy != "hidden" or not fused):
            raise ValueError(
                f"layout {layout!r} (torch's context_parallel order) runs with strategy='hidden', fused=True; "
                f"state passing and the seed path need a layout in {PER_DOCUMENT}"
            )
        c = self.config = config
        if strategy == "hierarchical":  # a 2-D mesh ("node", "gpu") or (node_group, gpu_group)
            cp_group = hierarchical.resolve_grid(cp_group)
            hierarchical.check_grid(config, cp_group, options.overlap_chunks)
        cp_group = comm.resolve_group(cp_group)  # a 1-D DeviceMesh (mesh["cp"]) -> its ProcessGroup
        self.cp_group, self.layout, self.strategy, self.fused = cp_group, layout, strategy, fused
        self.cp_size = comm.group_size(cp_group)
        fk = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(c.d_model, c.d_in_proj, bias=False, **fk)
        self.conv1d = nn.Conv1d(
            c.conv_dim, c.conv_dim, c.d_conv, groups=c.conv_dim, padding=c.d_conv - 1, **fk
        )
        self.dt_bias = nn.Parameter(torch.empty(c.n_heads, **fk))
        self.A_log = nn.Parameter(torch.empty(c.n_heads, **fk))
        self.D = nn.Parameter(torch.empty(c.d_inner if c.D_has_hdim else c.n_heads, **fk))
        self.norm = GatedRMSNorm(c.d_inner, c.d_inner // c.n_groups, c.norm_eps, **fk)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=False, **fk)
        self.cp = None
        if self.cp_size > 1 and strategy == "hidden":
            self.cp = MambaContextParallel(
                cp_group, c.n_heads, c.head_dim, c.n_groups, c.d_state, self, layout=layout, fused=fused,
                options=options,
            )  # fmt: skip
            self.cp._agreed_by_caller = True  # this layer agrees on every call before it calls the seed API
        if options.overlap_chunks is not None and self.cp_size > 1 and strategy == "hidden":
            check_chunks(c.n_heads, c.n_groups, self.cp_size, options.overlap_chunks)
        #: what the ranks compare on every call besides the input (:mod:`cp_core.agree`): the configuration and
        #: the options field by field, and the layer's structural choices
        self._static = agree.static_fields(
            "mixer",
            {"strategy": strategy, "fused": fused}  # the layout: the plan's, every call
            | ({"grid": hierarchical.label(self)} if strategy == "hierarchical" else {}),
            config=config,
            options=options,
        )
        self.backends: dict[str, str] = {}
        self._specs: dict = {}
        self._uid = compiled.register(self)  # how the compiled op finds this layer
        self.reset_parameters()

    @property
    def ssd_backend(self) -> str:
        return self.options.ssd_backend

    @property
    def conv_backend(self) -> str:
        return self.options.conv_backend

    @property
    def state_exchange(self) -> str:
        return self.options.state_exchange

    @property
    def overlap_chunks(self) -> int | None:
        return self.options.overlap_chunks

    def __setstate__(self, state):  # a copy (deepcopy, pickle) is a layer of its own for the compiled op
        super().__setstate__(state)
        self._specs = {}
        self._uid = compiled.register(self)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """mamba-ssm's initialisation, drawn from ``generator`` (CPU) so every rank can build the same weights."""
        c = self.config

        def rand(*shape, like):
            return torch.rand(*shape, generator=generator).to(like)

        for lin in (self.in_proj, self.out_proj):
            bound = 1 / math.sqrt(lin.in_features)
            lin.weight.copy_(rand(*lin.weight.shape, like=lin.weight) * 2 * bound - bound)
        bound = 1 / math.sqrt(c.d_conv)
        self.conv1d.weight.copy_(rand(*self.conv1d.weight.shape, like=self.conv1d.weight) * 2 * bound - bound)
        self.conv1d.bias.copy_(rand(c.conv_dim, like=self.conv1d.bias) * 2 * bound - bound)
        u = torch.rand(c.n_heads, generator=generator, dtype=torch.float64)
        dt = torch.exp(u * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min)).clamp(
            min=c.dt_init_floor
        )
        self.dt_bias.copy_((dt + torch.log(-torch.expm1(-dt))).to(self.dt_bias))
        lo, hi = c.A_init_range
        a = torch.rand(c.n_heads, generator=generator, dtype=torch.float64) * (hi - lo) + lo
        self.A_log.copy_(torch.log(a).to(self.A_log))
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)

    # ------------------------------------------------------------------ helpers

    def _backends(self, x: torch.Tensor, conv_w: torch.Tensor) -> tuple[str, str]:
        ssd_name, conv_name = kernels.resolve_backends(x.device, self.ssd_backend, self.conv_backend)
        if ssd_name == "mamba_ssm" and self.ssd_backend == "auto" and not ssd_mamba.supports(x)[0]:
            ssd_name = "torch"
        if (
            conv_name == "causal_conv1d"
            and self.conv_backend == "auto"
            and not conv_cuda.supports(x, conv_w)[0]
        ):
            conv_name = "torch"
        self.backends = {"ssd": ssd_name, "conv": conv_name}
        return ssd_name, conv_name

    def _conv_spec(self, x: torch.Tensor, nh: int, ng: int, conv_w: torch.Tensor) -> ConvSSDSpec:
        """conv1d + SSD of ``nh`` heads and ``ng`` groups: mamba-ssm's and causal-conv1d's kernels called
        directly when both backends are the fast ones, else autograd through the chosen backends."""
        c = self.config
        ssd_name, conv_name = self._backends(x, conv_w)
        fused = ssd_name == "mamba_ssm" and conv_name == "causal_conv1d" and fused_available()[0]
        spec = ConvSSDSpec(
            nh, c.head_dim, ng, c.d_state, c.chunk_size, "fused" if fused else "autograd", ssd_name, conv_name
        )
        self.backends["conv_ssd"] = spec.backend
        return spec

    def weights(self, dtype: torch.dtype | None = None) -> Weights:
        """The parameters for one forward; with ``dtype``, floating ones in that dtype (differentiable casts:
        the layer then computes exactly as one whose parameters are ``dtype``)."""
        w = Weights(
            self.in_proj.weight,
            self.conv1d.weight,
            self.conv1d.bias,
            self.dt_bias,
            self.A_log,
            self.D,
            self.norm.weight,
            self.out_proj.weight,
        )
        if dtype is None:
            return w
        return Weights(*(None if t is None else t.to(dtype) if t.is_floating_point() else t for t in w))

    def _local_params(self, w: Weights | None = None):
        """This rank's ``conv_w [c, k]``, ``conv_b``, ``dt_bias``, ``A`` (fp32), ``D`` (differentiable slices)."""
        cw, b, dtb, alog, D = self._local_slices(w)
        return cw, b, dtb, -torch.exp(alog.float()), D

    def _local_slices(self, w: Weights | None = None):
        """This rank's ``conv_w [c, k]``, ``conv_b``, ``dt_bias``, ``A_log``, ``D`` (differentiable slices)."""
        c = self.config
        w = self.weights() if w is None else w
        if self.cp is None:
            cw, b, dtb, alog, D = w.conv.squeeze(1), w.conv_bias, w.dt_bias, w.A_log, w.D
        else:
            cp = self.cp
            cw, b, dtb, alog, D = (
                cp.get_conv1d_weight(w.conv),
                None if w.conv_bias is None else cp.get_conv1d_bias(w.conv_bias),
                cp.get_dt_bias(w.dt_bias),
                cp.get_A_log(w.A_log),
                cp.get_D(w.D),
            )
        if c.D_has_hdim:
            D = D.view(-1, c.head_dim)
        return cw, b, dtb, alog, D

    def _chunks(self, x: torch.Tensor) -> int:
        """Head chunks of the core (1 at cp 1); by default 2 on CUDA where the groups allow (measured: never
        slower, less memory)."""
        c, cp = self.config, self.cp_size
        k = self.overlap_chunks if cp > 1 else 1
        if k is None:
            k = 2 if x.is_cuda and (c.n_groups // cp) % 2 == 0 and c.n_groups >= cp else 1
        return k

    def _core_mode(self, x: torch.Tensor) -> str | None:
        """How the core path takes ``in_proj``'s output: ``"whole"`` (one ``zxbcdt``), ``"split"`` (``z`` and
        ``[x|B|C|dt]`` as two tensors), ``"slot"`` (``in_proj`` writes the all-to-all's send slots); None
        where the layer is not the core (the seed path, state passing at cp > 1)."""
        c, cp = self.config, self.cp_size
        if not (cp == 1 or (self.strategy == "hidden" and self.fused)):
            return None
        if cp > 1:
            return "slot"
        # past 2^31 elements of zxbcdt the Triton kernels' int32 offsets of a strided view overflow
        return "split" if x.numel() // c.d_model * c.d_in_proj >= SPLIT_IN_PROJ_ELEMENTS else "whole"

    def _core_setup(self, x: torch.Tensor, cu_seqlens, conv_w=None):
        """``(plan, batch, length, spec, mode)`` of this call; ``spec`` and ``mode`` None off the core path."""
        packed = cu_seqlens is not None
        length = x.shape[-2] * self.cp_size
        batch = 1 if packed else x.shape[0]
        if packed:
            plan = get_plan(self.cp_size, self.layout, 1, length, x.device, cu_seqlens)
        else:
            check_seq_len(length, self.cp_size, self.layout)
            plan = None
            if self.cp_size > 1 and self.strategy == "hidden":
                plan = get_plan(self.cp_size, self.layout, batch, length, x.device)
        mode = self._core_mode(x)
        spec = None if mode is None else self._core_spec(x, plan, batch, length, conv_w)
        return plan, batch, length, spec, mode

    def _saved_meta(self, x: torch.Tensor) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Shapes and dtypes of what the core path keeps for backward besides its inputs, in the order
        :mod:`cp_core.compiled` returns them (``zx``, ``keep_x``, ``y``, the norm statistics, every head
        chunk's conv input), computed from shapes alone (no plan, no tensor): the compiled op's fake."""
        c, cp = self.config, self.cp_size
        mode, k, dt = self._core_mode(x), self._chunks(x), x.dtype
        lead, n = tuple(x.shape[:-1]), x.numel() // c.d_model
        norm_group = c.d_inner // c.n_groups
        w_slot = c.d_inner // (cp * k)
        y_cols = cp > 1 and mode == "slot" and w_slot % norm_group == 0
        meta = [
            (lead + (c.d_in_proj if mode == "whole" else c.d_inner,), dt),
            (lead + (c.d_in_proj - c.d_inner,) if cp == 1 and mode == "split" else (0,), dt),
            ((k * cp, n, w_slot) if y_cols else (n, c.d_inner), dt),
        ]
        if resolve_norm("auto", x) == "triton":
            meta += [((w_slot // norm_group * n,), torch.float32)] * (k * cp) if y_cols else []
            meta += [] if y_cols else [((c.d_inner // norm_group * n,), torch.float32)]
        if cp > 1:
            nh, ng = c.n_heads // cp // k, chunk_groups(local_groups(c.n_groups, cp), k, 0)[1]
            meta += [((n * cp, nh * c.head_dim + 2 * ng * c.d_state + nh), dt)] * k
        return meta

    def _core_spec(self, x: torch.Tensor, plan, batch: int, length: int, conv_w=None) -> CoreSpec:
        """The layer core's static description for ``x``'s dtype (the compute dtype) and device; ``conv_w``:
        the conv weight the forward uses (``[conv_dim, 1, k]``, in the compute dtype), for the backend choice."""
        conv_w = self.conv1d.weight if conv_w is None else conv_w
        k = self._chunks(x)
        key = (
            id(plan),
            k,
            batch,
            length,
            x.device,
            x.dtype,
            self.ssd_backend,
            self.conv_backend,
        )
        hit = self._specs.get(key)
        if hit is not None and hit[0] is plan:
            self.backends = dict(hit[2])
            return hit[1]
        with build_outside_inference():  # cached: its tensors must serve a later training step too
            spec = self._build_core_spec(x, plan, batch, length, conv_w, k)
        if len(self._specs) >= 8:
            self._specs.pop(next(iter(self._specs)))
        self._specs[key] = (plan, spec, dict(self.backends))
        return spec

    def _build_core_spec(self, x: torch.Tensor, plan, batch: int, length: int, conv_w, k: int) -> CoreSpec:
        c, cp = self.config, self.cp_size
        h_loc, g_loc = c.n_heads // cp, local_groups(c.n_groups, cp)
        conv = self._conv_spec(x, h_loc // k, chunk_groups(g_loc, k, 0)[1], conv_w.squeeze(1))
        if x.is_cuda:  # the same shapes on every rank: all raise before the first collective
            n_loc = batch * length // cp
            kernels.check_int32_extent(
                f"a rank's layer tensors (cp {cp}, {batch} x {length} tokens, {k} head chunk(s))",
                max(batch * length * conv.width, n_loc * max(c.d_inner, c.d_in_proj - c.d_inner)),
                "use a larger cp_size (or, under hidden CP, more overlap_chunks) or shorter sequences",
            )
        norm_backend = resolve_norm("auto", x)
        self.backends["norm"] = norm_backend
        rows: tuple = (None,)
        if k > 1:  # a chunk's rows of the local conv weight [x | B | C]: its heads' x, its groups' B and C
            dl, gl, ds = c.d_inner // cp, g_loc * c.d_state, c.d_state
            dc = dl // k
            ar = functools.partial(torch.arange, device=x.device, dtype=torch.long)
            rows = []
            for j in range(k):
                g0, gn = chunk_groups(g_loc, k, j)
                bc = ar(g0 * ds, (g0 + gn) * ds)
                rows.append(torch.cat([ar(j * dc, (j + 1) * dc), dl + bc, dl + gl + bc]))
            rows = tuple(rows)
        chans = (
            tuple(
                mamba_channel_plan(
                    cp, c.n_heads, c.head_dim, c.n_groups, c.d_state, with_z=False, chunk=(j, k)
                )
                for j in range(k)
            )
            if cp > 1
            else ()
        )
        slots = cp > 1  # in_proj writes the all-to-all's send slots
        srows, unique = slot_rows(chans, c.d_inner) if slots else (None, True)
        # the returned y slots go to the norm as they are where every norm group lies in one slot
        w_slot, norm_group = c.d_inner // (cp * k), c.d_inner // c.n_groups
        y_cols = (
            tuple(r * (c.d_inner // cp) + j * w_slot for j in range(k) for r in range(cp))
            if slots and w_slot % norm_group == 0
            else ()
        )
        return CoreSpec(
            dtype=x.dtype,
            d_inner=c.d_inner,
            norm_group=norm_group,
            eps=c.norm_eps,
            norm_backend=norm_backend,
            conv=conv,
            cp_size=cp,
            group=self.cp_group,
            tok=plan if cp > 1 else None,
            batch=batch,
            length=length,
            seq_idx=None if plan is None else plan.seq_idx,
            chans=chans,
            chans_post=tuple(ChannelPlan.single(cp, c.d_inner // cp, (j, k)) for j in range(k))
            if cp > 1
            else (),
            rows=rows,
            overlap=k > 1 and x.is_cuda,
            slot_rows=None if srows is None else srows.to(x.device),
            slot_unique=unique,
            y_cols=y_cols,
        )

    def _norm_out(self, y: torch.Tensor, z: torch.Tensor, w: Weights) -> torch.Tensor:
        c = self.config
        with region(NORM_PROJ):
            backend = resolve_norm("auto", y)
            self.backends["norm"] = backend
            return gated_norm_out_proj(y, z, w.norm, w.out_proj, c.norm_eps, c.d_inner // c.n_groups, backend)

    # ------------------------------------------------------------------ input validation

    def _check_input(self, hidden_states, cu_seqlens) -> None:
        """Validate this rank's input (ValueError naming the value) and, at cp_size > 1, agree on it with
        the group (:func:`cp_core.agree.checked_plan`; every call, or once per batch with
        ``CPOptions.agree="batch"``): a rank that rejects its input, or inputs, configurations or options that
        differ across ranks, raise ValueError on every rank before any collective."""
        c, x = self.config, hidden_states
        packed = cu_seqlens is not None
        error, batch, length = None, 0, 0
        try:
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"hidden_states must be a floating-point tensor, got {got}")
            if x.dim() != (2 if packed else 3) or x.shape[-1] != c.d_model:
                raise ValueError(
                    f"hidden_states must be {'[T/cp, d_model]' if packed else '[B, L/cp, d_model]'} with d_model "
                    f"{c.d_model}, got shape {tuple(x.shape)}"
                )
            if packed and not isinstance(cu_seqlens, torch.Tensor):
                raise ValueError(
                    f"cu_seqlens must be a torch.Tensor or None, got {type(cu_seqlens).__name__}"
                )
            batch = 1 if packed else x.shape[0]
            if batch == 0:
                raise ValueError(f"hidden_states has batch size 0 (shape {tuple(x.shape)}): nothing to run")
            if x.shape[-2] == 0:
                raise ValueError(
                    f"hidden_states holds 0 tokens per rank (shape {tuple(x.shape)}): nothing to run"
                )
            w = self.in_proj.weight
            if x.device != w.device:
                raise ValueError(
                    f"hidden_states is on {x.device} but the layer's parameters are on {w.device}"
                )
            try:
                autocast = torch.is_autocast_enabled(x.device.type)
            except TypeError:  # older torch: no device argument
                autocast = torch.is_autocast_enabled()
            if x.dtype != w.dtype and not autocast:
                raise ValueError(
                    f"hidden_states has dtype {x.dtype} but the layer's parameters are {w.dtype} (and autocast "
                    f"is off): cast one of them"
                )
            length = x.shape[-2] * self.cp_size
        except ValueError as e:
            error = e
        if self.cp_size == 1:
            if error is not None:
                raise error
            return
        call = {
            "dtype": autocast_dtype(x) or getattr(x, "dtype", ""),  # the compute dtype
            "device type": x.device.type if isinstance(x, torch.Tensor) else "",
        }
        device = x.device if isinstance(x, torch.Tensor) else "cpu"
        if self.strategy == "hierarchical":  # two agreements: over the node's GPUs, then across the nodes

            def agree_on(group, err):
                agree.checked_plan(
                    group, self.layout, batch, length, device, cu_seqlens,
                    static=self._static, call=call, error=err, mode=self.options.agree,
                )  # fmt: skip

            hierarchical.agree_grid(
                self.cp_group, self.layout, batch, length, device, cu_seqlens, agree_on, error
            )
            return
        agree.checked_plan(
            self.cp_group, self.layout, batch, length, device, cu_seqlens,
            static=self._static, call=call, error=error, mode=self.options.agree,
        )  # fmt: skip

    # ------------------------------------------------------------------ forward

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's shard ``[B, L/cp, d_model]`` (or packed ``[T/cp, d_model]`` with the global padded
        ``cu_seqlens``) -> the output shard of the same shape (a tensor of its own, not a view: in-place
        residual adds work).

        cp 1 and the hidden strategy (``fused=True``) run :func:`cp_core.pipeline.layer_core`: one autograd
        function from ``in_proj``'s output to ``out_proj``'s, its backward hand-written (nothing is kept but
        ``zxbcdt``, the head-sharded conv input and ``y``), the all-to-alls optionally pipelined over
        ``overlap_chunks`` head chunks; state passing runs :func:`cp_core.state_passing.state_passing_layer`, the
        same kind of function (hand-written backward). The seed path (``fused=False``) composes the same
        kernels through autograd.

        Under ``torch.autocast`` the layer computes in the autocast dtype exactly as a layer whose parameters
        are in that dtype: the input and the parameters are cast once (differentiably: the gradients reach
        the parameters in their own dtype) and the layer runs with autocast off, so every kernel, buffer
        and collective of the layer sees one dtype."""
        if (
            self.COMPILE_AS_OP
            and torch.compiler.is_compiling()
            and self._core_mode(hidden_states) is not None
        ):
            return compiled.compiled_forward(self, hidden_states, cu_seqlens)  # one op, no graph break
        self._check_input(hidden_states, cu_seqlens)
        dtype = autocast_dtype(hidden_states)
        if dtype is None:
            return self._forward(hidden_states, cu_seqlens, self.weights())
        with torch.autocast(hidden_states.device.type, enabled=False):
            return self._forward(hidden_states.to(dtype), cu_seqlens, self.weights(dtype))

    def _forward(self, hidden_states: torch.Tensor, cu_seqlens, w: Weights) -> torch.Tensor:
        c = self.config
        packed = cu_seqlens is not None
        if hidden_states.dim() != (2 if packed else 3) or hidden_states.shape[-1] != c.d_model:
            raise ValueError(
                f"hidden_states must be {'[T/cp, d_model]' if packed else '[B, L/cp, d_model]'} with d_model "
                f"{c.d_model}, got shape {tuple(hidden_states.shape)}"
            )
        if self.strategy == "hierarchical":
            return hierarchical.hierarchical_layer(self, hidden_states, cu_seqlens, params=w)
        plan, batch, length, spec, mode = self._core_setup(hidden_states, cu_seqlens, w.conv)
        if (
            mode is None and self.strategy == "state_passing"
        ):  # the layer after in_proj: cp_core.state_passing
            return state_passing_layer(self, hidden_states, cu_seqlens, params=w)
        if mode in ("split", "slot"):
            # z and [x|B|C|dt] as two tensors: at cp > 1 [x|B|C|dt] is dead once it has been sent (under
            # "slot" in_proj writes the all-to-all's send buffers); at cp 1 past 2^31 elements of zxbcdt
            with region(NORM_PROJ):
                if mode == "slot":
                    z, xbcdt = slot_in_proj(hidden_states, w.in_proj, spec)
                else:
                    z, xbcdt = split_in_proj(hidden_states, w.in_proj, c.d_inner)
            return layer_core(spec, z, *self._local_params(w), w.norm, w.out_proj, xbcdt=xbcdt)
        with region(NORM_PROJ):
            zxbcdt = F.linear(hidden_states, w.in_proj)
        if mode == "whole":
            return layer_core(spec, zxbcdt, *self._local_params(w), w.norm, w.out_proj)
        z, xbcdt = zxbcdt.split([c.d_inner, c.d_in_proj - c.d_inner], dim=-1)
        if self.strategy == "hidden":  # the seed path: the seed's layout operations around the same kernels
            cp = self.cp
            xh = cp.pre_conv_ssm(xbcdt, cu_seqlens, with_z=False)
            h_loc, g_loc = c.n_heads // self.cp_size, local_groups(c.n_groups, self.cp_size)
            cw, b, dtb, A, D = self._local_params(w)
            spec = self._conv_spec(xh, h_loc, g_loc, cw)
            with region(SSM):  # conv1d + SSD, as the fused path's region counts them
                y = conv_ssd(
                    spec,
                    xh.view(batch, length, xh.shape[-1]),
                    cw,
                    b,
                    dtb,
                    A,
                    D,
                    None if plan is None else plan.seq_idx,
                )
            y = cp.post_conv_ssm(y.view(*xh.shape[:-1], y.shape[-1]), cu_seqlens)
        return self._norm_out(y, z, w)
