"""The SSD in two phases, states then outputs, and its backward with the hooks state passing needs.

mamba-ssm's chunked SSD computes ``chunk_cumsum -> chunk_state -> state_passing`` (the final states)
before ``bmm_chunk + chunk_scan`` (the outputs). :class:`SSDForward` exposes that order, so a caller can
start an exchange of the final states and compute the local outputs while it runs; :func:`ssd_backward`
is mamba-ssm's backward in the same kernels and order, except that what does not depend on the final
states' gradient runs first and ``dfinal()`` is called only right before ``state_passing``'s backward
(the exchange of the states' gradients runs beside the rest). It also takes gradients with respect to
``dt' = softplus(dt + dt_bias)`` and ``a = A dt'`` from outside the SSD (state passing's decay terms),
folded in before ``chunk_cumsum``'s backward, so ``d dt``, ``dA``, ``d dt_bias`` are rounded once.

=========  ===========================================================================================
backend    implementation
=========  ===========================================================================================
mamba_ssm  mamba-ssm's Triton kernels (``_chunk_cumsum_fwd`` ... ``_chunk_cumsum_bwd``), called in the
           order of ``_mamba_chunk_scan_combined_fwd`` / ``_bwd`` (``z = None``): the same numbers
torch      :func:`cp_core.kernels.ssd_torch.ssd_torch_phases` forward; backward by autograd through
           :func:`~cp_core.kernels.ssd_torch.ssd_torch` recomputed (the reference)
=========  ===========================================================================================

Shapes as :func:`cp_core.kernels.ssd` (``x [b, l, h, p]``, ``dt [b, l, h]`` raw, ``B``, ``C`` ``[b, l, g, n]``),
``dt_softplus`` always on. The extra gradients are ``[h, b*l]`` fp32 (token ``r*l + i`` of row ``r``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .ssd_mamba import load_submodule
from .ssd_torch import ssd_torch, ssd_torch_phases

__all__ = ["SSDForward", "ssd_backward", "BACKENDS"]

BACKENDS = ("mamba_ssm", "torch")
_SSD = "mamba_ssm.ops.triton.ssd_combined"


def _mod():
    mod, reason = load_submodule(_SSD)
    if mod is None:
        raise ValueError(f"SSD backend 'mamba_ssm' is unavailable: {reason}")
    return mod


def _last_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class SSDForward:
    """One SSD forward without autograd: :meth:`states` (the final state of every row, fp32
    ``[b, h, p, n]``), then :meth:`outputs` (``y [b, l, h, p]``, ``x``'s dtype, ``D x`` included)."""

    def __init__(self, backend: str, x, dt, A, B, C, chunk_size: int, D=None, dt_bias=None, seq_idx=None):
        if backend not in BACKENDS:
            raise ValueError(f"SSD backend must be one of {BACKENDS}, got {backend!r}")
        self.backend, self.chunk = backend, chunk_size
        self.x, self.dt, self.A, self.B, self.C = x, dt, A, _last_unit(B), _last_unit(C)
        self.D, self.dt_bias, self.seq_idx = D, dt_bias, seq_idx
        self._st = None

    @torch.no_grad()
    def states(self) -> torch.Tensor:
        if self.backend == "torch":
            self._st = ssd_torch_phases(
                self.x, self.dt, self.A, self.B, self.C, chunk_size=self.chunk, D=self.D,
                dt_bias=self.dt_bias, seq_idx=self.seq_idx,
            )  # fmt: skip
            return self._st.states().float()
        mod = _mod()
        p, n = self.x.shape[-1], self.B.shape[-1]
        dA_cs, dtp = mod._chunk_cumsum_fwd(
            self.dt, self.A, self.chunk, dt_bias=self.dt_bias, dt_softplus=True
        )
        st = mod._chunk_state_fwd(self.B, self.x, dtp, dA_cs, seq_idx=self.seq_idx, states_in_fp32=True)
        st, final = mod._state_passing_fwd(
            st.flatten(-2),
            dA_cs[:, :, :, -1],
            seq_idx=self.seq_idx,
            chunk_size=self.chunk,
            out_dtype=self.C.dtype,
        )
        self._st = (dA_cs, dtp, st.unflatten(-1, (p, n)))
        return final.unflatten(-1, (p, n))

    @torch.no_grad()
    def outputs(self) -> torch.Tensor:
        if self._st is None:
            self.states()
        if self.backend == "torch":
            y = self._st.outputs()
        else:
            mod = _mod()
            dA_cs, dtp, st = self._st
            CB = mod._bmm_chunk_fwd(
                self.C, self.B, self.chunk, seq_idx=self.seq_idx, output_dtype=torch.float32
            )
            y, _ = mod._chunk_scan_fwd(
                CB, self.x, dtp, dA_cs, self.C, st, D=self.D, z=None, seq_idx=self.seq_idx
            )
        self._st = None
        return y


def _to_chunks(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[h, b*l]`` -> mamba-ssm's ``[b, h, nchunks, chunk]`` layout (zeros past each row's end)."""
    b, h, nc, cs = like.shape
    l = g.shape[1] // b
    out = torch.zeros_like(like)
    out.view(b, h, nc * cs)[..., :l] = g.view(h, b, l).transpose(0, 1)
    return out


def ssd_backward(
    backend: str,
    dy,
    x,
    dt,
    A,
    B,
    C,
    chunk_size: int,
    D=None,
    dt_bias=None,
    seq_idx=None,
    *,
    dx: torch.Tensor,
    ddt: torch.Tensor,
    dB: torch.Tensor,
    dC: torch.Tensor,
    dfinal: Callable[[], torch.Tensor | None] | None = None,
    extra: Callable[..., tuple[torch.Tensor | None, torch.Tensor | None]] | None = None,
):
    """Backward of :class:`SSDForward` (no autograd): ``dx``, ``ddt`` (raw ``dt``), ``dB``, ``dC`` are written
    into the given buffers (column slices of one gradient buffer are fine); returns ``(dA, dD, ddt_bias)``
    (``dA`` fp32, the others in their parameter's dtype). ``dfinal()`` gives the final states' gradient
    ``[b, h, p, n]`` (or None), asked for as late as the kernels allow; ``extra(dx, dB32, dC32)`` is called
    once ``dx`` is written and the SSD's ``dB``, ``dC`` are formed in fp32 (``[b, l, g, n]``, contiguous: the
    caller may add its own terms there, rounded once with them) and returns ``(d_dtp, d_a)`` ``[h, b*l]``
    fp32 (or Nones): gradients with respect to ``dt'`` and ``A dt'`` from outside the SSD."""
    if backend == "torch":
        return _torch_backward(
            dy, x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dx, ddt, dB, dC, dfinal, extra
        )
    if backend != "mamba_ssm":
        raise ValueError(f"SSD backend must be one of {BACKENDS}, got {backend!r}")
    mod = _mod()
    B, C = _last_unit(B), _last_unit(C)
    dout = _last_unit(dy)
    p, g, n = x.shape[-1], B.shape[2], B.shape[3]
    dt_in = dt.clone()  # as mamba-ssm's backward (a Triton device-context issue)
    dA_cs, dtp = mod._chunk_cumsum_fwd(dt_in, A, chunk_size, dt_bias=dt_bias, dt_softplus=True)
    CB = mod._bmm_chunk_fwd(C, B, chunk_size, seq_idx=seq_idx, output_dtype=torch.float32)
    st = mod._chunk_state_fwd(B, x, dtp, dA_cs, seq_idx=seq_idx, states_in_fp32=True)
    st, _ = mod._state_passing_fwd(st.flatten(-2), dA_cs[:, :, :, -1], seq_idx=seq_idx, chunk_size=chunk_size)
    dstates = mod._chunk_scan_bwd_dstates(C, dA_cs, dout, seq_idx=seq_idx, dtype=st.dtype)
    # independent of the final states' gradient: runs while it may still be on its way
    dCB = mod._chunk_scan_bwd_dcb(x, dtp, dA_cs, dout, seq_idx=seq_idx, ngroups=g)
    ddA = mod._chunk_scan_bwd_ddAcs_stable(x, dtp, dA_cs, dout, CB)
    dfin = None if dfinal is None else dfinal()
    dstates, ddA_chunk, _, st = mod._state_passing_bwd(
        st, dA_cs[:, :, :, -1], dstates.flatten(-2),
        dfinal_states=None if dfin is None else dfin.flatten(-2).contiguous(), seq_idx=seq_idx,
        has_initial_states=False, dstates_dtype=x.dtype, states_dtype=x.dtype, chunk_size=chunk_size,
    )  # fmt: skip
    st, dstates = st.unflatten(-1, (p, n)), dstates.unflatten(-1, (p, n))
    dx, ddt_out, dD = mod._chunk_scan_chunk_state_bwd_dx(
        x, dtp, dA_cs, B, CB, dout, dstates, D=D, seq_idx=seq_idx, dx=dx
    )
    dB_part, ddA_next = mod._chunk_state_bwd_db(x, dtp, dA_cs, dstates, seq_idx=seq_idx, B=B, ngroups=g)
    dC_part, ddA_prev = mod._chunk_scan_bwd_dC(st.to(x.dtype), dA_cs, dout, seq_idx=seq_idx, C=C, ngroups=g)
    # the caller's terms join dB and dC in fp32, before their one rounding
    d_dtp, d_a = extra(dx, dB_part, dC_part) if extra is not None else (None, None)
    dCB = dCB.to(CB.dtype)
    mod._bmm_chunk_bwd(C, dCB, residual=dB_part, out=dB)
    mod._bmm_chunk_bwd(B, dCB.transpose(-1, -2), residual=dC_part, out=dC)
    ddA_prev[..., -1] += ddA_chunk
    ddA += ddA_next + ddA_prev.flip([-1]).cumsum(dim=-1).flip([-1])
    if d_a is not None:
        ddA += _to_chunks(d_a, ddA)
    if d_dtp is not None:
        ddt_out = ddt_out + _to_chunks(d_dtp, ddt_out)
    _, dA, ddt_bias = mod._chunk_cumsum_bwd(
        ddA, ddt_out, dt_in, A, dt_bias=dt_bias, dt_softplus=True, ddt=ddt
    )  # writes ddt
    if dD is not None:
        dD = dD.to(D.dtype)
    return dA, dD, None if ddt_bias is None else ddt_bias.to(dt_bias.dtype)


def _torch_backward(dy, x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dx, ddt, dB, dC, dfinal, extra):
    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, dt, A, B, C, D, dt_bias)]
    with torch.enable_grad():
        lx, ldt, lA, lB, lC, lD, lbias = leaves
        want_final = dfinal is not None
        res = ssd_torch(
            lx, ldt, lA, lB, lC, chunk_size=chunk_size, D=lD, dt_bias=lbias, seq_idx=seq_idx,
            return_final_states=want_final,
        )  # fmt: skip
        y, fin = res if want_final else (res, None)
        outs, grads = [y], [dy]
        dfin = dfinal() if want_final else None
        if dfin is not None:
            outs.append(fin)
            grads.append(dfin.to(fin.dtype))
        g = _grads(outs, grads, leaves)
    dx.copy_(g[0])
    ddt.copy_(g[1])
    dB32, dC32 = g[3].float().contiguous(), g[4].float().contiguous()
    dA, dD, dbias = g[2], g[5], g[6]
    d_dtp, d_a = extra(dx, dB32, dC32) if extra is not None else (None, None)
    dB.copy_(dB32)
    dC.copy_(dC32)
    if d_dtp is not None or d_a is not None:
        with torch.enable_grad():
            b, l, h = dt.shape
            work = torch.float64 if x.dtype == torch.float64 else torch.float32
            dtp = ldt.to(work)
            if lbias is not None:
                dtp = dtp + lbias.to(work)
            dtp = F.softplus(dtp).reshape(b * l, h).t()  # [h, T], as the caller's decay
            outs, grads = [], []
            for t, gr in ((dtp, d_dtp), (dtp * lA.to(work)[:, None], d_a)):
                if gr is not None:
                    outs.append(t)
                    grads.append(gr.to(t.dtype))
            e = _grads(outs, grads, [None, ldt, lA, None, None, None, lbias])
        ddt.add_(e[1].to(ddt.dtype))
        dA = dA + e[2]
        if dbias is not None:
            dbias = dbias + e[6]
    return dA.float(), dD, dbias


def _grads(outs, grads, leaves):
    """``torch.autograd.grad`` with respect to the non-None ``leaves``; zeros where a leaf is unused."""
    wrt = [t for t in leaves if t is not None]
    got = iter(torch.autograd.grad(outs, wrt, grads, allow_unused=True))
    res = []
    for t in leaves:
        if t is None:
            res.append(None)
            continue
        gi = next(got)
        res.append(torch.zeros_like(t) if gi is None else gi)
    return res
