"""trace_model: fx tracing of a copy, in eval mode, with every in-place op made pure and the
original's semantics kept exactly (later readers of a mutated tensor read the mutated value)."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn

from nepenthe_compress.errors import TraceError, UserError
from nepenthe_compress.trace import trace_model

INPLACE_FUNCTIONS = {torch.relu_, F.relu_, F.leaky_relu_, F.hardtanh_, F.elu_, operator.iadd, operator.isub,
                     operator.imul, operator.itruediv}


def assert_pure(gm: fx.GraphModule) -> None:
    """No node of ``gm`` mutates its input."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            assert getattr(gm.get_submodule(node.target), "inplace", False) is not True, node.format_node()
        elif node.op == "call_function":
            assert node.target not in INPLACE_FUNCTIONS, node.format_node()
            assert node.kwargs.get("inplace") is not True, node.format_node()
        elif node.op == "call_method":
            assert not node.target.endswith("_"), node.format_node()


# ---- in-place activation whose mutated input is read again later ------------------------------

# name -> (in-place call on y, the same activation computed out of place in float64)
INPLACE_CALLS = {
    "module": (lambda m, y: m.act(y), F.relu),
    "functional": (lambda m, y: F.relu(y, inplace=True), F.relu),
    "functional_positional": (lambda m, y: F.relu(y, True), F.relu),
    "method": (lambda m, y: y.relu_(), F.relu),
    "torch_relu_": (lambda m, y: torch.relu_(y), F.relu),
    "leaky": (lambda m, y: F.leaky_relu(y, 0.1, inplace=True), lambda z: F.leaky_relu(z, 0.1)),
    "hardtanh": (lambda m, y: F.hardtanh(y, -0.3, 0.4, True), lambda z: F.hardtanh(z, -0.3, 0.4)),
    "relu6_module": (lambda m, y: m.act6(y.mul_(8.0)), lambda z: F.relu6(z * 8.0)),
    "add_": (lambda m, y: y.add_(0.5), lambda z: z + 0.5),
}


class ReadAfterMutation(nn.Module):
    """y = conv(x); a = act_(y) (mutates y); both a and y are read afterwards."""

    def __init__(self, call) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.act6 = nn.ReLU6(inplace=True)
        self.call = call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        a = self.call(self, y)
        return torch.cat([a, y * 2.0], dim=1)


@pytest.mark.parametrize("name", sorted(INPLACE_CALLS))
def test_inplace_read_later_keeps_semantics(name: str) -> None:
    torch.manual_seed(0)
    call, reference = INPLACE_CALLS[name]
    model = ReadAfterMutation(call).eval()
    x = torch.randn(2, 3, 6, 6)
    gm = trace_model(model)
    assert_pure(gm)
    with torch.no_grad():
        out, traced = model(x), gm(x)
        y64 = F.conv2d(x.double(), model.conv.weight.double(), model.conv.bias.double(), padding=1)
    assert torch.equal(traced, out)
    # independent float64: the original's mutated y equals the activation's result a
    a64 = reference(y64)
    expected = torch.cat([a64, a64 * 2.0], dim=1)
    assert torch.allclose(traced.double(), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(a64, y64, atol=1e-3)  # a pure rewrite that forgot the alias would differ
    assert model.act.inplace and model.act6.inplace  # the original is untouched


class Chain(nn.Module):
    """Several in-place ops on the same tensor; an earlier clone keeps the pre-mutation value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        before = y * 1.0
        a = y.relu_()
        y.mul_(3.0)
        b = F.leaky_relu(y.sub_(1.0), 0.2, inplace=True)
        return torch.cat([a, b, y, before], dim=1)


def test_chain_of_inplace_ops_on_one_tensor() -> None:
    torch.manual_seed(1)
    model = Chain().eval()
    x = torch.randn(2, 3, 5, 5)
    gm = trace_model(model)
    assert_pure(gm)
    with torch.no_grad():
        out, traced = model(x), gm(x)
        y64 = F.conv2d(x.double(), model.conv.weight.double(), model.conv.bias.double())
    assert torch.equal(traced, out)
    final = F.leaky_relu(F.relu(y64) * 3.0 - 1.0, 0.2)  # a, b and y all alias the final value
    assert torch.allclose(traced.double(), torch.cat([final, final, final, y64], 1), rtol=0, atol=1e-5)


class InplaceOnInput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.relu_()
        return x * 2.0 + x.sum()


def test_inplace_on_graph_input() -> None:
    x = torch.randn(2, 3, 4, 4)
    gm = trace_model(InplaceOnInput())
    assert_pure(gm)
    expected = InplaceOnInput()(x.clone())
    traced = gm(x.clone())
    assert torch.equal(traced, expected)
    r = F.relu(x.double())
    assert torch.allclose(traced.double(), r * 2.0 + r.sum(), rtol=0, atol=1e-4)


class SharedInplace(nn.Module):
    """torchvision BasicBlock pattern: one in-place ReLU module called twice, identity added."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        out += identity
        return self.relu(out)


def test_shared_inplace_module() -> None:
    torch.manual_seed(2)
    model = SharedInplace().eval()
    x = torch.randn(2, 4, 5, 5)
    gm = trace_model(model)
    assert_pure(gm)
    relu_calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "relu"]
    assert len(relu_calls) == 2
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
        w1, b1 = model.conv1.weight.double(), model.conv1.bias.double()
        w2, b2 = model.conv2.weight.double(), model.conv2.bias.double()
        x64 = x.double()
        ref = F.relu(F.conv2d(F.relu(F.conv2d(x64, w1, b1, padding=1)), w2, b2, padding=1) + x64)
        assert torch.allclose(gm(x).double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_inplace_models_trace_exactly(arch: str) -> None:
    torch.manual_seed(3)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10).eval()
    inplace_before = [m for m in model.modules() if getattr(m, "inplace", False)]
    assert inplace_before  # these architectures do use in-place activations
    gm = trace_model(model)
    assert_pure(gm)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    assert all(m.inplace for m in inplace_before)


# ---- mode, copy, errors -----------------------------------------------------------------------

class WithBnDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(F.relu(self.bn(self.conv(x))))


def test_traces_a_copy_in_eval_mode() -> None:
    torch.manual_seed(4)
    model = WithBnDropout()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    stats = model.bn.running_mean.clone()
    assert model.training
    gm = trace_model(model)
    assert model.training and not gm.training  # the original's mode is untouched
    assert gm.get_submodule("bn") is not model.bn
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        traced = gm(x)
        bn = model.bn
        z = F.conv2d(x.double(), model.conv.weight.double(), model.conv.bias.double())
        shape = (1, -1, 1, 1)
        ref = F.relu((z - bn.running_mean.double().view(shape)) / torch.sqrt(bn.running_var.double().view(shape)
              + bn.eps) * bn.weight.double().view(shape) + bn.bias.double().view(shape))
    assert torch.allclose(traced.double(), ref, rtol=0, atol=1e-5)  # running stats, no dropout
    assert torch.equal(model.bn.running_mean, stats)


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 if x.sum() > 0 else -x


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.gate = DataDependent()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.gate(self.conv(x)))


def test_untraceable_model_raises_one_line_trace_error() -> None:
    with pytest.raises(TraceError) as info:
        trace_model(Outer())
    msg = str(info.value)
    assert isinstance(info.value, UserError)
    assert "\n" not in msg and "--leaf" in msg and "Outer" in msg
    # names the failing construct: this file's line with the data-dependent branch
    assert "test_trace.py" in msg and "x.sum() > 0" in msg


@pytest.mark.parametrize("leaf", [DataDependent, "DataDependent", "gate"])
def test_leaf_modules_make_it_traceable(leaf) -> None:
    torch.manual_seed(5)
    model = Outer().eval()
    gm = trace_model(model, leaf_modules=[leaf])
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "gate"]
    for sign in (1.0, -1.0):
        x = sign * (torch.rand(2, 3, 4, 4) + 0.1)
        with torch.no_grad():
            z = F.conv2d(x.double(), model.conv.weight.double(), model.conv.bias.double())
            ref = F.relu(z * 2.0 if z.sum() > 0 else -z)
            assert torch.equal(gm(x), model(x))
            assert torch.allclose(gm(x).double(), ref, rtol=0, atol=1e-5)


class RequiresGradCall(nn.Module):
    """A trailing-underscore method whose twin is a property, not an out-of-place method."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y.requires_grad_(False)
        return F.relu(y)


def test_method_without_out_of_place_twin_is_kept() -> None:
    torch.manual_seed(6)
    model = RequiresGradCall().eval()
    gm = trace_model(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_method"] == ["requires_grad_"]
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
