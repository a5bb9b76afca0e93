"""The ops vocabulary of the fold pass: what an fx node is, and the layer-spec protocol.

Node predicates (``is_affine``, ``is_depthwise``, ``keeps_constants``, ...) are the only place the
rewrites learn what a node computes. Weighted layers go through the ``LAYERS`` registry: per layer
kind, how to read its module as a pure spec (``fold.algebra``), build a module back, and which pure
function performs each merge on it, so a rewrite never branches on conv vs linear::

    kind = layer_kind(gm, node)
    merged = kind.compose(kind.spec_of(a), kind.spec_of(b), in_shape, False)
    new = module_of(merged, like=module(gm, node))

A capability a kind lacks is None (a ConvTranspose only takes an affine map after it).
``evaluate`` runs one node on given input values (constant propagation, per-channel constants).
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from nepenthe_compress.fold import algebra as A
from nepenthe_compress.fold import border as BD
from nepenthe_compress.fold.modules import BorderConv2d, ChannelAffine, MapConv2d
from nepenthe_compress.sites import ActivationKind, call_arg, classify_node
from nepenthe_compress.trace import shape_of

Spec = A.ConvSpec | A.LinearSpec | A.ConvTransposeSpec | BD.BorderConvSpec
Shape = torch.Size | tuple[int, ...]   # a tensor shape, batch axis included


# ---- layer kinds ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerKind:
    """One kind of weighted layer: module <-> spec, and the pure algebra of every merge with it.

    Shapes passed in are the layer's full input shape (batch axis included)."""

    name: str
    spec_type: type
    matches: Callable[[nn.Module], bool]
    spec_of: Callable[[nn.Module], Spec]                     # float64 spec of a module
    build: Callable[[Spec, nn.Module], nn.Module]            # module holding a spec, in like's dtype
    channel_axis: Callable[[int], int]                       # rank -> positive channel axis
    then_affine: Callable[[Spec, Tensor, Tensor], Spec] | None = None   # affine(layer(x))
    affine_then: Callable[[Tensor, Tensor, Spec, Shape], Spec] | None = None  # layer(a*x + c)
    compose: Callable[[Spec, Spec, Shape, bool], Spec] | None = None    # b(a(x)); allow_inexact
    structure: Callable[[Spec, Spec, Shape, bool], Spec] | None = None  # compose without the weights
    # (same type, shapes, groups and refusals: what a cost model reads); None: price the composition
    add: Callable[[Spec, Spec, Shape], Spec] | None = None              # a(x) + b(x)
    identity: Callable[[int, torch.dtype], Spec] | None = None          # channels -> identity
    drop_out: Callable[[Spec, Tensor], Spec] | None = None              # keep output channels
    drop_in: Callable[[Spec, Tensor, Tensor, Shape], Spec] | None = None  # keep inputs; constants
    work: Callable[[Spec, Shape], tuple[int, int, int]] | None = None   # (outputs, MACs, extra adds)
    algebra: tuple[Callable, ...] = ()                                  # the pure functions used
    family: str | None = None       # kinds of one family chain and add together (default: name)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _bias(m: nn.Module, outputs: int, dtype: torch.dtype) -> Tensor:
    return m.bias.detach().to(dtype) if m.bias is not None else torch.zeros(outputs, dtype=dtype)


def conv_spec(m: nn.Conv2d, dtype: torch.dtype = torch.float64) -> A.ConvSpec:
    """ConvSpec of a Conv2d / MapConv2d, in ``dtype``."""
    bias_map = getattr(m, "bias_map", None)
    return A.ConvSpec(m.weight.detach().to(dtype), _bias(m, m.out_channels, dtype), _pair(m.stride),
                      _pair(m.padding), _pair(m.dilation), m.groups, None if bias_map is None else bias_map.detach().to(dtype))


def _copy_into(m: nn.Module, spec: Spec) -> nn.Module:
    with torch.no_grad():
        m.weight.copy_(spec.weight)
        m.bias.copy_(spec.bias)
    return m


def _conv_kwargs(spec: A.ConvSpec, like: nn.Module) -> dict:
    co, ci_g, kh, kw = spec.weight.shape
    return dict(in_channels=ci_g * spec.groups, out_channels=co, kernel_size=(kh, kw),
                stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
                groups=spec.groups, bias=True, padding_mode="zeros",
                device=like.weight.device, dtype=like.weight.dtype)


def conv_module(spec: A.ConvSpec, like: nn.Module) -> nn.Conv2d:
    """A Conv2d (MapConv2d when the spec has a bias map) holding ``spec`` in ``like``'s dtype/device."""
    kwargs = _conv_kwargs(spec, like)
    m = (MapConv2d(**kwargs, bias_map=spec.bias_map) if spec.bias_map is not None
         else nn.Conv2d(**kwargs))
    return _copy_into(m, spec)


def border_conv_spec(m: BorderConv2d, dtype: torch.dtype = torch.float64) -> BD.BorderConvSpec:
    pieces = tuple(replace(g, weight=w.detach().to(dtype)) for w, g in m.pieces())
    return BD.BorderConvSpec(conv_spec(m, dtype), pieces, m.in_hw)


def border_conv_module(spec: BD.BorderConvSpec, like: nn.Module) -> nn.Conv2d:
    """A BorderConv2d holding ``spec`` (a plain conv module when it has no pieces)."""
    if not spec.pieces:
        return conv_module(spec.main, like)
    m = BorderConv2d(**_conv_kwargs(spec.main, like), pieces=spec.pieces, in_hw=spec.in_hw,
                     bias_map=spec.main.bias_map)
    return _copy_into(m, spec.main)


def linear_spec(m: nn.Linear, dtype: torch.dtype = torch.float64) -> A.LinearSpec:
    return A.LinearSpec(m.weight.detach().to(dtype), _bias(m, m.out_features, dtype))


def linear_module(spec: A.LinearSpec, like: nn.Module) -> nn.Linear:
    out_f, in_f = spec.weight.shape
    m = nn.Linear(in_f, out_f, bias=True, device=like.weight.device, dtype=like.weight.dtype)
    return _copy_into(m, spec)


def conv_transpose_spec(m: nn.ConvTranspose2d, dtype: torch.dtype = torch.float64) -> A.ConvTransposeSpec:
    return A.ConvTransposeSpec(m.weight.detach().to(dtype), _bias(m, m.out_channels, dtype), m.groups,
                               _pair(m.stride), _pair(m.padding), _pair(m.output_padding), _pair(m.dilation))


def conv_transpose_module(spec: A.ConvTransposeSpec, like: nn.ConvTranspose2d) -> nn.ConvTranspose2d:
    ci, cog, kh, kw = spec.weight.shape
    m = nn.ConvTranspose2d(ci, cog * spec.groups, (kh, kw), spec.stride, spec.padding,
                           spec.output_padding, spec.groups, True, spec.dilation, like.padding_mode,
                           device=like.weight.device, dtype=like.weight.dtype)
    return _copy_into(m, spec)


def _hw(shape: Shape) -> tuple[int, int]:
    return (int(shape[-2]), int(shape[-1]))


def _conv_work(spec: A.ConvSpec, in_shape: Shape) -> tuple[int, int, int]:
    ho, wo = spec.out_size(_hw(in_shape))
    co, ci_g, kh, kw = spec.weight.shape
    outputs = co * ho * wo
    return outputs, outputs * ci_g * kh * kw, outputs if spec.bias_map is not None else 0


def _linear_work(spec: A.LinearSpec, in_shape: Shape) -> tuple[int, int, int]:
    rows = 1
    for d in in_shape[1:-1]:
        rows *= int(d)
    outputs = rows * spec.weight.shape[0]
    return outputs, outputs * spec.weight.shape[1], 0


def _is_conv2d(m: nn.Module) -> bool:
    """A plain zero-padded Conv2d (or MapConv2d) with explicit padding."""
    return type(m) in (nn.Conv2d, MapConv2d) and m.padding_mode == "zeros" and isinstance(m.padding, tuple)


CONV2D = LayerKind(
    "conv2d", A.ConvSpec, _is_conv2d, conv_spec, conv_module, channel_axis=lambda rank: 1,
    then_affine=A.conv_then_affine,
    affine_then=lambda a, c, spec, shape: A.affine_then_conv(a, c, spec, _hw(shape)),
    compose=lambda a, b, shape, inexact: BD.compose(a, b, _hw(shape), inexact),   # border-corrected
    add=lambda a, b, shape: BD.add(a, b, _hw(shape)),                              # if needed
    structure=lambda a, b, shape, inexact: BD.structure(a, b, _hw(shape), inexact),
    identity=A.identity_conv,
    drop_out=A.drop_conv_outputs,
    drop_in=lambda spec, keep, values, shape: A.drop_conv_inputs(spec, keep, values, _hw(shape)),
    work=_conv_work, family="conv2d",
    algebra=(A.conv_then_affine, A.affine_then_conv, A.compose_convs, BD.compose_corrected, A.add_convs,
             A.identity_conv, A.drop_conv_outputs, A.drop_conv_inputs))

BORDER_CONV2D = LayerKind(
    "border_conv2d", BD.BorderConvSpec, lambda m: type(m) is BorderConv2d, border_conv_spec,
    border_conv_module, channel_axis=lambda rank: 1,
    then_affine=BD.then_affine,
    affine_then=lambda a, c, spec, shape: BD.affine_then(a, c, spec, _hw(shape)),
    compose=lambda a, b, shape, inexact: BD.compose(a, b, _hw(shape), inexact),   # refuses: merged once
    add=lambda a, b, shape: BD.add(a, b, _hw(shape)),
    structure=lambda a, b, shape, inexact: BD.structure(a, b, _hw(shape), inexact),
    identity=BD.identity,
    drop_out=BD.drop_out,
    drop_in=lambda spec, keep, values, shape: BD.drop_in(spec, keep, values, _hw(shape)),
    work=lambda spec, shape: BD.work(spec, _hw(shape)),
    algebra=(BD.then_affine, BD.affine_then, BD.compose, BD.add, BD.identity, BD.drop_out, BD.drop_in),
    family="conv2d")

LINEAR = LayerKind(
    "linear", A.LinearSpec, lambda m: type(m) is nn.Linear, linear_spec, linear_module,
    channel_axis=lambda rank: rank - 1,
    then_affine=A.linear_then_affine,
    affine_then=lambda a, c, spec, shape: A.affine_then_linear(a, c, spec),
    compose=lambda a, b, shape, inexact: A.compose_linears(a, b),
    structure=lambda a, b, shape, inexact: A.LinearSpec(BD.stand_in((b.weight.shape[0], a.weight.shape[1]),
                                                                    a.weight.dtype), b.bias),
    add=lambda a, b, shape: A.add_linears(a, b),
    identity=A.identity_linear,
    drop_out=A.drop_linear_outputs,
    drop_in=lambda spec, keep, values, shape: A.drop_linear_inputs(spec, keep, values),
    work=_linear_work,
    algebra=(A.linear_then_affine, A.affine_then_linear, A.compose_linears, A.add_linears,
             A.identity_linear, A.drop_linear_outputs, A.drop_linear_inputs))

CONV_TRANSPOSE2D = LayerKind(
    "conv_transpose2d", A.ConvTransposeSpec, lambda m: type(m) is nn.ConvTranspose2d,
    conv_transpose_spec, conv_transpose_module, channel_axis=lambda rank: 1,
    then_affine=A.conv_transpose_then_affine, algebra=(A.conv_transpose_then_affine,))

LAYERS: tuple[LayerKind, ...] = (CONV2D, BORDER_CONV2D, LINEAR, CONV_TRANSPOSE2D)
_BY_SPEC = {k.spec_type: k for k in LAYERS}


def module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The submodule a call_module node runs, else None."""
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def layer_kind(gm: fx.GraphModule, node: fx.Node) -> LayerKind | None:
    """The registered layer kind ``node`` calls, or None."""
    m = module(gm, node)
    return None if m is None else next((k for k in LAYERS if k.matches(m)), None)


def kind_of_spec(spec: Spec) -> LayerKind:
    return _BY_SPEC[type(spec)]


def spec_of(gm: fx.GraphModule, node: fx.Node) -> Spec:
    """The float64 spec of a layer node (``layer_kind`` must not be None)."""
    return layer_kind(gm, node).spec_of(module(gm, node))


def module_of(spec: Spec, like: nn.Module) -> nn.Module:
    """A fresh module computing ``spec`` in ``like``'s dtype and device."""
    return kind_of_spec(spec).build(spec, like)


def is_layer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A weighted layer the fold can merge and slice (conv2d, linear)."""
    kind = layer_kind(gm, node)
    return kind is not None and kind.compose is not None


def same_layer_kind(gm: fx.GraphModule, a: fx.Node, b: fx.Node) -> bool:
    """Both mergeable layers of one family (a conv2d and a border-corrected conv2d are)."""
    ka, kb = layer_kind(gm, a), layer_kind(gm, b)
    return (ka is not None and kb is not None and ka.compose is not None
            and (ka.family or ka.name) == (kb.family or kb.name))


def is_dense(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A layer without groups (its channels can be dropped one by one)."""
    return getattr(module(gm, node), "groups", 1) == 1


def merge_refusal(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why a conv-like node cannot be merged with its neighbours (None if it can, or is no conv)."""
    m = module(gm, node)
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return "ConvTranspose merges are not supported (its BatchNorm is still folded)"
    if isinstance(m, nn.modules.conv._ConvNd) and not is_layer(gm, node):
        return f"merges of {type(m).__name__} with padding_mode={m.padding_mode!r} are not supported"
    return None


def channel_axis(gm: fx.GraphModule, node: fx.Node) -> int:
    """Positive channel axis of a layer node's input/output tensors (conv 1, linear last)."""
    return layer_kind(gm, node).channel_axis(len(shape_of(node)))


# ---- other ops ------------------------------------------------------------------------------------

ADD_FUNCTIONS = (operator.add, torch.add)
_POOLS = (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = {F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}


def only_input(node: fx.Node) -> fx.Node | None:
    """The node's single tensor input when it is called with exactly one positional Node."""
    if len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def is_affine(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A per-channel affine map (a linearised site, a folded BatchNorm, a constant branch)."""
    return isinstance(module(gm, node), ChannelAffine)


def is_identity_affine(m: nn.Module | None) -> bool:
    return isinstance(m, ChannelAffine) and bool((m.scale == 1).all() and (m.shift == 0).all())


def is_batchnorm(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(module(gm, node), nn.modules.batchnorm._BatchNorm)


def is_layernorm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A LayerNorm over the last axis with an elementwise affine (gamma, beta)."""
    m = module(gm, node)
    return isinstance(m, nn.LayerNorm) and m.weight is not None and len(m.normalized_shape) == 1


def is_eval_noop(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Identity in eval mode: Dropout, Identity, an identity affine map."""
    m = module(gm, node)
    return (isinstance(m, (nn.Identity, nn.modules.dropout._DropoutNd)) or is_identity_affine(m)
            or (node.op == "call_function" and node.target is F.dropout
                and not node.kwargs.get("training", False)))


def is_add(node: fx.Node) -> bool:
    """A binary ``a + b`` of two tensors (operator or torch.add, no alpha)."""
    return (node.op == "call_function" and node.target in ADD_FUNCTIONS and len(node.args) == 2
            and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args))


def activation(gm: fx.GraphModule, node: fx.Node) -> tuple[ActivationKind, dict] | None:
    """The rectifier kind and parameters of ``node`` (the ``sites`` registry), or None."""
    return classify_node(gm, node)


def is_depthwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    m = module(gm, node)
    return layer_kind(gm, node) is CONV2D and m.groups == m.in_channels == m.out_channels


def is_flatten(gm: fx.GraphModule, node: fx.Node) -> bool:
    """flatten(x, 1): channel i becomes features [i*HW, (i+1)*HW)."""
    m = module(gm, node)
    if isinstance(m, nn.Flatten):
        return m.start_dim == 1 and m.end_dim == -1
    if (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"):
        return call_arg(node, 1, "start_dim", 0) == 1 and call_arg(node, 2, "end_dim", -1) == -1
    return False


def keeps_constants(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Pooling and flatten map a constant channel to the same constant (max-pool pads with -inf,
    adaptive and unpadded average pools only average real positions)."""
    m = module(gm, node)
    return (isinstance(m, _POOLS) or (isinstance(m, nn.AvgPool2d) and m.padding in (0, (0, 0)))
            or (node.op == "call_function" and node.target in _POOL_FUNCTIONS) or is_flatten(gm, node))


def is_per_channel(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Channel i of the output depends on channel i of the (first) input only: rectifiers without
    per-channel parameters, affine maps, depthwise convs, pooling, flatten."""
    found = activation(gm, node)
    return ((found is not None and found[0].name != "prelu") or is_affine(gm, node)
            or is_depthwise(gm, node) or keeps_constants(gm, node))


def evaluate(gm: fx.GraphModule, node: fx.Node, values: Mapping[fx.Node, Any]) -> Any:
    """Run one call node with its Node arguments taken from ``values``."""
    args = fx.node.map_arg(node.args, lambda n: values[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
    if node.op == "call_module":
        return module(gm, node)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    return getattr(args[0], node.target)(*args[1:], **kwargs)
