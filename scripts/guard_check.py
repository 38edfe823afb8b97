"""The resource guard's GPU estimate against the measured peaks of results folders.

    python3 scripts/guard_check.py RESULTS_DIR [...] [--min-gib 1.0]

For every ok CUDA case of each folder: :func:`cpbench.memory.case_peak` (what the guard holds against
a GPU's free memory) over the measured ``peak_mem_GiB``. Exit 1 when a case of ``--min-gib`` or more
leaves 0.7x-1.5x (the band ``tests/test_guard.py`` holds every committed set to).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpbench import memory  # noqa: E402

BAND = (0.7, 1.5)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--min-gib", type=float, default=1.0, help="smaller cases are shown, not judged")
    a = ap.parse_args(argv)
    bad = n = 0
    for folder in a.folders:
        rows = memory.measured(folder)
        if not rows:
            print(f"{folder}: no CUDA case with a measured peak")
        for m in rows:
            est = memory.case_peak(m.scenario, m.case, m.deterministic) / 2**30
            ratio = est / m.peak_gib if m.peak_gib else float("nan")
            judged = m.peak_gib >= a.min_gib
            ok = BAND[0] <= ratio <= BAND[1]
            verdict = ("ok" if ok else "OUT") if judged else "small"
            bad += judged and not ok
            n += judged
            print(f"{folder.name}: {m.case.describe():80s} estimate {est:7.2f} GiB, measured {m.peak_gib:7.2f} "
                  f"GiB, x{ratio:.2f} {verdict}")  # fmt: skip
            if verdict == "OUT":  # what the walk had live at its peak
                s, w = (
                    memory.layer_of(m.scenario, m.case),
                    memory.work_of(m.scenario, m.case, m.deterministic),
                )
                print(f"    at the estimate's peak (GiB): {memory.walk(s, w).breakdown()}")
    print(f"guard estimate: {n} case(s) judged, {bad} outside {BAND[0]}x-{BAND[1]}x")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
