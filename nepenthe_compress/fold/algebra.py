"""Pure weight algebra of the fold pass (docs/DESIGN.md 4.1-4.2). No graphs here: tensors in, tensors out.

A 2-D convolution with an additive term is described by ``ConvSpec``::

    y = conv2d(x, weight, None, stride, padding, dilation, groups) + bias[:, None, None] (+ bias_map)

``bias_map`` (``[Co, Ho, Wo]`` or None) is the position-dependent constant that exact merges through
zero padding need ("border bias map", valid only for the input size it was computed for).
Linear layers: ``LinearSpec``: ``y = x @ weight.T + bias`` on the last axis.

Every function works in the dtype of its inputs (tests use float64) and never mutates its inputs.
A merge that is not exact raises ``NotExact(reason)`` unless the caller opts in (``allow_inexact``).

Conv composition geometry, per spatial dim: output o of B reads A-outputs ``o*sB - pB + kb*dB``; an
A-output q reads x at ``q*sA - pA + ka*dA``; so B(A(x)) reads x at
``o*sA*sB - (pB*sA + pA) + kb*dB*sA + ka*dA``. Weight exactness (size-independent, proven per dim):
either B has no padding, or every A-output in B's zero ring reads only x's zero ring, which holds for
all input sizes iff ``pA >= (kA-1)*dA`` (e.g. A is 1x1).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from math import gcd

import torch
import torch.nn.functional as F
from torch import Tensor

Pair = tuple[int, int]


class NotExact(Exception):
    """The requested merge is not exact (or not supported); ``str(e)`` is the reason."""


class BorderInexact(NotExact):
    """Both convs spatial and the second zero-padded: exact only away from the border ring."""


@dataclass(frozen=True)
class ConvSpec:
    weight: Tensor                      # [Co, Ci/groups, kH, kW]
    bias: Tensor                        # [Co]
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    groups: int = 1
    bias_map: Tensor | None = None      # [Co, Ho, Wo] or None

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel_size(self) -> Pair:
        return (self.weight.shape[2], self.weight.shape[3])

    def out_size(self, in_hw: Pair) -> Pair:
        """Spatial output size for a spatial input size (torch's formula)."""
        h, w = (_out_len(n, k, s, p, d) for n, k, s, p, d in
                zip(in_hw, self.kernel_size, self.stride, self.padding, self.dilation))
        return (h, w)

    def forward(self, x: Tensor) -> Tensor:
        """Reference application (F.conv2d + bias + bias_map)."""
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return y if self.bias_map is None else y + self.bias_map


@dataclass(frozen=True)
class ConvTransposeSpec:
    weight: Tensor                      # [Ci, Co/groups, kH, kW]
    bias: Tensor                        # [Co]
    groups: int = 1
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    output_padding: Pair = (0, 0)
    dilation: Pair = (1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Reference application (F.conv_transpose2d)."""
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding,
                                  self.output_padding, self.groups, self.dilation)


@dataclass(frozen=True)
class LinearSpec:
    weight: Tensor                      # [out, in]
    bias: Tensor                        # [out]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def _out_len(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _kxk(k: Pair) -> str:
    return f"{k[0]}x{k[1]}"


# ---- activation / normalisation as per-channel affine maps ----------------------------------------

def batchnorm_affine(running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
                     bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as y = a*x + c per channel: a = w/sqrt(var+eps), c = b - mean*a."""
    a = torch.rsqrt(running_var + eps)
    if weight is not None:
        a = a * weight
    c = -running_mean * a
    return a, (c if bias is None else c + bias)


# ---- affine after a weighted layer (always exact) -------------------------------------------------

def conv_then_affine(conv: ConvSpec, a: Tensor, c: Tensor) -> ConvSpec:
    """affine(conv(x)) as one conv: scale output channel o by a[o], bias*a + c, bias_map*a."""
    bias_map = None if conv.bias_map is None else conv.bias_map * a[:, None, None]
    return replace(conv, weight=conv.weight * a[:, None, None, None], bias=conv.bias * a + c,
                   bias_map=bias_map)


def conv_transpose_then_affine(conv: ConvTransposeSpec, a: Tensor, c: Tensor) -> ConvTransposeSpec:
    """Same for ConvTranspose2d, whose weight is [Ci, Co/groups, kH, kW]."""
    ci, cog = conv.weight.shape[:2]
    g = conv.groups
    scale = a.reshape(g, 1, cog).expand(g, ci // g, cog).reshape(ci, cog)
    return replace(conv, weight=conv.weight * scale[:, :, None, None], bias=conv.bias * a + c)


def linear_then_affine(lin: LinearSpec, a: Tensor, c: Tensor) -> LinearSpec:
    return LinearSpec(lin.weight * a[:, None], lin.bias * a + c)


# ---- affine before a weighted layer --------------------------------------------------------------

def affine_then_linear(a: Tensor, c: Tensor, lin: LinearSpec) -> LinearSpec:
    """lin(a*x + c): W' = W * a[None, :], b' = b + W @ c. Exact."""
    return LinearSpec(lin.weight * a[None, :], lin.bias + lin.weight @ c)


def affine_then_conv(a: Tensor, c: Tensor, conv: ConvSpec, in_hw: Pair) -> ConvSpec:
    """conv(a*x + c) with x of spatial size in_hw. W' = W * a (per input channel).

    The constant c enters as sum W*c: a per-channel bias if padding is 0, otherwise a bias_map
    computed exactly as conv2d(c broadcast to [1, Ci, H, W], W, zero padding) (constant where the
    kernel sees no padding, different on the border ring). Result is always exact for that in_hw.
    An all-zero c adds nothing (no map).
    """
    _check_map(conv, in_hw)
    co, cig = conv.weight.shape[:2]
    g = conv.groups
    scale = a.reshape(g, 1, cig).expand(g, co // g, cig).reshape(co, cig)
    scaled = replace(conv, weight=conv.weight * scale[:, :, None, None])
    return _plus(scaled, additive_through_conv(c, conv, in_hw))


def additive_through_conv(term: Tensor, conv: ConvSpec, in_hw: Pair | None = None) -> Tensor:
    """Push an additive input term (``[Ci]`` per channel or ``[Ci, H, W]`` map) through ``conv``'s
    weights (no bias, zero padding): returns ``[Co]`` when the result is spatially constant
    (padding 0 and a per-channel term, or an all-zero term), else the ``[Co, Ho, Wo]`` map.
    A per-channel term through a padded conv needs the input size ``in_hw``."""
    if not term.any():
        return term.new_zeros(conv.out_channels)
    if term.dim() == 1 and not any(conv.padding):
        co, cig = conv.weight.shape[:2]
        g = conv.groups
        wsum = conv.weight.sum((2, 3)).reshape(g, co // g, cig)
        return torch.einsum("goc,gc->go", wsum, term.reshape(g, cig)).reshape(co)
    if term.dim() == 1:
        if in_hw is None:
            raise ValueError("a per-channel term through a padded conv needs in_hw")
        term = term[:, None, None].expand(-1, *in_hw)
    return F.conv2d(term[None], conv.weight, None, conv.stride, conv.padding, conv.dilation,
                    conv.groups)[0]


def _additive(conv: ConvSpec) -> Tensor:
    """The whole additive term of ``conv``: ``[Co]`` or ``[Co, Ho, Wo]``."""
    return conv.bias if conv.bias_map is None else conv.bias[:, None, None] + conv.bias_map


def _plus(conv: ConvSpec, extra: Tensor) -> ConvSpec:
    """``conv`` with ``extra`` (``[Co]`` or ``[Co, Ho, Wo]``) added to its output."""
    if extra.dim() == 1:
        return replace(conv, bias=conv.bias + extra)
    return replace(conv, bias_map=extra if conv.bias_map is None else conv.bias_map + extra)


def _check_map(conv: ConvSpec, in_hw: Pair) -> None:
    if conv.bias_map is not None and tuple(conv.bias_map.shape[1:]) != conv.out_size(in_hw):
        raise ValueError(f"bias_map of size {tuple(conv.bias_map.shape[1:])} does not fit input "
                         f"size {tuple(in_hw)} (output {conv.out_size(in_hw)})")


# ---- groups --------------------------------------------------------------------------------------

def _coarsen(weight: Tensor, groups: int, g0: int) -> Tensor:
    """Weight with ``groups`` groups -> the same conv written with ``g0`` groups (g0 | groups),
    block-diagonal inside each of the g0 groups."""
    if groups == g0:
        return weight
    co, cig, kh, kw = weight.shape
    r = groups // g0
    blocks = weight.new_zeros(g0, r, co // groups, r, cig, kh, kw)
    blocks.diagonal(0, 1, 3).copy_(weight.reshape(g0, r, co // groups, cig, kh, kw).movedim(1, -1))
    return blocks.reshape(co, r * cig, kh, kw)


def _refine(weight: Tensor, g0: int) -> tuple[Tensor, int]:
    """Weight with ``g0`` groups -> the largest multiple g of g0 for which it is block-diagonal."""
    co, cig, kh, kw = weight.shape
    n = gcd(co // g0, cig)
    connected = weight.ne(0).any(dim=(2, 3))                  # [Co, Ci/g0]
    for r in (d for d in range(n, 1, -1) if n % d == 0):
        links = connected.reshape(g0, r, co // (g0 * r), r, cig // r).any(dim=(2, 4))
        if not (links & ~torch.eye(r, dtype=torch.bool, device=weight.device)).any():
            blocks = weight.reshape(g0, r, co // (g0 * r), r, cig // r, kh, kw)
            return blocks.diagonal(0, 1, 3).movedim(-1, 1).reshape(co, cig // r, kh, kw), g0 * r
    return weight, g0


def expand_groups(weight: Tensor, groups: int) -> Tensor:
    """Grouped weight [Co, Ci/g, kH, kW] -> dense block-diagonal [Co, Ci, kH, kW]."""
    return _coarsen(weight, groups, 1)


def regroup(dense: Tensor) -> tuple[Tensor, int]:
    """Largest groups g (dividing Co and Ci) for which ``dense`` is block-diagonal; returns the
    grouped weight [Co, Ci/g, kH, kW] and g (1 if not block-diagonal)."""
    return _refine(dense, 1)


# ---- conv composition ----------------------------------------------------------------------------

def _taps(start: int, k: int, step: int) -> slice:
    """Kernel indices start, start+step, ... (k of them; step is ignored when k == 1)."""
    return slice(start, start + (k - 1) * step + 1, step if k > 1 else 1)


@dataclass(frozen=True)
class _Axis:
    """One spatial dim of a merged conv: its geometry, and where the taps of the two input kernels
    go in the merged kernel (``*_start`` + k * ``*_step``; in compose, a's start is relative to each
    tap of b)."""
    kernel: int
    stride: int
    padding: int
    dilation: int
    a_start: int
    a_step: int
    b_start: int
    b_step: int


def _spec(weight: Tensor, bias: Tensor, axes: list[_Axis], groups: int,
          bias_map: Tensor | None) -> ConvSpec:
    h, w = axes
    return ConvSpec(weight, bias, stride=(h.stride, w.stride), padding=(h.padding, w.padding),
                    dilation=(h.dilation, w.dilation), groups=groups, bias_map=bias_map)


def _border_exact(a: ConvSpec, b: ConvSpec) -> bool:
    return all(pb == 0 or pa >= (ka - 1) * da for pb, pa, ka, da in
               zip(b.padding, a.padding, a.kernel_size, a.dilation))


def compose_convs(a: ConvSpec, b: ConvSpec, in_hw: Pair, allow_inexact: bool = False) -> ConvSpec:
    """b(a(x)) as one conv for inputs of spatial size in_hw.

    Merged stride sA*sB, padding pB*sA + pA, taps at kb*dB*sA + ka*dA (compacted to a dilated kernel
    when all taps share a common stride), groups re-derived with ``regroup``. The additive term of a
    (bias + bias_map) goes through b with b's zero padding (``additive_through_conv``), plus b's own.
    Exact when b has padding 0, or a is 1x1 with padding 0 (its bias then needs a border map); more
    generally when, per dim, pB = 0 or pA >= (kA-1)*dA. Otherwise raises
    NotExact("padded KxK -> padded KxK is border-inexact"), unless allow_inexact (then the weight
    part differs on the border ring; the caller measures the error). Also NotExact when the merged
    output size differs from b's. Non-zero padding modes are the caller's to refuse.
    """
    if a.out_channels != b.in_channels:
        raise ValueError(f"cannot compose: {a.out_channels} output channels into {b.in_channels}")
    mid_hw = a.out_size(in_hw)
    _check_map(a, in_hw)
    _check_map(b, mid_hw)
    if not allow_inexact and not _border_exact(a, b):
        raise BorderInexact(f"padded {_kxk(a.kernel_size)} -> padded {_kxk(b.kernel_size)} "
                       "is border-inexact")
    axes = compose_axes(a, b)
    return merged_conv(a, b, in_hw, *_compose_weights(a, b, axes), axes)


def compose_axes(a: ConvSpec, b: ConvSpec) -> list[_Axis]:
    """The geometry of b(a(x)) as one conv, per spatial dim."""
    return [_compose_axis(*g) for g in zip(a.kernel_size, a.stride, a.padding, a.dilation,
                                           b.kernel_size, b.stride, b.padding, b.dilation)]


def merged_conv(a: ConvSpec, b: ConvSpec, in_hw: Pair, weight: Tensor, groups: int,
                axes: list[_Axis]) -> ConvSpec:
    """The conv with the composed ``weight`` (``groups``, re-derived) and the additive term of
    b(a(x)): a's through b with b's zero padding, plus b's own."""
    mid_hw = a.out_size(in_hw)
    weight, groups = _refine(weight, groups)
    merged = _spec(weight, b.bias, axes, groups, b.bias_map)
    if merged.out_size(in_hw) != b.out_size(mid_hw):
        raise NotExact(f"merged output size {merged.out_size(in_hw)} differs from "
                       f"{b.out_size(mid_hw)}")
    return _plus(merged, additive_through_conv(_additive(a), b, mid_hw))


def _compose_axis(ka: int, sa: int, pa: int, da: int, kb: int, sb: int, pb: int, db: int) -> _Axis:
    b_step = db * sa
    dil = gcd(b_step if kb > 1 else 0, da if ka > 1 else 0) or 1
    kernel = ((ka - 1) * da + (kb - 1) * b_step) // dil + 1
    return _Axis(kernel, sa * sb, pb * sa + pa, dil, 0, da // dil, 0, b_step // dil)


def _compose_weights(a: ConvSpec, b: ConvSpec, axes: list[_Axis]) -> tuple[Tensor, int]:
    """Correlation composition of the weights of b after a: (merged weight, its groups)."""
    products, g = tap_products(a, b)
    return place_products(products, None, axes), g


def place_products(products: dict[Pair, Tensor], taps: set[Pair] | None, axes: list[_Axis]) -> Tensor:
    """The merged kernel summing the ``tap_products`` of b's taps ``taps`` (None: all)."""
    h, w = axes
    first = next(iter(products.values()))
    co, cig, kah, kaw = first.shape
    out = first.new_zeros(co, cig, h.kernel, w.kernel)
    for (i, j), t in products.items():
        if taps is None or (i, j) in taps:
            out[..., _taps(i * h.b_step, kah, h.a_step), _taps(j * w.b_step, kaw, w.a_step)] += t
    return out


def tap_products(a: ConvSpec, b: ConvSpec) -> tuple[dict[Pair, Tensor], int]:
    """Per tap (i, j) of b: b's weights at that tap composed with a's whole kernel
    (``[Co, Ci/g, kAh, kAw]``), and their groups g.

    Groups stay grouped (no dense expansion) when one count divides the other; otherwise both are
    first rewritten with gcd(gA, gB) groups. With g = min(gA, gB) and r = max/min, the einsum sums
    over the mid channels m of one a-group."""
    ga, gb = a.groups, b.groups
    wa, wb = a.weight, b.weight
    if ga % gb and gb % ga:
        g0 = gcd(ga, gb)
        wa, wb, ga, gb = _coarsen(wa, ga, g0), _coarsen(wb, gb, g0), g0, g0
    g, r = min(ga, gb), max(ga, gb) // min(ga, gb)
    m, cia, kah, kaw = wa.shape
    co, _, kbh, kbw = wb.shape
    if ga >= gb:        # each b-group reads r a-groups: its inputs are those r groups' inputs
        wa6 = wa.reshape(g, r, m // ga, cia, kah, kaw)
        wb6 = wb.reshape(g, co // g, r, m // ga, kbh, kbw)
        equation = "gorm,grmixy->gorixy"
    else:               # r b-groups each read a slice of one a-group's outputs
        wa6 = wa.reshape(g, r, m // gb, cia, kah, kaw)
        wb6 = wb.reshape(g, r, co // gb, m // gb, kbh, kbw)
        equation = "grom,grmixy->groixy"
    return {(i, j): torch.einsum(equation, wb6[..., i, j], wa6).reshape(co, -1, kah, kaw)
            for i in range(kbh) for j in range(kbw)}, g


def compose_linears(a: LinearSpec, b: LinearSpec) -> LinearSpec:
    """b(a(x)) = (Wb Wa) x + (Wb ba + bb). Exact."""
    return LinearSpec(b.weight @ a.weight, b.weight @ a.bias + b.bias)


def identity_conv(channels: int, dtype: torch.dtype = torch.float32) -> ConvSpec:
    """1x1, stride 1, padding 0 conv computing the identity (depthwise: groups = channels)."""
    return ConvSpec(torch.ones(channels, 1, 1, 1, dtype=dtype), torch.zeros(channels, dtype=dtype),
                    groups=channels)


def identity_linear(features: int, dtype: torch.dtype = torch.float32) -> LinearSpec:
    """The identity as a Linear (``features`` -> ``features``, no bias)."""
    return LinearSpec(torch.eye(features, dtype=dtype), torch.zeros(features, dtype=dtype))


def add_convs(a: ConvSpec, b: ConvSpec, in_hw: Pair) -> ConvSpec:
    """a(x) + b(x) as one conv (parallel branches on the same input, e.g. residual + shortcut).

    Needs equal strides and equal out sizes; b's taps are embedded into a's frame (or vice versa,
    whichever is larger) so that each tap reads the same input position: tap offset -p + k*d must
    map onto the other's grid. Padding of the result is the larger frame's. Exact when aligned;
    NotExact("misaligned ...") otherwise (taps that would need a finer grid than the larger
    branch's kernel). Groups re-derived with ``regroup``.
    """
    if (a.in_channels, a.out_channels) != (b.in_channels, b.out_channels):
        raise ValueError(f"cannot add convs {a.in_channels}->{a.out_channels} and "
                         f"{b.in_channels}->{b.out_channels}")
    if tuple(a.stride) != tuple(b.stride):
        raise NotExact(f"branches have different strides {tuple(a.stride)} and {tuple(b.stride)}")
    out_hw = a.out_size(in_hw)
    if out_hw != b.out_size(in_hw):
        raise NotExact(f"branches have different output sizes {out_hw} and {b.out_size(in_hw)}")
    _check_map(a, in_hw)
    _check_map(b, in_hw)
    axes = [_add_axis(*g) for g in zip(a.kernel_size, a.padding, a.dilation, a.stride,
                                       b.kernel_size, b.padding, b.dilation)]
    if any(axis is None for axis in axes):
        raise NotExact(f"misaligned branches: {_kxk(a.kernel_size)} (padding {tuple(a.padding)}, "
                       f"dilation {tuple(a.dilation)}) and {_kxk(b.kernel_size)} (padding "
                       f"{tuple(b.padding)}, dilation {tuple(b.dilation)}) share no tap grid")
    g0 = gcd(a.groups, b.groups)
    h, w = axes
    weight = (_embed(_coarsen(a.weight, a.groups, g0), (h.kernel, w.kernel),
                     (h.a_start, h.a_step), (w.a_start, w.a_step))
              + _embed(_coarsen(b.weight, b.groups, g0), (h.kernel, w.kernel),
                       (h.b_start, h.b_step), (w.b_start, w.b_step)))
    weight, groups = _refine(weight, g0)
    merged = _spec(weight, a.bias + b.bias, axes, groups, a.bias_map)
    return merged if b.bias_map is None else _plus(merged, b.bias_map)


def _add_axis(ka: int, pa: int, da: int, stride: int, kb: int, pb: int, db: int) -> _Axis | None:
    """Common frame of two parallel branches along one dim (padding = the larger padding, taps on
    the coarsest grid holding both), or None when that needs more taps than the larger kernel."""
    pad = max(pa, pb)
    offsets = [pad - pa + k * da for k in range(ka)] + [pad - pb + k * db for k in range(kb)]
    dil = gcd(*offsets) or 1
    kernel = max(offsets) // dil + 1
    if kernel > max(ka, kb):
        return None
    return _Axis(kernel, stride, pad, dil, (pad - pa) // dil, da // dil, (pad - pb) // dil, db // dil)


def _embed(weight: Tensor, size: Pair, h: Pair, w: Pair) -> Tensor:
    """Place a kernel's taps into a zero kernel of ``size`` at (start, step) ``h`` and ``w``."""
    co, cig, kh, kw = weight.shape
    out = weight.new_zeros(co, cig, *size)
    out[..., _taps(h[0], kh, h[1]), _taps(w[0], kw, w[1])] = weight
    return out


def add_linears(a: LinearSpec, b: LinearSpec) -> LinearSpec:
    """a(x) + b(x) = (Wa + Wb) x + (ba + bb). Exact."""
    return LinearSpec(a.weight + b.weight, a.bias + b.bias)


# ---- dead / constant channels ---------------------------------------------------------------------

def drop_out_channels(conv_or_lin_weight: Tensor, bias: Tensor, keep: Tensor, groups: int = 1
                      ) -> tuple[Tensor, Tensor]:
    """Keep only output channels ``keep`` (bool [Co]) of a conv/linear (groups must be 1, or the
    caller keeps whole groups; the kept conv then has ``groups * kept / Co`` groups)."""
    per_group = keep.reshape(groups, -1)
    if groups > 1 and not (per_group.all(1) | ~per_group.any(1)).all():
        raise ValueError(f"dropping output channels would split some of the {groups} groups")
    return conv_or_lin_weight[keep], bias[keep]


def drop_in_channels(weight: Tensor, keep: Tensor) -> Tensor:
    """Keep only input channels ``keep`` (bool [Ci]) of a dense conv/linear weight."""
    return weight[:, keep]


def drop_conv_outputs(conv: ConvSpec, keep: Tensor) -> ConvSpec:
    """A dense conv (groups 1) keeping only output channels ``keep`` (bias map rows too)."""
    weight, bias = drop_out_channels(conv.weight, conv.bias, keep)
    bias_map = None if conv.bias_map is None else conv.bias_map[keep]
    return ConvSpec(weight, bias, conv.stride, conv.padding, conv.dilation, 1, bias_map)


def drop_linear_outputs(lin: LinearSpec, keep: Tensor) -> LinearSpec:
    return LinearSpec(*drop_out_channels(lin.weight, lin.bias, keep))


def drop_depthwise_channels(conv: ConvSpec, keep: Tensor) -> ConvSpec:
    """A depthwise conv (groups = channels) keeping only channels ``keep``."""
    bias_map = None if conv.bias_map is None else conv.bias_map[keep]
    return ConvSpec(conv.weight[keep], conv.bias[keep], conv.stride, conv.padding, conv.dilation,
                    int(keep.sum()), bias_map)


def drop_conv_inputs(conv: ConvSpec, keep: Tensor, values: Tensor, in_hw: Pair) -> ConvSpec:
    """A dense conv reading only input channels ``keep``; the dropped channels held the constants
    ``values`` (0 at kept channels) on an ``in_hw`` input, pushed into the bias (a map if padded)."""
    dense = ConvSpec(drop_in_channels(conv.weight, keep), conv.bias, conv.stride, conv.padding,
                     conv.dilation, 1, conv.bias_map)
    if not bool(values.any()):
        return dense
    h, w = in_hw
    return _plus(dense, additive_through_conv(values.view(-1, 1, 1).expand(-1, h, w).contiguous(), conv))


def drop_linear_inputs(lin: LinearSpec, keep: Tensor, values: Tensor) -> LinearSpec:
    """A Linear reading only input features ``keep``; the dropped ones held the constants ``values``."""
    return LinearSpec(drop_in_channels(lin.weight, keep), lin.bias + lin.weight @ values)
