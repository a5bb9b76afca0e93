"""The few modules a folded graph contains besides torch's own (module <-> spec: ``fold.ops``)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class ChannelAffine(nn.Module):
    """y = x * scale + shift, per channel along ``axis`` (a linearised site or an eval BatchNorm).
    ``scale`` and ``shift`` keep the dtype they are given (the model's)."""

    def __init__(self, scale: Tensor, shift: Tensor, axis: int) -> None:
        super().__init__()
        self.axis = axis
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def _view(self, t: Tensor, x: Tensor) -> Tensor:
        axis = self.axis % x.dim()
        shape = [1] * x.dim()
        shape[axis] = -1
        return t.view(shape)

    def forward(self, x: Tensor) -> Tensor:
        return x * self._view(self.scale, x) + self._view(self.shift, x)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}, axis={self.axis}"


class MapConv2d(nn.Conv2d):
    """Conv2d plus a constant ``[Co, Ho, Wo]`` border bias map (exact merges through zero padding)."""

    def __init__(self, *args, bias_map: Tensor, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("bias_map", bias_map.detach().to(self.weight.dtype).clone())

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + self.bias_map


class AddConstant(nn.Module):
    """y = x + value, with a constant ``value`` shaped like one sample (broadcast over the batch)."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x + self.value
