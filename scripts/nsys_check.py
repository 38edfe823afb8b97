"""Agreement of an Nsight Systems session with the CUDA-event region times of the same run.

    python3 scripts/nsys_check.py RUN_DIR [--plain DIR] [--tolerance 0.10] [--min-ms 0.2]

``RUN_DIR`` is the results folder of ``cpbench sweep ... --profile nsys`` (its ``results.csv``) holding,
per captured case (``--capture-range-end=repeat``: one report per case, in the order the cases ran),
either the report (``cpbench[.N].nsys-rep``: nsys must be on PATH or in ``CPBENCH_NSYS``) or its
exports ``nvtx_gpu_proj_sum[.N].csv`` and ``cuda_gpu_kern_sum[.N].csv``; and, optionally,
``torch_kernels.csv`` (``case,name,count,iterations``: the kernels of the same case's measured
iterations under ``torch.profiler``, from ``--profile torch``). Per case it prints

* every region: the GPU-projected time nsys gives it (mean per iteration) against the CUDA-event time
  of the same iterations (median and min), and whether they agree within ``--tolerance``
  (regions under ``--min-ms`` are shown, not judged; ``layer_bwd`` has no GPU ops on its range's
  thread: autograd launches the backward's kernels from its own thread);
* the kernels per iteration nsys recorded against torch.profiler's, by name where they differ.

``--plain DIR``: also the same case's CUDA-event times from a run without any profiler (what nsys
costs). Exit 1 when a judged region or the kernel count disagrees.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import Counter
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpbench import nsys  # noqa: E402
from cpbench.errors import UserError  # noqa: E402


def _index(p: Path) -> int:
    m = re.search(r"\.(\d+)\.[^.]+$", p.name)
    return int(m.group(1)) if m else 1


def case_exports(run: Path, report: str) -> list[str]:
    """The ``report`` export of every captured case, in capture order (exported here if only the
    ``.nsys-rep`` files are there)."""
    csvs = sorted(run.glob(f"{report}*.csv"), key=_index)
    if csvs:
        return [p.read_text() for p in csvs]
    reps = sorted(run.glob("cpbench*.nsys-rep"), key=_index)
    return [nsys.stats_csv(p, report) for p in reps]


def _fmt(v: float) -> str:
    return "-" if v != v else f"{v:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--plain", type=Path, help="the same cases run without a profiler")
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--min-ms", type=float, default=0.2)
    a = ap.parse_args(argv)
    try:
        df = pd.read_csv(a.run / "results.csv")
        ok = df[df["status"] == "ok"].reset_index(drop=True)
        proj = case_exports(a.run, "nvtx_gpu_proj_sum")
        kern = case_exports(a.run, "cuda_gpu_kern_sum")
    except (OSError, UserError) as e:
        print(f"nsys_check: error: {e}", file=sys.stderr)
        return 2
    if len(proj) != len(ok):
        print(f"nsys_check: error: {len(proj)} capture(s) for {len(ok)} case(s) that ran", file=sys.stderr)
        return 2
    plain = None
    if a.plain is not None:
        p = pd.read_csv(a.plain / "results.csv")
        plain = p[p["status"] == "ok"].reset_index(drop=True)
    torch_k = None
    tk = a.run / "torch_kernels.csv"
    if tk.exists():
        torch_k = pd.read_csv(tk)
    bad = 0
    for i, row in ok.iterrows():
        row = row.to_dict()
        cols = nsys.to_region_columns(nsys.parse_nvtx_gpu_proj_sum(proj[i], f"capture {i + 1}"))
        iters = cols.get("iterations", 0) or float("nan")
        print(f"\ncase {int(row['case'])} ({row.get('scenario', '')}: cp {row['cp_size']} L {row['seq_len']} "
              f"k {row.get('overlap_chunks', 1)} {row['pass']}), {iters:g} iterations in the capture "
              f"(results.csv: {row['iters']})")  # fmt: skip
        head = f"{'region':16s} {'nsys ms':>9s} {'events med':>10s} {'events min':>10s} {'nsys/ev':>8s}"
        head += f" {'plain med':>9s}" if plain is not None else ""
        print(head + "  verdict")
        for reg, ns, ev, evmin, ratio, verdict in nsys.agreement(cols, row, a.tolerance, a.min_ms):
            line = f"{reg:16s} {_fmt(ns):>9s} {_fmt(ev):>10s} {_fmt(evmin):>10s} {_fmt(ratio):>8s}"
            if plain is not None:
                line += f" {_fmt(float(plain.loc[i].get(f'{reg}_ms', math.nan))):>9s}"
            print(line + f"  {verdict}")
            bad += verdict == "DIFF"
        if iters != iters or int(iters) != int(row["iters"]):
            print(f"  capture holds {iters:g} iterations, the run measured {row['iters']}: DIFF")
            bad += 1
        if i < len(kern) and torch_k is not None:
            nk = Counter()
            for name, n in nsys.parse_kern_sum(kern[i], f"capture {i + 1}").items():
                nk[nsys.short_kernel(name)] += n
            tc = torch_k[torch_k["case"] == row["case"]]
            titers = int(tc["iterations"].iloc[0]) if len(tc) else 0
            if titers < 1:  # a trace without iteration ranges: its counts are no per-iteration figure
                print(
                    "kernels per iteration: torch.profiler's counts name no iterations (0): not compared  DIFF"
                )
                bad += 1
                continue
            tkc = Counter()
            for _, r in tc.iterrows():
                tkc[nsys.short_kernel(str(r["name"]))] += int(r["count"])
            n_ns, n_t = sum(nk.values()) / iters, sum(tkc.values()) / titers
            verdict = "ok" if abs(n_ns - n_t) < 0.5 else "DIFF"
            print(f"kernels per iteration: nsys {n_ns:g}, torch.profiler {n_t:g}  {verdict}")
            bad += verdict == "DIFF"
            for name in sorted(set(nk) | set(tkc)):
                a_, b_ = nk[name] / iters, tkc[name] / titers
                if abs(a_ - b_) >= 0.5:
                    print(f"  {name[:70]:70s} nsys {a_:6g}  torch {b_:6g}")
    print(f"\n{bad} disagreement(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
