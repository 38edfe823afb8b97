"""The layer under ``torch.compile``: one custom op from ``in_proj``'s input to ``out_proj``'s output.

The layer's core runs mamba-ssm's Triton kernels and causal-conv1d through Python wrappers, its collectives
through point-to-point groups, its plans and agreement through host caches: nothing the compiler can trace.
So under ``torch.compile`` (``torch.compiler.is_compiling()``) :class:`~cp_core.mixer.Mamba2Mixer` (cp 1,
and the hidden strategy at cp > 1) calls ``cp_core::mamba2_layer`` instead of its autograd functions:

* what is traced: the autocast casts of the input and the parameters and this rank's parameter slices
  (plain tensor ops, fused by the compiler with what surrounds the layer);
* what the op holds, run as in eager mode: the validation and the cross-rank agreement, the token plan,
  ``in_proj``, the core (:func:`cp_core.pipeline.core_forward`) with its all-to-alls;
* its backward, ``cp_core::mamba2_layer_bwd``: the core's hand-written backward and ``in_proj``'s.

The op returns what backward needs (``z``, ``y``, the norm statistics, the head-sharded conv inputs) beside
the output, so they are saved through ``save_for_backward`` (checkpointing and offloading see them); its fake
computes their shapes from the layer's configuration alone (:meth:`Mamba2Mixer._saved_meta`). Non-tensor
state (the layer: its group, configuration, caches) is found through an integer id. No graph break inside
the layer's forward; eager mode does not use the op (no dispatch cost)."""

import contextlib
import itertools
import weakref

import torch
import torch.nn.functional as F
from torch.library import custom_op

from .pipeline import core_backward, core_forward, slot_bwd, slot_fwd, split_bwd, split_fwd

__all__ = ["register", "compiled_forward"]

_LAYERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_IDS = itertools.count(1)


def register(layer) -> int:
    """A process-unique id for ``layer`` (the op finds it by that id)."""
    uid = next(_IDS)
    _LAYERS[uid] = layer
    return uid


def _layer(uid: int):
    layer = _LAYERS.get(uid)
    if layer is None:
        raise RuntimeError(f"cp_core::mamba2_layer: layer {uid} no longer exists")
    return layer


@contextlib.contextmanager
def _autograd_inside():
    """Autograd inside an op's implementation (which runs with the autograd dispatch key excluded): the torch
    reference backwards of the norm and of conv1d + SSD recompute their forward under autograd."""
    ex = torch._C._dispatch_tls_local_exclude_set()
    key = torch._C.DispatchKey.AutogradFunctionality
    if not ex.has(key):
        with torch.enable_grad():
            yield
        return
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), ex.remove(key)):
        with torch.enable_grad():
            yield


def _none_if_empty(t):
    return None if t is None or t.numel() == 0 and t.dim() == 1 else t


@custom_op("cp_core::mamba2_layer", mutates_args=())
def mamba2_layer(
    x: torch.Tensor,
    in_w: torch.Tensor,
    conv_w: torch.Tensor,
    conv_b: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor,
    norm_w: torch.Tensor,
    out_w: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    layer: int,
    amp: bool,
) -> list[torch.Tensor]:
    m = _layer(layer)
    with torch.autocast(x.device.type, dtype=x.dtype, enabled=amp):  # validate as the eager call does
        m._check_input(x, cu_seqlens)
    c = m.config
    _, _, _, spec, mode = m._core_setup(x, cu_seqlens)
    if mode == "whole":
        zx, xs = F.linear(x, in_w), None
    elif mode == "split":
        zx, xs = split_fwd(x, in_w, c.d_inner)
    else:
        per_chunk = spec.cp_size if spec.overlap else 0
        zx, xs = slot_fwd(x, in_w, c.d_inner, spec.slot_rows, spec.chunks * spec.cp_size, per_chunk)
    A = -torch.exp(A_log.float())  # here, not traced: the same exp as eager mode's, to the bit
    out, y, rstd, saved_xh = core_forward(spec, zx, xs, conv_w, conv_b, dt_bias, A, D, norm_w, out_w)
    keep_x = xs if (spec.cp_size == 1 and mode == "split") else x.new_empty(0)
    rstds = [r for r in (rstd if isinstance(rstd, list) else [rstd]) if r is not None]
    return [out, zx, keep_x, y, *rstds, *saved_xh]


@mamba2_layer.register_fake
def _(x, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, cu_seqlens, layer, amp):
    m = _layer(layer)
    out = x.new_empty((*x.shape[:-1], out_w.shape[0]))
    return [out] + [x.new_empty(shape, dtype=dt) for shape, dt in m._saved_meta(x)]


@custom_op("cp_core::mamba2_layer_bwd", mutates_args=())
def mamba2_layer_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    in_w: torch.Tensor,
    conv_w: torch.Tensor,
    conv_b: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor,
    norm_w: torch.Tensor,
    out_w: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    saved: list[torch.Tensor],
    layer: int,
) -> list[torch.Tensor]:
    m = _layer(layer)
    c = m.config
    _, _, _, spec, mode = m._core_setup(x, cu_seqlens)  # the forward's spec (cached per plan)
    zx, keep_x, y = saved[0], _none_if_empty(saved[1]), saved[2]
    n_rstd = 0 if spec.norm_backend == "torch" else (len(spec.y_cols) or 1)
    rstd = list(saved[3 : 3 + n_rstd])
    if spec.norm_backend == "torch":
        rstd = [None] * len(spec.y_cols) if spec.y_cols else None
    elif not spec.y_cols:
        rstd = rstd[0]
    saved_xh = list(saved[3 + n_rstd :])
    n = zx.numel() // zx.shape[-1]
    if mode == "whole":
        xshape = None
    elif mode == "split":
        xshape = (*x.shape[:-1], c.d_in_proj - c.d_inner)
    else:
        xshape = (spec.chunks * spec.cp_size, n, int(spec.slot_rows.numel()) // (spec.chunks * spec.cp_size))
    e = torch.exp(A_log.float())
    A = -e
    inter = [y, rstd, saved_xh]
    del y, rstd, saved_xh, saved
    with _autograd_inside():
        dzx, dxs, dcw, dcb, ddt, dA, dD, dnw, dow = core_backward(
            spec, dout, zx, xshape, keep_x, conv_w, conv_b, dt_bias, A, D, norm_w, out_w, inter
        )
    if mode == "whole":
        d2, x2 = dzx.reshape(-1, dzx.shape[-1]), x.reshape(-1, x.shape[-1])
        dx, dw = (d2 @ in_w).view_as(x), d2.t() @ x2
    elif mode == "split":
        dx, dw = split_bwd(x, in_w, c.d_inner, dzx, dxs)
    else:
        per_chunk = spec.cp_size if spec.overlap else 0
        dx, dw = slot_bwd(x, in_w, c.d_inner, spec.slot_rows, spec.slot_unique, per_chunk, dzx, dxs)
    dcb = x.new_empty(0) if dcb is None else dcb
    dA_log = ((-dA) * e).to(A_log.dtype)  # what autograd does through -exp(A_log.float()), op by op
    return [dx, dw, dcw, dcb, ddt, dA_log, dD, dnw, dow]


@mamba2_layer_bwd.register_fake
def _(dout, x, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, cu_seqlens, saved, layer):
    like = [x, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w]
    return [x.new_empty(0) if t is None else torch.empty_like(t) for t in like]


def _setup(ctx, inputs, output):
    x, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, cu_seqlens, layer, amp = inputs
    ctx.layer, ctx.has_bias, ctx.packed = layer, conv_b is not None, cu_seqlens is not None
    ctx.n_saved = len(output) - 1
    extra = [t for t in (conv_b, cu_seqlens) if t is not None]
    ctx.save_for_backward(x, in_w, conv_w, dt_bias, A_log, D, norm_w, out_w, *extra, *output[1:])


def _backward(ctx, grads):
    x, in_w, conv_w, dt_bias, A_log, D, norm_w, out_w, *rest = ctx.saved_tensors
    conv_b = rest.pop(0) if ctx.has_bias else None
    cu = rest.pop(0) if ctx.packed else None
    g = mamba2_layer_bwd(
        grads[0], x, in_w, conv_w, conv_b, dt_bias, A_log, D, norm_w, out_w, cu, rest, ctx.layer
    )
    dcb = g[3] if ctx.has_bias else None
    return g[0], g[1], g[2], dcb, g[4], g[5], g[6], g[7], g[8], None, None, None


mamba2_layer.register_autograd(_backward, setup_context=_setup)


def compiled_forward(layer, x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """The layer's forward as traced under ``torch.compile``: autocast casts and parameter slices, then the op."""
    kind = x.device.type
    amp = torch.is_autocast_enabled(kind)
    dtype = torch.get_autocast_dtype(kind) if amp else None
    with torch.autocast(kind, enabled=False):
        if amp and x.is_floating_point():
            x = x.to(dtype)
        w = layer.weights(dtype)
        conv_w, conv_b, dt_bias, A_log, D = layer._local_slices(w)
        outs = mamba2_layer(
            x, w.in_proj, conv_w, conv_b, dt_bias, A_log, D, w.norm, w.out_proj, cu_seqlens, layer._uid, amp
        )
    return outs[0]
