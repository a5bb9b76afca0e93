"""``parallel_add``: layer(x) + x and layer1(x) + layer2(x) on one input become one layer when the
taps align and the cost model (``--merge auto``) or depth (``all``) says so."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kit import D, assert_exact, events, fold, image, measure, randomise_bn, set_states, weighted, zero_entropy
from nepenthe_compress.fold.rewrites.residual import PARALLEL_ADD


class Residual(nn.Module):
    """conv(x) + x, or conv(x) + shortcut(x)."""

    def __init__(self, conv: nn.Conv2d, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.conv, self.shortcut = conv, shortcut

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + (x if self.shortcut is None else self.shortcut(x))


def test_identity_joins_the_centre_tap() -> None:
    torch.manual_seed(0)
    m, x = Residual(nn.Conv2d(4, 4, 3, padding=1)).to(D), image()
    f = fold(m, x, rewrites=[PARALLEL_ADD], merge="all")
    (merged,) = weighted(f)
    assert events(f, "merge") == ["conv + identity: residual branches summed into one layer"]
    torch.testing.assert_close(merged.weight[:, :, 1, 1], m.conv.weight[:, :, 1, 1] + torch.eye(4, dtype=D))
    assert_exact(m, f, x)


def test_parallel_convs_of_different_sizes_share_one_frame() -> None:
    """3x3 pad 1 + 1x1 pad 0 (both stride 2): the 1x1 goes to the 3x3's centre tap."""
    torch.manual_seed(0)
    m = Residual(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Conv2d(4, 6, 1, stride=2)).to(D)
    x = image(hw=11)
    f = fold(m, x, rewrites=[PARALLEL_ADD], merge="auto")
    (merged,) = weighted(f)
    assert merged.kernel_size == (3, 3) and merged.stride == (2, 2)
    assert_exact(m, f, x)


def test_misaligned_branches_are_refused_with_the_reason() -> None:
    torch.manual_seed(0)
    m = Residual(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1)).to(D)
    x = image()
    with torch.no_grad():
        m.shortcut.stride = (1, 1)  # same output size, but a dilated 3x3 would be needed: refuse
        m.shortcut.dilation, m.shortcut.padding = (2, 2), (2, 2)
    f = fold(m, x, rewrites=[PARALLEL_ADD], merge="all")
    assert len(weighted(f)) == 2 and events(f, "merge") == []
    assert events(f, "skip") == ["add: residual merge: misaligned branches: 3x3 (padding (1, 1), dilation "
                                 "(1, 1)) and 3x3 (padding (2, 2), dilation (2, 2)) share no tap grid"]
    assert_exact(m, f, x)


def test_auto_refuses_a_merge_that_costs_more() -> None:
    """A depthwise 3x3 plus a dense 1x1: merged, the 3x3 is dense (9x the 1x1's MACs)."""
    torch.manual_seed(0)
    m = Residual(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 16, 1)).to(D)
    x = image(16)
    auto = fold(m, x, rewrites=[PARALLEL_ADD], merge="auto")
    assert len(weighted(auto)) == 2
    assert events(auto, "skip") == ["add: residual merge: cost model predicts no gain"]
    every = fold(m, x, rewrites=[PARALLEL_ADD], merge="all")
    assert len(weighted(every)) == 1
    assert_exact(m, every, x)
    assert fold(m, x, merge="none").count("merge") == 0


class Bottleneck(nn.Module):
    """1x1 -> BN -> ReLU -> 3x3 stride 2 -> BN -> ReLU -> 1x1 -> BN, plus a 1x1 stride-2 (+BN)
    downsample shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c3, self.b3 = nn.Conv2d(4, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.ds, self.bd = nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.b1(self.c1(x)))
        h = F.relu(self.b2(self.c2(h)))
        return self.b3(self.c3(h)) + self.bd(self.ds(x))


def test_downsample_shortcut_is_absorbed() -> None:
    torch.manual_seed(0)
    m, x = Bottleneck().to(D).eval(), image(8, 12)
    randomise_bn(m.b1, m.b2, m.b3, m.bd)
    with torch.no_grad():
        m.b1.bias.add_(20.0)
        m.b2.bias.add_(20.0)
    assert zero_entropy(measure(m, x)) == {"relu", "relu_1"}
    f = fold(m, x, merge="all")
    (merged,) = weighted(f)
    assert merged.stride == (2, 2) and merged.kernel_size == (3, 3)
    assert any("ds" in s for s in events(f, "merge"))
    assert_exact(m, f, x)


class TwoBlocks(nn.Module):
    """A stride-2 block with a 1x1 stride-2 shortcut, then an identity block of two 1x1 convs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 16, 3, 2, 1), nn.Conv2d(16, 16, 1)
        self.ds = nn.Conv2d(8, 16, 1, 2)
        self.d1, self.d2 = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.c3(F.relu(self.c2(F.relu(self.c1(x))))) + self.ds(x)
        return self.d2(F.relu(self.d1(y))) + y


def test_linear_blocks_after_a_strided_residual_merge_fold_to_one_conv() -> None:
    """Everything is linear: (d2 d1 + I)(c3 c2 c1 + ds)(x) is one 3x3 stride-2 conv (the identity
    block is 1x1 -> 1x1 + identity: an unpadded 1x1 after the 3x3, exact). Regression: the merged
    stride-2 conv once carried its input's shape and the replaced branch stayed as a dead user."""
    torch.manual_seed(0)
    m, x = TwoBlocks().double(), image(8, 16)
    set_states(m, x, {m.c1: "on", m.c2: "on", m.d1: "on"})
    report = measure(m, x)
    assert len(zero_entropy(report)) == 3
    f = fold(m, x, report, merge="all")
    assert_exact(m, f, x)
    assert len(weighted(f)) == 1


class LinearTwins(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) + self.b(x)


def test_parallel_linears_sum() -> None:
    torch.manual_seed(0)
    m, x = LinearTwins().double(), torch.randn(3, 4, 6, dtype=D)
    f = fold(m, x, rewrites=[PARALLEL_ADD])
    (merged,) = weighted(f)
    torch.testing.assert_close(merged.weight, (m.a.weight + m.b.weight).detach(), rtol=0, atol=1e-15)
    assert_exact(m, f, x)
