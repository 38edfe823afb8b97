"""results.csv: incremental, fsync'ed rows; recovery after a killed run; malformed files; meta.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import pytest

from cpbench.cli import main
from cpbench.errors import ResultsError
from cpbench.results import (
    PartialRowWarning,
    ResultsWriter,
    base_columns,
    default_out_dir,
    environment,
    read_results,
    write_meta,
)
from cpbench.scenario import CASE_KEY

REPO = Path(__file__).resolve().parent.parent


def row(i: int, **extra) -> dict:
    r = {k: "x" for k in CASE_KEY}
    r.update(
        cp_size=2, seq_len=64 * (i + 1), batch=1, n_heads=4, n_groups=2, docs=0, density=1.0, world_size=2
    )
    r.update(overlap_chunks=1)
    r.update(status="ok", error="", case=i, layer_ms=1.5 + i, layer_iqr_ms=0.1)
    r.update(extra)
    return r


def test_rows_are_appended_and_read_back(tmp_path):
    path = tmp_path / "r" / "results.csv"
    w = ResultsWriter(path)
    assert read_results(path).empty  # header only
    for i in range(3):
        w.append(row(i))
        assert len(read_results(path)) == i + 1  # on disk as soon as append returns
    df = read_results(path)
    assert list(df["seq_len"]) == [64, 128, 192]
    assert list(df.columns[: len(CASE_KEY)]) == list(CASE_KEY)
    assert set(base_columns()) <= set(df.columns)


def test_new_columns_rewrite_the_file_whole(tmp_path):
    path = tmp_path / "results.csv"
    w = ResultsWriter(path)
    w.append(row(0))
    w.append(row(1, weird_region_ms=2.5))
    df = read_results(path)
    assert "weird_region_ms" in df.columns
    assert df["weird_region_ms"].isna().iloc[0] and df["weird_region_ms"].iloc[1] == 2.5
    w.append(row(2))
    assert len(read_results(path)) == 3
    assert not (tmp_path / "results.csv.tmp").exists()


def test_errors_are_one_line(tmp_path):
    path = tmp_path / "results.csv"
    w = ResultsWriter(path)
    w.append(row(0, status="error", error="RuntimeError: first line\nsecond line, with a comma"))
    w.append(row(1))
    df = read_results(path)
    assert len(df) == 2
    assert df["error"].iloc[0] == "RuntimeError: first line | second line, with a comma"
    assert len(path.read_text().splitlines()) == 3


def test_partial_trailing_line_is_ignored_with_a_warning(tmp_path):
    path = tmp_path / "results.csv"
    w = ResultsWriter(path)
    for i in range(4):
        w.append(row(i))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 17])  # cut the last row mid-line
    with pytest.warns(PartialRowWarning, match="partial last line"):
        df = read_results(path)
    assert list(df["case"]) == [0, 1, 2]


WRITER = textwrap.dedent(
    """
    import sys, time
    from cpbench.results import ResultsWriter
    from cpbench.scenario import CASE_KEY
    w = ResultsWriter(sys.argv[1])
    i = 0
    while True:
        r = {k: "x" for k in CASE_KEY}
        r.update(cp_size=1, seq_len=64, batch=1, n_heads=4, n_groups=2, overlap_chunks=1, world_size=1)
        r.update(docs=0, density=1.0, status="ok", case=i, layer_ms=float(i), error="")
        w.append(r)
        print(i, flush=True)
        i += 1
        time.sleep(0.01)
    """
)


def test_rows_survive_a_killed_run(tmp_path):
    path = tmp_path / "results.csv"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        seen = [proc.stdout.readline() for _ in range(5)]
        assert seen[-1].strip() == "4"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    df = read_results(path)  # no partial line: each row was complete on disk before "i" was printed
    assert len(df) >= 5
    assert list(df["case"]) == list(range(len(df)))


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "empty file"),
        ("a,b,c\n1,2,3\n", "missing column"),
        ("scenario,cp_siz", "header line is incomplete"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ResultsError, match=match):
        read_results(path)


def test_a_broken_middle_line_is_an_error_naming_it(tmp_path):
    path = tmp_path / "results.csv"
    w = ResultsWriter(path)
    for i in range(3):
        w.append(row(i))
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:20]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ResultsError, match="line 3 has"):
        read_results(path)
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ResultsError, match="UTF-8"):
        read_results(tmp_path / "bin.csv")
    with pytest.raises(ResultsError, match="cannot read"):
        read_results(tmp_path / "missing.csv")


def test_cli_report_on_a_bad_csv_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1,2\n")
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert "missing column" in err and "Traceback" not in err


def test_report_renders_units_and_lists_skips(tmp_path, capsys):
    path = tmp_path / "results.csv"
    w = ResultsWriter(path)
    w.append(row(0, tokens_per_s=2.5e6, busbw_GBps=123.456, comm_model="measured"))
    w.append(row(1, tokens_per_s=1.5e6, busbw_GBps=100.0, comm_model="modeled@370GBps"))
    w.append(row(2, status="skipped", error="cp_size 8 > world size 2"))
    assert main(["report", str(path), "--metrics", "layer_ms,busbw_GBps,tokens_per_s"]) == 0
    out = capsys.readouterr().out
    assert "layer ms" in out and "busbw GB/s" in out and "Mtok/s" in out
    assert "2.500" in out and "123.5" in out and "100.0*" in out and "modeled" in out
    assert "skipped (1)" in out and "cp_size 8 > world size 2" in out
    assert main(["report", str(path), "--metrics", "nope"]) == 2
    assert "unknown column" in capsys.readouterr().err
    assert main(["report", str(path), "--group-by", "seq_len"]) == 0
    assert "seq_len=128" in capsys.readouterr().out


def test_meta_and_out_dir(tmp_path):
    env = environment()
    for k in (
        "host",
        "torch",
        "cuda",
        "gpu",
        "driver",
        "nccl",
        "triton",
        "mamba_ssm",
        "causal_conv1d",
        "nvtx",
        "git_commit",
        "cp_core_path",
    ):
        assert k in env
    assert env["torch"] and env["cp_core_path"].endswith("cp_core")
    write_meta(tmp_path / "meta.json", {"env": env, "when": datetime(2024, 1, 2)})
    assert json.loads((tmp_path / "meta.json").read_text())["env"]["host"] == env["host"]
    assert (
        default_out_dir("smoke", tmp_path, datetime(2024, 1, 2, 3, 4, 5))
        == tmp_path / "smoke-20240102-030405"
    )


def test_cpbench_modules_import_each_other_without_a_circle():
    """Every relative import, at module level or inside a function (results.py and rundir.py once
    imported each other)."""
    import ast

    pkg = REPO / "cpbench"
    graph = {}
    for f in pkg.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        graph[f.stem] = deps & {p.stem for p in pkg.glob("*.py")}

    def circle(start, node, path):
        for nxt in graph[node]:
            if nxt == start:
                return [*path, nxt]
            if nxt not in path:
                found = circle(start, nxt, [*path, nxt])
                if found:
                    return found
        return None

    for m in graph:
        assert circle(m, m, [m]) is None, " -> ".join(circle(m, m, [m]))
