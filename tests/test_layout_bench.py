"""The layout microbenchmark runs on CPU, and every path returns the identical tensor."""

import pandas as pd
import pytest
import torch

from cpbench import layout_bench


def test_layout_bench_cpu_paths_agree(tmp_path):
    out = tmp_path / "layout.csv"
    png = tmp_path / "layout.png"
    args = [
        "--device",
        "cpu",
        "--cp",
        "2,4",
        "--seq-len",
        "512",
        "--docs",
        "0,3",
        "--shape",
        "8,4,2,4",
        "--dtype",
        "float32",
        "--warmup",
        "0",
        "--iters",
        "1",
        "--out",
        str(out),
        "--plot",
        str(png),
    ]
    assert layout_bench.main(args) == 0
    df = pd.read_csv(out)
    assert set(df["path"]) == {"fused", "fused_noz", "seed"}
    assert len(df) == 2 * 2 * 3
    assert df["same_output"].all()
    assert (df["total_ms"] > 0).all() and (df["floor_ms"] > 0).all()
    assert png.stat().st_size > 0


def test_pack_lengths_are_granular_and_complete():
    lens = layout_bench.pack_lengths(4096, 7, 16, seed=1)
    assert len(lens) == 7 and sum(lens) == 4096 and all(n % 16 == 0 and n > 0 for n in lens)


SMALL = ["--device", "cpu", "--shape", "8,4,2,4", "--dtype", "float32", "--warmup", "0", "--iters", "1"]


def test_default_docs_fit_any_length_and_rows_stream_with_a_header(tmp_path, capsys):
    out = tmp_path / "rows.csv"
    assert layout_bench.main([*SMALL, "--seq-len", "64", "--cp", "2,8", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    lines = [ln for ln in captured.out.splitlines() if not ln.startswith("#")]
    assert lines[0] == ",".join(layout_bench.COLUMNS)
    df = pd.read_csv(out)
    # at cp 8 a 64-token pack holds at most 4 documents: only 0 and 1 of the default counts fit
    assert sorted(set(df[df["cp"] == 8]["docs"])) == [0, 1]
    assert sorted(set(df[df["cp"] == 2]["docs"])) == [0, 1, 8]
    assert len(lines) - 1 == len(df)
    assert "512 documents left out (at most 16)" in captured.err


def test_impossible_explicit_input_is_refused_before_running(tmp_path, capsys):
    out = tmp_path / "rows.csv"
    with pytest.raises(SystemExit) as e:
        layout_bench.main([*SMALL, "--seq-len", "64", "--cp", "8", "--docs", "5", "--out", str(out)])
    assert e.value.code == 2 and not out.exists()
    assert "--docs 5 does not fit seq_len 64 at cp 8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        layout_bench.main([*SMALL, "--seq-len", "100", "--cp", "8"])
    assert e.value.code == 2


def test_rows_computed_before_a_failure_are_on_disk(tmp_path, monkeypatch):
    out = tmp_path / "rows.csv"
    real = layout_bench.bench_case
    calls = []

    def flaky(cp, seq_len, n_docs, *args, **kwargs):
        calls.append(cp)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(cp, seq_len, n_docs, *args, **kwargs)

    monkeypatch.setattr(layout_bench, "bench_case", flaky)
    with pytest.raises(RuntimeError):
        layout_bench.main([*SMALL, "--seq-len", "64", "--cp", "2", "--docs", "0,1", "--out", str(out)])
    df = pd.read_csv(out)
    assert len(df) == 3 and set(df["docs"]) == {0}  # the first case's three paths survive


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        layout_bench.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 32768,131072)" in text and "(default: 2,4,8)" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_a_gpu_the_benches_refuse_in_one_line_or_run_what_is_asked(capsys):
    from cpbench import kernel_bench

    with pytest.raises(SystemExit) as e:
        layout_bench.main([])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "measures GPU kernels" in err
    assert "--device cpu" in err
    assert kernel_bench.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "measures GPU kernels" in err


def test_dry_runs_list_the_cases_without_a_device(capsys):
    from cpbench import kernel_bench

    assert layout_bench.main(["--seq-len", "8192", "--cp", "2,4", "--docs", "0,8", "--dry-run"]) == 0
    assert "4 case(s) on cuda" in capsys.readouterr().out
    assert kernel_bench.main(["--seq-len", "8192,16384", "--cp", "1,2", "--dry-run"]) == 0
    assert "4 case(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        kernel_bench.main(["--shape", "1,2", "--dry-run"])
    assert e.value.code == 2


def test_help_says_they_measure_gpu_kernels(capsys):
    from cpbench import kernel_bench

    for mod in (layout_bench, kernel_bench):
        with pytest.raises(SystemExit):
            mod.main(["--help"])
        assert "GPU kernels" in " ".join(capsys.readouterr().out.split())
