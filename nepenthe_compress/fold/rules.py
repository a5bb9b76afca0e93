"""Local rewrite rules of the fold pass. Each rule looks at one node and returns True if it changed
the graph; ``apply_rules`` runs the registry to a fixpoint. All rules here are exact."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from nepenthe_compress.entropy import SiteStats
from nepenthe_compress.fold import algebra as A
from nepenthe_compress.fold.cost import layer_cost
from nepenthe_compress.fold.graph import (
    ADD_FUNCTIONS,
    FoldGraph,
    channel_axis,
    is_affine,
    is_conv2d,
    is_linear,
    is_weighted,
    only_input,
)
from nepenthe_compress.fold.modules import ChannelAffine, conv_module, conv_spec, linear_module, linear_spec
from nepenthe_compress.sites import Site

Rule = Callable[[FoldGraph, fx.Node], bool]


# ---- linearisation ----------------------------------------------------------------------------

def site_affine(site: Site, stats: SiteStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron (scale, shift) of a zero-entropy site from each neuron's recorded state."""
    states = stats.neuron_state
    n = len(states)
    scale = torch.empty(n, dtype=torch.float64)
    shift = torch.empty(n, dtype=torch.float64)
    for s in np.unique(states):
        a, c = site.kind.affine(site.params, int(s), n)
        idx = torch.from_numpy(np.nonzero(states == s)[0])
        scale[idx], shift[idx] = a[idx], c[idx]
    return scale, shift


def linearise_sites(fg: FoldGraph, sites: list[Site], stats: dict[str, SiteStats]) -> list[str]:
    """Replace every zero-entropy site by its per-channel affine map; returns the sites replaced."""
    done = []
    for site in sites:
        st = stats.get(site.name)
        if st is None or not st.zero_entropy:
            continue
        if not site.kind.exact and not fg.options.approximate:
            fg.record("skip", site.target, f"{site.kind.name} is never exactly linear "
                      "(use --approximate to linearise it; the error is then measured)")
            continue
        scale, shift = site_affine(site, st)
        node = site.node
        if bool((scale == 1).all() and (shift == 0).all()):
            fg.bypass(node, site.input)
            detail = "always ON: identity"
        else:
            affine = ChannelAffine(scale.to(fg.dtype), shift.to(fg.dtype), site.neuron_axis)
            new = fg.insert_module(node, affine, site.input,
                                   f"{site.target} (linear)")
            fg.bypass(node, new)
            detail = f"per-channel affine ({', '.join(f'{k} {v}' for k, v in st.always().items() if v)})"
        fg.record("linearise", site.target, detail)
        done.append(site.name)
    return done


# ---- normalisation ----------------------------------------------------------------------------

def batchnorm_to_affine(fg: FoldGraph, node: fx.Node) -> bool:
    m = fg.module(node)
    if not isinstance(m, nn.modules.batchnorm._BatchNorm):
        return False
    if m.running_mean is None or m.running_var is None:
        fg.record("skip", fg.label(node), "BatchNorm without running statistics cannot be folded")
        return False
    a, c = A.batchnorm_affine(m.running_mean.double(), m.running_var.double(),
                              None if m.weight is None else m.weight.detach().double(),
                              None if m.bias is None else m.bias.detach().double(), m.eps)
    fg.set_module(node, ChannelAffine(a.to(fg.dtype), c.to(fg.dtype), axis=1))
    return True


def drop_identity(fg: FoldGraph, node: fx.Node) -> bool:
    """Remove eval no-ops: Dropout, Identity, identity affines."""
    m = fg.module(node)
    noop = isinstance(m, (nn.Identity, nn.modules.dropout._DropoutNd))
    noop |= node.op == "call_function" and node.target is F.dropout and not node.kwargs.get("training", False)
    noop |= isinstance(m, ChannelAffine) and bool((m.scale == 1).all() and (m.shift == 0).all())
    src = node.args[0] if node.args else None
    if noop and isinstance(src, fx.Node):
        fg.bypass(node, src)
        return True
    return False


# ---- affine maps into weighted neighbours -----------------------------------------------------

def affine_into_producer(fg: FoldGraph, node: fx.Node) -> bool:
    """conv/linear -> affine: scale the producer's output channels (always exact)."""
    if not is_affine(fg, node):
        return False
    src = only_input(node)
    if src is None or len(src.users) != 1:
        return False
    aff = fg.module(node)
    a, c = aff.scale.double(), aff.shift.double()
    rank = len(fg.shape(node))
    m = fg.module(src)
    if aff.axis % rank != (rank - 1 if is_linear(fg, src) else 1):
        return False
    if is_conv2d(fg, src):
        new = conv_module(A.conv_then_affine(conv_spec(m), a, c), m)
    elif is_linear(fg, src):
        new = linear_module(A.linear_then_affine(linear_spec(m), a, c), m)
    elif type(m) is nn.ConvTranspose2d:
        new = _conv_transpose_then_affine(m, a, c)
    else:
        return False
    fg.set_module(src, new)
    fg.record("fold", fg.label(node), f"into {fg.label(src)}")
    fg.bypass(node, src)
    return True


def _conv_transpose_then_affine(m: nn.ConvTranspose2d, a: torch.Tensor, c: torch.Tensor) -> nn.ConvTranspose2d:
    bias = m.bias.detach().double() if m.bias is not None else torch.zeros(m.out_channels, dtype=torch.float64)
    w, b = A.conv_transpose_then_affine(m.weight.detach().double(), bias, m.groups, a, c)
    new = nn.ConvTranspose2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                             m.output_padding, m.groups, True, m.dilation, m.padding_mode,
                             device=m.weight.device, dtype=m.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        new.bias.copy_(b)
    return new


def affine_into_consumers(fg: FoldGraph, node: fx.Node) -> bool:
    """affine -> conv/linear (every user): fold into the consumers' input channels. Exact (padded
    convs get a border bias map for the recorded input size)."""
    if not is_affine(fg, node) or not node.users:
        return False
    src = only_input(node)
    users = list(node.users)
    aff = fg.module(node)
    rank = len(fg.shape(node))
    if src is None or not all(is_weighted(fg, u) and only_input(u) is node
                              and channel_axis(fg, u) == aff.axis % rank for u in users):
        return False
    a, c = aff.scale.double(), aff.shift.double()
    for u in users:
        m = fg.module(u)
        if is_conv2d(fg, u):
            in_hw = tuple(fg.shape(node)[-2:])
            new = conv_module(A.affine_then_conv(a, c, conv_spec(m), in_hw), m)
        else:
            new = linear_module(A.affine_then_linear(a, c, linear_spec(m)), m)
        fg.set_module(u, new)
        u.replace_input_with(node, src)
        fg.record("fold", fg.label(node), f"into {fg.label(u)}")
    fg.gm.graph.erase_node(node)
    return True


def layernorm_affine_into_linears(fg: FoldGraph, node: fx.Node) -> bool:
    """LayerNorm(affine) -> Linear (every user): the LN keeps only its normalisation and gamma/beta
    go into the Linears' weights and biases. Exact."""
    m = fg.module(node)
    if not isinstance(m, nn.LayerNorm) or m.weight is None or len(m.normalized_shape) != 1:
        return False
    users = list(node.users)
    if not users or not all(is_linear(fg, u) and only_input(u) is node for u in users):
        return False
    gamma = m.weight.detach().double()
    beta = m.bias.detach().double() if m.bias is not None else torch.zeros_like(gamma)
    for u in users:
        fg.set_module(u, linear_module(A.affine_then_linear(gamma, beta, linear_spec(fg.module(u))), fg.module(u)))
        fg.record("fold", f"{fg.label(node)} affine", f"into {fg.label(u)}")
    fg.set_module(node, nn.LayerNorm(m.normalized_shape, m.eps, elementwise_affine=False))
    return True


# ---- residual / parallel branches ---------------------------------------------------------------

def _branch(fg: FoldGraph, node: fx.Node) -> tuple[fx.Node, str]:
    """(input, kind) of one add operand: a single-use conv/linear reads its input; else identity."""
    src = only_input(node)
    if src is not None and is_weighted(fg, node) and len(node.users) == 1:
        return src, "layer"
    return node, "identity"


def parallel_add(fg: FoldGraph, node: fx.Node) -> bool:
    """conv(x) + x, conv1(x) + conv2(x) (and the Linear twins) -> one layer. Exact when aligned."""
    if fg.options.merge == "none" or node.op != "call_function" or node.target not in ADD_FUNCTIONS:
        return False
    if len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    (xa, ka), (xb, kb) = (_branch(fg, a) for a in node.args)
    if xa is not xb or (ka, kb) == ("identity", "identity"):
        return False
    layers = [a for a, k in zip(node.args, (ka, kb)) if k == "layer"]
    ref = fg.module(layers[0])
    conv = is_conv2d(fg, layers[0])
    if any(is_conv2d(fg, n) != conv for n in layers) or any(fg.shape(a) != fg.shape(node) for a in node.args):
        return False
    specs = []
    for arg, kind in zip(node.args, (ka, kb)):
        if kind == "layer":
            specs.append(conv_spec(fg.module(arg)) if conv else linear_spec(fg.module(arg)))
        else:
            ch = fg.shape(xa)[1 if conv else -1]
            specs.append(A.identity_conv(ch, torch.float64) if conv else
                         A.LinearSpec(torch.eye(ch, dtype=torch.float64), torch.zeros(ch, dtype=torch.float64)))
    try:
        merged = A.add_convs(*specs, tuple(fg.shape(xa)[-2:])) if conv else A.add_linears(*specs)
    except A.NotExact as e:
        fg.record("skip", fg.label(node), f"residual merge: {e}")
        return False
    if fg.options.merge == "auto" and layer_cost(merged, fg.shape(xa)) > sum(
            layer_cost(s, fg.shape(xa)) for s, k in zip(specs, (ka, kb)) if k == "layer"):
        fg.record("skip", fg.label(node), "residual merge: cost model predicts no gain")
        return False
    new = conv_module(merged, ref) if conv else linear_module(merged, ref)
    names = " + ".join(fg.label(a) if k == "layer" else "identity" for a, k in zip(node.args, (ka, kb)))
    out = fg.insert_module(node, new, xa, f"merged({names})")
    fg.bypass(node, out)
    fg.record("merge", names, "residual branches summed into one layer")
    return True


RULES: list[Rule] = [drop_identity, batchnorm_to_affine, affine_into_producer, affine_into_consumers,
                     layernorm_affine_into_linears, parallel_add]


def apply_rules(fg: FoldGraph, rules: list[Rule] = RULES) -> None:
    """Run every rule on every node until nothing changes."""
    changed = True
    while changed:
        changed = False
        for rule in rules:
            for node in list(fg.gm.graph.nodes):
                if not getattr(node, "_erased", False) and rule(fg, node):
                    changed = True
