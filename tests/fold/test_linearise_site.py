"""``linearise_site``: a zero-entropy rectifier site becomes the per-channel affine map of its
neurons' states; every call form of a rectifier is a site; smooth rectifiers only when approximate."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kit import (D, assert_exact, called, events, fold, image, max_rel, measure, modules, set_states, weighted,
                 zero_entropy)
from nepenthe_compress.fold.modules import ChannelAffine
from nepenthe_compress.fold.rewrites.linearise import LINEARISE
from nepenthe_compress.sites import find_sites
from nepenthe_compress.trace import trace_model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class CallForms(nn.Module):
    """F.relu, Tensor.relu, in-place module / function / method relus between 1x1 convs."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(6))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        c = self.convs
        x = F.relu(c[0](x))
        x = c[1](x).relu()
        x = self.act(c[2](x))
        x = F.relu(c[3](x), inplace=True)
        x = c[4](x).relu_()
        return c[5](x)


def test_functional_method_and_inplace_relu_sites_are_linearised() -> None:
    m, x = CallForms().double(), image()
    set_states(m, x, {c: "on" for c in m.convs[:5]})
    report = measure(m, x)
    assert len(report.sites) == 5 and zero_entropy(report) == {s.name for s in report.sites}
    only = fold(m, x, rewrites=[LINEARISE])
    assert len(only.linearised) == 5 and events(only, "linearise") == [
        f"{s.target}: always ON: identity" for s in report.sites]
    assert called(only, nn.ReLU) == 0 and len(weighted(only)) == 6  # ON everywhere: no map at all
    assert_exact(m, only, x)
    f = fold(m, x, merge="all")
    assert [type(w) for w in weighted(f)] == [nn.Conv2d]  # six 1x1 convs, all linear: one conv
    assert_exact(m, f, x)


class Slopes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 6, 1), nn.Conv2d(6, 3, 1)
        self.leaky, self.prelu = nn.LeakyReLU(0.2), nn.PReLU(6, init=0.3)

    def forward(self, x: Tensor) -> Tensor:
        return self.c3(self.prelu(self.c2(self.leaky(self.c1(x)))))


@pytest.mark.parametrize("dtype", [torch.float32, D])
def test_always_off_leaky_and_prelu_sites_become_their_slopes(dtype: torch.dtype) -> None:
    m, x = Slopes().to(dtype), image(dtype=dtype)
    with torch.no_grad():
        m.prelu.weight.uniform_(0.1, 0.9)  # per-channel slopes
    set_states(m, x, {m.c1: "off", m.c2: "off"})
    assert zero_entropy(measure(m, x)) == {"leaky", "prelu"}
    only = fold(m, x, rewrites=[LINEARISE])
    leaky, prelu = modules(only, ChannelAffine)
    assert leaky.scale.dtype == dtype  # the model's dtype (slopes are not rounded to float32)
    assert leaky.scale.tolist() == [torch.tensor(0.2, dtype=dtype).item()] * 6 and not leaky.shift.any()
    assert torch.equal(prelu.scale, m.prelu.weight.detach()) and not prelu.shift.any()
    assert_exact(m, only, x)  # an identity instead of the slopes would be off by O(1)
    f = fold(m, x, merge="all")
    assert sorted(f.linearised) == ["leaky", "prelu"] and len(weighted(f)) == 1
    assert_exact(m, f, x)


class Clip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 3, 1)
        self.clip = nn.Hardtanh(-1.0, 2.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.c2(self.clip(self.c1(x)))


def test_three_state_site_becomes_constants_and_identities() -> None:
    """Hardtanh(-1, 2): channels at max (2), at min (-1) and LINEAR become (0, 2), (0, -1), (1, 0)."""
    m, x = Clip().to(D), image()
    with torch.no_grad():
        m.c1.weight.mul_(0.01)
        m.c1.bias.copy_(torch.tensor([5.0, -5.0, 0.5, 5.0, 0.5, -5.0], dtype=D))
    assert measure(m, x).sites[0].always() == {"OFF": 2, "LINEAR": 2, "SATURATED": 2}
    only = fold(m, x, rewrites=[LINEARISE])
    (affine,) = modules(only, ChannelAffine)
    assert affine.scale.tolist() == [0, 0, 1, 0, 1, 0] and affine.shift.tolist() == [2, -1, 0, 2, 0, -1]
    assert events(only, "linearise") == ["clip: per-channel affine (OFF 2, LINEAR 2, SATURATED 2)"]
    assert_exact(m, only, x)


class InplaceReader(nn.Module):
    """An in-place LeakyReLU whose INPUT tensor is read again afterwards (it holds the output)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.act = nn.LeakyReLU(0.25, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        z = self.c1(x)
        y = self.act(z)
        return self.c2(y) + z  # z was overwritten by the activation


def test_inplace_activation_whose_input_is_read_later_stays_exact() -> None:
    m, x = InplaceReader().double(), image()
    set_states(m, x, {m.c1: "off"})  # always OFF: the site becomes the slope 0.25
    assert zero_entropy(measure(m, x)) == {"act"}
    f = fold(m, x, merge="all")
    assert f.linearised == ["act"]
    assert_exact(m, f, x)


class Reused(nn.Module):
    """One ReLU module called twice: two sites."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 6, 1), nn.Conv2d(6, 3, 1)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.c3(self.act(self.c2(self.act(self.c1(x)))))


def test_module_called_twice_gives_two_sites_and_only_the_constant_one_is_linearised() -> None:
    m, x = Reused().double(), image()
    set_states(m, x, {m.c1: "on", m.c2: "mixed"})
    report = measure(m, x)
    assert [s.name for s in report.sites] == ["act", "act_1"]
    assert [s.target for s in report.sites] == ["act", "act#1"]
    assert zero_entropy(report) == {"act"}
    f = fold(m, x, merge="all")
    assert f.linearised == ["act"]
    assert called(f, nn.ReLU) == 1
    assert len(weighted(f)) == 2  # c1 -> c2 merged, the mixed site stays before c3
    assert_exact(m, f, x)


def test_site_names_match_find_sites_on_the_traced_model() -> None:
    """The names the fold reports are the traced graph's site names (the entropy report's)."""
    m, x = Reused().double(), image()
    set_states(m, x, {m.c1: "on", m.c2: "on"})
    f = fold(m, x, merge="none")
    assert sorted(f.linearised) == sorted(s.name for s in find_sites(trace_model(m)))


class Smooth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(self.act(self.l1(x)))


def test_zero_entropy_gelu_is_only_linearised_when_approximate() -> None:
    m, x = Smooth().double(), torch.randn(16, 6, dtype=D)
    set_states(m, x, {m.l1: "on"})
    report = measure(m, x)
    assert zero_entropy(report) == {"act"}
    exact = fold(m, x, report, merge="all")
    assert exact.linearised == [] and called(exact, nn.GELU) == 1
    assert events(exact, "skip") == ["act: gelu is never exactly linear (use --approximate to linearise "
                                     "it; the error is then measured)"]
    assert_exact(m, exact, x)
    approx = fold(m, x, report, merge="all", approximate=True)
    assert approx.linearised == ["act"] and len(weighted(approx)) == 1
    assert max_rel(m, approx, x) > 1e-6  # GELU(z) != z: the error is real and measurable


def test_mixed_sites_are_left_alone() -> None:
    m, x = Reused().double(), image()
    set_states(m, x, {m.c1: "mixed", m.c2: "mixed"})
    f = fold(m, x, rewrites=[LINEARISE])
    assert f.linearised == [] and f.events == [] and called(f, nn.ReLU) == 2
