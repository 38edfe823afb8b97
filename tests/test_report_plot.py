"""Small rendering rules: region bars stack to the layer median; small byte counts keep their digits;
a busbw above the microbenchmark is explained."""

from __future__ import annotations

import pandas as pd
import pytest

from cpbench.plot import stack_heights
from cpbench.report import _crossover_cell, tables


def test_region_bars_stack_to_the_layer_median():
    sub = pd.DataFrame({"layer_ms": [10.0, 10.0], "ssm_ms": [8.0, 4.0], "conv1d_ms": [4.0, 1.0]})
    heights, other = stack_heights(sub, ["ssm", "conv1d"])
    # row 0: the medians add to 12 > 10: scaled to 10, shares kept; row 1: 5 + other 5
    assert heights["ssm"][0] == pytest.approx(8 * 10 / 12) and heights["conv1d"][0] == pytest.approx(
        4 * 10 / 12
    )
    assert other == pytest.approx([0.0, 5.0])
    for i in range(2):
        assert sum(h[i] for h in heights.values()) + other[i] == pytest.approx(10.0)


def test_small_byte_counts_are_not_zero_megabytes():
    assert _crossover_cell("hidden MB", 0.012288) == "0.0123"
    assert _crossover_cell("ratio", 8.0) == "8"
    assert _crossover_cell("crossover seq_len", 12345.6) == "12,346"


def test_busbw_above_the_microbenchmark_is_explained():
    df = pd.DataFrame(
        {
            "cp_size": [2],
            "status": ["ok"],
            "busbw_pct": [250.0],
            "layer_ms": [1.0],
            "comm_model": ["measured"],
        }
    )
    _, _, notes = tables(df, metrics=["layer_ms", "busbw_pct"])
    assert any("above 100%" in n and "baseline, not a ceiling" in n for n in notes)
    df["busbw_pct"] = [80.0]
    assert not any("above 100%" in n for n in tables(df, metrics=["layer_ms", "busbw_pct"])[2])
