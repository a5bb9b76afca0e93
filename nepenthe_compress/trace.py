"""torch.fx tracing with in-place ops rewritten out of place (same semantics, pure dataflow)."""
from __future__ import annotations

import copy
import operator
import traceback
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from nepenthe_compress.errors import TraceError, first_line

# in-place function -> out-of-place twin
_INPLACE_FUNCTIONS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, torch.relu_: torch.relu, F.relu_: F.relu,
    F.leaky_relu_: F.leaky_relu, F.hardtanh_: F.hardtanh, F.elu_: F.elu,
}


class _Tracer(fx.Tracer):
    def __init__(self, leaves: tuple[type, ...], leaf_names: frozenset[str]) -> None:
        super().__init__()
        self._leaves = leaves
        self._leaf_names = leaf_names

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self._leaves) or qualname in self._leaf_names or type(m).__name__ in self._leaf_names:
            return True
        return super().is_leaf_module(m, qualname)


def trace_model(model: nn.Module, leaf_modules: Iterable[type | str] = ()) -> fx.GraphModule:
    """Symbolically trace a deep copy of ``model`` (eval mode) and make every in-place op pure.

    ``leaf_modules`` are module classes, class names or qualified names kept opaque (use them for
    modules with data-dependent control flow). Raises ``TraceError`` naming the failing construct.
    """
    if isinstance(model, fx.GraphModule):  # already traced: keep its node (site) names
        gm = copy.deepcopy(model).eval()
        remove_inplace(gm)
        return gm
    leaves = tuple(x for x in leaf_modules if isinstance(x, type))
    names = frozenset(x for x in leaf_modules if isinstance(x, str))
    model = copy.deepcopy(model).eval()
    try:
        graph = _Tracer(leaves, names).trace(model)
    except Exception as e:  # fx raises many exception types for untraceable code
        first = first_line(e)
        raise TraceError(
            f"cannot trace {type(model).__name__} with torch.fx: {type(e).__name__}: {first}"
            f"{_user_frame(e)} (mark the module that contains this construct as a leaf with --leaf NAME)"
        ) from None
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    remove_inplace(gm)
    return gm


def _user_frame(e: BaseException) -> str:
    """' at file:line (code)' of the innermost traceback frame outside torch, if any."""
    torch_dir = Path(torch.__file__).parent
    frames = [f for f in traceback.extract_tb(e.__traceback__) if torch_dir not in Path(f.filename).parents]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {Path(f.filename).name}:{f.lineno} ({(f.line or '').strip()})"


def remove_inplace(gm: fx.GraphModule) -> None:
    """Rewrite in-place ops out of place; later readers of the mutated tensor read the result."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    made_pure: set[str] = set()  # modules already switched to inplace=False (shared modules)
    for node in list(gm.graph.nodes):
        if not _make_pure(gm, node, made_pure) or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        mutated = node.args[0]
        for user in list(mutated.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(mutated, node)
    gm.recompile()


def _make_pure(gm: fx.GraphModule, node: fx.Node, made_pure: set[str]) -> bool:
    """Turn ``node`` into its out-of-place form in place; True if it was in-place."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if getattr(mod, "inplace", False) is True:
            mod.inplace = False
            made_pure.add(node.target)
        return node.target in made_pure
    elif node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS:
            node.target = _INPLACE_FUNCTIONS[node.target]
            return True
        if node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
            return True
    elif node.op == "call_method":
        name = node.target
        # x.relu_() -> x.relu(); not requires_grad_ (its twin is a property, not a method)
        if name.endswith("_") and not name.startswith("_") and callable(getattr(torch.Tensor, name[:-1], None)):
            node.target = name[:-1]
            return True
    return False


def shape_of(node: fx.Node) -> torch.Size | None:
    """Output shape recorded by ``propagate_shapes`` (None when unknown or not a tensor)."""
    return node.meta.get("output_shape")


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph and records each node's output shape (``fx.passes.shape_prop.ShapeProp`` does the
    same but imports torch's symbolic-shape machinery, half a second of every fold)."""

    def run_node(self, n: fx.Node) -> object:
        result = super().run_node(n)
        n.meta["output_shape"] = result.shape if isinstance(result, torch.Tensor) else None
        return result


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Record every node's output shape in ``node.meta['output_shape']``."""
    with torch.no_grad():
        _ShapeRecorder(gm).run(example)
