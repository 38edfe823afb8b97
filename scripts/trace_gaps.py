"""Where the compute stream waits: the idle gaps of the busiest CUDA stream in a torch profiler trace, and
what the other streams ran meanwhile (what exposed communication is made of).

    python3 scripts/trace_gaps.py OUT/traces/case0003-rank0.json [--min-gap-ms 0.05] [--top 25]

Reads the chrome trace that ``cpbench sweep --profile torch`` writes per case and rank. Prints, over the
whole trace: every stream's busy time, the compute stream's idle time split by what ran on the others,
and the longest gaps with the compute kernels on either side (so a gap can be put at its place in the
layer: before the SSD, after the last chunk, ...).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def _kernels(path: str):
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    out = []
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            stream = e.get("args", {}).get("stream", e.get("tid"))
            out.append((float(e["ts"]), float(e["ts"]) + float(e["dur"]), stream, e["name"]))
    return sorted(out)


def _short(name: str) -> str:
    for key in (
        "nccl",
        "Memcpy",
        "Memset",
        "barrier",
        "chunk_scan",
        "chunk_state",
        "state_passing",
        "bmm",
        "cumsum",
        "causal_conv1d",
        "rmsnorm",
        "layer_norm",
        "gemm",
        "sm90",
        "elementwise",
        "copy",
    ):
        if key.lower() in name.lower():
            return key
    return name[:40]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--min-gap-ms", type=float, default=0.05)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--list", default="", help="also list every kernel whose name holds this (absolute ms)")
    a = ap.parse_args()
    ks = _kernels(a.trace)
    if a.list:
        for t0, t1, s, name in ks:
            if a.list.lower() in name.lower():
                print(f"  {a.list} stream {s}: {t0 / 1e3:.3f} +{(t1 - t0) / 1e3:.3f} ms")
    busy = defaultdict(float)
    for t0, t1, s, _ in ks:
        busy[s] += t1 - t0
    main_s = max(busy, key=busy.get)
    span = (ks[-1][1] - ks[0][0]) / 1e3
    print(f"{len(ks)} GPU events over {span:.2f} ms; busy ms per stream (compute stream = {main_s}):")
    for s, b in sorted(busy.items(), key=lambda x: -x[1]):
        print(f"  stream {s}: {b / 1e3:.2f}")
    mains = [k for k in ks if k[2] == main_s]
    others = [k for k in ks if k[2] != main_s]
    gaps = []
    for prev, nxt in zip(mains, mains[1:], strict=False):
        g0, g1 = prev[1], nxt[0]
        if (g1 - g0) / 1e3 >= a.min_gap_ms:
            during = defaultdict(float)
            for t0, t1, _, name in others:
                lo, hi = max(t0, g0), min(t1, g1)
                if hi > lo:
                    during[_short(name)] += hi - lo
            gaps.append((g1 - g0, g0 - ks[0][0], _short(prev[3]), _short(nxt[3]), dict(during)))
    total = sum(g[0] for g in gaps) / 1e3
    by = defaultdict(float)
    for g in gaps:
        covered = sum(g[4].values())
        for k, v in g[4].items():
            by[k] += v
        by["(nothing on another stream)"] += max(0.0, g[0] - covered)
    print(
        f"compute stream idle in gaps >= {a.min_gap_ms} ms: {total:.2f} ms in {len(gaps)} gaps; beside them:"
    )
    for k, v in sorted(by.items(), key=lambda x: -x[1]):
        print(f"  {k}: {v / 1e3:.2f} ms")
    print(f"longest {a.top} gaps: ms, at ms, after -> before, what ran elsewhere (ms)")
    for g in sorted(gaps, key=lambda g: -g[0])[: a.top]:
        during = ", ".join(f"{k} {v / 1e3:.2f}" for k, v in sorted(g[4].items(), key=lambda x: -x[1]))
        print(f"  {g[0] / 1e3:6.2f} at {g[1] / 1e3:8.2f}  {g[2]} -> {g[3]}  [{during}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
