"""The few modules a folded graph contains besides torch's own, and module <-> spec conversion."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from nepenthe_compress.fold.algebra import ConvSpec, LinearSpec


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


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_spec(m: nn.Conv2d, dtype: torch.dtype = torch.float64) -> ConvSpec:
    """ConvSpec of a Conv2d / MapConv2d, in ``dtype``."""
    w = m.weight.detach().to(dtype)
    b = m.bias.detach().to(dtype) if m.bias is not None else torch.zeros(w.shape[0], dtype=dtype)
    bias_map = getattr(m, "bias_map", None)
    return ConvSpec(w, b, _pair(m.stride), _pair(m.padding), _pair(m.dilation), m.groups,
                    None if bias_map is None else bias_map.detach().to(dtype))


def conv_module(spec: ConvSpec, like: nn.Conv2d) -> nn.Conv2d:
    """A Conv2d (MapConv2d when the spec has a bias map) holding ``spec`` in ``like``'s dtype/device."""
    co, ci_g, kh, kw = spec.weight.shape
    kwargs = dict(in_channels=ci_g * spec.groups, out_channels=co, kernel_size=(kh, kw),
                  stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
                  groups=spec.groups, bias=True, padding_mode="zeros",
                  device=like.weight.device, dtype=like.weight.dtype)
    m = (MapConv2d(**kwargs, bias_map=spec.bias_map) if spec.bias_map is not None
         else nn.Conv2d(**kwargs))
    with torch.no_grad():
        m.weight.copy_(spec.weight)
        m.bias.copy_(spec.bias)
    return m


def linear_spec(m: nn.Linear, dtype: torch.dtype = torch.float64) -> LinearSpec:
    w = m.weight.detach().to(dtype)
    b = m.bias.detach().to(dtype) if m.bias is not None else torch.zeros(w.shape[0], dtype=dtype)
    return LinearSpec(w, b)


def linear_module(spec: LinearSpec, like: nn.Linear) -> nn.Linear:
    out_f, in_f = spec.weight.shape
    m = nn.Linear(in_f, out_f, bias=True, device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        m.weight.copy_(spec.weight)
        m.bias.copy_(spec.bias)
    return m


class AddConstant(nn.Module):
    """y = x + value, with a constant ``value`` shaped like one sample (broadcast over the batch)."""

    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.register_buffer("value", value.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x + self.value
