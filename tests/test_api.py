"""The Python API: the README's example runs as written; calib forms; the fold result (model, typed
report, save); a light ``import nepenthe_compress`` whose ``fold`` is both a package and a call."""
from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import nepenthe_compress as nc
from nepenthe_compress.errors import DataError
from nepenthe_compress.io import OutputError
from nepenthe_compress.workflow.report import CheckName, EventAction, Verdict

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = re.compile(r"<!-- api-example[^>]*-->\s*```python\n(.*?)```\s*<!-- /api-example -->", re.S)
REPORT_KEYS = ["checkpoint", "arch", "options", "calibration", "sites", "events", "channels_dropped",
               "channels_kept_for_alignment", "depth", "layers_removed", "params", "macs", "equivalence", "latency",
               "guard", "planner", "certification", "outputs", "entropy", "checkpoint_notes", "checkpoint_warnings"]


def readme_example() -> str:
    found = EXAMPLE.findall((ROOT / "README.md").read_text())
    assert len(found) == 1, "README.md needs one ```python block between <!-- api-example --> markers"
    return found[0]


def test_readme_example_runs_as_written(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "models").symlink_to(ROOT / "models")
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_example(), "README.md", "exec"), {"__name__": "readme"})
    lines = printed.getvalue().splitlines()
    assert re.fullmatch(r"\d+/15 zero-entropy sites", lines[0]), lines
    assert re.fullmatch(r"depth 3 -> 2, max rel err \d\.\de-0[6-9]", lines[1]), lines
    names = ["model.folded.onnx", "model.onnx", "model.report.json"]
    assert lines[2] == str(names)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names


# ---- a small model with known neuron states ------------------------------------------------------

def small_model() -> nn.Module:
    """conv 3x3 -> ReLU (always ON on inputs >= 0) -> conv 1x1 -> ReLU -> linear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 3)).eval()
    with torch.no_grad():
        model[0].weight.abs_()
        model[0].bias.abs_()
    return model


X = torch.rand(30, 2, 6, 6, generator=torch.Generator().manual_seed(1))


def counts(report) -> list[list[list[int]]]:
    return [s.counts.tolist() for s in report.sites]


def test_every_calib_form_measures_the_same_states(tmp_path: Path) -> None:
    model = small_model()
    expected = counts(nc.measure_entropy(model, X))
    assert expected[0] == [[0, 30 * 16]] * 8        # the first site: every neuron ON on all 16 positions
    np.savez(tmp_path / "x.npz", x=X.numpy())
    loaders = {
        "array": X.numpy(),
        "tensors": torch.utils.data.DataLoader(X, batch_size=7),
        "pairs": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, torch.arange(30)), batch_size=8),
        "spec": str(tmp_path / "x.npz"),
    }
    for form, calib in loaders.items():
        assert counts(nc.measure_entropy(model, calib)) == expected, form
    limited = nc.measure_entropy(model, X, limit=10)
    assert limited.samples == 10


def test_bad_calib_and_arguments_are_named() -> None:
    model = small_model()
    with pytest.raises(DataError, match="non-finite"):
        nc.measure_entropy(model, torch.full((4, 2, 6, 6), float("nan")))
    with pytest.raises(DataError, match="expected a data spec string, a tensor"):
        nc.measure_entropy(model, 3)
    with pytest.raises(DataError, match="the iterable yielded no batch"):
        nc.measure_entropy(model, [])
    with pytest.raises(DataError, match="names no calibration data"):
        nc.measure_entropy(model)
    with pytest.raises(DataError, match=r"first layer .* expects 2"):
        nc.measure_entropy(model, torch.rand(4, 3, 6, 6))
    with pytest.raises(ValueError, match="merge must be one of auto, all, none"):
        nc.fold(model, X, merge="some")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        nc.fold(object(), X)


@pytest.fixture(scope="module")
def folded():
    steps: list[str] = []
    result = nc.fold(small_model(), X, merge="all", pt2=False, progress=steps.append)
    return result, steps


def test_fold_returns_the_folded_module_and_a_typed_report(folded) -> None:
    result, steps = folded
    model = small_model()
    with torch.no_grad():
        assert torch.allclose(result.model(X), model(X), rtol=1e-5, atol=1e-6)
    r = result.report
    # conv 3x3 -> (ReLU ON) -> conv 1x1 merged into one conv: one weighted layer less
    assert (r.depth.before, r.depth.after) == (3, 2)
    assert r.count(EventAction.LINEARISE) == 1 and r.count(EventAction.MERGE) == 1
    assert r.sites.linearised_by_fold == ["_1"] and r.sites.total == 2
    assert r.equivalence.exact_claimed and r.equivalence.calibration.verdict is Verdict.PASSED
    assert r.equivalence.calibration.max_rel <= r.equivalence.tolerance
    assert [c.batch for c in r.equivalence.onnx_vs_torch] == [1, 7]
    assert r.equivalence.outcome(CheckName.HELDOUT_STATE_FLIPS).verdict is Verdict.MEASURED
    assert (r.calibration.samples, r.calibration.heldout) == (24, 6)
    assert r.checkpoint is None and r.latency is None and r.outputs == {}
    assert steps == ["measuring neuron states on 24 samples", "folding", "checking the folded model on 24 + 6 samples",
                     "exporting ONNX", "checking the ONNX model in onnxruntime", "exporting the original to ONNX"]


def test_report_to_dict_is_the_cli_report(folded) -> None:
    d = folded[0].report.to_dict()
    assert list(d) == REPORT_KEYS
    assert json.loads(json.dumps(d)) == d                       # plain JSON types only
    assert d["events"][0]["action"] in {a.value for a in EventAction}
    assert d["equivalence"]["calibration"]["passed"] is True
    assert d["sites"]["linearised"] == 1 and d["options"]["merge"] == "all"


def test_save_writes_the_cli_files_all_or_nothing(folded, tmp_path: Path) -> None:
    result, _ = folded
    paths = result.save(tmp_path / "out", stem="net")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["net.folded.onnx", "net.onnx", "net.report.json"]
    saved = json.loads(paths["report"].read_text())
    assert saved["outputs"] == {k: str(p) for k, p in paths.items()} == result.report.outputs
    assert saved["depth"] == {"before": 3, "after": 2}
    other = tmp_path / "again"
    other.mkdir()
    (other / "net.onnx").write_bytes(b"someone else's\n")
    with pytest.raises(OutputError, match=r"net.onnx' already exists: pass --force"):
        result.save(other, stem="net")
    assert [(p.name, p.read_bytes()) for p in other.iterdir()] == [("net.onnx", b"someone else's\n")]
    result.save(other, stem="net", force=True)
    for name in ("net.folded.onnx", "net.onnx"):
        assert (other / name).read_bytes() == (tmp_path / "out" / name).read_bytes()


def test_import_is_light_and_fold_is_package_and_call() -> None:
    code = ("import sys\nimport nepenthe_compress as nc\nprint('torch' in sys.modules, callable(nc.fold))\n"
            "import nepenthe_compress.fold.core as core\n"
            "print(nc.fold is sys.modules['nepenthe_compress.fold'], callable(nc.fold), callable(core.fold_graph))\n"
            "print(sorted(n for n in dir(nc) if not n.startswith('_')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.splitlines() == [
        "False True", "True True True",
        "['FoldReport', 'FoldResult', 'LoadedCheckpoint', 'fold', 'load_checkpoint', 'measure_entropy']"]


def test_every_event_action_the_fold_pass_records_is_typed() -> None:
    """``Event.of`` turns each fold event into an ``EventAction``: an action recorded anywhere in the
    fold pass without a member there would fail the report of every fold that records it."""
    sources = "".join(p.read_text() for p in (ROOT / "nepenthe_compress" / "fold").rglob("*.py"))
    recorded = set(re.findall(r"\brecord\(\"(\w+)\"", sources))
    assert {"linearise", "merge", "skip"} <= recorded <= {a.value for a in EventAction}


def test_a_model_whose_outputs_are_all_zero_is_flagged() -> None:
    """Equivalence with an all-zero output proves nothing: the report says so."""
    model = small_model()
    with torch.no_grad():
        model[5].weight.zero_()
        model[5].bias.zero_()
    r = nc.fold(model, X, pt2=False, cost="flops").report
    assert any("outputs are all 0" in w for w in r.checkpoint_warnings)
    assert not any("outputs are all 0" in w for w in nc.fold(small_model(), X, pt2=False, cost="flops")
                   .report.checkpoint_warnings)
