"""`nepenthe-compress fold` end to end (click CliRunner) on a small saved checkpoint.

The checkpoint is cifar_resnet18 (1 input channel, width 0.125: 8..64 channels) on 16x16 inputs,
with neuron states engineered on its calibration npz (tests/kit.py): the inner ReLUs
of layer1.0 and layer3.1 are always ON (2 of the 17 sites) and 2 channels after layer2.0.conv1 are
dead. Its BasicBlocks are 3x3 pad 1 -> 3x3 pad 1 (border-inexact), so by default nothing merges.
"""
from __future__ import annotations

import copy
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from nepenthe_compress.archs import build_model
from nepenthe_compress.checkpoint import save_checkpoint
from nepenthe_compress.cli import main
from nepenthe_compress.data import Dataset, split
from nepenthe_compress.entropy import measure_entropy
from nepenthe_compress.onnx_depth import onnx_depth, onnx_param_count
from nepenthe_compress.verify import compare_runners, onnx_runner, torch_runner
from kit import DEAD, ON, calibrate, engineer, quiet_residuals

ARCH, KWARGS = "cifar_resnet18", {"num_classes": 10, "in_channels": 1, "width": 0.125}
SITES = ["layer1_0_relu", "layer3_1_relu"]       # engineered always-ON sites
TOTAL_SITES = 17                                 # stem ReLU + 8 BasicBlocks x 2 ReLU calls
DEAD_CHANNELS = 2
DEPTH = 18                                       # stem conv + 16 convs + fc
STEM = "net"
OUTPUTS = [f"{STEM}.folded.onnx", f"{STEM}.onnx", f"{STEM}.report.json"]


@dataclass
class Saved:
    folder: Path
    ckpt: Path
    calib: Path
    model: torch.nn.Module
    x: torch.Tensor


def _engineered(x: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(ARCH, **KWARGS).eval()
    quiet_residuals([b.bn2 for b in (*m.layer1, *m.layer2, *m.layer3, *m.layer4)])
    calibrate(m, x)
    engineer(m, x, {m.layer1[0].bn1: (ON, None), m.layer3[1].bn1: (ON, None),
                    m.layer2[0].bn1: (DEAD, [0, 3])})
    return m


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Saved:
    folder = tmp_path_factory.mktemp("fold_cli")
    x = torch.randn(40, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    model = _engineered(x)
    calib = folder / "calib.npz"
    np.savez(calib, x=x.numpy())
    ckpt = folder / f"{STEM}.pt"
    save_checkpoint(ckpt, model, ARCH, KWARGS, meta={"calib": str(calib), "input_shape": [1, 16, 16]})
    return Saved(folder, ckpt, calib, model, x)


def fold(*args: str) -> Result:
    return CliRunner().invoke(main, ["fold", *args])


def copy_to(saved: Saved, folder: Path) -> Path:
    """The checkpoint alone in a fresh folder (its meta still names the calibration file)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / saved.ckpt.name
    target.write_bytes(saved.ckpt.read_bytes())
    return target


def flat(output: str) -> str:
    """The console output with table borders removed and whitespace collapsed (rows wrap at 80 columns)."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", output).split())


def assert_one_line_error(res: Result) -> None:
    """Non-zero exit, stderr ends with the one 'error:' line; only progress lines ('fold: ...') before it."""
    assert res.exit_code != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), res.output
    assert all(ln.startswith("fold: ") for ln in lines[:-1]), res.output
    assert "Traceback" not in res.output


def test_engineering_holds_on_the_calibration_split(saved: Saved) -> None:
    """Precondition (the pipeline measures on the calibration part of an 80/20 split)."""
    calib, _ = split(Dataset(saved.x, None, "x"), 0.2)
    report = measure_entropy(saved.model, [calib.x])
    assert len(report.sites) == TOTAL_SITES
    assert sorted(s.name for s in report.sites if s.zero_entropy) == SITES
    assert sum(s.always()["OFF"] for s in report.sites if not s.zero_entropy) == DEAD_CHANNELS


@pytest.fixture(scope="module")
def default_run(saved: Saved, tmp_path_factory) -> tuple[Result, Path, dict]:
    ckpt = copy_to(saved, tmp_path_factory.mktemp("default"))
    res = fold(str(ckpt), "--no-bench", "--cost", "flops")   # flops: merge decisions independent of the machine
    report = json.loads((ckpt.parent / f"{STEM}.report.json").read_text()) if res.exit_code == 0 else {}
    return res, ckpt.parent, report


def test_default_run_writes_the_outputs_next_to_the_checkpoint(default_run) -> None:
    res, folder, _ = default_run
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in folder.iterdir()) == sorted([*OUTPUTS, f"{STEM}.pt"])


def test_report_counts_the_engineered_sites_and_channels(default_run) -> None:
    _, _, report = default_run
    assert report["sites"]["total"] == TOTAL_SITES
    assert report["sites"]["linearised"] == report["sites"]["zero_entropy"] == len(SITES)
    assert sorted(report["sites"]["linearised_by_fold"]) == SITES
    # layer2.0.conv1 has 16 outputs: 16 - 2 = 14 is no multiple of the default alignment 8, so both
    # dead channels are kept back (--channel-align 1 drops them: test_outdir_inexact_merge_and_bench)
    assert (report["channels_dropped"], report["channels_kept_for_alignment"]) == (0, DEAD_CHANNELS)
    assert report["options"]["channel_align"] == 8
    assert not [e for e in report["events"] if e["action"] == "merge"]


def test_progress_lines_on_stderr_when_not_a_terminal(default_run) -> None:
    res, folder, _ = default_run
    assert res.stderr.splitlines() == [
        "fold: measuring neuron states on 32 samples...", "fold: folding...",
        "fold: checking the folded model on 32 + 8 samples...", "fold: exporting ONNX...",
        "fold: checking the ONNX model in onnxruntime...", "fold: exporting the original to ONNX...",
        f"fold: writing {folder}..."]


def test_table_shows_the_channels_kept_for_alignment(default_run) -> None:
    res, _, _ = default_run
    assert f"0 (+{DEAD_CHANNELS} kept for alignment to 8)" in res.output


def test_report_depth_is_the_depth_of_the_written_files(default_run) -> None:
    _, folder, report = default_run
    assert report["depth"] == {"before": onnx_depth(folder / f"{STEM}.onnx"),
                               "after": onnx_depth(folder / f"{STEM}.folded.onnx")}
    assert report["depth"] == {"before": DEPTH, "after": DEPTH}


def test_report_equivalence_is_below_tolerance_and_true(saved: Saved, default_run) -> None:
    res, folder, report = default_run
    eq = report["equivalence"]
    assert eq["exact_claimed"] is True
    assert eq["tolerance"] == eq["onnx_tolerance"] == max(1e-5, 10 * eq["original_float32_noise"])
    assert eq["calibration"]["passed"] is True and eq["calibration"]["tol"] == eq["tolerance"]
    text = flat(res.output)
    assert f"max rel err {eq['calibration']['max_rel']:.2e} (tolerance {eq['tolerance']:.2g})" in text
    assert "inexact:" not in text
    assert eq["calibration"]["max_rel"] <= 1e-5 and eq["heldout"]["max_rel"] <= 1e-5
    assert all(o["max_rel"] <= 1e-5 for o in eq["onnx_vs_torch"])
    # independently: the written ONNX file against the original model on all 40 samples
    with torch.no_grad():
        check = compare_runners(torch_runner(saved.model), onnx_runner(folder / f"{STEM}.folded.onnx"),
                                [saved.x[:1], saved.x])
    assert check.max_rel <= 1e-5


def test_outdir_inexact_merge_and_bench(saved: Saved, tmp_path: Path) -> None:
    ckpt = copy_to(saved, tmp_path / "ckpt")
    out = tmp_path / "out"
    res = fold(str(ckpt), "-o", str(out), "--merge", "all", "--allow-inexact", "--bench", "--repeats", "2",
               "--channel-align", "1")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    assert [p.name for p in ckpt.parent.iterdir()] == [ckpt.name]
    report = json.loads((out / f"{STEM}.report.json").read_text())
    # the two ON sites make layer1.0 and layer3.1 conv1 -> conv2 merge (exactly, with a border
    # correction: --allow-inexact only opts in to what stays inexact, nothing here): depth -2
    assert report["depth"]["after"] == onnx_depth(out / f"{STEM}.folded.onnx") == DEPTH - 2
    assert (report["channels_dropped"], report["channels_kept_for_alignment"]) == (DEAD_CHANNELS, 0)
    eq = report["equivalence"]
    assert eq["exact_claimed"] is False
    assert eq["calibration"]["max_rel"] <= 1e-5
    # measured, not held to a tolerance: no tolerance, no pass/fail beside the error figures ...
    assert eq["tolerance"] is None
    assert not {"passed", "tol"} & ({*eq["calibration"]} | {*eq["heldout"]})
    text = flat(res.output)
    assert f"max rel err {eq['calibration']['max_rel']:.2e} (inexact: not held to a tolerance)" in text
    assert text.count("tolerance") == 2   # the line above, and onnxruntime vs torch's below
    assert f"(tolerance {eq['onnx_tolerance']:.2g})" in text
    # ... while onnxruntime vs torch (the same folded model) is held to one
    assert eq["onnx_tolerance"] >= 1e-5
    assert all(o["passed"] and o["tol"] == eq["onnx_tolerance"] for o in eq["onnx_vs_torch"])
    rows = report["latency"]["rows"]
    assert sorted((r["model"], r["batch"]) for r in rows) == [("folded", 1), ("folded", 32),
                                                             ("original", 1), ("original", 32)]
    assert report["latency"]["repeats"] == 2 and all(r["median_s"] > 0 for r in rows)


# ---- failures: non-zero exit, one line, no output files --------------------------------------------

def test_failed_equivalence_exits_non_zero_and_writes_nothing(saved: Saved, tmp_path: Path,
                                                              monkeypatch) -> None:
    from nepenthe_compress.workflow import fold as workflow

    real = workflow.fold_graph

    def corrupted(*args, **kwargs):
        folded = real(*args, **kwargs)
        conv = next(m for m in folded.model.modules() if isinstance(m, torch.nn.Conv2d))
        with torch.no_grad():
            conv.weight.add_(0.05)
        return folded

    monkeypatch.setattr(workflow, "fold_graph", corrupted)
    ckpt = copy_to(saved, tmp_path)
    res = fold(str(ckpt), "--no-bench")
    assert_one_line_error(res)
    assert "differs" in res.stderr
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.name]


def onnx_off_by_one(monkeypatch) -> None:
    """The fold's onnxruntime check sees outputs off by one: the export "differs" from torch."""
    from nepenthe_compress.workflow import checks

    def mismatching(path, threads=2):
        run = onnx_runner(path, threads)
        return lambda x: [o + 1.0 for o in run(x)]

    monkeypatch.setattr(checks, "onnx_runner", mismatching)


def test_failed_onnx_check_after_staging_leaves_no_files(saved: Saved, tmp_path: Path, monkeypatch) -> None:
    onnx_off_by_one(monkeypatch)
    ckpt = copy_to(saved, tmp_path)
    res = fold(str(ckpt), "--no-bench")
    assert_one_line_error(res)
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.name]


def test_missing_checkpoint(tmp_path: Path) -> None:
    res = fold(str(tmp_path / "nope.pt"), "--no-bench")
    assert_one_line_error(res)
    assert "nope.pt" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_calibration(saved: Saved, tmp_path: Path) -> None:
    ckpt = copy_to(saved, tmp_path)
    res = fold(str(ckpt), "--calib", str(tmp_path / "absent.npz"), "--no-bench")
    assert_one_line_error(res)
    assert "absent.npz" in res.stderr
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.name]


def test_input_shape_option_overrides_the_checkpoint(saved: Saved, tmp_path: Path) -> None:
    """The calibration data (1x16x16) does not fit --input-shape 1,12,12: a one-line data error."""
    ckpt = copy_to(saved, tmp_path)
    res = fold(str(ckpt), "--input-shape", "1,12,12", "--no-bench")
    assert_one_line_error(res)
    assert "input_shape" in res.stderr and "12" in res.stderr
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.name]


def test_checkpoint_without_a_calibration_source(saved: Saved, tmp_path: Path) -> None:
    ckpt = tmp_path / "bare.pt"
    save_checkpoint(ckpt, copy.deepcopy(saved.model), ARCH, KWARGS, meta={"input_shape": [1, 16, 16]})
    res = fold(str(ckpt), "--no-bench")
    assert_one_line_error(res)
    assert "--calib" in res.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["bare.pt"]


@pytest.mark.parametrize("arch", ["resnet18", "no_such_arch"])
def test_wrong_arch(saved: Saved, tmp_path: Path, arch: str) -> None:
    ckpt = tmp_path / "plain.pt"
    torch.save(saved.model.state_dict(), ckpt)
    res = fold(str(ckpt), "--arch", arch, "--calib", str(saved.calib), "--no-bench")
    assert_one_line_error(res)
    assert [p.name for p in tmp_path.iterdir()] == ["plain.pt"]


def test_checkpoint_with_sites_already_linearised(saved: Saved, tmp_path: Path) -> None:
    """An EASIER checkpoint names a (mixed!) site it replaced by identity: the fold must count it as
    linear, and the written model must compute the network with that first layer2.1 ReLU call
    removed (checked with a hook on the original module, independently of the loader)."""
    ckpt = tmp_path / f"{STEM}.pt"
    save_checkpoint(ckpt, copy.deepcopy(saved.model), ARCH, KWARGS,
                    meta={"calib": str(saved.calib), "input_shape": [1, 16, 16],
                          "linearised_sites": ["layer2_1_relu"]})
    # margin 0.4: one engineered layer3.1.relu neuron sits 0.497 std from its boundary on this split
    res = fold(str(ckpt), "--no-bench", "--no-pt2", "--quiet", "--margin", "0.4")
    assert (res.exit_code, res.stdout, res.stderr) == (0, "", ""), res.output   # --quiet: nothing but errors
    report = json.loads((tmp_path / f"{STEM}.report.json").read_text())
    assert report["sites"]["total"] == TOTAL_SITES
    assert report["sites"]["linear_in_checkpoint"] == ["layer2_1_relu"]
    assert report["sites"]["linearised"] == len(SITES) + 1

    reference = copy.deepcopy(saved.model)
    calls = []

    def first_call_is_identity(module, args, out):
        calls.append(1)
        return args[0] if len(calls) % 2 == 1 else out  # relu is called twice per forward

    relu = reference.layer2[1].relu
    relu.inplace = False  # the hook must see the pre-activation
    relu.register_forward_hook(first_call_is_identity)
    with torch.no_grad():
        check = compare_runners(torch_runner(reference), onnx_runner(tmp_path / f"{STEM}.folded.onnx"),
                                [saved.x])
    assert check.max_rel <= 1e-5


# ---- outputs: no calibration data inside them ------------------------------------------------------

@pytest.fixture(scope="module")
def pt2_run(saved: Saved, tmp_path_factory) -> tuple[Result, Path]:
    ckpt = copy_to(saved, tmp_path_factory.mktemp("pt2"))
    return fold(str(ckpt), "--no-bench", "--cost", "flops", "--pt2"), ckpt.parent


def test_pt2_is_written_when_asked(pt2_run) -> None:
    res, folder = pt2_run
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in folder.iterdir()) == sorted([*OUTPUTS, f"{STEM}.folded.pt2", f"{STEM}.pt"])
    assert res.stderr.splitlines()[-2:] == ["fold: exporting .pt2...", f"fold: writing {folder}..."]


def test_outputs_hold_no_calibration_sample(saved: Saved, pt2_run) -> None:
    """The .pt2 keeps an example input; it must be synthetic. No sample of the calibration data (their
    float32 bytes) may appear in any written model file."""
    _, folder = pt2_run
    samples = [s.numpy().tobytes() for s in saved.x]
    for name in (f"{STEM}.folded.pt2", f"{STEM}.folded.onnx", f"{STEM}.onnx"):
        data = (folder / name).read_bytes()
        assert not [i for i, s in enumerate(samples) if s in data], name


def test_pt2_size_is_the_model_not_the_data(pt2_run) -> None:
    _, folder = pt2_run
    pt2 = folder / f"{STEM}.folded.pt2"
    with zipfile.ZipFile(pt2) as z:
        sizes = {i.filename: i.file_size for i in z.infolist()}
    example = next(v for k, v in sizes.items() if "sample_inputs" in k)
    assert example < 2 * 1 * 16 * 16 * 4 + 4096          # one batch of 2 synthetic inputs and its pickle
    weights = 4 * onnx_param_count(folder / f"{STEM}.folded.onnx")
    assert weights <= pt2.stat().st_size < weights + 200_000  # weights plus the program's JSON
    program = torch.export.load(str(pt2))
    (x,), _ = program.example_inputs
    assert x.shape == (2, 1, 16, 16)
    assert torch.equal(x, torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)))


# ---- outputs: checked before any work, never replaced without --force ------------------------------

def _no_work(monkeypatch) -> list[str]:
    """Record (and stop) any attempt to load the checkpoint: preflight errors must come first."""
    from nepenthe_compress import checkpoint

    calls: list[str] = []

    def refuse(path, **kwargs):
        calls.append(str(path))
        raise AssertionError("fold loaded the checkpoint before checking its outputs")

    monkeypatch.setattr(checkpoint, "load_checkpoint", refuse)
    return calls


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _blocker(folder: Path) -> Path:
    path = folder / "blocker"
    path.write_text("a file where a folder is needed\n")
    return path


@pytest.mark.parametrize("where, message", [
    (lambda t: ["-o", str(_blocker(t))], "'{t}/blocker' is a file, not a folder"),
    (lambda t: ["-o", str(_blocker(t) / "deeper" / "out")], "'{t}/blocker' is a file, not a folder"),
    (lambda t: ["-o", str(t / "out"), "--json", str(_blocker(t) / "r.json")], "'{t}/blocker' is a file"),
    (lambda t: ["-o", "/proc/self/nepenthe-out"], "folder '/proc/self' is not writable"),
    (lambda t: ["-o", str(t / "out"), "--json", str(t)], "output '{t}' is a folder"),
], ids=["o-is-a-file", "o-under-a-file", "json-under-a-file", "o-unwritable", "json-is-a-folder"])
def test_unwritable_output_fails_before_any_work(saved: Saved, tmp_path: Path, monkeypatch, where,
                                                 message) -> None:
    ckpt = copy_to(saved, tmp_path / "ckpt")
    calls = _no_work(monkeypatch)
    args = where(tmp_path)
    before = _tree(tmp_path)
    res = fold(str(ckpt), *args, "--no-bench")
    assert_one_line_error(res)
    assert res.exit_code == 1 and calls == []
    assert message.format(t=tmp_path) in res.stderr
    assert _tree(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("existing", OUTPUTS)
def test_an_existing_output_is_refused_up_front_and_kept(saved: Saved, tmp_path: Path, monkeypatch,
                                                         existing: str) -> None:
    ckpt = copy_to(saved, tmp_path)
    (tmp_path / existing).write_bytes(b"an earlier result\n")
    calls = _no_work(monkeypatch)
    before = _tree(tmp_path)
    res = fold(str(ckpt), "--no-bench")
    assert_one_line_error(res)
    assert f"output '{tmp_path / existing}' already exists: pass --force to replace it" in res.stderr
    assert calls == [] and _tree(tmp_path) == before


def test_existing_json_is_refused_and_no_pt2_means_the_pt2_is_not_an_output(saved: Saved, tmp_path: Path,
                                                                           monkeypatch) -> None:
    ckpt = copy_to(saved, tmp_path)
    (tmp_path / f"{STEM}.folded.pt2").write_bytes(b"not written by --no-pt2 runs\n")
    (tmp_path / "r.json").write_text("{}\n")
    calls = _no_work(monkeypatch)
    before = _tree(tmp_path)
    res = fold(str(ckpt), "--no-bench", "--no-pt2", "--json", str(tmp_path / "r.json"))
    assert_one_line_error(res)
    assert f"output '{tmp_path / 'r.json'}' already exists" in res.stderr
    assert calls == [] and _tree(tmp_path) == before


def test_force_replaces_every_output_at_once(saved: Saved, tmp_path: Path) -> None:
    ckpt = copy_to(saved, tmp_path)
    old = {name: f"stale {name}\n".encode() for name in [*OUTPUTS, f"{STEM}.folded.pt2", "r.json"]}
    for name, data in old.items():
        (tmp_path / name).write_bytes(data)
    res = fold(str(ckpt), "--no-bench", "--cost", "flops", "--force", "--pt2", "--json", str(tmp_path / "r.json"),
               "--verbose")
    assert res.exit_code == 0, res.output
    steps = [re.fullmatch(r"fold: \[(\d+\.\d) s\] (.*)\.\.\.", ln) for ln in res.stderr.splitlines()]
    assert all(steps) and [m[2] for m in steps][-3:] == ["exporting the original to ONNX", "exporting .pt2",
                                                        f"writing {tmp_path}"]
    assert sorted(float(m[1]) for m in steps) == [float(m[1]) for m in steps]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*old, ckpt.name])
    assert all((tmp_path / name).read_bytes() != data for name, data in old.items())
    report = json.loads((tmp_path / f"{STEM}.report.json").read_text())
    assert json.loads((tmp_path / "r.json").read_text())["depth"] == report["depth"] == {"before": DEPTH,
                                                                                        "after": DEPTH}
    assert onnx_depth(tmp_path / f"{STEM}.folded.onnx") == DEPTH
    assert torch.export.load(str(tmp_path / f"{STEM}.folded.pt2")).module()(saved.x[:3]).shape == (3, 10)


def test_force_with_a_failed_fold_keeps_the_old_outputs(saved: Saved, tmp_path: Path, monkeypatch) -> None:
    """--force replaces outputs only when the whole run succeeds (all or nothing)."""
    onnx_off_by_one(monkeypatch)
    ckpt = copy_to(saved, tmp_path)
    for name in OUTPUTS:
        (tmp_path / name).write_bytes(b"earlier\n")
    before = _tree(tmp_path)
    res = fold(str(ckpt), "--no-bench", "--force")
    assert_one_line_error(res)
    assert _tree(tmp_path) == before
