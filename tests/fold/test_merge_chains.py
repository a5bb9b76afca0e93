"""``merge_chains``: runs of same-kind layers linked by single-use edges are partitioned into merged
segments by a dynamic programme over their prices; inexact and unsupported merges are reported."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kit import (D, assert_exact, called, events, fold, image, max_rel, measure, randomise_bn, set_states,
                 weighted, zero_entropy)
from nepenthe_compress.fold.rewrites.chains import MERGE_CHAINS
from test_affine_into_producer import Transposed


class Chain(nn.Module):
    """Layers separated by ReLUs (``layers`` given)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for i, c in enumerate(self.layers):
            x = c(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def all_on(*convs: nn.Module, c: int = 8, hw: int = 12, **options):
    """The chain with every ReLU ON, folded (merge='all' unless given)."""
    torch.manual_seed(0)
    m = Chain(*convs).double()
    x = image(c, hw) if isinstance(convs[0], nn.Conv2d) else torch.randn(4, 5, c, dtype=D)
    set_states(m, x, {layer: "on" for layer in m.layers[:-1]})
    report = measure(m, x)
    assert len(zero_entropy(report)) == len(convs) - 1
    return m, x, fold(m, x, report, **({"merge": "all"} | options))


def test_grouped_and_depthwise_chain_merges_and_regroups() -> None:
    """1x1 (2 groups) -> depthwise 3x3 -> 1x1 (4 groups): output group k reads mid channels
    4k..4k+3, all from input group k // 2, so the merged conv is block-diagonal with 2 groups."""
    m, x, f = all_on(nn.Conv2d(8, 16, 1, groups=2), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                     nn.Conv2d(16, 8, 1, groups=4))
    (merged,) = weighted(f)
    assert merged.groups == 2 and merged.kernel_size == (3, 3)
    assert events(f, "merge") == ["layers.0 -> layers.1 -> layers.2: 3 layers -> 1"]
    assert_exact(m, f, x)


def test_dilated_chain_merges() -> None:
    """3x3 dilation 2 -> 3x3 dilation 1 (both unpadded): extent (3-1)*2 + (3-1) + 1 = 7."""
    m, x, f = all_on(nn.Conv2d(8, 8, 3, dilation=2), nn.Conv2d(8, 4, 3))
    (merged,) = weighted(f)
    assert merged.kernel_size == (7, 7) and merged.stride == (1, 1)
    assert_exact(m, f, x)


def test_one_by_one_into_dilated_padded_conv_merges_with_a_border_map() -> None:
    m, x, f = all_on(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 3, padding=2, dilation=2))
    (merged,) = weighted(f)
    assert merged.kernel_size == (3, 3) and merged.dilation == (2, 2)
    assert_exact(m, f, x)


def test_stride_two_then_stride_one_merges() -> None:
    """3x3 stride 2 -> 3x3 stride 1 (unpadded): stride 2, extent (3-1) + (3-1)*2 + 1 = 7."""
    m, x, f = all_on(nn.Conv2d(8, 8, 3, stride=2), nn.Conv2d(8, 4, 3), hw=15)
    (merged,) = weighted(f)
    assert merged.kernel_size == (7, 7) and merged.stride == (2, 2)
    assert_exact(m, f, x)


def test_linear_chain_merges_into_one_linear() -> None:
    m, x, f = all_on(nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 3), merge="auto")
    (merged,) = weighted(f)
    assert (merged.in_features, merged.out_features) == (8, 3)
    assert_exact(m, f, x)


def test_auto_partitions_a_chain_by_cost() -> None:
    """1x1 8->64 -> 3x3 64->64 -> 1x1 64->8 (unpadded): merged whole, the 3x3 would read 8 channels
    instead of 64 (far cheaper): one layer. A 3x3 -> 3x3 of 64 channels is refused (the 5x5 costs
    more), and the report says so; 'all' makes it anyway."""
    m, x, f = all_on(nn.Conv2d(8, 64, 1), nn.Conv2d(64, 64, 3), nn.Conv2d(64, 8, 1), merge="auto")
    assert len(weighted(f)) == 1
    assert_exact(m, f, x)
    m, x, f = all_on(nn.Conv2d(64, 64, 3), nn.Conv2d(64, 64, 3), c=64, merge="auto")
    assert len(weighted(f)) == 2
    assert events(f, "skip") == ["layers.1: merge with layers.0 skipped: cost model predicts no gain"]
    _, _, every = all_on(nn.Conv2d(64, 64, 3), nn.Conv2d(64, 64, 3), c=64, merge="all")
    assert len(weighted(every)) == 1


def test_padded_pair_merges_exactly_with_a_border_correction() -> None:
    """3x3 pad 1 -> 3x3 pad 1: one layer, exact (fold.border; tests/fold/test_border_merge.py)."""
    torch.manual_seed(0)
    m, x = Chain(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)).double(), image(8)
    set_states(m, x, {m.layers[0]: "on"})
    merged = fold(m, x, merge="all")
    assert len(weighted(merged)) == 1
    assert events(merged, "merge") == ["layers.0 -> layers.1: 2 layers -> 1 (exact with a border correction: "
                                       "8 edge/corner convs in parallel)"]
    assert_exact(m, merged, x)


def test_three_padded_convs_merge_pairwise_and_border_inexact_only_when_allowed() -> None:
    torch.manual_seed(0)
    m = Chain(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)).double()
    x = image(8)
    set_states(m, x, {m.layers[0]: "on", m.layers[1]: "on"})
    report = measure(m, x)
    pairwise = fold(m, x, report, merge="all")
    assert len(weighted(pairwise)) == 2 and len(events(pairwise, "merge")) == 1
    assert_exact(m, pairwise, x)
    merged = fold(m, x, report, merge="all", allow_inexact=True)
    assert len(weighted(merged)) == 1
    assert any("BORDER-INEXACT" in s for s in events(merged, "merge"))
    assert max_rel(m, merged, x) > 1e-3
    with torch.no_grad():  # the error is confined to the border ring (3 pixels: three padded 3x3s)
        inner = (m(x) - merged.model(x))[..., 3:-3, 3:-3]
    assert inner.abs().max() <= 1e-10 * m(x).abs().max()


def test_merge_none_folds_and_linearises_but_never_merges() -> None:
    torch.manual_seed(0)
    m, x = Chain(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)).double(), image(8)
    set_states(m, x, {m.layers[0]: "on", m.layers[1]: "on"})
    f = fold(m, x, merge="none")
    assert len(f.linearised) == 2
    assert f.count("merge") == 0 and len(weighted(f)) == 3
    assert_exact(m, f, x)


def test_only_single_use_edges_chain() -> None:
    """c0's output is also read by the residual add: c0 -> c1 is no chain."""
    class Forked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c0, self.c1 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x: Tensor) -> Tensor:
            y = self.c0(x)
            return self.c1(y) * y

    torch.manual_seed(0)
    m, x = Forked().double(), image()
    f = fold(m, x, rewrites=[MERGE_CHAINS], merge="all")
    assert len(weighted(f)) == 2 and f.events == []


def test_conv_transpose_next_to_a_conv_is_refused_with_a_reason() -> None:
    """ConvTranspose -> 1x1 conv with the ReLU always ON: the chain is not merged, and the report
    says why instead of skipping it silently."""
    torch.manual_seed(0)
    m, x = Transposed().to(D).eval(), image()
    randomise_bn(m.bn)
    with torch.no_grad():
        m.bn.bias += 100.0  # ReLU always ON: up -> bn -> c is a linear chain
    f = fold(m, x, merge="all")
    assert zero_entropy(measure(m, x)) == {"relu"}
    assert events(f, "skip") == ["up: ConvTranspose merges are not supported (its BatchNorm is still folded)"]
    assert called(f, nn.ConvTranspose2d) == 1 and called(f, nn.Conv2d) == 1
    assert_exact(m, f, x)


class ReflectChain(nn.Module):
    """conv (reflect padding) -> BN -> ReLU (always ON) -> 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
        self.bn, self.b = nn.BatchNorm2d(6), nn.Conv2d(6, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(F.relu(self.bn(self.a(x))))


def test_non_zero_padding_modes_are_not_merged_and_say_why() -> None:
    torch.manual_seed(0)
    m, x = ReflectChain().to(D), image()
    randomise_bn(m.bn)
    with torch.no_grad():
        m.bn.bias += 100.0
    assert zero_entropy(measure(m, x)) == {"relu"}
    f = fold(m, x, merge="all")
    assert "a: merges of Conv2d with padding_mode='reflect' are not supported" in events(f, "skip")
    assert events(f, "merge") == [] and called(f, nn.Conv2d) == 2
    assert_exact(m, f, x)
