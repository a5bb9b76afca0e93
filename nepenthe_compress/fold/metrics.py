"""Multiply-accumulate counts of a traced model (conv and linear layers, border corrections
included) for one input sample."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from nepenthe_compress.fold.modules import BorderConv2d
from nepenthe_compress.trace import propagate_shapes, shape_of, trace_model


def count_macs(model: nn.Module, example: Tensor) -> int:
    """MACs of every Conv/ConvTranspose/Linear call for a single sample of ``example``'s shape."""
    gm = model if isinstance(model, torch.fx.GraphModule) else trace_model(model)
    propagate_shapes(gm, example[:1])
    total = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        out = shape_of(node)
        if out is None:
            continue
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            inp = shape_of(node.args[0])
            total += inp[1:].numel() * m.weight[0].numel()
        elif isinstance(m, nn.modules.conv._ConvNd):
            total += out[1:].numel() * m.weight[0].numel()
            if isinstance(m, BorderConv2d):
                total += m.correction_macs()
        elif isinstance(m, nn.Linear):
            total += out[1:].numel() * m.in_features
    return int(total)
