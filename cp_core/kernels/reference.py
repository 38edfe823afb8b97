"""Naive per-token references for the SSD and the causal conv1d (float64 inside).

They follow the definitions literally, one token at a time, so they are slow and meant for tests on
small shapes: the chunked torch kernels and the fast kernels are checked against them. Both are
differentiable through autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .conv_torch import check_conv_args
from .ssd_torch import check_ssd_args, compute_dtype

__all__ = ["ssd_recurrent_ref", "conv1d_ref"]


def ssd_recurrent_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    chunk_size: int | None = None,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True,
    seq_idx: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    return_final_states: bool = False,
):
    """The SSD recurrence token by token, in float64; same arguments and result as ``ssd``.

    ``chunk_size`` is accepted for signature compatibility and ignored. The state is reset before a
    token whose ``seq_idx`` differs from the previous token's; the virtual token before the first
    one has document id 0 and holds ``initial_states``. ``final_states`` comes back in float32
    (float64 when an input is float64).
    """
    b, l, h, p, g, n = check_ssd_args(x, dt, A, B, C, chunk_size or 1, D, dt_bias, seq_idx, initial_states)
    r = h // g
    f64 = torch.float64
    dtp = dt.to(f64)
    if dt_bias is not None:
        dtp = dtp + dt_bias.to(f64)
    if dt_softplus:
        dtp = F.softplus(dtp)
    xf = x.to(f64)
    Bh = B.to(f64).repeat_interleave(r, dim=2)  # [b, l, h, n]
    Ch = C.to(f64).repeat_interleave(r, dim=2)
    Af = A.to(f64)
    if initial_states is not None:
        state = initial_states.to(f64)
    else:
        state = x.new_zeros(b, h, p, n, dtype=f64)
    prev_doc = torch.zeros(b, dtype=torch.long, device=x.device)
    ys = []
    for t in range(l):
        if seq_idx is not None:
            doc = seq_idx[:, t].long()
            state = torch.where((doc != prev_doc)[:, None, None, None], torch.zeros_like(state), state)
            prev_doc = doc
        decay = torch.exp(dtp[:, t] * Af)  # [b, h]
        inp = (dtp[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]  # [b, h, p, n]
        state = decay[:, :, None, None] * state + inp
        y_t = torch.einsum("bhpn,bhn->bhp", state, Ch[:, t])
        if D is not None:
            Dv = D.to(f64)[:, None] if D.dim() == 1 else D.to(f64)
            y_t = y_t + Dv * xf[:, t]
        ys.append(y_t)
    y = torch.stack(ys, dim=1).to(x.dtype)
    if return_final_states:
        fdt = compute_dtype(x, dt, A, B, C, D, dt_bias, initial_states)
        return y, state.to(fdt)
    return y


def conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    seq_idx: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Causal depthwise conv1d token by token, in float64; same arguments and result as ``conv1d``.

    ``y_t = bias + sum_j weight[:, k-1-j] * x_{t-j}`` over taps with ``t-j >= 0`` and
    ``seq_idx[t-j] == seq_idx[t]``, then SiLU when ``activation == "silu"``.
    """
    b, l, c, k = check_conv_args(x, weight, bias, seq_idx, activation)
    f64 = torch.float64
    xf, wf = x.to(f64), weight.to(f64)
    outs = []
    for t in range(l):
        acc = bias.to(f64).expand(b, c) if bias is not None else xf.new_zeros(b, c)
        for j in range(k):
            s = t - j
            if s < 0:
                break
            term = wf[:, k - 1 - j] * xf[:, s]
            if seq_idx is not None:
                term = term * (seq_idx[:, s] == seq_idx[:, t]).to(f64)[:, None]
            acc = acc + term
        outs.append(acc)
    y = torch.stack(outs, dim=1)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    return y.to(x.dtype)
