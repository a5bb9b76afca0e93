"""Exact merges of a padded KxK conv into a zero-padded KxK conv: the border correction (docs/DESIGN.md 4.2).

With y = A(x) (zero padding pA) and z = B(y) (zero padding pB), the composed conv M = B.A of
``algebra.compose_convs`` (its bias part is already exact) computes B over ``y_ext``: A's weights
applied to the zero-padded x *also* on the pB-wide ring outside y's grid, where the original feeds B
zeros. So, exactly, ``z = M(x) - B(ring * y_ext)``. The ring values read only the outermost rows and
columns of x, and the mask ``ring`` is, per output position (o, p), ``R(o) or C(p)`` with per-dim tap
sets R (B's row taps landing outside y) and C (column taps); by inclusion-exclusion

    z = M(x) - sum_o row_o(x) - sum_p col_p(x) + sum_(o,p) corner_(o,p)(x)

where ``row_o`` is the composition of A with B's weights masked to the taps in R(o): one conv along
the edge (translation-invariant in the other dim) over a thin band of x, producing z's row o;
``col_p`` likewise; ``corner_(o,p)`` (taps in R(o) and C(p)) one conv over a small corner patch of x
producing one position. Only output rows/columns whose window reaches the ring get a piece (one or
two per side for a 3x3), so the extra work is O(perimeter), and every piece is a single conv in
parallel with M: the merged layer has depth one.

Pieces of one shape are stacked into one grouped conv over channel-stacked input bands
(``PieceGroup``); ``correct`` adds them to M's output by slicing and concatenation (Slice, Conv,
Add, Concat in ONNX). Everything here is exact for the input size it was computed for
(``BorderConvSpec.in_hw``), like a border bias map.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from nepenthe_compress.fold import algebra as A

Pair = tuple[int, int]
UNKNOWN_SIZE = "the input size is not known (border corrections need static shapes)"


@dataclass(frozen=True)
class Window:
    """A rectangle of the input: rows [top, top + height), columns [left, left + width)."""

    top: int
    left: int
    height: int
    width: int


@dataclass(frozen=True)
class PieceGroup:
    """``n`` corrections of one shape, run as one conv with ``n * groups`` groups over the ``n``
    windows of x stacked along channels; piece j's output (``weight[j*Co:(j+1)*Co]``, its sign
    included) is added to z with its top-left corner at ``places[j]``."""

    weight: Tensor                      # [n*Co, Ci/groups, kH, kW]
    groups: int                         # groups of one piece (those of the composed weights)
    stride: Pair
    padding: Pair
    dilation: Pair
    windows: tuple[Window, ...]
    places: tuple[Pair, ...]            # (row, col) in z

    @property
    def count(self) -> int:
        return len(self.windows)


@dataclass(frozen=True)
class BorderConvSpec:
    """z = main(x) + the pieces, for inputs of spatial size ``in_hw`` only (None: no pieces)."""

    main: A.ConvSpec
    pieces: tuple[PieceGroup, ...] = ()
    in_hw: Pair | None = None

    @property
    def out_channels(self) -> int:
        return self.main.out_channels

    @property
    def in_channels(self) -> int:
        return self.main.in_channels

    def out_size(self, in_hw: Pair) -> Pair:
        return self.main.out_size(in_hw)

    def forward(self, x: Tensor) -> Tensor:
        """Reference application: main conv, then the pieces (``correct``)."""
        return correct(self.main.forward(x), x, [(g.weight, g) for g in self.pieces])


Conv = A.ConvSpec | BorderConvSpec


# ---- applying the pieces ---------------------------------------------------------------------------

def window(x: Tensor, w: Window) -> Tensor:
    return x[..., w.top:w.top + w.height, w.left:w.left + w.width]


def _splice(z: Tensor, fixes: dict[int, Tensor], dim: int) -> Tensor:
    """z with ``fixes[i]`` (size 1 along ``dim``) added at index i of ``dim``: slices + one concat."""
    parts, i, size = [], 0, z.shape[dim]
    for k in sorted(fixes):
        if k > i:
            parts.append(z.narrow(dim, i, k - i))
        parts.append(z.narrow(dim, k, 1) + fixes[k])
        i = k + 1
    if i < size:
        parts.append(z.narrow(dim, i, size - i))
    return torch.cat(parts, dim) if len(parts) > 1 else parts[0]


def _accumulate(into: dict[int, Tensor], key: int, t: Tensor) -> None:
    into[key] = t if key not in into else into[key] + t


def correct(z: Tensor, x: Tensor, groups: Sequence[tuple[Tensor, PieceGroup]]) -> Tensor:
    """z plus every piece (given as (weight, group), the weight possibly a module's buffer).

    A piece as wide as z is a row fix, one as tall as z a column fix, anything else (a corner
    position) is zero-padded to a row fix; column fixes are spliced in first, then row fixes."""
    hz, wz = z.shape[-2:]
    rows: dict[int, Tensor] = {}
    cols: dict[int, Tensor] = {}
    for weight, g in groups:
        bands = [window(x, w) for w in g.windows]
        out = F.conv2d(torch.cat(bands, 1) if len(bands) > 1 else bands[0], weight, None, g.stride,
                       g.padding, g.dilation, g.groups * g.count)
        parts = out.chunk(g.count, 1) if g.count > 1 else (out,)
        for (r, c), part in zip(g.places, parts):
            oh, ow = part.shape[-2:]
            if ow == wz:
                _accumulate(rows, r, part)
            elif oh == hz:
                _accumulate(cols, c, part)
            else:
                _accumulate(rows, r, F.pad(part, (c, wz - c - ow)))
    return _splice(_splice(z, cols, -1), rows, -2)


def corrections(spec: BorderConvSpec, x: Tensor) -> Tensor:
    """The pieces' sum alone on x (``[N, Co, Ho, Wo]``)."""
    z = x.new_zeros(x.shape[0], spec.out_channels, *spec.out_size(tuple(x.shape[-2:])))
    return correct(z, x, [(g.weight, g) for g in spec.pieces])


# ---- the corrected composition ---------------------------------------------------------------------

def ring_taps(o: int, k: int, s: int, p: int, d: int, n: int) -> list[int]:
    """Taps of a conv (kernel k, stride s, padding p, dilation d) at output o that read outside an
    input of length n (its zero padding)."""
    return [t for t in range(k) if not 0 <= o * s - p + t * d < n]


@dataclass(frozen=True)
class _Piece:
    weight: Tensor        # [Co, Ci/g, kh, kw], sign included
    groups: int
    stride: Pair
    padding: Pair
    dilation: Pair
    window: Window
    place: Pair

    def key(self) -> tuple:
        return (tuple(self.weight.shape), self.groups, self.stride, self.padding, self.dilation,
                self.window.height, self.window.width)


def _reach(b_taps: Sequence[int], axis: A._Axis, ka: int) -> set[int]:
    """Merged-kernel taps along one dim that b's taps ``b_taps`` (with all of a's ka taps) reach."""
    return {t * axis.b_step + k * axis.a_step for t in b_taps for k in range(ka)}


def _trim(weight: Tensor, dim: int, reach: set[int], first: int, step: int, n: int
          ) -> tuple[Tensor, int, int] | None:
    """Keep the taps i of ``dim`` in ``reach`` that read inside [0, n) (input index first + i*step):
    (trimmed weight, first input index, input extent), or None when there are none."""
    live = [i for i in sorted(reach) if 0 <= first + i * step < n]
    if not live:
        return None
    i0, i1 = live[0], live[-1]
    return weight.narrow(dim, i0, i1 - i0 + 1), first + i0 * step, (i1 - i0) * step + 1


def compose_corrected(a: A.ConvSpec, b: A.ConvSpec, in_hw: Pair, weights: bool = True) -> BorderConvSpec:
    """b(a(x)) as one conv plus its border correction, exact for inputs of spatial size ``in_hw``.

    Any strides, dilations, groups and kernel sizes that ``compose_convs`` composes; zero padding
    only (other padding modes are refused before this). Raises ``NotExact`` with the reason when
    the merged output size differs from b's. ``weights=False``: the same layer's structure only
    (``structure``), without the K^2 weight products."""
    if in_hw is None:
        raise A.NotExact(UNKNOWN_SIZE)
    A._check_map(a, in_hw)
    mid = a.out_size(in_hw)
    A._check_map(b, mid)
    axes = A.compose_axes(a, b)
    h, w = axes
    if weights:
        products, g = A.tap_products(a, b)          # the one expensive step, shared by every piece
        main = A.merged_conv(a, b, in_hw, A.place_products(products, None, axes), g, axes)

        def composed(rows: Sequence[int] | None, cols: Sequence[int] | None, sign: int = 1) -> Tensor:
            """A composed with B's taps restricted to ``rows`` x ``cols`` (None: all), times sign."""
            taps = {(i, j) for i in (range(b.kernel_size[0]) if rows is None else rows)
                    for j in (range(b.kernel_size[1]) if cols is None else cols)}
            kernel = A.place_products(products, taps, axes)
            return kernel if sign > 0 else -kernel
    else:
        main, g = _merged_structure(a, b, in_hw, axes)
        kernel = (b.out_channels, a.in_channels // g, h.kernel, w.kernel)

        def composed(rows: Sequence[int] | None, cols: Sequence[int] | None, sign: int = 1) -> Tensor:
            return stand_in(kernel, a.weight.dtype)
    out = main.out_size(in_hw)
    (kbh, kbw), (sbh, sbw), (pbh, pbw), (dbh, dbw) = b.kernel_size, b.stride, b.padding, b.dilation
    rings_r = {o: t for o in range(out[0]) if (t := ring_taps(o, kbh, sbh, pbh, dbh, mid[0]))}
    rings_c = {p: t for p in range(out[1]) if (t := ring_taps(p, kbw, sbw, pbw, dbw, mid[1]))}

    pieces: list[_Piece] = []
    kah, kaw = a.kernel_size
    for o, taps in rings_r.items():          # edge rows: translation-invariant along the columns
        trimmed = _trim(composed(taps, None, -1), 2, _reach(taps, h, kah), o * h.stride - h.padding,
                        h.dilation, in_hw[0])
        if trimmed is not None:
            k, top, height = trimmed
            pieces.append(_Piece(k, g, (1, w.stride), (0, w.padding), (h.dilation, w.dilation),
                                 Window(top, 0, height, in_hw[1]), (o, 0)))
    for p, taps in rings_c.items():          # edge columns: translation-invariant along the rows
        trimmed = _trim(composed(None, taps, -1), 3, _reach(taps, w, kaw), p * w.stride - w.padding,
                        w.dilation, in_hw[1])
        if trimmed is not None:
            k, left, width = trimmed
            pieces.append(_Piece(k, g, (h.stride, 1), (h.padding, 0), (h.dilation, w.dilation),
                                 Window(0, left, in_hw[0], width), (0, p)))
    for o, rt in rings_r.items():            # corners: counted twice above, added back once
        for p, ct in rings_c.items():
            rows = _trim(composed(rt, ct), 2, _reach(rt, h, kah), o * h.stride - h.padding, h.dilation,
                         in_hw[0])
            cols = rows and _trim(rows[0], 3, _reach(ct, w, kaw), p * w.stride - w.padding, w.dilation,
                                  in_hw[1])
            if cols:
                (_, top, height), (k, left, width) = rows, cols
                pieces.append(_Piece(k, g, (1, 1), (0, 0), (h.dilation, w.dilation),
                                     Window(top, left, height, width), (o, p)))
    return BorderConvSpec(drop_dead_taps(main, in_hw), _stack(pieces, weights), tuple(in_hw))


# ---- structure only: what a cost model prices ------------------------------------------------------

def stand_in(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Zeros of ``shape`` without the memory (an expanded scalar): a structure-only spec's weight."""
    return torch.zeros((), dtype=dtype).expand(*shape)


def _links(conv: A.ConvSpec) -> A.ConvSpec:
    """``conv`` as a 1x1 conv of 0/1 weights: which inputs reach which outputs."""
    return replace(conv, weight=conv.weight.ne(0).any((2, 3), keepdim=True).float())


def _merged_structure(a: A.ConvSpec, b: A.ConvSpec, in_hw: Pair, axes: list) -> tuple[A.ConvSpec, int]:
    """``merged_conv``'s result (and the groups of the pieces) from the channel links alone: its
    weight a stand-in that keeps which inputs reach which outputs (so ``_refine`` finds the groups
    the composed weights have, exact zeros by cancellation aside), its additive term computed."""
    links, g = A.tap_products(_links(a), _links(b))
    h, w = axes
    weight = links[0, 0].to(a.weight.dtype).expand(-1, -1, h.kernel, w.kernel)
    main = A.merged_conv(a, b, in_hw, weight, g, axes)
    connected = main.weight[..., :1, :1].ne(0).to(a.weight.dtype)
    return replace(main, weight=connected.expand(main.weight.shape)), g


def _plain_structure(a: A.ConvSpec, b: A.ConvSpec, in_hw: Pair, allow_inexact: bool) -> Conv:
    """``compose_convs``'s structure (same checks and refusals), else ``compose_corrected``'s."""
    if a.out_channels != b.in_channels:
        raise ValueError(f"cannot compose: {a.out_channels} output channels into {b.in_channels}")
    A._check_map(a, in_hw)
    A._check_map(b, a.out_size(in_hw))
    if not allow_inexact and not A._border_exact(a, b):
        return compose_corrected(a, b, in_hw, weights=False)
    return _merged_structure(a, b, in_hw, A.compose_axes(a, b))[0]


def structure(a: Conv, b: Conv, in_hw: Pair | None, allow_inexact: bool = False) -> Conv:
    """``compose(a, b, ...)``'s layer without computing its weights: the same type, kernel sizes,
    groups, pieces, bias map and refusals, its weights ``stand_in``s (a dense one carries the
    channel links, so that it composes further). What a cost model prices (shapes, not values) at
    the cost of one channel-links product instead of K^2 weight products."""
    _refuse_corrected(a, b, in_hw, allow_inexact)
    return _plain_structure(lower(lift(a)), lower(lift(b)), in_hw, allow_inexact)


def _dead_taps(k: int, s: int, p: int, d: int, n: int) -> int:
    """How many taps can go from both ends of a kernel along one dim because they read only zero
    padding at every output position (padding stays >= 0, so the output is unchanged)."""
    out = A._out_len(n, k, s, p, d)
    live = [i for i in range(k) if any(0 <= o * s - p + i * d < n for o in range(out))]
    return min(live[0], k - 1 - live[-1], p // d) if live else 0


def drop_dead_taps(conv: A.ConvSpec, in_hw: Pair) -> A.ConvSpec:
    """``conv`` without the outer taps that read only its zero padding for an ``in_hw`` input (a
    merged 5x5 on a 2x2 input is a 3x3, on a 1x1 input a 1x1). Exact: those taps multiply zeros."""
    th, tw = (_dead_taps(*g) for g in zip(conv.kernel_size, conv.stride, conv.padding, conv.dilation, in_hw))
    if not (th or tw):
        return conv
    kh, kw = conv.kernel_size
    weight = conv.weight[..., th:kh - th, tw:kw - tw]
    padding = (conv.padding[0] - th * conv.dilation[0], conv.padding[1] - tw * conv.dilation[1])
    return replace(conv, weight=weight, padding=padding)


def _stack(pieces: list[_Piece], weights: bool = True) -> tuple[PieceGroup, ...]:
    """Pieces of one shape and geometry as one ``PieceGroup`` each (first-seen order); without
    ``weights`` the stacked weight is a ``stand_in``."""
    def cat(ws: list[Tensor]) -> Tensor:
        if weights:
            return torch.cat(ws)
        return stand_in((sum(t.shape[0] for t in ws), *ws[0].shape[1:]), ws[0].dtype)

    by_key: dict[tuple, list[_Piece]] = {}
    for piece in pieces:
        by_key.setdefault(piece.key(), []).append(piece)
    return tuple(PieceGroup(cat([q.weight for q in same]), same[0].groups, same[0].stride,
                            same[0].padding, same[0].dilation, tuple(q.window for q in same),
                            tuple(q.place for q in same)) for same in by_key.values())


# ---- the layer kind's algebra (a plain ConvSpec is a BorderConvSpec without pieces) ------------------

def lift(spec: Conv) -> BorderConvSpec:
    return spec if isinstance(spec, BorderConvSpec) else BorderConvSpec(spec)


def lower(spec: BorderConvSpec) -> Conv:
    """A spec without pieces as a plain ConvSpec."""
    return spec if spec.pieces else spec.main


def compose(a: Conv, b: Conv, in_hw: Pair | None, allow_inexact: bool = False) -> Conv:
    """b(a(x)) as one layer: ``compose_convs`` where that is exact (or inexact merges are allowed),
    else the border-corrected merge. A layer that already carries a correction merges no further:
    ``BorderInexact`` (so that ``allow_inexact`` may merge the plain layers instead) unless inexact
    merges were asked for, then ``NotExact``."""
    _refuse_corrected(a, b, in_hw, allow_inexact)
    a, b = lower(lift(a)), lower(lift(b))
    try:
        return A.compose_convs(a, b, in_hw, allow_inexact=allow_inexact)
    except A.BorderInexact:
        return compose_corrected(a, b, in_hw)


def _refuse_corrected(a: Conv, b: Conv, in_hw: Pair | None, allow_inexact: bool) -> None:
    if in_hw is None:
        raise A.NotExact(UNKNOWN_SIZE)
    if any(isinstance(s, BorderConvSpec) and s.pieces for s in (a, b)):
        reason = "a border-corrected merge joins two convs only (it does not merge further)"
        raise A.NotExact(reason) if allow_inexact else A.BorderInexact(reason)


def add(a: Conv, b: Conv, in_hw: Pair) -> Conv:
    """a(x) + b(x): ``add_convs`` on the main convs (a shortcut joins at the centre tap), the pieces
    of both kept."""
    la, lb = lift(a), lift(b)
    main = A.add_convs(la.main, lb.main, in_hw)
    return lower(BorderConvSpec(main, la.pieces + lb.pieces, la.in_hw or lb.in_hw))


def identity(channels: int, dtype: torch.dtype = torch.float32) -> BorderConvSpec:
    return BorderConvSpec(A.identity_conv(channels, dtype))


def _per_piece(g: PieceGroup, t: Tensor) -> Tensor:
    """A per-output-channel tensor repeated for the ``g.count`` stacked pieces."""
    return t.repeat(g.count)


def then_affine(spec: BorderConvSpec, a: Tensor, c: Tensor) -> BorderConvSpec:
    """affine(layer(x)): scale every output channel (main and pieces) by a; c joins the bias."""
    pieces = tuple(replace(g, weight=g.weight * _per_piece(g, a)[:, None, None, None]) for g in spec.pieces)
    return replace(spec, main=A.conv_then_affine(spec.main, a, c), pieces=pieces)


def _scale_inputs(g: PieceGroup, a: Tensor) -> PieceGroup:
    co, cig = g.weight.shape[0] // g.count, g.weight.shape[1]
    scale = a.reshape(g.groups, 1, cig).expand(g.groups, co // g.groups, cig).reshape(co, cig)
    return replace(g, weight=g.weight * scale.repeat(g.count, 1)[:, :, None, None])


def _constant_response(spec: BorderConvSpec, values: Tensor) -> Tensor:
    """The pieces' output for the per-channel constant input ``values`` ([Co, Ho, Wo])."""
    image = values.reshape(1, -1, 1, 1).expand(1, -1, *spec.in_hw)
    return corrections(spec, image)[0]


def affine_then(a: Tensor, c: Tensor, spec: BorderConvSpec, in_hw: Pair) -> BorderConvSpec:
    """layer(a*x + c): inputs scaled in main and pieces; c through main (``affine_then_conv``) and
    through the pieces (a constant map on the border rows and columns)."""
    _check_size(spec, in_hw)
    main = A.affine_then_conv(a, c, spec.main, in_hw)
    if c.any():
        main = A._plus(main, _constant_response(spec, c))
    return replace(spec, main=main, pieces=tuple(_scale_inputs(g, a) for g in spec.pieces))


def drop_out(spec: BorderConvSpec, keep: Tensor) -> BorderConvSpec:
    """Keep output channels ``keep`` (dense layers only)."""
    def sliced(g: PieceGroup) -> PieceGroup:
        w = g.weight.reshape(g.count, -1, *g.weight.shape[1:])[:, keep]
        return replace(g, weight=w.reshape(-1, *g.weight.shape[1:]))
    return replace(spec, main=A.drop_conv_outputs(spec.main, keep), pieces=tuple(map(sliced, spec.pieces)))


def drop_in(spec: BorderConvSpec, keep: Tensor, values: Tensor, in_hw: Pair) -> BorderConvSpec:
    """Read only input channels ``keep`` (dense layers only); the dropped ones held the constants
    ``values``, which reach the bias through main and the pieces."""
    _check_size(spec, in_hw)
    main = A.drop_conv_inputs(spec.main, keep, values, in_hw)
    if values.any():
        main = A._plus(main, _constant_response(spec, values))
    return replace(spec, main=main, pieces=tuple(replace(g, weight=g.weight[:, keep]) for g in spec.pieces))


def _check_size(spec: BorderConvSpec, in_hw: Pair) -> None:
    if spec.in_hw is not None and tuple(in_hw) != tuple(spec.in_hw):
        raise ValueError(f"border correction computed for input size {spec.in_hw}, not {tuple(in_hw)}")


def work(spec: BorderConvSpec, in_hw: Pair) -> tuple[int, int, int]:
    """(outputs, MACs, extra adds) of main and pieces, plus one pass over the output per splice
    (one for the column fixes, one for the row fixes)."""
    ho, wo = spec.out_size(in_hw)
    co, cig, kh, kw = spec.main.weight.shape
    outputs = co * ho * wo
    macs, extra = outputs * cig * kh * kw, outputs if spec.main.bias_map is not None else 0
    splices = set()
    for g in spec.pieces:
        oh, ow = piece_out(g)
        splices.add("rows" if ow == wo or oh != ho else "cols")
        outputs += g.weight.shape[0] * oh * ow
        macs += g.weight.shape[0] * oh * ow * g.weight[0].numel()
    return outputs + len(splices) * co * ho * wo, macs, extra


def piece_out(g: PieceGroup, weight: Tensor | None = None) -> Pair:
    """Spatial output size of each piece of ``g`` (its weight given apart when a module holds it)."""
    size = (g.windows[0].height, g.windows[0].width)
    kernel = (g.weight if weight is None else weight).shape[2:]
    return tuple(A._out_len(n, k, s, p, d) for n, k, s, p, d in
                 zip(size, kernel, g.stride, g.padding, g.dilation))
