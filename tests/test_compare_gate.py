"""The compare gate on real runs, at its defaults: three baseline sweeps, one more of the same code (the
gate passes) and one with the layer slowed 8x by the runner's test hook CPBENCH_SLOWDOWN (it fails).
Rates at 1.2x / 1.5x / 2x on a loaded 2-core CPU: scripts/compare_gate_rates.py, results/cpu-compare-gate-*."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cpbench.cli import main

REPO = Path(__file__).resolve().parent.parent

SCENARIO = """
name = "gate"
[layer]
d_model = 32
n_heads = 4
head_dim = 8
n_groups = 2
d_state = 8
chunk_size = 16
[sweep]
cp_size = [1, 2]
seq_len = [64]
packing = ["none", {docs = 2, density = 1.0}]
pass = ["fwd", "fwd+bwd"]
[run]
warmup = 0
iters = 3
device = "cpu"
timeout_s = 60
microbench = false
exposed_comm = false
"""


def sweep(tmp: Path, out: Path, slowdown: str | None = None) -> None:
    """One sweep of 8 small cases on 2 gloo ranks (about 4 s on an idle 2-core machine)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("CPBENCH_SLOWDOWN", None)
    if slowdown:
        env["CPBENCH_SLOWDOWN"] = slowdown
    scen = tmp / "gate.toml"
    scen.write_text(SCENARIO)
    res = subprocess.run(
        [sys.executable, "-m", "cpbench", "sweep", str(scen), "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="module")
def gate_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("gate")
    sweep(d, d / "base" / "1")  # interleaved, as on a shared machine
    sweep(d, d / "same")
    sweep(d, d / "base" / "2")
    sweep(d, d / "slow", slowdown="8")
    return d


def test_the_slowdown_hook_is_recorded_and_checked(gate_runs, tmp_path):
    meta = json.loads((gate_runs / "slow" / "meta.json").read_text())
    assert meta["env"]["settings"]["CPBENCH_SLOWDOWN"] == "8"
    assert (
        "CPBENCH_SLOWDOWN"
        not in json.loads((gate_runs / "same" / "meta.json").read_text())["env"]["settings"]
    )
    from cpbench.runner import slowdown_factor

    os.environ["CPBENCH_SLOWDOWN"] = "0.5"
    try:
        with pytest.raises(ValueError, match="expected a number >= 1"):
            slowdown_factor()
    finally:
        del os.environ["CPBENCH_SLOWDOWN"]
    assert slowdown_factor() == 1.0


def test_same_code_passes_and_a_slowed_layer_fails_at_the_defaults(gate_runs, capsys):
    base = str(gate_runs / "base")
    same_run = str(gate_runs / "same")
    assert main(["compare", base, same_run, "--format", "json"]) == 0, capsys.readouterr().out
    same = json.loads(capsys.readouterr().out)
    assert same["gate"] == "pass" and same["metrics"]["layer_ms"]["runs_old"] == 2
    assert same["metrics"]["layer_ms"]["run_noise_measured"]
    # the slowed run against all three runs of the unchanged code
    assert main(["compare", base, same_run, str(gate_runs / "slow"), "--format", "json"]) == 1
    slow = json.loads(capsys.readouterr().out)
    assert (
        slow["gate"] == "fail" and slow["regressions"] >= 1 and slow["metrics"]["layer_ms"]["runs_old"] == 3
    )
    # the noise the gate used is the baseline's own, whichever run is judged
    again = ["compare", base, same_run, str(gate_runs / "base" / "1"), "--format", "json"]
    assert main(again) == 0
    other = json.loads(capsys.readouterr().out)["metrics"]["layer_ms"]
    for k in ("run_noise", "shift_noise", "case_bar"):
        assert other[k] == slow["metrics"]["layer_ms"][k]
