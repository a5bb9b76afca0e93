"""``batchnorm_to_affine``: an eval BatchNorm is the per-channel map w/sqrt(var+eps) * x + (b - mean*a)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kit import D, assert_exact, called, events, fold, image, measure, modules, randomise_bn, zero_entropy
from nepenthe_compress.fold.modules import ChannelAffine
from nepenthe_compress.fold.rewrites.affine import BATCHNORM


class Norms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn, self.plain = nn.BatchNorm2d(4, eps=0.1), nn.BatchNorm2d(4, affine=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.plain(self.bn(x))


def test_batchnorm_becomes_its_affine_map() -> None:
    torch.manual_seed(0)
    m, x = Norms().to(D).eval(), image()
    randomise_bn(m.bn)
    with torch.no_grad():
        m.plain.running_mean.normal_()
        m.plain.running_var.uniform_(0.5, 2.0)
    f = fold(m, x, rewrites=[BATCHNORM])
    assert called(f, nn.BatchNorm2d) == 0
    first, second = modules(f, ChannelAffine)
    bn, plain = m.bn, m.plain
    a = bn.weight / torch.sqrt(bn.running_var + 0.1)  # eps 0.1 matters
    torch.testing.assert_close(first.scale, a.detach(), rtol=1e-15, atol=0)
    torch.testing.assert_close(first.shift, (bn.bias - bn.running_mean * a).detach(), rtol=1e-15, atol=1e-15)
    a2 = 1 / torch.sqrt(plain.running_var + plain.eps)
    torch.testing.assert_close(second.scale, a2, rtol=1e-15, atol=0)
    torch.testing.assert_close(second.shift, -plain.running_mean * a2, rtol=1e-15, atol=1e-15)
    assert first.scale.dtype == D and first.axis == 1
    assert_exact(m, f, x)


class NoStats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 3, 1)
        self.bn = nn.BatchNorm2d(6, track_running_stats=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.c2(F.relu(self.bn(self.c1(x))))


def test_batchnorm_without_running_stats_is_refused_with_a_reason() -> None:
    torch.manual_seed(0)
    m, x = NoStats().to(D), image()
    with torch.no_grad():
        m.bn.bias.fill_(10.0)  # batch-normalised values stay within +-10 on 400 elements: ON
    assert zero_entropy(measure(m, x)) == {"relu"}
    f = fold(m, x, merge="all")
    assert events(f, "skip") == ["bn: BatchNorm without running statistics cannot be folded"]
    assert called(f, nn.BatchNorm2d) == 1 and events(f, "merge") == []
    assert_exact(m, f, x)
