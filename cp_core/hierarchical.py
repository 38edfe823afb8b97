"""Hierarchical CP across nodes: the hidden strategy inside a node, state passing across the nodes.

The CP group is a grid of ``N`` nodes x ``G`` GPUs (:class:`Grid`: a 2-D ``DeviceMesh`` with a ``node`` and
a ``gpu`` dimension, or a pair ``(node_group, gpu_group)``), its CP rank node-major: GPU ``g`` of node ``n``
is CP rank ``n*G + g`` and takes :func:`~cp_core.layout.shard` ``(x, n*G + g, N*G, layout)``.

Why it composes: under ``head_tail`` over ``N*G`` ranks a document is cut into ``2NG`` chunks and rank
``nG+g`` holds chunks ``nG+g`` and ``2NG-1-nG-g``; node ``n``'s ranks together hold chunks ``[nG, nG+G)``
and ``[2NG-nG-G, 2NG-nG)``, i.e. segments ``n`` and ``2N-1-n`` of a ``2N`` split: the node's stream is
the ``head_tail`` shard of rank ``n`` at cp ``N``, and within it GPU ``g`` holds the ``head_tail`` shard of
rank ``g`` at cp ``G`` (of every document of the node's stream, ``len/N`` tokens each). ``contiguous``
composes the same way. So, per layer:

1. ``in_proj`` on the rank's tokens (all channels);
2. the hidden strategy's all-to-all over the node's ``G`` GPUs (:func:`cp_core.hidden.seq_to_heads` with
   the token plan of the node's stream): GPU ``g`` gets ``[x|B|C|dt]`` of its head slice for all of the
   node's tokens, in the node's stream order;
3. state passing over the ``N`` GPUs ``g`` of the nodes (:func:`cp_core.state_passing.mid_forward`:
   conv1d with the halo of its channels, the SSD of its heads, the exchange of its heads' states), the
   same core as the ``state_passing`` strategy, run on the head slice;
4. the inverse all-to-all of ``y`` (:func:`cp_core.hidden.heads_to_seq`), then gated RMSNorm and
   ``out_proj`` on whole norm groups.

``1 x G`` is the hidden strategy (step 3 runs each document from a zero state on one rank: nothing is
exchanged) and ``N x 1`` is state passing (step 2 and 4 move nothing); both through this code. Packed
documents may cross node boundaries (a document is cut into segments like any other). Bytes per link:
:func:`cp_core.cost.hierarchical_bytes`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import comm, hidden
from .channels import ChannelPlan, check_heads, local_groups, mamba_channel_plan
from .kernels.norm import resolve as resolve_norm
from .mamba_cp import MambaContextParallel
from .pipeline import _no_autocast, hooks_active
from .plan import TokenPlan, get_plan
from .regions import NORM_PROJ, region
from .state_exchange import EXCHANGES
from .state_passing import SPSpec, _backends, _Plan, mid_backward, mid_forward

__all__ = ["Grid", "resolve_grid", "check_grid", "agree_grid", "label", "hierarchical_layer"]

#: the dimension names a 2-D DeviceMesh must carry, in this order
MESH_DIMS = ("node", "gpu")


class Grid:
    """``N`` nodes x ``G`` GPUs as two groups: ``node_group`` (GPU ``g`` of every node: the state
    exchange) and ``gpu_group`` (the GPUs of this node: the all-to-all). ``size()`` and ``rank()`` are
    the flat CP group's (node-major), so the layer treats a grid as a CP group of ``N*G`` ranks."""

    def __init__(self, node_group, gpu_group):
        self.node_group = comm.resolve_group(node_group)
        self.gpu_group = comm.resolve_group(gpu_group)
        self.nodes, self.gpus = comm.group_size(self.node_group), comm.group_size(self.gpu_group)
        self.node, self.gpu = comm.group_rank(self.node_group), comm.group_rank(self.gpu_group)
        self._slicers: dict = {}

    def size(self) -> int:
        return self.nodes * self.gpus

    def rank(self) -> int:
        return self.node * self.gpus + self.gpu

    def __repr__(self) -> str:
        return f"Grid({self.nodes}x{self.gpus}, node {self.node}, gpu {self.gpu})"

    def slicer(self, config) -> MambaContextParallel:
        """The parameter slices of this GPU's heads (the hidden strategy's, over the node's GPUs)."""
        key = (config.n_heads, config.head_dim, config.n_groups, config.d_state)
        if key not in self._slicers:
            self._slicers[key] = MambaContextParallel(self.gpu_group, *key, None)
        return self._slicers[key]


def _ranks(group):
    """The global ranks of a ProcessGroup (None for anything else: a LocalGroup, a stub, None)."""
    if dist.is_available() and isinstance(group, dist.ProcessGroup):
        return dist.get_process_group_ranks(group)
    return None


def resolve_grid(cp_group) -> Grid:
    """A :class:`Grid` from a 2-D ``DeviceMesh`` with dimensions ``("node", "gpu")``, a pair
    ``(node_group, gpu_group)`` (process groups, 1-D meshes, :class:`~cp_core.comm.LocalGroup` or None), or
    a Grid; ValueError naming what was given otherwise (nothing is communicated)."""
    if isinstance(cp_group, Grid):
        return cp_group
    if type(cp_group).__name__ == "DeviceMesh" and hasattr(cp_group, "get_group"):
        names = tuple(cp_group.mesh_dim_names or ())
        if cp_group.ndim != 2 or names != MESH_DIMS:
            raise ValueError(
                f"strategy='hierarchical' takes a 2-D DeviceMesh with dimensions {MESH_DIMS}, got {cp_group.ndim} "
                f"dimension(s) {names}"
            )
        return Grid(cp_group["node"], cp_group["gpu"])
    if isinstance(cp_group, (tuple, list)) and len(cp_group) == 2:
        node, gpu = cp_group
        grid = Grid(node, gpu)
        rn, rg = _ranks(grid.node_group), _ranks(grid.gpu_group)
        if rn is not None and rg is not None and len(set(rn) & set(rg)) != 1:
            raise ValueError(
                f"strategy='hierarchical': the node group (ranks {rn}) and the gpu group (ranks {rg}) must share "
                f"exactly one rank (this one): GPU g of every node, and the GPUs of this node"
            )
        return grid
    raise ValueError(
        f"strategy='hierarchical' takes cp_group as a 2-D DeviceMesh {MESH_DIMS} or a pair (node_group, "
        f"gpu_group), got {type(cp_group).__name__}"
    )


def check_grid(config, grid: Grid, overlap_chunks=None) -> None:
    """The grid's constraints (ValueError naming the values, raised at construction on every rank): the
    node's GPUs split the heads as the hidden strategy does; any number of nodes."""
    try:
        check_heads(config.n_heads, config.n_groups, grid.gpus)
    except ValueError as e:
        raise ValueError(f"grid {grid.nodes}x{grid.gpus}: {e} (the GPUs of a node split the heads)") from None
    if overlap_chunks not in (None, 1):
        raise ValueError(
            f"strategy='hierarchical' runs one head chunk: overlap_chunks must be 1, got {overlap_chunks!r}"
        )


def label(mixer) -> str:
    """The strategy as the ranks must agree on it: the grid's shape and the state exchange."""
    g = mixer.cp_group
    return f"hierarchical {g.nodes}x{g.gpus}, {mixer.state_exchange}"


def agree_grid(grid: Grid, layout: str, batch: int, length: int, device, cu_seqlens, agree_on, error=None):
    """Validate the batch over the whole grid (its plan at cp ``N*G``), then agree on it with two agreements:
    ``agree_on(grid.gpu_group, error)`` (the node's GPUs) and ``agree_on(grid.node_group, error)`` (GPU ``g``
    of every node), the first one's rejection handed to the second. ``agree_on(group, error)`` is the layer's
    own agreement over one group (:func:`cp_core.agree.checked_plan`: a ValueError on every rank of the
    group, or none). Every rank of the grid then raises, or none does: equal inside every node and inside
    every GPU column is equal everywhere, and a node whose ranks all raised hands its error to every column.
    Returns the plan (None where a rank rejected its input)."""
    plan = None
    if error is None:
        try:
            plan = get_plan(grid.size(), layout, batch, length, device, cu_seqlens)
        except ValueError as e:
            error = e
    try:
        agree_on(grid.gpu_group, error)
    except ValueError as e:
        error = e
    agree_on(grid.node_group, error)
    return plan


class _Mid(torch.autograd.Function):
    """State passing on the head slice: ``xh [T_node, x_l|B_l|C_l|dt_l]`` -> ``y [T_node, d_inner/G]``, with
    the hand-written backward of :func:`cp_core.state_passing.mid_backward`."""

    @staticmethod
    def forward(ctx, xh, conv_w, conv_b, dt_bias, A, D, spec: SPSpec):
        xbc, dt = xh[:, : spec.conv_dim], xh[:, spec.conv_dim :]
        y, kept = mid_forward(spec, xbc, dt, conv_w, conv_b, dt_bias, A, D)
        ctx.spec, ctx.xshape = spec, xh.shape
        if hooks_active():
            ctx.save_for_backward(xh, conv_w, conv_b, dt_bias, A, D, *kept)
            ctx.inter = "saved"
        else:
            ctx.save_for_backward(xh, conv_w, conv_b, dt_bias, A, D)
            ctx.inter = kept
        return y

    @staticmethod
    def backward(ctx, dy):
        with _no_autocast(dy):
            spec: SPSpec = ctx.spec
            if ctx.inter is None:
                raise RuntimeError("the hierarchical layer's backward runs once per forward")
            kept = ctx.saved_tensors
            xh, conv_w, conv_b, dt_bias, A, D = kept[:6]
            inter = list(kept[6:]) if ctx.inter == "saved" else ctx.inter
            ctx.inter = None
            del kept
            xbc, dt = xh[:, : spec.conv_dim], xh[:, spec.conv_dim :]
            dxh = torch.empty(ctx.xshape, dtype=xh.dtype, device=xh.device)
            dxbc, ddt = dxh[:, : spec.conv_dim], dxh[:, spec.conv_dim :]
            box = [dy.reshape(-1, spec.d_inner).contiguous()]
            del dy
            dconv_w, dconv_b, ddt_bias, dA, dD = mid_backward(
                spec, box, xbc, dt, dxbc, ddt, conv_w, conv_b, dt_bias, A, D, inter
            )
        return dxh, dconv_w, dconv_b, ddt_bias, dA, dD, None


def _node_cu(plan: TokenPlan, nodes: int, device) -> torch.Tensor:
    """The documents of a node's stream (``len/N`` tokens each), as an int32 tensor kept with the batch's
    plan (so the node-level plan built from it is cached as long as the batch's)."""
    key = ("hierarchical_cu", nodes)
    if key not in plan.extras:
        plan.extras[key] = torch.tensor([v // nodes for v in plan.host_cu], dtype=torch.int32, device=device)
    return plan.extras[key]


def hierarchical_layer(mixer, hidden_states: torch.Tensor, cu_seqlens, *, params=None) -> torch.Tensor:
    """The whole Mamba2 layer of ``mixer`` (whose ``cp_group`` is a :class:`Grid`) on this rank's shard
    ``[B, L/(N*G), d_model]`` (or packed ``[T/(N*G), d_model]`` with the global ``cu_seqlens``): the
    output shard of the same shape."""
    w = mixer.weights() if params is None else params
    c, grid, layout = mixer.config, mixer.cp_group, mixer.layout
    N, G, n = grid.nodes, grid.gpus, grid.node
    dev = hidden_states.device
    if mixer.state_exchange not in EXCHANGES:
        raise ValueError(f"state_exchange must be one of {EXCHANGES}, got {mixer.state_exchange!r}")
    if cu_seqlens is None:
        batch, local = hidden_states.shape[0], hidden_states.shape[1]
        length = local * N * G
        plan = get_plan(N * G, layout, batch, length, dev)
        doc_lens, cu_node = [length] * batch, None
    else:
        batch, length = 1, hidden_states.shape[0] * N * G
        plan = get_plan(N * G, layout, 1, length, dev, cu_seqlens)
        cu = plan.host_cu
        doc_lens = [cu[i + 1] - cu[i] for i in range(len(cu) - 1)]
        cu_node = _node_cu(plan, N, dev) if G > 1 else None
    node_len = length // N  # tokens of a node's stream per row (BSHD) or of its pack
    # node level: this GPU's pieces of the node's stream (one piece per document when N == 1: no exchange)
    key = ("hierarchical", N, G, n, c.d_conv)
    if key not in plan.extras:
        plan.extras[key] = _Plan(doc_lens, N, n, layout if N > 1 else "contiguous", c.d_conv, dev)
    pl = plan.extras[key]
    sl = grid.slicer(c)
    conv_w = sl.get_conv1d_weight(w.conv)
    conv_b = None if w.conv_bias is None else sl.get_conv1d_bias(w.conv_bias)
    dt_bias, A = sl.get_dt_bias(w.dt_bias), -torch.exp(sl.get_A_log(w.A_log).float())
    D = sl.get_D(w.D)
    if c.D_has_hdim:
        D = D.view(-1, c.head_dim)
    ssd_name, conv_name = _backends(mixer, hidden_states, conv_w)
    norm_backend = resolve_norm("auto", hidden_states)
    mixer.backends = {"ssd": ssd_name, "conv": conv_name, "norm": norm_backend}
    spec = SPSpec(
        plan=pl, group=grid.node_group if N > 1 else None, exchange=mixer.state_exchange,
        nh=c.n_heads // G, hd=c.head_dim, ng=local_groups(c.n_groups, G), ds=c.d_state, chunk=c.chunk_size,
        eps=c.norm_eps, norm_group=c.d_inner // c.n_groups, norm_backend=norm_backend, ssd_backend=ssd_name,
        conv_backend=conv_name, overlap=dev.type == "cuda",
    )  # fmt: skip
    with region(NORM_PROJ):
        zx = F.linear(hidden_states, w.in_proj)
    z, xbcdt = zx.split([c.d_inner, c.d_in_proj - c.d_inner], dim=-1)
    if G > 1:  # the node's tokens of this GPU's heads, in the node's stream order
        tok = get_plan(G, layout, batch, node_len, dev, cu_node)
        chan = mamba_channel_plan(G, c.n_heads, c.head_dim, c.n_groups, c.d_state, with_z=False)
        xh = hidden.seq_to_heads(xbcdt, chan, tok, grid.gpu_group)
    else:
        xh = xbcdt
    y = _Mid.apply(xh.reshape(-1, xh.shape[-1]), conv_w, conv_b, dt_bias, A, D, spec)
    if G > 1:
        shape = (node_len, c.d_inner // G) if cu_seqlens is not None else (batch, node_len, c.d_inner // G)
        y = hidden.heads_to_seq(y.view(shape), ChannelPlan.single(G, c.d_inner // G), tok, grid.gpu_group)
    return mixer._norm_out(y.view(z.shape), z, w)
