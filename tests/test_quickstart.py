"""The README's example is examples/quickstart.py, run here as a user runs it (2 gloo ranks on the CPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "examples" / "quickstart.py"


def test_readme_shows_the_script_verbatim():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Using it", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    assert "examples/quickstart.py" in section
    assert block.strip() in SCRIPT.read_text()
    for name in ("shard", "cu_seqlens", "torch.int32", "init_process_group"):
        assert name in block


def test_quickstart_runs_on_two_cpu_ranks():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    res = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=180, env=env, cwd=REPO
    )
    assert res.returncode == 0, res.stdout + res.stderr
    for r in (0, 1):
        assert f"rank {r}/2: BSHD (2, 32, 32) and packed (64, 32) match" in res.stdout
