"""The shipped checkpoints keep the promises of models/README.md and of the README's main job."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from nepenthe_compress.checkpoint import load_checkpoint
from nepenthe_compress.cli import main
from nepenthe_compress.onnx_depth import onnx_depth

MODELS = Path(__file__).resolve().parents[1] / "models"

# file -> (architecture, sites linear in the checkpoint, ONNX depth before -> after `fold`)
CARDS = {
    "mnist_resnet18_nepenthe.pt": ("cifar_resnet18", 2, 18, 13),
    "mnist_mobilenetv2_easier.pt": ("cifar_mobilenet_v2", 10, 53, 44),
}


@pytest.mark.parametrize("name", sorted(CARDS))
def test_fold_of_the_shipped_checkpoint(name: str, tmp_path: Path) -> None:
    arch, linear, before, after = CARDS[name]
    ck = load_checkpoint(MODELS / name)
    assert ck.arch == arch and ck.meta["calib"] == "mnist"
    assert len(ck.meta["linearised_sites"]) == linear

    result = CliRunner().invoke(main, ["fold", str(MODELS / name), "-o", str(tmp_path), "--limit", "300",
                                       "--no-bench", "--no-pt2", "--cost", "flops", "--json", str(tmp_path / "out.json")])
    assert result.exit_code == 0, result.output
    stem = name.removesuffix(".pt")
    report = json.loads((tmp_path / f"{stem}.report.json").read_text())
    assert onnx_depth(tmp_path / f"{stem}.onnx") == before
    assert onnx_depth(tmp_path / f"{stem}.folded.onnx") == after
    assert report["depth"] == {"before": before, "after": after}
    assert report["sites"]["linearised"] == linear
    eq = report["equivalence"]
    assert eq["calibration"]["max_rel"] <= 1e-5 and eq["calibration"]["top1_agreement"] == 1.0
    assert all(r["max_rel"] <= 1e-5 for r in eq["onnx_vs_torch"])
