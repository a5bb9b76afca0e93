"""Shared fixtures. Every test process runs torch with one intra-op thread: the suite runs with
``pytest -n 2`` on 2 cores, and torch's thread pool spin-waits when cores are oversubscribed
(small forward passes then get ~50x slower)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _private_cost_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Measured layer costs go to a cache of this test run, never the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("NEPENTHE_CACHE_DIR", str(tmp_path_factory.mktemp("cost-cache")))
    yield
    mp.undo()
