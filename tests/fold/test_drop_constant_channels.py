"""``drop_constant_channels``: dead and constant channels leave their producer, the per-channel ops
after it and every consumer (their constants go into the consumers' biases), unless the consumers
are not all dense conv / linear layers; some are kept back so channel counts stay aligned
(``FoldOptions.channel_align``): onnxruntime's blocked CPU conv kernels need input channel counts in multiples of 4, so dropping 7 of
64 channels (57 left) makes the model slower. With alignment N the count left is a multiple of N
whenever one is in reach and never less aligned than the original count.

``AlignNet`` (random weights, BN statistics calibrated per channel on its own batch so every neuron
is mixed) has dead channels engineered by a BN bias of -100 (ReLU / ReLU6 always OFF, constant 0)
and saturated ones by +100 (ReLU6 always at 6, constant 6):

    a 3->64 3x3   7 dead    64 - 7 = 57   -> keep 64 (drop 0)  | align 1: 57
    b 64->64 3x3  13 dead   64 - 13 = 51  -> keep 56 (drop 8)  | align 1: 51
    e 64->48 1x1 -> ReLU6 -> depthwise d 3x3 -> ReLU6 (after d: 5 dead, 6 saturated)
                  11 const  48 - 11 = 37  -> keep 40 (drop 8)  | align 1: 37
    p 48->32 1x1  (mixed)
    c 32->32 1x1 -> ReLU -> avg-pool 2x2 -> flatten -> fc (32*4 -> 10)
                  11 dead   32 - 11 = 21  -> keep 24 (drop 8)  | align 1: 21 (fc: 84 features)
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import Tensor, nn

from kit import (D, assert_exact, calibrate, events, fold, image, measure, modules, set_states, weighted,
                 zero_entropy)
from nepenthe_compress.cli import main
from nepenthe_compress.entropy import EntropyReport, measure_entropy
from nepenthe_compress.fold.driver import FoldedModel
from nepenthe_compress.fold.rewriter import FoldOptions
from nepenthe_compress.fold.rewrites.channels import aligned_count, kept_back
from nepenthe_compress.verify import verify_equivalence, verify_float64

DEAD_A, DEAD_B, DEAD_D, SAT_D, DEAD_C = 7, 13, 5, 6, 11


# ---- the rule ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels, droppable, align, kept", [
    (64, 7, 8, 64),    # 57 -> the next multiple of 8 is 64: nothing dropped
    (64, 13, 8, 56),   # 51 -> 56: 8 dropped, 5 kept back
    (64, 13, 1, 51),   # no alignment: all 13 dropped
    (64, 16, 8, 48),   # already aligned: all dropped
    (63, 10, 8, 56),   # 63 is unaligned, but 56 is in reach
    (61, 4, 8, 60),    # no multiple of 8 in [57, 61]: 60 (a multiple of 4) beats 61
    (58, 1, 8, 58),    # 57 would be less aligned (gcd 1) than 58 (gcd 2): keep 58
    (6, 3, 8, 4),      # [3, 6]: 4 is the best aligned
    (32, 11, 4, 24),   # 21 -> 24
])
def test_aligned_count(channels: int, droppable: int, align: int, kept: int) -> None:
    assert aligned_count(channels, droppable, align) == kept


def test_zero_constants_are_kept_back_first() -> None:
    consts = [0.0, 6.0, None, 0.0, -1.0, 0.0]
    assert kept_back(consts, [0, 1, 3, 4, 5], 2) == [0, 3]
    assert kept_back(consts, [0, 1, 3, 4, 5], 4) == [0, 3, 5, 1]
    assert kept_back(consts, [1, 4], 1) == [1]


def test_alignment_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="channel_align"):
        FoldOptions(channel_align=0)


# ---- small graphs: constants through per-channel ops, into consumers -----------------------------------

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
    torch.manual_seed(0)
    m, x = Clipped().double(), image()
    with torch.no_grad():
        m.c1.weight.mul_(0.01)
        m.c1.bias.copy_(torch.tensor([5.0, 5.0, -5.0, 0.5, 0.5, 0.5], dtype=D))
    report = measure(m, x)
    assert zero_entropy(report) == {"clip"}
    assert report.sites[0].always() == {"OFF": 1, "LINEAR": 3, "SATURATED": 2}
    f = fold(m, x, merge="none", channel_align=1)  # the drop logic itself (no kept-back channels)
    assert f.channels_dropped == 3
    assert events(f, "drop") == ["c1: 3 constant channel(s) removed (0 zero, 3 folded into the consumers' bias)"]
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
    torch.manual_seed(0)
    m, x = MixedOnOff().double(), image()
    set_states(m, x, {m.c1: ("off", [0, 1])})
    set_states(m, x, {m.c1: ("on", [2, 3, 4, 5])})
    report = measure(m, x)
    assert zero_entropy(report) == {"relu"} and report.sites[0].always() == {"OFF": 2, "ON": 4}
    f = fold(m, x, merge="none")
    assert f.channels_dropped == 2
    assert [w.out_channels for w in weighted(f)] == [4, 3]
    assert_exact(m, f, x)


def test_constant_channel_of_a_float64_model_is_folded_exactly() -> None:
    """Channel 0 of c1 has zero weights and bias 0.1234567891234: a constant 0.1234567891234 after
    the (ON for it, mixed elsewhere) ReLU, folded into c2's bias (regression: constants were once
    pushed through in float32)."""
    torch.manual_seed(0)
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


class TokenMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(12, 32), nn.Linear(32, 32), nn.Linear(32, 6)

    def forward(self, x: Tensor) -> Tensor:
        return self.l3(F.relu(self.l2(F.relu(self.l1(x)))))


def test_dead_token_neurons_are_dropped_from_both_linears() -> None:
    torch.manual_seed(0)
    m, x = TokenMLP().double(), torch.randn(3, 5, 12, dtype=D)
    set_states(m, x, {m.l1: ("off", [0, 5, 7]), m.l2: "mixed"})
    report = measure(m, x)
    assert zero_entropy(report) == set() and report.sites[0].always()["OFF"] == 3
    f = fold(m, x, report, merge="none", channel_align=1)  # the drop logic itself
    assert f.channels_dropped == 3
    assert [(w.in_features, w.out_features) for w in weighted(f)] == [(12, 29), (29, 32), (32, 6)]
    assert_exact(m, f, x)


class TokensFlattened(nn.Module):
    """Linear on (N, T, C) tokens -> ReLU -> flatten(1) -> Linear: flatten interleaves the channels
    with the tokens, so a channel is no block of features."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(3 * 5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(torch.flatten(F.relu(self.l1(x)), 1))


def test_token_channels_are_not_dropped_through_a_flatten() -> None:
    """Regression: the drop once sliced l2 as if channel i were features [i*T, (i+1)*T)."""
    torch.manual_seed(0)
    m, x = TokensFlattened().double(), torch.randn(6, 3, 4, dtype=D)
    with torch.no_grad():
        m.l1.weight[1], m.l1.bias[1] = 0.0, -1.0   # dead
        m.l1.weight[3], m.l1.bias[3] = 0.0, 0.5    # constant 0.5
    f = fold(m, x, channel_align=1)
    assert f.channels_dropped == 0
    assert events(f, "skip") == ["l1: 2 constant channel(s) kept: consumers (flatten) are not all conv/linear layers"]
    assert_exact(m, f, x)


class Coupled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(4, 6, 1), nn.Conv2d(4, 6, 1), nn.Conv2d(6, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.a(x)) + self.b(x))


def test_channels_coupled_through_a_residual_add_are_kept_and_the_skip_says_why() -> None:
    torch.manual_seed(0)
    m, x = Coupled().double(), image()
    set_states(m, x, {m.a: ("off", [2])})
    f = fold(m, x, channel_align=1, merge="none")
    assert f.channels_dropped == 0
    assert events(f, "skip") == ["a: 1 constant channel(s) kept: coupled through a residual add"]
    assert_exact(m, f, x)


class SmoothOff(nn.Module):
    """conv -> SiLU -> conv where channel 0's pre-activation sits around -2: always 'OFF' by sign,
    yet SiLU(-2) = -0.24, so the channel is neither dead nor constant."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Conv2d(4, 6, 1), nn.SiLU(), nn.Conv2d(6, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.act(self.a(x)))


def test_always_negative_smooth_rectifier_channels_are_not_dropped() -> None:
    torch.manual_seed(0)
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
    torch.manual_seed(0)
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
    convs, heads = modules(f, nn.Conv2d), modules(f, nn.Linear)
    assert [c.out_channels for c in convs] == [4, 3] and heads[0].in_features == 3 * 4
    assert_exact(m, f, x)


# ---- a small conv net with engineered constant channels ----------------------------------------------

class AlignNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.b, self.bn_b = nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.e, self.bn_e = nn.Conv2d(64, 48, 1), nn.BatchNorm2d(48)
        self.d, self.bn_d = nn.Conv2d(48, 48, 3, padding=1, groups=48), nn.BatchNorm2d(48)
        self.p, self.bn_p = nn.Conv2d(48, 32, 1), nn.BatchNorm2d(32)
        self.c, self.bn_c = nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(2), nn.Linear(32 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn_b(self.b(F.relu(self.bn_a(self.a(x))))))
        x = F.relu6(self.bn_d(self.d(F.relu6(self.bn_e(self.e(x))))))
        x = F.relu(self.bn_c(self.c(F.relu(self.bn_p(self.p(x))))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _edits(m: AlignNet) -> dict[nn.BatchNorm2d, dict[int, float]]:
    """BN -> {channel: bias}: -100 dead, +100 saturated ReLU6; spread over the channels."""
    def spread(n: int, channels: int, start: int = 0) -> list[int]:
        return [(start + 5 * i) % channels for i in range(n)]

    d = {i: -100.0 for i in spread(DEAD_D, 48)} | {i: 100.0 for i in spread(SAT_D, 48, 1)}
    return {m.bn_a: {i: -100.0 for i in spread(DEAD_A, 64)},
            m.bn_b: {i: -100.0 for i in spread(DEAD_B, 64, 2)},
            m.bn_d: d,
            m.bn_c: {i: -100.0 for i in spread(DEAD_C, 32, 3)}}


def engineered() -> tuple[AlignNet, Tensor]:
    """Each BN's running stats from its own input (every channel zero-mean, unit variance: mixed),
    then the edited channels' biases (later BNs see the edited values)."""
    torch.manual_seed(0)
    m, x = AlignNet().eval(), torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    calibrate(m, x, bias=_edits(m))
    return m, x


@pytest.fixture(scope="module")
def net() -> tuple[AlignNet, Tensor, EntropyReport]:
    m, x = engineered()
    return m, x, measure_entropy(m, [x])


def fold_none(m: nn.Module, x: Tensor, report: EntropyReport, align: int) -> FoldedModel:
    return fold(m, x, report, merge="none", channel_align=align)


def in_channels(f: FoldedModel) -> dict[str, int]:
    """Original module name -> input channels (features for the Linear) of the folded layer."""
    gm, out = f.model, {}
    for n in gm.graph.nodes:
        mod = gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            out[str(n.meta.get("nc_label", n.target))] = getattr(mod, "in_channels", None) or mod.in_features
    return out


def test_engineering_holds(net) -> None:
    _, _, report = net
    assert not [s.name for s in report.sites if s.zero_entropy]
    off = {s.name: s.always()["OFF"] for s in report.sites}
    assert sorted(off.values()) == sorted([DEAD_A, DEAD_B, 0, DEAD_D, 0, DEAD_C])
    assert sum(s.always().get("SATURATED", 0) for s in report.sites) == SAT_D


ORIGINAL = {"a": 3, "b": 64, "e": 64, "d": 48, "p": 48, "c": 32, "fc": 128}
ALIGNED = {"a": 3, "b": 64, "e": 56, "d": 40, "p": 40, "c": 32, "fc": 24 * 4}
UNALIGNED = {"a": 3, "b": 57, "e": 51, "d": 37, "p": 37, "c": 32, "fc": 21 * 4}


@pytest.mark.parametrize("align, expected, dropped, kept", [
    (8, ALIGNED, 0 + 8 + 8 + 8, DEAD_A + 5 + 3 + 3),
    (1, UNALIGNED, DEAD_A + DEAD_B + DEAD_D + SAT_D + DEAD_C, 0),
])
def test_counts_and_exactness(net, align: int, expected: dict, dropped: int, kept: int) -> None:
    m, x, report = net
    f = fold_none(m, x, report, align)
    got = in_channels(f)
    assert got == expected
    assert (f.channels_dropped, f.channels_kept_for_alignment) == (dropped, kept)
    aligned = all(n % 8 == 0 or n == ORIGINAL[k] for k, n in got.items() if k != "fc")
    assert aligned == (align == 8)
    assert verify_equivalence(m, f.model, [x]).max_rel <= 1e-5
    m64 = copy.deepcopy(m).double()
    f64 = fold_none(m64, x.double(), measure_entropy(m64, [x.double()]), align)
    assert in_channels(f64) == expected
    assert verify_float64(m64, f64.model, [x]).max_rel <= 1e-10


def test_events_report_both_counts_and_zero_constants_are_kept_first(net) -> None:
    """Through the depthwise chain 5 dead (0) and 6 saturated (6) channels are droppable, 3 are
    kept back: all three are dead ones, so only 2 zero channels go and all 6 constants 6 are
    folded into p's bias."""
    m, x, report = net
    f = fold_none(m, x, report, 8)
    events = {e.where: (e.action, e.detail) for e in f.events if e.action in ("drop", "skip")}
    assert events == {
        "a": ("skip", "7 constant channel(s) kept for 8-alignment (57 -> 64 kept)"),
        "b": ("drop", "8 constant channel(s) removed (8 zero, 0 folded into the consumers' bias), "
                      "5 kept for 8-alignment (51 -> 56 kept)"),
        "e": ("drop", "8 constant channel(s) removed (2 zero, 6 folded into the consumers' bias), "
                      "3 kept for 8-alignment (37 -> 40 kept)"),
        "c": ("drop", "8 constant channel(s) removed (8 zero, 0 folded into the consumers' bias), "
                      "3 kept for 8-alignment (21 -> 24 kept)"),
    }


def test_cli_refuses_an_alignment_below_one(tmp_path) -> None:
    res = CliRunner().invoke(main, ["fold", str(tmp_path / "any.pt"), "--channel-align", "0"])
    assert res.exit_code == 2 and "--channel-align" in res.output
    assert list(tmp_path.iterdir()) == []
