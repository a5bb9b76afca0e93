"""Data / model fit: the first layer found from the graph, checked before any forward pass, and the
verbs that refuse unfitting data up front (entropy, fold, export, verify)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import fx, nn

from nepenthe_compress.archs import build_model
from nepenthe_compress.checkpoint import apply_linearised, load_checkpoint, save_checkpoint
from nepenthe_compress.cli import main
from nepenthe_compress.data import load_data
from nepenthe_compress.entropy import measure_entropy
from nepenthe_compress.errors import DataError
from nepenthe_compress.fit import ExpectedInput, check_fit, expected_input

ARCH = "cifar_resnet18"
KWARGS = {"num_classes": 10, "in_channels": 3, "width": 0.125}


class Wrap(nn.Module):
    """``layer(pre(x))``: a first layer behind some preprocessing of the input."""

    def __init__(self, layer: nn.Module, pre=lambda x: x) -> None:
        super().__init__()
        self.layer, self.pre = layer, pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.pre(x))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + y


class Branchy(nn.Module):
    """Control flow on the data: not traceable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.sum() > 0 else self.conv(-x)


class LaterFirst(nn.Module):
    """Registers its classifier before the conv that runs first (module order is not call order)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 2)
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


class Normalised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x - self.mean)  # broadcasting could turn 1 channel into 3: undetermined


FOUND = {
    "cifar_resnet18": (lambda: build_model(ARCH, **KWARGS), ExpectedInput("conv1", "Conv2d", 3, 2)),
    "cifar_resnet18_grey": (lambda: build_model(ARCH, **{**KWARGS, "in_channels": 1}),
                            ExpectedInput("conv1", "Conv2d", 1, 2)),
    "torchvision_resnet18": (lambda: torchvision.models.resnet18(), ExpectedInput("conv1", "Conv2d", 3, 2)),
    "vit_b_16_shape_asserts": (lambda: torchvision.models.vit_b_16(), ExpectedInput("conv_proj", "Conv2d", 3, 2)),
    "grouped": (lambda: Wrap(nn.Conv2d(6, 12, 3, groups=3)), ExpectedInput("layer", "Conv2d", 6, 2)),
    "conv1d": (lambda: Wrap(nn.Conv1d(2, 4, 3)), ExpectedInput("layer", "Conv1d", 2, 1)),
    "conv3d_after_dropout": (lambda: nn.Sequential(nn.Dropout3d(0.1), nn.Conv3d(5, 4, 3)),
                             ExpectedInput("1", "Conv3d", 5, 3)),
    "scaled_input": (lambda: Wrap(nn.Conv2d(3, 4, 3), lambda x: (x * 2.0 - 1).contiguous()),
                     ExpectedInput("layer", "Conv2d", 3, 2)),
    "linear": (lambda: Wrap(nn.Linear(16, 4)), ExpectedInput("layer", "Linear", 16, None)),
    "mlp_flatten": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 10)),
                    ExpectedInput("1", "Linear", 784, None, True)),
    "mlp_view": (lambda: Wrap(nn.Linear(784, 10), lambda x: x.view(x.size(0), -1)),
                 ExpectedInput("layer", "Linear", 784, None, True)),
    "mlp_reshape_shape0": (lambda: Wrap(nn.Linear(784, 10), lambda x: x.reshape(x.shape[0], -1)),
                           ExpectedInput("layer", "Linear", 784, None, True)),
    "mlp_torch_flatten": (lambda: Wrap(nn.Linear(784, 10), lambda x: torch.flatten(x, 1)),
                          ExpectedInput("layer", "Linear", 784, None, True)),
    "registered_late": (LaterFirst, ExpectedInput("conv", "Conv2d", 3, 2)),
}


@pytest.mark.parametrize("case", sorted(FOUND))
def test_first_layer_found(case: str) -> None:
    build, expected = FOUND[case]
    assert expected_input(build()) == expected


def test_graph_module_uses_its_own_graph() -> None:
    model = build_model(ARCH, **KWARGS)
    gm = apply_linearised(model, ["layer1_0_relu"])
    assert isinstance(gm, fx.GraphModule)
    assert expected_input(gm) == ExpectedInput("conv1", "Conv2d", 3, 2)
    gm.graph.eliminate_dead_code()
    # a graph whose input reaches the conv through a channel repeat: undetermined, even though
    # the module order still starts with conv1
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    conv = next(iter(x.users))
    with gm.graph.inserting_after(x):
        rep = gm.graph.call_method("repeat", (x, 1, 3, 1, 1))
    conv.replace_input_with(x, rep)
    gm.recompile()
    assert expected_input(gm) is None


UNDETERMINED = {
    "channel_repeat": lambda: Wrap(nn.Conv2d(3, 4, 3), lambda x: x.repeat(1, 3, 1, 1)),
    "cat": lambda: Wrap(nn.Conv2d(3, 4, 3), lambda x: torch.cat([x, x, x], 1)),
    "indexing": lambda: Wrap(nn.Conv2d(3, 4, 3), lambda x: x[:, :3]),
    "broadcast_buffer": Normalised,
    "two_inputs": TwoInputs,
    "untraceable": Branchy,
    "lazy": lambda: Wrap(nn.LazyConv2d(4, 3)),
    "input_used_twice": lambda: Wrap(nn.Conv2d(3, 4, 3), lambda x: x + x.mean()),
    "flatten_all": lambda: Wrap(nn.Linear(784, 10), lambda x: x.flatten()),
    "view_other_dim": lambda: Wrap(nn.Linear(784, 10), lambda x: x.view(x.size(1), -1)),
    "conv_after_flatten": lambda: nn.Sequential(nn.Flatten(), nn.Conv1d(3, 4, 3)),
}


@pytest.mark.parametrize("case", sorted(UNDETERMINED))
def test_undetermined_first_layer_checks_nothing(case: str) -> None:
    model = UNDETERMINED[case]()
    assert expected_input(model) is None
    check_fit(model, (2, 1, 5, 5))  # no error: the check never refuses what it cannot judge


MESSAGES = {
    "grey_on_rgb": ((4, 1, 28, 28), False, "data has 1 channel(s) but the model's first layer conv1 (Conv2d) "
                                           "expects 3 (pass --channels 3 to replicate grey images)"),
    "two_on_rgb": ((4, 2, 28, 28), False, "data has 2 channel(s) but the model's first layer conv1 (Conv2d) "
                                          "expects 3"),
    "random_grey": ((2, 1, 32, 32), True, "random inputs have 1 channel(s) but the model's first layer conv1 "
                                          "(Conv2d) expects 3 (pass --input-shape 3,32,32)"),
    "features": ((4, 64), False, "data samples have shape (64,) but the model's first layer conv1 (Conv2d) "
                                 "expects samples of shape (3, H, W)"),
    "video": ((4, 3, 2, 8, 8), False, "data samples have shape (3, 2, 8, 8) but the model's first layer conv1 "
                                      "(Conv2d) expects samples of shape (3, H, W)"),
}


@pytest.mark.parametrize("case", sorted(MESSAGES))
def test_check_fit_messages(case: str) -> None:
    shape, random, message = MESSAGES[case]
    model = build_model(ARCH, **KWARGS)
    with pytest.raises(DataError) as info:
        check_fit(model, shape, random=random)
    assert str(info.value) == message


def test_linear_messages_and_fits() -> None:
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    check_fit(mlp, (4, 1, 28, 28))
    check_fit(mlp, (4, 784))
    with pytest.raises(DataError) as info:
        check_fit(mlp, (4, 3, 28, 28))
    assert str(info.value) == ("data samples of shape (3, 28, 28) give 2352 features flattened but the model's "
                               "first layer 1 (Linear) expects 784 input features")
    head = Wrap(nn.Linear(16, 4))
    check_fit(head, (4, 5, 16))  # a Linear reads the last axis
    with pytest.raises(DataError, match=r"give 8 features on the last axis .* expects 16 input features"):
        check_fit(head, (4, 16, 8))


def test_fitting_shapes_pass() -> None:
    model = build_model(ARCH, **KWARGS)
    for shape in [(1, 3, 32, 32), (7, 3, 8, 8), (2, 3, 224, 100)]:
        check_fit(model, shape)


def test_check_fit_runs_no_forward_pass() -> None:
    model = build_model(ARCH, **KWARGS)
    calls = []  # modules that saw a real tensor (symbolic tracing passes fx proxies only)
    for m in model.modules():
        m.register_forward_pre_hook(lambda mod, args: calls.append(mod) if isinstance(args[0], torch.Tensor) else None)
    with pytest.raises(DataError, match="1 channel"):
        check_fit(model, (2, 1, 32, 32))
    check_fit(model, (2, 3, 32, 32))
    assert calls == []


# --------------------------------------------------------------------------- the verbs

@pytest.fixture(scope="module")
def rgb_model() -> nn.Module:
    torch.manual_seed(3)
    return build_model(ARCH, **KWARGS).eval()


def rgb_checkpoint(folder: Path, model: nn.Module, meta: dict) -> Path:
    path = folder / "rgb.pt"
    save_checkpoint(path, model, ARCH, KWARGS, meta=meta)
    return path


def grey_npz(folder: Path, n: int = 6) -> Path:
    x = np.random.default_rng(0).uniform(0, 1, (n, 1, 8, 8)).astype(np.float32)
    np.savez(folder / "grey.npz", x=x)
    return folder / "grey.npz"


def one_error_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert "Traceback" not in res.output
    return lines[0]


def test_entropy_meta_calib_root_errors_in_seconds(tmp_path: Path, rgb_model: nn.Module) -> None:
    ck = rgb_checkpoint(tmp_path, rgb_model, {"calib": "/"})
    start = time.monotonic()
    res = CliRunner().invoke(main, ["entropy", str(ck)])
    line = one_error_line(res)
    assert time.monotonic() - start < 20
    assert "data '/': / is not an image folder: class folder" in line and "holds no image files" in line


@pytest.mark.parametrize("calib", [123, ["mnist"]])
def test_entropy_non_string_meta_calib(tmp_path: Path, rgb_model: nn.Module, calib) -> None:
    ck = rgb_checkpoint(tmp_path, rgb_model, {"calib": calib})
    line = one_error_line(CliRunner().invoke(main, ["entropy", str(ck)]))
    assert line == f"error: checkpoint '{ck}': meta.calib must be a string naming the data, got " \
                   f"{type(calib).__name__} {calib!r}"


def test_entropy_mnist_on_rgb_model_then_channels(tmp_path: Path, rgb_model: nn.Module) -> None:
    ck = rgb_checkpoint(tmp_path, rgb_model, {})
    line = one_error_line(CliRunner().invoke(main, ["entropy", str(ck), "--calib", "mnist", "--limit", "32"]))
    assert line == ("error: data has 1 channel(s) but the model's first layer conv1 (Conv2d) expects 3 "
                    "(pass --channels 3 to replicate grey images)")
    res = CliRunner().invoke(main, ["entropy", str(ck), "--calib", "mnist", "--limit", "32", "--channels", "3",
                                    "--json", "-"])
    assert res.exit_code == 0, res.output
    grey = load_data("mnist", limit=32).x
    expected = measure_entropy(rgb_model, [grey.expand(-1, 3, -1, -1).contiguous()]).to_dict()
    assert json.loads(res.stdout) == json.loads(json.dumps(expected))


def test_entropy_channels_override_a_recorded_grey_shape(tmp_path: Path, rgb_model: nn.Module) -> None:
    """A checkpoint recording 3x8x8 inputs with grey data: the shape check names --channels too."""
    ck = rgb_checkpoint(tmp_path, rgb_model, {"calib": str(grey_npz(tmp_path)), "input_shape": [3, 8, 8]})
    line = one_error_line(CliRunner().invoke(main, ["entropy", str(ck)]))
    assert "input_shape expects 3 (pass --channels 3 to replicate grey images)" in line
    assert CliRunner().invoke(main, ["entropy", str(ck), "--channels", "3"]).exit_code == 0


def test_fold_refuses_before_measuring(tmp_path: Path, rgb_model: nn.Module, monkeypatch) -> None:
    import nepenthe_compress.workflow.fold as workflow

    monkeypatch.setattr(workflow, "measure_entropy", lambda *a, **k: pytest.fail("forward pass"))
    ck = rgb_checkpoint(tmp_path, rgb_model, {"calib": str(grey_npz(tmp_path))})
    out = tmp_path / "out"
    line = one_error_line(CliRunner().invoke(main, ["fold", str(ck), "-o", str(out), "--no-bench", "--no-pt2"]))
    assert "data has 1 channel(s)" in line and "--channels 3" in line
    assert not out.exists() or not any(out.iterdir())


def example_input(ck, calib: str | None, channels: int | None = None) -> torch.Tensor:
    """What ``export`` runs the model on: the shared input rule, random inputs preferred."""
    from nepenthe_compress.data import RandomInputs, resolve_inputs

    meta = {**ck.meta, **({"channels": channels} if channels else {})}
    return resolve_inputs(calib, meta, where=str(ck.path), limit=2, random=RandomInputs.PREFERRED,
                          models=[ck.model]).x


def test_export_example_checked(tmp_path: Path, rgb_model: nn.Module) -> None:
    ck_path = rgb_checkpoint(tmp_path, rgb_model, {})
    res = CliRunner().invoke(main, ["export", str(ck_path), "--input-shape", "1,8,8", "-o", str(tmp_path / "m.onnx")])
    assert one_error_line(res) == ("error: random inputs have 1 channel(s) but the model's first layer conv1 "
                                   "(Conv2d) expects 3 (pass --input-shape 3,8,8)")
    res = CliRunner().invoke(main, ["export", str(ck_path), "--calib", str(grey_npz(tmp_path)),
                                    "-o", str(tmp_path / "m.onnx")])
    assert "--channels 3" in one_error_line(res)
    assert not (tmp_path / "m.onnx").exists()
    ck = load_checkpoint(ck_path)
    x = example_input(ck, str(tmp_path / "grey.npz"), channels=3)
    grey = torch.from_numpy(np.load(tmp_path / "grey.npz")["x"])
    assert tuple(x.shape) == (2, 3, 8, 8) and all(torch.equal(x[:, c], x[:, 0]) for c in range(3))
    assert any(torch.equal(x[0, 0], g[0]) for g in grey)
    with pytest.raises(DataError, match=r"input_shape of checkpoint .* must be 1 to 4 positive integers"):
        example_input(load_checkpoint(rgb_checkpoint(tmp_path, rgb_model, {"input_shape": "3,8,8"})), None)


def test_verify_checkpoint_fit_checked_before_comparing(tmp_path: Path, rgb_model: nn.Module, monkeypatch) -> None:
    import nepenthe_compress.verify as verify_lib

    monkeypatch.setattr(verify_lib, "compare_runners", lambda *a, **k: pytest.fail("forward pass"))
    ck = rgb_checkpoint(tmp_path, rgb_model, {"calib": str(grey_npz(tmp_path))})
    line = one_error_line(CliRunner().invoke(main, ["verify", str(ck), str(ck)]))
    assert "data has 1 channel(s)" in line and "--channels 3" in line
    monkeypatch.undo()
    res = CliRunner().invoke(main, ["verify", str(ck), str(ck), "--channels", "3", "--json", "-"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["samples"] == 6
