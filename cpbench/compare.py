"""``cpbench compare OLD.csv NEW.csv``: join two sweeps on the case key and flag regressions.

Cases are joined on the case key (:data:`cpbench.scenario.CASE_KEY`, less any ``--ignore`` columns)
plus the layer's shape (:data:`LAYER_KEY`) where both files record it. For every case present (with
status ok) in both files and every metric (default ``layer_ms``):
``ratio = new / old``. A metric is *lower-is-better* (``*_ms``, ``*_bytes``, ``*_GiB``, ``wall_s``)
or *higher-is-better* (``*_GBps``, ``*_pct``, ``tokens_per_s``); ``worse`` is how much the new run
is worse (``new - old``, or ``old - new``). The case **regressed** only when the change is both

* beyond the threshold: ``worse > threshold * |old|`` (default 5%), and
* outside the measured noise: ``worse > iqr_old / 2 + iqr_new / 2``,

where the IQRs are the metric's own (``layer_ms`` -> ``layer_iqr_ms``, ``ssm_ms`` -> ``ssm_iqr_ms``),
or, for rates, the relative IQR of the time they derive from (``tokens_per_s`` from ``layer_ms``,
``busbw_GBps`` from ``comm_ms``) times the value. It **improved** under the mirror condition.
A case that was ok and now errors is a regression too.

Exit codes: 0 nothing regressed, 1 something regressed, 2 malformed or incomparable inputs
(unreadable CSV, key columns or the metric missing, no case in common). Cases only in one file and
columns only in one file are reported, not fatal, as long as some case is in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ResultsError, UserError
from .scenario import CASE_KEY

#: Columns of the layer's shape, joined on as well when both files have them.
LAYER_KEY = ("d_model", "head_dim", "d_state", "d_conv", "chunk_size")
LOWER_SUFFIXES = ("_ms", "_bytes", "_GiB", "wall_s", "n_collectives")
HIGHER_SUFFIXES = ("_GBps", "_pct", "tokens_per_s")


def parse_threshold(text: str | float) -> float:
    """``"5%"`` -> 0.05, ``"0.05"`` -> 0.05, ``"5"`` -> 0.05 (a bare number >= 1 is a percentage)."""
    s = str(text).strip()
    try:
        v = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise UserError(
            f"--threshold {text!r}: expected a percentage like 5% or a fraction like 0.05"
        ) from None
    if not s.endswith("%") and v >= 1:
        v /= 100
    if not math.isfinite(v) or v < 0:
        raise UserError(f"--threshold {text!r}: must be a non-negative number")
    return v


def higher_is_better(metric: str) -> bool:
    if metric.endswith(HIGHER_SUFFIXES):
        return True
    return False


def noise_source(metric: str) -> tuple[str, str] | None:
    """``(median column, iqr column)`` whose relative IQR measures the noise of ``metric``."""
    if metric.endswith("_iqr_ms"):
        return None
    if metric.endswith("_min_ms"):
        base = metric[: -len("_min_ms")]
        return f"{base}_min_ms", f"{base}_iqr_ms"
    if metric.endswith("_ms"):
        base = metric[: -len("_ms")]
        return metric, f"{base}_iqr_ms"
    if metric == "tokens_per_s":
        return "layer_ms", "layer_iqr_ms"
    if metric in ("busbw_GBps", "algbw_GBps", "busbw_pct"):
        return "comm_ms", "comm_iqr_ms"
    if metric.endswith("_busbw_GBps") and not metric.endswith("_bench_busbw_GBps"):
        base = metric[: -len("_busbw_GBps")]
        return f"{base}_ms", f"{base}_iqr_ms"
    return None


def _num(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return f


def noise(row: dict, metric: str, suffix: str) -> float:
    """The IQR (in the metric's unit) of one side of a joined row; 0 when unknown."""
    src = noise_source(metric)
    if src is None:
        return 0.0
    med_col, iqr_col = src
    med, q = _num(row.get(med_col + suffix)), _num(row.get(iqr_col + suffix))
    if not (math.isfinite(med) and math.isfinite(q)) or med <= 0:
        return 0.0
    if med_col == metric:
        return q
    return abs(_num(row.get(metric + suffix))) * q / med


def verdict(
    old: float, new: float, noise_old: float, noise_new: float, threshold: float, higher: bool
) -> str:
    """``regressed`` | ``improved`` | ``same`` (see the module docstring)."""
    if not (math.isfinite(old) and math.isfinite(new)):
        return "n/a"
    worse = (old - new) if higher else (new - old)
    bar = max(threshold * abs(old), noise_old / 2 + noise_new / 2)
    if worse > bar:
        return "regressed"
    if -worse > bar:
        return "improved"
    return "same"


@dataclass
class Comparison:
    keys: list[str]
    metrics: list[str]
    rows: list[dict[str, Any]]  # one per (case, metric)
    only_old: list[str] = field(default_factory=list)
    only_new: list[str] = field(default_factory=list)
    columns_only_old: list[str] = field(default_factory=list)
    columns_only_new: list[str] = field(default_factory=list)
    not_compared: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["verdict"] == "regressed"]

    @property
    def improvements(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["verdict"] == "improved"]


def _key_text(df, keys: list[str]):
    """One normalised string per row: numbers as ``%.10g`` so 1 and 1.0 join."""
    import pandas as pd

    parts = []
    for k in keys:
        col = df[k]
        if pd.api.types.is_numeric_dtype(col):
            parts.append(col.map(lambda v: f"{float(v):.10g}"))
        else:
            parts.append(col.astype(str))
    out = parts[0].radd(f"{keys[0]}=")
    for k, p in zip(keys[1:], parts[1:], strict=True):
        out = out + f" {k}=" + p
    return out


def compare(
    old, new, *, metrics=("layer_ms",), threshold: float = 0.05, ignore=(), names=("OLD", "NEW")
) -> Comparison:
    """Compare two results DataFrames (see the module docstring); raises ResultsError when incomparable."""
    o_name, n_name = names
    keys = [k for k in CASE_KEY if k not in ignore]
    # the layer's shape is part of a case too, where both files record it
    keys += [k for k in LAYER_KEY if k in old.columns and k in new.columns and k not in ignore]
    for df, nm in ((old, o_name), (new, n_name)):
        missing = [k for k in keys if k not in df.columns]
        if missing:
            raise ResultsError(f"{nm}: missing key column(s) {', '.join(missing)}: not a cpbench results CSV")
    metrics = list(metrics)
    for m in metrics:
        where = [nm for df, nm in ((old, o_name), (new, n_name)) if m not in df.columns]
        if where:
            raise ResultsError(f"metric {m!r} is not a column of {' and '.join(where)}")
        empty = [nm for df, nm in ((old, o_name), (new, n_name)) if not _has_numbers(df[m])]
        if empty:
            raise ResultsError(f"metric {m!r} has no numeric value in {' and '.join(empty)}")
    old = old.assign(_key=_key_text(old, keys))
    new = new.assign(_key=_key_text(new, keys))
    for df, nm in ((old, o_name), (new, n_name)):
        dup = df["_key"][df["_key"].duplicated()]
        if len(dup):
            raise ResultsError(f"{nm}: {len(dup)} duplicated case key(s), e.g. {dup.iloc[0]}")
    cmp = Comparison(keys=keys, metrics=metrics, rows=[])
    cmp.columns_only_old = [c for c in old.columns if c not in new.columns]
    cmp.columns_only_new = [c for c in new.columns if c not in old.columns]
    ok_set, nk_set = set(old["_key"]), set(new["_key"])
    cmp.only_old = sorted(ok_set - nk_set)
    cmp.only_new = sorted(nk_set - ok_set)
    common = ok_set & nk_set
    if not common:
        raise ResultsError(
            f"{o_name} and {n_name} have no case in common ({len(ok_set)} vs {len(nk_set)} cases): they come "
            f"from different sweeps (differing key columns: {', '.join(_differing(old, new, keys)) or 'none'}); "
            f"--ignore COLS drops key columns from the join"
        )
    joined = old.merge(new, on="_key", suffixes=("_old", "_new"))
    for rec in joined.to_dict("records"):
        so, sn = rec.get("status_old"), rec.get("status_new")
        label = rec["_key"]
        if so == "ok" and sn == "error":
            for m in metrics:
                cmp.rows.append(
                    _row(rec, keys, m, "regressed", note=f"now error: {rec.get('error_new', '')}")
                )
            continue
        if so != "ok" or sn != "ok":
            cmp.not_compared.append(f"{label}: {so} -> {sn}")
            continue
        for m in metrics:
            o, n = _num(rec.get(m + "_old")), _num(rec.get(m + "_new"))
            hi = higher_is_better(m)
            v = verdict(o, n, noise(rec, m, "_old"), noise(rec, m, "_new"), threshold, hi)
            cmp.rows.append(_row(rec, keys, m, v))
    return cmp


def _has_numbers(col) -> bool:
    import pandas as pd

    return bool(pd.to_numeric(col, errors="coerce").notna().any())


def _differing(old, new, keys: list[str]) -> list[str]:
    out = []
    for k in keys:
        a = set(map(str, old[k].unique()))
        b = set(map(str, new[k].unique()))
        if a != b:
            out.append(f"{k} ({', '.join(sorted(a))[:40]} vs {', '.join(sorted(b))[:40]})")
    return out


def _row(rec: dict, keys: list[str], metric: str, verdict_: str, note: str = "") -> dict[str, Any]:
    o, n = _num(rec.get(metric + "_old")), _num(rec.get(metric + "_new"))
    ratio = n / o if (math.isfinite(o) and math.isfinite(n) and o != 0) else float("nan")
    key = {k: rec.get(k + "_old", rec.get(k)) for k in keys}
    return {
        **key,
        "metric": metric,
        "old": o,
        "new": n,
        "ratio": ratio,
        "noise_old": noise(rec, metric, "_old"),
        "noise_new": noise(rec, metric, "_new"),
        "verdict": verdict_,
        "note": note,
        "badness": (1 / ratio if higher_is_better(metric) else ratio)
        if ratio == ratio and ratio != 0
        else math.inf,
    }


def _verdict_cell(r: dict[str, Any], style: str):
    from rich.text import Text

    text = r["verdict"] + (f" ({r['note']})" if r["note"] else "")
    return Text(text, style=style or "")


def render(cmp: Comparison, *, only_changed: bool = False, threshold: float = 0.05, console=None) -> None:
    from rich.table import Table

    from .report import _fmt_number, make_console

    console = console or make_console()
    rows = (
        cmp.rows if not only_changed else [r for r in cmp.rows if r["verdict"] in ("regressed", "improved")]
    )
    rows = sorted(rows, key=lambda r: -r["badness"] if r["badness"] == r["badness"] else 0)
    varying = [k for k in cmp.keys if len({str(r[k]) for r in cmp.rows}) > 1] or ["cp_size"]
    style = {"regressed": "bold red", "improved": "green", "same": "", "n/a": "dim"}
    for m in cmp.metrics:
        mrows = [r for r in rows if r["metric"] == m]
        direction = "higher is better" if higher_is_better(m) else "lower is better"
        t = Table(title=f"{m} ({direction}; threshold {threshold:.1%}, noise = IQR)", title_justify="left")
        for k in varying:
            t.add_column(k)
        for c in ("old", "new"):
            t.add_column(c, justify="right")
        t.add_column("new/old", justify="right")
        t.add_column("verdict")
        for r in mrows:
            t.add_row(
                *[str(r[k]) for k in varying],
                _fmt_number(m, r["old"]),
                _fmt_number(m, r["new"]),
                f"{r['ratio']:.3f}" if r["ratio"] == r["ratio"] else "-",
                _verdict_cell(r, style[r["verdict"]]),
            )
        console.print(t)
    for title, items in (
        ("cases only in OLD", cmp.only_old),
        ("cases only in NEW", cmp.only_new),
        ("not compared (status not ok in both)", cmp.not_compared),
        ("columns only in OLD", cmp.columns_only_old),
        ("columns only in NEW", cmp.columns_only_new),
    ):
        if items:
            console.print(f"{title} ({len(items)}):", highlight=False)
            for it in items[:20]:
                console.print(f"  {it}", highlight=False, markup=False)
            if len(items) > 20:
                console.print(f"  ... {len(items) - 20} more", highlight=False)
    n_cases = len({tuple(str(r[k]) for k in cmp.keys) for r in cmp.rows})
    console.print(
        f"{n_cases} case(s) compared: {len(cmp.regressions)} regression(s), {len(cmp.improvements)} "
        f"improvement(s)",
        highlight=False,
    )
