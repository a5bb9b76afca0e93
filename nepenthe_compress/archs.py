"""Architecture registry: CIFAR built-ins, torchvision classifiers and ``package.module:callable``.

``build_model`` never downloads anything (torchvision models are built with ``weights=None``), takes
only JSON-scalar kwargs, and builds within a memory and module-count budget (``width=1e4`` is refused
before anything large is allocated). ``package.module:callable`` is imported only when the caller says
the name came from the user, never from a file. ``infer_arch_kwargs`` reads ``num_classes`` /
``in_channels`` / ``width`` from a state_dict.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from nepenthe_compress.light_imports import import_torchvision

torchvision = import_torchvision()
from torchvision.models.mobilenetv2 import MobileNetV2  # noqa: E402
from torchvision.models.resnet import BasicBlock, ResNet  # noqa: E402
from torchvision.models.vgg import cfgs as VGG_CFGS  # noqa: E402

from nepenthe_compress.errors import CheckpointError, first_line
from nepenthe_compress.limits import env_limit

Builder = Callable[..., nn.Module]


def _scaled(channels: int, width: float) -> int:
    """``round(channels * width)``; a width that leaves no channel is an error."""
    scaled = round(channels * width)
    if scaled < 1:
        raise ValueError(f"width {width} leaves {channels} channels with none")
    return scaled


def _init_weights(module: nn.Module) -> None:
    """torchvision's CNN initialisation: He (fan_out) convs, unit norms, small-normal linears."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class CifarResNet(ResNet):
    """torchvision ResNet (same module names) with a 3x3 stride-1 stem, no max-pool, scaled widths."""

    def __init__(self, layers: list[int], num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0) -> None:
        nn.Module.__init__(self)
        widths = [_scaled(c, width) for c in (64, 128, 256, 512)]
        # attributes ResNet._make_layer reads
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = widths[0], 1, 1, 64
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(BasicBlock, widths[0], layers[0])
        self.layer2 = self._make_layer(BasicBlock, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CifarVGG(nn.Module):
    """VGG feature stack (torchvision layout) followed by global pooling and one Linear."""

    def __init__(self, cfg: list[int | str], num_classes: int = 10, in_channels: int = 3,
                 width: float = 1.0, batch_norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out = _scaled(int(v), width)
            layers.append(nn.Conv2d(channels, out, kernel_size=3, padding=1))
            layers += [nn.BatchNorm2d(out), nn.ReLU(inplace=True)] if batch_norm else [nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# torchvision's MobileNetV2 setting (t, c, n, s) with the second stage's stride 2 -> 1 for 32x32 inputs
CIFAR_MOBILENET_V2_SETTING = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2],
                              [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]


def cifar_resnet18(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """BasicBlock ResNet-18 for 32x32 inputs; channels round(64*width), ..., round(512*width)."""
    return CifarResNet([2, 2, 2, 2], num_classes, in_channels, width)


def cifar_vgg16(num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                batch_norm: bool = True) -> nn.Module:
    """VGG-16 (config D) for 32x32 inputs with a single Linear classifier."""
    return CifarVGG(VGG_CFGS["D"], num_classes, in_channels, width, batch_norm)


def cifar_mobilenet_v2(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """torchvision MobileNetV2 with a stride-1 stem and stride-1 second stage (output stride 8)."""
    model = MobileNetV2(num_classes=num_classes, width_mult=width,
                        inverted_residual_setting=CIFAR_MOBILENET_V2_SETTING)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, kernel_size=3, stride=1,
                                     padding=1, bias=False)
    _init_weights(model.features[0][0])
    return model


BUILTINS: dict[str, Builder] = {
    "cifar_resnet18": cifar_resnet18,
    "cifar_vgg16": cifar_vgg16,
    "cifar_mobilenet_v2": cifar_mobilenet_v2,
}

# built-in -> (state_dict key, dim, channels at width 1) of its widest layer: width = shape[dim] / base.
# The widest layer gives the finest resolution (the stem's 64 or MobileNetV2's rounded 32 do not).
WIDTH_PROBES: dict[str, tuple[str, int, int]] = {
    "cifar_resnet18": ("fc.weight", 1, 512),
    "cifar_vgg16": ("classifier.weight", 1, 512),
    "cifar_mobilenet_v2": ("features.17.conv.2.weight", 0, 320),
}

# classifier weights by name, tried before the "last 2-D weight" rule (squeezenet's head is a conv)
HEAD_KEYS = ("fc.weight", "classifier.weight", "classifier.1.weight", "head.weight", "heads.head.weight")


@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """The torchvision classification model names (no detection/segmentation/video/quantized)."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


def _torchvision_builder(name: str) -> Builder:
    def build(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
        if "weights" in kwargs:
            raise ValueError("pretrained torchvision weights are never downloaded: the weights come from the checkpoint")
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)

    build.__name__ = name
    return build


MAX_MODEL_BYTES = env_limit("NEPENTHE_MAX_MODEL_BYTES", 8 << 30)   # tensors allocated while building
MAX_MODULES = env_limit("NEPENTHE_MAX_MODULES", 100_000)            # submodules registered while building
KWARG_SCALARS = (str, int, float, bool, type(None))
_FACTORIES = ("aten.empty", "aten.zeros", "aten.ones", "aten.full", "aten.rand")


@contextlib.contextmanager
def import_path(code_path: str | os.PathLike | None) -> Iterator[None]:
    """Make ``code_path`` (default: the current directory) importable for the duration."""
    folder = str(Path(code_path or os.getcwd()).resolve())
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _import_callable(spec: str, code_path: str | os.PathLike | None = None) -> Builder:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CheckpointError(f"architecture '{spec}': expected package.module:callable")
    try:
        with import_path(code_path):
            obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        where = Path(code_path or os.getcwd()).resolve()
        raise CheckpointError(f"cannot import '{module_name}' for architecture '{spec}': {e} "
                              f"(searched {where} and the installed packages; pass --code-path DIR)") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CheckpointError(f"architecture '{spec}': '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CheckpointError(f"architecture '{spec}' is not callable")
    return obj


def resolve_arch(arch: str, allow_import: bool = False, code_path: str | os.PathLike | None = None) -> Builder:
    """The builder for ``arch``; unknown names raise ``CheckpointError`` with suggestions.

    ``package.module:callable`` is imported only with ``allow_import`` (a name the user gave).
    """
    if not isinstance(arch, str):
        raise CheckpointError(f"architecture must be a name, got {type(arch).__name__}")
    if ":" in arch:
        if not allow_import:
            raise CheckpointError(
                f"architecture '{arch[:100]}' names a Python callable; nothing read from a file is imported "
                "or called: pass --arch yourself if you trust that code")
        return _import_callable(arch, code_path)
    if arch in BUILTINS:
        return BUILTINS[arch]
    if arch in torchvision_names():
        return _torchvision_builder(arch)
    known = [*BUILTINS, *torchvision_names()]
    close = difflib.get_close_matches(arch, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise CheckpointError(
        f"unknown architecture '{arch[:100]}' ({hint}built-ins: {', '.join(BUILTINS)}; torchvision names "
        "such as resnet18, mobilenet_v2, vgg16_bn; or package.module:callable)")


def check_arch_kwargs(arch: str, builder: Builder, kwargs: Mapping[str, Any]) -> None:
    """Kwargs are JSON scalars (finite numbers) named by the builder's signature."""
    for key, value in kwargs.items():
        if not isinstance(key, str) or type(value) not in KWARG_SCALARS:
            raise CheckpointError(f"architecture '{arch}': argument {str(key)[:50]!r} must be a str, int, "
                                  f"float, bool or null, got {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise CheckpointError(f"architecture '{arch}': argument {key!r} is {value}")
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return  # torchvision builders forward **kwargs: the model's own constructor checks them
    names = {p.name for p in params}
    unknown = sorted(k for k in kwargs if k not in names)
    if unknown:
        raise CheckpointError(f"architecture '{arch}' takes no argument {', '.join(u[:50] for u in unknown[:5])} "
                              f"(it takes {', '.join(sorted(names)) or 'none'})")


class _BuildBudget(TorchDispatchMode):
    """Refuses, before it happens, any tensor creation that would take a build past MAX_MODEL_BYTES."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        self.arch, self.bytes = arch, 0

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """Never compiled: without this, torch wraps ``__torch_dispatch__`` so that its first call imports
        ``torch._dynamo`` (2 s of every checkpoint load)."""
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        size = args[0] if args and isinstance(args[0], (list, tuple)) else None
        if size is not None and str(func).startswith(_FACTORIES) and all(type(d) is int for d in size):
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            self.bytes += math.prod(max(d, 0) for d in size) * dtype.itemsize
            if self.bytes > MAX_MODEL_BYTES:
                raise CheckpointError(
                    f"architecture '{self.arch}' would allocate more than {MAX_MODEL_BYTES / 2**30:g} GiB of "
                    "weights with these arguments (raise NEPENTHE_MAX_MODEL_BYTES if that is intended)")
        return func(*args, **kwargs)


@contextlib.contextmanager
def _module_budget(arch: str) -> Iterator[None]:
    """Refuses builds that register more than MAX_MODULES submodules (a time bomb, not a memory one)."""
    count = 0

    def hook(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
        nonlocal count
        count += 1
        if count > MAX_MODULES:
            raise CheckpointError(f"architecture '{arch}' builds more than {MAX_MODULES:,} modules with these arguments")

    handle = nn.modules.module.register_module_module_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def build_model(arch: str, *, allow_import: bool = False, code_path: str | os.PathLike | None = None,
                **kwargs: Any) -> nn.Module:
    """Build ``arch`` with random weights (never downloads) within the memory and module budgets.

    ``allow_import``: ``arch`` came from the user, so ``package.module:callable`` may be imported
    (from ``code_path``, default the current directory). Problems raise ``CheckpointError``.
    """
    builder = resolve_arch(arch, allow_import, code_path)
    check_arch_kwargs(arch, builder, kwargs)
    try:
        with _module_budget(arch), _BuildBudget(arch):
            model = builder(**kwargs)
    except CheckpointError:
        raise
    except (TypeError, ValueError, OverflowError, RuntimeError, MemoryError, ZeroDivisionError) as e:
        shown = {k: (v[:50] if isinstance(v, str) else v) for k, v in kwargs.items()}
        first = first_line(e)[:300]
        raise CheckpointError(f"cannot build '{arch}' with {shown}: {type(e).__name__}: {first}") from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"architecture '{arch}' returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _weights(state_dict: Mapping[str, Tensor], ndims: tuple[int, ...]) -> list[Tensor]:
    return [v for k, v in state_dict.items()
            if k.endswith("weight") and isinstance(v, Tensor) and v.ndim in ndims]


def _num_classes(arch: str, state_dict: Mapping[str, Tensor]) -> int | None:
    head = next((state_dict[k] for k in HEAD_KEYS if k in state_dict), None)
    if head is None:
        head = next(reversed(_weights(state_dict, (2,))), None)
    return None if head is None else int(head.shape[0])


def _in_channels(arch: str, state_dict: Mapping[str, Tensor]) -> int | None:
    convs = _weights(state_dict, (3, 4, 5))
    return int(convs[0].shape[1]) if convs else None


def _width(arch: str, state_dict: Mapping[str, Tensor]) -> float | None:
    probe = WIDTH_PROBES.get(arch)
    if probe is None or probe[0] not in state_dict:
        return None
    key, dim, base = probe
    return state_dict[key].shape[dim] / base


INFERERS: dict[str, Callable[[str, Mapping[str, Tensor]], Any]] = {
    "num_classes": _num_classes,
    "in_channels": _in_channels,
    "width": _width,
}


def infer_arch_kwargs(arch: str, state_dict: Mapping[str, Tensor], builder: Builder | None = None) -> dict[str, Any]:
    """The kwargs of ``INFERERS`` that ``arch``'s builder names and the state_dict determines.

    ``builder`` defaults to the registry's (built-ins and torchvision names; no imports).
    num_classes: a known head key, else the last 2-D weight; in_channels: the first conv weight;
    width (built-ins only): from the widest layer. Callers let explicit kwargs override these.
    """
    try:
        accepted = inspect.signature(builder or resolve_arch(arch)).parameters
    except (TypeError, ValueError):
        return {}
    found = {name: infer(arch, state_dict) for name, infer in INFERERS.items() if name in accepted}
    return {name: value for name, value in found.items() if value is not None}
