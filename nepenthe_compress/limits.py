"""Budgets that bound what an input may make this process allocate, overridable from the environment."""
from __future__ import annotations

import os


def env_limit(name: str, default: int) -> int:
    """The positive integer in environment variable ``name``, else ``default``."""
    try:
        value = int(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default
