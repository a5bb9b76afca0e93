"""Imports that would otherwise cost seconds the command never uses.

``import torchvision`` imports ``torch._dynamo`` (about 1.3 s of a 1.4 s import, measured with
``python -X importtime`` on torch 2.14 / torchvision 0.29) for one function,
``torch._dynamo.utils.is_compile_supported``, that ``torchvision.ops.roi_align`` calls only when
a detection model runs. ``import_torchvision`` imports torchvision with a stand-in for that one module,
whose functions import the real one on first call, then removes the stand-in so that the next
``import torch._dynamo`` (torch.export, the dynamo ONNX exporter) loads the real package. If a
torchvision version asks the stand-in for a name it does not have, the import is retried plainly:
nothing is lost but the time.
"""
from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from typing import Any

_DYNAMO_UTILS = "torch._dynamo.utils"
_DEFERRED = ("is_compile_supported",)   # what torchvision takes from torch._dynamo.utils at import


def _deferred(name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(_DYNAMO_UTILS), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def _stand_in() -> types.ModuleType:
    module = types.ModuleType(_DYNAMO_UTILS, "stand-in: functions import torch._dynamo on first call")
    for name in _DEFERRED:
        setattr(module, name, _deferred(name))
    return module


def import_torchvision() -> types.ModuleType:
    """``import torchvision``, without importing ``torch._dynamo`` unless it is already loaded."""
    if "torchvision" in sys.modules or _DYNAMO_UTILS in sys.modules:
        return importlib.import_module("torchvision")
    import torch  # noqa: F401  (torch itself must be complete before the stand-in goes in)

    stand_in = _stand_in()
    sys.modules[_DYNAMO_UTILS] = stand_in
    try:
        return importlib.import_module("torchvision")
    except ImportError:
        pass   # this torchvision takes more than the stand-in has
    finally:
        if sys.modules.get(_DYNAMO_UTILS) is stand_in:
            del sys.modules[_DYNAMO_UTILS]
    return importlib.import_module("torchvision")   # the modules that failed run again, plainly
