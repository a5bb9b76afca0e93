"""Border-corrected merges in the graph: a linearised site between two zero-padded KxK convs makes
them one layer (``merge_chains`` through ``fold.border``), shortcuts join it, the result exports to
ONNX with one weighted layer per merged block on the longest path, and ResNets get shallower by
exactly as many layers as they have linear block-internal sites."""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import Tensor, nn

from kit import D, assert_exact, events, fold, set_states, weighted
import nepenthe_compress as nc
from nepenthe_compress.archs import build_model
from nepenthe_compress.checkpoint import load_checkpoint, save_checkpoint
from nepenthe_compress.export import export_onnx, export_pt2
from nepenthe_compress.fold import algebra as A
from nepenthe_compress.fold.metrics import count_macs
from nepenthe_compress.fold.modules import BorderConv2d
from nepenthe_compress.onnx_depth import onnx_depth
from nepenthe_compress.verify import compare_runners, onnx_runner, torch_runner

EXACT = 1e-5     # float32, onnxruntime vs the original (docs/DESIGN.md 4)


class Block(nn.Module):
    """conv1 -> ReLU -> conv2 (+ identity or a 1x1 stride-s shortcut)."""

    def __init__(self, c: int = 8, stride: int = 1, k1: int = 3, k2: int = 3, shortcut: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, k1, stride, k1 // 2)
        self.conv2 = nn.Conv2d(c, c, k2, 1, k2 // 2)
        self.short = nn.Conv2d(c, c, 1, stride) if stride > 1 else None
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(torch.relu(self.conv1(x)))
        if not self.shortcut:
            return y
        return y + (x if self.short is None else self.short(x))


def on_block(*args, hw=(9, 10), dtype=D, **kw) -> tuple[Block, Tensor]:
    torch.manual_seed(0)
    m = Block(*args, **kw).to(dtype).eval()
    x = torch.randn(4, m.conv1.in_channels, *hw, dtype=dtype)
    set_states(m, x, {m.conv1: "on"})
    return m, x


@pytest.mark.parametrize("stride,k1,k2", [(1, 3, 3), (2, 3, 3), (1, 5, 3), (1, 3, 7)])
def test_a_linear_block_becomes_one_exact_layer_with_its_shortcut(stride, k1, k2) -> None:
    m, x = on_block(stride=stride, k1=k1, k2=k2)
    f = fold(m, x, merge="all")
    (layer,) = weighted(f)
    assert isinstance(layer, BorderConv2d)
    assert len([e for e in events(f, "merge") if "border correction" in e]) == 1
    assert any("residual branches summed" in e for e in events(f, "merge"))
    assert_exact(m, f, x)


def test_macs_count_the_main_conv_and_the_pieces() -> None:
    """3x3 -> 3x3, 8 channels, 9x10: main 5x5 8*90*8*25 = 144000; pieces: rows 2 x 8*10 outputs x
    8*1*5, columns 2 x 8*9 x 8*5*1, corners 4 x 8 x 8*1*1: 6400 + 5760 + 256."""
    m, x = on_block()
    assert count_macs(fold(m, x, merge="all").model, x) == 144000 + 6400 + 5760 + 256


def test_the_merged_block_exports_with_depth_one_and_runs_in_onnxruntime(tmp_path) -> None:
    m, x = on_block(stride=2, hw=(11, 8), dtype=torch.float32)
    f = fold(m, x, merge="all")
    assert isinstance(weighted(f)[0], BorderConv2d)
    path = export_onnx(f.model, x[:2], tmp_path / "block.onnx")        # checks onnxruntime vs torch itself
    assert onnx_depth(path) == 1 and onnx_depth(export_onnx(m, x[:2], tmp_path / "orig.onnx")) == 2
    check = compare_runners(torch_runner(m), onnx_runner(path), [x, x[:1]])
    assert check.max_rel <= EXACT
    program = torch.export.load(str(export_pt2(f.model, x[:2], tmp_path / "block.pt2")))
    assert torch.allclose(program.module()(x), m(x), rtol=0, atol=EXACT * m(x).abs().max().item())


def test_auto_keeps_the_pair_where_the_cost_model_predicts_no_gain() -> None:
    """Two 3x3 convs of 16 channels: the merged 5x5 plus its pieces costs more MACs."""
    m, x = on_block(c=16)
    f = fold(m, x, merge="auto")
    assert len(weighted(f)) == 2 and not any(isinstance(w, BorderConv2d) for w in weighted(f))
    assert events(f, "skip") == ["conv2: merge with conv1 skipped: cost model predicts no gain"]
    assert_exact(m, f, x)


def test_the_planner_prices_from_structure_and_composes_only_the_merges_it_makes(monkeypatch) -> None:
    """Pricing a candidate multiplies no weights (only 1x1 channel links): under auto the kept pair
    costs no weight products at all; under all the chosen pair is composed once, with them."""
    real, products = A.tap_products, []

    def spy(a, b):
        products.append((a.kernel_size, b.kernel_size))
        return real(a, b)

    monkeypatch.setattr(A, "tap_products", spy)
    m, x = on_block(c=16)
    assert len(weighted(fold(m, x, merge="auto"))) == 2
    assert products and set(products) == {((1, 1), (1, 1))}
    products.clear()
    assert len(weighted(fold(m, x, merge="all"))) == 1
    assert products.count(((3, 3), (3, 3))) == 1 and set(products) == {((1, 1), (1, 1)), ((3, 3), (3, 3))}


def test_a_border_conv_refuses_another_input_size() -> None:
    m, x = on_block()
    (layer,) = weighted(fold(m, x, merge="all"))
    with pytest.raises(ValueError, match=r"folded for inputs of size \(9, 10\), not \(9, 9\)"):
        layer(x[..., :9])


def test_a_merged_block_after_a_linear_block_output_takes_the_affine_map_and_merges_no_further() -> None:
    """Block output ReLU ON too: the next conv is a third padded conv; the pair merged with a
    correction does not merge further (a skip says why) and the result stays exact."""
    torch.manual_seed(0)
    m = nn.Sequential(Block(shortcut=False), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).double().eval()
    x = torch.randn(4, 8, 9, 9, dtype=D)
    set_states(m, x, {m[0].conv1: "on", m[0].conv2: "on"})
    f = fold(m, x, merge="all")
    assert len(weighted(f)) == 2
    assert_exact(m, f, x)


# ---- ResNets --------------------------------------------------------------------------------------

def linear_inner_relus(m: nn.Module) -> nn.Module:
    """Every BasicBlock's inner ReLU always ON: bn1 with a tiny gamma and a large beta."""
    with torch.no_grad():
        for block in m.modules():
            if isinstance(block, torchvision.models.resnet.BasicBlock):
                block.bn1.weight.fill_(0.01)
                block.bn1.bias.fill_(5.0)
    return m.eval()


def test_resnet18_with_every_inner_relu_linear_folds_from_depth_18_to_10() -> None:
    torch.manual_seed(0)
    m = linear_inner_relus(torchvision.models.resnet18(weights=None, num_classes=10))
    x = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    # channels constant on the calibration split of a random net need not be on the held-out one:
    # keep them, so that the fold relies only on the engineered (always ON) inner ReLUs
    result = nc.fold(copy.deepcopy(m), x, merge="all", pt2=False, drop_channels=False)
    r = result.report
    assert (r.depth.before, r.depth.after) == (18, 10)
    assert (r.layers_removed.removed, r.layers_removed.of) == (8, 17)
    assert sum(isinstance(mod, BorderConv2d) for mod in result.model.modules()) == 8
    check = compare_runners(torch_runner(m), onnx_runner(result.files["onnx"]), [x])
    assert check.max_rel <= EXACT, check.max_rel


def test_a_checkpoint_with_k_linear_block_internal_sites_loses_k_layers(tmp_path) -> None:
    """An EASIER-style checkpoint (sites replaced by identity, named in its metadata): k = 3 of the
    8 block-internal sites of a small cifar_resnet18 are linear, so depth 18 -> 15."""
    torch.manual_seed(0)
    model = build_model("cifar_resnet18", width=0.25).eval()
    sites = ["layer1_0_relu", "layer2_0_relu", "layer4_1_relu"]
    ckpt = tmp_path / "easier.pt"
    save_checkpoint(ckpt, model, "cifar_resnet18", {"width": 0.25},
                    meta={"input_shape": [3, 32, 32], "linearised_sites": sites})
    loaded = load_checkpoint(ckpt)
    x = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    result = nc.fold(loaded, x, merge="all", pt2=False, drop_channels=False)
    r = result.report
    assert (r.depth.before, r.depth.after) == (18, 15)
    assert r.layers_removed.removed == 3 and r.sites.linear_in_checkpoint == sites
    check = compare_runners(torch_runner(loaded.model), onnx_runner(result.files["onnx"]), [x])
    assert check.max_rel <= EXACT, check.max_rel


def test_a_checkpoint_made_by_prune_easier_loses_one_layer_per_linear_block_internal_site(tmp_path) -> None:
    """A real ``prune --method easier`` run (MNIST-5k subset, tiny cifar_resnet18, one epoch per round):
    ``fold --merge all`` removes exactly one layer per block-internal site EASIER made linear (the
    first ReLU of a BasicBlock, ``layerX_Y_relu``), whatever sites the run picked."""
    import re

    from nepenthe_compress.prune.run import PruneConfig, run_prune

    run_prune(PruneConfig(data="mnist", arch="cifar_resnet18", arch_kwargs={"width": 0.125, "in_channels": 1},
                          method="easier", out_dir=tmp_path / "run", rounds=5, epochs=1, finetune_epochs=1,
                          limit=600))
    loaded = load_checkpoint(tmp_path / "run" / "final.pt")
    sites = loaded.meta["linearised_sites"]
    internal = [s for s in sites if re.fullmatch(r"layer\d_\d_relu", s)]
    assert internal, f"the run linearised no block-internal site ({sites}): nothing to check"
    result = nc.fold(loaded, "mnist", merge="all", pt2=False, limit=600)
    r = result.report
    assert (r.depth.before, r.depth.after) == (18, 18 - len(internal))
    assert r.layers_removed.removed == len(sites)
    from nepenthe_compress.data import load_data

    x = load_data("mnist", limit=600).x[:64]   # among the samples fold calibrated and checked on
    check = compare_runners(torch_runner(loaded.model), onnx_runner(result.files["onnx"]), [x])
    assert check.max_rel <= EXACT, check.max_rel
