"""What a person sees: region bars stack only disjoint stages, distinct colours; the derived tables key on
what varies; the default report fits 120 columns; overlap_pct is blank on CPU; bad cells end in one line;
Markdown and JSON output; no pandas warning; case descriptions name impl."""

from __future__ import annotations

import io
import itertools
import json
import warnings

import pandas as pd
import pytest

from cpbench.cli import main
from cpbench.plot import APART, STAGES, plot_regions, region_columns, stack_heights, stage_colour
from cpbench.report import _crossover_cell, _describe, render, scaling_table, tables
from cpbench.results import ResultsWriter, read_results
from cpbench.scenario import CASE_KEY


def smoke_like(device: str = "cpu") -> pd.DataFrame:
    """32 ok rows shaped like the embedded smoke sweep's (cp 1/2, L 64/256, packing, path, pass)."""
    rows = []
    grid = itertools.product(
        (1, 2), (64, 256), ("none", "docs=4,density=0.9"), ("fused", "seed"), ("fwd", "fwd+bwd")
    )
    for i, (cp, L, pk, path, ps) in enumerate(grid):
        bwd = ps == "fwd+bwd"
        r = dict.fromkeys(CASE_KEY, "x")
        r.update(scenario="smoke", cp_size=cp, seq_len=L, batch=1, n_heads=4, n_groups=2, packing=pk)
        r.update(docs=0 if pk == "none" else 4, density=1.0 if pk == "none" else 0.9, layout="head_tail")
        r.update(path=path, strategy="hidden", impl="cp_core", overlap_chunks=1, dtype="float32")
        r.update(device=device, world_size=2, backend="gloo", status="ok", error="", case=i)
        r["pass"] = ps
        ssm, norm = 1.0 + L / 128, 0.3
        r.update(ssm_ms=ssm, norm_proj_ms=norm, ssm_bwd_ms=3 * ssm if bwd else None)
        r.update(norm_proj_bwd_ms=0.4 if bwd else None)
        comm = 0.0
        if cp > 1:
            r.update(a2a_pre_ms=1.5, a2a_post_ms=1.2, a2a_pre_xfer_ms=1.0, a2a_post_xfer_ms=0.9)
            comm = 2.7
            if bwd:
                r.update(a2a_pre_bwd_ms=1.6, a2a_post_bwd_ms=1.1)
                comm += 2.7
            r.update(comm_ms=comm, comm_xfer_ms=comm * 0.7, comm_wait_ms=comm * 0.3)
            r.update(busbw_GBps=0.0123, bench_busbw_GBps=0.103, busbw_pct=12.0, comm_iqr_ms=0.5)
            r.update(layer_nocomm_ms=ssm * (4 if bwd else 1) + norm, exposed_comm_ms=comm * 1.1)
            r.update(overlap_pct=-10.0)
        layer = ssm * (4 if bwd else 1) + norm + (0.4 if bwd else 0) + comm + 0.5
        r.update(layer_ms=layer, layer_iqr_ms=0.1 * layer, tokens_per_s=L / layer * 1e3, peak_mem_GiB=None)
        r.update(comm_model="measured")
        rows.append(r)
    return pd.DataFrame(rows)


def write_csv(path, df):
    w = ResultsWriter(path)
    for r in df.to_dict("records"):
        w.append({k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()})
    return path


def test_the_stack_holds_only_disjoint_stages_at_their_own_medians():
    sub = smoke_like()
    sub = sub[(sub["cp_size"] == 2) & (sub["pass"] == "fwd+bwd")].head(1)
    regions = region_columns(sub)
    assert "comm_xfer" not in regions and "a2a_pre_xfer" not in regions and "exposed_comm" not in regions
    assert regions[:3] == ["a2a_pre", "ssm", "a2a_post"] and regions[-1].endswith("_bwd")
    segments, other, apart = stack_heights(sub, regions)
    r = sub.iloc[0]
    for name, vals in segments.items():  # never rescaled
        assert vals[0] == pytest.approx(r[f"{name}_ms"])
    assert sum(v[0] for v in segments.values()) + other[0] == pytest.approx(r["layer_ms"])
    assert set(apart) == {"comm", "comm_xfer", "comm_wait", "layer_nocomm", "exposed_comm"}
    # head chunks: the collectives run beside compute, so they leave the stack and exposed_comm enters it
    segments, other, apart = stack_heights(sub, regions, overlapped=True)
    assert "exposed_comm" in segments and not any(n.startswith("a2a") for n in segments)
    assert "exposed_comm" not in apart and "comm" in apart
    # parts whose medians add up to more than the layer's: drawn as measured, nothing left for other
    big = sub.assign(ssm_ms=100.0)
    segments, other, _ = stack_heights(big, regions)
    assert segments["ssm"][0] == 100.0 and other[0] == 0.0


def test_every_stage_has_its_own_colour():
    names = [*STAGES, *(f"{s}_bwd" for s in STAGES), "exposed_comm"]
    colours = [tuple(stage_colour(n)) for n in names]
    assert len(set(colours)) == len(colours)
    assert set(APART) >= {"comm_xfer", "comm_wait", "layer_nocomm", "exposed_comm"}


def test_a_regions_plot_is_written(tmp_path):
    files = plot_regions(smoke_like(), tmp_path)
    assert len(files) == 8 and all(f.read_bytes()[:4] == b"\x89PNG" for f in files)


def _text(df, width=120, **kw) -> str:
    from rich.console import Console

    buf = io.StringIO()
    render(df, console=Console(file=buf, width=width, force_terminal=False), **kw)
    return buf.getvalue()


def test_the_default_report_fits_120_columns_without_cutting_a_number():
    out = _text(smoke_like())
    assert max(len(line) for line in out.splitlines()) <= 120
    assert "…" not in out and "..." not in out
    assert "18.600" in out  # cp 2, L 256, fwd+bwd layer time, whole
    for name in ("layer", "iqr", "comm", "wait", "busbw", "Mtok/s"):
        assert name in out
    assert "not measured in these results (no value in any row): peak mem GiB" in out
    # narrower: the metric columns go into a second table, the key columns repeated
    narrow = _text(smoke_like(), width=80)
    assert max(len(line) for line in narrow.splitlines()) <= 80 and "results (2/" in narrow


def test_the_scaling_table_keys_on_every_column_that_varies():
    df = smoke_like()
    sc = scaling_table(df)
    assert len(sc) == 16 and not sc.duplicated(["seq_len", "packing", "path", "pass"]).any()
    out = _text(df)
    table = out.split("scaling:", 1)[1]
    head = [ln for ln in table.splitlines() if "seq_len" in ln][0]
    for col in ("seq_len", "packing", "path", "pass"):
        assert col in head
    for col in ("impl", "strategy", "cp_size"):  # constant: not columns
        assert col not in head.split()


def test_overlap_pct_is_blank_on_cpu_with_the_reason():
    df = smoke_like()
    out = _text(df, metrics=["layer_ms", "overlap_pct"])
    assert "-10%" not in out and "overlap %: blank on CPU" in out
    gpu = _text(smoke_like(device="cuda"), metrics=["layer_ms", "overlap_pct"])
    assert "-10%" in gpu and "blank on CPU" not in gpu
    # the overlap table (chunked runs) blanks it too
    k2 = df[df["cp_size"] == 2].assign(overlap_chunks=2)
    out = _text(pd.concat([df, k2], ignore_index=True))
    assert "overlap: exposed communication" in out and "overlap %: blank on CPU" in out


def test_report_markdown_and_json(tmp_path, capsys):
    path = write_csv(tmp_path / "results.csv", smoke_like())
    assert main(["report", str(path), "--format", "markdown"]) == 0
    md = capsys.readouterr().out
    assert "| cp_size | seq_len | packing | path | pass | layer ms |" in md and "|---:|---:|---|" in md
    assert "**scaling:" in md
    assert main(["report", str(path), "--format", "json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert len(j["rows"]) == 32 and j["rows"][0]["layer_ms"] > 0 and j["rows"][4]["comm_ms"] is None
    assert "peak_mem_GiB" not in j["rows"][0]  # no value in any row: left out, and said so
    assert any("peak mem GiB" in n for n in j["notes"])
    assert len(j["tables"]["scaling"]) == 16 and j["skipped"] == [] and j["errors"] == []


@pytest.mark.parametrize(
    "column, cell, message",
    [
        ("layer_ms", "fast", "layer_ms 'fast' is not a number"),
        ("cp_size", "two", "cp_size 'two' is not a number"),
        ("seq_len", "", "seq_len is empty"),
    ],
)
def test_bad_cells_end_report_and_plot_in_one_line(tmp_path, capsys, column, cell, message):
    import csv

    path = write_csv(tmp_path / "results.csv", smoke_like())
    recs = list(csv.reader(path.read_text().splitlines()))
    recs[5][recs[0].index(column)] = cell
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(recs)
    for cmd in (["report", str(path)], ["plot", str(path), "--out", str(tmp_path / "p")]):
        assert main(cmd) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err


def test_no_pandas_fragmentation_warning(tmp_path, capsys):
    df = smoke_like()
    extra = pd.DataFrame({f"r{i}_ms": [1.0] * len(df) for i in range(150)})  # a long sweep's regions
    df = pd.concat([df, extra], axis=1)
    a = write_csv(tmp_path / "a.csv", df)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_results(a)
        assert main(["compare", str(a), str(a)]) == 0
    capsys.readouterr()


def test_case_descriptions_name_impl_and_k(capsys):
    row = smoke_like().iloc[0].to_dict() | {"impl": "nemo", "overlap_chunks": 2}
    assert "impl=nemo" in _describe(row) and "k=2" in _describe(row)
    assert main(["sweep", "peers", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[nemo]" in out and "[mamba_ssm]" in out


def test_small_byte_counts_are_not_zero_megabytes():
    assert _crossover_cell("hidden MB", 0.012288) == "0.0123"
    assert _crossover_cell("ratio", 8.0) == "8"
    assert _crossover_cell("crossover seq_len", 12345.6) == "12,346"


def test_busbw_above_the_microbenchmark_is_explained():
    df = pd.DataFrame(
        {
            "cp_size": [2],
            "status": ["ok"],
            "busbw_pct": [250.0],
            "layer_ms": [1.0],
            "comm_model": ["measured"],
        }
    )
    _, _, notes = tables(df, metrics=["layer_ms", "busbw_pct"])
    assert any("above 100%" in n and "baseline, not a ceiling" in n for n in notes)
    df["busbw_pct"] = [80.0]
    assert not any("above 100%" in n for n in tables(df, metrics=["layer_ms", "busbw_pct"])[2])


def test_no_profiler_lines_on_the_console(tmp_path):
    """kineto prints a "USDT: ... profiler_start/stop" line per case and rank under --profile torch."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("KINETO_LOG_LEVEL", None)
    res = subprocess.run(
        [sys.executable, "-m", "cpbench", "sweep", "--backend", "fake", "--profile", "torch", "--no-progress"]
        + ["--out", str(tmp_path / "o"), "--set", "sweep.seq_len=[64]", "--set", 'sweep.packing=["none"]']
        + ["--set", 'sweep.path=["fused"]', "--set", "run.iters=1", "--set", "sweep.cp_size=[1, 2]"]
        + ["--set", 'sweep.pass=["fwd"]'],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert len(list((tmp_path / "o" / "traces").glob("*.json"))) == 2
    assert "USDT" not in res.stderr + res.stdout and "profiler_start" not in res.stderr
