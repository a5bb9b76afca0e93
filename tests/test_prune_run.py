"""End-to-end prune runs on 256 MNIST digits (1 epoch, 2 rounds per method), resume, CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from nepenthe_compress.checkpoint import load_checkpoint
from nepenthe_compress.cli import main
from nepenthe_compress.data import load_data, split
from nepenthe_compress.prune import PruneConfig, run_prune
from nepenthe_compress.prune.budget import nepenthe_budget
from nepenthe_compress.prune.run import PruneConfigError
from nepenthe_compress.prune.state import ResumeError
from nepenthe_compress.sites import find_sites
from nepenthe_compress.trace import trace_model

ARCH = "test_prune_run:TinyRes"
LAYERS = ["conv1.weight", "conv2.weight", "fc1.weight"]   # considered: each feeds a ReLU


class TinyRes(nn.Module):
    """conv-BN-ReLU, a residual conv-BN + add into the same ReLU, Linear-ReLU, Linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(in_channels, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.fc1, self.fc = nn.Linear(6, 16), nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)) + x)
        return self.fc(self.relu(self.fc1(x.mean((2, 3)))))


def _cfg(tmp_path, method: str, name: str | None = None, **kw) -> PruneConfig:
    base = dict(data="mnist", arch=ARCH, method=method, out_dir=tmp_path / (name or method), rounds=2,
                epochs=1, limit=256, batch_size=32, lr=0.05)
    return PruneConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def holdout():
    return split(load_data("mnist", limit=256), 0.2, seed=0)[1]


def _load(cfg: PruneConfig, r: int):
    # the run's arch is a callable of this test module: a file naming it is never imported from,
    # so the reader names it again, as a user passes --arch
    return load_checkpoint(cfg.out_dir / f"round_{r:02d}.pt", arch=cfg.arch)


def _check_round(ck, cfg: PruneConfig, r: int, holdout) -> None:
    """Meta says what happened; sparsity matches the masks; accuracy matches a fresh evaluation."""
    assert ck.meta["method"] == cfg.method and ck.meta["round"] == r
    assert ck.meta["calib"] == "mnist" and ck.meta["input_shape"] == [1, 28, 28]
    assert sorted(ck.masks) == sorted(LAYERS)
    removed = sum(int((~m).sum()) for m in ck.masks.values())
    assert ck.meta["sparsity"] == pytest.approx(removed / sum(m.numel() for m in ck.masks.values()), abs=1e-12)
    sd = ck.model.state_dict()
    assert all((sd[k][~m] == 0).all() for k, m in ck.masks.items())
    gm = ck.model if isinstance(ck.model, torch.fx.GraphModule) else trace_model(ck.model)
    live = {s.name for s in find_sites(gm)}        # original names: a loaded GraphModule is not re-traced
    assert live.isdisjoint(ck.meta["linearised_sites"]) and set(ck.meta["entropy"]) == live
    with torch.no_grad():
        acc = 100.0 * float((ck.model(holdout.x).argmax(1) == holdout.y).sum()) / len(holdout.y)
    assert ck.meta["accuracy"] == pytest.approx(acc, abs=1e-9)


def test_imp_end_to_end_via_cli(tmp_path, holdout):
    out = tmp_path / "imp"
    res = CliRunner().invoke(main, ["prune", "--arch", ARCH, "--data", "mnist", "--method", "imp", "--rounds", "2",
                                    "--epochs", "1", "--limit", "256", "--batch-size", "32", "-o", str(out),
                                    "--json", str(tmp_path / "imp.json")])
    assert res.exit_code == 0, res.output
    assert "round  2" in res.output and "sites removed" in res.output
    cfg = _cfg(tmp_path, "imp")
    cks = [_load(cfg, r) for r in range(3)]
    for r, ck in enumerate(cks):
        _check_round(ck, cfg, r, holdout)
    # zeta = 0.5 of the remaining weights each round, rounded half up
    total = sum(cks[0].masks[k].numel() for k in LAYERS)
    k1 = math.floor(total / 2 + 0.5)
    k2 = math.floor((total - k1) / 2 + 0.5)
    assert [ck.meta["sparsity"] for ck in cks] == pytest.approx([0.0, k1 / total, (k1 + k2) / total], abs=1e-12)
    # one global threshold: every weight pruned in round 1 was no larger than every survivor (round-0 values)
    w0 = cks[0].model.state_dict()
    pruned = torch.cat([w0[k][~cks[1].masks[k]].abs() for k in LAYERS])
    kept = torch.cat([w0[k][cks[1].masks[k]].abs() for k in LAYERS])
    assert pruned.max() <= kept.min()
    summary = json.loads((tmp_path / "imp.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2] and summary["selected"] == 2
    assert (out / "final.pt").read_bytes() == (out / "round_02.pt").read_bytes()


def test_nepenthe_end_to_end(tmp_path, holdout):
    cfg = _cfg(tmp_path, "nepenthe")
    result = run_prune(cfg)
    assert [r.round for r in result.rounds] == [0, 1, 2]
    cks = [_load(cfg, r) for r in range(3)]
    sites = [s.name for s in find_sites(trace_model(TinyRes()))]
    fed = dict(zip(LAYERS, sites))                       # conv1 -> relu, conv2 -> relu_1, fc1 -> relu_2
    for r, ck in enumerate(cks):
        _check_round(ck, cfg, r, holdout)
        if r:
            prev = cks[r - 1]
            # sites with zero entropy after the previous round are linearised now
            zero = [s for s in sites if s in prev.meta["zero_entropy_sites"]]
            assert ck.meta["linearised_sites"] == prev.meta["linearised_sites"] + zero
            # the weights removed per layer follow the EGP budget of the previous round's state
            live = [k for k in LAYERS if fed[k] in prev.meta["entropy"] and fed[k] not in zero]
            w = prev.model.state_dict()
            remaining = [int(prev.masks[k].sum()) for k in live]
            mean_abs = [float(w[k][prev.masks[k]].abs().double().mean()) for k in live]
            want = nepenthe_budget(math.floor(sum(remaining) / 2 + 0.5),
                                   [prev.meta["entropy"][fed[k]] for k in live], mean_abs, remaining)
            got = [int(prev.masks[k].sum() - ck.masks[k].sum()) for k in live]
            assert got == want.tolist()


def test_easier_end_to_end(tmp_path, holdout):
    cfg = _cfg(tmp_path, "easier")
    run_prune(cfg)
    cks = [_load(cfg, r) for r in range(3)]
    for r, ck in enumerate(cks):
        _check_round(ck, cfg, r, holdout)
        assert ck.meta["sparsity"] == 0.0 and len(ck.meta["linearised_sites"]) == r
        if r:
            entropy = cks[r - 1].meta["entropy"]
            lowest = min(entropy.values())
            assert entropy[ck.meta["linearised_sites"][-1]] == lowest
            assert isinstance(ck.model, torch.fx.GraphModule)


def test_easier_keeps_the_last_model_within_max_drop(tmp_path, monkeypatch):
    # scripted top-1: round 1 is 0.5 points below dense (within 1.0), round 2 is 2 points below
    scores = iter([90.0, 89.5, 88.0, 95.0])
    monkeypatch.setattr("nepenthe_compress.prune.run.evaluate", lambda *a, **k: next(scores))
    result = run_prune(_cfg(tmp_path, "easier", rounds=None, max_drop=1.0))
    assert [(r.round, r.accuracy, r.within_limit) for r in result.rounds] == \
        [(0, 90.0, True), (1, 89.5, True), (2, 88.0, False)]
    assert result.selected == 1 and "top-1 fell" in result.stopped
    out = tmp_path / "easier"
    assert (out / "final.pt").read_bytes() == (out / "round_01.pt").read_bytes()
    assert json.loads((out / "summary.json").read_text())["selected"] == 1


class Interrupt(Exception):
    pass


def _interrupt_after_round_1(row) -> None:
    if row.round == 1:
        raise Interrupt


def test_resume_continues_from_the_last_saved_round(tmp_path):
    cfg = _cfg(tmp_path, "nepenthe", name="run")
    with pytest.raises(Interrupt):
        run_prune(cfg, on_round=_interrupt_after_round_1)
    out = cfg.out_dir
    assert (out / "round_01.pt").is_file() and not (out / "round_02.pt").exists()
    saved = {r: (out / f"round_{r:02d}.pt").read_bytes() for r in (0, 1)}

    with pytest.raises(ResumeError, match="--resume"):
        run_prune(cfg)
    with pytest.raises(ResumeError, match="lr=0.05"):
        run_prune(_cfg(tmp_path, "nepenthe", name="run", lr=0.1, resume=True))

    seen: list[int] = []
    result = run_prune(_cfg(tmp_path, "nepenthe", name="run", resume=True), on_round=lambda row: seen.append(row.round))
    assert seen == [2]                                     # rounds 0 and 1 were not recomputed
    assert [r.round for r in result.rounds] == [0, 1, 2]
    assert all((out / f"round_{r:02d}.pt").read_bytes() == b for r, b in saved.items())
    # the resumed round 2 equals that of an uninterrupted run
    straight = run_prune(_cfg(tmp_path, "nepenthe", name="straight"))
    a = load_checkpoint(out / "round_02.pt", arch=ARCH)
    b = load_checkpoint(tmp_path / "straight" / "round_02.pt", arch=ARCH)
    assert a.meta["accuracy"] == straight.rounds[2].accuracy
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


def test_user_errors(tmp_path):
    with pytest.raises(PruneConfigError, match="needs a stop"):
        run_prune(_cfg(tmp_path, "imp", rounds=None))
    with pytest.raises(PruneConfigError, match="num_classes"):
        run_prune(_cfg(tmp_path, "imp", arch_kwargs={"num_classes": 3}))
    res = CliRunner().invoke(main, ["prune", "--arch", ARCH, "--data", "mnist", "--method", "easier",
                                    "--target-sparsity", "0.5", "-o", str(tmp_path / "x")])
    assert res.exit_code == 1 and "does not apply to easier" in res.output and "Traceback" not in res.output
