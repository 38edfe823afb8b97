"""results/ holds the claims: results/README.md's table names every folder there and only folders that exist, and
every entry of scripts/gpu_sets.sh (the command of a set) parses here: each cpbench sweep with ``--dry-run`` at
its world size, the other commands' tools and files; the docs name only entries that exist."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

from cpbench import kernel_bench
from cpbench.cli import _parser, main

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_sets.sh"
RESULTS = REPO / "results"
#: a table row may name a folder that a branch measured today adds at its merge; the lead drops the marker then
PENDING = "added by today's sets"


def entries() -> dict[str, tuple[str, str]]:
    out = subprocess.run(["bash", str(SCRIPT), "--list"], capture_output=True, text=True, check=True).stdout
    return {n: (f, what) for n, f, what in (line.split("|", 2) for line in out.splitlines())}


def dry_run(name: str, tmp: Path) -> list[list[str]]:
    env = {**os.environ, "OUT": str(tmp)}
    res = subprocess.run(["bash", str(SCRIPT), "--dry-run", name], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.strip() and not line.startswith("## ")]
    return [shlex.split(line) for line in lines]


def _command(words: list[str]) -> tuple[list[str], int]:
    """``words`` without ``env VAR=V ...`` and the launcher: (the words from the tool on, ranks)."""
    if words[0] == "env":
        words = words[1:]
        while re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words = words[1:]
    if words[0] == "torchrun":
        assert words[1] == "--nproc-per-node", words
        return words[3:], int(words[2])
    assert words[0] == "python3", words
    return words[1:], 1


def test_every_command_of_every_entry_parses(tmp_path, capsys):
    sweeps = 0
    for words in dry_run("all", tmp_path):
        cmd, ranks = _command(words)
        if cmd[:2] == ["-m", "cpbench"] and cmd[2] == "sweep":
            nproc = ["--nproc", str(ranks)] if "fake" not in cmd else []
            assert main([*cmd[2:], *nproc, "--dry-run"]) == 0, (words, capsys.readouterr().err)
            assert re.search(r"│\s*yes\s*│", capsys.readouterr().out), f"no case of {words} would run"
            sweeps += 1
        elif cmd[:2] == ["-m", "cpbench"]:
            _parser().parse_args(cmd[2:])  # report, trace: their inputs come from the GPU run
        elif cmd[:2] == ["-m", "cpbench.kernel_bench"]:
            assert kernel_bench.main([*cmd[2:], "--dry-run"]) == 0, words
        elif cmd[:2] == ["-m", "pytest"]:
            assert "gpu" in cmd, words
        else:
            assert (REPO / cmd[0]).is_file(), words
        capsys.readouterr()
    assert sweeps >= 30


def test_an_unknown_entry_is_refused():
    res = subprocess.run(["bash", str(SCRIPT), "stage-9"], capture_output=True, text=True)
    assert res.returncode == 2 and "no entry stage-9" in res.stderr


def table_problems(text: str, folders: set[str], names: set[str]) -> list[str]:
    """What is wrong with results/README.md's claims table against the folders of results/ and the entries."""
    claims = text.split("\n## Claims\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in claims.splitlines() if line.startswith("| ") and not line.startswith("| claim")]
    problems, named = [], set()
    for row in rows:
        cells = row.split(" | ")
        if len(cells) != 5:
            problems.append(f"not 5 columns: {row}")
            continue
        for m in re.finditer(r"`([\w.-]+-\d{8}[\w-]*)/`([^`]*)", cells[1]):
            named.add(m[1])
            if m[1] not in folders and PENDING not in m[2]:
                problems.append(f"no folder {m[1]}")
        for n in re.findall(r"gpu_sets\.sh ([\w-]+)", cells[3]):
            if n not in names:
                problems.append(f"no entry {n}")
    problems += [f"{f} backs no claim in the table" for f in sorted(folders - named)]
    return problems


def test_results_readme_is_the_table_of_claims():
    text = (RESULTS / "README.md").read_text()
    assert len(text.splitlines()) < 200
    folders = {p.name for p in RESULTS.iterdir() if p.is_dir()}
    names = set(entries())
    assert table_problems(text, folders, names) == []
    for name, (folder, _) in entries().items():
        assert folder == "(every set)" or folder in folders, (name, folder)
        assert folder == "(every set)" or f"gpu_sets.sh {name}`" in text, f"entry {name} reproduces no claim"
    # and the check catches a folder without a row, a row without a folder, an entry that is gone
    bad = text.replace("`h100x2-peers-20261125/`", "`h100x2-peers-20261124/`")
    bad = bad.replace("sh projection`", "sh 20`")
    assert table_problems(bad, folders, names) == [
        "no entry 20",
        "no folder h100x2-peers-20261124",
        "h100x2-peers-20261125 backs no claim in the table",
    ]


def test_the_docs_name_only_entries_that_exist():
    names = set(entries()) | {"NAME", "--list", "--dry-run"}
    docs = [REPO / "README.md", REPO / "DEVELOPERS.md", *REPO.glob("docs/*.md"), *RESULTS.rglob("README.md")]
    for doc in docs:
        for n in re.findall(r"gpu_sets\.sh\s+([\w-]+)", doc.read_text()):
            assert n in names, f"{doc.relative_to(REPO)} runs gpu_sets.sh {n}: no such entry (--list)"
