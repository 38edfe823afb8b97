"""The communication model of projection mode across nodes: each collective timed on the links it crosses.

``--topology NxG`` (``run.topology``): ``N`` nodes of ``G`` GPUs. A case of ``cp_size`` ranks fills whole
nodes: ``cp_size / G`` nodes of ``G`` GPUs (one node of ``cp_size`` GPUs when ``cp_size <= G``). Links:
``run.fake_busbw_gbps`` inside a node (default 370 GB/s: the all-to-all busbw measured on NVLink) and
``run.net_busbw_gbps`` per GPU across nodes (default 50 GB/s: one 400 Gb/s NIC per GPU).

A collective of ``S`` bytes per rank (the ``size`` of nccl-tests, :mod:`cp_core.cost`) over a group of
``n`` nodes x ``g`` GPUs (``c = n*g`` ranks) puts ``S (g-1)/c`` bytes on the node's links and ``S (c-g)/c``
on the network (the share that comes from ranks of other nodes), both at once:

    t = max(S (g-1)/c / B_node, S (c-g)/c / B_net)

so on one node ``t = S (c-1)/c / B_node``, the single-node model (:func:`cpbench.metrics.modeled_seconds`).
A point-to-point send (the chain exchange) takes ``S / B`` on the slower link it may cross. The strategies'
groups: ``hidden`` and ``state_passing`` run every collective over all ``cp_size`` ranks (``n x g``);
``hierarchical`` runs its all-to-alls (``a2a_*``) over the node's ``G`` GPUs (``1 x G``) and its state
exchange (``state_xchg``) over one GPU of every node (``N x 1``). Collectives are counted as blocking
(all of their time exposed), as the single-node model counts them at ``overlap_chunks`` 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ScenarioError
from .metrics import GB

_SPEC = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


@dataclass(frozen=True)
class Topology:
    nodes: int
    gpus: int  # per node
    node_gbps: float  # busbw inside a node
    net_gbps: float  # per GPU, across nodes

    @property
    def label(self) -> str:
        return f"{self.nodes}x{self.gpus}"

    def grid(self, cp: int) -> tuple[int, int] | None:
        """``(nodes, gpus per node)`` a CP group of ``cp`` ranks fills, or None when it does not fit."""
        g = min(cp, self.gpus)
        if cp % g or cp // g > self.nodes:
            return None
        return cp // g, g


def parse(spec: str) -> tuple[int, int]:
    """``"8x8"`` -> ``(8, 8)``; ScenarioError naming the value otherwise."""
    m = _SPEC.match(spec) if isinstance(spec, str) else None
    if m is None or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ScenarioError(f"topology must be NODESxGPUS with both >= 1 (e.g. 8x8), got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def of_run(run) -> Topology | None:
    """The scenario's topology (``run.topology``; None when unset: one node, the single-node model)."""
    if not run.topology:
        return None
    nodes, gpus = parse(run.topology)
    return Topology(nodes, gpus, run.fake_busbw_gbps, run.net_busbw_gbps)


def skip_reason(topo: Topology | None, cp: int) -> str | None:
    if topo is None or topo.grid(cp) is not None:
        return None
    return f"cp_size {cp} does not fill whole nodes of topology {topo.label} (or needs more nodes)"


def collective_seconds(nbytes: float, nodes: int, gpus: int, topo: Topology, p2p: bool = False) -> float:
    """Modeled seconds of one collective of ``nbytes`` per rank over ``nodes`` x ``gpus`` ranks."""
    c = nodes * gpus
    if c <= 1 or nbytes <= 0:
        return 0.0
    if p2p:
        return nbytes / ((topo.net_gbps if nodes > 1 else topo.node_gbps) * GB)
    inside = nbytes * (gpus - 1) / c / (topo.node_gbps * GB)
    across = nbytes * (c - gpus) / c / (topo.net_gbps * GB)
    return max(inside, across)


def region_groups(strategy: str, cp: int, topo: Topology) -> dict[str, tuple[int, int]]:
    """The ``(nodes, gpus)`` of the group each communication region of ``strategy`` runs over."""
    grid = topo.grid(cp)
    if grid is None:
        raise ValueError(f"cp_size {cp} does not fit topology {topo.label}")
    if strategy == "hierarchical":
        nodes, gpus = grid
        return {"a2a_pre": (1, gpus), "a2a_post": (1, gpus), "state_xchg": (nodes, 1)}
    return {"a2a_pre": grid, "a2a_post": grid, "state_xchg": grid}


def region_seconds(
    regions: dict[str, int], strategy: str, cp: int, topo: Topology, state_exchange: str = "allgather"
) -> dict[str, float]:
    """Modeled seconds of every communication region (``name`` or ``name_bwd``: bytes per rank)."""
    if strategy == "state_passing_chain":
        strategy, state_exchange = "state_passing", "chain"
    groups = region_groups(strategy, cp, topo)
    out = {}
    for name, nbytes in regions.items():
        base = name.removesuffix("_bwd")
        nodes, gpus = groups[base]
        # the chain's states are point to point; its halo all-gather is counted with them (as cp_core.cost does)
        p2p = base == "state_xchg" and state_exchange == "chain"
        out[name] = collective_seconds(nbytes, nodes, gpus, topo, p2p)
    return out


def label(topo: Topology) -> str:
    return f"modeled@{topo.label}:{topo.node_gbps:g}/{topo.net_gbps:g}GBps"
