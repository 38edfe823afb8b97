"""The communication side of scenarios/multi_node.toml, from the model alone (no layer runs, any machine).

For every (cp, L, strategy) of the scenario: the bytes per rank per layer forward (cp_core.cost) and the
modeled communication of a layer forward + backward on the scenario's topology (cpbench.topology: each
collective on the links it crosses, all of it exposed), then, per cp, the lengths where the strategy with the
least communication changes. The per-rank compute is not in it (the three strategies do about the same
flops per rank; a projection run on a GPU measures it: ``cpbench sweep multi_node``).

    python3 scripts/multi_node_model.py [SCENARIO] [--topology 8x8] [--node-busbw 370] [--net-busbw 50]
"""

from __future__ import annotations

import argparse
import math

from cp_core.cost import comm_bytes
from cpbench import topology
from cpbench.metrics import comm_regions
from cpbench.runner import mixer_config
from cpbench.scenario import load_scenario

ELEM = {"float32": 4, "bfloat16": 2, "float16": 2}


def comm_ms(scenario, case, topo) -> tuple[int, float]:
    """(bytes per rank forward, modeled ms of forward + backward) of one case."""
    cfg = mixer_config(scenario, case)
    grid = topo.grid(case.cp_size) if case.strategy == "hierarchical" else None
    b = comm_bytes(
        cfg, case.cp_size, case.local_tokens, ELEM[case.dtype], case.strategy, case.comm_batch, grid=grid
    )
    regions = comm_regions({k: v for k, v in b.items() if v}, case.backward)
    secs = topology.region_seconds(regions, case.strategy, case.cp_size, topo)
    return sum(b.values()), 1e3 * sum(secs.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", nargs="?", default="multi_node")
    ap.add_argument("--topology", default=None)
    ap.add_argument("--node-busbw", type=float, default=None)
    ap.add_argument("--net-busbw", type=float, default=None)
    a = ap.parse_args()
    sets = []
    if a.topology:
        sets.append(f"run.topology={a.topology!r}")
    if a.node_busbw:
        sets.append(f"run.fake_busbw_gbps={a.node_busbw!r}")
    if a.net_busbw:
        sets.append(f"run.net_busbw_gbps={a.net_busbw!r}")
    sc = load_scenario(a.scenario, sets)
    topo = topology.of_run(sc.run)
    if topo is None:
        raise SystemExit("the scenario has no run.topology: pass --topology NxG")
    print(
        f"model: {topology.label(topo)}; layer {sc.layer.d_model}/{sc.layer.n_heads}x{sc.layer.head_dim} "
        f"groups {sc.layer.n_groups} state {sc.layer.d_state} {sc.layer.dtype}; communication of a layer "
        f"forward + backward, all exposed; compute not included"
    )
    table: dict = {}
    print(f"{'cp':>4} {'grid':>5} {'L':>9} {'strategy':>14} {'MB fwd':>10} {'comm ms':>9}")
    for case in sc.cases():
        if topology.skip_reason(topo, case.cp_size) or case.skip_reason(None):
            continue
        nb, ms = comm_ms(sc, case, topo)
        table[(case.cp_size, case.seq_len, case.strategy)] = ms
        n, g = topo.grid(case.cp_size)
        print(
            f"{case.cp_size:>4} {f'{n}x{g}':>5} {case.seq_len:>9} {case.strategy:>14} {nb / 1e6:>10.1f} {ms:>9.3f}"
        )
    print("least communication, per cp (crossovers interpolated in log L):")
    for cp in sorted({k[0] for k in table}):
        lens = sorted({k[1] for k in table if k[0] == cp})
        strategies = sorted({k[2] for k in table if k[0] == cp})
        best = [min(strategies, key=lambda s, L=L: table[(cp, L, s)]) for L in lens]
        parts = [f"L {lens[0]}: {best[0]}"]
        for i in range(1, len(lens)):
            if best[i] != best[i - 1]:
                d0 = table[(cp, lens[i - 1], best[i])] - table[(cp, lens[i - 1], best[i - 1])]
                d1 = table[(cp, lens[i], best[i])] - table[(cp, lens[i], best[i - 1])]
                f = d0 / (d0 - d1)
                at = math.exp(math.log(lens[i - 1]) + f * (math.log(lens[i]) - math.log(lens[i - 1])))
                parts.append(f"{best[i]} from L ~{at:,.0f}")
        print(f"  cp {cp}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
