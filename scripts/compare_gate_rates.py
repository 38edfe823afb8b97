"""False positives and false negatives of ``cpbench compare`` at its defaults, from real runs.

    python3 scripts/compare_gate_rates.py --trials 10 --runs RUNS_DIR --out results/SET
    python3 scripts/compare_gate_rates.py --runs RUNS_DIR --out results/SET --evaluate-only

Each trial runs, back to back and interleaved, ``--baselines`` sweeps of the unchanged code (``B1``,
``B2``, ...), one more of the unchanged code (``same``) and one per ``--factors`` value with the layer
slowed by that factor (``CPBENCH_SLOWDOWN``, :mod:`cpbench.runner`):
``B1, same, B2, x1.2, B3, x1.5, x2`` for three baselines. Every run is ``python3 -m cpbench sweep
[SCENARIO] --set ...`` (default: the embedded smoke scenario as ``cpbench sweep`` runs it), with the
machine's load average recorded before it.

Then every trial's NEW runs are compared with 1, 2 and 3 of its baselines by ``cpbench compare B...
NEW --format json`` at the gate's defaults: a failing gate on ``same`` is a false positive, a passing
gate on a slowed run a false negative. Writes ``OUT/gate_trials.csv`` (one row per trial, baseline
count and NEW run: the gate's verdict, regressions, the measured run-to-run noise, the whole-run
shift), ``OUT/gate_rates.md`` (the table) and ``OUT/runs.csv`` (every run: when it ended, the 1-, 5-
and 15-minute load averages just before it started, its wall time). Raw runs stay in RUNS_DIR.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


def sweep(out: Path, factor: float, scenario: str | None, overrides: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CPBENCH_SLOWDOWN", None)
    if factor != 1.0:
        env["CPBENCH_SLOWDOWN"] = repr(factor)
    cmd = [sys.executable, "-m", "cpbench", "sweep", *([scenario] if scenario else []), "--out", str(out)]
    cmd += ["--no-progress", *[a for o in overrides for a in ("--set", o)]]
    load = _load()
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"sweep failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return {
        "run": out.name,
        "factor": factor,
        "end": time.strftime("%H:%M:%S"),
        "load": load,
        "wall_s": round(wall, 1),
    }


def order(n_base: int, factors: list[float]) -> list[tuple[str, float]]:
    """``B1, same, B2, x1.2, B3, x1.5, x2``: the new runs placed between the baselines."""
    news = [("same", 1.0)] + [(f"x{f:g}", f) for f in factors]
    out, i = [], 0
    for b in range(n_base):
        out.append((f"B{b + 1}", 1.0))
        if i < len(news):
            out.append(news[i])
            i += 1
    return out + news[i:]


def compare(baselines: list[Path], new: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "cpbench", "compare", *map(str, baselines), str(new), "--format", "json"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if res.returncode not in (0, 1):
        raise SystemExit(f"compare failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr}")
    return json.loads(res.stdout)


def evaluate(runs: Path, out: Path, n_base: int, factors: list[float]) -> None:
    trials = sorted(p for p in runs.iterdir() if p.is_dir() and p.name.startswith("t"))
    rows = []
    for t in trials:
        news = ["same"] + [f"x{f:g}" for f in factors]
        for k in range(1, n_base + 1):
            base = [t / f"B{b + 1}" for b in range(k)]
            for nm in news:
                if not (t / nm / "results.csv").is_file() or not all(
                    (b / "results.csv").is_file() for b in base
                ):
                    continue
                j = compare(base, t / nm)
                m = j["metrics"]["layer_ms"]
                by = {}
                for c in j["cases"]:
                    if c["verdict"] == "regressed":
                        why = (
                            "whole run" if "whole run" in (c["note"] or "") else "case alone"
                        )  # or ok -> error
                        by[why] = by.get(why, 0) + 1
                rows.append(
                    {
                        "trial": t.name,
                        "baselines": k,
                        "new": nm,
                        "gate": j["gate"],
                        "regressions": j["regressions"],
                        "by_case_alone": by.get("case alone", 0),
                        "by_whole_run": by.get("whole run", 0),
                        "cases": m["cases"],
                        "run_noise": m["run_noise"],
                        "shift_noise": m["shift_noise"],
                        "run_noise_measured": m["run_noise_measured"],
                        "case_bar": m["case_bar"],
                        "shift": m["shift"],
                        "shift_bar": m["shift_bar"],
                    }
                )
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "gate_trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = [
        "| baseline runs | NEW | trials | gate fails | meaning | rate |",
        "| ---: | --- | ---: | ---: | --- | ---: |",
    ]
    for k in range(1, n_base + 1):
        for nm in ["same"] + [f"x{f:g}" for f in factors]:
            sel = [r for r in rows if r["baselines"] == k and r["new"] == nm]
            if not sel:
                continue
            fails = sum(r["gate"] == "fail" for r in sel)
            if nm == "same":
                lines.append(
                    f"| {k} | same code | {len(sel)} | {fails} | false positives | {fails}/{len(sel)} |"
                )
            else:
                missed = len(sel) - fails
                lines.append(
                    f"| {k} | slowed {nm} | {len(sel)} | {fails} | false negatives | {missed}/{len(sel)} |"
                )
    (out / "gate_rates.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--baselines", type=int, default=3)
    ap.add_argument("--factors", default="1.2,1.5,2")
    ap.add_argument("--scenario", default=None, help="scenario for cpbench sweep (default: smoke)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="passed to cpbench sweep")
    ap.add_argument("--runs", type=Path, required=True, help="folder for the raw runs (t01/B1, t01/same...)")
    ap.add_argument(
        "--out", type=Path, required=True, help="folder for gate_trials.csv, gate_rates.md, runs.csv"
    )
    ap.add_argument("--evaluate-only", action="store_true", help="compare the runs already in --runs")
    args = ap.parse_args()
    factors = [float(x) for x in args.factors.split(",") if x]
    if not args.evaluate_only:
        args.runs.mkdir(parents=True, exist_ok=True)
        log = []
        start = len([p for p in args.runs.iterdir() if p.name.startswith("t")])
        for t in range(start, start + args.trials):
            for name, factor in order(args.baselines, factors):
                rec = sweep(args.runs / f"t{t + 1:02d}" / name, factor, args.scenario, args.overrides)
                rec["trial"] = f"t{t + 1:02d}"
                log.append(rec)
                print(json.dumps(rec), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        new_file = not (args.out / "runs.csv").exists()
        with open(args.out / "runs.csv", "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["trial", "run", "factor", "end", "load", "wall_s"])
            if new_file:
                w.writeheader()
            w.writerows(log)
    evaluate(args.runs, args.out, args.baselines, factors)


if __name__ == "__main__":
    main()
