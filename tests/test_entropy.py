"""Neuron-state counts and entropies against an independent float64 recomputation of every
pre-activation (forward hooks on a float64 copy, or the maths written out), counted with numpy."""
from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from click.testing import CliRunner
from torch import Tensor, nn

from nepenthe_compress.archs import build_model
from nepenthe_compress.checkpoint import save_checkpoint
from nepenthe_compress.commands.entropy import entropy as entropy_cmd
from nepenthe_compress.entropy import EntropyMeter, EntropyReport, SiteStats, measure_entropy
from nepenthe_compress.errors import DataError, UserError
from nepenthe_compress.plot import (
    ZERO_ENTROPY_COLOUR,
    entropy_figure,
    neuron_fractions,
    plot_entropy,
    site_labels,
)

# ---- independent reference -------------------------------------------------------------------

# module type -> state thresholds, written here from docs/DESIGN.md 2 (not taken from the registry)
THRESHOLDS: dict[type, Callable[[nn.Module], tuple[float, ...]]] = {
    nn.ReLU: lambda m: (0.0,), nn.GELU: lambda m: (0.0,), nn.LeakyReLU: lambda m: (0.0,),
    nn.ReLU6: lambda m: (0.0, 6.0), nn.Hardtanh: lambda m: (m.min_val, m.max_val),
}


def capture(model: nn.Module, x: Tensor, types: tuple[type, ...]) -> list[tuple[str, Tensor, tuple]]:
    """(label, input, thresholds) of every call of a module of ``types``, in call order; the k-th
    reuse of a module is labelled ``name#k``."""
    names = {m: n for n, m in model.named_modules()}
    calls: Counter[str] = Counter()
    seen: list[tuple[str, Tensor, tuple]] = []

    def hook(mod: nn.Module, args: tuple) -> None:
        name = names[mod]
        seen.append((name if calls[name] == 0 else f"{name}#{calls[name]}", args[0].detach().clone(),
                     THRESHOLDS[type(mod)](mod)))
        calls[name] += 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if type(m) in types]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return seen


def neuron_rows(z: np.ndarray, axis: int) -> np.ndarray:
    """(elements, neurons): every element of neuron i in column i."""
    z = np.moveaxis(z, axis, -1)
    return z.reshape(-1, z.shape[-1])


def state_counts(z: np.ndarray, axis: int, thresholds: tuple[float, ...]) -> np.ndarray:
    """int64 [neurons, states]: OFF z<=t / ON z>t, or OFF z<=lo / LINEAR lo<z<hi / SATURATED z>=hi."""
    r = neuron_rows(z, axis)
    if len(thresholds) == 1:
        (t,) = thresholds
        cols = [(r <= t).sum(0), (r > t).sum(0)]
    else:
        lo, hi = thresholds
        cols = [(r <= lo).sum(0), ((r > lo) & (r < hi)).sum(0), (r >= hi).sum(0)]
    return np.stack(cols, axis=1).astype(np.int64)


def entropy_bits(counts: np.ndarray) -> np.ndarray:
    """-sum_s p_s log2 p_s per neuron (float64)."""
    p = counts / counts.sum(axis=1, keepdims=True)
    logs = np.log2(np.where(p > 0, p, 1.0))
    return -(p * logs).sum(axis=1)


def check_site(stat: SiteStats, z64: Tensor, z32: Tensor, axis: int,
               thresholds: tuple) -> tuple[np.ndarray, int]:
    """Assert ``stat`` matches counts of the float64 pre-activation ``z64``; returns those counts and
    the number of elements within float32 rounding of a threshold (the caller bounds it).

    An element may only be counted differently where float32 rounding (bounded by twice the observed
    max |z32 - z64|) could put it on the other side of a threshold.
    """
    z = z64.double().numpy()
    tol = 2.0 * float((z32.double() - z64.double()).abs().max())
    ref = state_counts(z, axis, thresholds)
    r = neuron_rows(z, axis)
    near = np.zeros(r.shape[1], dtype=np.int64)
    for t in thresholds:
        near += (np.abs(r - t) <= tol).sum(0)
    assert stat.counts.dtype == np.int64 and stat.counts.shape == ref.shape, stat.name
    assert stat.neuron_axis == axis, stat.name
    assert np.array_equal(stat.counts.sum(1), ref.sum(1)), stat.name
    assert (np.abs(stat.counts - ref) <= near[:, None]).all(), stat.name
    np.testing.assert_allclose(stat.entropy_per_neuron, entropy_bits(stat.counts), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stat.entropy, entropy_bits(ref).mean(), rtol=0,
                               atol=1e-12 if near.sum() == 0 else 1e-3)
    constant = (stat.counts > 0).sum(1) == 1
    assert stat.zero_entropy == bool(constant.all())
    mixed_bits = entropy_bits(stat.counts)[~constant]
    assert stat.entropy_mixed == pytest.approx(mixed_bits.mean() if mixed_bits.size else 0.0, rel=0, abs=1e-12)
    assert stat.always() == {s: int((constant & (stat.counts[:, i] > 0)).sum()) for i, s in enumerate(stat.states)}
    assert stat.mixed == int((~constant).sum())
    return ref, int(near.sum())


def check_model(model: nn.Module, x: Tensor, types: tuple[type, ...], axes: list[int]) -> list[np.ndarray]:
    """measure_entropy over two batches of ``x`` vs the float64 hook reference of every site."""
    model.eval()
    half = len(x) // 2
    report = measure_entropy(model, [x[:half], x[half:]])
    z32 = capture(model, x, types)
    z64 = capture(copy.deepcopy(model).double(), x.double(), types)
    assert report.samples == len(x)
    assert [s.target for s in report.sites] == [label for label, _, _ in z64]
    assert len(axes) == len(z64)
    checked = [check_site(stat, b, a, axis, th) for stat, (_, a, _), (_, b, th), axis
               in zip(report.sites, z32, z64, axes)]
    elements = sum(z.numel() for _, z, _ in z64)
    assert sum(near for _, near in checked) <= 1e-4 * elements  # rounding decides almost nothing
    return [ref for ref, _ in checked]


# ---- torchvision architectures -----------------------------------------------------------------

def test_resnet18_shared_relu_17_sites() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    refs = check_model(model, torch.randn(2, 3, 32, 32), (nn.ReLU,), [1] * 17)
    assert [r.shape[0] for r in refs] == [64] * 5 + [128] * 4 + [256] * 4 + [512] * 4
    assert sum(r[:, 0].sum() for r in refs) > 0 and sum(r[:, 1].sum() for r in refs) > 0


def test_mobilenet_v2_relu6_three_states_with_saturation() -> None:
    torch.manual_seed(1)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=10)
    with torch.no_grad():  # BN scales/shifts that push many pre-activations past 6
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 8.0)
                m.bias.uniform_(-3.0, 6.0)
    refs = check_model(model, torch.randn(2, 3, 32, 32), (nn.ReLU6,), [1] * 35)
    saturating = [r for r in refs if r[:, 2].sum() > 0]
    assert len(saturating) >= 30
    assert all(r[:, 0].sum() > 0 and r[:, 1].sum() > 0 for r in refs[:10])
    assert any(((r > 0).sum(1) == 3).any() for r in refs)  # some neurons visit all three states


def test_vgg11_bn_conv_and_linear_sites() -> None:
    torch.manual_seed(2)
    model = torchvision.models.vgg11_bn(weights=None, num_classes=10)
    refs = check_model(model, torch.randn(2, 3, 32, 32), (nn.ReLU,), [1] * 8 + [-1, -1])
    assert [r.shape[0] for r in refs] == [64, 128, 256, 256, 512, 512, 512, 512, 4096, 4096]


def test_swin_t_gelu_counts_per_last_axis_channel() -> None:
    torch.manual_seed(3)
    model = torchvision.models.swin_t(weights=None, num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    refs = check_model(model, x, (nn.GELU,), [-1] * 12)
    z = capture(model, x, (nn.GELU,))
    for r, (_, zi, _) in zip(refs, z):
        assert zi.dim() == 4 and zi.shape[1] != zi.shape[-1]  # (N, H, W, C): axis 1 would be wrong
        assert r.shape[0] == zi.shape[-1] and r.sum(1)[0] == zi[..., 0].numel()


# ---- tiny edge cases, pre-activations written out in float64 ----------------------------------

class Branches(nn.Module):
    """Parallel conv -> rectifier branches, one per rectifier form (functional, method, in-place)."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, 4, 3, padding=1) for _ in range(11))
        self.relu_inplace = nn.ReLU(inplace=True)
        self.leaky, self.prelu, self.clip = nn.LeakyReLU(0.1), nn.PReLU(4), nn.Hardtanh(-0.5, 0.7)

    def forward(self, x: Tensor) -> Tensor:
        c = [conv(x) for conv in self.convs]
        outs = [F.relu(c[0]), torch.relu(c[1]), c[2].relu(), self.relu_inplace(c[3]),
                F.relu(c[4], inplace=True) + c[4],  # c[4] read after its mutation
                c[5].relu_(), self.leaky(c[6]), self.prelu(c[7]), self.clip(c[8]),
                F.hardtanh(c[9], -0.3, 0.2), F.relu6(c[10] * 10.0)]
        return torch.cat(outs, dim=1)


BRANCH_THRESHOLDS = [(0.0,)] * 8 + [(-0.5, 0.7), (-0.3, 0.2), (0.0, 6.0)]


def test_every_rectifier_form_counts() -> None:
    torch.manual_seed(4)
    model = Branches().eval()
    x = torch.randn(3, 3, 6, 6)
    report = measure_entropy(model, [x])
    assert len(report.sites) == 11
    with torch.no_grad():
        for i, (stat, th) in enumerate(zip(report.sites, BRANCH_THRESHOLDS)):
            conv = model.convs[i]
            scale = 10.0 if i == 10 else 1.0
            z64 = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1) * scale
            ref, near = check_site(stat, z64, conv(x) * scale, 1, th)
            assert near == 0
            if len(th) == 2:
                assert (ref.sum(0) > 0).all()  # all three states occur
    assert torch.equal(EntropyMeter(model).gm(x), model(x))  # probes leave the outputs alone


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 12)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.fc2(F.relu(self.fc1(x))))


def test_linear_mlp_on_tokens_counts_last_axis() -> None:
    torch.manual_seed(5)
    model = Mlp()
    x = torch.randn(3, 5, 8)  # (N, T, C)
    s1, s2 = measure_entropy(model, [x]).sites
    w1, b1, w2, b2 = (p.detach().double() for p in (model.fc1.weight, model.fc1.bias, model.fc2.weight,
                                                     model.fc2.bias))
    z1 = x.double() @ w1.T + b1
    z2 = torch.relu(z1) @ w2.T + b2
    with torch.no_grad():
        assert check_site(s1, z1, model.fc1(x), -1, (0.0,))[1] == 0
        assert check_site(s2, z2, model.fc2(F.relu(model.fc1(x))), -1, (0.0,))[1] == 0
    assert s1.neurons == 16 and s2.neurons == 12 and s1.elements == 15


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)
        self.act = nn.LeakyReLU(0.05)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv2(self.act(self.conv1(x))))


def test_shared_module_two_sites_counted_separately() -> None:
    torch.manual_seed(6)
    model = Shared().eval()
    x = torch.randn(2, 3, 7, 7)
    report = measure_entropy(model, [x])
    assert [s.target for s in report.sites] == ["act", "act#1"]
    c1, c2 = model.conv1, model.conv2
    z1 = F.conv2d(x.double(), c1.weight.double(), c1.bias.double())
    z2 = F.conv2d(F.leaky_relu(z1, 0.05), c2.weight.double(), c2.bias.double())
    with torch.no_grad():
        r1, near1 = check_site(report.sites[0], z1, c1(x), 1, (0.0,))
        r2, near2 = check_site(report.sites[1], z2, c2(model.act(c1(x))), 1, (0.0,))
    assert near1 == near2 == 0
    assert r1.sum() == 2 * 4 * 25 and r2.sum() == 2 * 4 * 9


class InputSite(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x)


def test_site_on_graph_input_counts_axis_1() -> None:
    x = torch.randn(4, 3, 5, 5)
    x[:, 1] = x[:, 1].abs() + 0.1  # channel 1 always ON
    (stat,) = measure_entropy(InputSite(nn.ReLU()), [x]).sites
    np.testing.assert_array_equal(stat.counts, state_counts(x.double().numpy(), 1, (0.0,)))
    assert stat.always() == {"OFF": 0, "ON": 1} and stat.mixed == 2


@pytest.mark.parametrize("act, values, expected", [
    (nn.ReLU(), [-1.0, 0.0, 1e-30, 2.0], [2, 2]),                       # z == 0 is OFF
    (nn.ReLU6(), [0.0, 1e-30, 6.0, 6.0 - 1e-6, 7.0], [1, 2, 2]),       # 0 OFF, 6 SATURATED
    (nn.Hardtanh(-0.5, 0.7), [-0.5, -0.5 + 1e-6, 0.7, 0.7 - 1e-6, 0.0], [1, 3, 1]),
], ids=["relu", "relu6", "hardtanh"])
def test_state_boundaries(act: nn.Module, values: list[float], expected: list[int]) -> None:
    x = torch.tensor(values, dtype=torch.float32).view(1, 1, -1)
    (stat,) = measure_entropy(InputSite(act), [x]).sites
    assert stat.counts.tolist() == [expected]


# ---- zero entropy ------------------------------------------------------------------------------

class Engineered(nn.Module):
    """conv+BN+ReLU with BN shifts of +-100 (always ON / OFF), conv+BN+ReLU6 pinned to each of its
    three states, and an ordinary conv+ReLU on the input that mixes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(3, 5, 3, padding=1)
        with torch.no_grad():
            self.bn1.weight.fill_(0.01)
            self.bn1.bias.copy_(torch.tensor([100.0, -100.0] * 4))
            self.bn2.weight.fill_(1e-4)
            self.bn2.bias.copy_(torch.tensor([-100.0, 3.0, 100.0, 3.0, -100.0, 100.0]))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu6(self.bn2(self.conv2(y)))
        return y.sum(1, keepdim=True) + F.relu(self.conv3(x))


def test_zero_entropy_detection() -> None:
    torch.manual_seed(7)
    model = Engineered().eval()
    report = measure_entropy(model, [torch.randn(4, 3, 6, 6)])
    on_off, clip, mixed = report.sites
    assert [s.name for s in report.zero_entropy_sites] == [on_off.name, clip.name]
    assert on_off.zero_entropy and on_off.entropy == 0.0 and on_off.mixed == 0
    assert on_off.always() == {"OFF": 4, "ON": 4}
    assert on_off.neuron_state.tolist() == [1, 0] * 4
    assert clip.always() == {"OFF": 2, "LINEAR": 2, "SATURATED": 2}
    assert clip.neuron_state.tolist() == [0, 1, 2, 1, 0, 2]
    assert np.array_equal(on_off.counts.max(1), np.full(8, 4 * 36))
    assert not mixed.zero_entropy and mixed.mixed > 0 and mixed.entropy > 0
    d = report.to_dict()
    assert (d["zero_entropy_sites"], d["total_sites"], d["samples"]) == (2, 3, 4)
    assert d["sites"][1]["always"] == {"OFF": 2, "LINEAR": 2, "SATURATED": 2}


def stats_of(counts: list[list[int]], states: tuple[str, ...] = ("OFF", "ON")) -> SiteStats:
    return SiteStats("relu", "relu", "relu", 1, states, np.array(counts, dtype=np.int64).reshape(-1, len(states)))


def test_mean_over_mixed_neurons_as_egp_reports_it() -> None:
    """Hand-computed: two neurons always OFF, two mixed with p(ON) = 1/2 (1 bit) and 1/5."""
    h_fifth = -(0.2 * np.log2(0.2) + 0.8 * np.log2(0.8))            # 0.7219280948873623 bits
    partly = stats_of([[10, 0], [10, 0], [5, 5], [8, 2]])
    assert partly.mixed == 2 and not partly.zero_entropy
    assert partly.entropy == pytest.approx((0 + 0 + 1 + h_fifth) / 4, rel=0, abs=1e-15)      # eq. 5: all neurons
    assert partly.entropy_mixed == pytest.approx((1 + h_fifth) / 2, rel=0, abs=1e-15)        # EGP: mixed only
    assert partly.entropy_mixed == pytest.approx(0.8609640474436812, rel=0, abs=1e-15)
    d = partly.to_dict()
    assert (d["entropy"], d["entropy_mixed_mean"], d["zero_entropy"]) == (partly.entropy, partly.entropy_mixed, False)
    # three states: [2, 1, 1] of 4 elements is 1.5 bits; the two constant neurons only dilute eq. 5
    clip = stats_of([[4, 0, 0], [2, 1, 1], [0, 0, 4]], ("OFF", "LINEAR", "SATURATED"))
    assert (clip.entropy, clip.entropy_mixed) == (pytest.approx(0.5, abs=1e-15), pytest.approx(1.5, abs=1e-15))
    # no mixed neuron: both are 0 and the zero-entropy verdict is unchanged
    dead = stats_of([[7, 0], [0, 7], [7, 0]])
    assert (dead.entropy, dead.entropy_mixed, dead.zero_entropy) == (0.0, 0.0, True)
    empty = stats_of([])                                                 # a site that never ran
    assert (empty.entropy, empty.entropy_mixed, empty.zero_entropy) == (0.0, 0.0, False)


def test_entropy_table_shows_both_means() -> None:
    from rich.console import Console

    from nepenthe_compress.commands.entropy import entropy_table

    report = EntropyReport([stats_of([[10, 0], [10, 0], [5, 5], [8, 2]]), stats_of([[3, 0], [0, 3]])], samples=10)
    console = Console(width=200, record=True)
    console.print(entropy_table(report))
    text = console.export_text()
    assert "all neurons" in text and "mixed (EGP)" in text
    rows = [[c.strip() for c in ln.split("│")] for ln in text.splitlines() if ln.startswith("│ relu")]
    # site, kind, neurons, OFF, ON, SATURATED, mixed, entropy all, entropy mixed, zero entropy
    assert [r[1:-1] for r in rows] == [["relu", "relu", "4", "2", "0", "-", "2", "0.4305", "0.8610", ""],
                                       ["relu", "relu", "2", "1", "1", "-", "0", "0.0000", "0.0000", "yes"]]


# ---- streaming -------------------------------------------------------------------------------

def test_counts_int64_and_accumulate_over_batches() -> None:
    torch.manual_seed(8)
    model = Shared().eval()
    x = torch.randn(7, 3, 8, 8)
    whole = measure_entropy(model, [x])
    parts = measure_entropy(model, [x[:2], x[2:3], x[3:]])
    assert whole.samples == parts.samples == 7
    for a, b, hw in zip(whole.sites, parts.sites, (36, 16)):
        assert a.counts.dtype == np.int64 and b.counts.dtype == np.int64
        np.testing.assert_array_equal(a.counts, b.counts)
        assert np.all(a.counts.sum(1) == 7 * hw)
    meter = EntropyMeter(model)
    meter.update(x[:4])
    meter.update(x[4:])
    np.testing.assert_array_equal(meter.report().sites[1].counts, whole.sites[1].counts)


def test_reduce_is_applied_to_counts_and_samples() -> None:
    torch.manual_seed(9)
    model, x = Shared(), torch.randn(3, 3, 8, 8)
    one = measure_entropy(model, [x])
    three = measure_entropy(model, [x], reduce=lambda t: t * 3)  # a SUM all-reduce over 3 ranks
    assert three.samples == 9
    for a, b in zip(one.sites, three.sites):
        np.testing.assert_array_equal(b.counts, 3 * a.counts)
        np.testing.assert_allclose(b.entropy, a.entropy, rtol=0, atol=1e-12)


def test_no_batches_is_a_data_error() -> None:
    with pytest.raises(DataError, match="no calibration samples"):
        measure_entropy(Shared(), [])


def test_moments_per_neuron_streamed_over_batches() -> None:
    """min / max (exact) and mean / std of every neuron's pre-activation, from three batches, against
    numpy over the float32 pre-activations captured by hooks (axis 1 for a conv, last for a Linear)."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 36, 7), nn.ReLU6()).eval()
    with torch.no_grad():
        model[0].bias.add_(3.0)                         # |mean| > std: sums must not cancel badly
    x = torch.randn(9, 3, 8, 8)
    report = measure_entropy(model, [x[:2], x[2:5], x[5:]], moments=True)
    assert all(s.moments is None for s in measure_entropy(model, [x]).sites)   # off by default
    for stats, (_, z, _), axis in zip(report.sites, capture(model, x, (nn.ReLU, nn.ReLU6)), (1, 1)):
        rows = neuron_rows(z.numpy().astype(np.float64), axis if z.dim() == 4 else -1)
        m = stats.moments
        np.testing.assert_array_equal(m.low, rows.min(0))
        np.testing.assert_array_equal(m.high, rows.max(0))
        np.testing.assert_allclose(m.mean, rows.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(m.std, rows.std(0), rtol=1e-4)
        assert stats.elements == rows.shape[0] and m.low.dtype == np.float64
    assert report.to_dict()["sites"][0]["observations"] == 9 * 36
    picked = report.sites[1].select(np.array([True, False, True, False, False, False, True]))
    assert picked.neurons == 3 and picked.moments.low.tolist() == report.sites[1].moments.low[[0, 2, 6]].tolist()


def test_figure_with_a_margin_splits_off_uncertain_neurons_and_shows_the_bound() -> None:
    from nepenthe_compress.certify import flip_bound, inside_margin

    report = engineered_report()
    margin = 1e4                        # the engineered ON/OFF neurons are ~1e4 stds from 0: some fall inside
    fig = entropy_figure(report, margin)
    ax = fig.axes[0]
    bars = {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers
            if not c.get_label().startswith("_")}
    inside = [float(inside_margin(s, margin).sum()) / s.neurons for s in report.sites]
    assert 0 < sum(inside) and bars[f"one state, inside margin ({margin:g} std)"] == pytest.approx(inside)
    totals = np.sum([v for v in bars.values()], axis=0)
    np.testing.assert_allclose(totals, 1.0)
    texts = [t.get_text() for t in ax.texts]
    assert texts == [f"{flip_bound(s.elements):.0e}" for s in report.sites]


# ---- plot --------------------------------------------------------------------------------------

def engineered_report():
    torch.manual_seed(7)
    return measure_entropy(Engineered().eval(), [torch.randn(2, 3, 6, 6)], moments=True)


def test_figure_bars_and_line_match_the_counts() -> None:
    report = engineered_report()
    fig = entropy_figure(report)
    ax, ax2 = fig.axes
    bars = {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers
            if not c.get_label().startswith("_")}
    expected: dict[str, list[float]] = {"always OFF": [], "always ON / LINEAR": [], "always SATURATED": [],
                                        "mixed": []}
    for s in report.sites:
        constant = (s.counts > 0).sum(1) == 1
        state = s.counts.argmax(1)
        n = s.counts.shape[0]
        names = [s.states[i] for i in state[constant]]
        expected["always OFF"].append(names.count("OFF") / n)
        expected["always ON / LINEAR"].append((names.count("ON") + names.count("LINEAR")) / n)
        expected["always SATURATED"].append(names.count("SATURATED") / n)
        expected["mixed"].append(float((~constant).sum()) / n)
    assert bars.keys() == expected.keys()
    for key, values in expected.items():
        np.testing.assert_allclose(bars[key], values, rtol=0, atol=1e-12, err_msg=key)
    assert [neuron_fractions(s) for s in report.sites] == [
        {k: expected[k][i] for k in expected} for i in range(len(report.sites))]
    line, mixed_line = ax2.get_lines()[:2]
    np.testing.assert_allclose(line.get_ydata(), [entropy_bits(s.counts).mean() for s in report.sites],
                               rtol=0, atol=1e-12)
    mixed_means = [(lambda h: h[h > 0].mean() if (h > 0).any() else 0.0)(entropy_bits(s.counts)) for s in report.sites]
    assert mixed_means[0] == mixed_means[1] == 0.0 and mixed_means[2] > 0
    np.testing.assert_allclose(mixed_line.get_ydata(), mixed_means, rtol=0, atol=1e-12)
    assert [ln.get_label() for ln in (line, mixed_line)] == ["layer entropy (all neurons)",
                                                            "entropy of mixed neurons (EGP)"]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == site_labels(report.sites) == ["relu", "relu6", "relu_1"]  # fx names where targets repeat
    marked = [t.get_color() == ZERO_ENTROPY_COLOUR and t.get_fontweight() == "bold" for t in ax.get_xticklabels()]
    assert marked == [True, True, False]


def test_plot_entropy_writes_png_atomically(tmp_path) -> None:
    from matplotlib.image import imread

    report = engineered_report()
    out = plot_entropy(report, tmp_path / "states.png")
    assert out == tmp_path / "states.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(out)
    assert img.shape[0] > 300 and img.shape[1] > 600 and img[..., :3].std() > 0.05  # not blank
    assert [p.name for p in tmp_path.iterdir()] == ["states.png"]  # no temp file left
    with pytest.raises(UserError, match="unsupported image format '.txt'"):
        plot_entropy(report, tmp_path / "states.txt")
    assert [p.name for p in tmp_path.iterdir()] == ["states.png"]


# ---- the `entropy` command ----------------------------------------------------------------------

@pytest.fixture()
def ckpt(tmp_path):
    """A small cifar_resnet18 checkpoint with an .npz calibration file named in its meta."""
    torch.manual_seed(10)
    kwargs = {"num_classes": 10, "in_channels": 3, "width": 0.125}
    model = build_model("cifar_resnet18", **kwargs).eval()
    with torch.no_grad():
        model.layer1[0].bn1.bias.add_(50.0)  # one zero-entropy site
    x = np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, "cifar_resnet18", kwargs,
                    meta={"calib": str(tmp_path / "calib.npz"), "input_shape": [3, 8, 8]})
    return path, model, torch.from_numpy(x)


def test_cli_entropy_json_and_plot(ckpt, tmp_path) -> None:
    path, model, x = ckpt
    res = CliRunner().invoke(entropy_cmd, [str(path), "--json", str(tmp_path / "e.json"), "--plot",
                                           str(tmp_path / "e.png"), "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "e.json").read_text())
    assert got == json.loads(json.dumps(measure_entropy(model, [x]).to_dict()))
    z32 = capture(model, x, (nn.ReLU,))
    z64 = capture(copy.deepcopy(model).double(), x.double(), (nn.ReLU,))
    assert got["samples"] == 6 and got["total_sites"] == len(z64) == 17
    zero = 0
    for site, (label, z, th), (_, z_32, _) in zip(got["sites"], z64, z32):
        tol = 2.0 * float((z_32.double() - z).abs().max())
        assert float(z.abs().min()) > tol  # no state is decided by rounding: counts must match exactly
        ref = state_counts(z.numpy(), 1, th)
        constant = (ref > 0).sum(1) == 1
        assert site["target"] == label and site["neurons"] == ref.shape[0]
        assert site["always"] == {"OFF": int((constant & (ref[:, 0] > 0)).sum()),
                                  "ON": int((constant & (ref[:, 1] > 0)).sum())}
        assert site["mixed"] == int((~constant).sum()) and site["zero_entropy"] == bool(constant.all())
        assert abs(site["entropy"] - entropy_bits(ref).mean()) < 1e-12
        bits = entropy_bits(ref)[~constant]
        assert abs(site["entropy_mixed_mean"] - (bits.mean() if bits.size else 0.0)) < 1e-12
        row = next([c.strip() for c in ln.split("│")] for ln in res.stdout.splitlines() if ln.startswith(f"│ {label} "))
        assert row[7:10] == [str(site["mixed"]), f"{site['entropy']:.4f}", f"{site['entropy_mixed_mean']:.4f}"]
        zero += bool(constant.all())
    assert got["zero_entropy_sites"] == zero >= 1
    assert f"zero-entropy sites {zero}/17" in res.stdout
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_json_to_stdout_and_calib_override(ckpt, tmp_path) -> None:
    path, _, x = ckpt
    np.savez(tmp_path / "other.npz", x=x[:3].numpy())
    res = CliRunner().invoke(entropy_cmd, [str(path), "--calib", str(tmp_path / "other.npz"), "--json", "-"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["samples"] == 3  # stdout holds only the JSON
    assert "zero-entropy sites" in res.stderr


@pytest.mark.parametrize("case", ["missing calib", "bad path", "bad calib", "bad plot format"])
def test_cli_errors_are_one_line(case: str, ckpt, tmp_path) -> None:
    path, model, _ = ckpt
    if case == "missing calib":
        path = tmp_path / "nocalib.pt"
        save_checkpoint(path, model, "cifar_resnet18", {"num_classes": 10, "in_channels": 3, "width": 0.125})
        args, needle = [str(path)], "--calib"
    elif case == "bad path":
        args, needle = [str(tmp_path / "nope.pt")], "nope.pt"
    elif case == "bad calib":
        args, needle = [str(path), "--calib", str(tmp_path / "nope.npz")], "nope.npz"
    else:  # refused before any work: no JSON is written either
        args, needle = [str(path), "--plot", str(tmp_path / "p.txt"), "--json", str(tmp_path / "e.json")], ".txt"
    res = CliRunner().invoke(entropy_cmd, args)
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr
    assert "Traceback" not in res.output
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "p.txt").exists()


def test_cli_normalize_and_input_shape_override_the_checkpoint(ckpt, tmp_path) -> None:
    """--normalize is applied per channel before measuring; --input-shape is checked against the data."""
    path, model, x = ckpt
    mean, std = (0.5, -0.25, 1.0), (2.0, 0.5, 4.0)
    arg = ",".join(map(str, mean)) + "/" + ",".join(map(str, std))
    res = CliRunner().invoke(entropy_cmd, [str(path), "--normalize", arg, "--json", "-"])
    assert res.exit_code == 0, res.output
    normalised = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    expected = measure_entropy(model, [normalised]).to_dict()
    assert json.loads(res.stdout) == json.loads(json.dumps(expected))
    assert json.loads(res.stdout) != json.loads(json.dumps(measure_entropy(model, [x]).to_dict()))

    wrong = CliRunner().invoke(entropy_cmd, [str(path), "--input-shape", "3,9,9"])
    assert wrong.exit_code == 1 and "input_shape" in wrong.stderr
    bad = CliRunner().invoke(entropy_cmd, [str(path), "--normalize", "0.5"])
    assert bad.exit_code == 2 and "MEAN" in bad.output
