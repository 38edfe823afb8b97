"""Runs that die: a full disk (a file-size limit), an unwritable folder, kill -9 of the launcher or of a
rank. Whoever reads the folder next sees a dead run (never "in progress"), no half-written .tmp file,
a lock naming live holders only, ranks that died with their launcher, an end_reason in meta.json."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cpbench import rundir
from cpbench.cli import main
from cpbench.results import ResultsWriter, write_meta

REPO = Path(__file__).resolve().parent.parent
#: A complete case key (the CSV's key columns are numbers or words on every row).
KEY = dict(scenario="t", cp_size=1, batch=1, n_heads=4, n_groups=2, packing="none", docs=0, density=1.0)
KEY.update(layout="head_tail", path="fused", strategy="hidden", impl="cp_core", overlap_chunks=1)
KEY.update({"pass": "fwd", "dtype": "float32", "device": "cpu", "world_size": 1, "backend": "gloo"})
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux: /proc, prctl")

TINY = """
name = "tiny"
[layer]
d_model = 32
n_heads = 4
head_dim = 8
n_groups = 2
d_state = 8
chunk_size = 16
[sweep]
cp_size = [1, 2]
seq_len = [64, 128, 256]
pass = ["fwd"]
[run]
warmup = 0
iters = 2
device = "cpu"
timeout_s = 60
microbench = false
exposed_comm = false
"""


def _env(**extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def _sweep_cmd(tmp_path, out) -> list[str]:
    scen = tmp_path / "tiny.toml"
    scen.write_text(TINY)
    return [sys.executable, "-m", "cpbench", "sweep", str(scen), "--nproc", "2", "--out", str(out)]


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(p.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def _wait_for(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return pred()


def _dead_run(folder: Path, rows: int = 2) -> None:
    folder.mkdir(parents=True)
    w = ResultsWriter(folder / "results.csv")
    for i in range(rows):
        w.append(dict(KEY, seq_len=64 * (i + 1), status="ok", layer_ms=1.0))
    write_meta(folder / "meta.json", {"status": "running", "n_cases": 4, "start_time": "2026-01-01T00:00:00"})


def test_a_dead_run_in_an_unwritable_folder_reads_as_killed_not_in_progress(tmp_path, capsys):
    _dead_run(tmp_path / "r")
    # meta.json cannot be rewritten (what a full disk or a read-only folder does to it; a folder made
    # read-only would not stop root, a directory in the way of the temporary file stops anyone)
    (tmp_path / "r" / "meta.json.tmp").mkdir()
    assert main(["report", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "run killed: 2 of 4 cases have a row" in out and "in progress" not in out
    assert "could not write" in out
    assert json.loads((tmp_path / "r" / "meta.json").read_text())["status"] == "running"  # unwritable
    assert rundir.reconcile(tmp_path / "r")["status"] == "killed"


def test_the_tmp_files_of_a_dead_run_are_removed_when_it_is_read(tmp_path, capsys):
    _dead_run(tmp_path / "r")
    (tmp_path / "r" / "results.csv.tmp").write_text("scenario,cp_s")
    (tmp_path / "r" / "meta.json.tmp").write_text('{"status": "comp')
    assert main(["report", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    assert not list((tmp_path / "r").glob("*.tmp"))
    assert json.loads((tmp_path / "r" / "meta.json").read_text())["status"] == "killed"


WRITE_UNDER_LIMIT = """
import resource, signal, sys
from cpbench.results import ResultsWriter, write_meta
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
folder = sys.argv[1]
for what in ("meta", "csv"):
    try:
        if what == "meta":
            write_meta(folder + "/meta.json", {"text": "x" * 10000})
        else:
            w = ResultsWriter(folder + "/results.csv", columns=["a"])
            w.append({"a": 1, "b" * 5000: 2})  # a new column: the file is rewritten whole, through a tmp
    except OSError as e:
        print(what, "failed:", e.strerror, flush=True)
"""


def test_a_write_that_hits_a_full_disk_leaves_no_tmp_file(tmp_path):
    res = subprocess.run(
        [sys.executable, "-c", WRITE_UNDER_LIMIT, str(tmp_path)], capture_output=True, text=True, env=_env()
    )
    assert "meta failed: File too large" in res.stdout and "csv failed: File too large" in res.stdout
    assert not list(tmp_path.glob("*.tmp")), list(tmp_path.iterdir())


def _limit_files(nbytes: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return apply


@linux
def test_a_sweep_that_fills_the_disk_is_marked_dead_and_leaves_no_tmp(tmp_path, capsys):
    out = tmp_path / "o"
    res = subprocess.run(
        _sweep_cmd(tmp_path, out) + ["--no-progress"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=180,
        preexec_fn=_limit_files(3_500),  # meta.json (2.3 kB) fits, results.csv stops after a few rows
    )
    assert res.returncode != 0, res.stdout + res.stderr
    assert "File too large" in res.stderr
    assert not list(out.glob("*.tmp"))
    assert main(["report", str(out)]) in (0, 1)
    text = capsys.readouterr()
    assert "in progress" not in text.out + text.err and "Traceback" not in text.err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] in ("failed", "aborted", "killed") and meta.get("end_reason")


def _hanging_sweep(tmp_path, out) -> subprocess.Popen:
    """A sweep whose case 1 hangs on rank 1 (``CPBENCH_FAULT``), returned once case 0 is done and the lock
    lists the launcher and rank 0 (its own session: the caller kills the group)."""
    proc = subprocess.Popen(
        _sweep_cmd(tmp_path, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(CPBENCH_FAULT="1:1:hang"),
        start_new_session=True,
    )
    for line in proc.stderr:
        if line.startswith("cpbench: [1/"):
            break
    if not _wait_for(lambda: len(rundir.lock_text(out)) == 2, 10):
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the lock never listed the launcher and rank 0")
    return proc


@linux
def test_ranks_die_with_a_killed_launcher_and_the_lock_names_no_dead_holder(tmp_path, capsys):
    out = tmp_path / "o"
    proc = _hanging_sweep(tmp_path, out)
    try:
        ranks = [
            p for p in _children(proc.pid) if "multiprocessing" in Path(f"/proc/{p}/cmdline").read_text()
        ]
        assert len(ranks) >= 2, ranks
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert _wait_for(lambda: not any(_alive(p) for p in ranks), 15), "ranks outlived their launcher"
        assert rundir.holder(out) is None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "run killed" in text and "last holder: pid" in text and "(rank 0)" in text


def test_the_lock_lists_only_live_holders(tmp_path):
    lock = rundir.prepare_out_dir(tmp_path / "run")
    try:
        with open(tmp_path / "run" / rundir.LOCK_FILE, "a") as f:  # a holder that died (pid 2**22 + 1)
            f.write(f"pid {2**22 + 1} on {os.uname().nodename} since then (rank 0)\n")
        who = rundir.holder(tmp_path / "run")
        assert who.startswith(f"pid {os.getpid()} on ") and str(2**22 + 1) not in who
    finally:
        lock.release()
    assert rundir.holder(tmp_path / "run") is None


@linux
def test_a_rank_killed_with_sigkill_leaves_an_end_reason(tmp_path):
    out = tmp_path / "o"
    proc = _hanging_sweep(tmp_path, out)
    try:
        rank0 = int(rundir.lock_text(out)[1].split()[1])
        rank1 = [
            p
            for p in _children(proc.pid)
            if p != rank0 and "spawn_main" in Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")
        ]
        assert len(rank1) == 1, rank1
        os.kill(rank1[0], signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
        err = proc.stderr.read()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] in ("failed", "aborted"), meta["status"]
    assert "SIGKILL" in meta["end_reason"] or "rank 1" in meta["end_reason"], (meta["end_reason"], err)
    assert rundir.holder(out) is None
