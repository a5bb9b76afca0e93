"""ONNX / .pt2 export, and ONNX depth on hand-built graphs with known answers and on torchvision models."""
from __future__ import annotations

import copy
import json
import random
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
import torchvision
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from nepenthe_compress import checkpoint as checkpoint_lib
from nepenthe_compress import export as export_mod
from nepenthe_compress.checkpoint import LoadedCheckpoint
from nepenthe_compress.commands import export as export_cmd
from nepenthe_compress.errors import UserError
from nepenthe_compress.errors import ExportError
from nepenthe_compress.export import export_onnx, export_pt2, load_pt2, synthetic_like
from nepenthe_compress.onnx_depth import count_weighted, onnx_depth, onnx_param_count, onnx_summary


# ---------------------------------------------------------------------------------------- helpers

class Affine(nn.Module):
    """Per-channel y = x * scale + shift with buffers (what a linearised site becomes)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.randn(c, 1, 1))
        self.register_buffer("shift", torch.randn(c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class ConvBiasMap(nn.Module):
    """Padded conv without bias plus a constant [C, H, W] border bias map."""

    def __init__(self, ci: int, co: int, hw: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ci, co, 3, padding=1, bias=False)
        self.register_buffer("bias_map", torch.randn(co, hw, hw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.bias_map


class Folded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.affine = Affine(3)
        self.conv = ConvBiasMap(3, 6, 8)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(self.affine(x))).mean((2, 3)))


class LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (Affine, ConvBiasMap)) or super().is_leaf_module(m, qualname)


def folded_graph_module() -> fx.GraphModule:
    torch.manual_seed(0)
    root = Folded().eval()
    gm = fx.GraphModule(root, LeafTracer().trace(root))
    assert {type(m) for m in gm.modules()} >= {Affine, ConvBiasMap}   # custom modules kept as modules
    return gm.eval()


def ort_run(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def rel_err_vs_float64(model: nn.Module, path: Path, x: torch.Tensor) -> float:
    """max|onnxruntime - torch float64| / max|torch float64|, computed here independently of verify.py."""
    ref = copy.deepcopy(model).double().eval()(x.double()).detach().numpy()
    out = ort_run(path, x).astype(np.float64)
    assert out.shape == ref.shape
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def batch_dim(path: Path) -> onnx.TensorShapeProto.Dimension:
    return onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]


# ---------------------------------------------------------------------------------------- export

@pytest.fixture(scope="module")
def resnet18_onnx(tmp_path_factory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    path = tmp_path_factory.mktemp("r18") / "resnet18.onnx"
    assert export_onnx(model, torch.randn(2, 3, 32, 32), path) == path
    return model, path


def test_resnet18_export_matches_torch_at_other_batch_sizes(resnet18_onnx):
    model, path = resnet18_onnx
    onnx.checker.check_model(str(path), full_check=True)
    assert batch_dim(path).dim_param == "batch"
    for n in (1, 5):   # example had batch 2
        assert rel_err_vs_float64(model, path, torch.randn(n, 3, 32, 32)) < 1e-5
    assert [p.name for p in path.parent.iterdir()] == [path.name]   # no temp / external-data files


def test_graph_module_with_custom_modules_exports(tmp_path):
    gm = folded_graph_module()
    path = export_onnx(gm, torch.randn(1, 3, 8, 8), tmp_path / "folded.onnx")   # batch-1 example
    onnx.checker.check_model(str(path), full_check=True)
    assert batch_dim(path).dim_param == "batch"
    for n in (1, 3):
        assert rel_err_vs_float64(gm, path, torch.randn(n, 3, 8, 8)) < 1e-5
    # affine (0) -> conv + bias map (1) -> relu -> mean -> fc (2)
    assert onnx_summary(path).depth == 2


def test_static_batch_export_fixes_the_batch(tmp_path):
    path = export_onnx(folded_graph_module(), torch.randn(3, 3, 8, 8), tmp_path / "s.onnx", dynamic_batch=False)
    assert batch_dim(path).dim_value == 3


def test_resnet18_depth_is_18(resnet18_onnx):
    # Longest path: conv1, then 4 stages x 2 BasicBlocks x 2 convs = 16 convs -> 17 convs; the three
    # downsample 1x1 convs sit on parallel shortcuts (1 conv beside 2), so they never lengthen the path;
    # + fc = 18. All 20 convs (17 + 3 downsample; BN folded into them by the exporter) and the fc are weighted.
    _, path = resnet18_onnx
    assert onnx_depth(path) == 18
    assert count_weighted(path) == {"Conv": 20, "Gemm": 1}


def test_vgg11_bn_depth_is_11(tmp_path):
    # 8 convs in sequence + 3 linears; a smaller classifier (same 3-linear structure) keeps the test fast.
    model = torchvision.models.vgg11_bn(weights=None, num_classes=10)
    model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 16), nn.ReLU(), nn.Dropout(),
                                     nn.Linear(16, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 10))
    path = export_onnx(model.eval(), torch.randn(2, 3, 32, 32), tmp_path / "vgg.onnx")
    assert onnx_depth(path) == 11


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return x * 2
        return x * 3


class Svd(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svd(x)[1]


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Identity(), Svd())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) * 2


class FixedBatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(2, -1)


def _export_error(model: nn.Module, tmp_path: Path) -> str:
    target = tmp_path / "m.onnx"
    target.write_text("old")
    with pytest.raises(ExportError) as info:
        export_onnx(model, torch.randn(2, 3, 4, 4), target)
    assert isinstance(info.value, UserError)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]   # atomic
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_capture_failure_names_the_call_site(tmp_path):
    msg = _export_error(DataDependent(), tmp_path)
    assert "torch.export cannot capture DataDependent" in msg and "data-dependent" in msg
    assert "test_export.py:" in msg


def test_missing_onnx_translation_names_op_and_module(tmp_path):
    msg = _export_error(Nested(), tmp_path)
    assert "linalg_svd" in msg and "'block.1' (Svd)" in msg


def test_batch_specialisation_is_reported(tmp_path):
    assert "static-batch" in _export_error(FixedBatch(), tmp_path)


def test_unreachable_opset_is_refused(tmp_path):
    # the exporter converts opset requests below 18 and silently keeps 18 where conversion fails
    with pytest.raises(ExportError, match="opset 7"):
        export_onnx(nn.Linear(8, 8), torch.randn(2, 8), tmp_path / "old.onnx", opset=7)
    assert list(tmp_path.iterdir()) == []


def test_over_size_limit_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(export_mod, "ONNX_SIZE_LIMIT", 100)
    with pytest.raises(ExportError, match="2 GiB"):
        export_onnx(nn.Linear(8, 8), torch.randn(2, 8), tmp_path / "big.onnx")
    assert list(tmp_path.iterdir()) == []


def test_pt2_roundtrip_with_dynamic_batch(tmp_path):
    gm = folded_graph_module()
    path = export_pt2(gm, torch.randn(1, 3, 8, 8), tmp_path / "m.pt2")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]
    x = torch.randn(3, 3, 8, 8)
    got = load_pt2(path).module()(x).detach().double()
    ref = copy.deepcopy(gm).double()(x.double()).detach()
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-5


def test_load_pt2_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="bad.pt2"):
        load_pt2(bad)


# ---------------------------------------------------------------------------------------- export verb

def test_export_command_writes_onnx_and_pt2(tmp_path, monkeypatch):
    ckpt = tmp_path / "net.pt"
    ckpt.write_bytes(b"stand-in: the loader is replaced below")
    gm = folded_graph_module()
    fake = LoadedCheckpoint(gm, None, {}, {}, {"input_shape": [3, 8, 8]}, ckpt)
    monkeypatch.setattr(checkpoint_lib, "load_checkpoint", lambda path, **kw: fake)
    report = tmp_path / "report.json"
    res = CliRunner().invoke(export_cmd.export, [str(ckpt), "--pt2", "--json", str(report)])
    assert res.exit_code == 0, res.output
    onnx_path, pt2_path = tmp_path / "net.onnx", tmp_path / "net.pt2"
    data = json.loads(report.read_text())
    assert data["files"] == [str(onnx_path), str(pt2_path)]
    assert data["depth"] == 2 and data["weighted"] == {"Conv": 1, "Gemm": 1}
    # affine has no parameters (buffers are folded to initializers, counted): 3+3 + 6*3*9 + 6*8*8 + 6*4 + 4
    assert data["params"] == 3 + 3 + 162 + 384 + 24 + 4
    assert rel_err_vs_float64(gm, onnx_path, torch.randn(4, 3, 8, 8)) < 1e-5
    assert "depth" in res.output


def test_export_command_without_input_shape_fails_cleanly(tmp_path, monkeypatch):
    ckpt = tmp_path / "net.pt"
    ckpt.write_bytes(b"x")
    monkeypatch.setattr(checkpoint_lib, "load_checkpoint",
                        lambda path, **kw: LoadedCheckpoint(nn.Linear(2, 2), None, {}, {}, {}, ckpt))
    res = CliRunner().invoke(export_cmd.export, [str(ckpt)])
    assert res.exit_code == 1
    assert "--input-shape" in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt"]


def test_pt2_keeps_a_synthetic_example_not_the_given_one(tmp_path):
    """The example handed to export_pt2 (in fold: calibration samples) must not ship inside the .pt2,
    not even the rest of its storage when it is a view of a larger data tensor."""
    gm = folded_graph_module()
    data = torch.rand(500, 3, 8, 8, generator=torch.Generator().manual_seed(7)) + 10.0   # distinctive
    path = export_pt2(gm, data[:2], tmp_path / "m.pt2")
    blob = path.read_bytes()
    assert not [i for i in range(len(data)) if data[i].numpy().tobytes() in blob]
    assert len(blob) < 100_000 < data.numel() * 4            # 120 KB of data would not fit
    (x,), _ = load_pt2(path).example_inputs
    assert torch.equal(x, synthetic_like(data[:2])) and float(x.abs().max()) < 10.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_synthetic_like_keeps_shape_and_dtype_and_no_values(dtype):
    example = (torch.arange(24).reshape(2, 3, 4) + 100).to(dtype)
    x = synthetic_like(example)
    assert x.shape == example.shape and x.dtype == dtype
    assert not torch.isin(x, example).any()
    assert torch.equal(x, synthetic_like(example))            # seeded: the same file for the same model


# ---------------------------------------------------------------------------------------- export verb: outputs

def _fake_loader(monkeypatch, ckpt: Path) -> list[str]:
    """Replace the checkpoint loader with the folded test module; record calls."""
    calls: list[str] = []
    fake = LoadedCheckpoint(folded_graph_module(), None, {}, {}, {"input_shape": [3, 8, 8]}, ckpt)

    def load(path, **kw):
        calls.append(str(path))
        return fake

    monkeypatch.setattr(checkpoint_lib, "load_checkpoint", load)
    return calls


def _export(*args: str):
    return CliRunner().invoke(export_cmd.export, [*map(str, args)])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _one_error_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


@pytest.mark.parametrize("existing, args", [
    ("net.onnx", []),
    ("net.pt2", ["--pt2"]),
    ("r.json", ["--json", "{t}/r.json"]),
    ("m.onnx", ["-o", "{t}/m.onnx"]),
])
def test_export_refuses_an_existing_output_before_loading(tmp_path, monkeypatch, existing, args):
    ckpt = tmp_path / "net.pt"
    ckpt.write_bytes(b"stand-in")
    calls = _fake_loader(monkeypatch, ckpt)
    (tmp_path / existing).write_bytes(b"earlier export\n")
    before = _files(tmp_path)
    line = _one_error_line(_export(ckpt, *(a.format(t=tmp_path) for a in args)))
    assert line == f"error: output '{tmp_path / existing}' already exists: pass --force to replace it"
    assert calls == [] and _files(tmp_path) == before


def test_export_force_replaces_onnx_pt2_and_json(tmp_path, monkeypatch):
    ckpt = tmp_path / "net.pt"
    ckpt.write_bytes(b"stand-in")
    _fake_loader(monkeypatch, ckpt)
    for name in ("net.onnx", "net.pt2", "r.json"):
        (tmp_path / name).write_bytes(b"earlier\n")
    res = _export(ckpt, "--pt2", "--json", tmp_path / "r.json", "--force")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "r.json").read_text())["depth"] == 2
    assert onnx_depth(tmp_path / "net.onnx") == 2
    x = torch.randn(3, 3, 8, 8)
    assert torch.allclose(load_pt2(tmp_path / "net.pt2").module()(x), folded_graph_module()(x), atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "net.pt", "net.pt2", "r.json"]


@pytest.mark.parametrize("args, message", [
    (["-o", "{t}/blocker/m.onnx"], "'{t}/blocker' is a file, not a folder"),
    (["-o", "{t}/blocker/a/b/m.onnx"], "'{t}/blocker' is a file, not a folder"),
    (["-o", "{t}"], "output '{t}' is a folder"),
    (["--json", "{t}/blocker/r.json"], "'{t}/blocker' is a file, not a folder"),
    (["-o", "/proc/self/m.onnx"], "folder '/proc/self' is not writable"),
    (["-o", "{t}/m.pt2", "--pt2"], "ends in .pt2"),
])
def test_export_unwritable_output_fails_before_loading(tmp_path, monkeypatch, args, message):
    ckpt = tmp_path / "net.pt"
    ckpt.write_bytes(b"stand-in")
    (tmp_path / "blocker").write_text("a file\n")
    calls = _fake_loader(monkeypatch, ckpt)
    before = _files(tmp_path)
    line = _one_error_line(_export(ckpt, *(a.format(t=tmp_path) for a in args)))
    assert message.format(t=tmp_path) in line
    assert calls == [] and _files(tmp_path) == before and [p for p in tmp_path.iterdir() if p.is_dir()] == []


def test_export_with_calibration_data_keeps_it_out_of_both_files(tmp_path, monkeypatch):
    ckpt = tmp_path / "net.pt"
    ckpt.write_bytes(b"stand-in")
    _fake_loader(monkeypatch, ckpt)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)) + 5.0
    np.savez(tmp_path / "calib.npz", x=x.numpy())
    res = _export(ckpt, "--pt2", "--calib", tmp_path / "calib.npz")
    assert res.exit_code == 0, res.output
    for name in ("net.onnx", "net.pt2"):
        blob = (tmp_path / name).read_bytes()
        assert not [i for i in range(len(x)) if x[i].numpy().tobytes() in blob], name
    with zipfile.ZipFile(tmp_path / "net.pt2") as z:
        assert all(i.file_size < 2 * x[0].numel() * 4 + 4096 for i in z.infolist() if "sample_inputs" in i.filename)


# ---------------------------------------------------------------------------------------- depth on hand-built graphs

def _vi(name: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _init(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones(shape, np.float32), name)


def _model(nodes: list, inits: list, inputs: list, outputs: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _mm(a: str, b: str, out: str) -> onnx.NodeProto:
    return helper.make_node("MatMul", [a, b], [out])


def _w(*names: str) -> list[onnx.TensorProto]:
    return [_init(n, (4, 4)) for n in names]


def test_depth_chain():
    m = _model([_mm("x", "w1", "a"), helper.make_node("Relu", ["a"], ["b"]),
                helper.make_node("Gemm", ["b", "w2"], ["c"]), _mm("c", "w3", "y")],
               _w("w1", "w2", "w3"), [_vi("x", ["N", 4])], [_vi("y", ["N", 4])])
    assert onnx_depth(m) == 3
    assert count_weighted(m) == {"MatMul": 2, "Gemm": 1}


def test_depth_two_branches_takes_the_longer():
    nodes = [_mm("x", "wa", "a"),                                              # short branch: 1
             _mm("x", "wb1", "b1"), _mm("b1", "wb2", "b2"), _mm("b2", "wb3", "b"),   # long branch: 3
             helper.make_node("Add", ["a", "b"], ["s"]), _mm("s", "wc", "y")]
    m = _model(nodes, _w("wa", "wb1", "wb2", "wb3", "wc"), [_vi("x", ["N", 4])], [_vi("y", ["N", 4])])
    assert onnx_depth(m) == 4
    shuffled = onnx.ModelProto()
    shuffled.CopyFrom(m)
    order = list(shuffled.graph.node)
    random.Random(0).shuffle(order)
    del shuffled.graph.node[:]
    shuffled.graph.node.extend(order)        # not topologically sorted any more
    assert onnx_depth(shuffled) == 4


def test_depth_residual_block():
    conv = lambda i, w, o: helper.make_node("Conv", [i, w], [o], pads=[1, 1, 1, 1])  # noqa: E731
    nodes = [conv("x", "w1", "a"), helper.make_node("Relu", ["a"], ["r"]), conv("r", "w2", "b"),
             helper.make_node("Conv", ["x", "wd"], ["d"]),                   # 1x1 shortcut conv
             helper.make_node("Add", ["b", "d"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    inits = [_init("w1", (2, 2, 3, 3)), _init("w2", (2, 2, 3, 3)), _init("wd", (2, 2, 1, 1))]
    m = _model(nodes, inits, [_vi("x", ["N", 2, 5, 5])], [_vi("y", ["N", 2, 5, 5])])
    assert onnx_depth(m) == 2
    assert count_weighted(m) == {"Conv": 3}


def test_depth_attention_scores_are_not_weighted():
    nodes = [_mm("x", "wq", "q"), _mm("x", "wk", "k"), _mm("x", "wv", "v"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[1, 0]),
             _mm("q", "kt", "s"),                                   # activation x activation
             helper.make_node("Softmax", ["s"], ["p"]),
             _mm("p", "v", "o"),                                    # activation x activation
             _mm("o", "wo", "y")]
    m = _model(nodes, _w("wq", "wk", "wv", "wo"), [_vi("x", ["N", 4])], [_vi("y", ["N", 4])])
    assert onnx_depth(m) == 2
    assert count_weighted(m) == {"MatMul": 4}


def test_depth_weight_through_transpose_reshape_and_constant():
    shape = numpy_helper.from_array(np.array([4, 4], np.int64), "shape")
    nodes = [helper.make_node("Transpose", ["w1"], ["w1t"], perm=[1, 0]), _mm("x", "w1t", "a"),
             helper.make_node("Reshape", ["w2flat", "shape"], ["w2"]), _mm("a", "w2", "b"),
             helper.make_node("Constant", [], ["w3"], value=_init("c", (4, 4))), _mm("w3", "b", "c"),
             helper.make_node("Einsum", ["c", "w4"], ["y"], equation="ni,ij->nj")]
    inits = [_init("w1", (4, 4)), _init("w2flat", (16,)), shape, _init("w4", (4, 4))]
    m = _model(nodes, inits, [_vi("x", ["N", 4])], [_vi("y", ["N", 4])])
    assert onnx_depth(m) == 4          # weight as 2nd, 2nd (reshaped), 1st (Constant) operand, Einsum
    assert onnx_param_count(m) == 16 + 16 + 16   # float initializers only (not the int64 shape)


def test_depth_matmul_with_runtime_weight_is_not_weighted():
    m = _model([_mm("x", "w", "y")], [], [_vi("x", ["N", 4]), _vi("w", [4, 4])], [_vi("y", ["N", 4])])
    assert onnx_depth(m) == 0 and count_weighted(m) == {}


def test_depth_takes_the_deepest_output_and_reads_files(tmp_path):
    nodes = [_mm("x", "w1", "y1"), _mm("y1", "w2", "y2")]
    m = _model(nodes, _w("w1", "w2"), [_vi("x", ["N", 4])], [_vi("y1", ["N", 4]), _vi("y2", ["N", 4])])
    onnx.save(m, str(tmp_path / "m.onnx"))
    assert onnx_depth(tmp_path / "m.onnx") == 2


def test_depth_of_unreadable_file_is_a_user_error(tmp_path):
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="bad.onnx"):
        onnx_depth(tmp_path / "bad.onnx")


# ---------------------------------------------------------------------------------------- exporter choice

def _traced_resnet18() -> fx.GraphModule:
    from nepenthe_compress.trace import trace_model

    torch.manual_seed(0)
    return trace_model(torchvision.models.resnet18(weights=None, num_classes=10).eval())


def test_torchscript_is_safe_only_for_traced_graphs_of_known_modules():
    from nepenthe_compress.fold.modules import ChannelAffine

    traced = _traced_resnet18()
    assert export_mod.torchscript_safe(traced)
    assert not export_mod.torchscript_safe(torchvision.models.resnet18(weights=None))   # not traced
    assert not export_mod.torchscript_safe(folded_graph_module())    # user leaf modules (Affine) stay opaque

    class FoldTracer(fx.Tracer):   # the fold inserts its modules as call_module nodes
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, ChannelAffine) or super().is_leaf_module(m, qualname)

    root = nn.Sequential(ChannelAffine(torch.ones(3), torch.zeros(3), 1), nn.ReLU())
    assert export_mod.torchscript_safe(fx.GraphModule(root, FoldTracer().trace(root)))


def test_auto_exports_traced_graphs_with_torchscript(tmp_path, monkeypatch):
    def no_dynamo(*args, **kwargs):
        raise AssertionError("dynamo was used")
    monkeypatch.setattr(export_mod, "_dynamo_onnx", no_dynamo)
    gm = _traced_resnet18()
    path = export_onnx(gm, torch.randn(2, 3, 32, 32), tmp_path / "ts.onnx")
    assert batch_dim(path).dim_param == "batch"
    for n in (1, 3):
        assert rel_err_vs_float64(gm, path, torch.randn(n, 3, 32, 32)) < 1e-5


def test_torchscript_output_that_differs_falls_back_to_dynamo(tmp_path, monkeypatch):
    gm = _traced_resnet18()
    wrong = copy.deepcopy(gm)
    with torch.no_grad():
        wrong.fc.bias.add_(1.0)
    real = export_mod._torchscript_onnx
    monkeypatch.setattr(export_mod, "_torchscript_onnx", lambda m, *a: real(wrong, *a))
    path = export_onnx(gm, torch.randn(2, 3, 32, 32), tmp_path / "fb.onnx")
    assert rel_err_vs_float64(gm, path, torch.randn(3, 3, 32, 32)) < 1e-5
    with pytest.raises(ExportError, match="differs from torch"):
        export_onnx(gm, torch.randn(2, 3, 32, 32), tmp_path / "ts.onnx", exporter="torchscript")
    assert not (tmp_path / "ts.onnx").exists()


class Attention(nn.Module):
    """The TorchScript exporter cannot translate fused attention: it dumps its IR from native code
    and the export falls back to dynamo."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def test_a_failing_torchscript_export_prints_nothing_and_falls_back(tmp_path, capfd):
    from nepenthe_compress.trace import trace_model

    torch.manual_seed(0)
    gm = trace_model(Attention().eval())
    path = export_onnx(gm, torch.randn(2, 5, 8), tmp_path / "attn.onnx")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert rel_err_vs_float64(gm, path, torch.randn(3, 5, 8)) < 1e-5
