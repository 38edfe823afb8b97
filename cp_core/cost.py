"""Bytes each CP strategy moves per layer, per rank (the ``size`` of nccl-tests).

For an all-to-all ``size`` is the send buffer of one rank (its own slice included); for an
all-gather it is the gathered output. Either way a rank puts ``size * (cp-1)/cp`` bytes on the
wire, which is why ``busbw = algbw * (cp-1)/cp`` for both. The backward pass moves the same again
(state passing: the all-gather of the initial states' gradients, ``H`` floats per piece fewer than
the forward's, or the chain reversed; the halo's gradients summed back to their owners).
"""

from __future__ import annotations

from types import SimpleNamespace

from .channels import check_heads, local_groups


def comm_bytes(
    config,
    cp_size: int,
    local_tokens: int,
    elem_size: int,
    strategy: str = "hidden",
    batch: int = 1,
    *,
    layout: str = "head_tail",
    n_docs: int | None = None,
    state_exchange: str = "allgather",
    grid: tuple[int, int] | None = None,
) -> dict[str, int]:
    """Bytes per rank per forward, by region name.

    ``local_tokens``: tokens per sequence on one rank (``L/cp``), or of the local pack (``T/cp``);
    ``n_docs``: documents in a pack (packed input; ``batch`` is then 1).
    hidden: ``{"a2a_pre", "a2a_post"}`` (``z`` stays local: the mixer sends ``[x|B|C|dt]`` only);
    state_passing: ``{"state_xchg"}``: the conv halo (an all-gather of ``d_conv-1`` tokens of
    ``conv_dim`` channels per piece) plus the states: with ``state_exchange="allgather"`` the gathered
    fp32 states ``[H, P, N]`` and log-decays ``[H]`` of every piece; with ``"chain"`` the states the busiest
    rank sends point to point (two per document with head-tail at cp > 2, else one; p2p bytes are
    wire bytes, no ``(cp-1)/cp`` factor); hierarchical (``grid=(N, G)``, ``N*G == cp_size``):
    :func:`hierarchical_bytes`.
    """
    c = config
    if strategy == "state_passing_chain":
        strategy, state_exchange = "state_passing", "chain"
    if strategy == "hierarchical":
        nodes, gpus = grid if grid is not None else (1, cp_size)
        if nodes * gpus != cp_size:
            raise ValueError(f"grid {nodes}x{gpus} does not hold cp_size {cp_size} ranks")
        return hierarchical_bytes(
            c, nodes, gpus, local_tokens, elem_size, batch, layout=layout, n_docs=n_docs,
            state_exchange=state_exchange,
        )  # fmt: skip
    if cp_size <= 1:
        return {"a2a_pre": 0, "a2a_post": 0} if strategy == "hidden" else {"state_xchg": 0}
    n_loc = batch * local_tokens
    if strategy == "hidden":
        check_heads(c.n_heads, c.n_groups, cp_size)
        groups_sent = max(c.n_groups, cp_size)  # replicated when n_groups < cp
        pre_width = c.d_inner + 2 * groups_sent * c.d_state + c.n_heads
        return {"a2a_pre": n_loc * pre_width * elem_size, "a2a_post": n_loc * c.d_inner * elem_size}
    if strategy == "state_passing":
        pieces = (n_docs if n_docs is not None else batch) * (2 if layout == "head_tail" else 1)
        state = c.n_heads * c.head_dim * c.d_state * 4
        halo = cp_size * pieces * (c.d_conv - 1) * c.conv_dim * elem_size
        if state_exchange == "chain":
            # the busiest rank's sends: with head-tail, ranks 1..cp-2 pass one state each way per
            # document and the end ranks one; with contiguous segments every rank but the last one
            docs = pieces // 2 if layout == "head_tail" else pieces
            sends = 2 if layout == "head_tail" and cp_size > 2 else 1
            return {"state_xchg": docs * sends * state + halo}
        return {"state_xchg": cp_size * pieces * (state + c.n_heads * 4) + halo}
    raise ValueError(f"unknown strategy {strategy!r}")


def hierarchical_bytes(
    config,
    nodes: int,
    gpus: int,
    local_tokens: int,
    elem_size: int,
    batch: int = 1,
    *,
    layout: str = "head_tail",
    n_docs: int | None = None,
    state_exchange: str = "allgather",
) -> dict[str, int]:
    """Bytes per rank per forward of :mod:`cp_core.hierarchical` on ``nodes`` x ``gpus``: ``a2a_pre`` and
    ``a2a_post`` are the hidden strategy's over the node's ``gpus`` ranks (the rank's ``L/(N*G)`` tokens), on
    the links inside a node; ``state_xchg`` is state passing's over the ``nodes`` ranks of one GPU index,
    for this GPU's heads (``n_heads/G`` states, the halo of its ``conv_dim`` slice), across the nodes."""
    c = config
    out = {"a2a_pre": 0, "a2a_post": 0, "state_xchg": 0}
    if gpus > 1:
        out.update(comm_bytes(c, gpus, local_tokens, elem_size, "hidden", batch))
    if nodes > 1:
        check_heads(c.n_heads, c.n_groups, gpus)
        h, g = c.n_heads // gpus, local_groups(c.n_groups, gpus)
        head_slice = SimpleNamespace(
            n_heads=h, head_dim=c.head_dim, d_state=c.d_state, d_conv=c.d_conv,
            conv_dim=h * c.head_dim + 2 * g * c.d_state,
        )  # fmt: skip
        sp = comm_bytes(
            head_slice, nodes, local_tokens * gpus, elem_size, "state_passing", batch, layout=layout,
            n_docs=n_docs, state_exchange=state_exchange,
        )  # fmt: skip
        out["state_xchg"] = sp["state_xchg"]
    return out


def wire_bytes(
    nbytes: dict[str, int], cp_size: int, strategy: str = "hidden", state_exchange: str = "allgather"
) -> int:
    """Bytes one rank puts on the wire per forward: ``size*(cp-1)/cp`` for collectives, all of it for p2p."""
    if cp_size <= 1:
        return 0
    if strategy == "state_passing_chain":
        strategy, state_exchange = "state_passing", "chain"
    total = 0
    for name, b in nbytes.items():
        p2p = strategy == "state_passing" and state_exchange == "chain" and name == "state_xchg"
        total += b if p2p else b * (cp_size - 1) // cp_size
    return total
