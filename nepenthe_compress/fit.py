"""Does the data fit the model? The input its first layer expects, compared with the data's shape
before any forward pass (a mismatch otherwise surfaces as a traceback deep inside the model).

The first layer is the conv / linear layer that consumes the graph input of the model's torch.fx
graph (its own graph for a ``GraphModule``, else a symbolic trace), reached only through steps
that keep the channel axis (dropout, identity, ``contiguous``, arithmetic with a number, shape
queries) or, for a Linear, a ``flatten(x, 1)``. Anything else between them (a channel
``repeat``, a ``cat``, indexing, several inputs, an untraceable model) leaves the first layer
undetermined, and then nothing is checked: the check never refuses data the model could take.
"""
from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from nepenthe_compress.errors import DataError

MAX_STEPS = 64  # graph nodes followed from the input before giving up
_PASS_MODULES = (nn.Identity, nn.modules.dropout._DropoutNd, nn.AlphaDropout)
_PASS_METHODS = frozenset({"contiguous", "float", "clone", "detach"})
_SCALAR_OPS = frozenset({operator.add, operator.sub, operator.mul, operator.truediv})
_SHAPE_ATTRS = frozenset({"shape", "dtype", "device", "ndim"})
_SHAPE_METHODS = frozenset({"size", "dim"})
_SPATIAL_NAMES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


@dataclass(frozen=True)
class ExpectedInput:
    """What the model's first layer takes from one sample."""

    layer: str              # module path, e.g. "conv1"
    kind: str               # module class, e.g. "Conv2d"
    features: int           # in_channels of a conv, in_features of a Linear
    spatial: int | None     # spatial dims of a conv (2 for Conv2d); None for a Linear
    flattened: bool = False  # a Linear fed flatten(x, 1): the whole sample is its features


def _as_layer(name: str, module: nn.Module, flattened: bool) -> ExpectedInput | None:
    kind = type(module).__name__
    if isinstance(module, nn.modules.conv._ConvNd) and module.in_channels > 0 and not flattened:
        return ExpectedInput(name, kind, module.in_channels, len(module.kernel_size))
    if isinstance(module, nn.Linear) and module.in_features > 0:
        return ExpectedInput(name, kind, module.in_features, None, flattened)
    return None


def _shape_query(node: fx.Node) -> bool:
    """A use of the input that reads its metadata, not its values."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _SHAPE_ATTRS
    return node.op == "call_method" and node.target in _SHAPE_METHODS


def _batch_size(node: object, value: fx.Node) -> bool:
    """``node`` is ``value.size(0)`` or ``value.shape[0]``."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target == "size":
        return node.args == (value, 0)
    shape = node.args[0] if node.op == "call_function" and node.target is operator.getitem else None
    return (isinstance(shape, fx.Node) and shape.target is getattr and shape.args == (value, "shape")
            and node.args[1] == 0)


def _flattens(node: fx.Node, value: fx.Node, root: nn.Module) -> bool:
    """``value`` flattened to (batch, features): ``flatten(x, 1)``, ``nn.Flatten()``,
    ``x.view(x.size(0), -1)`` or ``x.view(-1, F)`` (``reshape`` alike)."""
    if node.op == "call_method" and node.target in ("view", "reshape") and node.args[:1] == (value,):
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        return len(dims) == 2 and ((_batch_size(dims[0], value) and dims[1] == -1)
                                   or (dims[0] == -1 and isinstance(dims[1], int) and dims[1] > 0))
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        return isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1
    if (node.op, node.target) in (("call_function", torch.flatten), ("call_method", "flatten")):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1
    return False


def _keeps_channels(node: fx.Node, value: fx.Node, root: nn.Module) -> bool:
    """``node`` passes ``value`` on with the same shape."""
    if node.op == "call_module":
        return isinstance(root.get_submodule(node.target), _PASS_MODULES)
    if node.op == "call_method":
        return node.target in _PASS_METHODS and node.args[:1] == (value,)
    if node.op == "call_function" and node.target in _SCALAR_OPS and len(node.args) == 2:
        other = node.args[1] if node.args[0] is value else node.args[0]
        return isinstance(other, (int, float)) and not isinstance(other, bool)
    return False


def first_layer(root: nn.Module, graph: fx.Graph) -> ExpectedInput | None:
    """The conv / linear layer consuming the single input of ``graph`` (modules resolved in
    ``root``), or None when that cannot be told for sure."""
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return None
    value, flattened = inputs[0], False
    for _ in range(MAX_STEPS):
        users = [u for u in value.users if not _shape_query(u)]
        if len(users) != 1:
            return None
        node = users[0]
        if node.op == "call_module" and node.args[:1] == (value,):
            layer = _as_layer(str(node.target), root.get_submodule(node.target), flattened)
            if layer is not None:
                return layer
        if _flattens(node, value, root) and node.args[:1] == (value,):
            flattened = True
        elif not _keeps_channels(node, value, root):
            return None
        value = node
    return None


def expected_input(model: nn.Module) -> ExpectedInput | None:
    """The input ``model``'s first layer expects, or None when it cannot be determined (several
    inputs, an untraceable model, anything but a plain path from the input to a conv / linear)."""
    if isinstance(model, fx.GraphModule):
        return first_layer(model, model.graph)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = fx.Tracer().trace(model)
    except Exception:  # an untraceable model is not a data problem: the check is skipped
        return None
    return first_layer(model, graph)


def fit_problem(expected: ExpectedInput, sample: Sequence[int], random: bool = False) -> str | None:
    """Why samples of shape ``sample`` (no batch) do not fit ``expected``, or None if they do.
    ``random``: the samples are random inputs of a given shape (the hint then fixes the shape)."""
    sample = tuple(sample)
    source = "random inputs" if random else "data"
    where = f"the model's first layer {expected.layer} ({expected.kind})"
    if expected.spatial is not None:
        if len(sample) != expected.spatial + 1:
            want = (expected.features, *_SPATIAL_NAMES.get(expected.spatial, ("...",)))
            return (f"{source} samples have shape {sample} but {where} expects samples of shape "
                    f"({', '.join(map(str, want))})")
        if sample[0] == expected.features:
            return None
        fixed = ",".join(map(str, (expected.features, *sample[1:])))
        hint = (f" (pass --input-shape {fixed})" if random else
                f" (pass --channels {expected.features} to replicate grey images)" if sample[0] == 1 else "")
        has = "have" if random else "has"
        return f"{source} {has} {sample[0]} channel(s) but {where} expects {expected.features}{hint}"
    have = math.prod(sample) if expected.flattened or not sample else sample[-1]
    if have == expected.features:
        return None
    what = "flattened" if expected.flattened else "on the last axis"
    return (f"{source} samples of shape {sample} give {have} features {what} but {where} expects "
            f"{expected.features} input features")


def check_fit(model: nn.Module, x_shape: Sequence[int], *, random: bool = False) -> None:
    """Raise ``DataError`` when inputs of shape ``x_shape`` (batch first) cannot feed ``model``'s
    first layer; do nothing when that layer cannot be determined. ``random``: the inputs are
    random samples of a shape the user gave, not loaded data."""
    expected = expected_input(model)
    problem = None if expected is None else fit_problem(expected, tuple(x_shape)[1:], random)
    if problem is not None:
        raise DataError(problem)
