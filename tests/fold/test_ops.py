"""The ops vocabulary (``fold.ops``): node predicates, layer kinds (module <-> spec, channel axis)
and ``evaluate``."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from kit import D
from nepenthe_compress.fold import algebra as A
from nepenthe_compress.fold import ops
from nepenthe_compress.fold.modules import ChannelAffine, MapConv2d
from nepenthe_compress.trace import propagate_shapes, trace_model


def traced(model: nn.Module, x: Tensor) -> tuple[fx.GraphModule, dict[str, fx.Node]]:
    gm = trace_model(model, (ChannelAffine,))
    propagate_shapes(gm, x)
    return gm, {n.name: n for n in gm.graph.nodes}


@pytest.mark.parametrize("module, kind", [
    (nn.Conv2d(4, 6, 3, padding=1), "conv2d"),
    (MapConv2d(4, 6, 3, padding=1, bias_map=torch.zeros(6, 5, 5)), "conv2d"),
    (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), None),
    (nn.Conv2d(4, 6, 3, padding="same"), None),
    (nn.Conv1d(4, 6, 3), None),
    (nn.Linear(4, 6), "linear"),
    (nn.ConvTranspose2d(4, 6, 3), "conv_transpose2d"),
    (nn.BatchNorm2d(4), None),
])
def test_layer_kinds(module: nn.Module, kind: str | None) -> None:
    found = next((k for k in ops.LAYERS if k.matches(module)), None)
    assert (found.name if found else None) == kind


@pytest.mark.parametrize("module, x", [
    (nn.Conv2d(4, 6, 3, stride=2, padding=(1, 2), dilation=(2, 1), groups=2), torch.randn(2, 4, 9, 8, dtype=D)),
    (MapConv2d(4, 6, 3, padding=1, bias=False, bias_map=torch.randn(6, 7, 7)), torch.randn(2, 4, 7, 7, dtype=D)),
    (nn.Linear(4, 6, bias=False), torch.randn(2, 3, 4, dtype=D)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), torch.randn(2, 4, 5, 5, dtype=D)),
])
def test_spec_of_and_module_of_round_trip(module: nn.Module, x: Tensor) -> None:
    torch.manual_seed(0)
    module = module.to(D)
    kind = next(k for k in ops.LAYERS if k.matches(module))
    spec = kind.spec_of(module)
    assert type(spec) is kind.spec_type and spec.weight.dtype == D
    rebuilt = ops.module_of(spec, module)
    assert type(rebuilt) is type(module) and rebuilt is not module
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), module(x), rtol=0, atol=1e-14)
        torch.testing.assert_close(spec.forward(x), module(x), rtol=0, atol=1e-14)
    assert rebuilt.bias is not None  # a missing bias becomes an explicit zero bias


def test_module_of_keeps_the_like_modules_dtype() -> None:
    conv = nn.Conv2d(2, 3, 1)  # float32
    spec = ops.conv_spec(conv)
    assert spec.weight.dtype == D and ops.module_of(spec, conv).weight.dtype == torch.float32


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.dw, self.grouped = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 1, groups=2)
        self.bn, self.ln, self.drop, self.flat = nn.BatchNorm2d(4), nn.LayerNorm(4), nn.Dropout(), nn.Flatten()
        self.avg, self.avg_pad = nn.AvgPool2d(2), nn.AvgPool2d(3, stride=2, padding=1)
        self.affine = ChannelAffine(torch.ones(4), torch.zeros(4), 1)
        self.fc = nn.Linear(64, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.affine(self.bn(self.grouped(self.dw(self.conv(x)))))
        y = F.relu(self.drop(y)) + F.dropout(y, 0.5, training=False) + torch.add(y, y, alpha=2)
        y = self.avg(y) + self.avg_pad(y) + F.max_pool2d(y, 2)
        z = self.ln(y.permute(0, 2, 3, 1))
        return self.fc(self.flat(y) + torch.flatten(z, 1) + y.flatten(2).flatten(1))


def test_node_predicates() -> None:
    torch.manual_seed(0)
    gm, n = traced(Zoo(), torch.randn(2, 4, 8, 8))
    names = [k for k in n if n[k].op != "placeholder"]

    def where(pred) -> set[str]:
        return {k for k in names if pred(gm, n[k])}

    assert where(ops.is_layer) == {"conv", "dw", "grouped", "fc"}
    assert where(ops.is_depthwise) == {"dw"}
    assert where(lambda g, node: ops.is_layer(g, node) and not ops.is_dense(g, node)) == {"dw", "grouped"}
    assert where(ops.is_batchnorm) == {"bn"} and where(ops.is_layernorm) == {"ln"}
    assert where(ops.is_affine) == {"affine"}
    assert where(ops.is_eval_noop) == {"drop", "dropout", "affine"}  # the affine map is the identity
    assert where(lambda g, node: ops.is_add(node)) == {"add", "add_2", "add_3", "add_4", "add_5", "add_6"}
    assert where(ops.is_flatten) == {"flat", "flatten", "flatten_2"}  # flatten_1 is flatten(2)
    assert where(ops.keeps_constants) == {"avg", "max_pool2d", "flat", "flatten", "flatten_2"}  # not avg_pad
    assert where(lambda g, node: ops.activation(g, node) is not None) == {"relu"}
    assert ops.channel_axis(gm, n["conv"]) == 1 and ops.channel_axis(gm, n["fc"]) == 1


def test_add_with_alpha_is_no_plain_add() -> None:
    gm, n = traced(Zoo(), torch.randn(2, 4, 8, 8))
    alpha = [node for node in gm.graph.nodes if node.target is torch.add and node.kwargs]
    assert len(alpha) == 1 and not ops.is_add(alpha[0])
    assert ops.ADD_FUNCTIONS == (operator.add, torch.add)


def test_merge_refusal_names_the_unsupported_conv() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.reflect, self.ok = (nn.ConvTranspose2d(2, 2, 2), nn.Conv2d(2, 2, 3, padding_mode="reflect",
                                                                                      padding=1), nn.Conv2d(2, 2, 1))

        def forward(self, x: Tensor) -> Tensor:
            return self.ok(self.reflect(self.up(x)))

    gm, n = traced(M(), torch.randn(1, 2, 4, 4))
    assert ops.merge_refusal(gm, n["up"]) == "ConvTranspose merges are not supported (its BatchNorm is still folded)"
    assert ops.merge_refusal(gm, n["reflect"]) == "merges of Conv2d with padding_mode='reflect' are not supported"
    assert ops.merge_refusal(gm, n["ok"]) is None


def test_evaluate_runs_modules_functions_and_methods() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.affine = ChannelAffine(torch.tensor([2.0, 3.0]), torch.tensor([1.0, -1.0]), -1)

        def forward(self, x: Tensor) -> Tensor:
            return F.hardtanh(self.affine(x), -1.0, 2.0).clamp(min=0.5) + x

    gm, n = traced(M(), torch.randn(1, 2))
    x = torch.tensor([[0.25, 0.5]])
    assert ops.evaluate(gm, n["affine"], {n["x"]: x}).tolist() == [[1.5, 0.5]]
    assert ops.evaluate(gm, n["hardtanh"], {n["affine"]: torch.tensor([[3.0, -3.0]])}).tolist() == [[2.0, -1.0]]
    assert ops.evaluate(gm, n["clamp"], {n["hardtanh"]: torch.tensor([[0.0, 1.0]])}).tolist() == [[0.5, 1.0]]
    values = {n["clamp"]: torch.tensor([[1.0, 2.0]]), n["x"]: torch.tensor([[3.0, 4.0]])}
    assert ops.evaluate(gm, n["add"], values).tolist() == [[4.0, 6.0]]


def test_layer_kind_algebra_matches_the_modules() -> None:
    """Per kind, ``then_affine`` / ``affine_then`` / ``drop_in`` computed through the registry equal
    the operations done on the modules' outputs and inputs."""
    torch.manual_seed(0)
    a, c = torch.rand(6, dtype=D) + 0.5, torch.randn(6, dtype=D)
    for kind, layer, x in ((ops.CONV2D, nn.Conv2d(6, 6, 3, padding=1).to(D), torch.randn(2, 6, 5, 5, dtype=D)),
                           (ops.LINEAR, nn.Linear(6, 6).to(D), torch.randn(2, 3, 6, dtype=D))):
        rank = x.dim()
        view = [1] * rank
        view[kind.channel_axis(rank)] = -1
        spec = kind.spec_of(layer)
        with torch.no_grad():
            torch.testing.assert_close(kind.then_affine(spec, a, c).forward(x), layer(x) * a.view(view) + c.view(view))
            torch.testing.assert_close(kind.affine_then(a, c, spec, x.shape).forward(x),
                                       layer(x * a.view(view) + c.view(view)))
            keep = torch.tensor([True, False, True, True, False, True])
            values = torch.where(keep, 0.0, c)
            held = x.clone().movedim(kind.channel_axis(rank), -1)
            held[..., ~keep] = c[~keep]
            held = held.movedim(-1, kind.channel_axis(rank))
            narrow = x.index_select(kind.channel_axis(rank), torch.nonzero(keep).flatten())
            torch.testing.assert_close(kind.drop_in(spec, keep, values, x.shape).forward(narrow), layer(held))
        outputs, macs, extra = kind.work(spec, x.shape)
        assert (outputs, macs, extra) == ((6 * 25, 6 * 25 * 6 * 9, 0) if kind is ops.CONV2D else (3 * 6, 3 * 6 * 6, 0))
