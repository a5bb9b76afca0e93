"""Channel alignment of constant-channel drops (``FoldOptions.channel_align``).

onnxruntime's blocked CPU conv kernels need input channel counts in multiples of 4, so dropping 7 of
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

from nepenthe_compress.cli import main
from nepenthe_compress.entropy import EntropyReport, measure_entropy
from nepenthe_compress.fold.rewrites.channels import aligned_count, kept_back
from nepenthe_compress.fold.core import FoldedGraph, fold_graph
from nepenthe_compress.fold.graph import FoldOptions
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


@torch.no_grad()
def engineered() -> tuple[AlignNet, Tensor]:
    """One eval pass: each BN's running stats from its own input (every channel zero-mean, unit
    variance: mixed), then the edited channels' biases (later BNs see the edited values)."""
    torch.manual_seed(0)
    m, x = AlignNet().eval(), torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    edits = _edits(m)

    def calibrate(bn, args):
        z = args[0].transpose(0, 1).reshape(bn.num_features, -1)
        bn.running_mean.copy_(z.mean(1))
        bn.running_var.copy_(z.var(1, unbiased=False))
        for i, bias in edits.get(bn, {}).items():
            bn.bias[i] = bias

    handles = [bn.register_forward_pre_hook(calibrate) for bn in m.modules() if isinstance(bn, nn.BatchNorm2d)]
    m(x)
    for h in handles:
        h.remove()
    return m, x


@pytest.fixture(scope="module")
def net() -> tuple[AlignNet, Tensor, EntropyReport]:
    m, x = engineered()
    return m, x, measure_entropy(m, [x])


def fold(m: nn.Module, x: Tensor, report: EntropyReport, align: int) -> FoldedGraph:
    return fold_graph(m, report, x[:2], FoldOptions(merge="none", channel_align=align))


def in_channels(f: FoldedGraph) -> dict[str, int]:
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
    f = fold(m, x, report, align)
    got = in_channels(f)
    assert got == expected
    assert (f.channels_dropped, f.channels_kept_for_alignment) == (dropped, kept)
    aligned = all(n % 8 == 0 or n == ORIGINAL[k] for k, n in got.items() if k != "fc")
    assert aligned == (align == 8)
    assert verify_equivalence(m, f.model, [x]).max_rel <= 1e-5
    m64 = copy.deepcopy(m).double()
    f64 = fold(m64, x.double(), measure_entropy(m64, [x.double()]), align)
    assert in_channels(f64) == expected
    assert verify_float64(m64, f64.model, [x]).max_rel <= 1e-10


def test_events_report_both_counts_and_zero_constants_are_kept_first(net) -> None:
    """Through the depthwise chain 5 dead (0) and 6 saturated (6) channels are droppable, 3 are
    kept back: all three are dead ones, so only 2 zero channels go and all 6 constants 6 are
    folded into p's bias."""
    m, x, report = net
    f = fold(m, x, report, 8)
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
