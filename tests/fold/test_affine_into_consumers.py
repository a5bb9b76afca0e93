"""``affine_into_consumers``: a per-channel affine map whose every user is a conv / linear on that
channel axis goes into their weights; through a zero-padded conv its shift becomes a border bias map."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kit import D, assert_exact, called, events, fold, image, measure, modules, randomise_bn, weighted, zero_entropy
from nepenthe_compress.fold.modules import ChannelAffine, MapConv2d
from nepenthe_compress.fold.rewrites.affine import BATCHNORM, INTO_CONSUMERS

RULES = [BATCHNORM, INTO_CONSUMERS]


class InputNorm(nn.Module):
    """BN on the input (no producer to fold into) read by a padded 3x3, an unpadded 3x3 and a 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.a, self.b, self.c = nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(4, 3, 3), nn.Conv2d(4, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(x)
        return torch.cat([self.a(h)[..., 1:-1, 1:-1], self.b(h), self.c(h)[..., 1:-1, 1:-1]], 1)


def test_affine_goes_into_every_consumer_with_a_border_map_only_where_padded() -> None:
    torch.manual_seed(0)
    m, x = InputNorm().to(D).eval(), image()
    randomise_bn(m.bn)
    f = fold(m, x, rewrites=RULES)
    assert called(f, ChannelAffine) == 0
    assert events(f, "fold") == ["bn: into a", "bn: into b", "bn: into c"]
    a, b, c = weighted(f)
    assert type(a) is MapConv2d and tuple(a.bias_map.shape) == (3, 10, 10)
    assert type(b) is nn.Conv2d and type(c) is nn.Conv2d  # unpadded: the shift is a plain bias
    ring = a.bias_map - a.bias_map[:, 1:-1, 1:-1].mean((1, 2), keepdim=True)
    assert ring[:, 1:-1, 1:-1].abs().max() < 1e-12 and ring.abs().max() > 1e-3  # non-zero on the ring only
    assert_exact(m, f, x)


class TwoConsumers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0, self.bn = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.a, self.b = nn.Conv2d(6, 5, 3, padding=1), nn.Conv2d(6, 5, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn(self.c0(x)))
        return torch.cat([self.a(h), self.b(h)], 1)


def test_conv_feeding_two_consumers_is_not_merged_and_stays_exact() -> None:
    torch.manual_seed(0)
    m, x = TwoConsumers().to(D).eval(), image()
    randomise_bn(m.bn)
    with torch.no_grad():
        m.bn.bias.add_(20.0)  # ON: |bn(c0(x))| stays well below 20 on this batch
    assert zero_entropy(measure(m, x)) == {"relu"}
    f = fold(m, x, merge="all")
    assert events(f, "merge") == []
    assert called(f, nn.BatchNorm2d) == 0 and len(weighted(f)) == 3
    assert_exact(m, f, x)


class PoolBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(x)
        return self.conv(F.max_pool2d(h, 2)) + self.conv(h)[..., ::2, ::2]


def test_affine_stays_when_one_user_is_not_a_layer() -> None:
    torch.manual_seed(0)
    m, x = PoolBetween().to(D).eval(), image()
    randomise_bn(m.bn)
    f = fold(m, x, rewrites=RULES)
    assert called(f, ChannelAffine) == 1 and events(f, "fold") == []
    assert_exact(m, f, x)
