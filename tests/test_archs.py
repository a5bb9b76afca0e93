"""Architecture registry: CIFAR built-ins against hand-built torchvision references, inference, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.mobilenetv2 import MobileNetV2
from torchvision.models.vgg import make_layers

from nepenthe_compress.archs import BUILTINS, build_model, infer_arch_kwargs, resolve_arch
from nepenthe_compress.errors import CheckpointError


VGG16_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


class TinyNet(nn.Module):
    """Importable as f"{__name__}:TinyNet" for the package.module:callable form."""

    def __init__(self, num_classes: int = 3, in_channels: int = 2, hidden: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, hidden, 3)
        self.mid = nn.Linear(hidden, 6)
        self.out = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mid(self.stem(x).mean((2, 3))))


def _settle(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give BN non-trivial running statistics (one train-mode pass), then float64 eval."""
    torch.manual_seed(1)
    with torch.no_grad():
        model.train()(x)
    return model.double().eval()


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


@torch.no_grad()
def test_cifar_resnet18_equals_torchvision_resnet18_with_cifar_stem() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    ours = _settle(build_model("cifar_resnet18", num_classes=10), x)
    ref = torchvision.models.resnet18(num_classes=10)
    ref.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    ref.maxpool = nn.Identity()
    ref.load_state_dict(ours.state_dict())  # strict: same module names as torchvision
    ref = ref.double().eval()
    torch.testing.assert_close(ours(x.double()), ref(x.double()), rtol=0, atol=1e-12)


@torch.no_grad()
def test_cifar_vgg16_equals_torchvision_features_plus_linear() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    ours = _settle(build_model("cifar_vgg16", num_classes=10), x)
    features = make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=True)
    features.load_state_dict({k.removeprefix("features."): v for k, v in ours.state_dict().items()
                              if k.startswith("features.")})
    h = features.double().eval()(x.double())
    ref = F.linear(h.mean((2, 3)), ours.classifier.weight, ours.classifier.bias)
    torch.testing.assert_close(ours(x.double()), ref, rtol=0, atol=1e-12)


@torch.no_grad()
def test_cifar_mobilenet_v2_equals_torchvision_with_cifar_strides() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    ours = _settle(build_model("cifar_mobilenet_v2", num_classes=10, width=0.5), x)
    setting = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
               [6, 160, 3, 2], [6, 320, 1, 1]]
    ref = MobileNetV2(num_classes=10, width_mult=0.5, inverted_residual_setting=setting)
    ref.features[0][0].stride = (1, 1)
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x.double()), ref.double().eval()(x.double()), rtol=0, atol=1e-12)


def _output_hw(module: nn.Module, model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[-2:])))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("arch, body, hw", [
    ("cifar_resnet18", lambda m: m.layer4, (4, 4)),
    ("cifar_vgg16", lambda m: m.features, (1, 1)),
    ("cifar_mobilenet_v2", lambda m: m.features, (4, 4)),
])
def test_cifar_structure_stem_and_output_stride(arch: str, body, hw: tuple[int, int]) -> None:
    model = build_model(arch, num_classes=7, in_channels=1, width=0.25)
    stem = _convs(model)[0]
    assert (stem.in_channels, stem.kernel_size, stem.stride, stem.padding) == (1, (3, 3), (1, 1), (1, 1))
    assert _output_hw(body(model), model, torch.randn(1, 1, 32, 32)) == hw
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features == 7


def test_cifar_resnet18_widths_and_no_maxpool() -> None:
    model = build_model("cifar_resnet18", width=0.25)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert [layer[-1].conv2.out_channels for layer in (model.layer1, model.layer2, model.layer3, model.layer4)] \
        == [16, 32, 64, 128]
    assert model.fc.in_features == 128


@pytest.mark.parametrize("batch_norm", [True, False])
def test_cifar_vgg16_widths(batch_norm: bool) -> None:
    model = build_model("cifar_vgg16", width=0.5, batch_norm=batch_norm)
    assert [c.out_channels for c in _convs(model)] == [c // 2 for c in VGG16_WIDTHS]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == (13 if batch_norm else 0)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert model.classifier.in_features == 256


def test_cifar_mobilenet_v2_widths() -> None:
    model = build_model("cifar_mobilenet_v2", width=0.5)
    assert model.features[0][0].out_channels == 16        # make_divisible(32 * 0.5, 8)
    assert model.features[17].conv[2].out_channels == 160  # 320 * 0.5
    assert model.classifier[1].in_features == 1280         # last channel never shrinks


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vgg11_bn", "swin_t"])
def test_torchvision_names_build_the_torchvision_model(name: str) -> None:
    with torch.device("meta"):  # structure only: no memory, no init cost
        ours = build_model(name, num_classes=7)
        ref = getattr(torchvision.models, name)(num_classes=7)
    assert type(ours) is type(ref)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert infer_arch_kwargs(name, ours.state_dict()) == {"num_classes": 7}  # torchvision: no in_channels


@pytest.mark.parametrize("arch", sorted(BUILTINS))
@pytest.mark.parametrize("width", [0.125, 0.3, 0.35, 0.5, 1.0])
def test_infer_builtin_kwargs_rebuilds_identical_shapes(arch: str, width: float) -> None:
    with torch.device("meta"):
        sd = build_model(arch, num_classes=7, in_channels=1, width=width).state_dict()
        inferred = infer_arch_kwargs(arch, sd)
        rebuilt = build_model(arch, **inferred).state_dict()
    assert (inferred["num_classes"], inferred["in_channels"]) == (7, 1)
    assert abs(inferred["width"] - width) < 0.02
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in sd.items()}


def test_infer_num_classes_from_conv_head() -> None:
    with torch.device("meta"):
        sd = build_model("squeezenet1_1", num_classes=5).state_dict()
    assert sd["classifier.1.weight"].ndim == 4
    assert infer_arch_kwargs("squeezenet1_1", sd) == {"num_classes": 5}


def test_callable_arch_builds_and_infers_from_last_2d_weight() -> None:
    arch = f"{__name__}:TinyNet"
    torch.manual_seed(0)
    src = TinyNet(num_classes=4, in_channels=1, hidden=8)
    sd = src.state_dict()
    # "hidden" is not inferable: only the kwargs of INFERERS that the callable names
    builder = resolve_arch(arch, allow_import=True)
    assert infer_arch_kwargs(arch, sd, builder) == {"num_classes": 4, "in_channels": 1}
    model = build_model(arch, allow_import=True, num_classes=4, in_channels=1, hidden=8)
    model.load_state_dict(sd)
    x = torch.randn(2, 1, 6, 6)
    torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)


@pytest.mark.parametrize("arch, words", [
    ("resnet181", ["unknown architecture 'resnet181'", "resnet18", "cifar_resnet18"]),
    ("no_such_net", ["unknown architecture", "package.module:callable"]),
    ("no_such_pkg.mod:fn", ["cannot import 'no_such_pkg.mod'"]),
    ("torch.nn:NoSuchThing", ["has no attribute 'NoSuchThing'"]),
    ("torch.nn:init.calculate_gain", ["takes no argument num_classes"]),  # callable, kwargs do not fit
    ("collections:OrderedDict", ["returned a OrderedDict, not a torch.nn.Module"]),
])
def test_bad_architecture_is_a_one_line_checkpoint_error(arch: str, words: list[str]) -> None:
    kwargs = {} if arch == "collections:OrderedDict" else {"num_classes": 3}
    with pytest.raises(CheckpointError) as e:
        build_model(arch, allow_import=True, **kwargs)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("arch, kwargs", [
    ("resnet18", {"in_channels": 1}),        # torchvision models take no in_channels
    ("resnet18", {"weights": "DEFAULT"}),    # weights come from the checkpoint, never downloaded
    ("cifar_resnet18", {"width": 0.001}),    # no channel left
])
def test_bad_kwargs_are_checkpoint_errors(arch: str, kwargs: dict) -> None:
    with pytest.raises(CheckpointError, match=f"cannot build '{arch}'"):
        build_model(arch, **kwargs)
