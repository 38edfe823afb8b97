"""The resource guard: refusals with the numbers and the override; the memory estimate against real
peak memory; how a dead rank is described."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpbench import guard
from cpbench.errors import UserError
from cpbench.scenario import load_scenario

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def test_more_ranks_than_cores_or_memory_is_refused():
    heads = load_scenario("heads")
    small = guard.Machine(cpus=2, ram_available=8 * guard.GIB, gpu_free=[])
    with pytest.raises(UserError) as e:
        guard.check(heads, CPU, 8, mach=small)
    msg = str(e.value)
    assert "8 ranks on 2 CPU core(s)" in msg and "available RAM" in msg and "--no-resource-check" in msg
    case, per_rank = guard.largest_case(heads, 8)
    assert f"case {case.index} " in msg and per_rank * 8 > small.ram_available
    big = guard.Machine(cpus=8, ram_available=per_rank * 8 + 1, gpu_free=[])
    guard.check(heads, CPU, 8, mach=big)  # fits: no error
    gpus = guard.Machine(cpus=64, ram_available=None, gpu_free=[per_rank - 1] * 8)
    with pytest.raises(UserError, match="free on GPU 0"):
        guard.check(heads, torch.device("cuda"), 8, mach=gpus)
    smoke = load_scenario("smoke")
    guard.check(smoke, CPU, 2, mach=guard.Machine(cpus=2, ram_available=guard.GIB, gpu_free=[]))


def test_the_estimate_grows_with_the_work():
    s = load_scenario("smoke", ["sweep.seq_len=[1024, 4096]", 'sweep.packing=["none"]'])
    by = {(c.seq_len, c.cp_size, c.pass_): guard.case_bytes(s, c) for c in s.cases() if c.path == "fused"}
    assert by[(4096, 1, "fwd")] > by[(1024, 1, "fwd")] and by[(4096, 1, "fwd+bwd")] > by[(4096, 1, "fwd")]
    assert by[(4096, 2, "fwd")] < by[(4096, 1, "fwd")]  # a rank holds half the tokens


MEASURE = """
import resource, sys, torch
torch.set_num_threads(1)
from cpbench import guard, runner
from cpbench.scenario import load_scenario
s = load_scenario("smoke", sys.argv[1:])
case = s.cases()[0]
ctx = runner.RankContext(device=torch.device("cpu"), group=None)
base = int(open("/proc/self/statm").read().split()[1]) * 4096
runner.run_iterations(runner.setup_case(s, case, ctx), s, ctx)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(guard.case_bytes(s, case) / (peak - base))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc")
def test_the_estimate_is_near_the_measured_peak():
    shape = [
        "layer.d_model=128",
        "layer.n_heads=8",
        "layer.head_dim=16",
        "layer.d_state=16",
        "layer.chunk_size=64",
    ]
    axes = ["sweep.cp_size=[1]", "sweep.seq_len=[8192]", 'sweep.packing=["none"]', 'sweep.path=["fused"]']
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for p in ("fwd", "fwd+bwd"):
        args = [*shape, *axes, f'sweep.pass=["{p}"]', "run.warmup=1", "run.iters=1"]
        res = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
        ratio = float(res.stdout.strip())
        assert 0.5 < ratio < 2.0, (p, ratio)  # estimate / measured peak resident memory


def test_a_sigkill_is_named_oom_only_when_the_kernel_counted_one():
    assert "out-of-memory killer" in guard.death_cause("SIGKILL", 3, 4)
    assert "did not rise" in guard.death_cause("SIGKILL", 3, 3)
    assert guard.death_cause("SIGTERM", 3, 4) == "ended with signal SIGTERM"
    if Path("/proc/vmstat").exists():
        assert isinstance(guard.oom_kills(), int)
