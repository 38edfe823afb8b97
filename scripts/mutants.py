"""Single mutants of cp_core and the tests that must kill each.

    python3 scripts/mutants.py [--only NAME ...] [--timeout 300] [--list]

Each mutant is one textual change to one file of a scratch copy of the tree (``git ls-files``, copied to a
temporary folder, so the working tree is never touched). The mutant's killing tests run there
(``python -m pytest -q -x``); the mutant is *killed* when they fail (or time out: a hang counts, the test
did not pass), *survived* when they pass. Mutants whose tests need CUDA are reported ``needs CUDA`` on a
machine without one. Prints one line per mutant and ends with a Markdown table; exit status 1 when a
mutant survived.

The set: every fingerprint field of the cross-rank agreement dropped (so each field has a test that sees
it), the C block's offset in a head chunk of several whole groups (the channel plan and the conv weight's
rows), the CPU ``cu_seqlens`` value check, building cached plans outside inference mode, the per-call
agreement (made once per batch), and the communication stream's ``wait_event`` / ``record_stream`` calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AGREE_HOOK = "    h = 0 if error is not None else fingerprint_hash(static, call)\n"


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    occurrence: int = 1  # which occurrence of ``old`` is replaced (1-based)
    cuda: bool = False


def _drop(field: str, tests: tuple[str, ...]) -> Mutant:
    new = (
        f"    static = tuple(i for i in static if i[0] != {field!r})\n"
        f"    call = tuple(i for i in call if i[0] != {field!r})\n" + AGREE_HOOK
    )
    return Mutant(f"fingerprint drops {field!r}", "cp_core/agree.py", AGREE_HOOK, new, tests)


def _agree_test(name: str, param: str) -> str:
    return f"tests/test_agree.py::{name}[{param}]"


def mutants() -> list[Mutant]:
    sys.path.insert(0, str(ROOT))
    from cp_core.mixer import Mamba2Config
    from cp_core.options import CPOptions

    each = "test_each_field_differing_on_one_rank_is_named_on_every_rank"
    out = [
        _drop(f"config.{f.name}", (_agree_test(each, f"config-{f.name}"),))
        for f in dataclasses.fields(Mamba2Config)
    ]
    out += [
        _drop(f"options.{f.name}", (_agree_test(each, f"options-{f.name}"),))
        for f in dataclasses.fields(CPOptions)
    ]
    dis = "test_disagreement_raises_on_every_rank"
    seed = "test_seed_api_mismatch_raises_on_every_rank"
    out += [
        _drop("strategy", (_agree_test(dis, "hidden or state passing"),)),
        _drop("fused", (_agree_test(dis, "fused"),)),
        _drop("layout", (_agree_test(dis, "layout"),)),
        _drop("dtype", (_agree_test(dis, "dtype"), _agree_test(seed, "dtype fp16/bf16"))),
        _drop("batch", (_agree_test(dis, "batch hidden"),)),
        _drop("local tokens", (_agree_test(dis, "local length state_passing"),)),
        _drop("cu_seqlens values", (_agree_test(dis, "cu hidden"), _agree_test(dis, "cu seed"))),
        _drop("documents", (_agree_test(dis, "cu hidden"),)),  # equivalent: the values' hash covers it
        _drop("with_z", (_agree_test(seed, "with_z"),)),
        _drop("op", (_agree_test(seed, "op"),)),
        _drop("width", (_agree_test(seed, "num_heads"),)),  # equivalent: the configuration and with_z fix it
        _drop("config.num_heads", (_agree_test(seed, "num_heads"),)),
        _drop("config.n_groups", (_agree_test(seed, "n_groups"),)),
        _drop("config.fused", (_agree_test(seed, "fused"),)),
        _drop("device type", ()),  # gloo on CPU: every rank's tensors are on one device type
        Mutant(
            "agreement ignores the layer's options (static_fields skips them)",
            "cp_core/agree.py",
            "    for prefix, obj in dataclasses_.items():\n",
            "    for prefix, obj in [kv for kv in dataclasses_.items() if kv[0] != 'options']:\n",
            (
                _agree_test(each, "options-overlap_chunks"),
                "tests/test_agree.py::test_static_fields_cover_every_dataclass_field",
            ),
        ),
        Mutant(
            "C block offset of a head chunk: its first group index instead of its piece index",
            "cp_core/channels.py",
            "        (n_groups * d_state, gcount, gn * d_state, g0 // gn),\n",
            "        (n_groups * d_state, gcount, gn * d_state, g0),\n",
            (
                "tests/test_channels.py",
                "tests/test_mixer_parity.py::test_overlap_chunks_bit_identical[2-8-2-bshd]",
            ),
            occurrence=2,
        ),
        Mutant(
            "C rows of a head chunk's conv weight offset by the chunk's groups instead of the rank's",
            "cp_core/mixer.py",
            "dl + gl + bc]",
            "dl + gn * ds + bc]",
            ("tests/test_mixer_parity.py::test_overlap_chunks_bit_identical[2-8-2-bshd]",),
        ),
        Mutant(
            "plan cache: CPU cu_seqlens not compared by value",
            "cp_core/plan.py",
            "and (values is None or torch.equal(cu_seqlens, values))",
            "",
            ("tests/test_caches.py::test_plan_cache_hit_and_refill", "tests/test_caches.py -k refilled"),
        ),
        Mutant(
            "cached plans built inside inference mode",
            "cp_core/plan.py",
            "    if torch.is_inference_mode_enabled():\n        return torch.inference_mode(False)\n",
            "",
            ("tests/test_caches.py -k eval_then_training",),
        ),
        Mutant(
            "agreement once per batch by default",
            "cp_core/options.py",
            '    agree: str = "call"\n',
            '    agree: str = "batch"\n',
            ("tests/test_agree.py::test_rejection_on_a_later_call_raises_on_every_rank[hidden dtype-True]",),
        ),
    ]
    gpu = "tests/test_pipeline_gpu.py"
    for name, old, test in [
        (
            "compute stream does not wait for the transfer",
            "        main.wait_event(ready_j)\n",
            "slow_transfer",
        ),
        (
            "transfer does not wait for the compute",
            "        side.wait_event(main.record_event())\n",
            "slow_compute",
        ),
        (
            "transfer buffer not recorded on the compute stream",
            "        a.record_stream(main)\n",
            "outlive_a_slow_compute",
        ),
        (
            "compute result not recorded on the comm stream",
            "            b.record_stream(side)\n",
            "slow_return",
        ),
    ]:
        out.append(Mutant(name, "cp_core/pipeline.py", old, "", (f"{gpu} -k {test}",), cuda=True))
    merged: dict[str, Mutant] = {}  # one mutant per change: a field both layers share gets both tests
    for m in out:
        if m.name in merged:
            m = dataclasses.replace(m, tests=merged[m.name].tests + m.tests)
        merged[m.name] = m
    return list(merged.values())


def _apply(tree: Path, m: Mutant) -> str:
    f = tree / m.path
    text = f.read_text()
    at = -1
    for _ in range(m.occurrence):
        at = text.find(m.old, at + 1)
        if at < 0:
            raise SystemExit(
                f"mutant {m.name!r}: {m.old!r} (occurrence {m.occurrence}) not found in {m.path}"
            )
    f.write_text(text[:at] + m.new + text[at + len(m.old) :])
    return text


def _run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> str:
    env = dict(os.environ, PYTHONPATH=str(tree))
    for t in tests:
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *t.split()]
        # its own session: on a timeout the whole group goes (pytest and the gloo ranks it spawned)
        p = subprocess.Popen(
            cmd,
            cwd=tree,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return f"killed (timed out: {t})"
        if rc == 5:
            return f"no test selected: {t}"
        if rc != 0:
            return f"killed by {t}"
    return "survived"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="names (substrings) of the mutants to run")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per test command")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    ms = [m for m in mutants() if not a.only or any(o in m.name for o in a.only)]
    if a.list:
        for m in ms:
            print(f"{m.name}: {m.path}; {', '.join(m.tests) or '(no test)'}")
        return 0
    import torch

    cuda = torch.cuda.is_available()
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    rows, survived = [], 0
    with tempfile.TemporaryDirectory(prefix="cpbench-mutants-") as tmp:
        tree = Path(tmp)
        for rel in files.split():
            if rel.startswith("results/") or not (ROOT / rel).is_file():
                continue
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, tree / rel)
        for m in ms:
            t0 = time.perf_counter()
            if not m.tests:
                verdict = "survived (no test can see it on this machine)"
            elif m.cuda and not cuda:
                verdict = "not run: needs CUDA"
            else:
                original = _apply(tree, m)
                try:
                    verdict = _run_tests(tree, m.tests, a.timeout)
                finally:
                    (tree / m.path).write_text(original)
            survived += verdict.startswith("survived")
            line = f"{m.name} | {verdict} | {time.perf_counter() - t0:.0f} s"
            print(line, flush=True)
            rows.append(line)
    print("\n| mutant | verdict | time |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r} |")
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
