"""find_sites / neuron_axis / the activation registry: which calls are sites, their kind, parameters,
neuron axis (decided by the producer), labels of reused modules, and the per-state affine maps."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from nepenthe_compress.sites import ACTIVATIONS, find_sites
from nepenthe_compress.trace import trace_model


def sites_of(model: nn.Module):
    return find_sites(trace_model(model))


# ---- torchvision architectures -----------------------------------------------------------------

def test_resnet18_shared_relu_gives_two_sites_per_block() -> None:
    sites = sites_of(torchvision.models.resnet18(weights=None, num_classes=10))
    blocks = [f"layer{layer}.{block}.relu" for layer in range(1, 5) for block in range(2)]
    assert [s.target for s in sites] == ["relu"] + [t for b in blocks for t in (b, f"{b}#1")]
    assert len(sites) == 17 and len({s.name for s in sites}) == 17
    assert {(s.kind.name, s.neuron_axis) for s in sites} == {("relu", 1)}
    assert all(s.axis_reason.startswith("BatchNorm2d") for s in sites)  # bn (maybe through the add)


def test_mobilenet_v2_relu6_sites() -> None:
    sites = sites_of(torchvision.models.mobilenet_v2(weights=None, num_classes=10))
    assert len(sites) == 35  # stem + 1 (t=1 block) + 2 per remaining 16 blocks + last conv
    for s in sites:
        assert (s.kind.name, s.neuron_axis, s.params) == ("relu6", 1, {"min": 0.0, "max": 6.0})
        assert s.kind.states == ("OFF", "LINEAR", "SATURATED")
        assert s.kind.thresholds(s.params) == (0.0, 6.0)


def test_vgg11_bn_conv_sites_axis_1_linear_sites_axis_last() -> None:
    model = torchvision.models.vgg11_bn(weights=None, num_classes=10)
    sites = sites_of(model)
    features = [f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, nn.ReLU)]
    assert [s.target for s in sites] == features + ["classifier.1", "classifier.4"]
    assert [s.neuron_axis for s in sites] == [1] * 8 + [-1, -1]
    assert [s.axis_reason.split()[0] for s in sites] == ["BatchNorm2d"] * 8 + ["Linear"] * 2


def test_swin_t_gelu_sites_are_channels_last() -> None:
    sites = sites_of(torchvision.models.swin_t(weights=None, num_classes=10))
    depths = (2, 2, 6, 2)
    stages = [1, 3, 5, 7]  # features.{1,3,5,7} hold the blocks
    assert [s.target for s in sites] == [f"features.{st}.{b}.mlp.1" for st, d in zip(stages, depths)
                                         for b in range(d)]
    for s in sites:
        assert (s.kind.name, s.kind.exact, s.neuron_axis) == ("gelu", False, -1)
        assert s.axis_reason.startswith("Linear") and s.axis_reason.endswith(s.target[:-1] + "0")


# ---- tiny edge cases -------------------------------------------------------------------------

class Zoo(nn.Module):
    """One of each rectifier form, each behind its own conv (axis 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, 4, 1) for _ in range(12))
        self.leaky = nn.LeakyReLU(0.2)
        self.prelu = nn.PReLU(4)
        self.clip = nn.Hardtanh(-2.0, 3.0)
        self.relu6 = nn.ReLU6()
        self.gelu = nn.GELU()
        self.silu = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = [conv(x) for conv in self.convs]
        outs = [F.relu(c[0]), torch.relu(c[1]), c[2].relu(), self.leaky(c[3]), self.prelu(c[4]),
                self.clip(c[5]), F.hardtanh(c[6], -1.5, 0.5), F.leaky_relu(c[7], negative_slope=0.3),
                F.relu6(c[8]), self.relu6(c[9]), self.gelu(c[10]), self.silu(c[11])]
        return torch.cat(outs, dim=1)


def test_every_rectifier_form_is_a_site_with_its_parameters() -> None:
    model = Zoo()
    sites = sites_of(model)
    got = [(s.target, s.kind.name, {k: v for k, v in s.params.items() if k != "weight"}) for s in sites]
    assert got == [
        ("relu", "relu", {}), ("relu", "relu", {}), ("relu", "relu", {}),
        ("leaky", "leaky_relu", {"negative_slope": 0.2}), ("prelu", "prelu", {}),
        ("clip", "hardtanh", {"min": -2.0, "max": 3.0}), ("hardtanh", "hardtanh", {"min": -1.5, "max": 0.5}),
        ("leaky_relu", "leaky_relu", {"negative_slope": 0.3}), ("relu6", "relu6", {"min": 0.0, "max": 6.0}),
        ("relu6", "relu6", {"min": 0.0, "max": 6.0}), ("gelu", "gelu", {}), ("silu", "silu", {}),
    ]
    assert sites[4].params["weight"] is not None and sites[4].params["weight"].shape == (4,)
    assert [s.kind.thresholds(s.params) for s in sites][5:7] == [(-2.0, 3.0), (-1.5, 0.5)]
    assert all(s.neuron_axis == 1 and s.axis_reason.startswith("Conv2d convs.") for s in sites)
    assert len({s.name for s in sites}) == len(sites)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 12)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, T, C)
        return F.gelu(self.drop(self.fc2(F.relu(self.fc1(x)))))


def test_linear_producer_gives_last_axis_through_dropout() -> None:
    sites = sites_of(Mlp())
    assert [(s.kind.name, s.neuron_axis, s.axis_reason) for s in sites] == [
        ("relu", -1, "Linear fc1"), ("gelu", -1, "Linear fc2")]


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 5, 3)
        self.act = nn.LeakyReLU(0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.act(self.conv1(x))))


def test_shared_module_called_twice_is_two_sites() -> None:
    sites = sites_of(Shared())
    assert [s.target for s in sites] == ["act", "act#1"]
    assert sites[0].name != sites[1].name
    assert [s.axis_reason for s in sites] == ["Conv2d conv1", "Conv2d conv2"]


class InputSite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)


def test_site_on_graph_input_assumes_axis_1_and_says_so() -> None:
    (site,) = sites_of(InputSite())
    assert site.neuron_axis == 1
    assert site.axis_reason == "no producer found: channel axis 1 assumed"


class LookThrough(nn.Module):
    """Producers reached through residual adds, a rectifier, mul and functional ops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Linear(3, 6)
        self.w = nn.Parameter(torch.randn(6, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn(self.conv(x)) + x)          # bn through add
        b = F.relu(torch.relu(a) * 0.5)               # through mul and another rectifier
        c = F.relu(F.conv2d(b, self.conv.weight))     # functional conv
        t = c.mean((2, 3))
        d = F.relu(self.fc(t) @ self.w)               # matmul
        e = F.relu(F.linear(d, self.w))               # functional linear
        return e


def test_neuron_axis_looks_through_elementwise_ops() -> None:
    sites = sites_of(LookThrough())
    assert [(s.neuron_axis, s.axis_reason) for s in sites] == [
        (1, "BatchNorm2d bn"), (1, "BatchNorm2d bn"), (1, "BatchNorm2d bn"), (1, "conv2d"),
        (-1, "matmul"), (-1, "linear")]


# ---- registry: the per-state affine map equals the activation in that state (float64) ----------

def regions(thresholds: tuple[float, ...]) -> list[tuple[float, float, float | None]]:
    """(low, high, included boundary) of each state's z range, written independently of the
    registry's state rule: OFF z <= t, ON z > t; or OFF z <= lo, LINEAR lo < z < hi, SATURATED z >= hi."""
    if len(thresholds) == 1:
        t = thresholds[0]
        return [(t - 5.0, t, t), (t + 1e-9, t + 5.0, None)]
    lo, hi = thresholds
    return [(lo - 5.0, lo, lo), (lo + 1e-9, hi - 1e-9, None), (hi, hi + 5.0, hi)]


@pytest.mark.parametrize("module", [nn.ReLU(), nn.LeakyReLU(0.15), nn.PReLU(4), nn.Hardtanh(-2.0, 3.0),
                                    nn.Hardtanh(0.25, 0.75), nn.ReLU6()], ids=repr)
def test_affine_map_of_each_state_matches_the_activation(module: nn.Module) -> None:
    torch.manual_seed(0)
    if isinstance(module, nn.PReLU):
        with torch.no_grad():
            module.weight.uniform_(-0.5, 0.5)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act = nn.Conv2d(4, 4, 1), module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.conv(x))

    (site,) = sites_of(Wrap())
    kind, params = site.kind, site.params
    assert kind.exact
    act64 = module.double() if isinstance(module, nn.PReLU) else module
    for s, (lo, hi, boundary) in enumerate(regions(kind.thresholds(params))):
        z = torch.empty(64, 4, dtype=torch.float64).uniform_(lo, hi)
        if boundary is not None:
            z[0] = boundary
        scale, shift = kind.affine(params, s, 4)
        with torch.no_grad():
            expected = act64(z)
        assert torch.allclose(z * scale + shift, expected, rtol=0, atol=1e-12), kind.states[s]


def test_smooth_rectifiers_are_marked_inexact() -> None:
    assert {k for k, kind in ACTIVATIONS.items() if not kind.exact} == {"gelu", "silu", "hardswish", "elu", "mish"}
