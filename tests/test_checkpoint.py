"""Checkpoint loading: every accepted form round-trips to the same outputs; every failure is one line."""
from __future__ import annotations

import copy
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import prune

from nepenthe_compress.archs import build_model
from nepenthe_compress.checkpoint import (FORMAT, LoadedCheckpoint, apply_linearised, load_checkpoint,
                                          save_checkpoint)
from nepenthe_compress.errors import CheckpointError

ARCH = "cifar_resnet18"
KWARGS = {"num_classes": 10, "in_channels": 3, "width": 0.125}



@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 3, 32, 32)


@pytest.fixture
def source(x: torch.Tensor) -> nn.Module:
    """A small trained-looking model: random weights, non-trivial BN statistics, eval mode."""
    torch.manual_seed(1)
    model = build_model(ARCH, **KWARGS)
    with torch.no_grad():
        model.train()(x * 2 + 0.5)
    return model.eval()


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _assert_same_outputs(loaded: LoadedCheckpoint, reference: nn.Module, x: torch.Tensor) -> None:
    assert not loaded.model.training
    torch.testing.assert_close(_out(loaded.model, x), _out(reference, x), rtol=0, atol=0)


def _one_line_error(path: Path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, **kwargs)
    message = str(e.value)
    assert message and "\n" not in message
    return message


# ---- accepted forms ----------------------------------------------------------------------------

def test_own_format_round_trip(tmp_path: Path, source: nn.Module, x: torch.Tensor) -> None:
    meta = {"calib": "mnist", "input_shape": [3, 32, 32], "normalize": None, "accuracy": 0.5,
            "history": [{"round": 1, "sparsity": 0.2}]}
    save_checkpoint(tmp_path / "m.pt", source, ARCH, KWARGS, meta=meta)
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert (raw["format"], raw["arch"], raw["arch_kwargs"], raw["meta"]) == (FORMAT, ARCH, KWARGS, meta)
    assert raw["masks"] == {}
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert (loaded.arch, loaded.arch_kwargs, loaded.meta, loaded.masks) == (ARCH, KWARGS, meta, {})
    assert loaded.path == tmp_path / "m.pt"
    _assert_same_outputs(loaded, source, x)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temp file left behind


def _wrap(sd: dict, key: str | None, prefix: str = "") -> object:
    sd = {prefix + k: v for k, v in sd.items()}
    return sd if key is None else {key: sd, "epoch": 7, "optimizer": {"lr": 0.1}, "format": "trainer/2"}


@pytest.mark.parametrize("key", [None, "state_dict", "model", "model_state_dict", "net", "weights"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_state_dict_forms_with_arch(tmp_path: Path, source: nn.Module, x: torch.Tensor,
                                    key: str | None, prefix: str) -> None:
    torch.save(_wrap(source.state_dict(), key, prefix), tmp_path / "sd.pt")
    loaded = load_checkpoint(tmp_path / "sd.pt", arch=ARCH)
    assert loaded.arch_kwargs == KWARGS  # all three inferred from the weights
    _assert_same_outputs(loaded, source, x)


def test_wrapper_arch_is_used_without_flag(tmp_path: Path, source: nn.Module, x: torch.Tensor) -> None:
    wrapped = {"arch": ARCH, "state_dict": source.state_dict(), "best_acc1": torch.tensor(0.9)}
    torch.save(wrapped, tmp_path / "c.pt")
    _assert_same_outputs(load_checkpoint(tmp_path / "c.pt"), source, x)


def test_torchvision_resnet18_plain_state_dict(tmp_path: Path, x: torch.Tensor) -> None:
    torch.manual_seed(2)
    source = torchvision.models.resnet18(num_classes=6).eval()
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    loaded = load_checkpoint(tmp_path / "r18.pth", arch="resnet18")
    assert loaded.arch_kwargs == {"num_classes": 6}
    _assert_same_outputs(loaded, source, x)


def test_inferred_in_channels_and_width(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = build_model("cifar_vgg16", num_classes=4, in_channels=1, width=0.25).eval()
    torch.save(source.state_dict(), tmp_path / "v.pt")
    loaded = load_checkpoint(tmp_path / "v.pt", arch="cifar_vgg16")
    assert loaded.arch_kwargs == {"num_classes": 4, "in_channels": 1, "width": 0.25}
    _assert_same_outputs(loaded, source, torch.randn(2, 1, 32, 32))


def _torch_pruned(source: nn.Module) -> nn.Module:
    model = copy.deepcopy(source)
    torch.manual_seed(4)
    prune.random_unstructured(model.conv1, "weight", amount=0.5)
    prune.l1_unstructured(model.fc, "weight", amount=0.3)
    prune.l1_unstructured(model.fc, "weight", amount=0.3)  # a PruningContainer
    return model


def _zeroed_outside(source: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Independent reference: the source model with weights set to 0 where a mask is False."""
    model = copy.deepcopy(source)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, mask in masks.items():
            params[key][~mask] = 0.0
    return model


def test_torch_prune_pairs_are_merged(tmp_path: Path, source: nn.Module, x: torch.Tensor) -> None:
    pruned = _torch_pruned(source)
    sd = pruned.state_dict()
    assert "conv1.weight_orig" in sd and "fc.weight_mask" in sd
    torch.save(sd, tmp_path / "p.pt")
    loaded = load_checkpoint(tmp_path / "p.pt", arch=ARCH)
    assert set(loaded.masks) == {"conv1.weight", "fc.weight"}
    assert torch.equal(loaded.masks["conv1.weight"], pruned.conv1.weight_mask.bool())
    assert torch.equal(loaded.masks["fc.weight"], pruned.fc.weight_mask.bool())
    _assert_same_outputs(loaded, pruned, x)
    _assert_same_outputs(loaded, _zeroed_outside(source, loaded.masks), x)


def test_own_format_masks_are_applied(tmp_path: Path, source: nn.Module, x: torch.Tensor) -> None:
    torch.manual_seed(5)
    masks = {"layer1.0.conv1.weight": torch.rand(source.layer1[0].conv1.weight.shape) > 0.5,
             "fc.weight": torch.rand(source.fc.weight.shape) > 0.2}
    save_checkpoint(tmp_path / "m.pt", source, ARCH, KWARGS, masks=masks)  # source itself is unmasked
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert not raw["state_dict"]["fc.weight"][~masks["fc.weight"]].any()
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert all(torch.equal(loaded.masks[k], m) for k, m in masks.items()) and set(loaded.masks) == set(masks)
    reference = _zeroed_outside(source, masks)
    assert not torch.allclose(_out(reference, x), _out(source, x))  # the masks matter
    _assert_same_outputs(loaded, reference, x)


def test_own_format_masks_are_applied_on_load(tmp_path: Path, source: nn.Module, x: torch.Tensor) -> None:
    torch.manual_seed(6)
    masks = {"layer2.0.conv2.weight": torch.rand(source.layer2[0].conv2.weight.shape) > 0.5}
    raw = {"format": FORMAT, "arch": ARCH, "arch_kwargs": KWARGS, "state_dict": source.state_dict(),
           "masks": masks, "meta": {}}  # written by hand: weights not yet masked
    torch.save(raw, tmp_path / "m.pt")
    _assert_same_outputs(load_checkpoint(tmp_path / "m.pt"), _zeroed_outside(source, masks), x)


def test_save_merges_torch_prune_reparametrisation(tmp_path: Path, source: nn.Module, x: torch.Tensor) -> None:
    pruned = _torch_pruned(source)
    save_checkpoint(tmp_path / "m.pt", pruned, ARCH, KWARGS)
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert "conv1.weight" in raw["state_dict"] and "conv1.weight_orig" not in raw["state_dict"]
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert torch.equal(loaded.masks["conv1.weight"], pruned.conv1.weight_mask.bool())
    _assert_same_outputs(loaded, pruned, x)


@pytest.mark.parametrize("wrap", [lambda m: m, lambda m: {"model": m, "epoch": 3}])
def test_pickled_module_only_when_trusted(tmp_path: Path, source: nn.Module, x: torch.Tensor, wrap) -> None:
    torch.save(wrap(source), tmp_path / "whole.pt")
    message = _one_line_error(tmp_path / "whole.pt")
    assert "refused" in message and "CifarResNet" in message and "--trust-pickle" in message
    loaded = load_checkpoint(tmp_path / "whole.pt", trust_pickle=True)
    assert loaded.arch is None
    _assert_same_outputs(loaded, source, x)


def test_trusted_pickled_pruned_module_keeps_masks(tmp_path: Path, source: nn.Module, x: torch.Tensor) -> None:
    pruned = _torch_pruned(source)
    torch.save(pruned, tmp_path / "whole.pt")
    loaded = load_checkpoint(tmp_path / "whole.pt", trust_pickle=True)
    assert torch.equal(loaded.masks["fc.weight"], pruned.fc.weight_mask.bool())
    assert "fc.weight_orig" not in loaded.model.state_dict()  # reparametrisation made permanent
    _assert_same_outputs(loaded, pruned, x)


# ---- linearised sites (EASIER) -----------------------------------------------------------------

def _stem_and_block_linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Hand-written forward with the stem ReLU and layer1.0's first ReLU replaced by identity."""
    with torch.no_grad():
        h = m.bn1(m.conv1(x))
        b = m.layer1[0]
        h = torch.relu(b.bn2(b.conv2(b.bn1(b.conv1(h)))) + h)
        for layer in (m.layer1[1:], m.layer2, m.layer3, m.layer4):
            h = layer(h)
        return m.fc(torch.flatten(m.avgpool(h), 1))


def test_linearised_sites_are_identity_and_survive_resave(tmp_path: Path, source: nn.Module,
                                                           x: torch.Tensor) -> None:
    meta = {"linearised_sites": ["relu", "layer1_0_relu"]}
    save_checkpoint(tmp_path / "e.pt", source, ARCH, KWARGS, meta=meta)
    loaded = load_checkpoint(tmp_path / "e.pt")
    assert isinstance(loaded.model, torch.fx.GraphModule) and not loaded.model.training
    expected = _stem_and_block_linear(source, x)
    assert not torch.allclose(expected, _out(source, x))  # the linearisation matters
    torch.testing.assert_close(_out(loaded.model, x), expected, rtol=1e-6, atol=1e-6)
    save_checkpoint(tmp_path / "e2.pt", loaded.model, ARCH, KWARGS, meta=meta)  # GraphModule re-saved
    torch.testing.assert_close(_out(load_checkpoint(tmp_path / "e2.pt").model, x), expected, rtol=1e-6, atol=1e-6)


def test_apply_linearised_unknown_site(source: nn.Module) -> None:
    with pytest.raises(CheckpointError, match=r"site\(s\) layer9_relu not found.*its sites: relu, layer1_0_relu"):
        apply_linearised(source, ["relu", "layer9_relu"])


# ---- errors ------------------------------------------------------------------------------------

def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert "not found" in _one_line_error(tmp_path / "nope.pt")
    assert "is a directory" in _one_line_error(tmp_path)


def test_truncated_random_and_empty_files(tmp_path: Path, source: nn.Module) -> None:
    save_checkpoint(tmp_path / "m.pt", source, ARCH, KWARGS)
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "m.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("m.pt", "random.pt", "empty.pt"):
        message = _one_line_error(tmp_path / name)
        assert f"'{tmp_path / name}'" in message and "corrupt" in message
        assert "weights_only" not in message  # torch's advice to load unsafely is not passed on


class _TouchViaSystem:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


class _TouchViaOpen(_TouchViaSystem):
    def __reduce__(self):
        return open, (str(self.target), "w")


@pytest.mark.parametrize("payload, refused", [(_TouchViaSystem, "system"), (_TouchViaOpen, "open")])
def test_hostile_pickle_is_refused_without_running(tmp_path: Path, source: nn.Module, payload,
                                                    refused: str) -> None:
    target = tmp_path / "pwned"
    torch.save({"state_dict": source.state_dict(), "extra": payload(target)}, tmp_path / "evil.pt")
    message = _one_line_error(tmp_path / "evil.pt", arch=ARCH)
    assert not target.exists()
    assert "refused" in message and refused in message and "--trust-pickle only for files you trust" in message


def test_plain_state_dict_needs_arch(tmp_path: Path, source: nn.Module) -> None:
    torch.save(source.state_dict(), tmp_path / "sd.pt")
    assert "pass --arch" in _one_line_error(tmp_path / "sd.pt")
    assert "unknown architecture 'resnet_18'" in _one_line_error(tmp_path / "sd.pt", arch="resnet_18")


@pytest.mark.parametrize("content, words", [
    ([1, 2, 3], ["holds a list"]),
    ({"epoch": 3, "lr": 0.1}, ["holds no state_dict", "epoch, lr"]),
    ({"format": "nepenthe-compress/9", "arch": ARCH}, ["unsupported format"]),
    ({"format": FORMAT, "arch": ARCH, "arch_kwargs": {}, "masks": {}, "meta": {}},
     ["'state_dict' must be a dict"]),
    ({"format": FORMAT, "arch": ARCH, "arch_kwargs": {}, "state_dict": {"w": 1}, "masks": {}, "meta": {}},
     ["'state_dict' must map names to tensors"]),
    ({"format": FORMAT, "arch": ARCH, "arch_kwargs": {}, "state_dict": {"w": torch.ones(1)}, "masks": {},
      "meta": {"linearised_sites": "relu"}}, ["meta.linearised_sites must be a list"]),
])
def test_unrecognised_content(tmp_path: Path, content: object, words: list[str]) -> None:
    torch.save(content, tmp_path / "c.pt")
    message = _one_line_error(tmp_path / "c.pt", arch=ARCH)
    assert all(w in message for w in words), message


def test_missing_and_unexpected_keys_are_named(tmp_path: Path, source: nn.Module) -> None:
    sd = source.state_dict()
    del sd["fc.bias"], sd["layer1.0.conv1.weight"]
    torch.save(sd, tmp_path / "missing.pt")
    message = _one_line_error(tmp_path / "missing.pt", arch=ARCH)
    assert "2 missing keys" in message and "fc.bias" in message and "layer1.0.conv1.weight" in message
    sd = {**source.state_dict(), "extra.weight": torch.ones(2), "head2.bias": torch.ones(2)}
    torch.save(sd, tmp_path / "extra.pt")
    message = _one_line_error(tmp_path / "extra.pt", arch=ARCH)
    assert "2 unexpected keys" in message and "extra.weight" in message and "head2.bias" in message


def test_shape_mismatch_names_key_and_shapes(tmp_path: Path, source: nn.Module) -> None:
    torch.save(source.state_dict(), tmp_path / "sd.pt")
    # explicit kwargs win over the inferred num_classes=10
    message = _one_line_error(tmp_path / "sd.pt", arch=ARCH, arch_kwargs={"num_classes": 5})
    assert "'fc.weight'" in message and "(10, 64)" in message and "(5, 64)" in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_named(tmp_path: Path, source: nn.Module, bad: float) -> None:
    sd = source.state_dict()
    sd["layer2.0.conv1.weight"][0, 0, 0, 0] = bad
    torch.save(sd, tmp_path / "sd.pt")
    message = _one_line_error(tmp_path / "sd.pt", arch=ARCH)
    assert "'layer2.0.conv1.weight'" in message and "1 NaN/Inf" in message


def test_mask_must_name_a_weight(tmp_path: Path, source: nn.Module) -> None:
    with pytest.raises(CheckpointError, match="mask 'fc.w' names no tensor"):
        save_checkpoint(tmp_path / "m.pt", source, ARCH, KWARGS, masks={"fc.w": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(CheckpointError, match=r"mask 'fc.weight' has shape \(3,\), weight \(10, 64\)"):
        save_checkpoint(tmp_path / "m.pt", source, ARCH, KWARGS,
                        masks={"fc.weight": torch.ones(3, dtype=torch.bool)})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("meta, where", [
    ({"accuracy": np.float64(0.9)}, "meta.accuracy: float64"),
    ({"hist": [1, torch.ones(1)]}, r"meta.hist\[1\]: Tensor"),
    ({"m": {1: "a"}}, "meta.m: key 1"),
])
def test_meta_must_be_json_like(tmp_path: Path, source: nn.Module, meta: dict, where: str) -> None:
    with pytest.raises(TypeError, match=where):
        save_checkpoint(tmp_path / "m.pt", source, ARCH, KWARGS, meta=meta)


def test_failed_save_keeps_the_old_file(tmp_path: Path, source: nn.Module, monkeypatch) -> None:
    save_checkpoint(tmp_path / "m.pt", source, ARCH, KWARGS, meta={"v": 1})
    before = (tmp_path / "m.pt").read_bytes()

    def crash(obj, f):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "m.pt", source, ARCH, KWARGS, meta={"v": 2})
    assert (tmp_path / "m.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
