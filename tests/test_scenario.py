"""Scenario files: schema, errors that name the key and the file, --set overrides, cases and skips."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from cpbench.cli import main
from cpbench.errors import ScenarioError
from cpbench.scenario import (
    EMBEDDED_DIR,
    Packing,
    embedded_scenarios,
    load_scenario,
    parse_override,
    parse_scenario,
)

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """
[layer]
d_model = 64
n_heads = 4
head_dim = 16
n_groups = 2
d_state = 16
"""


def write(tmp_path, text, name="scen.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_embedded_scenarios_load_and_match_the_top_level_copies():
    names = {p.stem for p in embedded_scenarios()}
    assert {"smoke", "packing", "heads", "long_context", "h100_node"} <= names
    top = sorted((REPO / "scenarios").glob("*.toml"))
    assert {p.name for p in top} == {p.name for p in embedded_scenarios()}
    for p in top:
        assert filecmp.cmp(p, EMBEDDED_DIR / p.name, shallow=False), (
            f"{p} differs from {EMBEDDED_DIR / p.name}"
        )
    for p in embedded_scenarios():
        s = load_scenario(str(p))
        assert s.cases(), p
        assert s.name == p.stem


def test_default_is_smoke_and_names_resolve():
    assert load_scenario(None).name == "smoke"
    assert load_scenario("h100_node").layer.d_model == 4096


def test_defaults_and_scalar_axes(tmp_path):
    s = load_scenario(str(write(tmp_path, MINIMAL + "[sweep]\ncp_size = 2\n")))
    assert s.name == "scen"
    assert s.sweep.cp_size == (2,)
    assert s.sweep.heads == ((4, 2),)
    assert s.sweep.packing == (Packing(),)
    assert s.sweep.pass_ == ("fwd+bwd",)
    assert s.layer.d_conv == 4 and s.layer.chunk_size == 256 and s.layer.dtype == "float32"
    assert s.run.iters == 10 and s.run.backend == "auto" and s.run.fake_busbw_gbps == 370.0


@pytest.mark.parametrize(
    "extra, needles",
    [
        ("[sweep]\nfoo = [1]\n", ["[sweep] foo", "unknown key"]),
        ("[sweeps]\ncp_size = [1]\n", ["sweeps", "unknown key"]),
        ("[sweep]\ncp_size = [0]\n", ["[sweep] cp_size", ">= 1"]),
        ("[sweep]\ncp_size = ['2']\n", ["[sweep] cp_size", "integer"]),
        ("[sweep]\ncp_size = []\n", ["[sweep] cp_size", "non-empty"]),
        ("[sweep]\nlayout = ['zigzag']\n", ["[sweep] layout", "head_tail"]),
        ("[sweep]\npass = ['bwd']\n", ["[sweep] pass", "fwd+bwd"]),
        ("[sweep]\nheads = [[6, 4]]\n", ["[sweep] heads", "n_groups"]),
        ("[sweep]\nheads = [[6]]\n", ["[sweep] heads", "pair"]),
        ("[sweep]\npacking = [{docs = 4, density = 1.5}]\n", ["[sweep] packing", "density"]),
        ("[sweep]\npacking = [{docs = 0}]\n", ["[sweep] packing", "docs"]),
        ("[sweep]\npacking = [{docs = 2, dens = 0.5}]\n", ["[sweep] packing", "dens"]),
        ("[sweep]\npacking = ['bshd']\n", ["[sweep] packing", "none"]),
        ("[run]\niters = 0\n", ["[run] iters", ">= 1"]),
        ("[run]\ndevice = 'tpu'\n", ["[run] device", "cuda"]),
        ("[run]\nmicrobench = 1\n", ["[run] microbench", "true or false"]),
        ("[run]\ntimeout_s = -1\n", ["[run] timeout_s", "> 0"]),
    ],
)
def test_bad_values_name_the_key_and_the_file(tmp_path, extra, needles):
    p = write(tmp_path, MINIMAL + extra)
    with pytest.raises(ScenarioError) as e:
        load_scenario(str(p))
    msg = str(e.value)
    assert str(p) in msg
    for n in needles:
        assert n in msg, msg


def test_layer_errors(tmp_path):
    p = write(tmp_path, MINIMAL.replace("d_model = 64\n", ""))
    with pytest.raises(ScenarioError, match=r"\[layer\] d_model: missing"):
        load_scenario(str(p))
    p = write(tmp_path, MINIMAL.replace("d_state = 16", 'd_state = 16\ndtype = "fp8"'))
    with pytest.raises(ScenarioError, match=r"\[layer\] dtype: expected one of"):
        load_scenario(str(p))
    p = write(tmp_path, MINIMAL.replace("n_groups = 2", "n_groups = 3"))
    with pytest.raises(ScenarioError, match=r"\[layer\] n_groups"):
        load_scenario(str(p))
    p = write(tmp_path, "[layer\nd_model = 1")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        load_scenario(str(p))
    with pytest.raises(ScenarioError, match="no such scenario"):
        load_scenario(str(tmp_path / "missing.toml"))


def test_overrides(tmp_path):
    p = write(tmp_path, MINIMAL)
    s = load_scenario(
        str(p),
        [
            "sweep.cp_size=[1,2]",
            "run.iters=3",
            "run.device=cpu",
            'sweep.packing=["none", {docs=2, density=0.5}]',
        ],
    )
    assert s.sweep.cp_size == (1, 2)
    assert s.run.iters == 3
    assert s.run.device == "cpu"
    assert s.sweep.packing == (Packing(), Packing(2, 0.5))
    assert s.overrides[0] == "sweep.cp_size=[1,2]"
    assert parse_override("name=foo") == ("", "name", "foo")
    with pytest.raises(ScenarioError, match=r"unknown key 'sweep.cp'"):
        load_scenario(str(p), ["sweep.cp=[1]"])
    with pytest.raises(ScenarioError, match="unknown table"):
        load_scenario(str(p), ["swep.cp_size=[1]"])
    with pytest.raises(ScenarioError, match="TABLE.KEY=VALUE"):
        load_scenario(str(p), ["run.iters"])
    with pytest.raises(ScenarioError) as e:
        load_scenario(str(p), ["run.iters=0"])
    assert "--set run.iters=0" in str(e.value) and "[run] iters" in str(e.value)


def test_resolved_toml_round_trips(tmp_path):
    s = load_scenario("smoke", ["sweep.heads=[[4, 2], [4, 4]]"])
    again = parse_scenario(tomllib.loads(s.to_toml()))
    assert again.layer == s.layer and again.sweep == s.sweep and again.run == s.run and again.name == s.name


def test_cases_cross_product_and_skip_reasons(tmp_path):
    text = (
        MINIMAL
        + """
[sweep]
cp_size = [1, 2, 4, 8]
seq_len = [64, 72]
heads = [[4, 2], [6, 2]]
packing = ["none", {docs = 3, density = 0.5}]
layout = ["head_tail", "contiguous"]
strategy = ["hidden", "state_passing"]
"""
    )
    s = load_scenario(str(write(tmp_path, text)))
    cases = s.cases()
    assert len(cases) == 4 * 2 * 2 * 2 * 2 * 2
    assert [c.index for c in cases] == list(range(len(cases)))
    assert s.pack_granule == 16

    def find(**kw):
        out = [c for c in cases if all(getattr(c, k) == v for k, v in kw.items())]
        assert out
        return out[0]

    c = find(cp_size=8, seq_len=64, n_heads=4, layout="head_tail", strategy="hidden", packing=Packing())
    assert "cp_size 8 > world size 4" in c.skip_reason(4)
    assert "not a multiple of cp_size" in find(cp_size=4).skip_reason(6)
    c = find(cp_size=4, seq_len=72, n_heads=4, layout="head_tail", strategy="hidden", packing=Packing())
    assert c.skip_reason(8) is None  # 72 % 8 == 0
    c = find(
        cp_size=8, seq_len=72, n_heads=4, layout="head_tail", strategy="state_passing", packing=Packing()
    )
    assert "2*cp_size = 16" in c.skip_reason(8)
    c = find(
        cp_size=8, seq_len=72, n_heads=4, layout="contiguous", strategy="state_passing", packing=Packing()
    )
    assert c.skip_reason(8) is None  # 72 % 8 == 0
    c = find(cp_size=4, seq_len=64, n_heads=6, layout="head_tail", strategy="hidden", packing=Packing())
    assert "n_heads 6 is not divisible by cp_size 4" in c.skip_reason(8)
    c = find(
        cp_size=4, seq_len=64, n_heads=6, layout="head_tail", strategy="state_passing", packing=Packing()
    )
    assert c.skip_reason(8) is None
    c = find(
        cp_size=2, seq_len=72, n_heads=4, layout="contiguous", strategy="hidden", packing=Packing(3, 0.5)
    )
    assert "pack granule 16" in c.skip_reason(8)  # packs are padded for the largest cp_size
    c = find(
        cp_size=2, seq_len=64, n_heads=4, layout="contiguous", strategy="hidden", packing=Packing(3, 0.5)
    )
    assert c.skip_reason(8) is None
    # the fake backend has no world to fit
    assert find(cp_size=8, seq_len=64, n_heads=4, strategy="state_passing").skip_reason(None) is None
    key = cases[0].key(device="cpu", world_size=2, backend="gloo")
    assert key["packing"] == "none" and key["docs"] == 0 and key["pass"] == "fwd+bwd"


def test_cli_reports_scenario_errors_without_traceback(tmp_path, capsys):
    p = write(tmp_path, MINIMAL + "[sweep]\nbogus = 1\n")
    assert main(["sweep", str(p)]) == 2
    err = capsys.readouterr().err
    assert "cpbench: error:" in err and "bogus" in err and str(p) in err and "Traceback" not in err
    assert main(["sweep", str(write(tmp_path, MINIMAL, "ok.toml")), "--set", "run.warmup=-1"]) == 2
    assert "[run] warmup" in capsys.readouterr().err


def test_dry_run_lists_cases_and_skips(tmp_path, capsys):
    p = write(tmp_path, MINIMAL + "[sweep]\ncp_size = [1, 2, 4]\nseq_len = [64]\n")
    assert main(["sweep", str(p), "--dry-run", "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    assert "cp_size 4 > world size 2" in out and "3 cases" in out
