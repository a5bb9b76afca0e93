"""Checkpoints as the papers' own code saves them, fabricated with the same structure.

- EGP / NEPENTHE (ZhuLIAO001/Unstructured_Relu_Pruning_Reduce_Depth, src/main.py): the whole model is
  pickled with ``torch.save(model, path)``; its ReLUs carry forward hooks whose ``Hook`` objects are
  defined in the training script (``__main__``) and hold the last input tensor; the model class lives
  in the repo's ``cifar10_models`` package; pruning reparametrisations were made permanent first.
- EASIER (VGCQ/EASIER, main.py): chosen activations are replaced with ``nn.Identity`` and the run
  saves ``{'epoch', ..., 'model_state_dict', 'optimizer_state_dict'}`` as
  ``checkpoint_EASIER_<data>_<model>_iteration<k>_last_epoch.pt`` plus the whole pickled model
  ``EASIER_<data>_<model>_iteration<k>_after_removal``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from nepenthe_compress.checkpoint import load_checkpoint
from nepenthe_compress.cli import main
from nepenthe_compress.errors import CheckpointError

# A cut-down ResNet of each repo: the same module names and forward structure, narrow widths.
EGP_RESNET = '''
import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes=10):
    return ResNet(num_classes)
'''

EASIER_RESNET = EGP_RESNET.replace(
    "        self.relu = nn.ReLU(inplace=True)\n        self.conv2",
    "        self.relu1 = nn.ReLU(inplace=False)\n        self.conv2").replace(
    "        self.downsample = None\n",
    "        self.relu2 = nn.ReLU(inplace=False)\n        self.downsample = None\n").replace(
    "out = self.relu(self.bn1(self.conv1(x)))", "out = self.relu1(self.bn1(self.conv1(x)))").replace(
    "        return self.relu(out)", "        return self.relu2(out)")

# EGP's training script, reduced to what reaches the file: the Hook class of its __main__, hooks on
# every ReLU, a forward pass (the hooks keep the last input), l1 pruning made permanent, torch.save.
EGP_MAIN = '''
import copy, sys
import torch
import torch.nn.utils.prune as prune
from cifar10_models.resnet import resnet18


class Hook():
    def __init__(self, module, backward=False):
        self.hook = module.register_forward_hook(self.hook_fn)
    def hook_fn(self, module, input, output):
        self.output = input[0]
    def close(self):
        self.hook.remove()


torch.manual_seed(0)
model = resnet18(num_classes=10)
with torch.no_grad():
    model.train()(torch.randn(8, 3, 16, 16))
model.eval()
hooks = {name: Hook(m) for name, m in model.named_modules() if type(m) == torch.nn.ReLU}
for name, m in model.named_modules():
    if isinstance(m, torch.nn.Conv2d):
        prune.l1_unstructured(m, name="weight", amount=0.5)
x = torch.randn(2, 3, 16, 16)
with torch.no_grad():
    y = model(x)
temp_model = copy.deepcopy(model)
for name, m in temp_model.named_modules():
    if isinstance(m, torch.nn.Conv2d):
        prune.remove(m, "weight")
torch.save(temp_model, sys.argv[1])
torch.save({"x": x, "y": y}, sys.argv[2])
'''


def _package(root: Path, name: str, module: str, source: str) -> Path:
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    (root / name / f"{module}.py").write_text(textwrap.dedent(source))
    return root


@pytest.fixture(scope="module")
def egp(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(checkpoint, code folder, reference input/output): written by a separate Python process whose
    __main__ defines the Hook class, exactly as EGP's script does."""
    root = tmp_path_factory.mktemp("egp")
    code = _package(root / "src", "cifar10_models", "resnet", EGP_RESNET)
    (code / "main.py").write_text(EGP_MAIN)
    ckpt, ref = root / "sparsity_0", root / "ref.pt"
    subprocess.run([sys.executable, "main.py", str(ckpt), str(ref)], cwd=code, check=True, timeout=120)
    return ckpt, code, torch.load(ref, weights_only=True)


def test_egp_whole_pickle_needs_trust(egp) -> None:
    ckpt, code, _ = egp
    with pytest.raises(CheckpointError, match=r"refused to load .* pickles Python objects .*--trust-pickle"):
        load_checkpoint(ckpt, code_path=str(code))


def test_egp_whole_pickle_loads_with_hooks_inert_and_removed(egp) -> None:
    ckpt, code, ref = egp
    loaded = load_checkpoint(ckpt, trust_pickle=True, code_path=str(code))
    assert loaded.notes == ["removed 5 hook(s) stored with the pickled model"]  # EGP hooked 5 ReLU modules
    assert all(not m._forward_hooks for m in loaded.model.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ref["x"]), ref["y"], rtol=0, atol=0)
    conv = loaded.model.layer1[0].conv1.weight
    assert int((conv == 0).sum()) == conv.numel() // 2  # the pruned weights came along


def test_egp_unimportable_package_names_the_module_and_the_fix(egp, tmp_path: Path, monkeypatch) -> None:
    ckpt, _, _ = egp
    monkeypatch.chdir(tmp_path)   # the default code path (cwd) does not hold cifar10_models
    for name in [n for n in sys.modules if n.startswith("cifar10_models")]:   # imported by other tests
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ckpt, trust_pickle=True)
    message = str(e.value)
    assert "pickles objects of module 'cifar10_models'" in message and "--code-path DIR" in message
    assert "corrupt" not in message


def test_egp_fold_cli_with_code_path(egp, tmp_path: Path) -> None:
    ckpt, code, ref = egp
    torch.save({"x": ref["x"].repeat(4, 1, 1, 1)}, tmp_path / "calib.pt")
    result = CliRunner().invoke(main, ["entropy", str(ckpt), "--trust-pickle", "--code-path", str(code),
                                       "--calib", str(tmp_path / "calib.pt")])
    assert result.exit_code == 0, result.output
    assert "removed 5 hook(s) stored with the pickled model" in result.output


# ---- EASIER ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def easier(tmp_path_factory) -> tuple[Path, Path, nn.Module]:
    """EASIER after one round: layer1.0.relu1 replaced by identity, state_dict and whole model saved."""
    root = tmp_path_factory.mktemp("easier")
    code = _package(root / "code", "easier_models", "ResNet", EASIER_RESNET)
    sys.path.insert(0, str(code))
    try:
        from easier_models.ResNet import resnet18
    finally:
        sys.path.remove(str(code))
    torch.manual_seed(0)
    model = resnet18(num_classes=10)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 16, 16))
    model.eval()
    model.layer1[0].relu1 = nn.Identity()   # EASIER: exec(f'model.{name} = torch.nn.Identity()')
    torch.save({"epoch": 3, "train_loss": 0.1, "train_acc": 97.0, "val_loss": 0.2, "val_acc": 96.0,
                "test_loss": 0.2, "test_acc": 96.0, "model_state_dict": model.state_dict(),
                "optimizer_state_dict": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).state_dict()},
               root / "checkpoint_EASIER_CIFAR-10_ResNet-18_iteration1_last_epoch.pt")
    torch.save(model, root / "EASIER_CIFAR-10_ResNet-18_iteration1_after_removal")
    return root, code, model


def test_easier_state_dict_with_declared_linearised_sites(easier) -> None:
    root, code, model = easier
    ckpt = root / "checkpoint_EASIER_CIFAR-10_ResNet-18_iteration1_last_epoch.pt"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
    plain = load_checkpoint(ckpt, arch="easier_models.ResNet:resnet18", code_path=str(code))
    assert len(plain.warnings) == 1 and "looks like an EASIER checkpoint after 1 removal(s)" in plain.warnings[0]
    assert "--linearised-sites" in plain.warnings[0]
    with torch.no_grad():
        assert not torch.allclose(plain.model(x), want)   # the removed ReLU came back: a different model
    declared = load_checkpoint(ckpt, arch="easier_models.ResNet:resnet18", code_path=str(code),
                               linearised_sites=["layer1.0.relu1"])
    assert declared.warnings == [] and isinstance(declared.model.layer1[0].relu1, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(declared.model(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("name, words", [
    ("layer1.0.relu9", "has no module 'layer1.0.relu9' (its activation modules: relu, layer1.0.relu1"),
    ("layer1.0.conv1", "'layer1.0.conv1' is a Conv2d, not an activation"),
])
def test_easier_bad_linearised_site_names(easier, name: str, words: str) -> None:
    root, code, _ = easier
    ckpt = root / "checkpoint_EASIER_CIFAR-10_ResNet-18_iteration1_last_epoch.pt"
    with pytest.raises(CheckpointError, match=None) as e:
        load_checkpoint(ckpt, arch="easier_models.ResNet:resnet18", code_path=str(code), linearised_sites=[name])
    assert words in str(e.value)


def test_easier_whole_model_after_removal(easier) -> None:
    root, code, model = easier
    loaded = load_checkpoint(root / "EASIER_CIFAR-10_ResNet-18_iteration1_after_removal", trust_pickle=True,
                             code_path=str(code))
    assert isinstance(loaded.model.layer1[0].relu1, nn.Identity) and loaded.warnings == []
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)


def test_easier_cli_warns_then_folds_with_declared_sites(easier, tmp_path: Path) -> None:
    root, code, _ = easier
    ckpt = root / "checkpoint_EASIER_CIFAR-10_ResNet-18_iteration1_last_epoch.pt"
    torch.manual_seed(3)
    torch.save({"x": torch.randn(16, 3, 16, 16)}, tmp_path / "calib.pt")
    args = ["entropy", str(ckpt), "--arch", "easier_models.ResNet:resnet18", "--code-path", str(code),
            "--calib", str(tmp_path / "calib.pt")]
    plain = CliRunner().invoke(main, [*args, "--json", str(tmp_path / "plain.json")])
    assert plain.exit_code == 0 and "warning: 'checkpoint_EASIER_CIFAR-10_ResNet-18_iteration1" in plain.output
    declared = CliRunner().invoke(main, [*args, "--linearised-sites", "layer1.0.relu1",
                                         "--json", str(tmp_path / "declared.json")])
    assert declared.exit_code == 0 and "warning:" not in declared.output
    sites = {name: {s["name"] for s in json.loads((tmp_path / f"{name}.json").read_text())["sites"]}
             for name in ("plain", "declared")}
    assert sites["plain"] - sites["declared"] == {"layer1_0_relu1"}   # the identity is no site any more
