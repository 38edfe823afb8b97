"""The layout microbenchmark runs on CPU, and every path returns the identical tensor."""

import pandas as pd

from cpbench import layout_bench


def test_layout_bench_cpu_paths_agree(tmp_path):
    out = tmp_path / "layout.csv"
    png = tmp_path / "layout.png"
    args = [
        "--device",
        "cpu",
        "--cp",
        "2,4",
        "--seq-len",
        "512",
        "--docs",
        "0,3",
        "--shape",
        "8,4,2,4",
        "--dtype",
        "float32",
        "--warmup",
        "0",
        "--iters",
        "1",
        "--out",
        str(out),
        "--plot",
        str(png),
    ]
    assert layout_bench.main(args) == 0
    df = pd.read_csv(out)
    assert set(df["path"]) == {"fused", "fused_noz", "seed"}
    assert len(df) == 2 * 2 * 3
    assert df["same_output"].all()
    assert (df["total_ms"] > 0).all() and (df["floor_ms"] > 0).all()
    assert png.stat().st_size > 0


def test_pack_lengths_are_granular_and_complete():
    lens = layout_bench.pack_lengths(4096, 7, 16, seed=1)
    assert len(lens) == 7 and sum(lens) == 4096 and all(n % 16 == 0 and n > 0 for n in lens)
