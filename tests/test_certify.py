"""Certified folds: margins, the held-out policy and the rule-of-three bound.

The models are Linear(3, 3) -> ReLU -> Linear(3, 2) with an identity first layer, so each neuron's
pre-activation is one input column, set by hand: a neuron's extremes, its std and the split it
changes state in are known exactly.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import Tensor, nn

from nepenthe_compress.certify import (
    boundary_distance,
    certify,
    flip_bound,
    inside_margin,
    margins,
)
from nepenthe_compress.cli import main
from nepenthe_compress.data import Dataset, split
from nepenthe_compress.entropy import measure_entropy
from nepenthe_compress.errors import FoldError
from nepenthe_compress.fold.driver import fold_model as fold_graph
from nepenthe_compress.fold.rewriter import FoldOptions
from nepenthe_compress.verify import verify_equivalence
from nepenthe_compress.workflow.fold import FoldSettings, fold_model

TINY = '''
import torch
from torch import nn


class Tiny(nn.Module):
    """z = x (identity Linear), ReLU, then a fixed Linear(3, 2)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 3)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(3, 2)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.eye(3))
            self.fc1.bias.zero_()
            self.fc2.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.25, 1.5, -1.0]]))
            self.fc2.bias.copy_(torch.tensor([0.1, -0.2]))

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def build():
    return Tiny().eval()
'''


def _tiny_in_memory() -> nn.Module:
    namespace: dict = {}
    exec(TINY, namespace)  # the same code the CLI imports from --code-path
    return namespace["build"]()


def tiny(folder: Path) -> nn.Module:
    (folder / "tiny_certify.py").write_text(TINY)
    return _tiny_in_memory()


def columns(*cols: np.ndarray) -> Tensor:
    return torch.tensor(np.stack(cols, axis=1), dtype=torch.float32)


def uniform(lo: float, hi: float, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(lo, hi, n)


def widths(gm: nn.Module) -> list[int]:
    """Output features of the Linear layers the folded graph calls, in order."""
    mods = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    return [m.out_features for m in mods if isinstance(m, nn.Linear)]


def relu_stats(model: nn.Module, x: Tensor):
    (site,) = measure_entropy(model, [x[: len(x) // 2], x[len(x) // 2:]], moments=True).sites
    return site


# ---- the bound ---------------------------------------------------------------------------------

def test_flip_bound_is_the_exact_rule_of_three() -> None:
    # (1 - p)^n = 0.05 => p = 1 - 0.05^(1/n); by hand: ln 0.05 = -2.995732, /300 = -0.00998577,
    # 1 - exp(-0.00998577) = 0.0099361
    assert flip_bound(300) == pytest.approx(0.0099361, rel=1e-5)
    assert flip_bound(300) == pytest.approx(1 - 0.05 ** (1 / 300), rel=1e-12)
    assert flip_bound(1) == pytest.approx(0.95, rel=1e-12)
    assert flip_bound(2) == pytest.approx(1 - math.sqrt(0.05), rel=1e-12)
    # "rule of three": n p -> -ln 0.05 = 2.9957 for large n
    assert 1e6 * flip_bound(10**6) == pytest.approx(2.995732, rel=1e-5)
    assert flip_bound(0) == 1.0
    assert flip_bound(100, confidence=0.99) == pytest.approx(1 - 0.01 ** (1 / 100), rel=1e-12)


# ---- margins -----------------------------------------------------------------------------------

def test_boundary_distance_per_state() -> None:
    low, high = np.array([-3.0, 0.5, 1.0, 6.5, 2.0]), np.array([-1.0, 2.0, 5.5, 7.0, 4.0])
    two = boundary_distance(np.array([0, 1, 1, 1, -1]), (0.0,), low, high)
    np.testing.assert_array_equal(two[:4], [1.0, 0.5, 1.0, 6.5])
    assert np.isnan(two[4])
    three = boundary_distance(np.array([0, 1, 1, 2, 1]), (0.0, 6.0), low, high)
    # OFF: 0 - max; LINEAR: min(min - 0, 6 - max); SATURATED: min - 6
    np.testing.assert_array_equal(three, [1.0, 0.5, 0.5, 0.5, 2.0])


def test_neuron_whose_maximum_sits_just_below_zero_is_not_certified() -> None:
    model = _tiny_in_memory()
    n = 400
    on = uniform(5.0, 6.0, n, 0)
    near = uniform(-1.0, -0.002, n, 1)
    near[7] = -0.001                      # the maximum: just below the boundary
    off = uniform(-6.0, -5.0, n, 2)
    x = columns(on, near, off)
    site = relu_stats(model, x)
    assert site.zero_entropy and site.neuron_state.tolist() == [1, 0, 0]
    m = margins(site)
    cols = x.double().numpy()
    expected = [cols[:, 0].min() / cols[:, 0].std(), -cols[:, 1].max() / cols[:, 1].std(),
                -cols[:, 2].max() / cols[:, 2].std()]
    np.testing.assert_allclose(m, expected, rtol=1e-4)  # std from float32 batch sums
    assert m[1] < 0.01 < 10 < m[0]
    assert inside_margin(site, 1.0).tolist() == [False, True, False]
    assert inside_margin(site, 0.0).tolist() == [False, False, False]

    held = measure_entropy(model, [x])
    relied = certify(measure_entropy(model, [x], moments=True), held, margin=1.0)
    plain = certify(measure_entropy(model, [x], moments=True), held, margin=0.0)
    assert not relied.states.sites[0].zero_entropy and plain.states.sites[0].zero_entropy
    assert relied.sites[0].inside_margin == 1 and relied.sites[0].relied == 2

    opts = FoldOptions(channel_align=1)
    certified = fold_graph(model, relied.states, x[:2], opts)
    uncertified = fold_graph(model, plain.states, x[:2], opts)
    assert certified.linearised == [] and uncertified.linearised == ["act"]
    # per channel: the far-OFF neuron is still dropped, the one inside the margin stays non-linear
    assert certified.channels_dropped == 1
    assert widths(certified.model) == [2, 2]
    # where the near neuron turns ON, only the certified fold still computes the original
    fresh = columns(uniform(5.0, 6.0, 64, 3), uniform(0.1, 1.0, 64, 4), uniform(-6.0, -5.0, 64, 5))
    assert verify_equivalence(model, certified.model, [x, fresh]).max_rel <= 1e-6
    assert verify_equivalence(model, uncertified.model, [fresh]).max_rel > 0.1


def test_constant_pre_activation_has_an_infinite_margin() -> None:
    model = _tiny_in_memory()
    x = columns(np.full(50, 2.0), uniform(-1.0, 1.0, 50, 0), np.zeros(50))   # ON constant, mixed, 0 (OFF)
    site = relu_stats(model, x)
    m = margins(site)
    assert m[0] == math.inf and np.isnan(m[1]) and m[2] == math.inf
    assert not inside_margin(site, 1e9).any()


def test_moments_under_a_distributed_reduce_are_not_kept() -> None:
    site = measure_entropy(_tiny_in_memory(), [torch.randn(8, 3)], reduce=lambda t: t, moments=True).sites[0]
    assert site.moments is None and margins(site) is None and not inside_margin(site, 1.0).any()


# ---- the held-out policy ---------------------------------------------------------------------------

def flip_data(n: int = 200) -> tuple[Dataset, Tensor, Tensor]:
    """Neuron 0 always ON, neuron 2 always OFF, neuron 1 OFF (far from 0) on the calibration split
    and ON on three held-out samples."""
    ds = Dataset(columns(uniform(5.0, 6.0, n, 0), uniform(-6.0, -5.0, n, 1), uniform(-6.0, -5.0, n, 2)), None,
                 "test")
    _, held = split(ds, 0.2)
    idx = [int((ds.x == row).all(1).nonzero()[0]) for row in held.x[:3]]
    ds.x[idx, 1] = torch.tensor([2.0, 3.0, 4.0])
    calib, held = split(ds, 0.2)
    return ds, calib.x, held.x


SETTINGS = FoldSettings(FoldOptions(channel_align=1), bench=False, pt2=False, cost="flops")


def test_neuron_off_on_calibration_and_on_held_out_is_not_folded() -> None:
    model = _tiny_in_memory()
    ds, calib, held = flip_data()
    assert (calib[:, 1] < -4.9).all() and (held[:, 1] > 0).sum() == 3
    result = fold_model(model, ds, SETTINGS)
    c = result.report.certification
    assert (c.relied, c.flipped, c.excluded) == (3, 1, True)
    assert c.sites[0].flipped == 1 and c.sites[0].relied == 2 and c.sites[0].states == (1, -1, 0)
    # the flipped neuron stays non-linear: the site is not linearised, only the dead channel goes
    assert result.report.sites.linearised_by_fold == []
    assert result.report.channels_dropped == 1
    assert widths(result.model) == [2, 2]
    for x in (calib, held):
        assert verify_equivalence(model, result.model, [x]).max_rel <= 1e-6
    eq = result.report.equivalence
    assert eq.heldout.tol == eq.tolerance and eq.heldout.verdict.value == "passed"
    # evidence: every relied-on state held on all 200 inputs (one position each)
    assert c.sites[0].observations == 200 and c.sites[0].flip_bound == pytest.approx(1 - 0.05 ** (1 / 200))
    assert c.input_bound == pytest.approx(flip_bound(200))
    assert c.sites[0].min_margin == pytest.approx(float(calib[:, 0].min() / calib[:, 0].double().std(unbiased=False)),
                                                  rel=1e-5)
    report = result.report.to_dict()["certification"]
    assert report["flipped_heldout"] == 1 and report["sites"][0]["flip_bound"] == pytest.approx(flip_bound(200))


def test_kept_flips_must_meet_the_held_out_tolerance() -> None:
    model = _tiny_in_memory()
    ds, _, held = flip_data()
    with pytest.raises(FoldError, match=r"held-out data: max rel error .* > 1e-05; neurons it relies on flip "
                                        r"there at act \(1\)"):
        fold_model(model, ds, FoldSettings(FoldOptions(channel_align=1), bench=False, pt2=False, cost="flops",
                                           max_flip_rate=1.0))
    accepted = fold_model(model, ds, FoldSettings(FoldOptions(channel_align=1), bench=False, pt2=False,
                                                  cost="flops", max_flip_rate=1.0, holdout_tolerance=10.0))
    c = accepted.report.certification
    assert not c.excluded and c.sites[0].flips_kept == 1 and c.input_bound is None and c.sites[0].flip_bound == 1.0
    assert accepted.report.sites.linearised_by_fold == ["act"]
    assert verify_equivalence(model, accepted.model, [held]).max_rel > 0.1


def test_cli_policy_exit_code_and_no_files(tmp_path: Path) -> None:
    model = tiny(tmp_path)
    ds, _, _ = flip_data()
    state = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), state)
    np.savez(tmp_path / "data.npz", x=ds.x.numpy())
    base = ["fold", str(state), "--arch", "tiny_certify:build", "--code-path", str(tmp_path), "--calib",
            str(tmp_path / "data.npz"), "--no-bench", "--no-pt2", "--cost", "flops", "--channel-align", "1"]
    out = tmp_path / "out"
    failed = CliRunner().invoke(main, [*base, "-o", str(out), "--max-flip-rate", "1"])
    assert failed.exit_code == 1
    lines = failed.output.strip().splitlines()
    assert lines[-1].startswith("error: folded model differs from the original on the held-out data")
    assert "act (1)" in lines[-1] and sum(line.startswith("error:") for line in lines) == 1
    assert not out.exists() or not any(out.iterdir())

    ok = CliRunner().invoke(main, [*base, "-o", str(out), "--json", str(tmp_path / "r.json")])
    assert ok.exit_code == 0, ok.output
    assert sorted(p.name for p in out.iterdir()) == ["tiny.folded.onnx", "tiny.onnx", "tiny.report.json"]
    report = json.loads((out / "tiny.report.json").read_text())
    assert report["certification"]["flipped_heldout"] == 1 and report["certification"]["flips_excluded"]
    assert "1 flipped on held-out data (excluded)" in " ".join(ok.output.split())

    accepted = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "acc"), "--max-flip-rate", "1",
                                         "--holdout-tolerance", "10"])
    assert accepted.exit_code == 0, accepted.output
