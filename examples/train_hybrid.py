"""Training a tiny hybrid stack with context parallelism: 4 gloo ranks on the CPU, (dp 2) x (cp 2).

    python examples/train_hybrid.py                          # spawns 4 gloo ranks itself
    torchrun --nproc-per-node 4 examples/train_hybrid.py     # or let torchrun start them

The model: token embedding, a Mamba2 block, a causal attention block whose CP all-gathers K/V, a second
Mamba2 block, a norm and the output head. What a training step needs, and this script does:

* a ``("dp", "cp")`` DeviceMesh; each Mamba2 layer takes ``mesh["cp"]`` as its CP group;
* every rank holds a head-tail shard of its data-parallel row (``cp_core.layout.shard``);
* FSDP2 over the flattened ``dp x cp`` mesh, so every gradient is reduced over both (the CP ranks hold
  replicas of the same parameters, whose gradients are partial sums), with a local-mean loss (FSDP averages
  over the 4 ranks: the gradient of the global mean);
* bf16 autocast, non-reentrant activation checkpointing of every block, SGD with momentum;
* ``cp_core.replicas.watch_replicas``: the CP ranks must stay replicas (a ValueError otherwise).

Every rank checks that its losses and the final parameters equal a single-process run of the same model
on the whole batch within the bf16 bound (twice the distance of that single-process run in bf16 from the
same run in fp32; ``--fp32``: no autocast, fp32 rounding). Then the common mistake: the same training with
FSDP over ``mesh["dp"]`` alone; the CP replicas drift after the first step and the replica check says so on
every rank (``--no-mistake`` skips it). ``--hsdp``: HSDP on the 2-D mesh (sharded over cp, replicated over
dp), which reduces over both too.
"""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cp_core import comm
from cp_core.layout import positions, shard
from cp_core.mixer import Mamba2Config, Mamba2Mixer
from cp_core.replicas import watch_replicas

CFG = Mamba2Config(d_model=32, n_heads=4, head_dim=8, n_groups=2, d_state=8, chunk_size=8)
VOCAB, SEQ, DP, CP, STEPS = 64, 32, 2, 2, 3
AMP = torch.bfloat16  # None with --fp32


class CausalAttention(nn.Module):
    """Multi-head causal self-attention over a head-tail sequence shard: K and V are all-gathered over the
    CP group (``cp_core.comm.all_gather``: its backward sums their gradients back to the owner) and masked by
    the tokens' global positions (``cp_core.layout.positions``)."""

    def __init__(self, d: int, heads: int, cp_group=None):
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.heads, self.cp_group = heads, comm.resolve_group(cp_group)

    def forward(self, x):
        cp, r = comm.group_size(self.cp_group), comm.group_rank(self.cp_group)
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        pos = positions(
            cp, "head_tail", length=n * cp, device=x.device
        )  # [cp, n]: global index of each token
        if cp > 1:  # [cp, b, h, n, hd] -> [b, h, cp*n, hd], keys in rank-major order, as pos.view(-1)
            k, v = (comm.all_gather(t.contiguous(), self.cp_group) for t in (k, v))
            k, v = (t.permute(1, 2, 0, 3, 4).reshape(b, self.heads, cp * n, -1) for t in (k, v))
        mask = pos.view(1, -1) <= pos[r].view(-1, 1)  # [n, cp*n]: key position <= query position
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):  # fp32 statistics, the result in the input's dtype
        h = x.float()
        return (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


class Block(nn.Module):
    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.norm, self.mixer = RMSNorm(CFG.d_model), mixer

    def forward(self, x):
        y = self.mixer(self.norm(x))
        y += x  # the residual, in place (the layer's output is a tensor of its own)
        return y


class HybridLM(nn.Module):
    def __init__(self, cp_group=None):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, CFG.d_model)
        self.blocks = nn.ModuleList(
            [
                Block(Mamba2Mixer(CFG, cp_group=cp_group)),
                Block(CausalAttention(CFG.d_model, 4, cp_group)),
                Block(Mamba2Mixer(CFG, cp_group=cp_group)),
            ]
        )
        self.norm, self.head = RMSNorm(CFG.d_model), nn.Linear(CFG.d_model, VOCAB, bias=False)
        gen = torch.Generator().manual_seed(0)  # the same weights on every rank and in the reference
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.1) + (p.dim() == 1))
        for blk in self.blocks:
            if isinstance(blk.mixer, Mamba2Mixer):
                blk.mixer.reset_parameters(gen)

    def forward(self, tokens, ckpt: bool = False):
        h = self.embed(tokens)
        for blk in self.blocks:
            h = checkpoint(blk, h, use_reentrant=False) if ckpt else blk(h)
        return self.head(self.norm(h))


def batches():
    """STEPS global batches of DP rows: (tokens, next-token targets), [DP, SEQ] each."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        t = torch.randint(0, VOCAB, (DP, SEQ + 1), generator=gen)
        yield t[:, :-1], t[:, 1:]


def train(model, shard_of, opt, amp: bool = True):
    losses = []
    for tokens, targets in batches():
        tokens, targets = shard_of(tokens), shard_of(targets)
        with torch.autocast("cpu", dtype=AMP or torch.float32, enabled=amp and AMP is not None):
            logits = model(tokens, ckpt=True)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())  # this rank's token mean
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


def make_opt(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


@torch.no_grad()
def errors(losses, ref_losses, params, ref) -> tuple[float, float]:
    """The largest relative loss error, and the largest parameter error relative to how far the steps moved
    that parameter."""
    loss_err = float(((losses - ref_losses).abs() / ref_losses).max())
    start = HybridLM()
    param_err = max(
        float((params[n] - p).norm() / (p - start.get_parameter(n)).norm()) for n, p in ref.named_parameters()
    )
    return loss_err, param_err


def sharded_model(mesh, fsdp_mesh):
    """The model with its CP group, every block an FSDP unit over ``fsdp_mesh``, its replicas watched."""
    from torch.distributed.fsdp import fully_shard

    model = HybridLM(cp_group=mesh["cp"])
    for blk in model.blocks:
        fully_shard(blk, mesh=fsdp_mesh)
        watch_replicas(blk, mesh["cp"])  # in forward, where FSDP has the block's parameters whole
    fully_shard(model, mesh=fsdp_mesh)
    return model


def main(hsdp: bool = False, mistake: bool = True) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (DP, CP), mesh_dim_names=("dp", "cp"))
    dp_rank, cp_rank, rank = mesh.get_local_rank("dp"), mesh.get_local_rank("cp"), dist.get_rank()

    def shard_of(t):  # this rank's data-parallel row, its head-tail shard of the sequence
        return shard(t[dp_rank : dp_rank + 1], cp_rank, CP, "head_tail")

    # FSDP over every rank that holds a replica: the flattened dp x cp mesh (or HSDP on the 2-D mesh:
    # replicated over dp, sharded over cp)
    model = sharded_model(mesh, mesh if hsdp else mesh["dp", "cp"]._flatten("dp_cp"))
    losses = train(model, shard_of, make_opt(model))
    # the global mean loss of each step: the mean of the ranks' token means (equal token counts)
    dist.all_reduce(losses)
    losses /= DP * CP
    params = {n: p.full_tensor() for n, p in model.named_parameters()}

    ref = HybridLM()  # one process, the whole batch, the same steps
    ref_losses = train(ref, lambda t: t, make_opt(ref))
    loss_err, param_err = errors(losses, ref_losses, params, ref)
    # the bf16 bound: how far the same single-process run in bf16 lands from it in fp32 (twice that: the two
    # bf16 runs round independently); without autocast, fp32 rounding
    loss_bound, param_bound = 1e-6, 1e-4
    if AMP is not None:
        ref32 = HybridLM()
        losses32 = train(ref32, lambda t: t, make_opt(ref32), amp=False)
        b = errors(ref_losses, losses32, {n: p.detach() for n, p in ref.named_parameters()}, ref32)
        loss_bound, param_bound = 2 * b[0], 2 * b[1]
    ok = loss_err <= loss_bound and param_err <= param_bound
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    print(
        f"rank {rank} (dp {dp_rank}, cp {cp_rank}): losses {[round(v, 4) for v in losses.tolist()]}, "
        f"single process {[round(v, 4) for v in ref_losses.tolist()]}; loss error {loss_err:.1e} (bound "
        f"{loss_bound:.1e}), parameter error {param_err:.1e} of the update (bound {param_bound:.1e}): "
        f"{'match' if flag.item() else 'MISMATCH'}",
        flush=True,
    )

    if mistake:  # the common mistake: FSDP over the dp dimension alone; the CP replicas drift apart
        model = sharded_model(mesh, mesh["dp"])
        try:
            train(model, shard_of, make_opt(model))
            print(f"rank {rank}: FSDP over mesh['dp'] alone: not caught", flush=True)
        except ValueError as e:
            print(f"rank {rank}: FSDP over mesh['dp'] alone, replica check: {e}", flush=True)
    dist.destroy_process_group()
    if not flag.item():
        raise SystemExit(1)


def _spawned(rank: int, world: int, port: int, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    run(args)


def run(args) -> None:
    global AMP
    AMP = None if args.fp32 else AMP
    main(args.hsdp, not args.no_mistake)


def spawn(args) -> None:
    """Start DP * CP local gloo ranks running :func:`main` with the command line's ``args``."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(DP * CP, port, args), nprocs=DP * CP)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-mistake", action="store_true", help="skip the FSDP-over-dp-only demonstration")
    ap.add_argument("--hsdp", action="store_true", help="HSDP on the 2-D mesh instead of the flattened mesh")
    ap.add_argument("--fp32", action="store_true", help="no autocast (the run then matches to fp32 rounding)")
    args = ap.parse_args()
    if "RANK" in os.environ:
        run(args)
    else:
        spawn(args)
