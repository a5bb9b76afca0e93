"""Which weighted layers feed which rectifier sites (the "considered layers" of docs/DESIGN.md 3).

Walk back from each site's pre-activation through BatchNorm, dropout, identity, residual adds and
scalar affine ops to the Conv / Linear modules that produce it. Also: models with linearised sites.
"""
from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from nepenthe_compress.archs import build_model
from nepenthe_compress.checkpoint import apply_linearised
from nepenthe_compress.sites import Site

WEIGHTED: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)
# modules / functions whose output neurons are their input's neurons (looked through by the walk)
PASS_MODULES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.Identity,
                                            nn.modules.dropout._DropoutNd)
PASS_FUNCTIONS = {F.batch_norm, F.dropout}
SUM_FUNCTIONS = {operator.add, operator.sub, torch.add, torch.sub}      # every tensor input feeds
SCALE_FUNCTIONS = {operator.mul, operator.truediv, torch.mul}            # only with a constant factor
SUM_METHODS = {"add", "sub"}


def _inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]


def _through(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node] | None:
    """Nodes the walk continues to from ``node``; None when ``node`` ends it."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), PASS_MODULES):
        return [node.args[0]]
    if node.op == "call_function" and node.target in PASS_FUNCTIONS:
        return [node.args[0]]
    if (node.op == "call_function" and node.target in SUM_FUNCTIONS) or \
            (node.op == "call_method" and node.target in SUM_METHODS):
        return _inputs(node)
    if node.op == "call_function" and node.target in SCALE_FUNCTIONS and len(_inputs(node)) == 1:
        return _inputs(node)
    return None


def feeding_layers(gm: fx.GraphModule, z: fx.Node) -> list[str]:
    """Weighted modules whose output reaches ``z`` through pass-through ops, in graph order."""
    found: list[str] = []
    stack, seen = [z], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), WEIGHTED):
            found.append(node.target)
            continue
        stack.extend(_through(gm, node) or [])
    order = {n.target: i for i, n in enumerate(gm.graph.nodes) if n.op == "call_module"}
    return sorted(dict.fromkeys(found), key=order.__getitem__)


def considered_layers(gm: fx.GraphModule, sites: Iterable[Site]) -> dict[str, list[str]]:
    """Weighted layer (module name) -> names of the sites it feeds; layers in graph order."""
    fed: dict[str, list[str]] = {}
    for site in sites:
        for layer in feeding_layers(gm, site.input):
            fed.setdefault(layer, []).append(site.name)
    order = {n.target: i for i, n in enumerate(gm.graph.nodes) if n.op == "call_module"}
    return dict(sorted(fed.items(), key=lambda kv: order[kv[0]]))


def materialise(arch: str, arch_kwargs: Mapping, state_dict: Mapping[str, Tensor],
                linearised: list[str], allow_import: bool = False) -> fx.GraphModule:
    """The model as a GraphModule with the original site names, ``linearised`` sites replaced by
    identity, weights from ``state_dict``; parameters the graph no longer uses are frozen.
    ``allow_import``: ``arch`` is the user's own (``package.module:callable`` may be imported)."""
    model = build_model(arch, allow_import=allow_import, **arch_kwargs)
    model.load_state_dict(state_dict)
    gm = apply_linearised(model, linearised)
    freeze_unused(gm)
    return gm


def freeze_unused(gm: fx.GraphModule) -> None:
    """``requires_grad=False`` on parameters no graph node reads (e.g. a linearised PReLU), so that
    DistributedDataParallel does not wait for their gradients."""
    used: set[int] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            used.update(id(p) for p in gm.get_submodule(node.target).parameters())
        elif node.op == "get_attr":
            obj = gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            used.add(id(obj))
    for p in gm.parameters():
        if id(p) not in used:
            p.requires_grad_(False)

