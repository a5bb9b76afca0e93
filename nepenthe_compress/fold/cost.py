"""Cost model for merge decisions (``--merge auto``): multiply-accumulates plus a per-output-element
memory term. Merging is not always faster (DESIGN 4.2): two 3x3 convs merged into a 5x5 cost more
MACs than they save; a linear MobileNetV2 block or a transformer MLP cost far fewer."""
from __future__ import annotations

import torch

from nepenthe_compress.fold.algebra import ConvSpec, LinearSpec

# Cost of writing + reading one output element, in MAC-equivalents (memory-bound CPU kernels).
MEMORY_WEIGHT = 8.0


def layer_cost(spec: ConvSpec | LinearSpec, in_shape: torch.Size | tuple[int, ...]) -> float:
    """Estimated cost of running ``spec`` on one sample whose input has shape ``in_shape``
    (batch axis included and ignored)."""
    if isinstance(spec, ConvSpec):
        ho, wo = spec.out_size(tuple(in_shape[-2:]))
        co, ci_g, kh, kw = spec.weight.shape
        outputs = co * ho * wo
        macs = outputs * ci_g * kh * kw
        extra = outputs if spec.bias_map is not None else 0  # the map is one more add
    else:
        rows = 1
        for d in in_shape[1:-1]:
            rows *= int(d)
        outputs = rows * spec.weight.shape[0]
        macs = outputs * spec.weight.shape[1]
        extra = 0
    return float(macs + MEMORY_WEIGHT * outputs + extra)


def depth_cost(spec: ConvSpec | LinearSpec, in_shape: torch.Size | tuple[int, ...]) -> float:
    """``--merge all``: every layer costs the same huge amount, so fewer layers always win; MACs
    only break ties."""
    return 1e15 + layer_cost(spec, in_shape)


COST_MODELS = {"auto": layer_cost, "all": depth_cost}
