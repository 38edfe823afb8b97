"""cpbench compare: regressions beyond threshold and noise, exit codes, mismatched sweeps."""

from __future__ import annotations

import pytest

from cpbench.cli import main
from cpbench.compare import compare, noise, parse_threshold, verdict
from cpbench.errors import ResultsError, UserError
from cpbench.results import ResultsWriter, read_results
from cpbench.scenario import CASE_KEY


def case_row(seq_len: int, layer_ms: float, iqr: float = 0.05, **extra) -> dict:
    r = dict.fromkeys(CASE_KEY, "x")
    r.update(cp_size=2, seq_len=seq_len, batch=1, n_heads=4, n_groups=2, docs=0, density=1.0, world_size=2)
    r.update(
        status="ok", error="", layer_ms=layer_ms, layer_iqr_ms=iqr, tokens_per_s=seq_len / layer_ms * 1e3
    )
    r.update(extra)
    return r


def write(path, rows):
    w = ResultsWriter(path)
    for r in rows:
        w.append(r)
    return path


BASE = [case_row(64, 10.0), case_row(128, 20.0), case_row(256, 40.0), case_row(512, 80.0)]


def test_threshold_parsing():
    assert parse_threshold("5%") == pytest.approx(0.05)
    assert parse_threshold("0.05") == pytest.approx(0.05)
    assert parse_threshold("5") == pytest.approx(0.05)
    with pytest.raises(UserError):
        parse_threshold("five")
    with pytest.raises(UserError):
        parse_threshold("-1%")


def test_verdict_needs_threshold_and_noise():
    assert verdict(10.0, 12.0, 0.1, 0.1, 0.05, higher=False) == "regressed"
    assert verdict(10.0, 10.4, 0.0, 0.0, 0.05, higher=False) == "same"  # inside the threshold
    assert verdict(10.0, 12.0, 3.0, 2.0, 0.05, higher=False) == "same"  # inside the noise (2.5)
    assert verdict(10.0, 8.0, 0.1, 0.1, 0.05, higher=False) == "improved"
    assert verdict(100.0, 80.0, 0.0, 0.0, 0.05, higher=True) == "regressed"
    assert verdict(float("nan"), 1.0, 0, 0, 0.05, higher=False) == "n/a"


def test_injected_regression_is_flagged(tmp_path, capsys):
    old = write(tmp_path / "old.csv", BASE)
    new_rows = [dict(r) for r in BASE]
    new_rows[2]["layer_ms"] = 48.0  # +20%
    new_rows[1]["layer_ms"] = 20.6  # +3%: inside the 5% threshold
    new = write(tmp_path / "new.csv", new_rows)
    assert main(["compare", str(old), str(new)]) == 1
    out = capsys.readouterr().out
    assert "regressed" in out and "1 regression" in out
    cmp = compare(read_results(old), read_results(new))
    (reg,) = cmp.regressions
    assert reg["seq_len"] == 256 and reg["ratio"] == pytest.approx(1.2)
    assert main(["compare", str(old), str(new), "--threshold", "25%"]) == 0
    capsys.readouterr()


def test_changes_inside_the_noise_are_not_regressions(tmp_path):
    noisy_old = [case_row(r["seq_len"], r["layer_ms"], iqr=r["layer_ms"] * 0.3) for r in BASE]
    noisy_new = [case_row(r["seq_len"], r["layer_ms"] * 1.2, iqr=r["layer_ms"] * 0.3) for r in BASE]
    old = write(tmp_path / "old.csv", noisy_old)
    new = write(tmp_path / "new.csv", noisy_new)
    assert main(["compare", str(old), str(new)]) == 0
    cmp = compare(read_results(old), read_results(new))
    assert not cmp.regressions and all(r["verdict"] == "noise" for r in cmp.rows)
    rec = {"layer_ms_old": 10.0, "layer_iqr_ms_old": 2.0, "tokens_per_s_old": 100.0}
    assert noise(rec, "layer_ms", "_old") == 2.0
    assert noise(rec, "tokens_per_s", "_old") == pytest.approx(20.0)  # the relative noise of the layer time


def test_same_file_and_improvements_exit_0(tmp_path, capsys):
    old = write(tmp_path / "old.csv", BASE)
    assert main(["compare", str(old), str(old)]) == 0
    new_rows = [dict(r) for r in BASE]
    new_rows[0]["layer_ms"] = 5.0
    new = write(tmp_path / "new.csv", new_rows)
    assert main(["compare", str(old), str(new), "--only-changed"]) == 0
    out = capsys.readouterr().out
    assert "improved" in out and "1 improvement" in out


def test_higher_is_better_metrics(tmp_path):
    old = write(tmp_path / "old.csv", BASE)
    new_rows = [dict(r) for r in BASE]
    new_rows[3]["tokens_per_s"] *= 0.7
    new = write(tmp_path / "new.csv", new_rows)
    assert main(["compare", str(old), str(new), "--metric", "tokens_per_s"]) == 1
    assert main(["compare", str(old), str(new), "--metric", "layer_ms"]) == 0


def test_ok_to_error_is_a_regression(tmp_path, capsys):
    old = write(tmp_path / "old.csv", BASE)
    new_rows = [dict(r) for r in BASE]
    new_rows[0].update(status="error", error="out of memory", layer_ms=None)
    new = write(tmp_path / "new.csv", new_rows)
    assert main(["compare", str(old), str(new)]) == 1
    assert "now error: out of memory" in capsys.readouterr().out


def test_mismatched_files(tmp_path, capsys):
    old = write(tmp_path / "old.csv", BASE)
    # cases only in one file are reported and fail the gate unless allowed; the common ones still compared
    new = write(tmp_path / "new.csv", BASE[:3] + [case_row(1024, 160.0)])
    assert main(["compare", str(old), str(new)]) == 1
    out = capsys.readouterr().out
    assert "cases only in OLD (1)" in out and "seq_len=512" in out
    assert "cases only in NEW (1)" in out and "seq_len=1024" in out
    assert "gate: FAIL: 1 case(s) of OLD missing" in out and "1 case(s) only in NEW" in out
    assert main(["compare", str(old), str(new), "--allow-missing"]) == 1
    assert main(["compare", str(old), str(new), "--allow-missing", "--allow-extra"]) == 0
    capsys.readouterr()
    # no case in common: different sweeps -> exit 2 naming the differing key columns
    other = write(tmp_path / "other.csv", [dict(r, scenario="y", world_size=8) for r in BASE])
    assert main(["compare", str(old), str(other)]) == 2
    err = capsys.readouterr().err
    assert "no case in common" in err and "world_size" in err and "scenario" in err
    # ... unless those columns are left out of the join
    assert main(["compare", str(old), str(other), "--ignore", "scenario,world_size"]) == 0
    capsys.readouterr()
    # a metric one file lacks
    assert main(["compare", str(old), str(new), "--metric", "ssm_ms"]) == 2
    assert "ssm_ms" in capsys.readouterr().err
    # columns present in one file only are listed
    extra = write(tmp_path / "extra.csv", [dict(r, extra_region_ms=1.0) for r in BASE])
    assert main(["compare", str(old), str(extra)]) == 0
    assert "columns only in NEW" in capsys.readouterr().out
    # malformed input
    bad = tmp_path / "bad.csv"
    bad.write_text("hello\n")
    assert main(["compare", str(old), str(bad)]) == 2
    assert "missing column" in capsys.readouterr().err


def test_duplicated_keys_are_refused(tmp_path):
    p = write(tmp_path / "dup.csv", BASE + [BASE[0]])
    with pytest.raises(ResultsError, match="duplicated"):
        compare(read_results(p), read_results(p))
