"""Formulas and aggregation: from per-rank, per-iteration region times to one results row.

Conventions (as nccl-tests):

* ``GB`` is 1e9 bytes; bandwidths are GB/s; times in the row are milliseconds.
* For an all-to-all (and the all-gather of state passing) of ``S`` bytes per rank (the whole
  send buffer of one rank, its own slice included) taking ``t`` seconds on ``n`` ranks:
  ``algbw = S / t`` and ``busbw = algbw * (n - 1) / n`` (the bytes that actually cross links).
* Statistics: on each rank, the median and the IQR (q75 - q25, linear interpolation) of a
  region's per-iteration time (the sum of the region's occurrences in that iteration); then
  across ranks the max and the min of the medians (``{region}_ms`` / ``{region}_min_ms``) and
  the max of the IQRs (``{region}_iqr_ms``). The slowest rank sets the pace of a CP group.
* ``layer_ms`` is ``layer_fwd`` (+ ``layer_bwd`` for ``fwd+bwd``), per iteration, then as above;
  ``comm_ms`` is the sum of the communication regions (those ``comm_bytes`` names, and their
  ``_bwd`` variants) per iteration, then as above.
* Fake backend (one process standing in for rank 0 of the group): the communication regions
  are replaced by a model, ``t = S / algbw_model`` with ``algbw_model = busbw * n / (n - 1)``;
  the layer time becomes measured - measured local copies + modeled communication (no overlap
  assumed: the layer's collectives are blocking). Such rows say ``comm_model = modeled@<B>GBps``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

GB = 1e9
GIB = 2**30
NAN = float("nan")

LAYER_FWD = "layer_fwd"
LAYER_BWD = "layer_bwd"
BWD_SUFFIX = "_bwd"


# ----------------------------------------------------------------------------------------------- statistics


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default); NaN for no values."""
    xs = sorted(values)
    if not xs:
        return NAN
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return quantile(values, 0.5)


def iqr(values: Sequence[float]) -> float:
    return quantile(values, 0.75) - quantile(values, 0.25) if values else NAN


def across_ranks(per_rank: Sequence[Sequence[float]]) -> dict[str, float]:
    """Per-iteration series of each rank -> ``{"max", "min", "iqr"}`` (seconds).

    ``max``/``min``: max/min over ranks of each rank's median; ``iqr``: max over ranks of each rank's IQR.
    Ranks with no samples are ignored; all NaN when none has any.
    """
    meds = [median(s) for s in per_rank if len(s)]
    iqrs = [iqr(s) for s in per_rank if len(s)]
    if not meds:
        return {"max": NAN, "min": NAN, "iqr": NAN}
    return {"max": max(meds), "min": min(meds), "iqr": max(iqrs)}


def slowest_per_iteration(per_rank: Sequence[Sequence[float]]) -> list[float]:
    """Per iteration, the slowest rank's time (the group's pace in that iteration; ranks start each
    iteration together). Ranks with no samples are ignored."""
    series = [s for s in per_rank if len(s)]
    if not series:
        return []
    return [max(vals) for vals in zip(*series, strict=False)]


def format_samples(seconds: Sequence[float]) -> str:
    """Per-iteration samples as one CSV cell: milliseconds, space-separated, 4 significant digits."""
    return " ".join(f"{s * 1e3:.4g}" for s in seconds if math.isfinite(s))


def parse_samples(cell: Any) -> list[float]:
    """The inverse of :func:`format_samples` (milliseconds); ``[]`` for an empty or missing cell.
    Raises ``ValueError`` on anything else."""
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return []
    text = str(cell).strip()
    if not text:
        return []
    out = [float(v) for v in text.split()]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"non-finite sample in {text[:40]!r}")
    return out


# ----------------------------------------------------------------------------------------------- bandwidth


def algbw(nbytes: float, seconds: float) -> float:
    """Bytes per second (NaN when the time is not positive)."""
    return nbytes / seconds if seconds > 0 and math.isfinite(seconds) else NAN


def busbw(alg: float, n: int) -> float:
    """nccl-tests bus bandwidth of an all-to-all / all-gather on ``n`` ranks (NaN for one rank)."""
    return alg * (n - 1) / n if n > 1 else NAN


def modeled_seconds(nbytes: float, busbw_gbps: float, n: int) -> float:
    """Time the model gives ``nbytes`` per rank on ``n`` ranks at ``busbw_gbps`` GB/s bus bandwidth."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    alg = busbw_gbps * GB * n / (n - 1)
    return nbytes / alg


def tokens_per_s(tokens: float, seconds: float) -> float:
    return tokens / seconds if seconds > 0 and math.isfinite(seconds) else NAN


def comm_model_label(busbw_gbps: float | None) -> str:
    return "measured" if busbw_gbps is None else f"modeled@{busbw_gbps:g}GBps"


# ----------------------------------------------------------------------------------------------- aggregation


def comm_regions(comm_bytes: Mapping[str, int], backward: bool) -> dict[str, int]:
    """Communication region -> bytes per rank for the pass (backward moves the same bytes again)."""
    out = {r: int(b) for r, b in comm_bytes.items()}
    if backward:
        out.update({r + BWD_SUFFIX: int(b) for r, b in comm_bytes.items()})
    return out


def _series(payload: Mapping[str, Any], name: str, iters: int) -> list[float]:
    s = payload.get("regions", {}).get(name)
    return list(s) if s is not None else [0.0] * iters


def model_payload(payload: Mapping[str, Any], regions: Mapping[str, int], cp: int, busbw_gbps: float) -> dict:
    """Replace the measured communication regions of a payload by modeled times, and adjust the layer.

    The local-copy time the fake collectives took is removed from ``layer_fwd``/``layer_bwd`` (the
    regions named ``*_bwd`` belong to the backward) and the modeled time added instead.
    """
    iters = payload["iters"]
    times = {k: list(v) for k, v in payload.get("regions", {}).items()}
    for r, nbytes in regions.items():
        modeled = modeled_seconds(nbytes, busbw_gbps, cp)
        measured = times.get(r, [0.0] * iters)
        layer = LAYER_BWD if r.endswith(BWD_SUFFIX) else LAYER_FWD
        if layer in times:
            times[layer] = [t - m + modeled for t, m in zip(times[layer], measured, strict=True)]
        times[r] = [modeled] * iters
    return {**payload, "regions": times}


def aggregate(
    payloads: Sequence[Mapping[str, Any]],
    *,
    cp_size: int,
    backward: bool,
    comm_bytes: Mapping[str, int],
    real_tokens: int,
    fake_busbw_gbps: float | None = None,
    bench: Mapping[int, Sequence[Sequence[float]]] | None = None,
) -> dict[str, Any]:
    """The measured columns of one case from every rank's payload.

    ``payload``: ``{"iters": n, "regions": {name: [seconds per iteration]}, "peak_mem_bytes": x,
    "backends": {...}, "n_collectives": k}``. ``bench``: message bytes -> per-rank series of
    microbenchmark all-to-all times (seconds). ``fake_busbw_gbps``: model the communication.
    """
    regions = comm_regions(comm_bytes, backward)
    if fake_busbw_gbps is not None:
        payloads = [model_payload(p, regions, cp_size, fake_busbw_gbps) for p in payloads]
    iters = payloads[0]["iters"]
    row: dict[str, Any] = {"comm_model": comm_model_label(fake_busbw_gbps if regions else None)}

    # layer and communication totals, per iteration on each rank
    layer = []
    comm = []
    for p in payloads:
        fwd = _series(p, LAYER_FWD, iters)
        bwd = _series(p, LAYER_BWD, iters) if backward else [0.0] * iters
        layer.append([a + b for a, b in zip(fwd, bwd, strict=True)])
        c = [0.0] * iters
        for r in regions:
            c = [a + b for a, b in zip(c, _series(p, r, iters), strict=True)]
        comm.append(c)
    for name, series in (("layer", layer), ("comm", comm)):
        st = across_ranks(series)
        row[f"{name}_ms"] = st["max"] * 1e3
        row[f"{name}_min_ms"] = st["min"] * 1e3
        row[f"{name}_iqr_ms"] = st["iqr"] * 1e3
        row[f"{name}_ms_samples"] = format_samples(slowest_per_iteration(series))
    if not regions:
        row["comm_ms"] = row["comm_min_ms"] = row["comm_iqr_ms"] = NAN
        row["comm_ms_samples"] = ""

    # every region that appeared on any rank
    names: list[str] = []
    for p in payloads:
        for n in p.get("regions", {}):
            if n not in names:
                names.append(n)
    per_region: dict[str, dict[str, float]] = {}
    for n in names:
        st = across_ranks([p["regions"][n] for p in payloads if n in p.get("regions", {})])
        per_region[n] = st
        row[f"{n}_ms"] = st["max"] * 1e3
        row[f"{n}_min_ms"] = st["min"] * 1e3
        row[f"{n}_iqr_ms"] = st["iqr"] * 1e3

    # bytes and bandwidth
    total = sum(regions.values())
    row["comm_bytes_fwd"] = sum(int(b) for b in comm_bytes.values())
    row["comm_bytes_bwd"] = row["comm_bytes_fwd"] if backward else 0
    row["comm_bytes"] = total
    for r, b in regions.items():
        row[f"{r}_bytes"] = b
        t = per_region.get(r, {}).get("max", NAN)
        row[f"{r}_busbw_GBps"] = busbw(algbw(b, t), cp_size) / GB
    comm_s = row["comm_ms"] / 1e3
    row["algbw_GBps"] = algbw(total, comm_s) / GB if total else NAN
    row["busbw_GBps"] = busbw(row["algbw_GBps"], cp_size) if total else NAN

    # the microbenchmark: the achievable busbw at the same message sizes on the same group
    row["bench_busbw_GBps"] = NAN
    row["busbw_pct"] = NAN
    if bench and total:
        bench_t = {nb: across_ranks(series)["max"] for nb, series in bench.items()}
        for r, b in regions.items():
            if b in bench_t:
                row[f"{r}_bench_busbw_GBps"] = busbw(algbw(b, bench_t[b]), cp_size) / GB
        if all(b in bench_t for b in regions.values()):
            t_bench = sum(bench_t[b] for b in regions.values())
            row["bench_busbw_GBps"] = busbw(algbw(total, t_bench), cp_size) / GB
            row["busbw_pct"] = 100.0 * row["busbw_GBps"] / row["bench_busbw_GBps"]

    # throughput, memory, what ran
    row["real_tokens"] = real_tokens
    row["tokens_per_s"] = tokens_per_s(real_tokens, row["layer_ms"] / 1e3)
    mems = [p.get("peak_mem_bytes", NAN) for p in payloads]
    mems = [m for m in mems if m is not None and math.isfinite(m)]
    row["peak_mem_GiB"] = max(mems) / GIB if mems else NAN
    backends = payloads[0].get("backends") or {}
    row["ssd_backend"] = backends.get("ssd", "")
    row["conv_backend"] = backends.get("conv", "")
    row["n_collectives"] = payloads[0].get("n_collectives", NAN)
    return row


def names_in(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Column names of rows in first-seen order."""
    out: list[str] = []
    for r in rows:
        for k in r:
            if k not in out:
                out.append(k)
    return out
