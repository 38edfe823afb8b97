"""examples/train_hybrid.py run as a user runs it: 4 gloo ranks, (dp 2) x (cp 2), FSDP2 over the flattened
mesh, bf16 autocast, checkpointing; then the documented mistake (FSDP over dp only), caught by the replica check."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "examples" / "train_hybrid.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env, cwd=REPO
    )


def test_four_ranks_train_as_one_process_and_the_mistake_is_caught():
    res = _run()
    assert res.returncode == 0, res.stdout + res.stderr
    # the ranks print concurrently: count, don't split lines
    ranks = re.findall(r"rank (\d) \(dp \d, cp \d\): losses .*?: (match|MISMATCH)", res.stdout)
    assert sorted(ranks) == [(str(r), "match") for r in range(4)], res.stdout
    assert "view" not in res.stderr, res.stderr  # FSDP2 warns when a module returns a view
    caught = re.findall(
        r"rank (\d): FSDP over mesh\['dp'\] alone, replica check: parameters differ .*? "
        r"mixer\.in_proj\.weight \(ranks \[0\] / ranks \[1\]\)",
        res.stdout,
    )
    assert sorted(caught) == ["0", "1", "2", "3"], res.stdout
