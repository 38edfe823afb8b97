import torch, triton
from cp_core.channels import mamba_channel_plan, ChannelPlan, pack_torch, unpack_torch
from cp_core.kernels import gather_triton as g
from triton.testing import do_bench
for wz in (True, False):
    p = mamba_channel_plan(8, 128, 64, 8, 128, with_z=wz)
    x = torch.randn(16384, p.in_width, device="cuda", dtype=torch.bfloat16)
    nb = x.numel() * 2 * 2
    for name, f in (("triton", g.pack), ("torch", pack_torch)):
        ms = do_bench(lambda: f(x, p), warmup=25, rep=100, return_mode="median")
        print(f"pack with_z={wz} {name}: {ms:.3f} ms {nb / ms / 1e9:.0f} GB/s")
    s = g.pack(x, p)
    idx = torch.randperm(s.shape[0] * s.shape[1], device="cuda")
    ms = do_bench(lambda: s.view(-1, p.local_width).index_select(0, idx), warmup=25, rep=100, return_mode="median")
    print(f"row gather: {ms:.3f} ms {nb / ms / 1e9:.0f} GB/s")
    ms = do_bench(lambda: g.unpack(s, p), warmup=25, rep=100, return_mode="median")
    ms2 = do_bench(lambda: unpack_torch(s, p), warmup=25, rep=100, return_mode="median")
    print(f"unpack triton {ms:.3f} torch {ms2:.3f}")
