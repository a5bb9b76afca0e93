"""Pruning that produces zero-entropy layers: NEPENTHE/EGP, iterative magnitude pruning, EASIER.

The names below are imported on first use, so that ``prune.catalog`` (method and schedule names for
the CLI's help) can be read without importing torch."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"METHODS": "methods", "PruneConfig": "run", "PruneResult": "run", "RoundResult": "run",
            "run_prune": "run"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nepenthe_compress.prune' has no attribute {name!r}")
    return getattr(importlib.import_module(f"nepenthe_compress.prune.{_EXPORTS[name]}"), name)
