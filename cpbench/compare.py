"""``cpbench compare OLD NEW``: join two sweeps on the case key; a gate CI can trust.

Cases are joined on the case key (:data:`cpbench.scenario.CASE_KEY`, less any ``--ignore`` columns)
plus the layer's shape (:data:`LAYER_KEY`) where both files record it. For every case ok in both
files and every metric (default ``layer_ms``), ``ratio = new / old``. A metric is *lower-is-better*
(``*_ms``, ``*_bytes``, ``*_GiB``, ``wall_s``) or *higher-is-better* (``*_GBps``, ``*_pct``,
``tokens_per_s``); ``worse`` is how much the new run is worse.

**Noise test.** A timing on a shared machine moves for two reasons: iteration to iteration (another
process takes the core for a while), and run to run (the load changes while a whole case runs, so
every iteration of that case moves together; the per-iteration spread of one run cannot see it).
A case **regressed** only when all three hold:

1. *threshold*: ``worse > threshold * |old|`` (default 5%);
2. *the case's own samples*: the per-iteration samples of the two runs (``layer_ms_samples``, the
   slowest rank per iteration; rates use the samples of the time they derive from) differ in the
   worse direction by a one-sided Mann-Whitney U test at ``--alpha`` (default 0.05; exact for small
   samples). Where a file has no samples, the older rule stands in: ``worse > iqr_old/2 + iqr_new/2``;
3. *the run-to-run spread*: ``|log(new/old)| > z * sigma`` (``--spread``, default z = 8), ``sigma``
   being the robust spread (1.4826 * median absolute deviation) of ``log(new/old)`` over every case
   compared for that metric: how far the same code moves between these two runs on this machine.
   It needs :data:`MIN_CASES_FOR_SPREAD` cases; with fewer it is not applied (and the output says so).

A change that passes 1 but not 2 or 3 is ``noise`` (shown, not a regression). **Improved** is the
mirror image. A case that was ok and now errors is a regression.

**Coverage.** The gate also fails (exit 1) on cases of OLD missing from NEW (absent, or no longer ok),
cases only in NEW, and metric cells that are not numbers in an ok row (or unreadable samples), unless
``--allow-missing``, ``--allow-extra``, ``--allow-unreadable`` say otherwise. A metric empty in both
files for a case (``comm_ms`` at cp_size 1) is not applicable, not unreadable.

Exit codes: 0 the gate passes, 1 it fails (regression or coverage), 2 malformed or incomparable
inputs (unreadable CSV, key columns or the metric missing, no case in common).
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
#: Fewest cases from which the run-to-run spread is estimated.
MIN_CASES_FOR_SPREAD = 5
#: Largest n_old * n_new for which the Mann-Whitney p-value is exact (normal approximation above).
EXACT_MWU = 400


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


def samples_column(metric: str) -> str | None:
    """The per-iteration samples column behind ``metric`` (times whose change is the metric's change)."""
    src = noise_source(metric)
    if src is None or src[0] != src[0].replace("_min_ms", "_ms"):
        return None  # a minimum has no samples of its own
    base = src[0][: -len("_ms")]
    return f"{base}_ms_samples" if base in ("layer", "comm") else None


def mann_whitney_p(worse: list[float], better: list[float]) -> float:
    """One-sided p-value that ``worse`` tends to be larger than ``better`` (Mann-Whitney U).

    ``U`` counts the pairs where ``worse`` is larger (ties count one half). Exact null distribution
    (no ties) for small samples, rounding ``U`` down (conservative with ties); normal approximation
    with continuity correction above :data:`EXACT_MWU` pairs. 1.0 for an empty sample."""
    n, m = len(worse), len(better)
    if not n or not m:
        return 1.0
    u = sum((w > b) + 0.5 * (w == b) for w in worse for b in better)
    if n * m <= EXACT_MWU:
        # counts[k]: orderings of n + m values with U = k (recursion on the largest value)
        counts = _u_counts(n, m)
        k = math.floor(u)
        return sum(counts[k:]) / sum(counts)
    mean, sd = n * m / 2, math.sqrt(n * m * (n + m + 1) / 12)
    z = (u - 0.5 - mean) / sd
    return 0.5 * math.erfc(z / math.sqrt(2))


def _u_counts(n: int, m: int) -> list[int]:
    """Number of arrangements of n 'worse' and m 'better' values per value of U (0..n*m)."""
    # f[i][j] is a list indexed by U; f(i, j) = f(i-1, j) shifted by j (largest is 'worse') + f(i, j-1)
    prev = [[1] for _ in range(m + 1)]  # i = 0: U = 0 only
    for _ in range(n):
        cur = [[1]]  # j = 0: U = 0 only
        for j in range(1, m + 1):
            a, b = [0] * j + prev[j], cur[j - 1]
            size = max(len(a), len(b))
            cur.append([(a[k] if k < len(a) else 0) + (b[k] if k < len(b) else 0) for k in range(size)])
        prev = cur
    return prev[m]


def run_spread(log_ratios: list[float]) -> float:
    """Robust spread (1.4826 * MAD) of the cases' ``log(new/old)``; NaN below MIN_CASES_FOR_SPREAD."""
    xs = [v for v in log_ratios if math.isfinite(v)]
    if len(xs) < MIN_CASES_FOR_SPREAD:
        return float("nan")
    xs.sort()
    med = _median(xs)
    return 1.4826 * _median(sorted(abs(v - med) for v in xs))


def _median(xs: list[float]) -> float:
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def verdict(
    old: float, new: float, noise_old: float, noise_new: float, threshold: float, higher: bool
) -> str:
    """The threshold and IQR rule alone: ``regressed`` | ``improved`` | ``same`` | ``n/a``."""
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
    no_longer_ok: list[str] = field(default_factory=list)  # ok in OLD, skipped in NEW: lost coverage
    unreadable: list[str] = field(default_factory=list)
    spread: dict[str, float] = field(default_factory=dict)  # metric -> run-to-run sigma of log(new/old)

    @property
    def regressions(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["verdict"] == "regressed"]

    @property
    def improvements(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["verdict"] == "improved"]

    def failures(
        self, *, allow_missing: bool = False, allow_extra: bool = False, allow_unreadable: bool = False
    ) -> list[str]:
        """Why the gate fails (empty: it passes)."""
        out = []
        if self.regressions:
            out.append(f"{len(self.regressions)} regression(s)")
        missing = len(self.only_old) + len(self.no_longer_ok)
        if missing and not allow_missing:
            out.append(f"{missing} case(s) of OLD missing or no longer ok in NEW (--allow-missing)")
        if self.only_new and not allow_extra:
            out.append(f"{len(self.only_new)} case(s) only in NEW (--allow-extra)")
        if self.unreadable and not allow_unreadable:
            out.append(f"{len(self.unreadable)} unreadable cell(s) (--allow-unreadable)")
        return out


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


def _cell_number(v: Any) -> tuple[float, bool]:
    """``(value, readable)``: an empty cell is NaN and readable (not applicable); text is unreadable."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()):
        return float("nan"), True
    try:
        f = float(v)
    except (TypeError, ValueError):
        return float("nan"), False
    return f, math.isfinite(f)


def compare(
    old,
    new,
    *,
    metrics=("layer_ms",),
    threshold: float = 0.05,
    ignore=(),
    names=("OLD", "NEW"),
    alpha: float = 0.05,
    spread_z: float = 8.0,
) -> Comparison:
    """Compare two results DataFrames (see the module docstring); raises ResultsError when incomparable."""
    from .metrics import parse_samples

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
    pending: list[tuple[dict, str, float, float, list[float], list[float]]] = []
    for rec in joined.to_dict("records"):
        so, sn = rec.get("status_old"), rec.get("status_new")
        label = rec["_key"]
        if so == "ok" and sn == "error":
            for m in metrics:
                cmp.rows.append(
                    _row(rec, keys, m, "regressed", note=f"now error: {rec.get('error_new', '')}")
                )
            continue
        if so == "ok" and sn != "ok":
            cmp.no_longer_ok.append(f"{label}: {so} -> {sn}")
            continue
        if so != "ok" or sn != "ok":
            cmp.not_compared.append(f"{label}: {so} -> {sn}")
            continue
        for m in metrics:
            o, o_ok = _cell_number(rec.get(m + "_old"))
            n, n_ok = _cell_number(rec.get(m + "_new"))
            if not (o_ok and n_ok) or math.isnan(o) != math.isnan(n):
                side = o_name if not o_ok or math.isnan(o) else n_name
                cmp.unreadable.append(
                    f"{label}: {m} in {side}: {rec.get(m + ('_old' if side == o_name else '_new'))!r}"
                )
                cmp.rows.append(_row(rec, keys, m, "n/a", note="unreadable"))
                continue
            samples = ([], [])
            col = samples_column(m)
            if col is not None and col + "_old" in rec and col + "_new" in rec:
                try:
                    samples = (parse_samples(rec[col + "_old"]), parse_samples(rec[col + "_new"]))
                except ValueError:
                    cmp.unreadable.append(f"{label}: {col} is not a list of numbers")
            pending.append((rec, m, o, n, *samples))
    for m in metrics:
        logs = [
            math.log(n / o)
            for rec, mm, o, n, *_ in pending
            if mm == m and o > 0 and n > 0 and math.isfinite(n / o)
        ]
        cmp.spread[m] = run_spread(logs)
    for rec, m, o, n, s_old, s_new in pending:
        v, note = _judge(rec, m, o, n, s_old, s_new, threshold, alpha, spread_z * cmp.spread[m])
        cmp.rows.append(_row(rec, keys, m, v, note=note))
    return cmp


def _judge(rec, m, o, n, s_old, s_new, threshold, alpha, log_bar) -> tuple[str, str]:
    """The verdict of one case and metric (see the module docstring) and a note on a rejected change."""
    if not (math.isfinite(o) and math.isfinite(n)):
        return "n/a", ""
    hi = higher_is_better(m)
    worse = (o - n) if hi else (n - o)
    if abs(worse) <= threshold * abs(o):
        return "same", ""
    direction = "regressed" if worse > 0 else "improved"
    if s_old and s_new:
        # the samples are the times behind the metric: worse means slower for times and rates alike
        p = mann_whitney_p(s_new, s_old) if worse > 0 else mann_whitney_p(s_old, s_new)
        if p > alpha:
            return "noise", f"samples overlap: p={p:.2g} > {alpha:g}"
    else:
        bar = noise(rec, m, "_old") / 2 + noise(rec, m, "_new") / 2
        if abs(worse) <= bar:
            return "noise", "inside the IQRs"
    if math.isfinite(log_bar) and o > 0 and n > 0 and abs(math.log(n / o)) <= log_bar:
        return "noise", f"inside the run-to-run spread (x{math.exp(log_bar):.2f})"
    return direction, ""


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


def render(
    cmp: Comparison, *, only_changed: bool = False, threshold: float = 0.05, console=None, failures=()
) -> None:
    from rich.table import Table

    from .report import _fmt_number, make_console

    console = console or make_console()
    changed = ("regressed", "improved", "noise")
    rows = cmp.rows if not only_changed else [r for r in cmp.rows if r["verdict"] in changed]
    rows = sorted(rows, key=lambda r: -r["badness"] if r["badness"] == r["badness"] else 0)
    varying = [k for k in cmp.keys if len({str(r[k]) for r in cmp.rows}) > 1] or ["cp_size"]
    style = {"regressed": "bold red", "improved": "green", "same": "", "noise": "yellow", "n/a": "dim"}
    for m in cmp.metrics:
        mrows = [r for r in rows if r["metric"] == m]
        direction = "higher is better" if higher_is_better(m) else "lower is better"
        sigma = cmp.spread.get(m, float("nan"))
        spread = (
            f"run-to-run spread x{math.exp(sigma):.2f}"
            if sigma == sigma
            else f"run-to-run spread not estimated (< {MIN_CASES_FOR_SPREAD} cases)"
        )
        t = Table(title=f"{m} ({direction}; threshold {threshold:.1%}; {spread})", title_justify="left")
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
        ("cases ok in OLD, not in NEW", cmp.no_longer_ok),
        ("unreadable cells", cmp.unreadable),
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
    n_noise = sum(r["verdict"] == "noise" for r in cmp.rows)
    console.print(
        f"{n_cases} case(s) compared: {len(cmp.regressions)} regression(s), {len(cmp.improvements)} "
        f"improvement(s), {n_noise} change(s) within the noise",
        highlight=False,
    )
    console.print(
        "gate: FAIL: " + "; ".join(failures) if failures else "gate: pass", highlight=False, markup=False
    )
