"""Tables of a results CSV (pandas -> rich), the same at the end of a sweep and in ``cpbench report``.

One unit per kind of column, whatever the column: times in ms (``*_ms``), bandwidths in GB/s
(``*_GBps``, GB = 1e9 B), bytes in MB (``*_bytes``, MB = 1e6 B), memory in GiB, throughput in
millions of real tokens per second (``tokens_per_s`` shown as ``Mtok/s``).

The key columns that are the same on every row go into the title; those that vary are the first
columns. Rows whose communication was modeled (``comm_model`` other than ``measured``, the fake
backend) get a ``*`` on every cell that depends on the model, and a footnote says what the model
was. Skipped cases and errors are listed under the table with their reasons.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UserError
from .scenario import CASE_KEY

DEFAULT_METRICS = (
    "layer_ms",
    "layer_iqr_ms",
    "comm_ms",
    "comm_wait_ms",
    "busbw_GBps",
    "bench_busbw_GBps",
    "busbw_pct",
    "tokens_per_s",
    "peak_mem_GiB",
)
#: Columns whose value depends on the communication model when it is modeled.
MODELED = ("layer", "comm", "algbw", "busbw", "tokens_per_s", "a2a_", "state_xchg", "layer_fwd", "layer_bwd")
LIMIT_LISTED = 25


def _fmt_number(col: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if not isinstance(v, int | float):
        return str(v)
    if col == "tokens_per_s":
        return f"{v / 1e6:.3f}"
    if col.endswith("_ms"):
        return f"{v:.2e}" if 0 < abs(v) < 0.001 else f"{v:.3f}"
    if col.endswith("_GBps"):
        return f"{v:.1f}" if abs(v) >= 1 or v == 0 else f"{v:.3g}"
    if col.endswith("_pct"):
        return f"{v:.0f}%"
    if col.endswith("_bytes"):
        return f"{v / 1e6:.2f}"
    if col.endswith("_GiB"):
        return f"{v:.2f}"
    if col == "density" or col == "real_density":
        return f"{v:g}"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def header(col: str) -> str:
    if col == "tokens_per_s":
        return "Mtok/s"
    for suffix, unit in (
        ("_ms", "ms"),
        ("_GBps", "GB/s"),
        ("_pct", "% bench"),
        ("_bytes", "MB"),
        ("_GiB", "GiB"),
    ):
        if col.endswith(suffix):
            return f"{col[: -len(suffix)]} {unit}".replace("_", " ")
    return col


def is_modeled_column(col: str) -> bool:
    if col.startswith("bench"):
        return False
    return any(col == m or col.startswith(m) for m in MODELED) and not col.endswith("_bytes")


def _check_columns(df, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise UserError(
            f"{what}: unknown column(s) {', '.join(missing)}; available: {', '.join(map(str, df.columns))}"
        )


def split_list(values: Sequence[str] | None) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]`` (flags take both forms)."""
    out: list[str] = []
    for v in values or ():
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


def _describe(row) -> str:
    return (
        f"case {int(row['case']) if 'case' in row and _present(row['case']) else '?'} "
        f"cp={row['cp_size']} L={row['seq_len']} B={row['batch']} heads={row['n_heads']}/{row['n_groups']} "
        f"{row['packing']} {row['layout']} {row['path']} {row['pass']} {row['strategy']}"
    )


def _present(v) -> bool:
    return not (v is None or (isinstance(v, float) and math.isnan(v)) or v == "")


def tables(df, group_by: Sequence[str] = (), metrics: Sequence[str] | None = None, title: str | None = None):
    """``(heading, tables, notes)``: the constant keys, rich Tables of the ok rows (one per group), footnotes."""
    from rich.table import Table

    group_by = list(group_by)
    metrics = list(metrics) if metrics else [m for m in DEFAULT_METRICS if m in df.columns]
    _check_columns(df, group_by, "--group-by")
    _check_columns(df, metrics, "--metrics")
    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    if "case" in ok.columns:
        ok = ok.sort_values("case", kind="stable")
    keys = [c for c in CASE_KEY if c in df.columns and c not in ("docs", "density")]
    varying = [c for c in keys if ok[c].nunique(dropna=False) > 1 and c not in group_by]
    constant = [c for c in keys if c not in varying and c not in group_by and len(ok) and c in ok.columns]
    if title:
        base_title = title
    elif len(ok):
        base_title = " · ".join(f"{c} {ok[c].iloc[0]}" for c in constant)
    else:
        base_title = ""
    modeled_label = ""
    if "comm_model" in ok.columns:
        labels = sorted({m for m in ok["comm_model"] if m and m != "measured"})
        modeled_label = ", ".join(labels)
    groups = [((), ok)] if not group_by else list(ok.groupby(group_by, sort=True, dropna=False))
    out = []
    for gkey, gdf in groups:
        gkey = gkey if isinstance(gkey, tuple) else (gkey,)
        t = ", ".join(f"{c}={v}" for c, v in zip(group_by, gkey, strict=True)) if group_by else None
        table = Table(title=t, title_justify="left", header_style="bold")
        for c in varying:
            table.add_column(
                c,
                justify="right"
                if c in ("cp_size", "seq_len", "batch", "n_heads", "n_groups", "world_size")
                else "left",
            )
        for m in metrics:
            table.add_column(header(m), justify="right")
        for _, row in gdf.iterrows():
            modeled = modeled_label and row.get("comm_model", "measured") not in ("measured", "")
            cells = [_fmt_number(c, row[c]) for c in varying]
            for m in metrics:
                s = _fmt_number(m, row[m])
                if modeled and is_modeled_column(m) and s != "-":
                    s += "*"
                cells.append(s)
            table.add_row(*cells)
        out.append(table)
    notes = []
    if "busbw_pct" in metrics and "busbw_pct" in ok.columns and (ok["busbw_pct"] > 100).any():
        notes.append(
            "busbw % bench above 100%: the layer's all-to-alls beat the all_to_all_single microbenchmark "
            "at the same sizes. The microbenchmark is a baseline, not a ceiling: on CPU (gloo) both are "
            "per-call latency and waiting for ranks that share cores, and a few back-to-back calls vary "
            "several-fold from run to run (compare bench busbw between runs)"
        )
    if "busbw_GBps" in metrics and "comm_wait_ms" in ok.columns and (ok["comm_wait_ms"] > 0).any():
        notes.append(
            "busbw: each collective timed from the last rank's entry (per iteration the fastest rank's time), "
            "as nccl-tests times ranks that start together; comm wait = comm - that: the slowest rank's "
            "time inside collectives waiting for the others (load imbalance)"
        )
    if modeled_label:
        notes.append(
            f"* modeled, not measured ({modeled_label}): communication time = bytes / algbw with "
            f"algbw = busbw * cp/(cp-1); layer time = measured compute + modeled communication"
        )
    return base_title, out, notes


def footer_lines(df) -> list[str]:
    lines = []
    if "status" not in df.columns:
        return lines
    for status, what in (("skipped", "skipped"), ("error", "errors")):
        sub = df[df["status"] == status]
        if not len(sub):
            continue
        lines.append(f"{what} ({len(sub)}):")
        for _, row in sub.head(LIMIT_LISTED).iterrows():
            lines.append(f"  {_describe(row)}: {row.get('error', '')}")
        if len(sub) > LIMIT_LISTED:
            lines.append(f"  ... {len(sub) - LIMIT_LISTED} more (see the error column of results.csv)")
    return lines


def make_console():
    """A rich Console; wide when the output is not a terminal (logs, pipes), so tables are not squeezed."""
    import os

    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=240)
    return console


#: Key columns that do not identify the work: a peer's row matches ours on every other key column.
_IMPL_COLS = ("impl", "overlap_chunks", "path", "strategy")


def peer_ratios(df, peer: str):
    """Every ok case against the same case run by ``peer`` (same key columns but ``impl``,
    ``overlap_chunks``, ``path`` and ``strategy``): time and peak memory as a ratio to the peer's.
    ``None`` when the results hold no case of that peer."""
    import pandas as pd

    if "impl" not in df.columns or "status" not in df.columns:
        return None
    ok = df[df["status"] == "ok"]
    ref = ok[ok["impl"] == peer]
    if ref.empty:
        return None
    keys = [c for c in CASE_KEY if c in df.columns and c not in _IMPL_COLS]
    ref = ref[[*keys, "layer_ms", "peak_mem_GiB"]].rename(
        columns={"layer_ms": f"{peer}_ms", "peak_mem_GiB": f"{peer}_GiB"}
    )
    ref = ref.drop_duplicates(subset=keys)
    m = ok.merge(ref, on=keys, how="inner")
    m = (
        m[~((m["impl"] == peer) & (m["overlap_chunks"] == 1))]
        if "overlap_chunks" in m
        else m[m["impl"] != peer]
    )
    if m.empty:
        return None
    out = pd.DataFrame(
        {
            "cp_size": m["cp_size"],
            "seq_len": m["seq_len"],
            "packing": m["packing"],
            "impl": m["impl"],
            "k": m.get("overlap_chunks", 1),
            "strategy": m["strategy"],
            "path": m["path"],
            "ms": m["layer_ms"],
            f"{peer} ms": m[f"{peer}_ms"],
            "time ratio": m["layer_ms"] / m[f"{peer}_ms"],
            "GiB": m["peak_mem_GiB"],
            f"{peer} GiB": m[f"{peer}_GiB"],
            "memory ratio": m["peak_mem_GiB"] / m[f"{peer}_GiB"],
        }
    )
    return out.sort_values(["cp_size", "packing", "seq_len", "impl", "k"]).reset_index(drop=True)


def overlap_table(df):
    """Exposed communication of the hidden strategy against the unchunked layer of the same case
    (``overlap_chunks`` 1), when the results hold chunked runs; else ``None``."""
    need = {"overlap_chunks", "exposed_comm_ms", "comm_ms", "layer_ms"}
    if not need <= set(df.columns) or "status" not in df.columns:
        return None
    ok = df[(df["status"] == "ok") & (df.get("impl", "cp_core") == "cp_core") & (df["cp_size"] > 1)]
    ok = ok[ok["strategy"] == "hidden"] if "strategy" in ok else ok
    if ok.empty or ok["overlap_chunks"].nunique() < 2:
        return None
    keys = [c for c in CASE_KEY if c in df.columns and c not in ("overlap_chunks",)]
    base = ok[ok["overlap_chunks"] == 1][[*keys, "layer_ms", "exposed_comm_ms"]].rename(
        columns={"layer_ms": "k1_ms", "exposed_comm_ms": "k1_exposed_ms"}
    )
    m = ok.merge(base, on=keys, how="left")
    rows = []
    for r in m.itertuples(index=False):
        rows.append(
            {
                "cp_size": r.cp_size,
                "seq_len": r.seq_len,
                "packing": r.packing,
                "k": r.overlap_chunks,
                "layer ms": r.layer_ms,
                "vs k=1": r.layer_ms / r.k1_ms,
                "comm ms": r.comm_ms,
                "exposed ms": r.exposed_comm_ms,
                "exposed vs k=1": r.exposed_comm_ms / r.k1_exposed_ms,
                "overlap %": getattr(r, "overlap_pct", math.nan),
            }
        )
        if math.isfinite(
            getattr(r, "trace_overlap_pct", math.nan)
        ):  # --profile torch: HTA's, and the idle time
            rows[-1]["overlap % (trace)"] = r.trace_overlap_pct
            rows[-1]["idle ms (trace)"] = r.trace_idle_ms
    import pandas as pd

    return pd.DataFrame(rows).sort_values(["cp_size", "packing", "seq_len", "k"]).reset_index(drop=True)


#: Key columns that do not change a cp 1 run (no context parallelism there) or name the launch.
_SCALING_FREE = ("cp_size", "overlap_chunks", "layout", "strategy", "world_size", "backend")


def scaling_table(df):
    """Every ok cp > 1 case against the same case (same implementation) at cp 1: the layer time over
    cp 1's time / cp, 1.000 being perfect scaling (the cp 1 time shared out with nothing added); ``None``
    when the results hold no such pair."""
    import pandas as pd

    need = {"cp_size", "layer_ms", "status"}
    if not need <= set(df.columns):
        return None
    ok = df[df["status"] == "ok"]
    ref = ok[ok["cp_size"] == 1]
    if ref.empty or not (ok["cp_size"] > 1).any():
        return None
    keys = [c for c in CASE_KEY if c in df.columns and c not in _SCALING_FREE]
    ref = ref[[*keys, "layer_ms"]].rename(columns={"layer_ms": "cp1_ms"}).drop_duplicates(subset=keys)
    m = ok[ok["cp_size"] > 1].merge(ref, on=keys, how="inner")
    if m.empty:
        return None
    ideal = m["cp1_ms"] / m["cp_size"]
    out = pd.DataFrame(
        {
            "cp_size": m["cp_size"],
            "seq_len": m["seq_len"],
            "packing": m["packing"],
            "impl": m.get("impl", "cp_core"),
            "strategy": m["strategy"],
            "k": m.get("overlap_chunks", 1),
            "layer ms": m["layer_ms"],
            "cp 1 ms": m["cp1_ms"],
            "cp 1 / cp ms": ideal,
            "vs cp 1 / cp": m["layer_ms"] / ideal,
        }
    )
    return out.sort_values(["impl", "strategy", "packing", "seq_len", "cp_size", "k"]).reset_index(drop=True)


def _frame_table(frame, title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in frame.columns:
        t.add_column(str(col), justify="right")
    for row in frame.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float):
                cells.append("-" if math.isnan(v) else (f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"))
            else:
                cells.append(str(v))
        t.add_row(*cells)
    return t


def render(df, *, group_by=(), metrics=None, console=None, title: str | None = None, vs=()) -> None:
    console = console or make_console()
    head, tbls, notes = tables(df, group_by=group_by, metrics=metrics, title=title)
    n_ok = int((df["status"] == "ok").sum()) if "status" in df.columns else len(df)
    if n_ok:
        if head:
            console.print(head, highlight=False, markup=False)
        for t in tbls:
            console.print(t)
    else:
        console.print("no case ran (see below)")
    for n in notes:
        console.print(n, highlight=False)
    for line in footer_lines(df):
        console.print(line, highlight=False, markup=False)
    for peer in vs:
        ratios = peer_ratios(df, peer)
        if ratios is None:
            console.print(f"no case of impl {peer!r} in these results: no ratios to it", highlight=False)
        else:
            console.print(_frame_table(ratios, f"time and peak memory as a ratio to {peer} (same case)"))
    ov = overlap_table(df)
    if ov is not None:
        console.print(
            _frame_table(
                ov, "overlap: exposed communication (layer - layer with collectives suppressed) vs k"
            )
        )
    sc = scaling_table(df)
    if sc is not None:
        console.print(
            _frame_table(sc, "scaling: layer time against the same case's cp 1 time / cp (1.000: perfect)")
        )
    cross = strategy_crossover(df)
    if cross is not None:
        from rich.table import Table

        t = Table(title="bytes per layer forward, per rank (collective sizes): hidden vs state passing")
        for col in cross.columns:
            t.add_column(col, justify="right")
        for row in cross.itertuples(index=False):
            t.add_row(*[_crossover_cell(c, v) for c, v in zip(cross.columns, row, strict=True)])
        console.print(t)


def _crossover_cell(col: str, v) -> str:
    """MB with 3 significant digits (small shapes move kB, not 0 MB), ratios as ratios, lengths whole."""
    if not isinstance(v, float):
        return str(v)
    if col.endswith("MB"):
        return f"{v:.3g}"
    if col == "ratio":
        return f"{v:.3g}"
    return f"{v:,.0f}"


def strategy_crossover(df):
    """Per (cp_size, state-passing strategy): bytes per layer forward of both strategies at the largest
    seq_len measured, and the crossover length where state passing becomes the cheaper one.

    Hidden-parallel bytes grow linearly with the tokens (``a2a`` of every token's channels); state
    passing moves a fixed amount per document piece, so the crossover is ``L* = sp_bytes / (hidden
    bytes per token)``, taken from the measured rows (BSHD rows only: packed rows depend on documents).
    Returns None when the CSV has no hidden and state-passing rows to compare."""
    need = {"strategy", "cp_size", "seq_len", "comm_bytes_fwd", "status"}
    if not need <= set(df.columns):
        return None
    ok = df[(df["status"] == "ok") & (df["cp_size"] > 1)]
    if "docs" in ok.columns:
        ok = ok[ok["docs"].fillna(0).astype(float) == 0]
    hid = ok[ok["strategy"] == "hidden"]
    others = sorted(set(ok["strategy"]) - {"hidden"})
    if hid.empty or not others:
        return None
    rows = []
    import pandas as pd

    for cp, h in hid.groupby("cp_size"):
        per_token = float((h["comm_bytes_fwd"] / (h["seq_len"] * h.get("batch", 1))).median())
        L = int(h["seq_len"].max())
        for strat in others:
            sp = ok[(ok["strategy"] == strat) & (ok["cp_size"] == cp)]
            if sp.empty:
                continue
            sp_bytes = float(sp["comm_bytes_fwd"].median())
            rows.append(
                {
                    "cp_size": int(cp),
                    "strategy": strat,
                    "seq_len": L,
                    "hidden MB": per_token * L / 1e6,
                    "state passing MB": sp_bytes / 1e6,
                    "ratio": per_token * L / sp_bytes,
                    "crossover seq_len": sp_bytes / per_token,
                }
            )
    if not rows:
        return None
    return pd.DataFrame(rows)


def print_sweep_summary(rows: list[dict], out_dir: Path) -> None:
    """The table at the end of a sweep, from the CSV just written (what ``cpbench report`` shows)."""
    from .results import read_results

    path = Path(out_dir) / "results.csv"
    console = make_console()
    if not rows:
        console.print(f"no cases; results: {path}")
        return
    df = read_results(path)
    render(df, console=console)
    counts = {s: int((df["status"] == s).sum()) for s in ("ok", "skipped", "error")}
    console.print(
        f"{counts['ok']} ok, {counts['skipped']} skipped, {counts['error']} error(s); results: {path}",
        highlight=False,
    )
