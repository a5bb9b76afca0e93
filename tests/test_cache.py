"""The export cache: a second export of the same model is the cached file (after the same check a
fresh export passes); another model, a changed weight or a tampered cached file is exported anew."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from nepenthe_compress import cache as C
from nepenthe_compress import export as E
from nepenthe_compress.trace import trace_model
from nepenthe_compress.verify import onnx_runner


def net() -> nn.Module:
    torch.manual_seed(0)
    return trace_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(8 * 6 * 6, 4)).eval())


def count_exports(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = E.export_onnx

    def counting(model, example, path, **kwargs):
        calls.append(Path(path).name)
        return real(model, example, path, **kwargs)
    monkeypatch.setattr(E, "export_onnx", counting)
    return calls


def test_same_model_is_exported_once(tmp_path: Path, monkeypatch) -> None:
    calls = count_exports(monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    first = C.cached_export(net(), x, tmp_path / "a.onnx", folder=tmp_path / "c")
    second = C.cached_export(net(), x, tmp_path / "b.onnx", folder=tmp_path / "c")
    assert calls == ["a.onnx"] and first.read_bytes() == second.read_bytes()
    y = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(onnx_runner(second)(y)[0], net()(y), atol=1e-5)


def test_key_follows_code_weights_and_input_shape() -> None:
    x = torch.randn(2, 3, 8, 8)
    base = C.model_key(net(), x, 18)
    changed = copy.deepcopy(net())
    with torch.no_grad():
        changed.get_submodule("1").running_var[0] += 1e-3      # a buffer, not just parameters
    other_code = trace_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval())
    keys = {base, C.model_key(changed, x, 18), C.model_key(net(), torch.randn(2, 3, 9, 8), 18),
            C.model_key(net(), x, 17), C.model_key(other_code, x, 18)}
    assert len(keys) == 5 and C.model_key(net(), torch.randn(7, 3, 8, 8), 18) == base   # batch size is free


def test_a_tampered_cached_file_is_replaced_by_a_fresh_export(tmp_path: Path, monkeypatch) -> None:
    x = torch.randn(2, 3, 8, 8)
    C.cached_export(net(), x, tmp_path / "a.onnx", folder=tmp_path / "c")
    other = trace_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval())
    (cached,) = (tmp_path / "c" / "exports").iterdir()
    E.export_onnx(other, x, cached)                            # same signature, other weights
    calls = count_exports(monkeypatch)
    out = C.cached_export(net(), x, tmp_path / "b.onnx", folder=tmp_path / "c")
    assert calls == ["b.onnx"]
    y = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(onnx_runner(out)(y)[0], net()(y), atol=1e-5)


def test_only_the_most_recent_exports_are_kept(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(C, "MAX_EXPORTS", 2)
    x = torch.randn(2, 3, 8, 8)
    for i in range(3):
        m = net()
        with torch.no_grad():
            m.get_submodule("4").bias.fill_(float(i))
        C.cached_export(m, x, tmp_path / f"{i}.onnx", folder=tmp_path / "c")
    assert len(list((tmp_path / "c" / "exports").iterdir())) == 2
