"""Dead and constant channels (DESIGN 4.2): a channel that is constant on the recorded states
(always-OFF ReLU neurons, zero weight rows, linearised saturated neurons) is dropped from its
producer, through per-channel ops (rectifiers, affine maps, depthwise convs, pooling, flatten), and
from every consumer, its constant folded into the consumers' bias (a border map for padded convs).
Channels whose consumers are not all conv/linear layers, e.g. channels coupled through a residual
add, are kept and the skip is reported. Some droppable channels are kept back so that the count left
stays aligned for the runtime's blocked kernels (``FoldOptions.channel_align``, see ``aligned_count``)."""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from nepenthe_compress.entropy import SiteStats
from nepenthe_compress.fold import algebra as A
from nepenthe_compress.fold.graph import (
    ADD_FUNCTIONS,
    FoldGraph,
    is_affine,
    is_conv2d,
    is_linear,
    is_weighted,
    only_input,
)
from nepenthe_compress.fold.modules import ChannelAffine, conv_module, conv_spec, linear_module, linear_spec
from nepenthe_compress.sites import call_arg, classify_node


KEPT_META = "nc_kept_for_alignment"  # node.meta: constant channels kept back at the last visit


class ChannelDrops(NamedTuple):
    dropped: int = 0                # channels removed by this pass
    kept_for_alignment: int = 0     # droppable channels the graph still holds for alignment


def drop_constant_channels(fg: FoldGraph, stats: dict[str, SiteStats]) -> ChannelDrops:
    """Drop every provably constant channel that can be dropped (keeping back what alignment needs).
    The ``stats`` of sites whose channels are dropped are sliced alike, so a later pass sees the
    same constants (and the channels kept back) again."""
    dropped = kept = 0
    for node in list(fg.gm.graph.nodes):
        if getattr(node, "_erased", False) or not is_weighted(fg, node):
            continue
        d, k = _drop_from(fg, node, stats)
        dropped, kept = dropped + d, kept + k
    return ChannelDrops(dropped, kept)


def aligned_count(channels: int, droppable: int, align: int) -> int:
    """How many of a producer's ``channels`` outputs to keep when ``droppable`` of them are constant.

    The alignment of a count n is gcd(n, align): ``align`` itself for a multiple of it, else the
    largest divisor of ``align`` dividing n (align 8: 56 -> 8, 60 -> 4, 58 -> 2, 57 -> 1). The count
    kept is the smallest one in [channels - droppable, channels] of best alignment in that range, so

    - whenever a multiple of ``align`` is in reach it is ceil((C - D) / align) * align
      (64 with 13 droppable -> 56; 64 with 7 droppable -> 64, nothing dropped);
    - it never exceeds C (no padding) and is never less aligned than C itself (C is in the range):
      61 with 4 droppable -> 60 (a multiple of 4), 6 with 3 droppable -> 4, 58 with 1 droppable -> 58;
    - ``align`` 1 keeps C - D (every droppable channel goes).
    """
    counts = range(channels - droppable, channels + 1)
    best = max(math.gcd(n, align) for n in counts)
    return next(n for n in counts if math.gcd(n, align) == best)


def kept_back(consts: list[float | None], droppable: list[int], count: int) -> list[int]:
    """``count`` of the ``droppable`` channels to keep anyway: those whose constant is 0 first
    (dead rectifier neurons), then the others, each in channel order."""
    return sorted(droppable, key=lambda i: (consts[i] != 0, i))[:count]


def is_depthwise(fg: FoldGraph, node: fx.Node) -> bool:
    m = fg.module(node)
    return is_conv2d(fg, node) and m.groups == m.in_channels == m.out_channels


_POOLS = (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}


def is_flatten(fg: FoldGraph, node: fx.Node) -> bool:
    """flatten(x, 1): channel i becomes features [i*HW, (i+1)*HW)."""
    m = fg.module(node)
    if isinstance(m, nn.Flatten):
        return m.start_dim == 1 and m.end_dim == -1
    if (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"):
        return call_arg(node, 1, "start_dim", 0) == 1 and call_arg(node, 2, "end_dim", -1) == -1
    return False


def keeps_constants(fg: FoldGraph, node: fx.Node) -> bool:
    """Pooling and flatten map a constant channel to the same constant (max-pool pads with -inf,
    adaptive and unpadded average pools only average real positions)."""
    m = fg.module(node)
    return (isinstance(m, _POOLS) or (isinstance(m, nn.AvgPool2d) and m.padding in (0, (0, 0)))
            or (node.op == "call_function" and node.target in _POOL_FUNCTIONS) or is_flatten(fg, node))


def _pointwise_chain(fg: FoldGraph, producer: fx.Node) -> list[fx.Node]:
    """Per-channel nodes (rectifiers without per-channel parameters, ChannelAffine, depthwise convs,
    pooling, and a final flatten) following ``producer`` through single-use edges."""
    chain, t = [], producer
    while len(t.users) == 1 and not (chain and is_flatten(fg, chain[-1])):
        u = next(iter(t.users))
        found = classify_node(fg.gm, u)
        per_channel = ((found is not None and found[0].name != "prelu") or is_affine(fg, u)
                       or is_depthwise(fg, u) or keeps_constants(fg, u))
        if not per_channel or (u.args[0] if u.args else None) is not t:
            break
        chain.append(u)
        t = u
    return chain


def _constants(fg: FoldGraph, producer: fx.Node, chain: list[fx.Node],
               stats: dict[str, SiteStats]) -> list[float | None]:
    """Per output channel: its constant value at the end of ``chain`` or None."""
    m = fg.module(producer)
    w = m.weight.detach().flatten(1)
    bias = m.bias.detach() if m.bias is not None else torch.zeros(w.shape[0])
    bias_map = getattr(m, "bias_map", None)
    consts: list[float | None] = []
    for i in range(w.shape[0]):
        flat = bias_map is None or bool((bias_map[i] == 0).all())
        consts.append(float(bias[i]) if flat and not bool(w[i].any()) else None)
    for op in chain:
        consts = _through(fg, op, consts, stats)
    return consts


def _through(fg: FoldGraph, op: fx.Node, consts: list[float | None],
             stats: dict[str, SiteStats]) -> list[float | None]:
    """Constants after one per-channel op: known constants are pushed through the op itself; a
    neuron recorded as always in a state whose (exact) map has slope 0 becomes that state's
    constant. Smooth rectifiers (GELU, SiLU, ...) are never constant on a state."""
    if is_depthwise(fg, op):
        return _through_depthwise(fg.module(op), consts)
    if keeps_constants(fg, op):
        return list(consts)
    n = len(consts)
    known = torch.tensor([c if c is not None else 0.0 for c in consts], dtype=fg.dtype)
    out = [None] * n
    pushed = _run(fg, op, known.view(1, n)).flatten().tolist()
    for i, c in enumerate(consts):
        if c is not None:
            out[i] = pushed[i]
    if is_affine(fg, op):
        aff = fg.module(op)
        for i in torch.nonzero(aff.scale == 0).flatten().tolist():
            out[i] = float(aff.shift[i])
        return out
    st = stats.get(op.name)
    found = classify_node(fg.gm, op)
    if st is not None and found is not None and found[0].exact and st.neurons == n:
        kind, params = found
        states = st.neuron_state
        for s in np.unique(states[states >= 0]):
            a, c = kind.affine(params, int(s), n)
            for i in np.nonzero(states == s)[0]:
                if float(a[i]) == 0.0:
                    out[i] = float(c[i])
    return out


def _through_depthwise(m: torch.nn.Conv2d, consts: list[float | None]) -> list[float | None]:
    """A depthwise conv maps a constant channel to a constant when it is 0 (zero padding adds
    nothing) or when the conv reads no padding; a border bias map makes the result non-constant."""
    bias_map = getattr(m, "bias_map", None)
    bias = m.bias.detach() if m.bias is not None else torch.zeros(m.out_channels)
    unpadded = all(p == 0 for p in m.padding)
    out: list[float | None] = []
    for i, c in enumerate(consts):
        flat = bias_map is None or bool((bias_map[i] == 0).all())
        if c is None or not flat or (c != 0 and not unpadded):
            out.append(None)
        else:
            out.append(float(bias[i] + c * m.weight[i].sum()))
    return out


def _run(fg: FoldGraph, op: fx.Node, x: Tensor) -> Tensor:
    """Evaluate a per-channel element-wise node on (1, C) channel values."""
    if op.op == "call_module":
        m = fg.module(op)
        if isinstance(m, ChannelAffine):
            return x * m.scale + m.shift
        return m(x)
    if op.op == "call_function":
        return op.target(x, *op.args[1:], **op.kwargs)
    return getattr(x, op.target)(*op.args[1:], **op.kwargs)


def _drop_from(fg: FoldGraph, producer: fx.Node, stats: dict[str, SiteStats]) -> tuple[int, int]:
    """(channels dropped, droppable channels kept back for alignment) at ``producer``."""
    m = fg.module(producer)
    if is_conv2d(fg, producer) and m.groups != 1:
        return 0, 0
    chain = _pointwise_chain(fg, producer)
    end = chain[-1] if chain else producer
    consts = _constants(fg, producer, chain, stats)
    drop = [i for i, c in enumerate(consts) if c is not None]
    if not drop:
        return 0, 0
    if len(drop) == len(consts):
        return 0, 0  # the whole output is constant: constant propagation's job (fold/constants.py)
    consumers = list(end.users)
    flattened = bool(chain) and is_flatten(fg, end)
    spread = fg.shape(end.args[0])[2:].numel() if flattened else 1  # features per channel
    conv_out = is_conv2d(fg, producer) and not flattened
    ok = consumers and all(
        is_weighted(fg, u) and only_input(u) is end and is_conv2d(fg, u) == conv_out
        and (not is_conv2d(fg, u) or fg.module(u).groups == 1) for u in consumers)
    if not ok:
        names = ", ".join(fg.label(u) if u.op != "output" else "graph output" for u in consumers)
        why = ("coupled through a residual add" if any(u.target in ADD_FUNCTIONS for u in consumers)
               else f"consumers ({names}) are not all conv/linear layers")
        fg.record("skip", fg.label(producer), f"{len(drop)} constant channel(s) kept: {why}")
        return 0, 0
    align, total = fg.options.channel_align, len(consts)
    count = aligned_count(total, len(drop), align)
    back = kept_back(consts, drop, count - (total - len(drop)))
    alignment = f"kept for {align}-alignment ({total - len(drop)} -> {count} kept)"
    already = producer.meta.get(KEPT_META) == len(back)
    producer.meta[KEPT_META] = len(back)
    drop = sorted(set(drop) - set(back))
    if not drop:
        if not already:
            fg.record("skip", fg.label(producer), f"{len(back)} constant channel(s) {alignment}")
        return 0, len(back)
    keep = torch.ones(len(consts), dtype=torch.bool)
    keep[drop] = False
    values = torch.tensor([0.0 if keep[i] else consts[i] for i in range(len(consts))], dtype=torch.float64)
    _slice_producer(fg, producer, keep)
    for op in chain:
        st = stats.get(op.name)
        if st is not None and st.neurons == len(consts):
            stats[op.name] = dataclasses.replace(st, counts=st.counts[keep.numpy()])
        if is_affine(fg, op):
            aff = fg.module(op)
            fg.set_module(op, ChannelAffine(aff.scale[keep], aff.shift[keep], aff.axis))
        elif is_depthwise(fg, op):
            s = conv_spec(fg.module(op))
            bias_map = None if s.bias_map is None else s.bias_map[keep]
            spec = A.ConvSpec(s.weight[keep], s.bias[keep], s.stride, s.padding, s.dilation,
                              int(keep.sum()), bias_map)
            fg.set_module(op, conv_module(spec, fg.module(op)))
    for u in consumers:
        _slice_consumer(fg, u, end, keep.repeat_interleave(spread), values.repeat_interleave(spread))
    nonzero = int((values != 0).sum())
    fg.record("drop", fg.label(producer), f"{len(drop)} constant channel(s) removed "
              f"({len(drop) - nonzero} zero, {nonzero} folded into the consumers' bias)"
              + (f", {len(back)} {alignment}" if back else ""))
    return len(drop), len(back)


def _slice_producer(fg: FoldGraph, node: fx.Node, keep: Tensor) -> None:
    m = fg.module(node)
    if is_linear(fg, node):
        s = linear_spec(m)
        w, b = A.drop_out_channels(s.weight, s.bias, keep)
        fg.set_module(node, linear_module(A.LinearSpec(w, b), m))
        return
    s = conv_spec(m)
    w, b = A.drop_out_channels(s.weight, s.bias, keep)
    bias_map = None if s.bias_map is None else s.bias_map[keep]
    fg.set_module(node, conv_module(A.ConvSpec(w, b, s.stride, s.padding, s.dilation, 1, bias_map), m))


def _slice_consumer(fg: FoldGraph, node: fx.Node, src: fx.Node, keep: Tensor, values: Tensor) -> None:
    m = fg.module(node)
    if is_linear(fg, node):
        s = linear_spec(m)
        bias = s.bias + s.weight @ values
        fg.set_module(node, linear_module(A.LinearSpec(A.drop_in_channels(s.weight, keep), bias), m))
        return
    s = conv_spec(m)
    bias, bias_map = s.bias, s.bias_map
    if bool(values.any()):
        h, w = fg.shape(src)[-2:]
        extra = A.additive_through_conv(values.view(-1, 1, 1).expand(-1, h, w).contiguous(), s)
        if extra.dim() == 1:
            bias = bias + extra
        else:
            bias_map = extra if bias_map is None else bias_map + extra
    spec = A.ConvSpec(A.drop_in_channels(s.weight, keep), bias, s.stride, s.padding, s.dilation, 1, bias_map)
    fg.set_module(node, conv_module(spec, m))
