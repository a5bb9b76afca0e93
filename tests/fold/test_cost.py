"""The cost hook: ``AnalyticCost`` (MACs + memory term), the ``--merge`` objectives, and a cost model
given to the driver deciding both residual and chain merges."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kit import D, assert_exact, events, fold, image, measure, set_states, weighted
from nepenthe_compress.fold import algebra as A
from nepenthe_compress.fold.cost import DEPTH_WEIGHT, MEMORY_WEIGHT, AnalyticCost, layer_cost, pays, price
from nepenthe_compress.fold.driver import fold_model
from nepenthe_compress.fold.ops import Shape, Spec
from nepenthe_compress.fold.rewriter import FoldOptions


def conv(co: int, ci: int, k: int, groups: int = 1, bias_map: bool = False, **geometry) -> A.ConvSpec:
    spec = A.ConvSpec(torch.zeros(co, ci // groups, k, k), torch.zeros(co), groups=groups, **geometry)
    return spec if not bias_map else A.ConvSpec(spec.weight, spec.bias, spec.stride, spec.padding,
                                                spec.dilation, groups, torch.zeros(co, 1, 1))


def test_analytic_cost_counts_macs_and_outputs() -> None:
    # 3x3 stride 2 pad 1, 8 -> 16 on 10x10: 5x5 outputs per channel
    assert layer_cost(conv(16, 8, 3, stride=(2, 2), padding=(1, 1)), (1, 8, 10, 10)) == \
        16 * 25 * 8 * 9 + MEMORY_WEIGHT * 16 * 25
    # depthwise: one input channel per output; a border bias map is one more add per output
    assert layer_cost(conv(8, 8, 3, groups=8, bias_map=True), (1, 8, 6, 6)) == \
        8 * 16 * 9 + MEMORY_WEIGHT * 8 * 16 + 8 * 16
    # a Linear on (N, T, C) tokens runs once per token
    lin = A.LinearSpec(torch.zeros(5, 7), torch.zeros(5))
    assert layer_cost(lin, (1, 3, 4, 7)) == 12 * 5 * 7 + MEMORY_WEIGHT * 12 * 5
    assert AnalyticCost(memory_weight=0).layer_cost(lin, (1, 7)) == 35


def test_merge_modes_price_layers_differently() -> None:
    big, small = conv(16, 16, 5), conv(16, 16, 3)
    shape = (1, 16, 12, 12)
    cost = AnalyticCost()
    assert price(cost, "auto", big, shape) == layer_cost(big, shape)
    assert price(cost, "all", big, shape) == DEPTH_WEIGHT + layer_cost(big, shape)
    assert not pays(cost, "auto", big, [small], shape)      # one 5x5 costs more than one 3x3
    assert pays(cost, "auto", small, [big], shape)
    assert pays(cost, "all", big, [small, small], shape)    # one layer instead of two always pays
    assert not pays(cost, "all", big, [small], shape)       # same depth: the cheaper wins


class FlatCost:
    """Every layer costs the same: merging always pays, like ``--merge all`` under ``auto``."""

    def __init__(self) -> None:
        self.calls = 0

    def layer_cost(self, spec: Spec, in_shape: Shape) -> float:
        self.calls += 1
        return 1.0


class Block(nn.Module):
    """depthwise 3x3 + 1x1 shortcut, then 3x3 -> 3x3 (64 channels, unpadded, ReLU always ON)."""

    def __init__(self) -> None:
        super().__init__()
        self.dw, self.pw = nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.Conv2d(64, 64, 1)
        self.a, self.b = nn.Conv2d(64, 64, 3), nn.Conv2d(64, 64, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(F.relu(self.a(self.dw(x) + self.pw(x))))


def test_the_drivers_cost_model_decides_residual_and_chain_merges() -> None:
    torch.manual_seed(0)
    m, x = Block().double(), image(64, 16)
    set_states(m, x, {m.a: "on"})
    report = measure(m, x)
    analytic = fold(m, x, report, merge="auto")
    assert len(weighted(analytic)) == 4  # both merges cost more MACs than they save
    assert events(analytic, "skip") == ["add: residual merge: cost model predicts no gain",
                                        "b: merge with a skipped: cost model predicts no gain"]
    flat = FlatCost()
    priced = fold_model(m, report, x[:2], FoldOptions(merge="auto"), cost=flat)
    assert len(weighted(priced)) == 1 and flat.calls > 0
    assert_exact(m, priced, x)
