import pytest
import torch
from ranks import RankPool

_POOL: list = []


@pytest.fixture(scope="session")
def _pool_holder():
    yield _POOL
    for p in _POOL:
        p.close()


@pytest.fixture
def ranks(_pool_holder):
    """A session-wide pool of 8 gloo ranks; ``ranks.run(fn, cp, *args)`` runs fn(group, *args) on ranks 0..cp-1."""
    if _pool_holder and _pool_holder[0].broken:
        _pool_holder.pop().close()
    if not _pool_holder:
        _pool_holder.append(RankPool(8))
    return _pool_holder[0]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
