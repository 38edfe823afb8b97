"""``cpbench compare BASELINE [BASELINE ...] NEW``: join sweeps on the case key; a gate CI can trust.

Cases are joined on the case key (:data:`cpbench.scenario.CASE_KEY`, less any ``--ignore`` columns)
plus the layer's shape (:data:`LAYER_KEY`) where every file records it. Each side is one run or
several runs of the same code (repeats: several folders, or a folder of run folders). For every case
ok on both sides and every metric (default ``layer_ms``), a side's value is the geometric mean over its
runs (per run, the metric as the run recorded it: ``layer_ms`` is the median of its iterations) and
``ratio = new / old``. A metric is *lower-is-better* (``*_ms``, ``*_bytes``, ``*_GiB``, ``wall_s``) or
*higher-is-better* (``*_GBps``, ``*_pct``, ``tokens_per_s``).

**Load-normalised times.** Every measured iteration of a sweep also times a fixed load reference
(``ref_ms``, :class:`cpbench.runner.LoadReference`: a workload that calls no ``cp_core`` code, timed
just before and just after the layer, outside the slow-down hook). Where every run of both sides has
``ref_ms``, a time metric (``*_ms``, ``tokens_per_s``: :func:`normalisable`) is judged as ``metric /
ref_ms`` (a rate as ``metric * ref_ms``): each run's value divided by its own reference, each
per-iteration sample by the reference of the same iteration. Load from other processes slows both
alike and divides out; a slower layer moves the ratio. Everything below then applies to these ratios
(``--min-shift`` defaults to 8% on them), and the tables show the ratio ``new/old per ref`` beside the
raw ``new/old``. Otherwise (a run made with ``run.load_ref = false`` or before the reference existed,
or ``--no-load-ref``) the raw times are judged, as before, and the output names the reason.

**Noise model: nothing the change under test moves.** A timing on a shared machine moves iteration to
iteration (another process takes a core for a while) and run to run (the load changes while a whole
case, or a whole run, goes by; the iterations of one run cannot see that). The noise is estimated
from the baseline's runs and each side's own samples, never from how NEW differs from OLD, so a
regression cannot widen its own bar. A case **regressed** only when all of these hold:

1. *minimum effect*: the change is worse than ``--threshold`` (default 5%);
2. *the case's own samples*: NEW's per-iteration samples (``layer_ms_samples``: the slowest rank per
   iteration, every run of the side pooled; rates use the samples of the time they derive from) are
   worse than the baseline's by a one-sided Mann-Whitney U test at ``--alpha`` (default 0.05; exact
   for small samples). Files without samples: the change must exceed half the sum of the IQRs;
3. *run to run*, either
   a. *the case alone*: its ``log(new/old)`` less NEW's whole-run shift (b) exceeds
      ``z * sigma * sqrt(1/k + 1/m)`` (``--z``, default 10; ``k``, ``m``: the runs of each side), with
      ``sigma`` how far one case moves against the rest of its run between runs of the same code:
      1.4826 * the median absolute deviation of every baseline run's ``log`` values around their
      cases' means less the run's own shift, pooled over all cases (:func:`baseline_noise`); or
   b. *the run as a whole*: NEW's shift, the median over all compared cases of ``log(new/old)``,
      exceeds ``log(1 + --min-shift)`` (default 8% load-normalised, 15% raw) plus the one-sided ``1 - --alpha`` prediction
      bound of a run's shift from the ``k`` baseline runs: ``t(1 - alpha, k - 1) * s * sqrt(1/k +
      1/m)``, ``s`` the standard deviation of the baseline runs' own shifts. A regression of the code
      usually moves every case; a burst of load moves a few, a change of load the whole run, which
      the baseline runs can only bound as tightly as they agree with each other.

   With a single baseline run neither spread can be measured: ``--run-noise`` (default 20%, about the
   middle of what baseline runs measured on the loaded 2-core CPU: x1.03 to x1.63) stands in for both (a
   normal bound instead of Student's) and the output says so.

The false positives and negatives of these defaults over repeated real runs on a loaded 2-core CPU,
the layer slowed by ``CPBENCH_SLOWDOWN`` (:mod:`cpbench.runner`): ``results/cpu-compare-gate-*``
(``scripts/compare_gate_rates.py``). A change that passes 1 but not 2 and 3 is ``noise``
(shown, not a regression). **Improved** is the mirror image. A case that was ok and now errors is a
regression.

**Impossible values are errors** (exit 2): a time, rate, bandwidth or memory metric (:func:`positive`)
of 0 or less in an ok row, a sample of 0 or less, a ``nan`` or ``inf`` cell.

**Coverage.** The gate also fails (exit 1) on cases of OLD missing from NEW (absent, or no longer ok),
cases only in NEW, and metric cells that are not numbers in an ok row (or unreadable samples), unless
``--allow-missing``, ``--allow-extra``, ``--allow-unreadable`` say otherwise. A metric empty on both
sides for a case (``comm_ms`` at cp_size 1) is not applicable, not unreadable.

Exit codes: 0 the gate passes, 1 it fails (regression or coverage), 2 malformed, impossible or
incomparable inputs (unreadable CSV, key columns or the metric missing, no case in common).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ResultsError, UserError
from .scenario import CASE_KEY

#: Columns of the layer's shape, joined on as well when every file has them.
LAYER_KEY = ("d_model", "head_dim", "d_state", "d_conv", "chunk_size")
LOWER_SUFFIXES = ("_ms", "_bytes", "_GiB", "wall_s", "n_collectives")
HIGHER_SUFFIXES = ("_GBps", "_pct", "tokens_per_s")
#: Fewest cases from which a run's shift or the cases' spread is estimated.
MIN_CASES_FOR_SPREAD = 5
#: Largest n_old * n_new for which the Mann-Whitney p-value is exact (normal approximation above).
EXACT_MWU = 400
#: Defaults of the gate (``cpbench compare --help``).
DEFAULT_THRESHOLD = 0.05
DEFAULT_ALPHA = 0.05
DEFAULT_Z = 10.0
DEFAULT_RUN_NOISE = 0.20
DEFAULT_MIN_SHIFT = 0.15
#: The minimum whole-run effect for load-normalised times (``metric / ref_ms``), whose whole runs move
#: far less between runs of the same code (results/cpu-compare-gate-20261202: same-code runs x0.92-x1.10
#: against 3 baseline runs; at 5% one of 20 failed where the baselines agreed to x1.008, so 8%).
DEFAULT_MIN_SHIFT_NORM = 0.08
#: The load reference column (:class:`cpbench.runner.LoadReference`) and its per-iteration samples.
REF = "ref_ms"
REF_SAMPLES = "ref_ms_samples"
#: Metrics that are a time, rate, bandwidth or size of something that happened: > 0 in an ok row.
POSITIVE = (
    "layer_ms",
    "layer_min_ms",
    "layer_fwd_ms",
    "layer_bwd_ms",
    "layer_nocomm_ms",
    "comm_ms",
    "comm_min_ms",
    "comm_xfer_ms",
    "ref_ms",
    "tokens_per_s",
    "peak_mem_GiB",
    "wall_s",
)


def positive(metric: str) -> bool:
    """Whether a value of ``metric`` must be > 0 (times of the layer and its communication, rates,
    bandwidths, memory). Region times, ``exposed_comm_ms``, ``comm_wait_ms`` and percentages may be
    0 or, measured as differences, negative."""
    return metric in POSITIVE or metric.endswith("_GBps")


def parse_threshold(text: str | float, flag: str = "--threshold") -> float:
    """``"5%"`` -> 0.05, ``"0.05"`` -> 0.05, ``"5"`` -> 0.05 (a bare number >= 1 is a percentage)."""
    s = str(text).strip()
    try:
        v = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected a percentage like 5% or a fraction like 0.05") from None
    if not s.endswith("%") and v >= 1:
        v /= 100
    if not math.isfinite(v) or v < 0:
        raise UserError(f"{flag} {text!r}: must be a non-negative number")
    return v


def higher_is_better(metric: str) -> bool:
    return metric.endswith(HIGHER_SUFFIXES)


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
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def noise(row: dict, metric: str, suffix: str = "") -> float:
    """The IQR (in the metric's unit) of one run's row; 0 when unknown."""
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
    return f"{base}_ms_samples" if base in ("layer", "comm", "ref") else None


def normalisable(metric: str) -> bool:
    """Whether ``metric`` is a time (``*_ms``, or ``tokens_per_s``, a time's inverse) that the load
    reference ``ref_ms`` can normalise: ``metric / ref_ms`` (``tokens_per_s * ref_ms``)."""
    return metric == "tokens_per_s" or (metric.endswith("_ms") and not metric.startswith("ref_"))


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
        counts = _u_counts(n, m)
        k = math.floor(u)
        return sum(counts[k:]) / sum(counts)
    mean, sd = n * m / 2, math.sqrt(n * m * (n + m + 1) / 12)
    z = (u - 0.5 - mean) / sd
    return 0.5 * math.erfc(z / math.sqrt(2))


def smallest_p(n: int, m: int) -> float:
    """The smallest one-sided Mann-Whitney p-value ``n`` and ``m`` samples can give: ``1 / C(n+m, n)``."""
    if not n or not m:
        return 1.0
    return 1.0 / math.comb(n + m, n)


def _u_counts(n: int, m: int) -> list[int]:
    """Number of arrangements of n 'worse' and m 'better' values per value of U (0..n*m)."""
    # f(i, j) = f(i-1, j) shifted by j (the largest value is 'worse') + f(i, j-1)
    prev = [[1] for _ in range(m + 1)]  # i = 0: U = 0 only
    for _ in range(n):
        cur = [[1]]  # j = 0: U = 0 only
        for j in range(1, m + 1):
            a, b = [0] * j + prev[j], cur[j - 1]
            size = max(len(a), len(b))
            cur.append([(a[k] if k < len(a) else 0) + (b[k] if k < len(b) else 0) for k in range(size)])
        prev = cur
    return prev[m]


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def baseline_noise(per_run: list[dict[str, float]]) -> tuple[float, float]:
    """``(sigma, shift_sd)`` in ``log`` units from repeated baseline runs (one ``{case: log value}`` per
    run), neither of which a NEW run can move:

    * ``shift_sd``: how far a whole run moves. A run's *shift* is the median over its cases of its
      ``log`` value minus the case's mean over the runs; ``shift_sd`` is the sample standard deviation
      of the runs' shifts (NaN with fewer than two runs of :data:`MIN_CASES_FOR_SPREAD` cases);
    * ``sigma``: how far one case moves against the rest of its run: every value minus its case's mean
      and its run's shift, scaled by ``sqrt(n / (n - 1))`` (n runs of that case), then 1.4826 * the
      median absolute value over all of them (NaN with fewer than :data:`MIN_CASES_FOR_SPREAD` cases
      of two runs or more)."""
    cases: dict[str, list[tuple[int, float]]] = {}
    for j, run in enumerate(per_run):
        for k, v in run.items():
            if math.isfinite(v):
                cases.setdefault(k, []).append((j, v))
    cases = {k: vs for k, vs in cases.items() if len(vs) >= 2}
    mean = {k: sum(v for _, v in vs) / len(vs) for k, vs in cases.items()}
    shifts: dict[int, float] = {}
    for j in range(len(per_run)):
        devs = [v - mean[k] for k, vs in cases.items() for jj, v in vs if jj == j]
        if len(devs) >= MIN_CASES_FOR_SPREAD:
            shifts[j] = _median(devs)
    res = []
    for k, vs in cases.items():
        scale = math.sqrt(len(vs) / (len(vs) - 1))
        res += [abs(v - mean[k] - shifts.get(j, 0.0)) * scale for j, v in vs]
    sigma = 1.4826 * _median(res) if len(cases) >= MIN_CASES_FOR_SPREAD else float("nan")
    if len(shifts) >= 2:
        xs = list(shifts.values())
        mu = sum(xs) / len(xs)
        shift_sd = math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))
    else:
        shift_sd = float("nan")
    return sigma, shift_sd


def t_quantile(p: float, dof: float) -> float:
    """The ``p`` quantile of Student's t with ``dof`` degrees of freedom (the normal one for ``dof`` =
    inf): bisection on the CDF, integrated with Simpson's rule (accurate to 1e-6 here)."""
    if not 0.5 <= p < 1:
        raise ValueError(f"p = {p}: expected 0.5 <= p < 1")
    if math.isinf(dof):

        def cdf(x):
            return 0.5 * (1 + math.erf(x / math.sqrt(2)))
    else:
        c = math.exp(math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)) / math.sqrt(dof * math.pi)

        def pdf(x):
            return c * (1 + x * x / dof) ** (-(dof + 1) / 2)

        def cdf(x):
            n = 2000
            h = x / n
            acc = pdf(0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
            return 0.5 + acc * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


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
class Gate:
    """The settings of the noise test (``cpbench compare --help``)."""

    threshold: float = DEFAULT_THRESHOLD
    alpha: float = DEFAULT_ALPHA
    z: float = DEFAULT_Z
    run_noise: float | None = None  # None: DEFAULT_RUN_NOISE
    min_shift: float | None = None  # None: DEFAULT_MIN_SHIFT raw, DEFAULT_MIN_SHIFT_NORM load-normalised
    load_ref: bool = True  # judge metric / ref_ms where every run has ref_ms

    def run_noise_for(self, normalised: bool) -> float:
        """One default for both bases: one baseline run cannot measure how far a case moves alone,
        which the load reference hardly narrows (x1.13 to x1.25 per case, load-normalised, against
        x1.24 to x1.73 raw, in results/cpu-compare-gate-20261202)."""
        return self.run_noise if self.run_noise is not None else DEFAULT_RUN_NOISE

    def min_shift_for(self, normalised: bool) -> float:
        if self.min_shift is not None:
            return self.min_shift
        return DEFAULT_MIN_SHIFT_NORM if normalised else DEFAULT_MIN_SHIFT


@dataclass
class MetricNoise:
    """What the gate used for one metric, in ``log`` units (``exp`` of them are the ratios shown)."""

    runs_old: int  # baseline runs
    runs_new: int
    sigma: float  # one case against the rest of its run, run to run
    shift_sd: float  # a whole run, run to run
    measured: bool  # both from the baseline runs (else --run-noise)
    cases: int  # cases compared
    shift: float  # NEW's whole-run shift: the median log(new/old) (NaN below MIN_CASES_FOR_SPREAD)
    shift_bar: float
    case_bar: float
    samples_test: bool = True  # False when the samples cannot reach --alpha
    normalised: bool = False  # judged on metric / ref_ms (the same-run load reference)
    basis_note: str = ""  # why not normalised
    min_shift: float = DEFAULT_MIN_SHIFT  # the --min-shift used
    run_noise: float = DEFAULT_RUN_NOISE  # the --run-noise that would stand in with one baseline run

    def as_dict(self) -> dict[str, Any]:
        def x(v):
            return round(math.exp(v), 4) if math.isfinite(v) else None

        return {
            "runs_old": self.runs_old,
            "runs_new": self.runs_new,
            "run_noise": x(self.sigma),
            "shift_noise": x(self.shift_sd),
            "run_noise_measured": self.measured,
            "cases": self.cases,
            "case_bar": x(self.case_bar),
            "shift": x(self.shift),
            "shift_bar": x(self.shift_bar),
            "samples_test": self.samples_test,
            "basis": "load-normalised" if self.normalised else "raw",
            "basis_note": self.basis_note,
            "min_shift": self.min_shift,
            "assumed_run_noise": self.run_noise,
        }


@dataclass
class Comparison:
    keys: list[str]
    metrics: list[str]
    rows: list[dict[str, Any]]  # one per (case, metric)
    gate: Gate = field(default_factory=Gate)
    names: tuple[list[str], list[str]] = ((), ())
    only_old: list[str] = field(default_factory=list)
    only_new: list[str] = field(default_factory=list)
    columns_only_old: list[str] = field(default_factory=list)
    columns_only_new: list[str] = field(default_factory=list)
    not_compared: list[str] = field(default_factory=list)
    no_longer_ok: list[str] = field(default_factory=list)  # ok in OLD, skipped in NEW: lost coverage
    unreadable: list[str] = field(default_factory=list)
    noise: dict[str, MetricNoise] = field(default_factory=dict)

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


@dataclass
class _Side:
    """One side's runs, joined by case key."""

    name: str
    frames: list  # DataFrames with a _key column
    names: list[str]
    records: list[dict[str, dict]] = field(default_factory=list)  # per run: key -> row

    def keys(self) -> set[str]:
        return set().union(*(r.keys() for r in self.records))

    def rows(self, key: str) -> list[tuple[str, dict]]:
        return [(nm, r[key]) for nm, r in zip(self.names, self.records, strict=True) if key in r]

    def status(self, key: str) -> str:
        sts = [r.get("status") for _, r in self.rows(key)]
        if "ok" in sts:
            return "ok"
        if "error" in sts:
            return "error"
        return str(sts[0]) if sts else "absent"


def _as_runs(x, name) -> tuple[list, list[str]]:
    import pandas as pd

    if isinstance(x, pd.DataFrame):
        return [x], [name]
    frames = list(x)
    if isinstance(name, str):
        names = [name] if len(frames) == 1 else [f"{name}#{i + 1}" for i in range(len(frames))]
    else:
        names = list(name)
    if not frames:
        raise ResultsError(f"{name}: no run given")
    return frames, names


def compare(
    old,
    new,
    *,
    metrics=("layer_ms",),
    threshold: float = DEFAULT_THRESHOLD,
    ignore=(),
    names=("OLD", "NEW"),
    alpha: float = DEFAULT_ALPHA,
    z: float = DEFAULT_Z,
    run_noise: float | None = None,
    min_shift: float | None = None,
    load_ref: bool = True,
) -> Comparison:
    """Compare the baseline's runs with NEW's (see the module docstring). ``old`` and ``new`` are a
    results DataFrame or a list of them (runs of the same code); ``names`` the side's name or one name
    per run. ``run_noise`` / ``min_shift`` None: the default of the basis (raw or load-normalised);
    ``load_ref`` False: judge raw times even where every run has ``ref_ms``. Raises ResultsError when
    the inputs cannot be compared or hold impossible values."""
    gate = Gate(
        threshold=threshold, alpha=alpha, z=z, run_noise=run_noise, min_shift=min_shift, load_ref=load_ref
    )
    o_frames, o_names = _as_runs(old, names[0])
    n_frames, n_names = _as_runs(new, names[1])
    everything = list(zip(o_frames + n_frames, o_names + n_names, strict=True))
    keys = [k for k in CASE_KEY if k not in ignore]
    # the layer's shape is part of a case too, where every file records it
    keys += [k for k in LAYER_KEY if all(k in df.columns for df, _ in everything) and k not in ignore]
    for df, nm in everything:
        missing = [k for k in keys if k not in df.columns]
        if missing:
            raise ResultsError(f"{nm}: missing key column(s) {', '.join(missing)}: not a cpbench results CSV")
    metrics = list(metrics)
    for m in metrics:
        where = [nm for df, nm in everything if m not in df.columns]
        if where:
            raise ResultsError(f"metric {m!r} is not a column of {' and '.join(where)}")
        empty = [nm for df, nm in everything if not _has_numbers(df[m])]
        if empty:
            raise ResultsError(f"metric {m!r} has no numeric value in {' and '.join(empty)}")
    # the load reference: every run of both sides must have it, else the raw rule (and the output says why)
    lacking = [nm for df, nm in everything if REF not in df.columns or not _has_numbers(df[REF])]
    if not load_ref:
        basis_note = "--no-load-ref"
    elif lacking:
        more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
        basis_note = f"no {REF} in {', '.join(lacking[:3])}{more}"
    else:
        basis_note = ""
    use_ref = load_ref and not lacking
    sides = []
    for frames, nms, side_name in ((o_frames, o_names, "OLD"), (n_frames, n_names, "NEW")):
        side = _Side(side_name, [], nms)
        for df, nm in zip(frames, nms, strict=True):
            df = df.assign(_key=_key_text(df, keys))
            dup = df["_key"][df["_key"].duplicated()]
            if len(dup):
                raise ResultsError(f"{nm}: {len(dup)} duplicated case key(s), e.g. {dup.iloc[0]}")
            _check_possible(df, nm, metrics + ([REF] if use_ref else []))
            side.frames.append(df)
            side.records.append({r["_key"]: r for r in df.to_dict("records")})
        sides.append(side)
    o_side, n_side = sides
    cmp = Comparison(keys=keys, metrics=metrics, rows=[], gate=gate, names=(o_names, n_names))
    cmp.columns_only_old = [c for c in o_frames[0].columns if c not in n_frames[0].columns]
    cmp.columns_only_new = [c for c in n_frames[0].columns if c not in o_frames[0].columns]
    ok_set, nk_set = o_side.keys(), n_side.keys()
    cmp.only_old = sorted(ok_set - nk_set)
    cmp.only_new = sorted(nk_set - ok_set)
    common = ok_set & nk_set
    if not common:
        o_label = o_names[0] if len(o_names) == 1 else f"the {len(o_names)} baseline runs"
        n_label = n_names[0] if len(n_names) == 1 else f"the {len(n_names)} new runs"
        raise ResultsError(
            f"{o_label} and {n_label} have no case in common ({len(ok_set)} vs {len(nk_set)} cases): they "
            f"come from different sweeps (differing key columns: "
            f"{', '.join(_differing(o_frames[0], n_frames[0], keys)) or 'none'}); --ignore COLS drops key "
            f"columns from the join"
        )
    # per metric: the cases to judge, each side's per-run values and pooled samples
    pending: list[dict[str, Any]] = []
    for key in sorted(common):
        so, sn = o_side.status(key), n_side.status(key)
        first = o_side.rows(key)[0][1]
        if so == "ok" and sn == "error":
            err = next((r.get("error", "") for _, r in n_side.rows(key) if r.get("status") == "error"), "")
            for m in metrics:
                cmp.rows.append(_row(first, keys, m, "regressed", note=f"now error: {err}"))
            continue
        if so == "ok" and sn != "ok":
            cmp.no_longer_ok.append(f"{key}: {so} -> {sn}")
            continue
        if so != "ok" or sn != "ok":
            cmp.not_compared.append(f"{key}: {so} -> {sn}")
            continue
        for m in metrics:
            norm = use_ref and normalisable(m)
            item = {"key": key, "first": first, "metric": m, "old": [], "new": [], "s_old": [], "s_new": []}
            item["iqr_old"], item["iqr_new"], item["raw_old"], item["raw_new"] = [], [], [], []
            item["norm"] = norm
            bad = False
            for side, vals, raws, samp, iqrs in (
                (o_side, item["old"], item["raw_old"], item["s_old"], item["iqr_old"]),
                (n_side, item["new"], item["raw_new"], item["s_new"], item["iqr_new"]),
            ):
                for nm, rec in side.rows(key):
                    if rec.get("status") != "ok":
                        continue
                    problem, v, raw, s = _judged(rec, m, norm)
                    if problem:
                        cmp.unreadable.append(f"{key}: {problem} in {nm}")
                        bad = True
                        continue
                    vals.append(v)
                    raws.append(raw)
                    iqrs.append(noise(rec, m) * (v / raw if raw and math.isfinite(v / raw) else 1.0))
                    if s is not None:
                        samp.append(s)
            present = [[v for v in item[s] if math.isfinite(v)] for s in ("old", "new")]
            item["raw_old"], item["raw_new"] = (
                [v for v in item[s] if math.isfinite(v)] for s in ("raw_old", "raw_new")
            )
            if bad or (bool(present[0]) != bool(present[1])):
                if not bad:
                    side = n_name_of(cmp) if not present[1] else o_name_of(cmp)
                    cmp.unreadable.append(f"{key}: {m} empty in {side} only")
                cmp.rows.append(_row(first, keys, m, "n/a", note="unreadable"))
                continue
            if not present[0]:  # not applicable on both sides (comm_ms at cp 1)
                cmp.rows.append(_row(first, keys, m, "n/a"))
                continue
            item["old"], item["new"] = present
            pending.append(item)
    k, n_new = len(o_frames), len(n_frames)
    spread = math.sqrt(1 / k + 1 / n_new)
    for m in metrics:
        norm = use_ref and normalisable(m)
        items = [it for it in pending if it["metric"] == m]
        sigma, shift_sd = baseline_noise(_per_run_logs(o_side, m, {it["key"] for it in items}, norm))
        measured = math.isfinite(sigma) and math.isfinite(shift_sd)
        if measured:
            q = t_quantile(1 - alpha, k - 1)  # a prediction bound from k baseline runs
        else:
            sigma = shift_sd = math.log1p(gate.run_noise_for(norm))
            q = t_quantile(1 - alpha, math.inf)
        min_shift_m = gate.min_shift_for(norm)
        logs = [_center(it["new"]) - _center(it["old"]) for it in items]
        logs = [v for v in logs if math.isfinite(v)]
        shift = _median(logs) if len(logs) >= MIN_CASES_FOR_SPREAD else float("nan")
        cmp.noise[m] = MetricNoise(
            runs_old=k,
            runs_new=n_new,
            sigma=sigma,
            shift_sd=shift_sd,
            measured=measured,
            cases=len(items),
            shift=shift,
            shift_bar=math.log1p(min_shift_m) + q * shift_sd * spread,
            case_bar=z * sigma * spread,
            normalised=norm,
            basis_note="" if norm else (basis_note or f"{m} is not a time"),
            min_shift=min_shift_m,
            run_noise=gate.run_noise_for(norm),
        )
        for it in items:
            v, note = _judge(cmp, it)
            cmp.rows.append(_row(it["first"], keys, m, v, note=note, item=it))
    return cmp


def o_name_of(cmp: Comparison) -> str:
    return "OLD" if len(cmp.names[0]) != 1 else cmp.names[0][0]


def n_name_of(cmp: Comparison) -> str:
    return "NEW" if len(cmp.names[1]) != 1 else cmp.names[1][0]


def _center(values: list[float]) -> float:
    """A side's value in log units: the mean over its runs of ``log`` value, i.e. the geometric mean
    (NaN if not all > 0)."""
    if not values or any(v <= 0 for v in values):
        return float("nan")
    return sum(math.log(v) for v in values) / len(values)


def _per_run_logs(side: _Side, metric: str, keys: set[str], norm: bool = False) -> list[dict[str, float]]:
    """Per run of the side: ``{case: log value}`` of its ok rows with a judged value > 0."""
    out = []
    for rec in side.records:
        logs = {}
        for k in keys & rec.keys():
            if rec[k].get("status") != "ok":
                continue
            problem, v, _, _ = _judged(rec[k], metric, norm, samples=False)
            if not problem and v > 0:
                logs[k] = math.log(v)
        out.append(logs)
    return out


def _judged(
    rec: dict, metric: str, norm: bool, samples: bool = True
) -> tuple[str, float, float, list[float] | None]:
    """``(problem, judged value, raw value, judged samples or None)`` of one ok row. Load-normalised
    (``norm``): the value over the row's ``ref_ms`` (a rate times it), the samples (times) over the
    reference's sample of the same iteration (over ``ref_ms`` where the counts differ). ``problem``:
    why the row cannot be read ("" when it can); an empty metric cell is NaN, not a problem."""
    from .metrics import parse_samples

    v, readable = _cell_number(rec.get(metric))
    if not readable:
        return f"{metric}: {rec.get(metric)!r}", math.nan, math.nan, None
    raw, r = v, 1.0
    if norm and math.isfinite(v):
        r, ok = _cell_number(rec.get(REF))
        if not (ok and math.isfinite(r) and r > 0):
            return f"{REF} {rec.get(REF)!r} (needed to normalise {metric})", math.nan, math.nan, None
        v = v * r if higher_is_better(metric) else v / r
    col = samples_column(metric)
    if not samples or col is None or col not in rec:
        return "", v, raw, None
    try:
        xs = parse_samples(rec[col])
    except ValueError:
        return f"{col} is not a list of numbers", math.nan, math.nan, None
    if norm and xs:
        try:
            rs = parse_samples(rec.get(REF_SAMPLES))
        except ValueError:
            rs = []
        xs = [x / q for x, q in zip(xs, rs, strict=True)] if len(rs) == len(xs) else [x / r for x in xs]
    return "", v, raw, xs


def _judge(cmp: Comparison, it: dict[str, Any]) -> tuple[str, str]:
    """The verdict of one case and metric (see the module docstring) and a note on why."""
    m, gate = it["metric"], cmp.gate
    lo, ln = _center(it["old"]), _center(it["new"])
    if not (math.isfinite(lo) and math.isfinite(ln)):
        return "n/a", ""
    d = ln - lo  # log(new/old)
    rel = math.expm1(d)  # new/old - 1
    worse = -rel if higher_is_better(m) else rel
    if abs(worse) <= gate.threshold:
        return "same", ""
    direction = "regressed" if worse > 0 else "improved"
    s_old = [x for s in it["s_old"] for x in s]
    s_new = [x for s in it["s_new"] for x in s]
    nz = cmp.noise[m]
    if s_old and s_new:
        if smallest_p(len(s_new), len(s_old)) > gate.alpha:
            nz.samples_test = False
        else:
            # the samples are the times behind the metric: worse means slower for times and rates alike
            p = mann_whitney_p(s_new, s_old) if worse > 0 else mann_whitney_p(s_old, s_new)
            if p > gate.alpha:
                return "noise", f"samples overlap (p={p:.2g})"
    else:
        old, new = math.exp(lo), math.exp(ln)
        bar = _median(it["iqr_old"]) / 2 + _median(it["iqr_new"]) / 2
        if abs(new - old) <= bar:
            return "noise", "inside the IQRs"
    shift = nz.shift if math.isfinite(nz.shift) else 0.0
    alone = d - shift  # the case against the rest of its run
    if (alone > nz.case_bar and d > 0) or (alone < -nz.case_bar and d < 0):
        return direction, f"the case alone x{math.exp(alone):.2f}, past x{math.exp(nz.case_bar):.2f}"
    if (shift > nz.shift_bar and d > 0) or (shift < -nz.shift_bar and d < 0):
        return direction, f"whole run x{math.exp(shift):.2f}, past x{math.exp(nz.shift_bar):.2f}"
    return "noise", "inside the run-to-run noise"


def _check_possible(df, name: str, metrics: list[str]) -> None:
    """Impossible values in ok rows are errors: a :func:`positive` metric <= 0, a sample <= 0."""
    from .metrics import parse_samples

    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    for m in metrics:
        cols = [m] + ([samples_column(m)] if samples_column(m) in df.columns else [])
        for col in cols:
            for key, v in zip(ok["_key"], ok[col], strict=True):
                if col == m:
                    x, readable = _cell_number(v)
                    if readable and math.isfinite(x) and positive(m) and x <= 0:
                        raise ResultsError(f"{name}: {key}: {m} = {v!r} is impossible (must be > 0)")
                else:
                    try:
                        xs = parse_samples(v)
                    except ValueError:
                        continue  # unreadable: counted by the comparison
                    if any(x <= 0 for x in xs):
                        raise ResultsError(f"{name}: {key}: {col} holds a sample <= 0: {str(v)[:60]!r}")


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


def _row(
    rec: dict, keys: list[str], metric: str, verdict_: str, note: str = "", item: dict | None = None
) -> dict[str, Any]:
    judged = float("nan")
    if item is not None:
        lo, ln = _center(item["raw_old"]), _center(item["raw_new"])
        o = math.exp(lo) if math.isfinite(lo) else float("nan")
        n = math.exp(ln) if math.isfinite(ln) else float("nan")
        runs_old, runs_new = list(item["raw_old"]), list(item["raw_new"])
        jo, jn = _center(item["old"]), _center(item["new"])
        judged = math.exp(jn - jo) if math.isfinite(jo) and math.isfinite(jn) else float("nan")
    else:
        o = n = float("nan")
        runs_old = runs_new = []
    ratio = n / o if (math.isfinite(o) and math.isfinite(n) and o != 0) else float("nan")
    normed = item is not None and item["norm"]
    judged = judged if item is not None else ratio
    key = {k: rec.get(k) for k in keys}
    return {
        **key,
        "metric": metric,
        "old": o,
        "new": n,
        "ratio": ratio,
        "norm_ratio": judged if normed else float("nan"),
        "old_runs": runs_old,
        "new_runs": runs_new,
        "verdict": verdict_,
        "note": note,
        "badness": (1 / judged if higher_is_better(metric) else judged)
        if judged == judged and judged != 0
        else math.inf,
    }


# ----------------------------------------------------------------------------------------------- output


def _noise_line(cmp: Comparison, m: str) -> str:
    nz, gate = cmp.noise.get(m), cmp.gate
    direction = "higher is better" if higher_is_better(m) else "lower is better"
    if nz is None:
        return f"{m} ({direction}): no case compared"
    source = (
        "measured on the baseline runs"
        if nz.measured
        else "ASSUMED (--run-noise): one baseline run cannot measure it; give two or more"
    )
    shift = (
        f"NEW's whole run x{math.exp(nz.shift):.3f}, counts past x{math.exp(nz.shift_bar):.3f}"
        if math.isfinite(nz.shift)
        else f"whole-run shift not tested (< {MIN_CASES_FOR_SPREAD} cases)"
    )
    samples = "" if nz.samples_test else "; samples test off (too few samples to reach --alpha)"
    basis = (
        f"judged load-normalised: {m} / {REF} (the same-run load reference, per-iteration ratios)"
        if nz.normalised
        else f"judged on raw {m} ({nz.basis_note or 'no load reference'})"
    )
    return (
        f"{m} ({direction}): {basis}; {nz.runs_old} baseline run(s) vs {nz.runs_new}; "
        f"threshold {gate.threshold:.1%}, min shift {nz.min_shift:.0%}; "
        f"run-to-run noise {source}: a case x{math.exp(nz.sigma):.3f}, a whole run "
        f"x{math.exp(nz.shift_sd):.3f}; a case alone counts past x{math.exp(nz.case_bar):.2f}; {shift}{samples}"
    )


def _sorted_rows(cmp: Comparison, only_changed: bool) -> list[dict[str, Any]]:
    changed = ("regressed", "improved", "noise")
    rows = cmp.rows if not only_changed else [r for r in cmp.rows if r["verdict"] in changed]
    return sorted(rows, key=lambda r: -r["badness"] if r["badness"] == r["badness"] else 0)


def _varying(cmp: Comparison) -> list[str]:
    """Key columns that vary over the rows (``docs`` and ``density`` are in ``packing``'s label)."""
    shown = [k for k in cmp.keys if not (k in ("docs", "density") and "packing" in cmp.keys)]
    return [k for k in shown if len({str(r[k]) for r in cmp.rows}) > 1] or ["cp_size"]


def _lists(cmp: Comparison) -> list[tuple[str, str, list[str]]]:
    """``(title, json key, items)`` of the coverage lists."""
    return [
        ("cases only in OLD", "only_old", cmp.only_old),
        ("cases only in NEW", "only_new", cmp.only_new),
        ("cases ok in OLD, not in NEW", "no_longer_ok", cmp.no_longer_ok),
        ("unreadable cells", "unreadable", cmp.unreadable),
        ("not compared (status not ok in both)", "not_compared", cmp.not_compared),
        ("columns only in OLD", "columns_only_old", cmp.columns_only_old),
        ("columns only in NEW", "columns_only_new", cmp.columns_only_new),
    ]


def _summary(cmp: Comparison) -> str:
    n_cases = len({tuple(str(r[k]) for k in cmp.keys) for r in cmp.rows})
    n_noise = sum(r["verdict"] == "noise" for r in cmp.rows)
    return (
        f"{n_cases} case(s) compared: {len(cmp.regressions)} regression(s), {len(cmp.improvements)} "
        f"improvement(s), {n_noise} change(s) within the noise"
    )


def _normalised(cmp: Comparison) -> bool:
    """Whether any metric was judged load-normalised (the tables then show that ratio too)."""
    return any(nz.normalised for nz in cmp.noise.values())


def _cells(cmp: Comparison, r: dict[str, Any], varying: list[str]) -> list[str]:
    from .report import _fmt_number

    m = r["metric"]
    norm = (
        [f"{r['norm_ratio']:.3f}" if r["norm_ratio"] == r["norm_ratio"] else "-"] if _normalised(cmp) else []
    )
    return [
        *[_fmt_number(k, r[k]) for k in varying],
        _fmt_number(m, r["old"]),
        _fmt_number(m, r["new"]),
        f"{r['ratio']:.3f}" if r["ratio"] == r["ratio"] else "-",
        *norm,
        r["verdict"] + (f": {r['note']}" if r["note"] else ""),
    ]


#: The column of the load-normalised ratio (``(new / new ref) / (old / old ref)``).
NORM_COLUMN = "new/old per ref"


def render(
    cmp: Comparison, *, only_changed: bool = False, console=None, failures=(), fmt: str = "text"
) -> None:
    """Print the comparison: ``fmt`` ``text`` (rich tables), ``markdown`` or ``json``."""
    if fmt == "json":
        import json

        print(json.dumps(as_json(cmp, failures=failures, only_changed=only_changed), indent=1, default=str))
        return
    if fmt == "markdown":
        print(as_markdown(cmp, failures=failures, only_changed=only_changed))
        return
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from .report import NUMERIC_KEYS, make_console

    console = console or make_console()
    rows = _sorted_rows(cmp, only_changed)
    varying = _varying(cmp)
    style = {"regressed": "bold red", "improved": "green", "same": "", "noise": "yellow", "n/a": "dim"}
    for m in cmp.metrics:
        console.print(_noise_line(cmp, m), highlight=False, markup=False)
        t = Table(
            box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True, header_style="bold"
        )
        for k in varying:
            t.add_column(k, no_wrap=True, justify="right" if k in NUMERIC_KEYS else "left")
        for c in ("old", "new", "new/old", *([NORM_COLUMN] if _normalised(cmp) else [])):
            t.add_column(c, justify="right", no_wrap=True)
        t.add_column("verdict", overflow="fold")
        for r in (r for r in rows if r["metric"] == m):
            cells = _cells(cmp, r, varying)
            t.add_row(*cells[:-1], Text(cells[-1], style=style[r["verdict"]] or ""))
        console.print(t)
    for title, _, items in _lists(cmp):
        if items:
            console.print(f"{title} ({len(items)}):", highlight=False, markup=False)
            for it in items[:20]:
                console.print(f"  {it}", highlight=False, markup=False)
            if len(items) > 20:
                console.print(f"  ... {len(items) - 20} more", highlight=False)
    console.print(_summary(cmp), highlight=False)
    console.print(
        "gate: FAIL: " + "; ".join(failures) if failures else "gate: pass", highlight=False, markup=False
    )


def as_markdown(cmp: Comparison, *, failures=(), only_changed: bool = False) -> str:
    """GitHub-flavoured Markdown: the gate's verdict first, one table per metric, the lists."""
    from .report import NUMERIC_KEYS, markdown_table

    rows = _sorted_rows(cmp, only_changed)
    varying = _varying(cmp)
    out = ["**gate: FAIL**: " + "; ".join(failures) if failures else "**gate: pass**", "", _summary(cmp), ""]
    for m in cmp.metrics:
        out += [_noise_line(cmp, m), ""]
        body = [_cells(cmp, r, varying) for r in rows if r["metric"] == m]
        extra = [NORM_COLUMN] if _normalised(cmp) else []
        right = [k in NUMERIC_KEYS for k in varying] + [True, True, True] + [True] * len(extra) + [False]
        out += [markdown_table([*varying, "old", "new", "new/old", *extra, "verdict"], body, right), ""]
    for title, _, items in _lists(cmp):
        if items:
            out.append(f"{title} ({len(items)}):")
            out += [f"- `{it}`" for it in items[:50]]
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def as_json(cmp: Comparison, *, failures=(), only_changed: bool = False) -> dict[str, Any]:
    """Everything a script needs: ``gate`` (``pass``/``fail``), ``exit_code``, the failures, the noise
    figures per metric, one record per case and metric, and the coverage lists."""

    def clean(v):
        return None if isinstance(v, float) and not math.isfinite(v) else v

    cases = [{k: clean(v) for k, v in r.items() if k != "badness"} for r in _sorted_rows(cmp, only_changed)]
    return {
        "gate": "fail" if failures else "pass",
        "exit_code": 1 if failures else 0,
        "failures": list(failures),
        "baseline": list(cmp.names[0]),
        "new": list(cmp.names[1]),
        "settings": {
            "threshold": cmp.gate.threshold,
            "alpha": cmp.gate.alpha,
            "z": cmp.gate.z,
            "run_noise": cmp.gate.run_noise,
            "min_shift": cmp.gate.min_shift,
            "load_ref": cmp.gate.load_ref,
        },
        "metrics": {m: nz.as_dict() for m, nz in cmp.noise.items()},
        "regressions": len(cmp.regressions),
        "improvements": len(cmp.improvements),
        "cases": cases,
        **{key: list(items) for _, key, items in _lists(cmp)},
    }
