"""Metric formulas and the aggregation of per-rank payloads into a row; the region timer."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpbench import metrics
from cpbench.metrics import GB, across_ranks, aggregate, algbw, busbw, iqr, median, modeled_seconds, quantile
from cpbench.timing import RegionTimer, installed

floats = st.floats(0.0, 1e3, allow_nan=False)


@settings(max_examples=100, deadline=None)
@given(st.lists(floats, min_size=1, max_size=40))
def test_quantiles_match_numpy(xs):
    assert median(xs) == pytest.approx(float(np.median(xs)), rel=1e-12, abs=1e-12)
    q75, q25 = np.percentile(xs, [75, 25])
    assert iqr(xs) == pytest.approx(float(q75 - q25), rel=1e-9, abs=1e-9)
    assert quantile(xs, 0.0) == min(xs) and quantile(xs, 1.0) == max(xs)


def test_empty_and_small_series():
    assert math.isnan(median([])) and math.isnan(iqr([]))
    assert median([3.0]) == 3.0 and iqr([3.0]) == 0.0
    assert median([1.0, 2.0, 10.0, 4.0]) == 3.0


def test_across_ranks_max_min_of_medians_and_max_iqr():
    r0 = [1.0, 2.0, 3.0, 4.0, 5.0]  # median 3, iqr 2
    r1 = [10.0, 10.0, 10.0, 10.0, 10.0]  # median 10, iqr 0
    r2 = [0.0, 1.0, 2.0, 7.0, 9.0]  # median 2, iqr 6
    st_ = across_ranks([r0, r1, r2, []])
    assert st_ == {"max": 10.0, "min": 2.0, "iqr": 6.0}
    assert all(math.isnan(v) for v in across_ranks([[], []]).values())


def test_bandwidth_formulas():
    assert algbw(4e9, 2.0) == 2e9
    assert busbw(8.0, 8) == 7.0
    assert busbw(10.0, 2) == 5.0
    assert math.isnan(busbw(10.0, 1))
    assert math.isnan(algbw(1.0, 0.0))
    # the model inverts busbw exactly: modeled time at B GB/s busbw gives back B
    for n in (2, 4, 8):
        t = modeled_seconds(123_456_789, 370.0, n)
        assert busbw(algbw(123_456_789, t), n) / GB == pytest.approx(370.0)
    assert modeled_seconds(1000, 370.0, 1) == 0.0
    assert (
        metrics.comm_model_label(None) == "measured" and metrics.comm_model_label(370.0) == "modeled@370GBps"
    )


def _payload(fwd, bwd, a2a_pre, a2a_pre_bwd, ssm, peak=float("nan")):
    return {
        "iters": len(fwd),
        "regions": {
            "layer_fwd": fwd,
            "layer_bwd": bwd,
            "a2a_pre": a2a_pre,
            "a2a_pre_bwd": a2a_pre_bwd,
            "ssm": ssm,
        },
        "peak_mem_bytes": peak,
        "backends": {"ssd": "torch", "conv": "torch"},
        "n_collectives": 2,
    }


def test_aggregate_measured():
    p0 = _payload([1.0, 1.2, 1.1], [2.0, 2.0, 2.4], [0.1, 0.2, 0.3], [0.1, 0.1, 0.1], [0.5, 0.5, 0.5], 2**30)
    p1 = _payload([1.5, 1.5, 1.5], [2.0, 2.1, 2.2], [0.4, 0.4, 0.4], [0.2, 0.2, 0.2], [0.6, 0.6, 0.7], 2**31)
    bench = {1000: [[0.1, 0.1, 0.1], [0.2, 0.2, 0.2]]}
    row = aggregate(
        [p0, p1], cp_size=2, backward=True, comm_bytes={"a2a_pre": 1000}, real_tokens=900, bench=bench
    )
    # layer: per-iteration fwd+bwd, median per rank (3.2 and 3.6), max/min across ranks
    assert row["layer_ms"] == pytest.approx(3600.0) and row["layer_min_ms"] == pytest.approx(3200.0)
    # comm: a2a_pre + a2a_pre_bwd per iteration: rank0 [.2,.3,.4] -> .3 ; rank1 .6
    assert row["comm_ms"] == pytest.approx(600.0) and row["comm_min_ms"] == pytest.approx(300.0)
    assert row["comm_iqr_ms"] == pytest.approx(100.0)
    assert row["ssm_ms"] == pytest.approx(600.0) and row["ssm_min_ms"] == pytest.approx(500.0)
    assert row["comm_bytes_fwd"] == 1000 and row["comm_bytes_bwd"] == 1000 and row["comm_bytes"] == 2000
    assert row["a2a_pre_bytes"] == 1000 and row["a2a_pre_bwd_bytes"] == 1000
    # bandwidth from the last rank to enter each collective: per iteration the fastest rank's time,
    # a2a_pre [.1,.2,.3] -> .2, a2a_pre_bwd [.1,.1,.1] -> .1; their sum per iteration [.2,.3,.4] -> .3
    assert row["a2a_pre_xfer_ms"] == pytest.approx(200.0)
    assert row["a2a_pre_bwd_xfer_ms"] == pytest.approx(100.0)
    assert row["comm_xfer_ms"] == pytest.approx(300.0) and row["comm_wait_ms"] == pytest.approx(300.0)
    assert row["algbw_GBps"] == pytest.approx(2000 / 0.3 / GB)
    assert row["busbw_GBps"] == pytest.approx(row["algbw_GBps"] / 2)
    assert row["a2a_pre_busbw_GBps"] == pytest.approx(1000 / 0.2 / 2 / GB)
    # microbenchmark: the slowest rank (0.2 s) per all-to-all, twice (fwd and bwd)
    assert row["bench_busbw_GBps"] == pytest.approx(2000 / 0.4 / 2 / GB)
    assert row["busbw_pct"] == pytest.approx(100 * row["busbw_GBps"] / row["bench_busbw_GBps"])
    assert row["tokens_per_s"] == pytest.approx(900 / 3.6)
    assert row["peak_mem_GiB"] == pytest.approx(2.0)
    assert row["comm_model"] == "measured" and row["ssd_backend"] == "torch"


def test_aggregate_forward_only_and_cpu_memory():
    p = _payload([1.0, 1.0, 1.0], [9.0, 9.0, 9.0], [0.1] * 3, [0.1] * 3, [0.2] * 3)
    row = aggregate([p], cp_size=2, backward=False, comm_bytes={"a2a_pre": 10}, real_tokens=10)
    assert row["layer_ms"] == pytest.approx(1000.0)  # layer_bwd is not part of a forward pass
    assert row["comm_ms"] == pytest.approx(100.0) and row["comm_bytes"] == 10 and row["comm_bytes_bwd"] == 0
    assert math.isnan(row["peak_mem_GiB"])
    assert math.isnan(row["bench_busbw_GBps"]) and math.isnan(row["busbw_pct"])
    row1 = aggregate([p], cp_size=1, backward=False, comm_bytes={}, real_tokens=10)
    assert math.isnan(row1["comm_ms"]) and math.isnan(row1["busbw_GBps"]) and row1["comm_bytes"] == 0


def test_aggregate_fake_models_communication():
    p = _payload([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [0.3, 0.3, 0.3], [0.2, 0.2, 0.2], [0.5] * 3)
    nbytes, cp, bw = 740_000_000, 2, 370.0
    row = aggregate(
        [p], cp_size=cp, backward=True, comm_bytes={"a2a_pre": nbytes}, real_tokens=1, fake_busbw_gbps=bw
    )
    t = nbytes / (bw * GB * cp / (cp - 1))  # 1 ms
    assert row["comm_model"] == "modeled@370GBps"
    assert row["a2a_pre_ms"] == pytest.approx(t * 1e3) and row["a2a_pre_bwd_ms"] == pytest.approx(t * 1e3)
    # the local copies (0.3 + 0.2) leave the layer, the model's time joins it
    assert row["layer_ms"] == pytest.approx((3.0 - 0.5 + 2 * t) * 1e3)
    assert row["busbw_GBps"] == pytest.approx(bw)
    assert row["ssm_ms"] == pytest.approx(500.0)  # compute regions stay measured


def test_fake_layer_is_the_quiet_run_plus_modeled_exposed():
    """With the run that moved nothing (collectives suppressed), a modeled layer is that run plus the
    modeled exposed time, for every k: copies that ran beside compute are not subtracted."""
    p = _payload([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], [0.3, 0.3, 0.3], [0.2, 0.2, 0.2], [0.5] * 3)
    p = {**p, "nocomm": [2.6, 2.8, 2.7], "nocomm_fwd": [0.9, 0.9, 0.9]}
    nbytes, cp, bw = 740_000_000, 2, 370.0
    t = nbytes / (bw * GB * cp / (cp - 1))  # 1 ms per pass
    for k, exposed in ((1, 2 * t), (2, max(t / 2, t - 0.5 / 2) + t)):  # ssm: 0.5 s forward, none backward
        row = aggregate(
            [p], cp_size=cp, backward=True, comm_bytes={"a2a_pre": nbytes}, real_tokens=1,
            fake_busbw_gbps=bw, chunks=k,
        )  # fmt: skip
        assert row["layer_ms"] == pytest.approx((2.7 + exposed) * 1e3), k
        assert row["layer_fwd_ms"] == pytest.approx((0.9 + exposed - t) * 1e3), k
        assert row["layer_nocomm_ms"] == pytest.approx(2.7e3) and row["exposed_comm_ms"] == pytest.approx(
            exposed * 1e3
        )


def test_region_timer_on_cpu_sums_occurrences_and_nests():
    timer = RegionTimer("cpu")
    timer.start_iteration(measure=True)
    with timer("outer"):
        for _ in range(2):
            with timer("inner"):
                time.sleep(0.01)
    times = timer.stop_iteration()
    assert times["inner"] >= 0.02
    assert times["outer"] >= times["inner"]
    timer.start_iteration(measure=False)  # warmup: ranges only, nothing timed
    with timer("inner"):
        pass
    assert timer.stop_iteration() == {}


def test_timer_is_cp_cores_region_hook():
    from cp_core.regions import region

    timer = RegionTimer("cpu", record_function=True)
    with installed(timer):
        timer.start_iteration()
        with region("ssm"):
            time.sleep(0.001)
        got = timer.stop_iteration()
    assert got["ssm"] >= 0.001
    with region("ssm"):  # uninstalled again: no effect on the timer
        pass
    assert timer.stop_iteration() == {}
