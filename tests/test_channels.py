"""Head-chunk channel plans against a reference written from the definition (head ``h`` reads group
``h // (n_heads / n_groups)``): every rank's slot of every chunk holds exactly its heads' ``x`` and
``dt`` and the ``B``/``C`` of the groups those heads read, in that order."""

import pytest
import torch

from cp_core.channels import check_chunks, mamba_channel_plan, pack_torch, unpack_torch
from cp_core.pipeline import slot_rows

P, DS = 3, 2  # head_dim, d_state


def reference_cols(cp, nh, ng, r, j, k):
    """Columns of ``[x | B | C | dt]`` that rank ``r``'s head chunk ``j`` of ``k`` receives."""
    d_inner = nh * P
    hc = nh // cp // k
    heads = range(r * (nh // cp) + j * hc, r * (nh // cp) + (j + 1) * hc)
    groups = sorted({h // (nh // ng) for h in heads})
    x = [h * P + i for h in heads for i in range(P)]
    b = [d_inner + g * DS + i for g in groups for i in range(DS)]
    c = [d_inner + ng * DS + g * DS + i for g in groups for i in range(DS)]
    dt = [d_inner + 2 * ng * DS + h for h in heads]
    return x + b + c + dt


CASES = [  # (cp, n_heads, n_groups, chunks): whole groups per chunk, a group's heads split, replicated groups
    (2, 8, 4, 2),
    (2, 8, 8, 2),  # several whole groups per chunk (2 of a rank's 4), the CUDA default at n_groups 8, cp 2:
    (2, 16, 8, 2),  # chunk j's B and C start at group 2j of the rank's (j as the piece index would be wrong)
    (2, 8, 8, 4),
    (2, 8, 2, 2),
    (2, 8, 2, 4),
    (2, 8, 1, 2),
    (4, 8, 2, 2),
    (4, 16, 8, 2),
    (8, 16, 8, 2),
    (2, 12, 4, 6),
    (2, 12, 6, 3),
]


@pytest.mark.parametrize("cp, nh, ng, k", CASES)
def test_chunk_plans_hold_each_chunks_heads_and_their_groups(cp, nh, ng, k):
    width = nh * P + 2 * ng * DS + nh
    x = torch.arange(width, dtype=torch.float64).expand(5, width) + 1000 * torch.arange(5.0)[:, None]
    slots = []
    for j in range(k):
        plan = mamba_channel_plan(cp, nh, P, ng, DS, with_z=False, chunk=(j, k))
        send = pack_torch(x, plan)
        for r in range(cp):
            want = x[:, reference_cols(cp, nh, ng, r, j, k)]
            assert torch.equal(send[r], want), (j, r)
            slots.append(reference_cols(cp, nh, ng, r, j, k))
        # unpack is pack's adjoint: each channel comes back times the ranks that received it
        back = unpack_torch(send, plan)
        count = torch.zeros(width, dtype=torch.float64)
        for r in range(cp):
            count[reference_cols(cp, nh, ng, r, j, k)] += 1
        sent = count > 0
        assert torch.equal(back[:, sent], x[:, sent] * count[sent])
    chans = tuple(mamba_channel_plan(cp, nh, P, ng, DS, with_z=False, chunk=(j, k)) for j in range(k))
    rows, unique = slot_rows(chans, 7)  # in_proj's rows: [x|B|C|dt] starts at row 7 (after z)
    assert rows.tolist() == [7 + c for s in slots for c in s]
    assert unique == (len(set(rows.tolist())) == rows.numel())


@pytest.mark.parametrize("nh, ng, cp, k", [(8, 8, 2, 3), (24, 8, 2, 6), (8, 2, 2, 8), (8, 4, 4, 4)])
def test_chunks_that_neither_divide_nor_cover_the_groups_are_rejected(nh, ng, cp, k):
    with pytest.raises(ValueError, match=f"overlap_chunks {k}"):
        check_chunks(nh, ng, cp, k)
