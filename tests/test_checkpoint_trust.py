"""A checkpoint is data: nothing it says is imported or called, every size is budgeted, every tensor
type checked, and this tool's own files are verified against their content hash."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from nepenthe_compress import archs
from nepenthe_compress.archs import build_model
from nepenthe_compress.checkpoint import FORMAT, HASH_KEY, content_hash, load_checkpoint, save_checkpoint
from nepenthe_compress.errors import CheckpointError

ARCH = "cifar_resnet18"
KWARGS = {"num_classes": 10, "in_channels": 3, "width": 0.125}


@pytest.fixture(scope="module")
def source() -> nn.Module:
    torch.manual_seed(0)
    model = build_model(ARCH, **KWARGS)
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 32, 32))
    return model.eval()


def _raw(source: nn.Module, **changes) -> dict:
    raw = {"format": FORMAT, "arch": ARCH, "arch_kwargs": dict(KWARGS), "state_dict": source.state_dict(),
           "masks": {}, "meta": {}}
    return {**raw, **changes}


def _error(path: Path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- nothing from a file is code -------------------------------------------------------------------

@pytest.mark.parametrize("arch, kwargs", [
    ("os:system", {"command": "touch {marker}"}),
    ("subprocess:getoutput", {"cmd": "touch {marker}"}),
    ("builtins:exec", {"source": "open({marker!r}, 'w').close()"}),
    ("pathlib:Path.touch", {"self": "{marker}"}),
])
def test_callable_arch_from_a_file_is_never_imported(tmp_path: Path, source: nn.Module, arch: str,
                                                     kwargs: dict) -> None:
    marker = tmp_path / "MARKER"
    payload = {k: v.format(marker=str(marker)) for k, v in kwargs.items()}
    torch.save(_raw(source, arch=arch, arch_kwargs=payload), tmp_path / "own.pt")
    torch.save({"state_dict": source.state_dict(), "arch": arch}, tmp_path / "wrapped.pt")
    for name in ("own.pt", "wrapped.pt"):
        message = _error(tmp_path / name)
        assert f"architecture '{arch}' names a Python callable" in message and "pass --arch yourself" in message
    assert not marker.exists()
    # the user's own --arch overrides the file's, and then the stored kwargs are not used either
    assert load_checkpoint(tmp_path / "own.pt", arch=ARCH, arch_kwargs=KWARGS).arch == ARCH
    assert not marker.exists()


def test_user_callable_arch_is_imported_from_code_path_or_cwd(tmp_path: Path, source: nn.Module,
                                                              monkeypatch) -> None:
    pkg = tmp_path / "code" / "mynets"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "small.py").write_text(
        "from torch import nn\n"
        "def net(num_classes=3):\n    return nn.Sequential(nn.Flatten(), nn.Linear(12, num_classes))\n"
        "def not_a_model(num_classes=3):\n    return 42\n")
    torch.manual_seed(1)
    ref = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    torch.save(ref.state_dict(), tmp_path / "sd.pt")
    message = _error(tmp_path / "sd.pt", arch="mynets.small:net")
    assert "cannot import 'mynets.small'" in message and "--code-path" in message
    loaded = load_checkpoint(tmp_path / "sd.pt", arch="mynets.small:net", code_path=str(tmp_path / "code"))
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(loaded.model(x), ref(x), rtol=0, atol=0)
    monkeypatch.chdir(tmp_path / "code")  # the default code path is the current directory
    assert load_checkpoint(tmp_path / "sd.pt", arch="mynets.small:net").arch_kwargs == {"num_classes": 5}
    assert "returned a int, not a torch.nn.Module" in _error(tmp_path / "sd.pt", arch="mynets.small:not_a_model")


# ---- stored kwargs: JSON scalars within a budget ---------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    ({"width": 1e4}, "would allocate more than"),
    ({"num_classes": 10 ** 11}, "would allocate more than"),
    ({"num_classes": 1e11}, "cannot build 'cifar_resnet18'"),
    ({"num_classes": -3}, "cannot build 'cifar_resnet18'"),
    ({"width": "x"}, "cannot build 'cifar_resnet18'"),
    ({"width": float("nan")}, "argument 'width' is nan"),
    ({"width": [1, 2]}, "argument 'width' must be a str, int, float, bool or null, got list"),
    ({"width": {"a": 1}}, "must be a str, int, float, bool or null, got dict"),
    ({"command": "ls"}, "takes no argument command"),
])
def test_stored_kwargs_are_checked_before_allocating(tmp_path: Path, source: nn.Module, kwargs: dict,
                                                     words: str) -> None:
    torch.save(_raw(source, arch_kwargs={**KWARGS, **kwargs}), tmp_path / "m.pt")
    assert words in _error(tmp_path / "m.pt")


def test_torchvision_kwargs_within_budget_and_module_count(monkeypatch) -> None:
    message = str(pytest.raises(CheckpointError, build_model, "resnet18", num_classes=10 ** 9).value)
    assert "would allocate more than 8 GiB" in message
    monkeypatch.setattr(archs, "MAX_MODULES", 40)
    message = str(pytest.raises(CheckpointError, build_model, "resnet18").value)
    assert "builds more than 40 modules" in message
    monkeypatch.setattr(archs, "MAX_MODULES", 100_000)
    assert isinstance(build_model("resnet18", num_classes=3), nn.Module)


# ---- tensor types ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_non_floating_weights_are_refused(tmp_path: Path, source: nn.Module, dtype: torch.dtype) -> None:
    sd = dict(source.state_dict())
    sd["fc.weight"] = torch.ones(sd["fc.weight"].shape, dtype=dtype)
    torch.save(sd, tmp_path / "sd.pt")
    message = _error(tmp_path / "sd.pt", arch=ARCH)
    assert f"tensor 'fc.weight' has dtype {dtype}" in message and "needs floating point" in message


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_upcast_and_said(tmp_path: Path, source: nn.Module, dtype: torch.dtype) -> None:
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    torch.save(half, tmp_path / "sd.pt")
    loaded = load_checkpoint(tmp_path / "sd.pt", arch=ARCH)
    weights = [k for k, v in half.items() if v.is_floating_point()]
    assert loaded.notes == [f"{len(weights)} tensor(s) stored in {dtype} were upcast to torch.float32 "
                            f"({weights[0]}, {weights[1]}, {weights[2]}, ... ({len(weights)} in all))"]
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], half[k].float()) for k in weights)


def test_format_must_be_a_string(tmp_path: Path, source: nn.Module) -> None:
    torch.save(_raw(source, format=5), tmp_path / "m.pt")
    assert "'format' must be a string, got int" in _error(tmp_path / "m.pt")


# ---- integrity ------------------------------------------------------------------------------------------

def test_saved_checkpoints_carry_a_content_hash_that_is_verified(tmp_path: Path, source: nn.Module) -> None:
    save_checkpoint(tmp_path / "m.pt", source, ARCH, KWARGS, meta={"calib": "mnist"})
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw[HASH_KEY] == content_hash(raw) and len(raw[HASH_KEY]) == 64
    for name, change in [("tensor", lambda r: r["state_dict"]["fc.bias"].add_(1e-3)),
                         ("meta", lambda r: r["meta"].update(calib="digits")),
                         ("kwargs", lambda r: r["arch_kwargs"].update(num_classes=9)),
                         ("mask", lambda r: r["masks"].update({"fc.weight": torch.ones_like(r["state_dict"]["fc.weight"]).bool()}))]:
        tampered = torch.load(tmp_path / "m.pt", weights_only=True)
        change(tampered)
        torch.save(tampered, tmp_path / f"{name}.pt")
        assert "failed its integrity check" in _error(tmp_path / f"{name}.pt"), name
    del raw[HASH_KEY]  # files written before the hash existed still load
    torch.save(raw, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").arch == ARCH


def test_flipped_byte_in_tensor_data_is_caught(tmp_path: Path, source: nn.Module) -> None:
    save_checkpoint(tmp_path / "m.pt", source, ARCH, KWARGS)
    with zipfile.ZipFile(tmp_path / "m.pt") as z:
        entries = {i.filename: z.read(i.filename) for i in z.infolist()}
    name = max((n for n in entries if "/data/" in n), key=lambda n: len(entries[n]))
    data = bytearray(entries[name])
    data[len(data) // 2] ^= 0x10   # one bit of one weight (still a finite float)
    entries[name] = bytes(data)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for n, b in entries.items():
            z.writestr(n, b)
    (tmp_path / "flipped.pt").write_bytes(buf.getvalue())
    message = _error(tmp_path / "flipped.pt")
    assert "failed its integrity check" in message or "NaN/Inf" in message


@pytest.mark.parametrize("change, words", [
    (lambda sd, m: sd.update({"fc.bias": torch.zeros(1).expand(10 ** 12)}), "over the 8 GiB model budget"),
    (lambda sd, m: m.update({"fc.bias": torch.ones(1, dtype=torch.bool).expand(10 ** 12)}), "over the 8 GiB model budget"),
    (lambda sd, m: sd.update({"fc.weight": sd["fc.weight"].to_sparse()}), "is torch.sparse_coo, expected a dense tensor"),
    (lambda sd, m: m.update({"fc.weight": torch.full_like(sd["fc.weight"], 0.5)}), "mask 'fc.weight' holds values other than 0 and 1"),
])
def test_tensor_bombs_and_bad_masks_are_refused_before_reading(tmp_path: Path, source: nn.Module, change,
                                                               words: str) -> None:
    sd, masks = dict(source.state_dict()), {}
    change(sd, masks)
    torch.save(_raw(source, state_dict=sd, masks=masks), tmp_path / "m.pt")
    assert words in _error(tmp_path / "m.pt")


def test_kwargs_keys_must_be_strings(tmp_path: Path, source: nn.Module) -> None:
    torch.save(_raw(source, arch_kwargs={**KWARGS, 1: 2}), tmp_path / "m.pt")
    assert "'arch_kwargs' keys must be strings" in _error(tmp_path / "m.pt")
