"""``affine_into_producer``: conv / linear / conv-transpose followed by a per-channel affine map (a
folded BatchNorm, a linearised site) on its channel axis: the map scales the layer's outputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kit import D, assert_exact, called, events, fold, image, modules, randomise_bn, weighted
from nepenthe_compress.fold.modules import ChannelAffine
from nepenthe_compress.fold.rewrites.affine import BATCHNORM, INTO_PRODUCER

RULES = [BATCHNORM, INTO_PRODUCER]


class ConvLinearBN(nn.Module):
    """grouped strided conv -> BN (-> flatten) -> Linear -> BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(6)
        self.fc, self.bn1 = nn.Linear(6 * 25, 5), nn.BatchNorm1d(5)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn1(self.fc(torch.flatten(self.bn(self.conv(x)), 1)))


def test_conv_and_linear_absorb_their_batchnorm() -> None:
    torch.manual_seed(0)
    m, x = ConvLinearBN().to(D).eval(), image()
    randomise_bn(m.bn, m.bn1)
    f = fold(m, x, rewrites=RULES)
    assert modules(f, (ChannelAffine, nn.BatchNorm2d, nn.BatchNorm1d)) == []
    assert events(f, "fold") == ["bn: into conv", "bn1: into fc"]
    conv, fc = weighted(f)
    assert conv.groups == 2 and conv.stride == (2, 2)
    assert_exact(m, f, x)


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.bn, self.c = nn.BatchNorm2d(6), nn.Conv2d(6, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(F.relu(self.bn(self.up(x))))


def test_conv_transpose_then_batchnorm_is_folded() -> None:
    torch.manual_seed(0)
    m, x = Transposed().to(D).eval(), image()
    randomise_bn(m.bn)
    f = fold(m, x)
    assert events(f, "fold") == ["bn: into up"]
    assert called(f, nn.BatchNorm2d) == 0 and called(f, nn.ConvTranspose2d) == 1
    (up,) = modules(f, nn.ConvTranspose2d)
    assert (up.stride, up.padding, up.output_padding, up.groups) == ((2, 2), (1, 1), (1, 1), 2)
    assert_exact(m, f, x)


class SharedOutput(nn.Module):
    """The conv's output is read by its BN and by the residual add: the BN cannot go into it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class TokensBN(nn.Module):
    """Linear on (N, T, C) tokens followed by a BatchNorm1d over T: another axis than the Linear's."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(5)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.fc(x))


def test_affine_stays_when_the_producer_has_other_users_or_another_channel_axis() -> None:
    torch.manual_seed(0)
    for m, x in ((SharedOutput(), image()), (TokensBN(), torch.randn(3, 5, 6, dtype=D))):
        m = m.to(D).eval()
        randomise_bn(m.bn)
        f = fold(m, x, rewrites=RULES)
        assert called(f, ChannelAffine) == 1 and events(f, "fold") == []
        assert_exact(m, f, x)
