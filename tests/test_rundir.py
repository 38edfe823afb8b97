"""Results folders: never overwritten, locked while a sweep writes, killed runs marked, path errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cpbench import rundir
from cpbench.cli import main
from cpbench.errors import ResultsError, UserError
from cpbench.results import ResultsWriter, write_meta

REPO = Path(__file__).resolve().parent.parent
#: A complete case key (the CSV's key columns are numbers or words on every row).
KEY = dict(scenario="t", cp_size=1, batch=1, n_heads=4, n_groups=2, packing="none", docs=0, density=1.0)
KEY.update(layout="head_tail", path="fused", strategy="hidden", impl="cp_core", overlap_chunks=1)
KEY.update({"pass": "fwd", "dtype": "float32", "device": "cpu", "world_size": 1, "backend": "gloo"})


def test_a_new_folder_is_locked_and_a_second_sweep_refused(tmp_path):
    lock = rundir.prepare_out_dir(tmp_path / "run")
    try:
        assert rundir.holder(tmp_path / "run").startswith(f"pid {os.getpid()} on ")
        with pytest.raises(UserError, match="another sweep is writing this folder"):
            rundir.prepare_out_dir(tmp_path / "run")
    finally:
        lock.release()
    assert rundir.holder(tmp_path / "run") is None
    rundir.prepare_out_dir(tmp_path / "run").release()  # empty again: usable


def test_a_folder_with_a_run_is_never_reused(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "meta.json").write_text("{}")
    with pytest.raises(UserError, match="holds an earlier run"):
        rundir.prepare_out_dir(tmp_path / "old")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        rundir.prepare_out_dir(tmp_path / "file")
    with pytest.raises(UserError, match="cannot create the folder"):
        rundir.prepare_out_dir(tmp_path / "file" / "sub")


def test_default_folders_are_unique(tmp_path):
    from datetime import datetime

    now = datetime(2026, 1, 2, 3, 4, 5)
    a = rundir.default_out_dir("s", tmp_path, now)
    a.mkdir()
    b = rundir.default_out_dir("s", tmp_path, now)
    assert a.name == "s-20260102-030405" and b.name == "s-20260102-030405-2"


def _run_folder(folder: Path, rows: int, status: str = "running") -> None:
    folder.mkdir(parents=True)
    w = ResultsWriter(folder / "results.csv")
    for i in range(rows):
        w.append(dict(KEY, seq_len=64 * (i + 1), status="ok", layer_ms=1.0))
    write_meta(folder / "meta.json", {"status": status, "n_cases": 4, "start_time": "2026-01-01T00:00:00"})


def test_a_killed_run_is_marked_when_read_and_report_says_why(tmp_path, capsys):
    _run_folder(tmp_path / "r", rows=0)
    assert main(["report", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "was killed or crashed before any of its 4 cases finished" in err
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert meta["status"] == "killed" and meta["n_rows"] == 0
    # with rows: the table, headed by what happened to the run
    _run_folder(tmp_path / "r2", rows=2)
    assert main(["report", str(tmp_path / "r2" / "results.csv")]) == 0
    assert "run killed: 2 of 4 cases have a row" in capsys.readouterr().out


def test_a_running_run_is_not_marked_killed(tmp_path, capsys):
    _run_folder(tmp_path / "r", rows=0)
    # hold it the way a sweep does: the lock file locked by a live process (here: a child)
    (tmp_path / "r" / ".cpbench.lock").write_text("")
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_SH); "
            "print('held', flush=True); time.sleep(60)",
            str(tmp_path / "r" / ".cpbench.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "held"
        assert main(["report", str(tmp_path / "r")]) == 1
        assert "the run is still going" in capsys.readouterr().err
        assert json.loads((tmp_path / "r" / "meta.json").read_text())["status"] == "running"
    finally:
        child.kill()
        child.wait()
    assert rundir.reconcile(tmp_path / "r")["status"] == "killed"


def test_reading_commands_take_a_folder(tmp_path, capsys):
    _run_folder(tmp_path / "r", rows=3, status="complete")
    assert main(["report", str(tmp_path / "r")]) == 0
    assert main(["compare", str(tmp_path / "r"), str(tmp_path / "r" / "results.csv")]) == 0
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ResultsError, match="without results.csv"):
        rundir.results_csv(tmp_path / "empty")
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def _cpbench(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "cpbench", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize(
    "out, message",
    [
        ("FILE", "exists and is not a folder"),
        ("/proc/cpbench-test", "cannot create the folder"),
        ("EARLIER", "holds an earlier run"),
    ],
)
def test_bad_out_exits_2_in_one_line_before_any_rank(tmp_path, out, message):
    if out == "FILE":
        out = tmp_path / "f"
        out.write_text("")
    elif out == "EARLIER":
        _run_folder(tmp_path / "e", rows=1, status="complete")
        out = tmp_path / "e"
    res = _cpbench("sweep", "--out", str(out), "--no-progress")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.stderr
    assert res.stdout == ""


def test_version():
    res = _cpbench("--version")
    from cpbench import __version__

    assert res.returncode == 0 and res.stdout.strip() == f"cpbench {__version__}"
