"""The few modules a folded graph contains besides torch's own (module <-> spec: ``fold.ops``)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from torch import Tensor, nn

from nepenthe_compress.fold.border import PieceGroup, correct, piece_out


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


class BorderConv2d(nn.Conv2d):
    """Conv2d (plus an optional border bias map) plus the border correction of an exact padded
    KxK -> padded KxK merge (``fold.border``): thin convs over the edge rows, columns and corners
    of x, added to the output's border rows and columns. Exact for inputs of size ``in_hw`` only."""

    def __init__(self, *args, pieces: Sequence[PieceGroup], in_hw: tuple[int, int],
                 bias_map: Tensor | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_hw = tuple(in_hw)
        self.layout = tuple(replace(g, weight=None) for g in pieces)   # geometry; weights are buffers
        for i, g in enumerate(pieces):
            self.register_buffer(f"piece{i}", g.weight.detach().to(self.weight.dtype).clone())
        self.register_buffer("bias_map", None if bias_map is None
                             else bias_map.detach().to(self.weight.dtype).clone())

    def pieces(self) -> list[tuple[Tensor, PieceGroup]]:
        """(weight, geometry) of every piece group."""
        return [(getattr(self, f"piece{i}"), g) for i, g in enumerate(self.layout)]

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.in_hw:
            raise ValueError(f"BorderConv2d was folded for inputs of size {self.in_hw}, "
                             f"not {tuple(x.shape[-2:])}")
        z = super().forward(x)
        return correct(z if self.bias_map is None else z + self.bias_map, x, self.pieces())

    def correction_macs(self) -> int:
        """Multiply-accumulates of the pieces for one sample."""
        return sum(w.shape[0] * math.prod(piece_out(g, w)) * w[0].numel() for w, g in self.pieces())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, in_hw={self.in_hw}, piece_groups={len(self.layout)}"
