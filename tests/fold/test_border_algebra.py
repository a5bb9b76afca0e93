"""Border-corrected conv merges (``fold.border``) against the unmerged pair in float64.

The reference is always the ORIGINAL two convs run with torch.nn.functional (B zero-padding A's
output). The merged result is applied here independently of ``border.correct``: the main conv with
F.conv2d, then every piece run on its own window and added at its place through a zero-padded
full-size tensor. Errors are checked separately on the interior, on the border rows / columns and
on the corner positions, where the correction does its work."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from nepenthe_compress.fold import border
from nepenthe_compress.fold.algebra import BorderInexact, ConvSpec, NotExact
from nepenthe_compress.fold.border import BorderConvSpec
from nepenthe_compress.fold.cost import layer_cost
from nepenthe_compress.fold.measured import _structure

D = torch.float64
TOL = 1e-10
CONFIGS = 72


def conv(ci: int, co: int, k: int, s: int = 1, p: int = 0, d: int = 1, g: int = 1, bias: bool = True,
         gen: torch.Generator | None = None) -> ConvSpec:
    return ConvSpec(torch.randn(co, ci // g, k, k, dtype=D, generator=gen),
                    torch.randn(co, dtype=D, generator=gen) if bias else torch.zeros(co, dtype=D),
                    (s, s), (p, p), (d, d), g)


def original(a: ConvSpec, b: ConvSpec, x: Tensor) -> Tensor:
    y = F.conv2d(x, a.weight, a.bias, a.stride, a.padding, a.dilation, a.groups)
    return F.conv2d(y, b.weight, b.bias, b.stride, b.padding, b.dilation, b.groups)


def run(spec: ConvSpec | BorderConvSpec, x: Tensor) -> Tensor:
    """The merged layer applied without ``border.correct``: each piece added via a full-size pad."""
    main = spec.main if isinstance(spec, BorderConvSpec) else spec
    z = F.conv2d(x, main.weight, main.bias, main.stride, main.padding, main.dilation, main.groups)
    if main.bias_map is not None:
        z = z + main.bias_map
    if not isinstance(spec, BorderConvSpec):
        return z
    hz, wz = z.shape[-2:]
    co = spec.out_channels
    for g in spec.pieces:
        for j, (w, (r, c)) in enumerate(zip(g.windows, g.places)):
            band = x[..., w.top:w.top + w.height, w.left:w.left + w.width]
            assert band.shape[-2:] == (w.height, w.width)          # windows lie inside x
            part = F.conv2d(band, g.weight[j * co:(j + 1) * co], None, g.stride, g.padding, g.dilation, g.groups)
            oh, ow = part.shape[-2:]
            z = z + F.pad(part, (c, wz - c - ow, r, hz - r - oh))
    return z


def regions(a: ConvSpec, b: ConvSpec, in_hw) -> dict[str, Tensor]:
    """Boolean [Ho, Wo] masks: positions whose B window reaches the zero ring by rows only, by
    columns only, by both (corners), and the interior."""
    mid = a.out_size(in_hw)
    out = b.out_size(mid)
    r = torch.tensor([bool(border.ring_taps(o, b.kernel_size[0], b.stride[0], b.padding[0], b.dilation[0], mid[0]))
                      for o in range(out[0])])
    c = torch.tensor([bool(border.ring_taps(p, b.kernel_size[1], b.stride[1], b.padding[1], b.dilation[1], mid[1]))
                      for p in range(out[1])])
    rr, cc = r[:, None].expand(out), c[None, :].expand(out)
    return {"interior": ~rr & ~cc, "rows": rr & ~cc, "cols": ~rr & cc, "corners": rr & cc}


def errors(ref: Tensor, got: Tensor, masks: dict[str, Tensor]) -> dict[str, float]:
    scale = ref.abs().max().clamp_min(1.0)   # an output of padding only can be all zeros
    diff = (ref - got).abs().amax(dim=(0, 1))
    return {k: float(diff[m].max() / scale) if m.any() else 0.0 for k, m in masks.items()}


# ---- random configurations -------------------------------------------------------------------------

def random_pair(rng: random.Random, gen: torch.Generator):
    """A padded conv A into a zero-padded conv B (kernels 1/3/5/7, strides 1-2, dilations 1-2,
    dense / grouped / depthwise, with or without biases) and an input size (odd, even, non-square)."""
    ka, kb = rng.choice([1, 3, 3, 5, 7]), rng.choice([1, 3, 3, 5, 7])
    da, db = rng.choice([1, 1, 2]), rng.choice([1, 1, 2])
    sa, sb = rng.choice([1, 1, 2]), rng.choice([1, 1, 2])
    pa = rng.randint(0, (ka - 1) * da // 2 + 1)
    pb = rng.randint(1, (kb - 1) * db // 2 + 1)
    layout = rng.choice(["dense", "grouped", "depthwise"])
    c = 4
    ga, gb = {"dense": (1, 1), "grouped": (2, rng.choice([1, 2, 4])), "depthwise": (c, c)}[layout]
    a = conv(c, c, ka, sa, pa, da, ga, rng.random() < 0.7, gen)
    b = conv(c, rng.choice([c, 2 * c]) if layout != "depthwise" else c, kb, sb, pb, db, gb, rng.random() < 0.7, gen)
    hw = (rng.randint(1, 13), rng.randint(1, 13))
    return a, b, hw


def _valid(a: ConvSpec, b: ConvSpec, hw) -> bool:
    mid = a.out_size(hw)
    return min(mid) >= 1 and min(b.out_size(mid)) >= 1


def configurations():
    rng, gen = random.Random(10), torch.Generator().manual_seed(10)
    while True:
        a, b, hw = random_pair(rng, gen)
        if _valid(a, b, hw):
            yield a, b, hw, torch.randn(2, a.in_channels, *hw, dtype=D, generator=gen)


def test_random_configurations_are_exact_everywhere_including_border_rows_columns_and_corners() -> None:
    """At least 60 configurations merged with a correction; each exact on the interior, border rows,
    border columns and corners; the uncorrected merge is wrong on the border ring (so the pieces do
    the work) and right inside."""
    corrected, seen = 0, {"rows": 0, "cols": 0, "corners": 0}
    kinds: set[tuple] = set()
    for a, b, hw, x in configurations():
        ref = original(a, b, x)
        spec = border.compose_corrected(a, b, hw)
        masks = regions(a, b, hw)
        err = errors(ref, run(spec, x), masks)
        assert max(err.values()) <= TOL, (a, b, hw, err)
        plain = errors(ref, run(spec.main, x), masks)
        assert plain["interior"] <= TOL
        if spec.pieces:
            assert max(plain[k] for k in ("rows", "cols", "corners")) > 1e-6
        for k in seen:
            seen[k] += bool(masks[k].any())
        kinds.add((a.kernel_size[0], b.kernel_size[0], a.stride[0], b.stride[0], a.groups > 1))
        corrected += 1
        if corrected == CONFIGS:
            break
    assert corrected == CONFIGS and min(seen.values()) >= 30
    assert len(kinds) >= 30     # kernel sizes, strides and groupings are actually varied


@pytest.mark.parametrize("hw", [(7, 7), (8, 8), (6, 11), (1, 1), (2, 3)])
@pytest.mark.parametrize("ka,sa,kb", [(3, 1, 3), (3, 2, 3), (5, 1, 3), (3, 1, 7)])
def test_resnet_like_pairs_on_odd_even_non_square_and_tiny_inputs(hw, ka, sa, kb) -> None:
    gen = torch.Generator().manual_seed(hash((hw, ka, sa, kb)) % 2**31)
    a = conv(6, 8, ka, sa, ka // 2, gen=gen)
    b = conv(8, 6, kb, 1, kb // 2, gen=gen)
    x = torch.randn(3, 6, *hw, dtype=D, generator=gen)
    spec = border.compose_corrected(a, b, hw)
    assert max(errors(original(a, b, x), run(spec, x), regions(a, b, hw)).values()) <= TOL
    assert max(errors(original(a, b, x), spec.forward(x), regions(a, b, hw)).values()) <= TOL


def test_a_3x3_pair_gets_one_row_piece_per_edge_and_four_corners() -> None:
    """3x3 pad 1 -> 3x3 pad 1 on 9x10: z rows 0 and 8 and columns 0 and 9 reach the ring; each edge
    piece reads one row (column) of x with a 1x5 (5x1) kernel, each corner one pixel: O(perimeter)."""
    gen = torch.Generator().manual_seed(3)
    a, b = conv(4, 8, 3, p=1, gen=gen), conv(8, 4, 3, p=1, gen=gen)
    spec = border.compose_corrected(a, b, (9, 10))
    shapes = sorted((g.count, tuple(g.weight.shape[2:]), g.places) for g in spec.pieces)
    assert shapes == [(2, (1, 5), ((0, 0), (8, 0))), (2, (5, 1), ((0, 0), (0, 9))),
                      (4, (1, 1), ((0, 0), (0, 9), (8, 0), (8, 9)))]
    main_macs = border.work(border.BorderConvSpec(spec.main), (9, 10))[1]
    piece_macs = sum(g.weight.shape[0] * border.piece_out(g)[0] * border.piece_out(g)[1] * g.weight[0].numel()
                     for g in spec.pieces)
    assert piece_macs == 4 * (2 * 10 * 4 * 5 + 2 * 9 * 4 * 5 + 4 * 4)
    assert border.work(spec, (9, 10))[1] == main_macs + piece_macs


def test_stride_two_a_reads_no_correction_where_its_ring_reads_only_padding() -> None:
    """3x3 stride 2 pad 1 on 8 rows: y's ring row -1 reads x rows -3..-1 (all padding), so the top
    edge needs no piece; the bottom ring row 4 reads x row 7: one piece there."""
    gen = torch.Generator().manual_seed(4)
    a, b = conv(4, 4, 3, s=2, p=1, gen=gen), conv(4, 4, 3, p=1, gen=gen)
    spec = border.compose_corrected(a, b, (8, 8))
    assert sorted(p for g in spec.pieces for p in g.places) == [(0, 3), (3, 0), (3, 3)]
    x = torch.randn(2, 4, 8, 8, dtype=D, generator=gen)
    assert max(errors(original(a, b, x), run(spec, x), regions(a, b, (8, 8))).values()) <= TOL


def test_a_1x1_unpadded_first_needs_no_correction() -> None:
    gen = torch.Generator().manual_seed(5)
    a, b = conv(4, 8, 1, gen=gen), conv(8, 4, 3, p=1, gen=gen)
    merged = border.compose(a, b, (6, 7))
    assert isinstance(merged, ConvSpec)      # compose_convs' exact case, no pieces
    x = torch.randn(2, 4, 6, 7, dtype=D, generator=gen)
    assert max(errors(original(a, b, x), run(merged, x), regions(a, b, (6, 7))).values()) <= TOL


# ---- shortcuts, affine maps, channel drops ---------------------------------------------------------

@pytest.mark.parametrize("stride", [1, 2])
def test_identity_or_1x1_shortcut_joins_the_centre_tap(stride) -> None:
    gen = torch.Generator().manual_seed(6)
    a, b = conv(8, 8, 3, s=stride, p=1, gen=gen), conv(8, 8, 3, p=1, gen=gen)
    hw = (9, 6)
    x = torch.randn(2, 8, *hw, dtype=D, generator=gen)
    spec = border.compose(a, b, hw)
    if stride == 1:
        merged = border.add(spec, border.identity(8, D), hw)
        ref = original(a, b, x) + x
    else:
        short = conv(8, 8, 1, s=2, gen=gen)
        merged = border.add(spec, short, hw)
        ref = original(a, b, x) + F.conv2d(x, short.weight, short.bias, 2)
    assert merged.pieces == spec.pieces and merged.main.kernel_size == spec.main.kernel_size
    assert max(errors(ref, run(merged, x), regions(a, b, hw)).values()) <= TOL


def test_affine_maps_after_and_before_a_corrected_merge() -> None:
    gen = torch.Generator().manual_seed(7)
    a, b = conv(4, 8, 3, p=1, g=2, gen=gen), conv(8, 6, 5, p=2, g=2, gen=gen)
    hw = (7, 8)
    spec = border.compose(a, b, hw)
    x = torch.randn(2, 4, *hw, dtype=D, generator=gen)
    s, t = torch.randn(6, dtype=D, generator=gen), torch.randn(6, dtype=D, generator=gen)
    after = border.then_affine(spec, s, t)
    ref = original(a, b, x) * s[:, None, None] + t[:, None, None]
    assert max(errors(ref, run(after, x), regions(a, b, hw)).values()) <= TOL
    u, v = torch.randn(4, dtype=D, generator=gen), torch.randn(4, dtype=D, generator=gen)
    before = border.affine_then(u, v, spec, hw)
    ref = original(a, b, x * u[:, None, None] + v[:, None, None])
    assert max(errors(ref, run(before, x), regions(a, b, hw)).values()) <= TOL


def test_dropping_output_and_constant_input_channels() -> None:
    gen = torch.Generator().manual_seed(8)
    a, b = conv(6, 8, 3, p=1, gen=gen), conv(8, 5, 3, p=1, gen=gen)
    hw = (6, 9)
    spec = border.compose(a, b, hw)
    x = torch.randn(2, 6, *hw, dtype=D, generator=gen)
    keep_out = torch.tensor([True, False, True, True, False])
    dropped = border.drop_out(spec, keep_out)
    assert dropped.out_channels == 3
    ref = original(a, b, x)
    assert torch.allclose(run(dropped, x), ref[:, keep_out], rtol=0, atol=TOL * ref.abs().max())
    keep_in = torch.tensor([True, True, False, True, False, True])
    values = torch.tensor([0, 0, 1.5, 0, -2.0, 0], dtype=D)
    x_const = x.clone()
    x_const[:, ~keep_in] = values[~keep_in][:, None, None]
    ref = original(a, b, x_const)
    got = run(border.drop_in(spec, keep_in, values, hw), x_const[:, keep_in])
    assert max(errors(ref, got, regions(a, b, hw)).values()) <= TOL


# ---- refusals --------------------------------------------------------------------------------------

def test_a_corrected_merge_merges_no_further_and_says_why() -> None:
    gen = torch.Generator().manual_seed(9)
    a, b, c = (conv(4, 4, 3, p=1, gen=gen) for _ in range(3))
    ab = border.compose(a, b, (8, 8))
    assert isinstance(ab, BorderConvSpec) and ab.pieces
    with pytest.raises(BorderInexact, match="joins two convs only"):
        border.compose(ab, c, (8, 8))
    with pytest.raises(NotExact, match="joins two convs only") as e:   # inexact asked: still refused,
        border.compose(ab, c, (8, 8), allow_inexact=True)            # not as border-inexact
    assert not isinstance(e.value, BorderInexact)
    inexact = border.compose(a, b, (8, 8), allow_inexact=True)         # the opt-in inexact merge
    assert isinstance(inexact, ConvSpec) and torch.equal(inexact.weight, ab.main.weight)


def test_unknown_input_size_is_refused() -> None:
    gen = torch.Generator().manual_seed(11)
    a, b = conv(4, 4, 3, p=1, gen=gen), conv(4, 4, 3, p=1, gen=gen)
    with pytest.raises(NotExact, match="input size is not known"):
        border.compose_corrected(a, b, None)


@pytest.mark.parametrize("hw,stride,kernel", [((1, 1), 1, (1, 1)), ((2, 2), 1, (3, 3)), ((2, 2), 2, (3, 3)),
                                              ((1, 6), 1, (1, 5)), ((9, 9), 1, (5, 5))])
def test_taps_that_read_only_padding_are_dropped_from_the_merged_conv(hw, stride, kernel) -> None:
    """On tiny inputs (ResNet's last stages at 32x32) the merged kernel loses the taps that read
    only zero padding: a 5x5 (pad 2) on 1x1 is a 1x1, on 2x2 a 3x3; stride 2 (7x7 pad 3) on 2x2 a 3x3."""
    gen = torch.Generator().manual_seed(12)
    a, b = conv(4, 4, 3, s=stride, p=1, gen=gen), conv(4, 4, 3, p=1, gen=gen)
    spec = border.compose_corrected(a, b, hw)
    assert spec.main.kernel_size == kernel
    x = torch.randn(2, 4, *hw, dtype=D, generator=gen)
    assert max(errors(original(a, b, x), run(spec, x), regions(a, b, hw)).values()) <= TOL


# ---- structure only (what the planner prices) ------------------------------------------------------

def _outcome(f, *args):
    """f(*args), or the type and message of the exception it raises."""
    try:
        return f(*args)
    except (NotExact, ValueError) as e:
        return type(e), str(e)


def _layout(spec):
    """What a cost model reads: types, tensor shapes, geometry (``fold.measured``'s cache key)."""
    return spec if isinstance(spec, tuple) else _structure(spec)


def test_the_structure_of_a_merge_is_the_merge_without_its_weights() -> None:
    """``border.structure`` on random pairs (and with ``allow_inexact``): the same layer type,
    kernel sizes, groups, pieces (shapes, windows, places), bias map and refusals as ``compose``,
    so the same analytic cost; its weights are stand-ins of one stored value."""
    rng, gen = random.Random(20), torch.Generator().manual_seed(20)
    checked = with_pieces = 0
    while checked < 120:
        a, b, hw = random_pair(rng, gen)
        if rng.random() < 0.3:      # tiny inputs: taps reading only padding dropped
            hw = (rng.randint(1, 4), rng.randint(1, 4))
        if not _valid(a, b, hw):
            continue
        inexact = rng.random() < 0.3
        real = _outcome(border.compose, a, b, hw, inexact)
        shape_only = _outcome(border.structure, a, b, hw, inexact)
        assert type(real) is type(shape_only) and _layout(real) == _layout(shape_only), (a, b, hw)
        if not isinstance(real, tuple):
            in_shape = (1, a.in_channels, *hw)
            assert layer_cost(real, in_shape) == layer_cost(shape_only, in_shape)
            main = shape_only.main if isinstance(shape_only, BorderConvSpec) else shape_only
            weights = [main.weight] + [g.weight for g in getattr(shape_only, "pieces", ())]
            assert all(w.untyped_storage().nbytes() <= w.shape[0] * w.shape[1] * w.element_size()
                       for w in weights)
            with_pieces += bool(getattr(real, "pieces", ()))
        checked += 1
    assert with_pieces >= 40


def test_the_structure_refuses_what_compose_refuses_with_the_same_reason() -> None:
    gen = torch.Generator().manual_seed(22)
    a, b, c = (conv(4, 4, 3, p=1, gen=gen) for _ in range(3))
    ab = border.compose(a, b, (8, 8))
    mapped = replace(a, bias_map=torch.zeros(4, 3, 3, dtype=D))
    cases = [(ab, c, (8, 8), False), (ab, c, (8, 8), True), (a, conv(8, 4, 3, p=1, gen=gen), (8, 8), False),
             (mapped, b, (8, 8), False), (a, b, None, False)]
    for x, y, hw, inexact in cases:
        real = _outcome(border.compose, x, y, hw, inexact)
        assert isinstance(real, tuple) and _outcome(border.structure, x, y, hw, inexact) == real


def test_the_structure_finds_the_groups_the_composed_weights_have() -> None:
    """Grouped 1x1 (2 groups) -> depthwise 3x3 -> grouped 1x1 (4 groups): the composed weights are
    block-diagonal with 2 groups (``_refine``); the structure, composed the same way from channel
    links, finds them too, and so does a pair whose dense weights are block-diagonal by zeros."""
    gen = torch.Generator().manual_seed(21)
    a, b, c = conv(8, 16, 1, g=2, gen=gen), conv(16, 16, 3, p=1, g=16, gen=gen), conv(16, 8, 1, g=4, gen=gen)
    real = border.compose(border.compose(a, b, (6, 6)), c, (6, 6))
    shape_only = border.structure(border.structure(a, b, (6, 6)), c, (6, 6))
    assert real.groups == shape_only.groups == 2 and _layout(real) == _layout(shape_only)
    d, e = conv(8, 8, 3, p=1, gen=gen), conv(8, 8, 3, p=1, gen=gen)
    d.weight[:4, 4:] = 0
    d.weight[4:, :4] = 0
    e.weight[:4, 4:] = 0
    e.weight[4:, :4] = 0
    real, shape_only = border.compose(d, e, (5, 7)), border.structure(d, e, (5, 7))
    assert real.main.groups == shape_only.main.groups == 2 and _layout(real) == _layout(shape_only)
