"""Graph-level edge cases of the fold pass (``fold_graph``) on small hand-built models.

Each model's neuron states are engineered on its own input batch (``set_states`` shifts chosen
biases so that a layer's outputs are >= 1 (rectifier ON), <= -1 (OFF) or zero-mean per channel
(mixed)); every test first asserts the zero-entropy sites it engineered, then compares the folded
model with the ORIGINAL model on that batch. Models without BatchNorm run in float64 (tolerance
1e-10); BatchNorm models run in float32 (tolerance 1e-6, see test_fold_zoo for the float64 BN case).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nepenthe_compress.entropy import EntropyReport, measure_entropy
from nepenthe_compress.fold.core import FoldedGraph, fold_graph
from nepenthe_compress.fold.graph import FoldOptions
from nepenthe_compress.sites import find_sites
from nepenthe_compress.trace import trace_model
from nepenthe_compress.verify import verify_equivalence

D = torch.float64
WEIGHTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ---- helpers ---------------------------------------------------------------------------------------

@torch.no_grad()
def set_states(model: nn.Module, x: Tensor, states: dict[nn.Module, str | tuple[str, list[int]]]) -> None:
    """Shift the biases of conv / linear modules (in one forward pass, so later layers see the
    shifted values): "on" every output >= 1, "off" every output <= -1, "mixed" zero mean per
    channel; ``(kind, channels)`` shifts only those channels."""
    def hook(m, args, out):
        kind, channels = states[m] if isinstance(states[m], tuple) else (states[m], None)
        axis = 1 if isinstance(m, nn.modules.conv._ConvNd) else out.dim() - 1
        z = out.transpose(0, axis).reshape(out.shape[axis], -1)
        shift = {"on": 1 - z.min(1).values, "off": -1 - z.max(1).values, "mixed": -z.mean(1)}[kind]
        if channels is not None:
            keep = torch.ones(len(shift), dtype=torch.bool)
            keep[channels] = False
            shift[keep] = 0
        m.bias.add_(shift)
        view = [1] * out.dim()
        view[axis] = -1
        return out + shift.view(view)

    handles = [m.register_forward_hook(hook) for m in states]
    try:
        model.eval()(x)
    finally:
        for h in handles:
            h.remove()


def measure(model: nn.Module, x: Tensor) -> EntropyReport:
    return measure_entropy(model, [x])


def zero_entropy(report: EntropyReport) -> set[str]:
    return {s.name for s in report.sites if s.zero_entropy}


def fold(model: nn.Module, x: Tensor, report: EntropyReport | None = None, **options) -> FoldedGraph:
    return fold_graph(model, report or measure(model, x), x[:2], FoldOptions(**options))


def weighted(f: FoldedGraph) -> list[nn.Module]:
    """The weighted layers the folded graph calls, in graph order."""
    gm = f.model
    return [gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), WEIGHTED)]


def called(f: FoldedGraph, kind: type) -> int:
    gm = f.model
    return sum(n.op == "call_module" and isinstance(gm.get_submodule(n.target), kind) for n in gm.graph.nodes)


def max_rel(model: nn.Module, f: FoldedGraph, x: Tensor) -> float:
    return verify_equivalence(model, f.model, [x]).max_rel


def assert_exact(model: nn.Module, f: FoldedGraph, x: Tensor) -> None:
    assert max_rel(model, f, x) <= (1e-10 if x.dtype == D else 1e-6)


def events(f: FoldedGraph, action: str) -> list[str]:
    return [f"{e.where}: {e.detail}" for e in f.events if e.action == action]


def randomise_bn(*bns: nn.modules.batchnorm._BatchNorm) -> None:
    """Non-trivial eval statistics and affine parameters."""
    with torch.no_grad():
        for bn in bns:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()


def image(c: int = 4, hw: int = 10, n: int = 4, dtype: torch.dtype = D) -> Tensor:
    return torch.randn(n, c, hw, hw, dtype=dtype)


# ---- rectifier call forms -------------------------------------------------------------------------

class CallForms(nn.Module):
    """F.relu, Tensor.relu, in-place module / function / method relus between 1x1 convs."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(6))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        c = self.convs
        x = F.relu(c[0](x))
        x = c[1](x).relu()
        x = self.act(c[2](x))
        x = F.relu(c[3](x), inplace=True)
        x = c[4](x).relu_()
        return c[5](x)


def test_functional_method_and_inplace_relu_sites_are_linearised() -> None:
    m, x = CallForms().double(), image()
    set_states(m, x, {c: "on" for c in m.convs[:5]})
    report = measure(m, x)
    assert len(report.sites) == 5 and zero_entropy(report) == {s.name for s in report.sites}
    f = fold(m, x, merge="all")
    assert len(f.linearised) == 5
    assert [type(w) for w in weighted(f)] == [nn.Conv2d]  # six 1x1 convs, all linear: one conv
    assert_exact(m, f, x)


class InplaceReader(nn.Module):
    """An in-place LeakyReLU whose INPUT tensor is read again afterwards (it holds the output)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.act = nn.LeakyReLU(0.25, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        z = self.c1(x)
        y = self.act(z)
        return self.c2(y) + z  # z was overwritten by the activation


def test_inplace_activation_whose_input_is_read_later_stays_exact() -> None:
    m, x = InplaceReader().double(), image()
    set_states(m, x, {m.c1: "off"})  # always OFF: the site becomes the slope 0.25
    report = measure(m, x)
    assert zero_entropy(report) == {"act"}
    f = fold(m, x, merge="all")
    assert f.linearised == ["act"]
    assert_exact(m, f, x)


class Reused(nn.Module):
    """One ReLU module called twice: two sites."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 6, 1), nn.Conv2d(6, 3, 1)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.c3(self.act(self.c2(self.act(self.c1(x)))))


def test_module_called_twice_gives_two_sites_and_only_the_constant_one_is_linearised() -> None:
    m, x = Reused().double(), image()
    set_states(m, x, {m.c1: "on", m.c2: "mixed"})
    report = measure(m, x)
    assert [s.name for s in report.sites] == ["act", "act_1"]
    assert [s.target for s in report.sites] == ["act", "act#1"]
    assert zero_entropy(report) == {"act"}
    f = fold(m, x, merge="all")
    assert f.linearised == ["act"]
    assert called(f, nn.ReLU) == 1
    assert len(weighted(f)) == 2  # c1 -> c2 merged, the mixed site stays before c3
    assert_exact(m, f, x)


# ---- topology -----------------------------------------------------------------------------------

class TwoConsumers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c0, self.bn = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.a, self.b = nn.Conv2d(6, 5, 3, padding=1), nn.Conv2d(6, 5, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn(self.c0(x)))
        return torch.cat([self.a(h), self.b(h)], 1)


def test_conv_feeding_two_consumers_is_not_merged_and_stays_exact() -> None:
    m, x = TwoConsumers(), image(dtype=torch.float32)
    randomise_bn(m.bn)
    with torch.no_grad():
        m.bn.bias.add_(20.0)  # ON: |bn(c0(x))| stays well below 20 on this batch
    report = measure(m, x)
    assert zero_entropy(report) == {"relu"}
    f = fold(m, x, merge="all")
    assert events(f, "merge") == []
    assert called(f, nn.BatchNorm2d) == 0 and len(weighted(f)) == 3
    assert_exact(m, f, x)


class NoStats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 3, 1)
        self.bn = nn.BatchNorm2d(6, track_running_stats=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.c2(F.relu(self.bn(self.c1(x))))


def test_batchnorm_without_running_stats_is_refused_with_a_reason() -> None:
    m, x = NoStats(), image(dtype=torch.float32)
    with torch.no_grad():
        m.bn.bias.fill_(10.0)  # batch-normalised values stay within +-10 on 400 elements: ON
    report = measure(m, x)
    assert zero_entropy(report) == {"relu"}
    f = fold(m, x, merge="all")
    skips = events(f, "skip")
    assert any(s.startswith("bn: ") and "running statistics" in s for s in skips)
    assert called(f, nn.BatchNorm2d) == 1 and events(f, "merge") == []
    assert_exact(m, f, x)


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.bn, self.c = nn.BatchNorm2d(6), nn.Conv2d(6, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(F.relu(self.bn(self.up(x))))


def test_conv_transpose_then_batchnorm_is_folded() -> None:
    m, x = Transposed(), image(dtype=torch.float32)
    randomise_bn(m.bn)
    report = measure(m, x)
    assert zero_entropy(report) == set()
    f = fold(m, x)
    assert events(f, "fold") == ["bn: into up"]
    assert called(f, nn.BatchNorm2d) == 0 and called(f, nn.ConvTranspose2d) == 1
    assert_exact(m, f, x)


def test_conv_transpose_next_to_a_conv_is_refused_with_a_reason() -> None:
    """ConvTranspose -> 1x1 conv with the ReLU always ON: the chain is not merged, and the report
    says why instead of skipping it silently."""
    m, x = Transposed(), image(dtype=torch.float32)
    randomise_bn(m.bn)
    with torch.no_grad():
        m.bn.bias += 100.0  # ReLU always ON: up -> bn -> c is a linear chain
    f = fold(m, x, merge="all")
    assert zero_entropy(measure(m, x)) == {"relu"}
    assert "up: ConvTranspose merges are not supported (its BatchNorm is still folded)" in events(f, "skip")
    assert called(f, nn.ConvTranspose2d) == 1 and called(f, nn.Conv2d) == 1
    assert_exact(m, f, x)


# ---- activation kinds -----------------------------------------------------------------------------

class Slopes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 6, 1), nn.Conv2d(6, 3, 1)
        self.leaky, self.prelu = nn.LeakyReLU(0.2), nn.PReLU(6, init=0.3)

    def forward(self, x: Tensor) -> Tensor:
        return self.c3(self.prelu(self.c2(self.leaky(self.c1(x)))))


@pytest.mark.parametrize("dtype", [torch.float32, D])
def test_always_off_leaky_and_prelu_sites_become_their_slopes(dtype: torch.dtype) -> None:
    m, x = Slopes().to(dtype), image(dtype=dtype)
    with torch.no_grad():
        m.prelu.weight.uniform_(0.1, 0.9)  # per-channel slopes
    set_states(m, x, {m.c1: "off", m.c2: "off"})
    report = measure(m, x)
    assert zero_entropy(report) == {"leaky", "prelu"}
    f = fold(m, x, merge="all")
    assert sorted(f.linearised) == ["leaky", "prelu"]
    assert called(f, nn.LeakyReLU) == 0 and called(f, nn.PReLU) == 0
    assert len(weighted(f)) == 1
    assert_exact(m, f, x)  # an identity instead of the slopes would be off by O(1)


class Clipped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 3, 3, padding=1)
        self.clip = nn.Hardtanh(-1.0, 2.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.c2(self.clip(self.c1(x)))


def test_saturated_hardtanh_neurons_become_constants_in_the_consumer_bias() -> None:
    """Channels 0, 1 always at max (2), channel 2 always at min (-1), 3-5 always LINEAR: the
    three constants leave the graph; through the zero-padded 3x3 consumer they are a border map."""
    m, x = Clipped().double(), image()
    with torch.no_grad():
        m.c1.weight.mul_(0.01)
        m.c1.bias.copy_(torch.tensor([5.0, 5.0, -5.0, 0.5, 0.5, 0.5], dtype=D))
    report = measure(m, x)
    assert zero_entropy(report) == {"clip"}
    assert report.sites[0].always() == {"OFF": 1, "LINEAR": 3, "SATURATED": 2}
    f = fold(m, x, merge="none", channel_align=1)  # the drop logic itself (no kept-back channels)
    assert f.channels_dropped == 3
    assert any("3 folded into the consumers' bias" in e for e in events(f, "drop"))
    producer, consumer = weighted(f)
    assert producer.out_channels == 3 and consumer.in_channels == 3
    assert_exact(m, f, x)


class MixedOnOff(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.c2(F.relu(self.c1(x)))


def test_zero_entropy_site_with_on_and_off_neurons() -> None:
    """Channels 0-1 always OFF, 2-5 always ON: one linear map whose OFF channels are dropped."""
    m, x = MixedOnOff().double(), image()
    set_states(m, x, {m.c1: ("off", [0, 1])})
    set_states(m, x, {m.c1: ("on", [2, 3, 4, 5])})
    report = measure(m, x)
    assert zero_entropy(report) == {"relu"} and report.sites[0].always() == {"OFF": 2, "ON": 4}
    f = fold(m, x, merge="none")
    assert f.channels_dropped == 2
    assert [w.out_channels for w in weighted(f)] == [4, 3]
    assert_exact(m, f, x)


class Smooth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(self.act(self.l1(x)))


def test_zero_entropy_gelu_is_only_linearised_when_approximate() -> None:
    m, x = Smooth().double(), torch.randn(16, 6, dtype=D)
    set_states(m, x, {m.l1: "on"})
    report = measure(m, x)
    assert zero_entropy(report) == {"act"}
    exact = fold(m, x, report, merge="all")
    assert exact.linearised == [] and called(exact, nn.GELU) == 1
    assert any("never exactly linear" in s for s in events(exact, "skip"))
    assert_exact(m, exact, x)
    approx = fold(m, x, report, merge="all", approximate=True)
    assert approx.linearised == ["act"] and len(weighted(approx)) == 1
    assert max_rel(m, approx, x) > 1e-6  # GELU(z) != z: the error is real and measurable


# ---- conv chains ----------------------------------------------------------------------------------

class Chain(nn.Module):
    """Convs separated by ReLUs (``convs`` given)."""

    def __init__(self, *convs: nn.Conv2d) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)

    def forward(self, x: Tensor) -> Tensor:
        for i, c in enumerate(self.convs):
            x = c(x)
            if i < len(self.convs) - 1:
                x = F.relu(x)
        return x


def all_on(*convs: nn.Conv2d, c: int = 8, hw: int = 12) -> tuple[Chain, Tensor, FoldedGraph]:
    """The chain with every ReLU ON, folded with merge='all'."""
    m, x = Chain(*convs).double(), image(c, hw)
    set_states(m, x, {conv: "on" for conv in m.convs[:-1]})
    report = measure(m, x)
    assert len(zero_entropy(report)) == len(convs) - 1
    return m, x, fold(m, x, report, merge="all")


def test_grouped_and_depthwise_chain_merges_and_regroups() -> None:
    """1x1 (2 groups) -> depthwise 3x3 -> 1x1 (4 groups): output group k reads mid channels
    4k..4k+3, all from input group k // 2, so the merged conv is block-diagonal with 2 groups."""
    m, x, f = all_on(nn.Conv2d(8, 16, 1, groups=2), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                     nn.Conv2d(16, 8, 1, groups=4))
    (merged,) = weighted(f)
    assert merged.groups == 2 and merged.kernel_size == (3, 3)
    assert_exact(m, f, x)


def test_dilated_chain_merges() -> None:
    """3x3 dilation 2 -> 3x3 dilation 1 (both unpadded): extent (3-1)*2 + (3-1) + 1 = 7."""
    m, x, f = all_on(nn.Conv2d(8, 8, 3, dilation=2), nn.Conv2d(8, 4, 3))
    (merged,) = weighted(f)
    assert merged.kernel_size == (7, 7) and merged.stride == (1, 1)
    assert_exact(m, f, x)


def test_one_by_one_into_dilated_padded_conv_merges_with_a_border_map() -> None:
    m, x, f = all_on(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 3, padding=2, dilation=2))
    (merged,) = weighted(f)
    assert merged.kernel_size == (3, 3) and merged.dilation == (2, 2)
    assert_exact(m, f, x)


def test_stride_two_then_stride_one_merges() -> None:
    """3x3 stride 2 -> 3x3 stride 1 (unpadded): stride 2, extent (3-1) + (3-1)*2 + 1 = 7."""
    m, x, f = all_on(nn.Conv2d(8, 8, 3, stride=2), nn.Conv2d(8, 4, 3), hw=15)
    (merged,) = weighted(f)
    assert merged.kernel_size == (7, 7) and merged.stride == (2, 2)
    assert_exact(m, f, x)


def test_border_inexact_merge_is_refused_by_default_and_reported_when_allowed() -> None:
    m, x = Chain(nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)).double(), image(8)
    set_states(m, x, {m.convs[0]: "on"})
    report = measure(m, x)
    refused = fold(m, x, report, merge="all")
    assert events(refused, "merge") == [] and len(weighted(refused)) == 2
    assert any("border-inexact" in s for s in events(refused, "skip"))
    assert_exact(m, refused, x)
    merged = fold(m, x, report, merge="all", allow_inexact=True)
    assert len(weighted(merged)) == 1
    assert any("BORDER-INEXACT" in s for s in events(merged, "merge"))
    assert max_rel(m, merged, x) > 1e-3
    with torch.no_grad():  # the error is confined to the border ring (2 pixels: two padded 3x3s)
        inner = (m(x) - merged.model(x))[..., 2:-2, 2:-2]
    assert inner.abs().max() <= 1e-10 * m(x).abs().max()


def test_merge_none_folds_and_linearises_but_never_merges() -> None:
    m, x = Chain(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)).double(), image(8)
    set_states(m, x, {m.convs[0]: "on", m.convs[1]: "on"})
    f = fold(m, x, merge="none")
    assert len(f.linearised) == 2
    assert f.count("merge") == 0 and len(weighted(f)) == 3
    assert_exact(m, f, x)


# ---- residual branches ------------------------------------------------------------------------------

class Bottleneck(nn.Module):
    """1x1 -> BN -> ReLU -> 3x3 stride 2 -> BN -> ReLU -> 1x1 -> BN, plus a 1x1 stride-2 (+BN)
    downsample shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c3, self.b3 = nn.Conv2d(4, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.ds, self.bd = nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.b1(self.c1(x)))
        h = F.relu(self.b2(self.c2(h)))
        return self.b3(self.c3(h)) + self.bd(self.ds(x))


def test_downsample_shortcut_is_absorbed() -> None:
    m, x = Bottleneck(), image(8, 12, dtype=torch.float32)
    randomise_bn(m.b1, m.b2, m.b3, m.bd)
    with torch.no_grad():
        m.b1.bias.add_(20.0)
        m.b2.bias.add_(20.0)
    report = measure(m, x)
    assert zero_entropy(report) == {"relu", "relu_1"}
    f = fold(m, x, merge="all")
    (merged,) = weighted(f)
    assert merged.stride == (2, 2) and merged.kernel_size == (3, 3)
    assert any("ds" in s for s in events(f, "merge"))
    assert_exact(m, f, x)


class TwoBlocks(nn.Module):
    """A stride-2 block with a 1x1 stride-2 shortcut, then an identity block of two 1x1 convs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 16, 3, 2, 1), nn.Conv2d(16, 16, 1)
        self.ds = nn.Conv2d(8, 16, 1, 2)
        self.d1, self.d2 = nn.Conv2d(16, 16, 1), nn.Conv2d(16, 16, 1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.c3(F.relu(self.c2(F.relu(self.c1(x))))) + self.ds(x)
        return self.d2(F.relu(self.d1(y))) + y


def test_linear_blocks_after_a_strided_residual_merge_fold_to_one_conv() -> None:
    """Everything is linear: (d2 d1 + I)(c3 c2 c1 + ds)(x) is one 3x3 stride-2 conv (the identity
    block is 1x1 -> 1x1 + identity: an unpadded 1x1 after the 3x3, exact). Regression: the merged
    stride-2 conv once carried its input's shape and the replaced branch stayed as a dead user."""
    m, x = TwoBlocks().double(), image(8, 16)
    set_states(m, x, {m.c1: "on", m.c2: "on", m.d1: "on"})
    report = measure(m, x)
    assert len(zero_entropy(report)) == 3
    f = fold(m, x, report, merge="all")
    assert_exact(m, f, x)
    assert len(weighted(f)) == 1


class LinearResidualThenConv(nn.Module):
    """A fully linear identity block (1x1 -> ReLU -> 1x1, + x) followed by a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(self.b(F.relu(self.a(x))) + x)


def test_merges_enabled_by_a_residual_merge_are_made_without_channel_drops() -> None:
    """(b a + I) -> c: the residual merge creates a new chain; merge='all' must reach one conv
    even though no channel is dropped (the fold must iterate to a fixpoint)."""
    m, x = LinearResidualThenConv().double(), image(8)
    set_states(m, x, {m.a: "on"})
    f = fold(m, x, merge="all")
    assert f.channels_dropped == 0
    assert len(weighted(f)) == 1
    assert_exact(m, f, x)


class PrunedBranch(nn.Module):
    """y = x + c2(relu(c1(x))) whose branch conv c1 was pruned away entirely (all weights 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(x + self.c2(F.relu(self.c1(x)))))


def test_a_pruned_residual_branch_becomes_a_constant() -> None:
    """c1 outputs its bias whatever x is, so the whole branch is a constant (a border-shaped one:
    c2 zero-pads a constant map); both convs leave the graph, the output stays exact."""
    m, x = PrunedBranch().double(), image(8)
    with torch.no_grad():
        m.c1.weight.zero_()
    report = measure(m, x)
    assert zero_entropy(report) == {"relu"}  # the constant c1 output: each channel always ON or OFF
    f = fold(m, x, report)
    assert [type(w) for w in weighted(f)] == [nn.Conv2d]  # only the head is left
    assert_exact(m, f, x)


# ---- linear layers on tokens -------------------------------------------------------------------------

class TokenMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(12)
        self.l1, self.l2, self.l3 = nn.Linear(12, 32), nn.Linear(32, 32), nn.Linear(32, 6)

    def forward(self, x: Tensor) -> Tensor:
        return self.l3(F.relu(self.l2(F.relu(self.l1(self.norm(x))))))


@pytest.mark.parametrize("merge", ["auto", "all"])
def test_linear_chain_on_token_inputs_merges(merge: str) -> None:
    """(N, T, C) tokens: 12 -> 32 -> 32 -> 6 with both ReLUs ON is one 12 -> 6 Linear (cheaper
    too, so 'auto' merges as well); LayerNorm's affine goes into that Linear."""
    m, x = TokenMLP().double(), torch.randn(3, 5, 12, dtype=D)
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.normal_()
    set_states(m, x, {m.l1: "on", m.l2: "on"})
    report = measure(m, x)
    assert zero_entropy(report) == {"relu", "relu_1"}
    assert all(s.neuron_axis == -1 for s in report.sites)
    f = fold(m, x, report, merge=merge)
    (linear,) = weighted(f)
    assert (linear.in_features, linear.out_features) == (12, 6)
    (norm,) = [mod for mod in f.model.modules() if isinstance(mod, nn.LayerNorm)]
    assert norm.weight is None  # gamma / beta moved into the Linear
    assert_exact(m, f, x)


def test_dead_token_neurons_are_dropped_from_both_linears() -> None:
    m, x = TokenMLP().double(), torch.randn(3, 5, 12, dtype=D)
    set_states(m, x, {m.l1: ("off", [0, 5, 7]), m.l2: "mixed"})
    report = measure(m, x)
    assert zero_entropy(report) == set() and report.sites[0].always()["OFF"] == 3
    f = fold(m, x, report, merge="none", channel_align=1)  # the drop logic itself
    assert f.channels_dropped == 3
    assert [(w.in_features, w.out_features) for w in weighted(f)] == [(12, 29), (29, 32), (32, 6)]
    assert_exact(m, f, x)


# ---- precision of constants ------------------------------------------------------------------------

def test_constant_channel_of_a_float64_model_is_folded_exactly() -> None:
    """Channel 0 of c1 has zero weights and bias 0.1234567891234: a constant 0.1234567891234 after
    the (ON for it, mixed elsewhere) ReLU, folded into c2's bias (regression: constants were once
    pushed through in float32)."""
    m, x = MixedOnOff().double(), image()
    set_states(m, x, {m.c1: "mixed"})
    with torch.no_grad():
        m.c1.weight[0] = 0.0
        m.c1.bias[0] = 0.1234567891234
    report = measure(m, x)
    assert zero_entropy(report) == set()
    f = fold(m, x, report, merge="none", channel_align=1)  # the drop logic itself
    assert f.channels_dropped == 1
    assert_exact(m, f, x)


def test_site_names_match_find_sites_on_the_traced_model() -> None:
    """The names the fold reports are the traced graph's site names (the entropy report's)."""
    m, x = Reused().double(), image()
    set_states(m, x, {m.c1: "on", m.c2: "on"})
    f = fold(m, x, merge="none")
    assert sorted(f.linearised) == sorted(s.name for s in find_sites(trace_model(m)))


class SmoothOff(nn.Module):
    """conv -> SiLU -> conv where channel 0's pre-activation sits around -2: always 'OFF' by sign,
    yet SiLU(-2) = -0.24, so the channel is neither dead nor constant."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Conv2d(4, 6, 1), nn.SiLU(), nn.Conv2d(6, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.act(self.a(x)))


def test_always_negative_smooth_rectifier_channels_are_not_dropped() -> None:
    m, x = SmoothOff().to(D), image()
    with torch.no_grad():
        m.a.weight[0] *= 0.01
        m.a.bias[0] = -2.0
    report = measure(m, x)
    assert report.sites[0].always()["OFF"] == 1 and not report.sites[0].zero_entropy
    f = fold(m, x)
    assert f.channels_dropped == 0
    assert_exact(m, f, x)


class PoolHead(nn.Module):
    """conv -> ReLU -> max-pool -> conv -> ReLU -> adaptive avg-pool (2x2) -> flatten -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 5, 3, padding=1)
        self.pool, self.head = nn.AdaptiveAvgPool2d(2), nn.Linear(5 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = F.max_pool2d(F.relu(self.a(x)), 2, padding=1)
        return self.head(torch.flatten(self.pool(F.relu(self.b(y))), 1))


def test_dead_and_constant_channels_are_dropped_through_pooling_and_flatten() -> None:
    """a: channel 1 always OFF (dead), channel 2 a constant 0.7 (zero weights); b: channel 0 always
    OFF, channel 3 a constant 1.3. The pools keep the constants; after flatten each channel is 4
    features of the Linear. All four channels go, the constants end up in b's and head's biases."""
    m, x = PoolHead().to(D), image()
    with torch.no_grad():
        m.a.weight[1] *= 0.01
        m.a.bias[1] = -50.0
        m.a.weight[2] = 0.0
        m.a.bias[2] = 0.7
        m.b.weight[0] *= 0.01
        m.b.bias[0] = -50.0
        m.b.weight[3] = 0.0
        m.b.bias[3] = 1.3
    f = fold(m, x, channel_align=1)  # the drop logic itself (no kept-back channels)
    assert f.channels_dropped == 4
    gm = f.model
    convs = [gm.get_submodule(n.target) for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)]
    heads = [gm.get_submodule(n.target) for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear)]
    assert [c.out_channels for c in convs] == [4, 3] and heads[0].in_features == 3 * 4
    assert_exact(m, f, x)


class ReflectChain(nn.Module):
    """conv (reflect padding) -> BN -> ReLU (always ON) -> 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
        self.bn, self.b = nn.BatchNorm2d(6), nn.Conv2d(6, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(F.relu(self.bn(self.a(x))))


def test_non_zero_padding_modes_are_not_merged_and_say_why() -> None:
    m, x = ReflectChain().to(D), image()
    randomise_bn(m.bn)
    with torch.no_grad():
        m.bn.bias += 100.0
    assert zero_entropy(measure(m, x)) == {"relu"}
    f = fold(m, x, merge="all")
    assert "a: merges of Conv2d with padding_mode='reflect' are not supported" in events(f, "skip")
    assert events(f, "merge") == [] and called(f, nn.Conv2d) == 2
    assert_exact(m, f, x)
