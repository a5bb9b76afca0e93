"""The fold pass on real torchvision architectures whose neuron states the TEST engineers.

Every model is random (weights=None, num_classes=10) and prepared in three steps on its own small
input batch ``x`` (the same batch is then measured, folded on and compared on), with the
shared test kit (tests/kit.py):

1. calibrate: every BatchNorm's running mean/var are set from its actual (eval) input, and the
   biases of chosen Linear layers are centred, so every rectifier input has zero mean per neuron:
   each neuron then sees both signs, i.e. every site is MIXED by construction. The last BN of each
   residual branch is scaled by 0.1 (a near-identity residual stream keeps the random net
   well-conditioned in float32: its own float32-vs-float64 error stays ~1e-6, below the 1e-5 bar).
2. engineer: chosen BN/Linear output channels are re-mapped so that their rectifier is always ON
   (z >= 1), always LINEAR for ReLU6 (1 <= z <= 5) or dead (z = -1); every later BN / Linear is
   compensated so that its input keeps its calibrated mean (the rest stays mixed).
3. check the engineering itself: the zero-entropy sites are exactly the engineered ones and the
   only constant neurons of the mixed sites are the engineered dead ones.

Then the fold (merge="all") must linearise exactly those sites, drop exactly the dead channels,
match the original (torch and onnxruntime at two batch sizes) within 1e-5, be exact in float64,
and reduce the ONNX depth by the amount derived from the architecture in each case's comment.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import VisionTransformer

from kit import DEAD, LINEAR6, ON, calibrate, engineer, quiet_residuals
from nepenthe_compress.entropy import EntropyReport, measure_entropy
from nepenthe_compress.export import export_onnx
from nepenthe_compress.fold.core import fold_graph
from nepenthe_compress.fold.graph import FoldOptions
from nepenthe_compress.onnx_depth import onnx_depth
from nepenthe_compress.workflow.checks import NOISE_FACTOR
from nepenthe_compress.verify import (compare_runners, float32_noise, onnx_runner, torch_runner,
                                     verify_equivalence)

EXACT = 1e-5          # float32: max|diff| / max|ref| (docs/DESIGN.md 4)
EXACT64 = 1e-10       # float64 fold of float64 models


def _data(*shape: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


# ---- the zoo --------------------------------------------------------------------------------------

@dataclass
class Case:
    model: nn.Module
    x: Tensor
    sites: set[str]     # the engineered zero-entropy sites (fx node names)
    dead: int           # engineered dead channels the fold can drop
    depth: int          # weighted layers on the longest path of the original
    drop: int           # expected depth reduction under merge="all"


def resnet18() -> Case:
    """Depth 18 = stem conv + 8 BasicBlocks x 2 convs + fc. layer1.0's inner ReLU is always ON:
    conv1 (3x3 pad 1) -> conv2 (3x3 pad 1) merges exactly with a border correction, and the
    identity joins it: drop 1.
    Dead: 3 channels after layer2.0.conv1 and 1 after layer3.1.conv1 (consumed only by conv2)."""
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = _data(8, 3, 64, 64)
    blocks = [*m.layer1, *m.layer2, *m.layer3, *m.layer4]
    quiet_residuals([b.bn2 for b in blocks])
    calibrate(m, x)
    engineer(m, x, {m.layer1[0].bn1: (ON, None), m.layer2[0].bn1: (DEAD, [0, 1, 2]),
                    m.layer3[1].bn1: (DEAD, [5])})
    return Case(m, x, {"layer1_0_relu"}, dead=4, depth=18, drop=1)


def resnet50() -> Case:
    """Depth 50 = stem + 16 Bottlenecks x 3 convs + fc. In layer1.1 and layer3.2 (identity
    shortcuts) both inner ReLUs are ON: 1x1 -> 3x3 pad 1 is exact (A is 1x1, border map), -> 1x1
    is exact (B unpadded), the identity joins the centre tap: 3 convs -> 1 twice, drop 4.
    Dead: 4 channels after layer2.1.conv2 (consumed by the 1x1 conv3)."""
    torch.manual_seed(0)
    m = torchvision.models.resnet50(weights=None, num_classes=10).eval()
    x = _data(8, 3, 64, 64)
    blocks = [*m.layer1, *m.layer2, *m.layer3, *m.layer4]
    quiet_residuals([b.bn3 for b in blocks])
    calibrate(m, x)
    engineer(m, x, {m.layer1[1].bn1: (ON, None), m.layer1[1].bn2: (ON, None),
                    m.layer3[2].bn1: (ON, None), m.layer3[2].bn2: (ON, None),
                    m.layer2[1].bn2: (DEAD, [0, 1, 2, 3])})
    sites = {"layer1_1_relu", "layer1_1_relu_1", "layer3_2_relu", "layer3_2_relu_1"}
    return Case(m, x, sites, dead=4, depth=50, drop=4)


def mobilenet_v2() -> Case:
    """Depth 53 = stem + block 1 (dw, project) + 16 blocks x 3 + features.18 1x1 + classifier.
    Blocks 3 and 6 (identity shortcuts) are fully LINEAR: expand 1x1 -> dw 3x3 pad 1 -> project
    1x1 + identity -> one dense 3x3 (drop 2 each). That 3x3 then feeds the next block's expand 1x1
    (blocks 4 and 7 have no shortcut): unpadded B, exact, drop 1 each. Block 3's 3x3 also absorbs
    block 2's project 1x1 in front of it (block 2 has no shortcut, so once block 3's add is gone
    that conv's only user is the 3x3; A is an unpadded 1x1: exact), drop 1; block 5 ends in an add,
    so block 6 gets no such bonus. MobileNetV2's own linear bottlenecks merge too: block 1's project
    -> block 2's expand and block 17's project -> features.18 (1x1 -> 1x1), drop 1 each. Total 9.
    Dead: 5 channels after block 4's depthwise conv, 2 after block 9's (dropped through the
    depthwise conv from the expand conv, their project conv loses the inputs)."""
    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v2(weights=None, num_classes=10).eval()
    x = _data(8, 3, 64, 64)
    quiet_residuals([b.conv[3] for b in m.features[1:18] if b.use_res_connect])
    calibrate(m, x)
    edits = {m.features[b].conv[j][1]: (LINEAR6, None) for b in (3, 6) for j in (0, 1)}
    edits[m.features[4].conv[1][1]] = (DEAD, [0, 1, 2, 3, 4])
    edits[m.features[9].conv[1][1]] = (DEAD, [7, 8])
    engineer(m, x, edits)
    sites = {f"features_{b}_conv_{j}_2" for b in (3, 6) for j in (0, 1)}
    return Case(m, x, sites, dead=7, depth=53, drop=9)


def vgg11_bn() -> Case:
    """vgg11_bn features (8 conv-BN-ReLU, 5 max-pools) with a narrow classifier (25088 -> 64 -> 64
    -> 10, same layout, small enough to fold fast). Depth 11. features.10 (after the 3rd conv) is ON:
    conv 3x3 pad 1 -> conv 3x3 pad 1 merges exactly with a border correction: drop 1. classifier.4
    is ON: Linear -> (Dropout) -> Linear merges exactly: drop 1 more. Dead: 2 channels after
    features.15."""
    torch.manual_seed(0)
    m = torchvision.models.vgg11_bn(weights=None, num_classes=10).eval()
    m.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(),
                                 nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10))
    x = _data(8, 3, 32, 32)
    calibrate(m, x, centre=[m.classifier[0], m.classifier[3]])
    engineer(m, x, {m.features[9]: (ON, None), m.classifier[3]: (ON, None),
                    m.features[16]: (DEAD, [4, 5])})
    return Case(m, x, {"features_10", "classifier_4"}, dead=2, depth=11, drop=2)


def vit_relu_mlp() -> Case:
    """Small torchvision ViT (2 layers, hidden 32, MLP 64) with ReLU MLPs. Depth 10 = patch conv +
    2 x (attention in-proj, out-proj, fc1, fc2) + head. Layer 0's MLP ReLU is ON: fc1 -> fc2 is
    Linear -> Linear, exact: drop 1. Dead: 3 neurons of layer 1's fc1 (fc2 loses the inputs)."""
    torch.manual_seed(0)
    m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                          mlp_dim=64, num_classes=10).eval()
    layers = list(m.encoder.layers)
    for layer in layers:
        layer.mlp[1] = nn.ReLU()
    nn.init.normal_(m.heads.head.weight, std=0.2)  # torchvision zero-initialises the head
    x = _data(8, 3, 32, 32)
    calibrate(m, x, centre=[layer.mlp[0] for layer in layers])
    engineer(m, x, {layers[0].mlp[0]: (ON, None), layers[1].mlp[0]: (DEAD, [0, 1, 2])})
    return Case(m, x, {"encoder_layers_encoder_layer_0_mlp_1"}, dead=3, depth=10, drop=1)


CASES: dict[str, Callable[[], Case]] = {f.__name__: f for f in
                                        (resnet18, resnet50, mobilenet_v2, vgg11_bn, vit_relu_mlp)}


@pytest.mark.parametrize("name", list(CASES))
def test_fold_on_a_real_architecture(name: str, tmp_path: Path) -> None:
    """One test per model (its build, fold and exports run once, on one xdist worker); every
    property is checked and all failures are reported together."""
    case = CASES[name]()
    report = measure_entropy(case.model, [case.x])
    # precondition: exactly the engineered sites are zero-entropy; in the mixed sites the only
    # always-OFF neurons are the engineered dead ones (always-ON neurons of a mixed site, e.g. after
    # a residual add, are harmless: they are neither linearised nor dropped)
    assert {s.name for s in report.sites if s.zero_entropy} == case.sites
    assert sum(s.always()["OFF"] for s in report.sites if not s.zero_entropy) == case.dead

    # channel_align=1: every engineered dead channel must go (this checks the drop logic; with the
    # default alignment 8 these few dead channels of 128..512 would all be kept back, see
    # test_fold_channels)
    options = FoldOptions(merge="all", channel_align=1)
    fold = fold_graph(case.model, report, case.x[:2], options)
    original = export_onnx(case.model, case.x[:2], tmp_path / "original.onnx")
    folded = export_onnx(fold.model, case.x[:2], tmp_path / "folded.onnx")
    with torch.no_grad():
        onnx = compare_runners(torch_runner(case.model.eval()), onnx_runner(folded), [case.x[:1], case.x])
    # the same fold on float64 copies: every rewrite is exact, so only float64 rounding remains
    # (regression: BN affines, slopes and channel constants were once stored in float32)
    model64, x64 = copy.deepcopy(case.model).double(), case.x.double()
    fold64 = fold_graph(model64, measure_entropy(model64, [x64]), x64[:2], options)

    # the CLI's rule: 1e-5, or 10x the original's own float32 rounding error when that is larger
    # (vgg11_bn's own float32-vs-float64 error is 1.5e-5 with torch 2.14's CPU kernels)
    tol = max(EXACT, NOISE_FACTOR * float32_noise(case.model, [case.x]))
    got = {"linearised": set(fold.linearised), "sites total": fold.sites_total,
           "channels dropped": fold.channels_dropped,
           "depth": (onnx_depth(original), onnx_depth(folded)),
           "torch max rel <= tol": verify_equivalence(case.model, fold.model, [case.x]).max_rel <= tol,
           "onnx batches 1 and N max rel <= tol": onnx.max_rel <= tol and onnx.samples == 1 + len(case.x),
           "float64 linearised": set(fold64.linearised),
           "float64 max rel <= 1e-10": verify_equivalence(model64, fold64.model, [x64]).max_rel <= EXACT64}
    expected = {"linearised": case.sites, "sites total": len(report.sites), "channels dropped": case.dead,
                "depth": (case.depth, case.depth - case.drop),
                "torch max rel <= tol": True, "onnx batches 1 and N max rel <= tol": True,
                "float64 linearised": case.sites, "float64 max rel <= 1e-10": True}
    assert got == expected


# ---- resnet18: the border-corrected merge ----------------------------------------------------------

@pytest.fixture(scope="module")
def r18() -> tuple[Case, EntropyReport]:
    case = resnet18()
    return case, measure_entropy(case.model, [case.x])


def test_auto_keeps_the_padded_pair_on_cpu_costs(r18) -> None:
    """Default options (merge auto, analytic cost): the 5x5 of layer1.0 does more MACs than two 3x3s."""
    case, report = r18
    fold = fold_graph(case.model, report, case.x[:2])
    assert fold.count("merge") == 0
    skips = [e for e in fold.events if e.action == "skip" and "cost model predicts no gain" in e.detail]
    assert [e.where for e in skips] == ["layer1.0.conv2"]
    assert verify_equivalence(case.model, fold.model, [case.x]).max_rel <= EXACT


@pytest.mark.parametrize("allow_inexact", [False, True])
def test_merge_all_makes_the_padded_pair_exactly_even_with_allow_inexact(r18, tmp_path, allow_inexact) -> None:
    """conv1 -> conv2 of layer1.0 become one 5x5 with a border correction (+ identity): depth 18 ->
    17, exact; --allow-inexact changes nothing here (a corrected pair is never border-inexact)."""
    case, report = r18
    fold = fold_graph(case.model, report, case.x[:2], FoldOptions(merge="all", allow_inexact=allow_inexact))
    merges = [e for e in fold.events if e.action == "merge"]
    assert any("border correction" in e.detail and e.where == "layer1.0.conv1 -> layer1.0.conv2" for e in merges)
    assert not any("BORDER-INEXACT" in e.detail for e in merges)
    assert verify_equivalence(case.model, fold.model, [case.x]).max_rel <= EXACT
    path = export_onnx(fold.model, case.x[:2], tmp_path / "merged.onnx")
    assert onnx_depth(path) == case.depth - 1
