"""The resource guard: refusals with the numbers and the override; the memory estimate against real
peak memory (CPU: measured here; GPU: every committed measurement); how a dead rank is described."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from unittest import mock

import pytest
import torch

from cpbench import guard, memory
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
    _, per_rank = guard.largest_case(heads, 8, "cuda")
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
    axes = ["sweep.cp_size=[1]", "sweep.seq_len=[32768]", 'sweep.packing=["none"]', 'sweep.path=["fused"]']
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for p in ("fwd", "fwd+bwd"):
        args = [*shape, *axes, f'sweep.pass=["{p}"]', "run.warmup=1", "run.iters=1"]
        # L 32K: the tensors dominate the process's fixed overhead (code pages, allocator arenas), which at
        # 8K tokens moved the ratio between 0.42 and 0.76 from run to run; noise only inflates the measured
        # peak (lowers the ratio), so the best of up to three measurements is taken
        ratios = []
        for _ in range(3):
            res = subprocess.run(
                [sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, env=env
            )
            assert res.returncode == 0, res.stderr
            ratios.append(float(res.stdout.strip()))
            if 0.5 < max(ratios) < 2.0:
                break
        assert 0.5 < max(ratios) < 2.0, (p, ratios)  # estimate / measured peak resident memory


def test_a_sigkill_is_named_oom_only_when_the_kernel_counted_one():
    assert "out-of-memory killer" in guard.death_cause("SIGKILL", 3, 4)
    assert "did not rise" in guard.death_cause("SIGKILL", 3, 3)
    assert guard.death_cause("SIGTERM", 3, 4) == "ended with signal SIGTERM"
    if Path("/proc/vmstat").exists():
        assert isinstance(guard.oom_kills(), int)


# ------------------------------------------------------------------------------ the GPU walk against measurements

RESULTS = REPO / "results"
BAND = (0.7, 1.5)  # estimate / measured peak_mem_GiB
#: committed sets (or parts of one: a path under results/) measured with code whose memory behaviour has since
#: changed: which rows are left out, and why
STALE = {
    "h100x2-peers-20261125": (
        "cp_core",
        "before the layer core (f3b3fc8): cp 1 L 64K 15.1 GiB there, 13.5 GiB since; its peers' rows count",
    ),
    "h100x2-state-passing-20261125/L64K": (
        "packed state passing",
        "state passing before its rows were split (4798310): 8 documents at L 64K 11.8 GiB there, 8.8 GiB "
        "in the re-run of the same day (L64K/rows, left out with it); before the layer core (8ae45a7): "
        "64 documents at L 64K 17.5 GiB in that re-run, 9.19 GiB since (h200-memory-20261202/strategies)",
    ),
    "h100x2-state-passing-20261125/L128K": (
        "packed state passing",
        "state passing before its layer core (8ae45a7: padded [rows, Lmax] documents, autograd through every "
        "step): 64 documents at L 128K 25.6 GiB there, 16.3 GiB since (h200-strategies-20261202/sweep)",
    ),
}


def _stale(name: str, case) -> bool:
    """``case`` of the set at ``name`` (its path under results/) is one :data:`STALE` leaves out."""
    rows = next((r for k, (r, _) in STALE.items() if name == k or name.startswith(k + "/")), None)
    if rows == "cp_core":
        return case.impl == "cp_core"
    if rows == "packed state passing":
        return case.packing.packed and case.strategy != "hidden"
    return False


@cache
def committed_gpu_cases():
    """``(set, scenario, case, measured GiB, deterministic, backend)`` of every ok CUDA row of the committed
    sets with a peak of 1 GiB or more (below that, fixed costs outside the layer dominate)."""
    out = []
    for csv in sorted(RESULTS.rglob("results.csv")):
        name = str(csv.parent.relative_to(RESULTS))
        for m in memory.measured(csv.parent, min_gib=1.0):
            out.append((name, m.scenario, m.case, m.peak_gib, m.deterministic, m.backend))
    return out


def family(case, backend) -> set[str]:
    f = {f"cp {case.cp_size}", "packed" if case.packing.packed else "BSHD"}
    f.add(case.impl if case.impl != "cp_core" else ("seed path" if case.path == "seed" else case.strategy))
    if backend == "fake":
        f.add("projection")
    return f


def band_failures(estimate) -> tuple[list[str], set[str], int]:
    """Cases whose ``estimate(scenario, case, deterministic) / measured`` leaves :data:`BAND`, the families
    checked, and how many cases were."""
    fails, seen, n, memo = [], set(), 0, {}
    for name, scenario, case, measured, det, backend in committed_gpu_cases():
        if _stale(name, case):
            continue
        key = (id(scenario), case.index, det)
        if key not in memo:
            memo[key] = estimate(scenario, case, det) / 2**30
        ratio = memo[key] / measured
        n += 1
        seen |= family(case, backend)
        if not BAND[0] <= ratio <= BAND[1]:
            fails.append(
                f"{name}: {case.describe()}: estimate {memo[key]:.2f} / measured {measured:.2f} GiB = {ratio:.2f}"
            )
    return fails, seen, n


FAMILIES = {"cp 1", "cp 2", "cp 8", "BSHD", "packed", "hidden", "state_passing", "state_passing_chain",
            "seed path", "nemo", "mamba_ssm", "projection"}  # fmt: skip


def test_the_gpu_walk_holds_every_committed_peak():
    fails, seen, n = band_failures(memory.case_peak)
    assert not fails, "\n".join(fails)
    assert FAMILIES <= seen, f"families without a checked case: {FAMILIES - seen}"
    assert n > 250  # every current set is read


def unchecked_sets() -> set[str]:
    """Committed sets with GPU rows of which :data:`STALE` leaves every row out (results/ keeps only sets that
    back a claim: the memory band is one of them)."""
    cases = committed_gpu_cases()
    checked = {n.split("/")[0] for n, _, c, *_ in cases if not _stale(n, c)}
    return {n.split("/")[0] for n, *_ in cases} - checked


def test_every_committed_set_is_checked_and_every_stale_entry_names_one():
    assert not unchecked_sets()
    assert [k for k in STALE if not (RESULTS / k).is_dir()] == [], "a STALE entry for a set that is gone"
    # a set whose every row is left out is caught
    with mock.patch.dict(STALE, {"h100x2-transport-20261125": ("cp_core", "all its rows")}):
        assert unchecked_sets() == {"h100x2-transport-20261125"}


def test_the_band_rejects_an_estimate_off_the_measurements():
    """The sum the guard used on GPUs before (this module's CPU estimate) fails the same check: 2-8x."""
    with mock.patch.object(guard, "fast_kernels", lambda: False):
        fails, _, n = band_failures(lambda s, c, det: guard.case_bytes(s, c, "cuda"))
    assert len(fails) > n / 2
    # and a walk that stops after the forward (what autograd keeps, no backward buffers) is caught
    import dataclasses

    def forward_only(s, c, det):
        return memory.gpu_peak(
            memory.layer_of(s, c), dataclasses.replace(memory.work_of(s, c, det), backward=False)
        )

    fails, _, _ = band_failures(forward_only)
    assert len(fails) > n / 2, "a walk without the backward still passed"


def test_projection_of_the_readme_fits_one_h200_and_is_refused_on_a_small_gpu():
    s = load_scenario("long_context", ['run.backend="fake"'])
    with mock.patch.object(guard, "fast_kernels", lambda: True):
        case, per_rank = guard.largest_case(s, None, "cuda")
        assert per_rank < 40 * guard.GIB  # measured: 26.6 GiB at cp 1 L 128K fwd+bwd; was estimated 200.7
        h200 = guard.Machine(cpus=16, ram_available=None, gpu_free=[int(139.3 * guard.GIB)])
        guard.check(s, torch.device("cuda"), 1, fake=True, mach=h200)
        small = guard.Machine(cpus=16, ram_available=None, gpu_free=[20 * guard.GIB])
        with pytest.raises(UserError, match=r"needs ~3\d\.\d GiB per rank \(estimate\) > 20\.0 GiB free"):
            guard.check(s, torch.device("cuda"), 1, fake=True, mach=small)
    assert math.isfinite(per_rank)
