"""Naive per-token references (float64 inside): the SSD, the causal conv1d, and the whole Mamba2 layer.

They follow the definitions literally, one token at a time, so they are slow and meant for tests on
small shapes: the chunked torch kernels and the fast kernels are checked against them, and the mixer
against :func:`mamba2_layer_ref`. All are differentiable through autograd. Document boundaries are
selections (``torch.where``), never multiplications by zero, so a non-finite value stays in its document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .conv_torch import check_conv_args
from .ssd_torch import check_ssd_args, compute_dtype

__all__ = ["ssd_recurrent_ref", "conv1d_ref", "mamba2_layer_ref"]


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
                term = torch.where((seq_idx[:, s] == seq_idx[:, t])[:, None], term, 0.0)
            acc = acc + term
        outs.append(acc)
    y = torch.stack(outs, dim=1)
    if activation in ("silu", "swish"):
        y = F.silu(y)
    return y.to(x.dtype)


def mamba2_layer_ref(params: dict, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, *, config):
    """The whole Mamba2 layer from its definition, token by token, in float64: an oracle for the mixer.

    ``params``: mamba-ssm ``Mamba2``'s names and shapes (``in_proj.weight [d_in_proj, d_model]``,
    ``conv1d.weight [conv_dim, 1, k]``, ``conv1d.bias``, ``dt_bias [H]``, ``A_log [H]``, ``D [H]`` or
    ``[H*P]``, ``norm.weight [H*P]``, ``out_proj.weight [d_model, H*P]``); ``config`` a
    :class:`~cp_core.mixer.Mamba2Config`. ``x [B, L, d_model]``, or packed ``[T, d_model]`` with the
    cumulative document lengths ``cu_seqlens``: each document is then run on its own, from a zero
    state and zero conv history. Returns the output in float64, differentiable in ``x`` and ``params``.

    Per token ``t`` of a document, with ``H`` heads of ``P`` channels, ``G`` groups, state size ``N``::

        [z | xBC | dt] = W_in u_t                       xBC = [x (H*P) | B (G*N) | C (G*N)]
        xBC_t  = silu(b + sum_{j<k} w[:, k-1-j] * xBC_{t-j})      (taps before the document: 0)
        dt'    = softplus(dt + dt_bias),  A = -exp(A_log)
        h_t    = exp(dt'_h A_h) h_{t-1} + dt'_h x_{t,h} B_{t,g(h)}^T      g(h) = h // (H/G)
        y_t    = h_t C_{t,g(h)} + D_h x_{t,h}
        g_t    = y_t * silu(z_t);  each of G groups of H*P/G channels: g * rsqrt(mean(g^2) + eps)
        out_t  = W_out (g_t * norm_weight)

    Nothing here calls the kernels or the mixer, so it checks their math, not only their consistency.
    """
    c = config
    f64 = torch.float64
    p = {k: v.to(f64) for k, v in params.items()}
    H, P, G, N, K = c.n_heads, c.head_dim, c.n_groups, c.d_state, c.d_conv
    d_inner = H * P
    if cu_seqlens is None:
        docs = [x[b] for b in range(x.shape[0])]
    else:
        cu = [int(v) for v in cu_seqlens.tolist()]
        docs = [x[cu[i] : cu[i + 1]] for i in range(len(cu) - 1)]
    w_conv = p["conv1d.weight"][:, 0, :]  # [conv_dim, K]
    A = -torch.exp(p["A_log"])
    D = p["D"].view(H, P) if p["D"].numel() == d_inner else p["D"].view(H, 1)
    outs = []
    for u in docs:
        L = u.shape[0]
        if L == 0:
            outs.append(u.new_zeros(0, c.d_model, dtype=f64))
            continue
        zxbcdt = u.to(f64) @ p["in_proj.weight"].T
        z = zxbcdt[:, :d_inner]
        xbc = zxbcdt[:, d_inner : d_inner + c.conv_dim]
        dt = zxbcdt[:, d_inner + c.conv_dim :]
        h = zxbcdt.new_zeros(H, P, N)
        ys = []
        for t in range(L):
            pre = p["conv1d.bias"].clone()
            for j in range(K):
                if t - j >= 0:
                    pre = pre + w_conv[:, K - 1 - j] * xbc[t - j]
            act = pre * torch.sigmoid(pre)
            xt = act[:d_inner].view(H, P)
            Bt = act[d_inner : d_inner + G * N].view(G, N).repeat_interleave(H // G, dim=0)  # [H, N]
            Ct = act[d_inner + G * N :].view(G, N).repeat_interleave(H // G, dim=0)
            dtp = torch.log1p(torch.exp(dt[t] + p["dt_bias"]))  # softplus, [H]
            h = torch.exp(dtp * A)[:, None, None] * h + (dtp[:, None] * xt)[:, :, None] * Bt[:, None, :]
            yt = (h * Ct[:, None, :]).sum(-1) + D * xt  # [H, P]
            g = yt.reshape(d_inner) * (z[t] * torch.sigmoid(z[t]))
            gg = g.view(G, d_inner // G)
            gg = gg / torch.sqrt((gg * gg).mean(-1, keepdim=True) + c.norm_eps)
            ys.append((gg.reshape(d_inner) * p["norm.weight"]) @ p["out_proj.weight"].T)
        outs.append(torch.stack(ys))
    return torch.stack(outs) if cu_seqlens is None else torch.cat(outs)
