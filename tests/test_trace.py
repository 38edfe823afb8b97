"""cpbench.trace against hand-made chrome traces: HTA's overlap, the compute stream's gaps, the iteration
windows, and the ``cpbench trace`` command."""

import json
import math

import pytest

from cpbench import trace
from cpbench.cli import main


def _write(tmp_path, kernels, windows=(), name="t.json"):
    """kernels: (start_us, dur_us, stream, name); windows: (start_us, dur_us) of cpbench_iteration."""
    ev = [
        {"ph": "X", "cat": "kernel", "ts": t, "dur": d, "name": n, "args": {"stream": s}}
        for t, d, s, n in kernels
    ]
    ev += [
        {"ph": "X", "cat": "gpu_user_annotation", "ts": t, "dur": d, "name": trace.ITERATION}
        for t, d in windows
    ]
    ev.append({"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 10**6, "name": "aten::mm"})  # not a GPU event
    path = tmp_path / name
    path.write_text(json.dumps({"traceEvents": ev}))
    return path


def test_kinds():
    assert trace.kind("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)") == "communication"
    assert trace.kind("Memcpy PtoP (Device -> Device)") == "communication"
    assert trace.kind("Memcpy DtoD (Device -> Device)") == "memory"
    assert trace.kind("Memset (Device)") == "memory"
    assert trace.kind("_chunk_scan_fwd_kernel") == "computation"


def test_overlap_counts_unions_once(tmp_path):
    # communication: [100, 300) and [200, 400) -> union 300 us; computation [0, 250) and [150, 220) ->
    # union [0, 250); overlap [100, 250) = 150 us; a copy beside it is not computation
    path = _write(
        tmp_path,
        [
            (100, 200, 9, "ncclDevKernel_SendRecv"),
            (200, 200, 9, "ncclDevKernel_SendRecv"),
            (0, 250, 7, "sm90_xmma_gemm"),
            (150, 70, 11, "elementwise_kernel"),
            (300, 100, 7, "Memcpy DtoD (Device -> Device)"),
        ],
    )
    ov = trace.comm_overlap(trace.load(path))
    assert ov["comm_ms"] == pytest.approx(0.3)
    assert ov["overlapped_ms"] == pytest.approx(0.15)
    assert ov["overlap_pct"] == pytest.approx(50.0)
    assert math.isnan(trace.comm_overlap([])["overlap_pct"])


def test_gaps_of_the_compute_stream(tmp_path):
    path = _write(
        tmp_path,
        [
            (0, 1000, 7, "sm90_gemm"),
            (1500, 3000, 7, "_chunk_scan_fwd_kernel"),
            (4520, 100, 7, "rmsnorm_fwd"),  # a 20 us gap: below 0.05 ms
            (4700, 100, 7, "rmsnorm_fwd"),  # an 80 us gap with nothing beside
            (900, 700, 13, "ncclDevKernel_SendRecv"),
        ],
    )
    gaps = trace.idle_gaps(trace.load(path), 0.05)
    assert [round(g.ms, 3) for g in gaps] == [0.5, 0.08]
    assert gaps[0].after == "gemm" and gaps[0].before == "chunk_scan"
    assert gaps[0].beside == {"nccl": pytest.approx(0.5)} and gaps[1].beside == {}
    assert trace.compute_stream(trace.load(path)) == 7


def test_iteration_windows(tmp_path):
    # the group synchronisation's all-reduce between the iterations is outside both windows
    path = _write(
        tmp_path,
        [
            (0, 50, 7, "ncclDevKernel_AllReduce"),
            (100, 400, 7, "gemm"),
            (200, 200, 9, "ncclDevKernel_SendRecv"),
            (600, 50, 7, "ncclDevKernel_AllReduce"),
            (700, 400, 7, "gemm"),
            (800, 100, 9, "ncclDevKernel_SendRecv"),
        ],
        windows=[(90, 420), (690, 420)],
    )
    kernels = trace.load(path)
    assert [k.name for k in kernels].count("ncclDevKernel_AllReduce") == 0
    assert len(trace.load(path, window=None)) == 6
    assert trace.windows(path) == [(90.0, 510.0), (690.0, 1110.0)]
    st = trace.case_stats(path)
    assert st["comm_ms"] == pytest.approx(0.15)  # 300 us over 2 iterations
    assert st["overlap_pct"] == pytest.approx(100.0)
    assert st["idle_ms"] == pytest.approx(0.0)  # the wait between iterations is not the layer's


def test_cli(tmp_path, capsys):
    path = _write(
        tmp_path, [(0, 1000, 7, "gemm"), (1500, 100, 7, "gemm"), (900, 700, 13, "ncclDevKernel_SendRecv")]
    )
    assert main(["trace", str(path), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "overlap 28.6% (HTA's definition)" in out and "gemm -> gemm  [nccl 0.50]" in out
    assert main(["trace", str(tmp_path / "missing.json")]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    assert main(["trace", str(bad)]) == 2


def test_iterations_from_the_cpu_ranges_when_the_gpu_has_none(tmp_path):
    """Kineto's trace of ``--profile torch``: the iteration's ``record_function`` holds the regions', so
    no kernel was launched while it was innermost and it has no GPU span (what the H200 session of
    2026-12-02 found: 0 iterations); its CPU range and the launches' correlations place every kernel."""
    ev = []
    for i, (a, b) in enumerate([(1000, 2000), (5000, 6000)]):
        ev.append({"ph": "X", "cat": "user_annotation", "name": trace.ITERATION, "ts": a, "dur": b - a})
        ev.append({"ph": "X", "cat": "user_annotation", "name": "layer_fwd", "ts": a + 10, "dur": 500})
        for j, cat in enumerate(
            ("cuda_runtime", "cuda_driver")
        ):  # the forward's and (autograd thread) the backward's
            corr = 10 * i + j
            ev.append({"ph": "X", "cat": cat, "name": "launch", "ts": a + 100 + 600 * j, "dur": 5, "tid": 1 + j,
                       "args": {"correlation": corr}})  # fmt: skip
            ev.append({"ph": "X", "cat": "kernel", "name": f"k{j}", "ts": a + 300 + 600 * j, "dur": 200,
                       "args": {"stream": 7, "correlation": corr}})  # fmt: skip
    # the group synchronisation between iterations: launched outside them, left out
    ev.append(
        {
            "ph": "X",
            "cat": "cuda_runtime",
            "name": "launch",
            "ts": 3000,
            "dur": 5,
            "args": {"correlation": 99},
        }
    )
    ev.append({"ph": "X", "cat": "kernel", "name": "ncclDevKernel_AllReduce", "ts": 3100, "dur": 800,
               "args": {"stream": 9, "correlation": 99}})  # fmt: skip
    path = tmp_path / "cpu_ranges.json"
    path.write_text(json.dumps({"traceEvents": ev}))
    kernels, windows = trace.read(path)
    assert windows == [(1300.0, 2100.0), (5300.0, 6100.0)]
    assert [k.name for k in kernels] == ["k0", "k1", "k0", "k1"]
    assert trace.case_stats(path)["comm_ms"] == 0.0  # the all-reduce is no part of an iteration
