"""scripts/gpu_smoke.sh stays current: every command it lists parses here (``--dry-run``: the scenario, its
overrides and its cases; the benches' arguments), and the one-GPU commands of the READMEs are in it."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from cpbench import kernel_bench, layout_bench
from cpbench.cli import _parser, main

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_smoke.sh"


def smoke_commands(tmp: Path) -> list[tuple[str, list[str]]]:
    res = subprocess.run(
        ["bash", str(SCRIPT), "--list", str(tmp)], capture_output=True, text=True, check=True
    )
    out = []
    for line in res.stdout.splitlines():
        label, cmd = line.split("|", 1)
        out.append((label, shlex.split(cmd)))
    return out


def _cpbench_args(words: list[str]) -> list[str] | None:
    """The cpbench arguments of ``python3 -m cpbench ...`` or ``torchrun --nproc-per-node 1 -m cpbench ...``."""
    if words[:3] == ["python3", "-m", "cpbench"]:
        return words[3:]
    if words[0] == "torchrun":
        assert words[1:3] == ["--nproc-per-node", "1"], words  # one GPU
        assert words[3:5] == ["-m", "cpbench"], words
        return words[5:]
    return None


def test_every_smoke_command_parses(tmp_path, capsys):
    cmds = smoke_commands(tmp_path)
    assert len(cmds) >= 20
    for label, words in cmds:
        args = _cpbench_args(words)
        if args is not None and args[0] == "sweep":
            assert main([*args, "--dry-run"]) == 0, (label, capsys.readouterr().err)
            assert "cases (world size" in capsys.readouterr().out, label
        elif args is not None:
            _parser().parse_args(args)  # report, trace: their output folders come from the GPU run
        elif words[:3] == ["python3", "-m", "cpbench.kernel_bench"]:
            assert kernel_bench.main([*words[3:], "--dry-run"]) == 0, label
        elif words[:3] == ["python3", "-m", "cpbench.layout_bench"]:
            assert layout_bench.main([*words[3:], "--dry-run"]) == 0, label
        elif words[:2] == ["python3", "-m"] and words[2] == "pytest":
            assert "gpu" in words, label
        else:
            assert words[0] == "python3" and (REPO / words[1]).is_file(), (label, words)
        capsys.readouterr()


def test_the_readmes_one_gpu_commands_are_in_the_smoke(tmp_path):
    text = " ".join(" ".join(w) for _, w in smoke_commands(tmp_path))
    docs = (REPO / "README.md").read_text() + (REPO / "scenarios" / "README.md").read_text()
    named = set(re.findall(r"cpbench sweep (?:scenarios/)?(\w+)", docs)) - {"SCENARIO"}
    assert named, "no cpbench sweep command found in the READMEs"
    for name in named:
        assert f"cpbench sweep {name} " in text, f"the READMEs run {name}; the smoke does not"
    for tool in (
        "cpbench.kernel_bench",
        "cpbench.layout_bench",
        "--backend fake",
        "--profile nsys",
        "report",
    ):
        assert tool in text
    assert "torchrun --nproc-per-node 1 -m cpbench sweep" in text and "-m pytest -q -m gpu" in text


def _run_smoke(tmp: Path, lines: str, budget: int) -> tuple[int, list[str]]:
    """The script's run mode over ``lines`` (SMOKE_LIST), from a copy outside the repository (no .whl
    there, so no GPU setup is sourced)."""
    (tmp / "scripts").mkdir(parents=True)
    (tmp / "scripts" / "gpu_smoke.sh").write_text(SCRIPT.read_text())
    (tmp / "list").write_text(lines)
    env = {
        "PATH": "/usr/bin:/bin",
        "SMOKE_LIST": str(tmp / "list"),
        "BUDGET_S": str(budget),
        "HOME": str(tmp),
    }
    res = subprocess.run(
        ["bash", str(tmp / "scripts" / "gpu_smoke.sh"), str(tmp / "out")],
        capture_output=True, text=True, env=env, cwd=tmp,
    )  # fmt: skip
    return res.returncode, res.stdout.splitlines()


def test_the_summary_counts_ok_failed_and_skipped_apart(tmp_path):
    rc, out = _run_smoke(tmp_path / "a", "one|true\ntwo|false\nthree|true\n", 560)
    assert rc == 1 and out[-1].startswith("3 command(s): 2 ok, 1 failed, 0 skipped,"), out
    # a command skipped for time is said so, and is no failure
    rc, out = _run_smoke(tmp_path / "b", "one|true\ntwo|false\n", 0)
    assert rc == 0 and out[-1].startswith("2 command(s): 0 ok, 0 failed, 2 skipped,"), out
    assert sum("(no time left in 0 s)" in line for line in out) == 2
