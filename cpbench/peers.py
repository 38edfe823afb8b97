"""The peer layers a sweep runs beside ours (``sweep.impl``), built with the same weights.

``impl``        what runs
``cp_core``     :class:`cp_core.mixer.Mamba2Mixer` (ours)
``mamba_ssm``   mamba-ssm's own ``Mamba2`` (``use_mem_eff_path``: ``in_proj`` + the fused
                ``mamba_split_conv1d_scan_combined`` with gated RMSNorm and ``out_proj`` inside); cp 1 only
``nemo``        NeMo AutoModel 0.7.0's training path for Nemotron-H (``NemotronV3Mamba2Mixer.forward``, no
                cache), rebuilt from its pieces: ``in_proj`` -> ``MambaContextParallel.pre_conv_ssm``
                (``z|x|B|C|dt`` move) -> ``mamba_split_conv1d_scan_combined`` (conv + SSD + ``y*silu(z)``,
                no norm, no out_proj, sliced parameters, ``seq_idx`` for packed input) ->
                ``post_conv_ssm`` -> mamba-ssm's Triton grouped RMSNorm (no gate) -> ``out_proj``.
                At cp 1 the same kernel with the norm and ``out_proj`` fused, as NeMo does.

Every peer loads our mixer's ``state_dict`` (the parameter names are mamba-ssm's), so the three compute
the same function on the same input. A peer whose packages are missing raises :class:`PeerUnavailable`
with the reason (the sweep records the case as skipped). The NeMo module is imported from the
``nemo_automodel`` package when it is installed (``pip install --no-deps nemo-automodel==0.7.0``: its
context-parallel module needs torch only).
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

IMPLS = ("cp_core", "nemo", "mamba_ssm")
_NEMO_CP = "nemo_automodel.components.distributed.context_parallel.mamba"


class PeerUnavailable(Exception):
    """The peer cannot run here; the message says why."""


def _mamba_module(name: str):
    from cp_core.kernels.ssd_mamba import load_submodule

    mod, reason = load_submodule(name)
    if mod is None:
        raise PeerUnavailable(f"mamba-ssm: {reason}")
    return mod


def _fused_kernel():
    mod = _mamba_module("mamba_ssm.ops.triton.ssd_combined")
    if getattr(mod, "causal_conv1d_fwd_function", None) is None:
        raise PeerUnavailable("causal-conv1d is not installed (mamba-ssm's fused kernel needs it)")
    return mod.mamba_split_conv1d_scan_combined


def skip_reason(impl: str, cp_size: int, strategy: str, path: str, layout: str, chunks: int) -> str | None:
    """Why a peer case does not apply (recorded as skipped, without trying to build anything)."""
    if impl == "cp_core":
        return None
    if strategy != "hidden" or path != "fused" or chunks != 1:
        return f"not applicable: impl {impl} runs once per case, under strategy hidden / path fused / overlap_chunks 1"
    if impl == "nemo" and layout != "head_tail":
        return "not applicable: NeMo AutoModel's module always undoes the head-tail (DualChunkSwap) order"
    if impl == "mamba_ssm" and cp_size > 1:
        return "not applicable: mamba-ssm's Mamba2 has no context parallelism (cp 1 only)"
    return None


def build_peer(impl: str, ours: nn.Module, cp_group, device, dtype) -> nn.Module:
    """A peer layer with ``ours``' weights; ``forward(x, cu_seqlens=None)`` like :class:`Mamba2Mixer`."""
    if impl == "mamba_ssm":
        return _MambaSSMPeer(ours, device, dtype)
    if impl == "nemo":
        return _NemoPeer(ours, cp_group, device, dtype)
    raise ValueError(f"unknown impl {impl!r}; known: {IMPLS}")


def _seq_idx(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Global document id of every token (as NeMo builds it: searchsorted over cu_seqlens[1:], right=True)."""
    pos = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(pos.dtype), pos, right=True).unsqueeze(0).to(torch.int32)


class _MambaSSMPeer(nn.Module):
    def __init__(self, ours, device, dtype):
        super().__init__()
        c = ours.config
        if c.d_inner % c.d_model:
            raise PeerUnavailable(
                f"mamba-ssm's Mamba2 needs d_inner a multiple of d_model (expand), got {c.d_inner}"
            )
        _fused_kernel()
        Mamba2 = _mamba_module(
            "mamba_ssm.modules.mamba2"
        ).Mamba2  # (an import error, e.g. huggingface_hub missing, is a skip)
        self.cp_size = ours.cp_size
        self.layer = Mamba2(
            d_model=c.d_model, d_state=c.d_state, d_conv=c.d_conv, expand=c.d_inner // c.d_model,
            headdim=c.head_dim, ngroups=c.n_groups, D_has_hdim=c.D_has_hdim, rmsnorm=True,
            norm_before_gate=False, chunk_size=c.chunk_size, use_mem_eff_path=True, device=device, dtype=dtype,
        )  # fmt: skip
        self.layer.load_state_dict(ours.state_dict(), strict=True)
        self.backends = {"impl": "mamba_ssm"}

    def forward(self, x, cu_seqlens=None):
        if cu_seqlens is None:
            return self.layer(x)
        y = self.layer(x.unsqueeze(0), seq_idx=_seq_idx(cu_seqlens, x.shape[0]))
        return y.squeeze(0)


class _NemoPeer(nn.Module):
    """NeMo AutoModel's Nemotron-H Mamba training path (see the module docstring)."""

    def __init__(self, ours, cp_group, device, dtype):
        super().__init__()
        c = ours.config
        self.config, self.cp_size = c, ours.cp_size
        self.kernel = _fused_kernel()
        self.rmsnorm_fn = _mamba_module("mamba_ssm.ops.triton.layernorm_gated").rmsnorm_fn
        self.in_proj = nn.Linear(c.d_model, c.d_in_proj, bias=False, device=device, dtype=dtype)
        self.conv1d = nn.Conv1d(
            c.conv_dim,
            c.conv_dim,
            c.d_conv,
            groups=c.conv_dim,
            padding=c.d_conv - 1,
            device=device,
            dtype=dtype,
        )
        self.dt_bias = nn.Parameter(torch.empty(c.n_heads, device=device, dtype=dtype))
        self.A_log = nn.Parameter(torch.empty(c.n_heads, device=device, dtype=dtype))
        self.D = nn.Parameter(
            torch.empty(c.d_inner if c.D_has_hdim else c.n_heads, device=device, dtype=dtype)
        )
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.empty(c.d_inner, device=device, dtype=dtype))
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=False, device=device, dtype=dtype)
        self.load_state_dict(ours.state_dict(), strict=True)
        self.cp = None
        if self.cp_size > 1:
            try:
                cp_mod = importlib.import_module(_NEMO_CP)
            except Exception as e:
                raise PeerUnavailable(
                    f"NeMo AutoModel's context-parallel module does not import ({type(e).__name__}: {e}); "
                    "pip install --no-deps nemo-automodel==0.7.0"
                ) from None
            self.cp = cp_mod.MambaContextParallel(
                cp_group, c.n_heads, c.head_dim, c.n_groups, c.d_state, self
            )
        self.backends = {"impl": "nemo"}

    def forward(self, x, cu_seqlens=None):
        c = self.config
        packed = cu_seqlens is not None
        h = x.unsqueeze(0) if packed else x
        seq_idx = _seq_idx(cu_seqlens, x.shape[0] * self.cp_size) if packed else None
        zxbcdt = self.in_proj(h)
        if self.cp is None:
            out = self.kernel(
                zxbcdt, self.conv1d.weight.squeeze(1), self.conv1d.bias, self.dt_bias, -torch.exp(self.A_log.float()),
                D=self.D, chunk_size=c.chunk_size, seq_idx=seq_idx, activation="silu", rmsnorm_weight=self.norm.weight,
                rmsnorm_eps=c.norm_eps, outproj_weight=self.out_proj.weight, outproj_bias=None, headdim=c.head_dim,
                ngroups=c.n_groups, norm_before_gate=False,
            )  # fmt: skip
            return out.squeeze(0) if packed else out
        cp = self.cp
        p = zxbcdt.squeeze(0) if packed else zxbcdt
        p = cp.pre_conv_ssm(p, cu_seqlens=cu_seqlens if packed else None)
        if packed:
            p = p.unsqueeze(0).contiguous()
        y = self.kernel(
            p, cp.get_conv1d_weight(), cp.get_conv1d_bias(), cp.get_dt_bias(), -torch.exp(cp.get_A_log().float()),
            D=cp.get_D(), chunk_size=c.chunk_size, seq_idx=seq_idx, activation="silu", rmsnorm_weight=None,
            outproj_weight=None, headdim=c.head_dim, ngroups=cp.n_groups_local, norm_before_gate=False,
        )  # fmt: skip
        if y.ndim == 4:
            y = y.reshape(y.shape[0], y.shape[1], -1)
        if packed:
            y = y.squeeze(0)
        y = cp.post_conv_ssm(y, cu_seqlens=cu_seqlens if packed else None)
        y = self.rmsnorm_fn(
            x=y, weight=self.norm.weight, bias=None, z=None, eps=c.norm_eps, group_size=c.d_inner // c.n_groups,
            norm_before_gate=False,
        )  # fmt: skip
        return self.out_proj(y)
