"""Shared fixtures. Every test process runs torch with one intra-op thread: the suite runs with
``pytest -n 2`` on 2 cores, and torch's thread pool spin-waits when cores are oversubscribed
(small forward passes then get ~50x slower)."""
from __future__ import annotations

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(1)
