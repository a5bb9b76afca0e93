"""Activation sites: the rectifier calls of a traced graph, their neuron states and linear maps.

A *site* is one call of a rectifier (module, functional or ``Tensor`` method). The activation
registry ``ACTIVATIONS`` says, per kind, how a pre-activation value z maps to a state and which
per-neuron affine map ``a*z + c`` replaces the activation for a neuron that never leaves that state.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

TWO_STATES = ("OFF", "ON")
THREE_STATES = ("OFF", "LINEAR", "SATURATED")


@dataclass(frozen=True)
class ActivationKind:
    """How one rectifier family is measured and linearised (docs/DESIGN.md 2 and 4.1)."""

    name: str
    states: tuple[str, ...]
    exact: bool  # False: linearising it is an approximation (GELU, SiLU, ...)
    # thresholds(params) -> (t,) for two states (ON iff z > t) or (lo, hi) for three
    # (OFF iff z <= lo, SATURATED iff z >= hi)
    thresholds: Callable[[dict], tuple[float, ...]]
    # affine(params, state_index, neurons) -> (scale[neurons], shift[neurons])
    affine: Callable[[dict, int, int], tuple[Tensor, Tensor]]


def _const(neurons: int, value: float | Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=torch.float64).expand(neurons).clone()


def _relu_affine(p: dict, s: int, n: int) -> tuple[Tensor, Tensor]:
    return _const(n, float(s)), _const(n, 0.0)


def _leaky_affine(p: dict, s: int, n: int) -> tuple[Tensor, Tensor]:
    return (_const(n, p["negative_slope"]) if s == 0 else _const(n, 1.0)), _const(n, 0.0)


def _prelu_affine(p: dict, s: int, n: int) -> tuple[Tensor, Tensor]:
    w = p["weight"].detach().to(torch.float64).flatten()
    return (w.expand(n).clone() if s == 0 else _const(n, 1.0)), _const(n, 0.0)


def _clip_affine(p: dict, s: int, n: int) -> tuple[Tensor, Tensor]:
    # OFF -> constant min, LINEAR -> identity, SATURATED -> constant max
    return _const(n, 1.0 if s == 1 else 0.0), _const(n, (p["min"], 0.0, p["max"])[s])


RELU = ActivationKind("relu", TWO_STATES, True, lambda p: (0.0,), _relu_affine)
LEAKY = ActivationKind("leaky_relu", TWO_STATES, True, lambda p: (0.0,), _leaky_affine)
PRELU = ActivationKind("prelu", TWO_STATES, True, lambda p: (0.0,), _prelu_affine)
CLIP = ActivationKind("hardtanh", THREE_STATES, True, lambda p: (p["min"], p["max"]), _clip_affine)
RELU6 = ActivationKind("relu6", THREE_STATES, True, lambda p: (p["min"], p["max"]), _clip_affine)
# Smooth rectifiers: state = sign of z; linearising them is approximate (opt-in, docs/DESIGN.md 4.4).
SMOOTH = {name: ActivationKind(name, TWO_STATES, False, lambda p: (0.0,), _relu_affine)
          for name in ("gelu", "silu", "hardswish", "elu", "mish")}
ACTIVATIONS: dict[str, ActivationKind] = {
    k.name: k for k in (RELU, LEAKY, PRELU, CLIP, RELU6, *SMOOTH.values())}


def call_arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    """Argument ``index`` (or keyword ``name``) of a call node, else ``default``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# module class -> (kind, params from the module)
MODULE_RULES: dict[type, tuple[ActivationKind, Callable[[nn.Module], dict]]] = {
    nn.ReLU: (RELU, lambda m: {}),
    nn.ReLU6: (RELU6, lambda m: {"min": 0.0, "max": 6.0}),
    nn.Hardtanh: (CLIP, lambda m: {"min": float(m.min_val), "max": float(m.max_val)}),
    nn.LeakyReLU: (LEAKY, lambda m: {"negative_slope": float(m.negative_slope)}),
    nn.PReLU: (PRELU, lambda m: {"weight": m.weight}),
    nn.GELU: (SMOOTH["gelu"], lambda m: {}),
    nn.SiLU: (SMOOTH["silu"], lambda m: {}),
    nn.Hardswish: (SMOOTH["hardswish"], lambda m: {}),
    nn.ELU: (SMOOTH["elu"], lambda m: {}),
    nn.Mish: (SMOOTH["mish"], lambda m: {}),
}

# function (or Tensor method name) -> (kind, params from the call node)
FUNCTION_RULES: dict[Any, tuple[ActivationKind, Callable[[fx.Node], dict]]] = {
    F.relu: (RELU, lambda n: {}),
    torch.relu: (RELU, lambda n: {}),
    "relu": (RELU, lambda n: {}),
    F.relu6: (RELU6, lambda n: {"min": 0.0, "max": 6.0}),
    F.hardtanh: (CLIP, lambda n: {"min": float(call_arg(n, 1, "min_val", -1.0)),
                                  "max": float(call_arg(n, 2, "max_val", 1.0))}),
    F.leaky_relu: (LEAKY, lambda n: {"negative_slope": float(call_arg(n, 1, "negative_slope", 0.01))}),
    F.gelu: (SMOOTH["gelu"], lambda n: {}),
    F.silu: (SMOOTH["silu"], lambda n: {}),
    F.hardswish: (SMOOTH["hardswish"], lambda n: {}),
    F.elu: (SMOOTH["elu"], lambda n: {}),
    F.mish: (SMOOTH["mish"], lambda n: {}),
}


@dataclass
class Site:
    """One rectifier call in the graph."""

    name: str                  # fx node name: unique, stable for the same architecture
    target: str                # human label: module path (#k for the k-th reuse) or function name
    kind: ActivationKind
    node: fx.Node
    neuron_axis: int           # 1 (conv-like, N,C,...) or -1 (linear / channels-last)
    axis_reason: str           # which producer decided the axis
    params: dict = field(default_factory=dict)

    @property
    def input(self) -> fx.Node:
        """The pre-activation node z."""
        return self.node.args[0] if self.node.args else self.node.kwargs["input"]


def classify_node(gm: fx.GraphModule, node: fx.Node) -> tuple[ActivationKind, dict] | None:
    """The activation kind and parameters of ``node``, or None if it is not a rectifier call."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        for cls in type(mod).__mro__:  # exact class first: ReLU6 before its base Hardtanh
            if cls in MODULE_RULES:
                kind, params = MODULE_RULES[cls]
                return kind, params(mod)
        return None
    if node.op in ("call_function", "call_method") and node.target in FUNCTION_RULES:
        kind, params = FUNCTION_RULES[node.target]
        return kind, params(node)
    return None


def find_sites(gm: fx.GraphModule) -> list[Site]:
    """Every rectifier call of ``gm`` in graph order; a module called twice gives two sites."""
    sites: list[Site] = []
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        found = classify_node(gm, node)
        if found is None:
            continue
        kind, params = found
        if node.op == "call_module":
            k = calls.get(node.target, 0)
            calls[node.target] = k + 1
            target = node.target if k == 0 else f"{node.target}#{k}"
        else:
            target = getattr(node.target, "__name__", str(node.target))
        # the first trace's label sticks (a re-traced copy with sites removed renumbers calls)
        target = node.meta.setdefault("nc_site_label", target)
        axis, reason = neuron_axis(gm, node.args[0] if node.args else node.kwargs["input"])
        sites.append(Site(node.name, target, kind, node, axis, reason, params))
    return sites


# ---- neuron axis from the producer ------------------------------------------------------------

_CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                  nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
_CHANNEL_LAST = (nn.Linear, nn.LayerNorm, nn.Bilinear)
_FUNCTION_AXIS = {F.conv1d: 1, F.conv2d: 1, F.conv3d: 1, F.batch_norm: 1, F.linear: -1,
                  torch.matmul: -1, operator.matmul: -1, F.layer_norm: -1}
# ops whose output channels are their (first tensor) input's channels
_PASS_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
                   torch.mul, F.dropout, torch.cat}
_PASS_MODULES = (nn.Dropout, nn.Identity, nn.modules.dropout._DropoutNd)


def neuron_axis(gm: fx.GraphModule, z: Any, depth: int = 0) -> tuple[int, str]:
    """Neuron axis of pre-activation ``z``, decided by the weighted/normalising op producing it.

    Conv-like producers (conv, BatchNorm, GroupNorm) give axis 1; Linear, LayerNorm, matmul give the
    last axis. Element-wise ops (add, mul, dropout, other rectifiers) are looked through. When no
    producer decides, axis 1 is used and the reason says so.
    """
    if isinstance(z, fx.Node) and depth < 64:
        if z.op == "call_module":
            mod = gm.get_submodule(z.target)
            if isinstance(mod, _CHANNEL_FIRST):
                return 1, f"{type(mod).__name__} {z.target}"
            if isinstance(mod, _CHANNEL_LAST):
                return -1, f"{type(mod).__name__} {z.target}"
            if isinstance(mod, _PASS_MODULES) or classify_node(gm, z) is not None:
                return neuron_axis(gm, z.args[0], depth + 1)
        elif z.op == "call_function" and z.target in _FUNCTION_AXIS:
            return _FUNCTION_AXIS[z.target], getattr(z.target, "__name__", str(z.target))
        elif (z.op == "call_function" and z.target in _PASS_FUNCTIONS) or classify_node(gm, z):
            for a in z.args:
                a = a[0] if isinstance(a, (list, tuple)) and a else a
                if isinstance(a, fx.Node):
                    axis, reason = neuron_axis(gm, a, depth + 1)
                    if not reason.startswith("no producer"):
                        return axis, reason
    return 1, "no producer found: channel axis 1 assumed"
