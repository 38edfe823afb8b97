"""One CSV of the interleaved A/B rounds of ``bash scripts/gpu_sets.sh ab`` in a results set.

    python3 scripts/ab_summary.py results/SET > results/SET/ab_summary.csv

SET holds one folder per machine (``pairX``), each with ``ab-ROUND-CODE/results.csv`` (CODE: base, mid or
new; ``rSTAGE-ROUND-CODE`` in the sets measured with the numbered stages before) and ``r-cp1/results.csv`` (cp 1, the same command). ``vs_cp1_half`` = cp 2 layer time /
(cp 1 time / 2) of the same sequence length on the same machine.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd

COLS = [
    "seq_len",
    "overlap_chunks",
    "layer_ms",
    "layer_iqr_ms",
    "layer_nocomm_ms",
    "exposed_comm_ms",
    "peak_mem_GiB",
]
RUN = re.compile(r"^((?:r\d+|ab)-\d+)-(\w+)$")


def summary(root: Path) -> pd.DataFrame:
    rows = []
    for pair in sorted(p for p in root.iterdir() if p.is_dir()):
        cp1_csv = pair / "r-cp1" / "results.csv"
        cp1 = pd.read_csv(cp1_csv).set_index("seq_len")["layer_ms"] if cp1_csv.exists() else None
        for run in sorted(pair.iterdir()):
            m = RUN.match(run.name)
            if not m or not (run / "results.csv").exists():
                continue
            df = pd.read_csv(run / "results.csv")
            df = df[df["cp_size"] == 2][COLS].copy()
            df.insert(0, "code", m.group(2))
            df.insert(0, "round", m.group(1))
            df.insert(0, "pair", pair.name)
            df["cp1_ms"] = df["seq_len"].map(cp1) if cp1 is not None else float("nan")
            df["vs_cp1_half"] = df["layer_ms"] / (df["cp1_ms"] / 2)
            rows.append(df)
    return pd.concat(rows, ignore_index=True).round(3)


if __name__ == "__main__":
    summary(Path(sys.argv[1])).to_csv(sys.stdout, index=False)
