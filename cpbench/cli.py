"""The ``cpbench`` command line.

::

    cpbench sweep [SCENARIO] [--out DIR] [--nproc N] [--backend gloo|nccl|fake] [--fake-busbw GBPS]
                  [--topology NxG] [--net-busbw GBPS] [--set TABLE.KEY=VALUE ...] [--profile nsys|torch] [--exec] [--dry-run] [--no-progress]
                  [--no-resource-check]
    cpbench report RESULTS [--group-by COLS] [--metrics COLS] [--vs IMPL] [--format text|markdown|json]
    cpbench plot RESULTS [--out DIR]
    cpbench compare BASELINE [BASELINE ...] NEW [--threshold 5%] [--alpha 0.05] [--z 10] [--run-noise 20%]
                    [--min-shift 15%] [--only-changed] [--metric COL ...] [--ignore COLS]
                    [--allow-missing] [--allow-extra] [--allow-unreadable] [--format text|markdown|json]
    cpbench nsys-import REPORT.nsys-rep|CSV [--csv OUT]
    cpbench trace TRACE.json [--min-gap-ms MS] [--top N]
    cpbench scenarios

``SCENARIO`` is a TOML file (schema: :mod:`cpbench.scenario`) or the name of a scenario shipped in
the package (``smoke``, ``packing``, ``heads``, ``long_context``, ``h100_node``); without one, the
embedded ``smoke`` runs on the CPU over gloo in well under a minute.

``RESULTS`` is a results folder or its ``results.csv``. The results-folder policy, the resource guard
and compare's noise test are stated in ``cpbench sweep --help`` / ``cpbench compare --help``
(:mod:`cpbench.rundir`, :mod:`cpbench.guard`, :mod:`cpbench.compare`).

Exit codes: 0 success; 1 a case errored (sweep), the compare gate failed, a failed run, or a
report of a run with no finished case; 2 a user error (bad scenario, flag, path or CSV, a scenario
that does not fit the machine: one line on stderr, no traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import UserError

SWEEP_HELP = """\
Results folder: a run never writes over another. --out must be a new or empty folder; one
holding results.csv or meta.json is refused (exit 2). Without --out the folder is
results/<scenario>-<YYYYmmdd-HHMMSS> (-2, -3... if taken). The sweep locks its folder while it
runs (a second sweep on it is refused); meta.json says running/complete/aborted/interrupted/
failed, and a run killed outright is marked killed the next time report, plot or compare reads it.

Resources: before any rank starts, the ranks are checked against the machine: at most one CPU
rank per core, one rank per GPU, and the estimated memory of the largest case (parameters,
activations, SSD states; per rank) times the local ranks against the available RAM (CPU) or GPU
memory. A scenario that cannot fit is refused with the estimate; --no-resource-check runs it
anyway. Ctrl-C stops every rank; a rank killed by the kernel's out-of-memory killer is named so.
"""

FORMATS = ("text", "markdown", "json")

COMPARE_HELP = """\
Each side is one run or several runs of the same code: several baseline folders (BASELINE ...
NEW), or a folder of run folders for either side (base/ holding base/1, base/2 ...). A side's
value per case is the geometric mean over its runs.

Load-normalised: where every run of both sides has ref_ms (a fixed load reference timed just
before and after the layer in every iteration, cpbench.runner.LoadReference), time metrics are
judged as metric / ref_ms, per run and per iteration sample: load from other processes divides
out. Otherwise (no ref_ms in some run, or --no-load-ref) raw times; the output says which. The noise comes from the baseline runs and
each side's own samples, never from how NEW differs from OLD: a regression cannot widen its own
bar. A case regresses only when all hold:

  1. minimum effect: the change is worse than --threshold (default 5%);
  2. its own samples: NEW's per-iteration samples are worse than the baseline's (one-sided
     Mann-Whitney U at --alpha, default 0.05; files without samples: the change exceeds half
     the sum of the IQRs);
  3. run to run, either
     (a) the case alone: its log(new/old) less NEW's whole-run shift exceeds --z (default 10)
         times sigma sqrt(1/k + 1/m), k and m the runs per side, sigma how far one case moves
         against the rest of its run between the baseline runs (1.4826 * MAD, pooled); or
     (b) the run as a whole: NEW's shift (median log(new/old) over all cases) exceeds
         --min-shift (default 8% load-normalised, 15% raw) plus the one-sided 1 - alpha prediction bound of a run's
         shift from the baseline runs (Student's t, k - 1 degrees of freedom, times the SD of
         their own shifts, times sqrt(1/k + 1/m)).
     One baseline run cannot measure either spread: --run-noise (default 20%) stands in for
     both and the output says so.

Changes failing 2 or 3 are shown as noise. Improvements mirror this; ok -> error is a
regression. Impossible values (a time, rate, bandwidth or memory <= 0, a nan or inf cell, a
sample <= 0) are errors. On a shared machine take 3 baseline runs interleaved with the new one:
on the 2-core CPU under induced load (results/cpu-compare-gate-20261202, 20 trials, load average
up to 4.7), load-normalised, 3 baseline runs gave 0/20 false positives and missed 5/20, 0/20, 0/20
slowdowns of 1.2x, 1.5x, 2x (raw: 0/20; 15/20, 12/20, 8/20); the 8% minimum was chosen on these runs.

Exit codes: 0 the gate passes; 1 it fails: a regression, or coverage (cases of OLD absent or no
longer ok in NEW, cases only in NEW, metric cells that are not numbers: --allow-missing /
--allow-extra / --allow-unreadable); 2 unreadable, impossible or incomparable inputs.
--format json prints {"gate": "pass"|"fail", "exit_code", "failures", "metrics", "cases": [...]}.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cpbench", description="Benchmark context-parallel Mamba2 layers (cp_core)."
    )
    p.add_argument("--version", action="version", version=f"cpbench {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "sweep",
        help="run a scenario's sweep and write results.csv + meta.json",
        description=SWEEP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("scenario", nargs="?", help="scenario TOML file or embedded name (default: smoke)")
    s.add_argument(
        "--out",
        type=Path,
        help="a new or empty results folder (default: results/<scenario>-<YYYYmmdd-HHMMSS>)",
    )
    s.add_argument(
        "--nproc", type=int, help="local ranks to spawn (default: the largest cp_size); not under torchrun"
    )
    s.add_argument(
        "--backend",
        choices=("auto", "gloo", "nccl", "fake"),
        help="process-group backend, or fake: one process, modeled communication (= --set run.backend=...)",
    )
    s.add_argument(
        "--fake-busbw",
        type=float,
        metavar="GBPS",
        help="busbw of the fake backend's model, GB/s (default 370, NVLink4 H100); inside a node under --topology",
    )
    s.add_argument(
        "--topology",
        metavar="NxG",
        help="fake backend: N nodes of G GPUs, each collective modeled on the links it crosses (= --set run.topology=NxG)",
    )
    s.add_argument(
        "--net-busbw",
        type=float,
        metavar="GBPS",
        help="under --topology: bandwidth per GPU across nodes, GB/s (default 50)",
    )
    s.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="TABLE.KEY=VALUE",
        help="override a scenario value, parsed as TOML (repeatable): --set sweep.cp_size=[1,2]",
    )
    s.add_argument(
        "--profile",
        choices=("nsys", "torch"),
        help="profile the measured iterations: torch writes a trace per case; nsys prints the nsys command "
        "that profiles this sweep and stops (run it, or add --exec)",
    )
    s.add_argument(
        "--exec",
        dest="exec_",
        action="store_true",
        help="with --profile nsys: become the printed nsys command (nsys must be on PATH)",
    )
    s.add_argument("--dry-run", action="store_true", help="list the cases (and why some would be skipped)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    s.add_argument(
        "--no-resource-check",
        action="store_true",
        help="start the ranks even when they exceed the machine's cores, GPUs or memory",
    )

    r = sub.add_parser("report", help="render a run's results as tables; exit 1 when no case finished")
    r.add_argument("csv", type=Path, metavar="RESULTS", help="results folder or its results.csv")
    r.add_argument(
        "--group-by", nargs="+", action="extend", metavar="COLS", help="one table per value of these columns"
    )
    r.add_argument("--metrics", nargs="+", action="extend", metavar="COLS", help="columns to show")
    r.add_argument(
        "--vs",
        nargs="+",
        action="extend",
        metavar="IMPL",
        choices=("nemo", "mamba_ssm", "cp_core"),
        help="also a table of every case's time and peak memory as a ratio to this peer's same case",
    )
    r.add_argument("--format", choices=FORMATS, default="text", help="text (default), markdown or json")

    pl = sub.add_parser("plot", help="PNG figures of a run's results")
    pl.add_argument("csv", type=Path, metavar="RESULTS", help="results folder or its results.csv")
    pl.add_argument("--out", type=Path, help="folder for the PNGs (default: <results folder>/plots)")

    c = sub.add_parser(
        "compare",
        help="compare runs case by case; exit 1 on a regression or lost coverage",
        description=COMPARE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument(
        "runs",
        nargs="+",
        type=Path,
        metavar="RUN",
        help="BASELINE [BASELINE ...] NEW: results folders (or results.csv); the last one is NEW; "
        "any of them may be a folder of run folders (repeats of one side)",
    )
    c.add_argument(
        "--threshold", default="5%", help="minimum effect: relative change that counts (default 5%%)"
    )
    c.add_argument(
        "--alpha",
        type=float,
        default=0.05,
        help="significance of the per-case samples test (one-sided Mann-Whitney U; default 0.05)",
    )
    c.add_argument(
        "--z",
        type=float,
        default=10.0,
        metavar="Z",
        help="a case alone counts past Z times the run-to-run spread (default 10)",
    )
    c.add_argument(
        "--run-noise",
        default=None,
        metavar="PCT",
        help="run-to-run noise assumed when one baseline run cannot measure it (default 20%%)",
    )
    c.add_argument(
        "--min-shift",
        default=None,
        metavar="PCT",
        help="the whole run counts past this median change plus the baseline runs' own spread (default 8%% "
        "load-normalised, 15%% raw)",
    )
    c.add_argument(
        "--no-load-ref",
        action="store_true",
        help="judge raw times even where every run has ref_ms (the rule without the load reference)",
    )
    c.add_argument("--only-changed", action="store_true", help="show only regressions, improvements, noise")
    c.add_argument(
        "--metric", nargs="+", action="extend", metavar="COL", help="metric column(s) (default layer_ms)"
    )
    c.add_argument(
        "--ignore",
        action="append",
        metavar="COLS",
        help="key columns left out of the join (e.g. scenario,device)",
    )
    c.add_argument("--allow-missing", action="store_true", help="cases of OLD absent or not ok in NEW pass")
    c.add_argument("--allow-extra", action="store_true", help="cases only in NEW pass")
    c.add_argument("--allow-unreadable", action="store_true", help="metric cells that are not numbers pass")
    c.add_argument("--format", choices=FORMATS, default="text", help="text (default), markdown or json")

    n = sub.add_parser("nsys-import", help="region columns from an nsys report or nvtx_gpu_proj_sum CSV")
    n.add_argument("report", type=Path)
    n.add_argument("--csv", type=Path, help="also write the columns as a one-row CSV")

    tr = sub.add_parser(
        "trace",
        help="a --profile torch trace: communication/computation overlap (HTA's definition) and where the "
        "compute stream waits",
    )
    tr.add_argument("trace", type=Path, help="a chrome trace (OUT/traces/caseNNNN-rankR.json)")
    tr.add_argument("--min-gap-ms", type=float, default=0.05, help="shortest gap listed (default 0.05)")
    tr.add_argument("--top", type=int, default=25, help="longest gaps printed (default 25)")

    sub.add_parser("scenarios", help="list the scenarios shipped in the package")
    return p


# ----------------------------------------------------------------------------------------------- sweep


def _sweep(args) -> int:
    from .launcher import LaunchOptions, launch, under_torchrun
    from .scenario import load_scenario

    overrides = list(args.overrides)
    if args.backend:
        overrides.append(f'run.backend="{args.backend}"')
    if args.fake_busbw is not None:
        overrides.append(f"run.fake_busbw_gbps={args.fake_busbw!r}")
    if args.topology is not None:
        overrides.append(f"run.topology={args.topology!r}")
    if args.net_busbw is not None:
        overrides.append(f"run.net_busbw_gbps={args.net_busbw!r}")
    scenario = load_scenario(args.scenario, overrides)
    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    if args.exec_ and args.profile != "nsys":
        raise UserError("--exec goes with --profile nsys")
    if args.dry_run:
        return _dry_run(scenario, args)
    if args.profile == "nsys":
        code = _nsys(scenario, args)
        if code is not None:
            return code
    command = ["cpbench", *args.argv]
    opts = LaunchOptions(
        out_dir=args.out,
        nproc=args.nproc,
        backend=None,
        profile=args.profile,
        progress=not args.no_progress,
        command=command,
        resource_check=not args.no_resource_check,
    )
    if under_torchrun() and args.nproc is not None:
        if args.nproc != int(os.environ["WORLD_SIZE"]):
            raise UserError(
                f"--nproc {args.nproc} contradicts torchrun's WORLD_SIZE={os.environ['WORLD_SIZE']}"
            )
    return launch(scenario, opts)


def _dry_run(scenario, args) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    if scenario.run.backend == "fake":
        world = None
    elif "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
    else:
        world = args.nproc or max(scenario.sweep.cp_size)
    t = Table(
        title=f"{scenario.name}: {len(scenario.cases())} cases (world size {world or 'fake'})",
        title_justify="left",
    )
    for col in ("case", "description", "runs?"):
        t.add_column(col)
    for case in scenario.cases():
        reason = case.skip_reason(world)
        runs = "yes" if reason is None else f"skipped: {reason}"
        t.add_row(str(case.index), Text(case.describe()), Text(runs))  # Text: "[nemo]" is not markup
    Console().print(t)
    return 0


def _nsys(scenario, args) -> int | None:
    """Under the nsys command: ``None`` (run the sweep, profiled). Else print that command and stop
    (exit 0), or with --exec become it; the results folder is checked (and made) first, so that the
    command runs as printed."""
    import torch

    from . import nsys, rundir
    from .launcher import under_torchrun
    from .results import default_out_dir

    if nsys.under_nsys():
        return None
    if args.exec_ and under_torchrun():  # every rank says so, before any of them starts
        raise UserError("--exec cannot re-launch ranks started by torchrun: run the printed command instead")
    rank0 = os.environ.get("RANK", "0") == "0"
    out = args.out or default_out_dir(scenario.name)
    sweep_args = ["sweep"] + ([args.scenario] if args.scenario else [])
    sweep_args += ["--out", str(out), "--profile", "nsys"]
    for o in args.overrides:
        sweep_args += ["--set", o]
    if args.backend:
        sweep_args += ["--backend", args.backend]
    if args.fake_busbw is not None:
        sweep_args += ["--fake-busbw", repr(args.fake_busbw)]
    if args.topology is not None:
        sweep_args += ["--topology", args.topology]
    if args.net_busbw is not None:
        sweep_args += ["--net-busbw", repr(args.net_busbw)]
    if args.nproc:
        sweep_args += ["--nproc", str(args.nproc)]
    if args.no_progress:
        sweep_args += ["--no-progress"]
    if args.no_resource_check:
        sweep_args += ["--no-resource-check"]
    if under_torchrun():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        nodes = max(1, int(os.environ["WORLD_SIZE"]) // local)
        launcher = ["torchrun", "--nproc-per-node", str(local)]
        if nodes > 1:
            launcher += ["--nnodes", str(nodes), "<rendezvous flags as launched>"]
        program = [*launcher, "-m", "cpbench", *sweep_args]
    else:
        program = [sys.executable, "-m", "cpbench", *sweep_args]
    n_cases = sum(c.skip_reason(None) is None for c in scenario.cases())
    cmd = nsys.profile_command(Path(out), program, n_cases)
    if not rank0:
        return 0  # rank 0 prints the command
    rundir.prepare_out_dir(out, "--out" if args.out else "results folder").release()  # nsys writes there
    if args.exec_:
        nsys.exec_under_nsys(cmd)
    print("cpbench: to capture the measured iterations with Nsight Systems, run:", file=sys.stderr)
    print(nsys.format_command(cmd), flush=True)
    if not torch.cuda.is_available():
        print("cpbench: note: no CUDA device here: run it on the GPU machine", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------- the others


def _report(args) -> int:
    from .report import render, split_list
    from .results import numeric_columns, read_results
    from .rundir import results_csv, run_status_line, why_no_rows

    path = results_csv(args.csv)
    df = read_results(path)
    if not len(df):
        print(f"cpbench: error: {why_no_rows(path)}", file=sys.stderr)
        return 1
    numeric_columns(df, path)
    render(
        df,
        group_by=split_list(args.group_by),
        metrics=split_list(args.metrics) or None,
        vs=args.vs or (),
        fmt=args.format,
        status=run_status_line(path.parent),
    )
    return 0 if "status" not in df.columns or (df["status"] == "ok").any() else 1


def _plot(args) -> int:
    from .plot import plot_all
    from .results import numeric_columns, read_results
    from .rundir import prepare_plot_dir, results_csv, why_no_rows

    path = results_csv(args.csv)
    df = read_results(path)
    if not len(df):
        print(f"cpbench: error: {why_no_rows(path)}", file=sys.stderr)
        return 1
    numeric_columns(df, path)
    out = prepare_plot_dir(args.out or path.parent / "plots", "--out" if args.out else "plots folder")
    files = plot_all(df, out)
    if not files:
        print("cpbench: nothing to plot (no ok case with timings)", file=sys.stderr)
        return 0
    for f in files:
        print(f)
    return 0


def _compare(args) -> int:
    from . import compare
    from .report import split_list
    from .results import read_results
    from .rundir import run_csvs

    if len(args.runs) < 2:
        raise UserError("compare needs a baseline and a new run: cpbench compare BASELINE [BASELINE ...] NEW")
    threshold = compare.parse_threshold(args.threshold)
    run_noise = None if args.run_noise is None else compare.parse_threshold(args.run_noise, "--run-noise")
    min_shift = None if args.min_shift is None else compare.parse_threshold(args.min_shift, "--min-shift")
    if not 0 < args.alpha < 1:
        raise UserError(f"--alpha {args.alpha}: must be in (0, 1)")
    if not (args.z >= 0 and math.isfinite(args.z)):
        raise UserError(f"--z {args.z}: must be a non-negative number")
    old_csvs = [c for p in args.runs[:-1] for c in run_csvs(p)]
    new_csvs = run_csvs(args.runs[-1])
    cmp = compare.compare(
        [read_results(c) for c in old_csvs],
        [read_results(c) for c in new_csvs],
        metrics=split_list(args.metric) or ["layer_ms"],
        threshold=threshold,
        ignore=split_list(args.ignore),
        names=([_run_name(c) for c in old_csvs], [_run_name(c) for c in new_csvs]),
        alpha=args.alpha,
        z=args.z,
        run_noise=run_noise,
        min_shift=min_shift,
        load_ref=not args.no_load_ref,
    )
    failures = cmp.failures(
        allow_missing=args.allow_missing, allow_extra=args.allow_extra, allow_unreadable=args.allow_unreadable
    )
    compare.render(cmp, only_changed=args.only_changed, failures=failures, fmt=args.format)
    return 1 if failures else 0


def _run_name(csv: Path) -> str:
    """A run's name in the output: its folder (the CSV itself when it is not called results.csv)."""
    return str(csv.parent) if csv.name == "results.csv" else str(csv)


def _nsys_import(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from . import nsys
    from .results import ResultsWriter

    cols = nsys.import_report(args.report)
    t = Table(
        title=f"{args.report}: {cols.get('iterations', 0):g} iterations (GPU-projected NVTX ranges)",
        title_justify="left",
    )
    t.add_column("region")
    t.add_column("ms / iteration", justify="right")
    t.add_column("instances / iteration", justify="right")
    for k, v in cols.items():
        if k.endswith("_ms"):
            name = k[:-3]
            t.add_row(name, f"{v:.3f}", f"{cols.get(name + '_count', float('nan')):g}")
    Console().print(t)
    if args.csv:
        w = ResultsWriter(args.csv, columns=list(cols))
        w.append(cols)
    return 0


def _trace(args) -> int:
    from . import trace

    if not args.trace.is_file():
        raise UserError(f"no trace file {args.trace}")
    try:
        kernels = trace.load(args.trace)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{args.trace} is not a chrome trace: {e}") from None
    print(trace.summary(kernels, args.min_gap_ms, args.top))
    return 0


def _scenarios(args) -> int:
    from .scenario import embedded_scenarios, load_scenario

    for path in embedded_scenarios():
        s = load_scenario(str(path))
        print(f"{path.stem:14s} {len(s.cases()):4d} cases  {s.description}")
    return 0


def _warning(message, category, filename, lineno, file=None, line=None):
    print(f"cpbench: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    warnings.showwarning = _warning
    handlers = {
        "sweep": _sweep,
        "report": _report,
        "plot": _plot,
        "compare": _compare,
        "nsys-import": _nsys_import,
        "trace": _trace,
        "scenarios": _scenarios,
    }
    try:
        return handlers[args.command](args)
    except UserError as e:
        print(f"cpbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cpbench: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`cpbench report ... | head`): no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush at exit would raise again
        return 0
