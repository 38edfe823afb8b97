"""Hidden vs state passing, per rank and side by side, with the targets of issue 29 checked.

One command on one GPU (projection mode: rank 0's real work, communication modeled):

    MAMBA_DETERMINISTIC=1 python3 scripts/strategy_profile.py --out $OUT

runs ``cpbench sweep scenarios/strategies.toml --backend fake`` into ``$OUT/sweep`` (cp 2/8, L 128K/256K,
BSHD and 64 packed documents, fwd+bwd, bf16, the Nemotron-H-like layer) and prints, per case, the hidden
strategy's per-rank compute (the layer with every collective moving nothing), its layer (compute +
modeled exposed communication) and peak memory, and each state-passing exchange's as a ratio to it,
then the targets: compute <= 1.00x hidden at cp 2 BSHD and <= 1.05x with 64 documents, peak memory
<= hidden's there; the layer faster than hidden's at cp 8. Writes ``$OUT/side_by_side.csv`` and
``$OUT/side_by_side.md``. ``--profile CPxL`` adds a torch.profiler kernel table of one fwd+bwd per
strategy at that case (BSHD), ``$OUT/kernels.txt``. ``--set`` is passed to the sweep (a CPU check:
``--set run.device=cpu --set layer.d_model=64 ...``).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys

import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ["cp_size", "seq_len", "docs"]
SP = ("state_passing", "state_passing_chain")
#: (cp, packed) -> compute ratio bound and whether memory must not exceed hidden's; cp 8: the layer must be faster
COMPUTE_TARGET = {(2, False): 1.00, (2, True): 1.05}


def _case(r) -> str:
    docs = (
        "BSHD" if not r.docs or (isinstance(r.docs, float) and math.isnan(r.docs)) else f"{int(r.docs)} docs"
    )
    n = int(r.seq_len)
    return f"cp {int(r.cp_size)}, L {f'{n // 1024}K' if n % 1024 == 0 else n}, {docs}"


def side_by_side(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One row per case: hidden's compute / layer / GiB and each state-passing exchange's ratios; the verdicts."""
    df = df[df["status"] == "ok"].copy()
    df["docs"] = df["docs"].fillna(0).astype(int)
    hid = df[df["strategy"] == "hidden"].set_index(KEYS)
    rows, verdicts = [], []
    for key, h in hid.iterrows():
        row = {"case": _case(pd.Series(dict(zip(KEYS, key, strict=True)))), "hidden compute ms": h.layer_nocomm_ms,
               "hidden layer ms": h.layer_ms, "hidden GiB": h.peak_mem_GiB}  # fmt: skip
        for s in SP:
            m = df[(df["strategy"] == s) & (df[KEYS] == list(key)).all(axis=1)]
            if m.empty:
                continue
            m = m.iloc[0]
            tag = "all-gather" if s == "state_passing" else "chain"
            ratio_c = m.layer_nocomm_ms / h.layer_nocomm_ms
            ratio_l = m.layer_ms / h.layer_ms
            ratio_m = m.peak_mem_GiB / h.peak_mem_GiB
            row.update({f"{tag} compute ms": m.layer_nocomm_ms, f"{tag} compute x": ratio_c,
                        f"{tag} layer ms": m.layer_ms, f"{tag} layer x": ratio_l, f"{tag} exchange ms": m.comm_ms,
                        f"{tag} GiB": m.peak_mem_GiB, f"{tag} GiB x": ratio_m})  # fmt: skip
            cp, packed = int(key[0]), int(key[2]) > 0
            if (cp, packed) in COMPUTE_TARGET:
                bound = COMPUTE_TARGET[(cp, packed)]
                ok = ratio_c <= bound and ratio_m <= 1.0
                verdicts.append(
                    f"{'PASS' if ok else 'FAIL'}  {row['case']}, {tag}: compute {ratio_c:.3f}x (<= {bound:.2f}x), "
                    f"peak memory {ratio_m:.3f}x (<= 1)"
                )
            elif cp == 8:
                verdicts.append(
                    f"{'PASS' if ratio_l < 1.0 else 'FAIL'}  {row['case']}, {tag}: layer {ratio_l:.3f}x (< 1), "
                    f"compute {ratio_c:.3f}x, memory {ratio_m:.3f}x"
                )
        rows.append(row)
    return pd.DataFrame(rows), verdicts


def _markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for _, r in table.iterrows():
        cells = [f"{v:.3f}" if isinstance(v, float) and ("x" in c.split()[-1]) else
                 (f"{v:.2f}" if isinstance(v, float) else str(v)) for c, v in zip(cols, r, strict=True)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _profile(spec: str, out: str, iters: int = 5) -> str:
    """Kernel-by-kernel times of one fwd+bwd per strategy (torch.profiler), BSHD, projection mode."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from cp_core.comm import LocalGroup
    from cp_core.mixer import Mamba2Config, Mamba2Mixer
    from cpbench.timing import median_ms

    cfg = Mamba2Config(
        d_model=4096, n_heads=128, head_dim=64, n_groups=8, d_state=128, d_conv=4, chunk_size=256
    )
    cp, length = (int(v) for v in spec.split("x"))
    lines = [f"# {torch.cuda.get_device_name()} torch {torch.__version__}; cp {cp} L {length}, bf16, fwd+bwd"]
    for strategy in ("hidden", *SP):
        torch.manual_seed(0)
        m = Mamba2Mixer(cfg, LocalGroup(0, cp), device="cuda", dtype=torch.bfloat16, strategy=strategy)
        x = torch.randn(1, length // cp, cfg.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn_like(x)
        t = median_ms(lambda m=m, x=x, g=g: m(x).backward(g), torch.device("cuda"), 2, iters)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            m(x).backward(g)
            torch.cuda.synchronize()
        lines.append(
            f"\n## {strategy}: fwd+bwd {t:.3f} ms (median of {iters}, CUDA events), backends {m.backends}"
        )
        lines.append(
            prof.key_averages().table(
                sort_by="self_device_time_total", row_limit=25, max_name_column_width=70
            )
        )
        del m, x, g
        torch.cuda.empty_cache()
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "kernels.txt"), "w") as fh:
        fh.write(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "strategy_profile"), help="a new or empty folder")
    ap.add_argument("--scenario", default=os.path.join(ROOT, "scenarios", "strategies.toml"))
    ap.add_argument(
        "--set", action="append", default=[], metavar="TABLE.KEY=VALUE", help="passed to the sweep"
    )
    ap.add_argument(
        "--results", default=None, help="tabulate an existing sweep folder instead of running one"
    )
    ap.add_argument(
        "--profile", default=None, metavar="CPxL", help="also a kernel table at this case, e.g. 2x131072"
    )
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    folder = args.results
    if folder is None:
        folder = os.path.join(args.out, "sweep")
        cmd = [sys.executable, "-m", "cpbench", "sweep", args.scenario, "--backend", "fake", "--out", folder,
               "--no-progress"] + [a for s in args.set for a in ("--set", s)]  # fmt: skip
        print("$", " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        if rc != 0:
            print(f"the sweep ended with exit code {rc}; tabulating what it wrote", flush=True)
    df = pd.read_csv(os.path.join(folder, "results.csv"))
    bad = df[df["status"] != "ok"]
    for _, r in bad.iterrows():
        print(f"case {r.case} {r.strategy}: {r.status} {r.get('error', '')}")
    table, verdicts = side_by_side(df)
    table.to_csv(os.path.join(args.out, "side_by_side.csv"), index=False)
    md = _markdown(table)
    head = ("per-rank compute = the layer with every collective moving nothing; layer = compute + modeled exposed "
            "communication; x = ratio to hidden (fwd+bwd, median of the sweep's iterations, CUDA events)")  # fmt: skip
    with open(os.path.join(args.out, "side_by_side.md"), "w") as fh:
        fh.write(head + "\n\n" + md + "\n\n" + "\n".join(verdicts) + "\n")
    with pd.option_context("display.width", 250, "display.max_columns", 40, "display.precision", 3):
        print(head)
        print(table.to_string(index=False))
    print("\n".join(verdicts))
    if args.profile:
        print(_profile(args.profile, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
