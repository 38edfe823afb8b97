"""False positives and false negatives of ``cpbench compare`` at its defaults, from real runs.

    python3 scripts/compare_gate_rates.py --trials 10 --runs RUNS_DIR --out results/SET [--load 4]
    python3 scripts/compare_gate_rates.py --runs RUNS_DIR --out results/SET --evaluate-only

Each trial runs, back to back and interleaved, ``--baselines`` sweeps of the unchanged code (``B1``,
``B2``, ...), one more of the unchanged code (``same``) and one per ``--factors`` value with the layer
slowed by that factor (``CPBENCH_SLOWDOWN``, :mod:`cpbench.runner`):
``B1, same, B2, x1.2, B3, x1.5, x2`` for three baselines. Every run is ``python3 -m cpbench sweep
[SCENARIO] --set ...`` (default: the embedded smoke scenario as ``cpbench sweep`` runs it), with the
machine's load average recorded before it.

``--load N`` adds load of its own while the trials run, as other jobs on a shared CI machine would:
N background processes (every other one a pure-Python spin, the rest a one-thread 384 x 384 torch
matmul loop), of which a random number from 0 to N runs at any time, drawn again every 0.5 to 4 s
(seeded by ``--load-seed``; the others are stopped with SIGSTOP); they end with the script.

Then every trial's NEW runs are compared with 1, 2 and 3 of its baselines by ``cpbench compare B...
NEW --format json`` at the gate's defaults, under both rules: ``load-normalised`` (the default where
the runs have ``ref_ms``: ``layer_ms / ref_ms``) and ``raw`` (``--no-load-ref``: the rule before the
load reference). A failing gate on ``same`` is a false positive, a passing gate on a slowed run a false
negative. Writes ``OUT/gate_trials.csv`` (one row per trial, baseline count, NEW run and rule: the
gate's verdict, regressions, the measured run-to-run noise, the whole-run shift), ``OUT/gate_rates.md``
(the table), ``OUT/runs.csv`` (every run: when it ended, the 1-, 5- and 15-minute load averages just
before it started, its wall time, the induced load's mean number of running processes during it) and,
with ``--load``, ``OUT/load.csv`` (every change of the induced load: time, processes running). Raw
runs stay in RUNS_DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


SPIN = "while True: pass"
MATMUL = "import torch\ntorch.set_num_threads(1)\na = torch.randn(384, 384)\nwhile True: a @ a"


class Load:
    """``n`` background processes, a random number of them (0..n) running at any time, drawn again every
    ``lo`` to ``hi`` seconds; the rest stopped (SIGSTOP). Ended (by pid) when the block ends."""

    def __init__(self, n: int, seed: int = 0, lo: float = 0.5, hi: float = 4.0):
        self.n, self.rng, self.lo, self.hi = n, random.Random(seed), lo, hi
        self.procs: list[subprocess.Popen] = []
        self.changes: list[tuple[float, int]] = []  # (time, processes running)
        self._stop = threading.Event()

    def __enter__(self) -> Load:
        for i in range(self.n):
            code = SPIN if i % 2 == 0 else MATMUL
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
        self._thread = threading.Thread(target=self._vary, daemon=True)
        self._thread.start()
        return self

    def _vary(self) -> None:
        while not self._stop.is_set():
            k = self.rng.randint(0, self.n)
            on = set(self.rng.sample(range(self.n), k))
            for i, p in enumerate(self.procs):
                os.kill(p.pid, signal.SIGCONT if i in on else signal.SIGSTOP)
            self.changes.append((time.time(), k))
            self._stop.wait(self.rng.uniform(self.lo, self.hi))

    def mean_running(self, t0: float, t1: float) -> float:
        """Time-weighted mean number of running processes between ``t0`` and ``t1``."""
        acc = 0.0
        for (a, k), (b, _) in zip(self.changes, [*self.changes[1:], (t1, 0)], strict=True):
            lo, hi = max(a, t0), min(b, t1)
            acc += k * max(0.0, hi - lo)
        return acc / (t1 - t0) if t1 > t0 else float("nan")

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for p in self.procs:
            os.kill(p.pid, signal.SIGCONT)
            p.terminate()
        for p in self.procs:
            p.wait()


def sweep(
    out: Path, factor: float, scenario: str | None, overrides: list[str], load: Load | None = None
) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CPBENCH_SLOWDOWN", None)
    if factor != 1.0:
        env["CPBENCH_SLOWDOWN"] = repr(factor)
    cmd = [sys.executable, "-m", "cpbench", "sweep", *([scenario] if scenario else []), "--out", str(out)]
    cmd += ["--no-progress", *[a for o in overrides for a in ("--set", o)]]
    loadavg = _load()
    t0, w0 = time.perf_counter(), time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"sweep failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return {
        "run": out.name,
        "factor": factor,
        "end": time.strftime("%H:%M:%S"),
        "load": loadavg,
        "wall_s": round(wall, 1),
        "induced": round(load.mean_running(w0, time.time()), 2) if load is not None else 0,
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


RULES = {"load-normalised": [], "raw": ["--no-load-ref"]}


def compare(baselines: list[Path], new: Path, rule: str) -> dict:
    """``cpbench compare B... NEW --format json`` (in this process: the same code as the command)."""
    sys.path.insert(0, str(REPO))
    from cpbench.cli import main as cpbench_main

    args = ["compare", *map(str, baselines), str(new), "--format", "json", *RULES[rule]]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cpbench_main(args)
    if rc not in (0, 1):
        raise SystemExit(f"compare failed ({rc}): cpbench {' '.join(args)}")
    return json.loads(out.getvalue())


def evaluate(runs: Path, out: Path, n_base: int, factors: list[float]) -> None:
    trials = sorted(p for p in runs.iterdir() if p.is_dir() and p.name.startswith("t"))
    rows = []
    for t in trials:
        news = ["same"] + [f"x{f:g}" for f in factors]
        for k in range(1, n_base + 1):
            base = [t / f"B{b + 1}" for b in range(k)]
            for nm, rule in ((nm, rule) for nm in news for rule in RULES):
                if not (t / nm / "results.csv").is_file() or not all(
                    (b / "results.csv").is_file() for b in base
                ):
                    continue
                j = compare(base, t / nm, rule)
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
                        "rule": rule,
                        "basis": m.get("basis", "raw"),
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
    news = ["same"] + [f"x{f:g}" for f in factors]
    head = " | ".join(
        ("same code: false positives" if nm == "same" else f"{nm}: false negatives") for nm in news
    )
    lines = [f"| rule | baseline runs | {head} |", "| --- | ---: |" + " ---: |" * len(news)]
    for rule in RULES:
        for k in range(1, n_base + 1):
            cells = []
            for nm in news:
                sel = [r for r in rows if r["baselines"] == k and r["new"] == nm and r["rule"] == rule]
                fails = sum(r["gate"] == "fail" for r in sel)
                bad = fails if nm == "same" else len(sel) - fails
                cells.append(f"{bad}/{len(sel)}" if sel else "-")
            if any(c != "-" for c in cells):
                lines.append(f"| {rule} | {k} | " + " | ".join(cells) + " |")
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
    ap.add_argument(
        "--load", type=int, default=0, metavar="N", help="induced load: N background processes, 0..N running"
    )
    ap.add_argument("--load-seed", type=int, default=0)
    args = ap.parse_args()
    factors = [float(x) for x in args.factors.split(",") if x]
    if not args.evaluate_only:
        args.runs.mkdir(parents=True, exist_ok=True)
        args.out.mkdir(parents=True, exist_ok=True)
        start = len([p for p in args.runs.iterdir() if p.name.startswith("t")])
        load = Load(args.load, seed=args.load_seed) if args.load else None
        # SIGTERM ends the script through its context managers (the load's processes end with it)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        fields = ["trial", "run", "factor", "end", "load", "wall_s", "induced"]
        new_file = not (args.out / "runs.csv").exists()
        with open(args.out / "runs.csv", "a", newline="") as f, load or contextlib.nullcontext():
            w = csv.DictWriter(f, fieldnames=fields)
            if new_file:
                w.writeheader()
            for t in range(start, start + args.trials):
                for name, factor in order(args.baselines, factors):
                    rec = sweep(
                        args.runs / f"t{t + 1:02d}" / name, factor, args.scenario, args.overrides, load
                    )
                    rec["trial"] = f"t{t + 1:02d}"
                    w.writerow({k: rec[k] for k in fields})
                    f.flush()
                    print(json.dumps(rec), flush=True)
        if load is not None:
            with open(args.out / "load.csv", "a", newline="") as f:
                w = csv.writer(f)
                w.writerow(["time", "running"])
                w.writerows((round(a, 2), k) for a, k in load.changes)
    evaluate(args.runs, args.out, args.baselines, factors)


if __name__ == "__main__":
    main()
