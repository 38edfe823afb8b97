"""Every path of the layer records the regions a profile reads (``ssm`` above all), forward and backward."""

from __future__ import annotations

import contextlib

import pytest
import torch

from cp_core import regions
from cp_core.comm import LocalGroup
from cp_core.mixer import Mamba2Config, Mamba2Mixer

CFG = dict(d_model=16, n_heads=4, head_dim=4, n_groups=2, d_state=8, d_conv=4, chunk_size=8)


@pytest.mark.parametrize(
    "cp, kw",
    [
        (1, {}),
        (2, {"strategy": "hidden"}),
        (2, {"strategy": "hidden", "fused": False}),  # the seed path
        (2, {"strategy": "state_passing"}),
    ],
    ids=["cp1", "hidden", "seed", "state_passing"],
)
def test_each_path_records_its_regions(cp, kw):
    seen: list[str] = []

    def hook(name):
        seen.append(name)
        return contextlib.nullcontext()

    torch.manual_seed(0)
    group = None if cp == 1 else LocalGroup(0, cp)
    layer = Mamba2Mixer(Mamba2Config(**CFG), cp_group=group, **kw)
    x = torch.randn(1, 32 // cp, CFG["d_model"], requires_grad=True)
    previous = regions.set_region_hook(hook)
    try:
        layer(x).sum().backward()
    finally:
        regions.set_region_hook(previous)
    assert "ssm" in seen and "norm_proj" in seen, seen
    if cp > 1 and kw["strategy"] == "hidden":
        assert {"a2a_pre", "a2a_post"} <= set(seen), seen
