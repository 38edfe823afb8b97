"""Nsight Systems on the CPU: ``nvtx_gpu_proj_sum`` / ``cuda_gpu_kern_sum`` exports in nsys 2023.4.4's
format read back (tests/data/nsys), reports read through the nsys the environment names, and the check of
a session against its CUDA-event region times and torch.profiler's kernel count (scripts/nsys_check.py),
with a failing case for each verdict."""

from __future__ import annotations

import importlib.util
import shutil
import stat
from pathlib import Path

import pandas as pd
import pytest

from cpbench import nsys
from cpbench.errors import UserError

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data" / "nsys"
PROJ, KERN = DATA / "nvtx_gpu_proj_sum.csv", DATA / "cuda_gpu_kern_sum.csv"


def _check_module():
    spec = importlib.util.spec_from_file_location("nsys_check", REPO / "scripts" / "nsys_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_an_nvtx_gpu_proj_sum_export_becomes_region_columns():
    cols = nsys.import_report(PROJ)
    iters = cols["iterations"]
    assert iters >= 1 and cols["layer_fwd_count"] == 1
    regions = {k[:-3] for k in cols if k.endswith("_ms")}
    assert {"layer_fwd", "ssm", "norm_proj"} <= regions and not any(r.startswith("case") for r in regions)
    assert all(
        cols[f"{r}_ms"] <= cols["layer_fwd_ms"] for r in ("ssm", "a2a_pre", "a2a_post") if f"{r}_ms" in cols
    )
    kernels = nsys.parse_kern_sum(KERN.read_text())
    assert kernels and all(n > 0 for n in kernels.values())
    # the real export of tests/data/nsys/README.md (one H200, the first part of one iteration)
    assert iters == 1 and cols["layer_fwd_ms"] == pytest.approx(6.788143)
    assert cols["norm_proj_ms"] == pytest.approx(5.007924) and cols["norm_proj_count"] == 2
    assert cols["ssm_ms"] == pytest.approx(1.448381) and cols["a2a_pre_ms"] == pytest.approx(0.168032)
    assert "layer_bwd_ms" not in cols  # autograd's thread launched the backward: no projection
    assert sum(kernels.values()) == 18 and kernels["_chunk_scan_fwd_kernel"] == 1
    assert kernels["nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_TNN"] == 2


def test_a_report_is_read_through_the_nsys_of_cpbench_nsys(tmp_path, monkeypatch):
    fake = tmp_path / "nsys"
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncat {PROJ}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    rep = tmp_path / "cpbench.1.nsys-rep"
    rep.write_bytes(b"")
    monkeypatch.setenv("CPBENCH_NSYS", f"sh {fake}")
    assert nsys.import_report(rep) == nsys.import_report(PROJ)
    args = (tmp_path / "args").read_text().split()
    assert args[:6] == ["stats", "--report", "nvtx_gpu_proj_sum", "--format", "csv", "--output"]
    monkeypatch.setenv("CPBENCH_NSYS", str(tmp_path / "missing-nsys"))
    with pytest.raises(UserError, match="needs nsys"):
        nsys.import_report(rep)


def _session(tmp_path: Path, scale: float = 1.03, kernels_off: int = 0) -> Path:
    """A run folder as scripts/nsys_convert.sh leaves it: the exports of one capture, the run's results.csv
    (its CUDA-event region times ``scale`` x the projected ones) and torch.profiler's kernel counts."""
    run = tmp_path / "run"
    run.mkdir(parents=True)
    shutil.copy(PROJ, run / "nvtx_gpu_proj_sum.1.csv")
    shutil.copy(KERN, run / "cuda_gpu_kern_sum.1.csv")
    cols = nsys.import_report(PROJ)
    row = {"case": 0, "scenario": "long_context", "cp_size": 2, "seq_len": 32768, "overlap_chunks": 1,
           "pass": "fwd+bwd", "status": "ok", "iters": int(cols["iterations"])}  # fmt: skip
    for k, v in cols.items():
        if k.endswith("_ms"):
            row[k], row[k[:-3] + "_min_ms"] = v * scale, v * scale * 0.98
    pd.DataFrame([row]).to_csv(run / "results.csv", index=False)
    kern = nsys.parse_kern_sum(KERN.read_text())
    rows = [
        {"case": 0, "name": n, "count": c, "iterations": int(cols["iterations"])} for n, c in kern.items()
    ]
    rows[0]["count"] += kernels_off
    pd.DataFrame(rows).to_csv(run / "torch_kernels.csv", index=False)
    return run


def test_the_session_check_agrees_and_can_fail(tmp_path, capsys):
    check = _check_module()
    assert check.main([str(_session(tmp_path / "a"))]) == 0
    out = capsys.readouterr().out
    assert "ssm " in out and " ok" in out and "0 disagreement(s)" in out
    # region times 20% apart: every judged region disagrees
    assert check.main([str(_session(tmp_path / "b", scale=1.2))]) == 1
    out = capsys.readouterr().out
    assert "DIFF" in out and "4 disagreement(s)" in out and "norm_proj" in out
    # nsys recorded fewer kernels than torch.profiler saw (what an nsys that drops launches shows)
    assert check.main([str(_session(tmp_path / "c", kernels_off=6))]) == 1
    out = capsys.readouterr().out
    assert "kernels per iteration: nsys 18, torch.profiler 24  DIFF" in out
    # torch.profiler's counts without iteration ranges (what the trace reader gave before 2026-12-02)
    run = _session(tmp_path / "d")
    tk = pd.read_csv(run / "torch_kernels.csv")
    tk["iterations"] = 0
    tk.to_csv(run / "torch_kernels.csv", index=False)
    assert check.main([str(run)]) == 1
    assert "name no iterations (0): not compared  DIFF" in capsys.readouterr().out


def test_committed_sessions_reproduce_their_agreement_table(capsys):
    """Each committed Nsight Systems set (a results folder with nvtx_gpu_proj_sum.N.csv) holds the table
    scripts/nsys_check.py prints for it."""
    sets = sorted({p.parent for p in (REPO / "results").rglob("nvtx_gpu_proj_sum.1.csv")})
    if not sets:
        pytest.skip("no Nsight Systems session committed yet (scripts/nsys_session.sh, then nsys_convert.sh)")
    check = _check_module()
    for s in sets:
        plain = ["--plain", str(s / "plain")] if (s / "plain" / "results.csv").exists() else []
        check.main([str(s), *plain])
        assert capsys.readouterr().out.strip() == (s / "agreement.txt").read_text().strip(), s


@pytest.mark.gpu
def test_nvtx_ranges_push_and_pop_on_cuda():
    import torch

    from cp_core import regions
    from cpbench.timing import RegionTimer, installed

    timer = RegionTimer("cuda", nvtx=True)
    with installed(timer), timer.mark("case 0: probe"):
        timer.start_iteration()
        with regions.region("ssm"):
            torch.ones(8, device="cuda").sum()
        torch.cuda.synchronize()
        assert "ssm" in timer.stop_iteration()
    previous = regions.set_nvtx("cp_core:")
    try:
        with regions.region("ssm"):
            torch.ones(8, device="cuda").sum()
    finally:
        regions.set_nvtx(previous)


def test_without_cuda_nvtx_is_refused_not_stubbed():
    import torch

    from cp_core import regions
    from cpbench.timing import RegionTimer

    with pytest.raises(ValueError, match="CUDA"):
        RegionTimer("cpu", nvtx=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            regions.set_nvtx("cp_core:")
    assert regions.region("ssm") is regions._NULL  # nothing listens: no NVTX call, one shared no-op
