"""nepenthe-compress: fold zero-entropy rectifier layers of pruned networks into shallower models.

Python API (see ``nepenthe_compress.api``)::

    import nepenthe_compress as nc
    states = nc.measure_entropy(model, calib)     # calib: tensor, array, DataLoader or data spec
    result = nc.fold(model, calib, merge="auto")  # result.model, result.report, result.save("out/")
    ck = nc.load_checkpoint("pruned.pt")

The API is imported on first use, so ``import nepenthe_compress`` (and the CLI's ``--help``) stays
light. ``nepenthe_compress.fold`` is also the package of the fold pass (``nepenthe_compress.fold.core``
...); calling it runs ``nepenthe_compress.api.fold``.
"""
from __future__ import annotations

import types
from typing import Any

from nepenthe_compress import fold as _fold_package   # its __init__ imports nothing

__version__ = "0.1.0"
__all__ = ["FoldReport", "FoldResult", "LoadedCheckpoint", "fold", "load_checkpoint", "measure_entropy"]

_API = frozenset(__all__) - {"fold"}


class _CallablePackage(types.ModuleType):
    """A package that can be called: ``nepenthe_compress.fold(model, calib, ...)``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from nepenthe_compress.api import fold

        return fold(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<package {self.__name__!r}, callable: nepenthe_compress.api.fold>"


_fold_package.__class__ = _CallablePackage


def __getattr__(name: str) -> Any:
    if name in _API:
        from nepenthe_compress import api

        return getattr(api, name)
    raise AttributeError(f"module 'nepenthe_compress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
