"""What NVTX ranges cost per layer, on one GPU: the layer's fwd+bwd with its regions as NVTX ranges and
without (CUDA events for the GPU time, ``time.perf_counter`` for the host's time to queue it).

    python3 scripts/nvtx_cost.py [--cp 1,2] [--seq-len 8192,32768] [--iters 30] [--out CSV]

Variants, interleaved round by round (each round runs every variant once, in a rotated order):

``off``    no hook and no NVTX: what a layer costs in training without a profiler (the default);
``nvtx``   ``cp_core.regions.set_nvtx("cp_core:")``: every region an NVTX push/pop (a library user's
           opt-in);
``timer``  cpbench's region timer with ``nvtx=True`` (what ``--profile nsys`` adds), not timing.

At cp > 1 the layer is rank 0's work of the fake backend (``LocalGroup``). Run it plainly (no tool
attached: what NVTX costs when nobody listens) and under ``nsys profile`` (what recording costs).
Medians of ``--iters`` rounds after ``--warmup``; the layer of ``scenarios/long_context.toml``, bf16.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cp_core import regions  # noqa: E402
from cpbench import runner  # noqa: E402
from cpbench.scenario import load_scenario  # noqa: E402
from cpbench.timing import RegionTimer, installed  # noqa: E402


class _Count:
    def __init__(self):
        self.n = 0

    def __call__(self, name):
        self.n += 1
        return regions._NULL


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cp", default="1,2")
    ap.add_argument("--seq-len", default="8192,32768")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--scenario", default="long_context", help="the layer (and dtype) of this scenario")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only checks the script (no NVTX there)")
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("nvtx_cost: error: it measures a GPU layer and no CUDA device is visible", file=sys.stderr)
        return 2
    from cp_core.comm import LocalGroup

    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for cp in (int(v) for v in a.cp.split(",")):
        for L in (int(v) for v in a.seq_len.split(",")):
            s = load_scenario(
                "long_context", [f"sweep.cp_size=[{cp}]", f"sweep.seq_len=[{L}]", 'sweep.pass=["fwd+bwd"]']
            )
            case = s.cases()[0]
            ctx = runner.RankContext(device=dev, group=LocalGroup(0, cp) if cp > 1 else None)
            p = runner.setup_case(s, case, ctx)

            def step(p=p):
                out = p.mixer(p.x)
                out.backward(p.grad)
                p.x.grad = None
                for q in p.mixer.parameters():
                    q.grad = None

            count = _Count()
            with installed(count):
                step()
            sync()
            timer = RegionTimer(dev, nvtx=cuda)
            names = ["off", "nvtx", "timer"] if cuda else ["off", "timer"]
            samples = {k: ([], []) for k in names}
            for r in range(a.warmup + a.iters):
                k = r % len(names)
                for v in names[k:] + names[:k]:
                    prev_hook = regions.set_region_hook(timer if v == "timer" else None)
                    prev_nvtx = regions.set_nvtx("cp_core:" if v == "nvtx" else None)
                    sync()
                    if cuda:
                        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        e0.record()
                    t0 = time.perf_counter()
                    step()
                    host = (time.perf_counter() - t0) * 1e3
                    if cuda:
                        e1.record()
                        e1.synchronize()
                    regions.set_region_hook(prev_hook)
                    regions.set_nvtx(prev_nvtx)
                    if r >= a.warmup:
                        samples[v][0].append(e0.elapsed_time(e1) if cuda else host)
                        samples[v][1].append(host)
            base_gpu = statistics.median(samples["off"][0])
            base_host = statistics.median(samples["off"][1])
            for v in names:
                g, h = statistics.median(samples[v][0]), statistics.median(samples[v][1])
                rows.append(dict(
                    cp=cp, seq_len=L, variant=v, ranges=count.n if v != "off" else 0, gpu_ms=g, host_ms=h,
                    gpu_delta_us=(g - base_gpu) * 1e3, host_delta_us=(h - base_host) * 1e3,
                    gpu_delta_pct=(g / base_gpu - 1) * 100,
                ))  # fmt: skip
                print(rows[-1], flush=True)
            del p
            if cuda:
                torch.cuda.empty_cache()
    import pandas as pd

    df = pd.DataFrame(rows)
    print(
        f"# {torch.cuda.get_device_name(dev) if cuda else 'cpu'}; medians of {a.iters} rounds after {a.warmup}; CUDA events (GPU)"
    )
    print(df.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if a.out:
        df.to_csv(a.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
