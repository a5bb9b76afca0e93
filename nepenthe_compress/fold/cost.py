"""Cost models for merge decisions, and the one place a merge is priced (``price``).

A cost model is any object with ``layer_cost(spec, in_shape) -> float``: the estimated cost of
running one layer spec on one sample whose input has shape ``in_shape`` (batch axis included and
ignored). The fold driver takes one as a parameter; the default ``AnalyticCost`` counts
multiply-accumulates plus a per-output-element memory term. Merging is not always faster
(docs/DESIGN.md 4.2): two 3x3 convs merged into a 5x5 cost more MACs than they save; a linear
MobileNetV2 block or a transformer MLP cost far fewer.

``price`` turns a cost model into the objective of a ``--merge`` mode: ``auto`` minimises the
model's cost; ``all`` makes every layer cost the same huge amount, so fewer layers always win and
the cost model only breaks ties. Every merge rewrite (residual branches, chains) compares prices.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from nepenthe_compress.fold.ops import Shape, Spec, kind_of_spec

# Cost of writing + reading one output element, in MAC-equivalents (memory-bound CPU kernels).
MEMORY_WEIGHT = 8.0
DEPTH_WEIGHT = 1e15   # ``--merge all``: the price of one layer, whatever it computes


class CostModel(Protocol):
    def layer_cost(self, spec: Spec, in_shape: Shape) -> float: ...


@dataclass(frozen=True)
class AnalyticCost:
    """MACs + ``memory_weight`` x output elements (+ one add per output for a border bias map)."""

    memory_weight: float = MEMORY_WEIGHT

    def layer_cost(self, spec: Spec, in_shape: Shape) -> float:
        outputs, macs, extra = kind_of_spec(spec).work(spec, in_shape)
        return float(macs + self.memory_weight * outputs + extra)


def layer_cost(spec: Spec, in_shape: Shape) -> float:
    """The default model's cost of one layer."""
    return AnalyticCost().layer_cost(spec, in_shape)


def price(cost: CostModel, merge: str, spec: Spec, in_shape: Shape) -> float:
    """What one layer costs under ``--merge`` mode ``merge`` (``auto`` or ``all``)."""
    base = cost.layer_cost(spec, in_shape)
    return DEPTH_WEIGHT + base if merge == "all" else base


def pays(cost: CostModel, merge: str, merged: Spec, parts: Sequence[Spec], in_shape: Shape) -> bool:
    """Whether one ``merged`` layer is no dearer than the ``parts`` it replaces (same input)."""
    return price(cost, merge, merged, in_shape) <= sum(price(cost, merge, p, in_shape) for p in parts)
