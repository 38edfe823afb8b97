"""Projection across nodes: the link model's arithmetic by hand, the hierarchical strategy's bytes by hand and
against what the layer sends, and ``cpbench sweep --backend fake --topology NxG`` end to end."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from test_cli_sweep import TINY, cpbench

from cp_core import comm
from cp_core.comm import LocalGroup
from cp_core.cost import comm_bytes, hierarchical_bytes
from cp_core.mixer import Mamba2Config, Mamba2Mixer
from cpbench import topology
from cpbench.errors import ScenarioError
from cpbench.metrics import modeled_seconds

TOPO = topology.Topology(nodes=2, gpus=4, node_gbps=370.0, net_gbps=50.0)


def test_collective_model_by_hand():
    S = 1e9
    # 2 nodes x 4 GPUs: 3/8 of S on NVLink at 370, 4/8 across at 50 GB/s -> the network's 10 ms
    assert topology.collective_seconds(S, 2, 4, TOPO) == pytest.approx(
        max(S * 3 / 8 / 370e9, S * 4 / 8 / 50e9)
    )
    assert topology.collective_seconds(S, 2, 4, TOPO) == pytest.approx(0.010)
    # one node: the single-link model exactly
    assert topology.collective_seconds(S, 1, 4, TOPO) == pytest.approx(modeled_seconds(S, 370.0, 4))
    # one GPU per node (hierarchical's state exchange): (N-1)/N of S across
    assert topology.collective_seconds(S, 2, 1, TOPO) == pytest.approx(S / 2 / 50e9)
    assert topology.collective_seconds(S, 2, 1, TOPO, p2p=True) == pytest.approx(S / 50e9)
    assert topology.collective_seconds(S, 1, 1, TOPO) == 0.0
    # which group every region runs over
    assert topology.region_groups("hierarchical", 8, TOPO) == {
        "a2a_pre": (1, 4), "a2a_post": (1, 4), "state_xchg": (2, 1)
    }  # fmt: skip
    assert topology.region_groups("hidden", 8, TOPO)["a2a_pre"] == (2, 4)
    assert topology.region_groups("state_passing", 2, TOPO)["state_xchg"] == (1, 2)
    assert TOPO.grid(16) is None and topology.skip_reason(TOPO, 16) and TOPO.grid(6) is None
    with pytest.raises(ScenarioError, match="got '2by4'"):
        topology.parse("2by4")


CFG = Mamba2Config(d_model=16, n_heads=8, head_dim=4, n_groups=2, d_state=4, d_conv=4, chunk_size=4)


def test_hierarchical_bytes_by_hand():
    b = hierarchical_bytes(CFG, 2, 4, 6, 2)  # 2x4, 6 tokens per rank, bf16, one sequence, head-tail
    # a2a inside the node (cp 4): [x | B | C | dt] with B/C replicated to 4 ranks: 32 + 2*4*4 + 8 = 72 channels
    assert b["a2a_pre"] == 6 * 72 * 2 and b["a2a_post"] == 6 * 32 * 2
    # across the 2 nodes, 2 heads (of 4 channels, d_state 4) and 1 group per GPU, 2 pieces: fp32 states
    # [2, 4, 4] + 2 log-decays per piece, gathered from 2 ranks; halo: 3 tokens of 8 + 2*4 channels per piece
    assert b["state_xchg"] == 2 * 2 * (2 * 4 * 4 * 4 + 2 * 4) + 2 * 2 * 3 * 16 * 2
    assert comm_bytes(CFG, 8, 6, 2, "hierarchical", grid=(2, 4)) == b
    # the degenerate grids are the two strategies' bytes
    assert comm_bytes(CFG, 4, 6, 2, "hierarchical", grid=(1, 4)) == {
        **comm_bytes(CFG, 4, 6, 2, "hidden"), "state_xchg": 0
    }  # fmt: skip
    sp = comm_bytes(CFG, 4, 6, 2, "state_passing")
    assert comm_bytes(CFG, 4, 6, 2, "hierarchical", grid=(4, 1)) == {"a2a_pre": 0, "a2a_post": 0, **sp}
    with pytest.raises(ValueError, match="grid 2x4 does not hold cp_size 4"):
        comm_bytes(CFG, 4, 6, 2, "hierarchical", grid=(2, 4))


@pytest.mark.parametrize("grid, packed", [((2, 4), False), ((2, 2), True), ((4, 1), False)])
def test_bytes_model_is_what_the_layer_sends(monkeypatch, grid, packed):
    """Rank 0 of the grid in one process (LocalGroups): every all-to-all's send buffer and all-gather's output
    of a forward, summed, against the model."""
    nodes, gpus = grid
    cp = nodes * gpus
    sent = []
    real_exchange, real_a2a, real_ag = comm.exchange, comm.all_to_all_single, comm.all_gather_into

    def exchange(sends, recvs, group):
        sent.append(sum(t.numel() * t.element_size() for row in sends for t in row))
        return real_exchange(sends, recvs, group)

    def a2a(out, inp, group):
        sent.append(inp.numel() * inp.element_size())
        return real_a2a(out, inp, group)

    def ag(out, inp, group):
        sent.append(out.numel() * out.element_size())
        return real_ag(out, inp, group)

    monkeypatch.setattr(comm, "exchange", exchange)
    monkeypatch.setattr(comm, "all_to_all_single", a2a)
    monkeypatch.setattr(comm, "all_gather_into", ag)
    pair = tuple(LocalGroup(0, n) if n > 1 else None for n in grid)
    m = Mamba2Mixer(CFG, cp_group=pair, strategy="hierarchical")
    docs = 3 if packed else None
    cu = torch.tensor([0, 4 * cp, 6 * cp, 10 * cp], dtype=torch.int32) if packed else None
    x = torch.randn(10, 16) if packed else torch.randn(1, 8, 16)  # this rank's tokens
    with torch.no_grad():
        m(x, cu)
    local = 10 if packed else 8
    want = comm_bytes(CFG, cp, local, 4, "hierarchical", 1, n_docs=docs, grid=grid)
    assert sum(sent) == sum(want.values()) > 0


def test_projection_with_a_topology(tmp_path):
    scen = tmp_path / "tiny.toml"
    scen.write_text(TINY)
    sets = ['sweep.path=["fused"]', 'sweep.packing=["none"]', 'sweep.pass=["fwd+bwd"]', "sweep.seq_len=[64]"]
    sets += ["sweep.cp_size=[1, 4, 8, 16]", 'sweep.strategy=["hidden", "state_passing", "hierarchical"]']
    sets += ["run.iters=1", "run.warmup=0", "layer.n_heads=8"]
    args = ["sweep", str(scen), "--backend", "fake", "--topology", "2x4", "--net-busbw", "25"]
    res = cpbench(
        *args, "--out", str(tmp_path / "o"), "--no-progress", *[a for s in sets for a in ("--set", s)]
    )
    assert res.returncode == 0, res.stdout + res.stderr
    df = pd.read_csv(tmp_path / "o" / "results.csv")
    skipped = df[df["status"] == "skipped"]
    assert set(skipped["cp_size"]) == {16}  # 2 nodes of 4 hold 8 (hidden: its heads say so first)
    assert skipped[skipped["strategy"] != "hidden"]["error"].str.contains("nodes of topology 2x4").all()
    topo = topology.Topology(2, 4, 370.0, 25.0)
    ok = df[(df["status"] == "ok") & (df["cp_size"] > 1)]
    assert (ok["comm_model"] == "modeled@2x4:370/25GBps").all() and len(ok) == 6
    for _, r in ok.iterrows():
        groups = topology.region_groups(r["strategy"], r["cp_size"], topo)
        for reg, (n, g) in groups.items():
            if f"{reg}_bytes" in r and r[f"{reg}_bytes"] > 0:
                t = topology.collective_seconds(r[f"{reg}_bytes"], n, g, topo) * 1e3
                assert r[f"{reg}_ms"] == pytest.approx(t), (r["strategy"], reg)  # the forward's region
    hier = ok[ok["strategy"] == "hierarchical"].set_index("cp_size")
    hid = ok[ok["strategy"] == "hidden"].set_index("cp_size")
    assert hier.loc[4, "a2a_pre_bytes"] == hid.loc[4, "a2a_pre_bytes"]  # 1x4: the hidden strategy's bytes
    assert hier.loc[8, "state_xchg_bytes"] > 0 and hier.loc[8, "a2a_pre_bytes"] < hid.loc[8, "a2a_pre_bytes"]
    assert "layer ms per strategy" in res.stdout and "modeled@2x4:370/25GBps: nodes x GPUs" in res.stdout
    bad = cpbench(*args[:4], "--topology", "2by4", "--out", str(tmp_path / "b"))
    assert bad.returncode == 2 and "topology must be NODESxGPUS" in bad.stderr


def test_report_names_the_fastest_strategy_and_the_crossover(capsys):
    from cpbench.report import render, strategy_times

    rows = []
    for L, t_hid, t_sp, t_hier in ((262144, 100.0, 300.0, 150.0), (524288, 200.0, 300.0, 150.0)):
        for strat, t in (("hidden", t_hid), ("state_passing", t_sp), ("hierarchical", t_hier)):
            rows.append(dict(cp_size=64, seq_len=L, strategy=strat, layer_ms=t, status="ok", packing="none"))
    rows.append(dict(cp_size=1, seq_len=16384, strategy="hidden", layer_ms=50.0, status="ok", packing="none"))
    df = pd.DataFrame(rows)
    frame, lines = strategy_times(df)
    assert list(frame["fastest"]) == ["hidden", "hierarchical"]
    assert list(frame["hierarchical ms"]) == [150.0, 150.0]
    # the times cross half way in log L: 262144 * sqrt(2)
    assert lines == ["crossover, cp 64 (none): hierarchical overtakes hidden at L ≈ 370,728"]
    render(df, fmt="markdown")
    out = capsys.readouterr().out
    assert "layer ms per strategy" in out and "hierarchical overtakes hidden at L ≈ 370,728" in out
    assert strategy_times(df[df["strategy"] == "hidden"]) is None  # one strategy: nothing to compare
