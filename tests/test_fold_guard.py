"""The speed guard inside ``fold``, on injected timings: the written model is the plan when it is
not slower, else the fastest exact variant that is not; nothing is written when every variant is
slower or short of ``--require-speedup``; an explicit merge mode is written anyway (and said so)."""
from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import nepenthe_compress as nc
from nepenthe_compress.bench import LatencyRow, LatencyTable
from nepenthe_compress.cli import main
from nepenthe_compress.errors import FoldError
from nepenthe_compress.fold.graph import FoldOptions
from nepenthe_compress.verify import onnx_runner
from nepenthe_compress.workflow import fold as workflow
from nepenthe_compress.workflow.variants import variant_name, variants_to_time

ORIGINAL_S = 1e-3
AUTO, AUTO_KEEP, NONE, NONE_KEEP = "merge auto", "merge auto, keep channels", "merge none", "merge none, keep channels"


def dead_channel_model() -> tuple[nn.Module, torch.Tensor]:
    """conv -> ReLU (mixed) -> conv -> ReLU with 5 of 8 channels dead -> linear: no site is linear,
    so ``merge auto`` folds to the same model as ``merge none``; dropping channels changes it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 3)).eval()
    with torch.no_grad():
        model[2].bias[:5] = -100.0
    return model, torch.randn(40, 2, 6, 6, generator=torch.Generator().manual_seed(1))


class Calls(list):
    """The names timed per call of the guard's timing; ``repeats``: the repeats each call asked for."""

    repeats: list[int]


def fake_timings(monkeypatch, speedups: dict[str, float], *later: dict[str, float]) -> Calls:
    """Replace the guard's timing with a table in which each variant runs ``speedups[name]`` times
    faster than the original (1.0 if not named); ``later``: the tables of the next calls (the last
    one repeats)."""
    calls = Calls()
    calls.repeats = []
    tables = [speedups, *later]

    def compare(paths, input_shape, batches, threads, repeats, provider):
        table = tables[min(len(calls), len(tables) - 1)]
        calls.append(list(paths))
        calls.repeats.append(repeats)
        rows = [LatencyRow(name, b, ORIGINAL_S / (table.get(name, 1.0) if name != "original" else 1.0), 0.0, 0.0)
                for b in batches for name in paths]
        rows = [LatencyRow(r.model, r.batch, r.median_s, 0.0, ORIGINAL_S / r.median_s) for r in rows]
        return LatencyTable("original", tuple(input_shape), threads, repeats, rows, provider)
    monkeypatch.setattr(workflow, "compare_latency", compare)
    return calls


def fold(model, x, **kwargs) -> nc.FoldResult:
    return nc.fold(model, x, bench=True, channel_align=1, pt2=False, **kwargs)


def onnx_matches(result: nc.FoldResult, x: torch.Tensor) -> float:
    out = onnx_runner(result.files["onnx"])(x)[0]
    with torch.no_grad():
        ref = result.model(x)
    return float((out - ref).abs().max() / ref.abs().max())


def test_variants_are_the_plan_then_simpler_exact_fallbacks_under_auto_only() -> None:
    assert list(variants_to_time(FoldOptions())) == [AUTO, AUTO_KEEP, NONE, NONE_KEEP]
    assert list(variants_to_time(FoldOptions(drop_channels=False))) == [AUTO_KEEP, NONE_KEEP]
    assert list(variants_to_time(FoldOptions(merge="all"))) == ["merge all"]
    assert variant_name(FoldOptions(merge="none", drop_channels=False)) == NONE_KEEP


def test_plan_is_written_when_not_slower(monkeypatch) -> None:
    calls = fake_timings(monkeypatch, {AUTO: 1.3, AUTO_KEEP: 1.1})
    model, x = dead_channel_model()
    r = fold(model, x)
    g = r.report.guard
    assert g.chosen == g.planned == AUTO and r.report.channels_dropped == 5
    # merge none folds to the same model as merge auto: timed once, reported as the same
    assert calls == [["original", AUTO, AUTO_KEEP]]
    assert g.figures(NONE).same_as == AUTO and g.figures(NONE_KEEP).same_as == AUTO_KEEP
    assert g.figures(AUTO).speedups == {1: pytest.approx(1.3), 32: pytest.approx(1.3)}
    assert g.figures(AUTO).mac_ratio > g.figures(AUTO_KEEP).mac_ratio == pytest.approx(1.0)
    assert {row.model for row in r.report.latency.rows} == {"original", "folded", AUTO_KEEP}


def test_slower_plan_falls_back_to_the_fastest_variant_not_slower(monkeypatch) -> None:
    fake_timings(monkeypatch, {AUTO: 0.8, AUTO_KEEP: 1.05})
    model, x = dead_channel_model()
    r = fold(model, x)
    g = r.report.guard
    assert g.chosen == AUTO_KEEP and "slower than the original at batch 1, 32: fell back to" in g.reason
    assert g.figures(AUTO).slower_at == [1, 32] and g.figures(AUTO_KEEP).slower_at == []
    # the written model is the fallback: nothing dropped, every check run on it, its own ONNX file
    assert r.report.channels_dropped == 0 and r.report.options.drop_channels is False
    assert {c.name.value for c in r.report.equivalence.checks} == {
        "calibration", "heldout", "heldout_state_flips", "onnx_vs_torch"}
    assert sum(isinstance(m, nn.Conv2d) and m.out_channels == 8 for m in r.model.modules()) == 2
    assert onnx_matches(r, x) < 1e-5


def test_a_slower_verdict_is_timed_again_and_the_longer_run_decides(monkeypatch) -> None:
    """A transient slowdown (another process on the machine) does not make the guard fall back: a
    fallback or a failure is only decided on a second run with twice the repeats."""
    calls = fake_timings(monkeypatch, {AUTO: 0.7, AUTO_KEEP: 0.7}, {AUTO: 1.3, AUTO_KEEP: 1.1})
    model, x = dead_channel_model()
    r = fold(model, x, bench_repeats=5)
    assert r.report.guard.chosen == AUTO and r.report.guard.figures(AUTO).speedups[1] == pytest.approx(1.3)
    assert calls == [["original", AUTO, AUTO_KEEP]] * 2 and calls.repeats == [5, 10]


def test_plan_not_slower_is_timed_once(monkeypatch) -> None:
    calls = fake_timings(monkeypatch, {AUTO: 1.0})
    model, x = dead_channel_model()
    assert fold(model, x, bench_repeats=5).report.guard.chosen == AUTO
    assert calls.repeats == [5]


def test_every_variant_slower_is_a_failed_fold(monkeypatch) -> None:
    fake_timings(monkeypatch, {AUTO: 0.9, AUTO_KEEP: 0.7})
    model, x = dead_channel_model()
    with pytest.raises(FoldError, match="every folded variant is slower than the original beyond noise"):
        fold(model, x)


def test_explicit_merge_mode_is_written_even_when_slower(monkeypatch) -> None:
    calls = fake_timings(monkeypatch, {NONE: 0.9})
    model, x = dead_channel_model()
    r = fold(model, x, merge="none")
    assert calls == [["original", NONE]]
    assert r.report.guard.chosen == NONE and "written anyway" in r.report.guard.reason


@pytest.mark.parametrize(("needed", "ok"), [(1.25, True), (1.35, False)])
def test_require_speedup(monkeypatch, needed: float, ok: bool) -> None:
    fake_timings(monkeypatch, {AUTO: 1.3})
    model, x = dead_channel_model()
    if ok:
        assert fold(model, x, require_speedup=needed).report.guard.require_speedup == needed
    else:
        with pytest.raises(FoldError, match=r"merge auto is 1\.30x the original at batch 1, short of "
                                            r"--require-speedup 1\.35"):
            fold(model, x, require_speedup=needed)


# ---- the CLI: failures write nothing ----------------------------------------------------------------

NET = """from torch import nn
def build():
    return nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 3))
"""


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    """A plain state_dict of ``dead_channel_model``, its architecture in code beside it, its data."""
    model, x = dead_channel_model()
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "guardnet.py").write_text(NET)
    np.savez(tmp_path / "x.npz", x=x.numpy())
    torch.save(model.state_dict(), tmp_path / "m.pt")
    return tmp_path / "m.pt"


def run_fold(ckpt: Path, *args: str):
    return CliRunner().invoke(main, ["fold", str(ckpt), "--calib", str(ckpt.parent / "x.npz"), "--arch",
                                     "guardnet:build", "--code-path", str(ckpt.parent / "code"),
                                     "--channel-align", "1", *args])


def error_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in output, output
    return lines[-1]


def test_cli_require_speedup_failure_writes_nothing(ckpt: Path, monkeypatch) -> None:
    fake_timings(monkeypatch, {AUTO: 1.1, AUTO_KEEP: 1.0})
    before = sorted(p.name for p in ckpt.parent.iterdir())
    res = run_fold(ckpt, "--require-speedup", "1.5", "-o", str(ckpt.parent / "out"))
    assert res.exit_code != 0
    assert "short of --require-speedup 1.5" in error_line(res.output)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == before


def test_cli_writes_the_fallback_and_shows_every_variant(ckpt: Path, monkeypatch) -> None:
    fake_timings(monkeypatch, {AUTO: 0.8, AUTO_KEEP: 1.2})
    out = ckpt.parent / "out"
    res = run_fold(ckpt, "-o", str(out), "--no-pt2")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert f"{AUTO_KEEP} (written)" in text and "0.80x slower" in text and f"{NONE} (= {AUTO})" in text
    assert sorted(p.name for p in out.iterdir()) == ["m.folded.onnx", "m.onnx", "m.report.json"]


def test_cli_refuses_require_speedup_without_the_guard_and_unknown_providers(ckpt: Path) -> None:
    res = run_fold(ckpt, "--no-bench", "--require-speedup", "1.2")
    assert res.exit_code == 2 and "--require-speedup needs the speed guard" in res.output
    res = run_fold(ckpt, "--provider", "tensorrt")
    assert res.exit_code != 0
    assert "execution provider 'tensorrt' is not available in this onnxruntime (available: cpu)" in error_line(res.output)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["code", "m.pt", "x.npz"]


def test_bench_refuses_unknown_provider(tmp_path: Path) -> None:
    from nepenthe_compress.export import export_onnx

    path = export_onnx(nn.Linear(4, 3).eval(), torch.randn(2, 4), tmp_path / "l.onnx")
    res = CliRunner().invoke(main, ["bench", str(path), "--provider", "cuda"])
    assert res.exit_code != 0 and "execution provider 'cuda' is not available" in error_line(res.output)


def test_speedups_are_original_over_variant_medians(monkeypatch) -> None:
    fake_timings(monkeypatch, {AUTO: 2.0, AUTO_KEEP: 1.0})
    model, x = dead_channel_model()
    r = fold(model, x)
    rows = {(row.model, row.batch): row.median_s for row in r.report.latency.rows}
    assert statistics.median([rows[("original", 1)] / rows[("folded", 1)]]) == pytest.approx(2.0)
    assert onnx_matches(r, x) < 1e-5
