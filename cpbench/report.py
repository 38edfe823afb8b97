"""Tables of a results CSV (pandas -> rich), the same at the end of a sweep and in ``cpbench report``.

One unit per kind of column, whatever the column: times in ms (``*_ms``), bandwidths in GB/s
(``*_GBps``, GB = 1e9 B), bytes in MB (``*_bytes``, MB = 1e6 B), memory in GiB, throughput in
millions of real tokens per second (``tokens_per_s`` shown as ``Mtok/s``).

The key columns that are the same on every row go into the title; those that vary are the first
columns (in every table: the results, the scaling, the overlap and the peers). Default metrics with
no value in any row (peak memory on the CPU) are left out and named in a footnote. A table wider
than the console (``COLUMNS``; 240 when the output is not a terminal) is cut into several, each
repeating the key columns: no number is truncated. Rows whose communication was modeled
(``comm_model`` other than ``measured``, the fake backend) get a ``*`` on every cell that depends on
the model, and a footnote says what the model was. ``overlap_pct`` is blank for CPU rows (gloo's
collectives block the one stream; nothing overlaps), with the reason in a footnote. Skipped cases
and errors are listed under the table with their reasons.

``--format markdown`` prints the same tables as GitHub-flavoured Markdown (for a CI job to post);
``--format json`` the ok rows' key and metric values (numbers, ``null`` where empty), the notes, the
skipped and failed cases and the derived tables, for a script.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
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
    k = row.get("overlap_chunks", 1)
    return (
        f"case {int(row['case']) if 'case' in row and _present(row['case']) else '?'} "
        f"cp={row['cp_size']} L={row['seq_len']} B={row['batch']} heads={row['n_heads']}/{row['n_groups']} "
        f"{row['packing']} {row['layout']} {row['path']} {row['pass']} {row['strategy']}"
        + (f" k={_fmt_number('k', k)}" if _present(k) and k != 1 else "")
        + f" impl={row.get('impl', 'cp_core')}"
    )


def _present(v) -> bool:
    return not (v is None or (isinstance(v, float) and math.isnan(v)) or v == "")


NUMERIC_KEYS = ("cp_size", "seq_len", "batch", "n_heads", "n_groups", "world_size", "overlap_chunks")
#: Gap between two columns of a rendered table (box.SIMPLE_HEAD, collapsed padding, no edge).
GAP = 2
CPU_OVERLAP_NOTE = (
    "overlap %: blank on CPU: gloo's collectives block the one stream the layer runs on, so nothing "
    "overlaps; there, layer - layer with collectives suppressed is the communication plus noise and can "
    "exceed it (a negative 'overlap')"
)


@dataclass
class Grid:
    """A table as text cells, rendered to a console (rich), Markdown or split to fit a width."""

    title: str | None
    columns: list[str]
    right: list[bool]
    rows: list[list[str]] = field(default_factory=list)
    keys: int = 0  # the leading key columns, repeated in every part when the grid is split

    wrap: bool = True  # headers wrapped at words to the cells' width (False: on one line)

    def widths(self) -> list[int]:
        out = []
        for i, c in enumerate(self.columns):
            cells = [len(r[i]) for r in self.rows]
            if not self.wrap:
                out.append(max([*cells, len(c)]))
                continue
            words = [len(w) for w in c.split()] or [0]
            # a header wraps at words; one of many short words on lines of 7 ("vs cp 1 / cp" in two)
            out.append(max([*cells, max(words), min(len(c), 7) if len(words) > 3 else 0]))
        return out

    def width(self) -> int:
        return sum(self.widths()) + GAP * (len(self.columns) - 1)

    def split(self, width: int) -> list[Grid]:
        """Parts no wider than ``width``: the headers on one line where that fits, else wrapped at
        words, else as few parts as possible (metric columns in order, the key columns repeated)."""
        flat = Grid(self.title, self.columns, self.right, self.rows, self.keys, wrap=False)
        if flat.width() <= width:
            return [flat]
        w = self.widths()
        key_w = sum(w[: self.keys]) + GAP * self.keys
        parts, cur, used = [], [], key_w
        for i in range(self.keys, len(self.columns)):
            if cur and used + w[i] > width:
                parts.append(cur)
                cur, used = [], key_w
            cur.append(i)
            used += w[i] + GAP
        if cur or not parts:
            parts.append(cur)
        if len(parts) == 1:
            return [self]
        out = []
        for n, idx in enumerate(parts):
            cols = list(range(self.keys)) + idx
            title = f"{self.title or 'results'} ({n + 1}/{len(parts)})"
            out.append(
                Grid(
                    title,
                    [self.columns[i] for i in cols],
                    [self.right[i] for i in cols],
                    [[r[i] for i in cols] for r in self.rows],
                    self.keys,
                )
            )
        return out

    def rich(self):
        from rich import box
        from rich.table import Table

        t = Table(
            title=self.title,
            title_justify="left",
            header_style="bold",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            collapse_padding=True,
        )
        for c, r, w in zip(self.columns, self.right, self.widths(), strict=True):
            head = _wrap_header(c, w) if self.wrap else c
            t.add_column(head, justify="right" if r else "left", no_wrap=True, min_width=w)
        for row in self.rows:
            t.add_row(*row)
        return t

    def markdown(self) -> str:
        head = f"**{self.title}**\n\n" if self.title else ""
        return head + markdown_table(self.columns, self.rows, self.right)


def _wrap_header(text: str, width: int) -> str:
    """Header words on lines no longer than ``width`` (a word is never cut)."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "\n".join(lines)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""

    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cell(c) for c in columns) + " |"]
    out.append("|" + "|".join("---:" if r else "---" for r in right) + "|")
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def _cpu_row(row) -> bool:
    return str(row.get("device", "")) == "cpu"


def _metric_cell(row, m: str, modeled: bool) -> str:
    if m in ("overlap_pct", "trace_overlap_pct") and _cpu_row(row):
        return ""
    s = _fmt_number(m, row[m])
    if modeled and is_modeled_column(m) and s != "-":
        s += "*"
    return s


def _layout(df, group_by: Sequence[str] = (), metrics: Sequence[str] | None = None):
    """``(ok rows, varying keys, constant keys, metrics, dropped default metrics)``."""
    group_by = list(group_by)
    _check_columns(df, group_by, "--group-by")
    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    if "case" in ok.columns:
        ok = ok.sort_values("case", kind="stable")
    dropped: list[str] = []
    if metrics:
        metrics = list(metrics)
        _check_columns(df, metrics, "--metrics")
    else:
        metrics = []
        for m in DEFAULT_METRICS:
            if m not in df.columns:
                continue
            if len(ok) and ok[m].isna().all():
                dropped.append(m)
            else:
                metrics.append(m)
    keys = [c for c in CASE_KEY if c in df.columns and c not in ("docs", "density")]
    varying = [c for c in keys if ok[c].nunique(dropna=False) > 1 and c not in group_by]
    constant = [c for c in keys if c not in varying and c not in group_by and len(ok)]
    return ok, varying, constant, metrics, dropped


def grids(df, group_by: Sequence[str] = (), metrics: Sequence[str] | None = None, title: str | None = None):
    """``(heading, grids, notes)``: the constant keys, one Grid of the ok rows per group, footnotes."""
    group_by = list(group_by)
    ok, varying, constant, metrics, dropped = _layout(df, group_by, metrics)
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
        grid = Grid(
            t,
            [*varying, *[header(m) for m in metrics]],
            [c in NUMERIC_KEYS for c in varying] + [True] * len(metrics),
            keys=len(varying),
        )
        for _, row in gdf.iterrows():
            modeled = bool(modeled_label) and row.get("comm_model", "measured") not in ("measured", "")
            grid.rows.append(
                [_fmt_number(c, row[c]) for c in varying] + [_metric_cell(row, m, modeled) for m in metrics]
            )
        out.append(grid)
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
    if (
        any(m in ("overlap_pct", "trace_overlap_pct") for m in metrics)
        and "device" in ok
        and (ok["device"] == "cpu").any()
    ):
        notes.append(CPU_OVERLAP_NOTE)
    if dropped:
        notes.append(
            f"not measured in these results (no value in any row): {', '.join(header(m) for m in dropped)}"
        )
    if modeled_label and ":" in modeled_label:  # a topology (cpbench.topology)
        notes.append(
            f"* modeled, not measured ({modeled_label}: nodes x GPUs, GB/s inside a node / per GPU across nodes): "
            f"a collective of S bytes per rank over n nodes x g GPUs (c ranks) takes max(S (g-1)/c / node busbw, "
            f"S (c-g)/c / network), on the group it runs over; layer time = measured compute + modeled communication"
        )
    elif modeled_label:
        notes.append(
            f"* modeled, not measured ({modeled_label}): communication time = bytes / algbw with "
            f"algbw = busbw * cp/(cp-1); layer time = measured compute + modeled communication"
        )
    return base_title, out, notes


def tables(df, group_by: Sequence[str] = (), metrics: Sequence[str] | None = None, title: str | None = None):
    """``(heading, rich Tables, notes)`` (:func:`grids` rendered for a console)."""
    head, gs, notes = grids(df, group_by, metrics, title)
    return head, [g.rich() for g in gs], notes


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
#: Key columns of the derived tables, in display order (``overlap_chunks`` shown as ``k``).
_FRAME_KEYS = (
    "cp_size",
    "seq_len",
    "batch",
    "n_heads",
    "n_groups",
    "packing",
    "layout",
    "path",
    "pass",
    "strategy",
    "impl",
    "k",
    "dtype",
    "device",
    "world_size",
    "backend",
    "scenario",
)


def _key_frame(m, exclude=()) -> dict:
    """The case key columns of a merged frame, for a derived table (``overlap_chunks`` as ``k``)."""
    out = {}
    for c in _FRAME_KEYS:
        src = "overlap_chunks" if c == "k" else c
        if src in m.columns and c not in exclude:
            out[c] = m[src]
    return out


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
            **_key_frame(m),
            "ms": m["layer_ms"],
            f"{peer} ms": m[f"{peer}_ms"],
            "time ratio": m["layer_ms"] / m[f"{peer}_ms"],
            "GiB": m["peak_mem_GiB"],
            f"{peer} GiB": m[f"{peer}_GiB"],
            "memory ratio": m["peak_mem_GiB"] / m[f"{peer}_GiB"],
        }
    )
    if "k" not in out:
        out["k"] = 1
    return out.sort_values(["cp_size", "packing", "seq_len", "impl", "k"]).reset_index(drop=True)


def overlap_table(df):
    """Exposed communication of the hidden strategy against the unchunked layer of the same case
    (``overlap_chunks`` 1), when the results hold chunked runs; else ``None``."""
    import pandas as pd

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
    m = ok.merge(base, on=keys, how="left").reset_index(drop=True)
    nan = pd.Series([math.nan] * len(m))
    out = pd.DataFrame(
        {
            **_key_frame(m),
            "layer ms": m["layer_ms"],
            "vs k=1": m["layer_ms"] / m["k1_ms"],
            "comm ms": m["comm_ms"],
            "exposed ms": m["exposed_comm_ms"],
            "exposed vs k=1": m["exposed_comm_ms"] / m["k1_exposed_ms"],
            "overlap %": m["overlap_pct"] if "overlap_pct" in m else nan,
        }
    )
    if "trace_overlap_pct" in m and m["trace_overlap_pct"].notna().any():  # --profile torch: HTA's
        out["overlap % (trace)"] = m["trace_overlap_pct"]
        out["idle ms (trace)"] = m["trace_idle_ms"]
    return out.sort_values(["cp_size", "packing", "seq_len", "k"]).reset_index(drop=True)


#: Key columns that do not change a cp 1 run (no context parallelism there) or name the launch.
_SCALING_FREE = ("cp_size", "overlap_chunks", "layout", "strategy", "world_size", "backend")


def scaling_table(df):
    """Every ok cp > 1 case against the same case (same implementation, path, pass...) at cp 1: the
    layer time over cp 1's time / cp, 1.000 being perfect scaling (the cp 1 time shared out with nothing
    added); ``None`` when the results hold no such pair. Every key column is kept (the rendered table
    shows those that vary)."""
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
            **_key_frame(m),
            "layer ms": m["layer_ms"],
            "cp 1 ms": m["cp1_ms"],
            "cp 1 / cp ms": ideal,
            "vs cp 1 / cp": m["layer_ms"] / ideal,
        }
    )
    for c, v in (("impl", "cp_core"), ("k", 1)):
        if c not in out:
            out[c] = v
    order = [
        c for c in ("impl", "strategy", "path", "pass", "packing", "seq_len", "cp_size", "k") if c in out
    ]
    return out.sort_values(order).reset_index(drop=True)


def _frame_grid(frame, title: str, heading_constant=()) -> tuple[Grid, list[str]]:
    """A derived table as a Grid: its key columns that vary, its values; the keys constant here but not
    in the whole results go into the title. Returns the grid and its footnotes."""
    keys = [c for c in frame.columns if c in _FRAME_KEYS]
    varying = [c for c in keys if frame[c].nunique(dropna=False) > 1]
    constant = [c for c in keys if c not in varying and c not in heading_constant]
    if constant and len(frame):
        title += " · " + " · ".join(f"{c} {_fmt_number(c, frame[c].iloc[0])}" for c in constant)
    values = [c for c in frame.columns if c not in keys]
    cpu = frame["device"].astype(str).eq("cpu") if "device" in frame else None
    grid = Grid(title, [*varying, *values], [True] * (len(varying) + len(values)), keys=len(varying))
    grid.right = [c in NUMERIC_KEYS or c in ("k",) for c in varying] + [True] * len(values)
    notes = []
    for i, row in enumerate(frame.itertuples(index=False)):
        rec = dict(zip(frame.columns, row, strict=True))
        cells = [_fmt_number(c, rec[c]) for c in varying]
        for c in values:
            v = rec[c]
            if c.startswith("overlap %") and cpu is not None and bool(cpu.iloc[i]):
                cells.append("")
                if CPU_OVERLAP_NOTE not in notes:
                    notes.append(CPU_OVERLAP_NOTE)
            elif isinstance(v, float):
                cells.append("-" if math.isnan(v) else (f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"))
            else:
                cells.append(str(v))
        grid.rows.append(cells)
    return grid, notes


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item"):  # numpy scalars
        v = v.item()
        return None if isinstance(v, float) and not math.isfinite(v) else v
    return v


def _records(frame) -> list[dict]:
    return [{k: _json_value(v) for k, v in rec.items()} for rec in frame.to_dict("records")]


def sections(df, *, group_by=(), metrics=None, title: str | None = None, vs=(), status: str | None = None):
    """What a report shows, in order: ``("line", text)``, ``("grid", Grid)`` and ``("note", text)``
    items, and a dict of the same content for ``--format json``."""
    out: list[tuple[str, Any]] = []
    if status:
        out.append(("line", status))
    head, gs, notes = grids(df, group_by=group_by, metrics=metrics, title=title)
    ok, varying, constant, used, _ = _layout(df, group_by, metrics)
    n_ok = len(ok)
    data: dict[str, Any] = {"status": status, "title": head, "notes": [], "tables": {}}
    data["rows"] = _records(ok[[c for c in [*varying, *constant, *used] if c in ok.columns]]) if n_ok else []
    if n_ok:
        if head:
            out.append(("line", head))
        out += [("grid", g) for g in gs]
    else:
        out.append(("line", "no case ran (see below)"))
    out += [("note", n) for n in notes]
    data["notes"] += notes
    for line in footer_lines(df):
        out.append(("line", line))
    for what in ("skipped", "error"):
        sub = df[df["status"] == what] if "status" in df.columns else df.iloc[:0]
        data["skipped" if what == "skipped" else "errors"] = [
            {"case": _describe(r), "reason": str(r.get("error", ""))} for _, r in sub.iterrows()
        ]
    derived = []
    for peer in vs:
        ratios = peer_ratios(df, peer)
        if ratios is None:
            out.append(("line", f"no case of impl {peer!r} in these results: no ratios to it"))
        else:
            derived.append((f"vs_{peer}", ratios, f"time and peak memory as a ratio to {peer} (same case)"))
    ov = overlap_table(df)
    if ov is not None:
        derived.append(
            ("overlap", ov, "overlap: exposed communication (layer - layer with collectives suppressed) vs k")
        )
    sc = scaling_table(df)
    if sc is not None:
        derived.append(
            ("scaling", sc, "scaling: layer time against the same case's cp 1 time / cp (1.000: perfect)")
        )
    times, time_lines = strategy_times(df), []
    if times is not None:
        frame, time_lines = times
        title = "layer ms per strategy (the same case), the fastest, and where it changes"
        derived.append(("strategy_times", frame, title))
    cross = strategy_crossover(df)
    if cross is not None:
        g = Grid(
            "bytes per layer forward, per rank (collective sizes): hidden vs state passing",
            list(cross.columns),
            [True] * len(cross.columns),
        )
        g.rows = [
            [_crossover_cell(c, v) for c, v in zip(cross.columns, r, strict=True)]
            for r in cross.itertuples(index=False)
        ]
        derived.append(("crossover", cross, g))
    for name, frame, t in derived:
        if isinstance(t, Grid):
            grid, gnotes = t, []
        else:
            grid, gnotes = _frame_grid(frame, t, heading_constant=constant)
        out.append(("grid", grid))
        out += [("note", n) for n in gnotes]
        data["notes"] += [n for n in gnotes if n not in data["notes"]]
        data["tables"][name] = _records(frame)
        if name == "strategy_times":  # the crossover lengths right under their table
            out += [("line", t) for t in time_lines]
            data["crossovers"] = list(time_lines)
    return out, data


def render(
    df,
    *,
    group_by=(),
    metrics=None,
    console=None,
    title: str | None = None,
    vs=(),
    fmt: str = "text",
    status: str | None = None,
) -> None:
    """Print the report: ``fmt`` ``text`` (rich tables fitted to the console), ``markdown`` or ``json``."""
    items, data = sections(df, group_by=group_by, metrics=metrics, title=title, vs=vs, status=status)
    if fmt == "json":
        import json

        print(json.dumps(data, indent=1, default=str, ensure_ascii=False))
        return
    if fmt == "markdown":
        parts = []
        for kind, v in items:
            parts.append(v.markdown() if kind == "grid" else (f"_{v}_" if kind == "note" else v))
        print("\n\n".join(parts))
        return
    console = console or make_console()
    for kind, v in items:
        if kind == "grid":
            for part in v.split(console.width):
                console.print(part.rich())
        else:
            console.print(v, highlight=False, markup=False)


def _crossover_cell(col: str, v) -> str:
    """MB with 3 significant digits (small shapes move kB, not 0 MB), ratios as ratios, lengths whole."""
    if not isinstance(v, float):
        return str(v)
    if col.endswith("MB"):
        return f"{v:.3g}"
    if col == "ratio":
        return f"{v:.3g}"
    return f"{v:,.0f}"


def _crossing(l0: float, l1: float, d0: float, d1: float) -> float:
    """Where ``d`` (a time difference, ``d0`` at ``l0``, ``d1`` at ``l1``, opposite signs) crosses 0, linear
    in log L (the seq_len axis is geometric in the scenarios)."""
    f = d0 / (d0 - d1)
    return math.exp(math.log(l0) + f * (math.log(l1) - math.log(l0)))


def strategy_times(df):
    """Per case (every key but ``strategy`` and ``seq_len``) with two strategies or more at cp > 1: the layer
    ms of each strategy at every seq_len, the fastest, and the lengths where the fastest changes (the
    crossing of the two times, interpolated in log L between the measured lengths). ``(frame, lines)``;
    None when no case has two strategies."""
    import pandas as pd

    need = {"strategy", "cp_size", "seq_len", "layer_ms", "status"}
    if not need <= set(df.columns):
        return None
    ok = df[(df["status"] == "ok") & (df["cp_size"] > 1) & df["layer_ms"].notna()]
    if ok.empty or ok["strategy"].nunique() < 2:
        return None
    keys = [c for c in CASE_KEY if c in ok.columns and c not in ("strategy", "seq_len", "scenario")]
    rows, lines = [], []
    for key, g in ok.groupby(keys, sort=True, dropna=False):
        piv = g.pivot_table(index="seq_len", columns="strategy", values="layer_ms", aggfunc="median")
        if piv.shape[1] < 2:
            continue
        strategies = list(piv.columns)
        rec_key = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        fastest_prev, prev = None, None
        for L, r in piv.iterrows():
            avail = r.dropna()
            fastest = str(avail.idxmin()) if len(avail) else ""
            rows.append(
                {**rec_key, "seq_len": L, **{f"{s} ms": r[s] for s in strategies}, "fastest": fastest}
            )
            if fastest_prev and fastest and fastest != fastest_prev and prev is not None:
                a, b = prev[fastest_prev] - prev[fastest], r[fastest_prev] - r[fastest]
                at = _crossing(prev.name, L, a, b) if a < 0 < b else float("nan")
                where = f"at L ≈ {at:,.0f}" if math.isfinite(at) else f"between L {prev.name} and {L}"
                ctx = ", ".join(str(rec_key[c]) for c in ("packing", "pass") if c in rec_key)
                lines.append(
                    f"crossover, cp {rec_key.get('cp_size')} ({ctx}): {fastest} overtakes {fastest_prev} {where}"
                )
            fastest_prev, prev = fastest, r
    if not rows:
        return None
    frame = pd.DataFrame(rows)
    for c in ("impl", "overlap_chunks"):  # not the frame's business here
        if c in frame and c not in _FRAME_KEYS:
            frame = frame.drop(columns=c)
    keep = [c for c in frame.columns if c in _FRAME_KEYS or c.endswith(" ms") or c == "fastest"]
    return frame[keep], lines


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
    # hierarchical's bytes grow with L (its all-to-all) like hidden's: no fixed-bytes crossover
    others = sorted(set(ok["strategy"]) - {"hidden", "hierarchical"})
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
