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
* Bandwidth is measured from the moment the last rank enters a collective, as nccl-tests measures it
  (its ranks start every call together): per iteration and region, the fastest rank's time (the rank
  that arrived last waited for no one; the others' extra time is waiting for it, i.e. load imbalance,
  not transfer), then the median over iterations: ``{region}_xfer_ms``; ``comm_xfer_ms`` is their sum
  per iteration, median. ``{region}_busbw_GBps`` and ``busbw_GBps`` / ``algbw_GBps`` come from these;
  ``comm_wait_ms = comm_ms - comm_xfer_ms`` is the time the slowest rank spent waiting inside them.
* Fake backend (one process standing in for rank 0 of the group): the communication regions
  are replaced by a model, ``t = S / algbw_model`` with ``algbw_model = busbw * n / (n - 1)``;
  the layer time becomes the layer timed with every collective suppressed (nothing moves: its compute
  and copies alone) + modeled *exposed* communication: all of it for blocking collectives,
  :func:`exposed_model` for ``overlap_chunks > 1``. (Without that run: measured - measured local
  copies + modeled exposed, which is right only while the copies block the compute stream, ``k = 1``.)
  Such rows say ``comm_model = modeled@<B>GBps``.
* Exposed communication (cp > 1): ``layer_nocomm_ms`` is the layer timed again with every collective
  suppressed (:func:`cp_core.comm.suppressed`), ``exposed_comm_ms = layer_ms - layer_nocomm_ms`` (the
  communication compute did not hide), ``overlap_pct = 100 * (1 - exposed / comm_ms)``, where
  ``comm_ms`` is the time of the communication regions (events on the stream that ran them): the
  share of the communication that ran concurrently with compute, as Holistic Trace Analysis defines
  overlap, here measured with events instead of a trace. Modeled (fake) rows: from the model.
* With ``--profile torch``, from each rank's trace (:mod:`cpbench.trace`, the kernels inside the measured
  iterations): ``trace_comm_ms`` (communication kernels' time per iteration, max over ranks),
  ``trace_overlap_pct`` (HTA's overlap: communication time with computation kernels running at once
  over communication time, the lowest rank) and ``trace_idle_ms`` (the compute stream's idle time in
  gaps of 0.05 ms or more per iteration, max over ranks).
* ``ref_ms``: the load reference timed beside every measured iteration (:class:`cpbench.runner.LoadReference`),
  as ``layer_ms``: per-iteration samples ``ref_ms_samples`` (the slowest rank per iteration), each rank's
  median, the slowest rank's; ``ref_iqr_ms`` the largest rank's IQR. Empty with ``run.load_ref = false``.
* ``warmup_s``: the wall time of the untimed warm-up iterations (first-call autotuning), max over ranks.
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


def _per_iteration(per_rank: Sequence[Sequence[float]], pick) -> list[float]:
    series = [s for s in per_rank if len(s)]  # ranks with no samples are ignored
    return [pick(vals) for vals in zip(*series, strict=False)] if series else []


def fastest_per_iteration(per_rank: Sequence[Sequence[float]]) -> list[float]:
    """Per iteration, the fastest rank's time: for a collective, its duration from the moment the last
    rank entered it."""
    return _per_iteration(per_rank, min)


def slowest_per_iteration(per_rank: Sequence[Sequence[float]]) -> list[float]:
    """Per iteration, the slowest rank's time (the group's pace in that iteration; ranks start each
    iteration together)."""
    return _per_iteration(per_rank, max)


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


def exposed_model(comm_s: float, compute_s: float, chunks: int) -> float:
    """Communication a pipeline of ``chunks`` head chunks leaves exposed, for one pass: ``comm_s`` of
    all-to-alls around ``compute_s`` of conv1d + SSD. The first chunk's transfer in and the last one's
    transfer out cannot overlap anything (``comm_s / k``); the rest hides behind the other chunks'
    compute as far as it lasts: ``max(comm_s / k, comm_s - compute_s * (k - 1) / k)``. ``k = 1``:
    ``comm_s`` (blocking collectives)."""
    if chunks <= 1:
        return comm_s
    return max(comm_s / chunks, comm_s - compute_s * (chunks - 1) / chunks)


def model_payload(
    payload: Mapping[str, Any],
    regions: Mapping[str, int],
    cp: int,
    busbw_gbps: float,
    chunks: int = 1,
    seconds: Mapping[str, float] | None = None,
) -> dict:
    """Replace the measured communication regions of a payload by modeled times, and adjust the layer.

    ``layer_fwd``/``layer_bwd`` become the payload's run with every collective suppressed
    (``nocomm``, ``nocomm_fwd``) plus the modeled exposed time (:func:`exposed_model`: all of it for
    blocking collectives, ``chunks = 1``; the regions named ``*_bwd`` belong to the backward). Without
    that run the local-copy time the fake collectives took is removed from the measured layer instead,
    which overstates the saving where the copies ran beside compute (``chunks > 1``). ``seconds``: the
    modeled time of every region, given (the topology model, :mod:`cpbench.topology`) instead of
    ``busbw_gbps`` over ``cp`` ranks.
    """
    iters = payload["iters"]
    times = {k: list(v) for k, v in payload.get("regions", {}).items()}
    nocomm, nocomm_fwd = payload.get("nocomm"), payload.get("nocomm_fwd")
    quiet = None  # per pass, the layer's per-iteration seconds with nothing moved
    if nocomm and nocomm_fwd and len(nocomm) == len(nocomm_fwd) == iters:
        quiet = {
            LAYER_FWD: list(nocomm_fwd),
            LAYER_BWD: [a - b for a, b in zip(nocomm, nocomm_fwd, strict=True)],
        }
    for layer, bwd in ((LAYER_FWD, False), (LAYER_BWD, True)):
        names = [r for r in regions if r.endswith(BWD_SUFFIX) == bwd]
        if not names:
            continue
        modeled = {
            r: seconds[r] if seconds is not None else modeled_seconds(regions[r], busbw_gbps, cp)
            for r in names
        }
        compute = times.get("ssm" + (BWD_SUFFIX if bwd else ""), [0.0] * iters)
        if layer in times:
            new = []
            for i, t in enumerate(times[layer]):
                exposed = exposed_model(sum(modeled.values()), compute[i], chunks)
                if quiet is not None:
                    new.append(quiet[layer][i] + exposed)
                else:
                    measured = sum(times.get(r, [0.0] * iters)[i] for r in names)
                    new.append(t - measured + exposed)
            times[layer] = new
        for r in names:
            times[r] = [modeled[r]] * iters
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
    chunks: int = 1,
    modeled: Mapping[str, float] | None = None,
    model_label: str | None = None,
) -> dict[str, Any]:
    """The measured columns of one case from every rank's payload.

    ``payload``: ``{"iters": n, "regions": {name: [seconds per iteration]}, "peak_mem_bytes": x,
    "backends": {...}, "n_collectives": k}``. ``bench``: message bytes -> per-rank series of
    microbenchmark all-to-all times (seconds). ``fake_busbw_gbps``: model the communication; ``modeled``
    (seconds per region, e.g. :func:`cpbench.topology.region_seconds`) and its ``model_label`` replace the
    single-link model.
    """
    regions = comm_regions(comm_bytes, backward)
    if fake_busbw_gbps is not None:
        payloads = [model_payload(p, regions, cp_size, fake_busbw_gbps, chunks, modeled) for p in payloads]
    iters = payloads[0]["iters"]
    row: dict[str, Any] = {"comm_model": comm_model_label(fake_busbw_gbps if regions else None)}
    if regions and fake_busbw_gbps is not None and model_label:
        row["comm_model"] = model_label

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
    refs = [list(p.get("ref") or []) for p in payloads]
    if all(len(r) == iters for r in refs) and iters:
        st = across_ranks(refs)
        row["ref_ms"], row["ref_iqr_ms"] = st["max"] * 1e3, st["iqr"] * 1e3
        row["ref_ms_samples"] = format_samples(slowest_per_iteration(refs))
    else:  # not timed (run.load_ref = false)
        row["ref_ms"] = row["ref_iqr_ms"] = NAN
        row["ref_ms_samples"] = ""
    if not regions:
        row["comm_ms"] = row["comm_min_ms"] = row["comm_iqr_ms"] = NAN
        row["comm_ms_samples"] = ""
    # each collective from the moment the last rank entered it (see the module's conventions)
    xfer = {
        r: fastest_per_iteration([p["regions"][r] for p in payloads if r in p.get("regions", {})])
        for r in regions
    }
    per_iter = [sum(v) for v in zip(*[s for s in xfer.values() if s], strict=False)]
    row["comm_xfer_ms"] = median(per_iter) * 1e3 if regions and per_iter else NAN
    row["comm_wait_ms"] = row["comm_ms"] - row["comm_xfer_ms"]

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
        t = median(xfer[r]) if xfer[r] else NAN
        row[f"{r}_xfer_ms"] = t * 1e3
        row[f"{r}_busbw_GBps"] = busbw(algbw(b, t), cp_size) / GB
    comm_s = row["comm_xfer_ms"] / 1e3
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
    row["conv_ssd_backend"] = backends.get("conv_ssd", "")
    row["norm_backend"] = backends.get("norm", "")
    warm = [p.get("warmup_s") for p in payloads if p.get("warmup_s") is not None]
    row["warmup_s"] = max(warm) if warm else NAN

    # from a --profile torch trace (per measured iteration): communication kernel time, HTA's overlap,
    # the compute stream's idle time; the worst rank
    traces = [p.get("trace") for p in payloads if p.get("trace")]
    row["trace_comm_ms"] = max(t["comm_ms"] for t in traces) if traces else NAN
    row["trace_overlap_pct"] = min((t["overlap_pct"] for t in traces), default=NAN) if traces else NAN
    row["trace_idle_ms"] = max(t["idle_ms"] for t in traces) if traces else NAN

    # exposed communication: the layer against the same layer with its collectives suppressed
    row["layer_nocomm_ms"] = row["exposed_comm_ms"] = row["overlap_pct"] = NAN
    nocomm = [p.get("nocomm") for p in payloads]
    if regions and fake_busbw_gbps is not None:
        # modeled: the layer already holds the modeled exposed time; remove it to get the compute alone
        exposed = []
        for p in payloads:
            fwd = _series(p, LAYER_FWD, iters)
            bwd = _series(p, LAYER_BWD, iters) if backward else [0.0] * iters
            nc = []
            for i in range(iters):
                t = fwd[i] + bwd[i]
                e = 0.0
                for bwd_pass in (False, True):
                    names = [r for r in regions if r.endswith(BWD_SUFFIX) == bwd_pass]
                    if names:
                        comp = _series(p, "ssm" + (BWD_SUFFIX if bwd_pass else ""), iters)[i]
                        e += exposed_model(sum(_series(p, r, iters)[i] for r in names), comp, chunks)
                nc.append(t - e)
            exposed.append(nc)
        nocomm = exposed
    if regions and nocomm and all(n for n in nocomm):
        st = across_ranks(nocomm)
        row["layer_nocomm_ms"] = st["max"] * 1e3
        row["exposed_comm_ms"] = row["layer_ms"] - row["layer_nocomm_ms"]
        if row["comm_ms"] > 0:
            row["overlap_pct"] = 100.0 * (1.0 - row["exposed_comm_ms"] / row["comm_ms"])
    return row


def names_in(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Column names of rows in first-seen order."""
    out: list[str] = []
    for r in rows:
        for k in r:
            if k not in out:
                out.append(k)
    return out
