"""Depth of an ONNX graph: weighted layers on the longest input-to-output path (docs/DESIGN.md 4.3).

A node is a *weighted layer* when its op is in ``WEIGHT_OPERANDS``, one of the listed operands is a
constant (an initializer, a Constant node, or anything computed from constants only, e.g. a
Transpose/Reshape of an initializer) and at least one input depends on a graph input. So
activation x activation MatMuls (attention scores) do not count. Subgraphs (If/Loop/Scan bodies)
are ignored: such a node counts as one unweighted node.
"""
from __future__ import annotations

import math
import os
from collections import Counter, defaultdict, deque
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from nepenthe_compress.errors import UserError

# op type -> indices of the operands that may carry the weight (None: any input)
WEIGHT_OPERANDS: dict[str, tuple[int, ...] | None] = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gemm": (0, 1),
    "MatMul": (0, 1),
    "Einsum": None,
}
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                         onnx.TensorProto.BFLOAT16})


def _model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    try:
        return onnx.load(str(model), load_external_data=False)
    except Exception as e:  # missing file, protobuf DecodeError, ...
        raise UserError(f"cannot read ONNX model '{Path(model)}': {type(e).__name__}: {e}") from e


def _topological(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Nodes in dependency order (Kahn's algorithm; ONNX requires sorted nodes, but do not trust the file)."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    deps = [{producer[v] for v in node.input if v in producer} for node in graph.node]
    users: dict[int, list[int]] = defaultdict(list)
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)
    pending = [len(ds) for ds in deps]
    ready = deque(i for i, n in enumerate(pending) if n == 0)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for u in users[i]:
            pending[u] -= 1
            if pending[u] == 0:
                ready.append(u)
    if len(order) != len(graph.node):
        raise UserError("ONNX graph has a cycle")
    return [graph.node[i] for i in order]


def _constants(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> set[str]:
    """Values that do not depend on any graph input (initializers count as constants even when an old
    exporter also listed them as graph inputs)."""
    const = {init.name for init in graph.initializer}
    for node in nodes:
        if all(v in const for v in node.input if v):
            const.update(o for o in node.output if o)
    return const


def _is_weighted(node: onnx.NodeProto, const: set[str]) -> bool:
    if node.op_type not in WEIGHT_OPERANDS or node.domain not in ("", "ai.onnx"):
        return False
    operands = WEIGHT_OPERANDS[node.op_type]
    picked = [v for k, v in enumerate(node.input) if v and (operands is None or k in operands)]
    return any(v in const for v in picked) and any(v not in const for v in node.input if v)


def count_weighted(model: onnx.ModelProto | str | os.PathLike) -> dict[str, int]:
    """Number of weighted layers per op type (whole graph, not only the longest path)."""
    graph = _model(model).graph
    nodes = _topological(graph)
    const = _constants(graph, nodes)
    return dict(Counter(n.op_type for n in nodes if _is_weighted(n, const)))


def onnx_depth(model: onnx.ModelProto | str | os.PathLike) -> int:
    """Weighted layers on the longest path from any graph input to any graph output."""
    graph = _model(model).graph
    nodes = _topological(graph)
    const = _constants(graph, nodes)
    depth = {i.name: 0 for i in graph.input if i.name not in const}
    for node in nodes:
        reached = [depth[v] for v in node.input if v in depth]
        if reached:
            d = max(reached) + _is_weighted(node, const)
            depth.update((o, d) for o in node.output if o)
    return max((depth.get(o.name, 0) for o in graph.output), default=0)


def onnx_param_count(model: onnx.ModelProto | str | os.PathLike) -> int:
    """Number of elements in the floating-point initializers."""
    return sum(math.prod(init.dims) for init in _model(model).graph.initializer if init.data_type in FLOAT_TYPES)


@dataclass
class OnnxSummary:
    depth: int                  # weighted layers on the longest input-to-output path
    weighted: dict[str, int]    # weighted layers per op type, whole graph
    params: int                 # elements of floating-point initializers

    def to_dict(self) -> dict:
        return asdict(self)


def onnx_summary(model: onnx.ModelProto | str | os.PathLike) -> OnnxSummary:
    """Depth, weighted-layer counts and parameter count, reading the model once."""
    proto = _model(model)
    return OnnxSummary(onnx_depth(proto), count_weighted(proto), onnx_param_count(proto))
