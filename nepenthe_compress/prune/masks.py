"""Explicit weight masks: ``weight * mask``, re-applied after every optimizer step (docs/DESIGN.md 3).

A mask set maps a parameter name (``"layer1.0.conv1.weight"``) to a bool tensor of its shape;
True keeps the weight. Pruned weights are exactly zero after every step, whatever the optimizer
(momentum, weight decay) does to them in between.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

Masks = dict[str, Tensor]


def weight_name(layer: str) -> str:
    """The masked parameter of a weighted layer."""
    return f"{layer}.weight"


def full_masks(model: nn.Module, layers: Iterable[str]) -> Masks:
    """All-True masks for the weights of ``layers`` (module names)."""
    params = dict(model.named_parameters())
    return {weight_name(layer): torch.ones_like(params[weight_name(layer)], dtype=torch.bool) for layer in layers}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Zero every masked-out weight in place."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        p = params[name]
        p.mul_(mask.to(p.device))


def attach_masks(optimizer: torch.optim.Optimizer, model: nn.Module,
                 masks: Mapping[str, Tensor]) -> RemovableHandle:
    """Re-apply ``masks`` after every ``optimizer.step()``; returns the hook handle."""
    return optimizer.register_step_post_hook(lambda *_: apply_masks(model, masks))


def sparsity(masks: Mapping[str, Tensor]) -> float:
    """Fraction of masked-out weights over all masked parameters (0.0 without masks)."""
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total if total else 0.0


def layer_sparsity(masks: Mapping[str, Tensor]) -> dict[str, float]:
    return {name: 1.0 - float(m.float().mean()) for name, m in masks.items()}


def surviving(model: nn.Module, masks: Mapping[str, Tensor], name: str) -> np.ndarray:
    """|weights| that survive in parameter ``name``, float64, flat order."""
    p = dict(model.named_parameters())[name].detach()
    return p.abs().flatten()[masks[name].flatten().to(p.device)].double().cpu().numpy()


def prune_smallest(weight: Tensor, mask: Tensor, k: int) -> Tensor:
    """New mask without the ``k`` smallest-magnitude surviving weights (ties: earliest first)."""
    if k <= 0:
        return mask.clone()
    flat_mask = mask.flatten().to(weight.device)
    score = weight.detach().abs().flatten().double().masked_fill(~flat_mask, float("inf"))
    order = torch.sort(score, stable=True).indices[:k]
    out = flat_mask.clone()
    out[order] = False
    return out.view_as(mask).to(mask.device)
