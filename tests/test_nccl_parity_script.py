"""tests/nccl_parity.py (the multi-GPU parity run under torchrun) works: here over gloo on CPU, 2 ranks."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parity_script_under_torchrun_on_cpu():
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1"
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "tests/nccl_parity.py",
        "--cpu",
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "44 passed, 0 failed (gloo, 2 ranks, CPU)" in out, out[-4000:]  # 40 + the grids 1x2, 2x1
    assert "ok   grid 2x1 thd hierarchical" in out, out[-4000:]
