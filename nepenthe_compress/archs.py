"""Architecture registry: CIFAR built-ins, torchvision classifiers and ``package.module:callable``.

``build_model`` never downloads anything (torchvision models are built with ``weights=None``);
``infer_arch_kwargs`` reads ``num_classes`` / ``in_channels`` / ``width`` from a state_dict.
"""
from __future__ import annotations

import difflib
import functools
import importlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.mobilenetv2 import MobileNetV2
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.vgg import cfgs as VGG_CFGS

from nepenthe_compress.errors import CheckpointError

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
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)

    build.__name__ = name
    return build


def _import_callable(spec: str) -> Builder:
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise CheckpointError(f"cannot import '{module_name}' for architecture '{spec}': {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CheckpointError(f"architecture '{spec}': '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CheckpointError(f"architecture '{spec}' is not callable")
    return obj


def resolve_arch(arch: str) -> Builder:
    """The builder for ``arch``; unknown names raise ``CheckpointError`` with suggestions."""
    if ":" in arch:
        return _import_callable(arch)
    if arch in BUILTINS:
        return BUILTINS[arch]
    if arch in torchvision_names():
        return _torchvision_builder(arch)
    known = [*BUILTINS, *torchvision_names()]
    close = difflib.get_close_matches(arch, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise CheckpointError(
        f"unknown architecture '{arch}' ({hint}built-ins: {', '.join(BUILTINS)}; torchvision names such "
        "as resnet18, mobilenet_v2, vgg16_bn; or package.module:callable)")


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """Build ``arch`` with random weights (never downloads); bad kwargs raise ``CheckpointError``."""
    builder = resolve_arch(arch)
    try:
        return builder(**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot build '{arch}' with {kwargs}: {e}") from None


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


def infer_arch_kwargs(arch: str, state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """The kwargs of ``INFERERS`` that ``arch``'s builder names and the state_dict determines.

    num_classes: a known head key, else the last 2-D weight; in_channels: the first conv weight;
    width (built-ins only): from the widest layer. Callers let explicit kwargs override these.
    """
    accepted = inspect.signature(resolve_arch(arch)).parameters
    found = {name: infer(arch, state_dict) for name, infer in INFERERS.items() if name in accepted}
    return {name: value for name, value in found.items() if value is not None}
