"""What keeps ``fold`` fast to start and to end: torchvision without torch._dynamo, a fold that never
imports dynamo or sympy, and the console entry point's exit (handlers run, streams flushed, codes kept).
Each case runs in a fresh interpreter, since what matters is what a process imports."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from nepenthe_compress.archs import build_model


def python(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_torchvision_loads_without_dynamo_and_dynamo_still_works_after() -> None:
    out = python(
        "import sys, torch\n"
        "from nepenthe_compress.archs import build_model\n"
        "m = build_model('resnet18', num_classes=10)\n"
        "print('dynamo after build:', 'torch._dynamo' in sys.modules)\n"
        "from torchvision.ops import roi_align\n"
        "print('roi_align:', tuple(roi_align(torch.ones(1, 2, 8, 8), [torch.tensor([[0, 0, 4., 4.]])], 2).shape))\n"
        "import torch._dynamo.utils as real\n"
        "print('real utils:', real.__doc__ is None or 'stand-in' not in real.__doc__, hasattr(real, 'counters'))\n"
        "deferred = sys.modules['torchvision.ops.roi_align'].is_compile_supported\n"
        "print('deferred call:', deferred is not real.is_compile_supported, "
        "deferred('cpu') == real.is_compile_supported('cpu'))\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["dynamo after build: False", "roi_align: (1, 2, 2, 2)",
                                       "real utils: True True", "deferred call: True True"]


def test_torchvision_import_falls_back_when_the_stand_in_lacks_a_name() -> None:
    """A torchvision asking the stand-in for a name it lacks is imported plainly, and works."""
    out = python(
        "import sys, torch\n"
        "from nepenthe_compress import light_imports\n"
        "light_imports._DEFERRED = ()\n"
        "tv = light_imports.import_torchvision()\n"
        "print('dynamo:', 'torch._dynamo' in sys.modules)\n"
        "print(tuple(tv.models.resnet18(num_classes=3).eval()(torch.ones(1, 3, 32, 32)).shape))\n"
        "print(tuple(tv.ops.roi_align(torch.ones(1, 2, 8, 8), [torch.tensor([[0, 0, 4., 4.]])], 2).shape))\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["dynamo: True", "(1, 3)", "(1, 2, 2, 2)"]


def test_a_fold_imports_neither_dynamo_nor_sympy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("cifar_resnet18", num_classes=10, width=0.125).eval()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    np.savez(tmp_path / "calib.npz", x=torch.randn(40, 3, 16, 16).numpy())
    out = python(
        "import sys\n"
        "from nepenthe_compress.cli import main\n"
        "try:\n"
        "    main(['fold', 'm.pt', '--arch', 'cifar_resnet18', '--calib', 'calib.npz', '--no-bench', '-q'])\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code)\n"
        "print(sorted({'torch._dynamo', 'sympy', 'torch.fx.experimental.symbolic_shapes'} & set(sys.modules)))\n",
        cwd=tmp_path)
    assert out.stdout.splitlines()[-2:] == ["exit 0", "[]"], out.stderr
    assert (tmp_path / "m.folded.onnx").is_file()


def _run(argv: list[str], extra: str = "") -> subprocess.CompletedProcess:
    return python("import atexit, sys\nfrom nepenthe_compress import cli\n" + extra +
                  f"sys.argv = ['nepenthe-compress', *{argv!r}]\ncli.run()\nprint('not reached')\n")


def test_run_keeps_exit_codes_and_output_and_runs_exit_handlers() -> None:
    ok = _run(["--version"], "atexit.register(lambda: print('handler ran'))\n")
    assert ok.returncode == 0 and ok.stdout.splitlines() == ["nepenthe-compress, version 0.1.0", "handler ran"]
    usage = _run(["no-such-verb"])
    assert usage.returncode == 2 and usage.stdout == ""
    assert usage.stderr.startswith("error: No such command 'no-such-verb'")


def test_run_exits_like_the_interpreter_on_sys_exit_with_a_message() -> None:
    out = _run(["--version"], "cli.main = lambda: sys.exit('stopped: why')\n")
    assert (out.returncode, out.stderr, out.stdout) == (1, "stopped: why\n", "")
    none = _run(["--version"], "cli.main = lambda: sys.exit(None)\n")
    assert none.returncode == 0 and none.stdout == ""


def test_console_script_and_module_use_the_fast_exit() -> None:
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'nepenthe-compress = "nepenthe_compress.cli:run"' in pyproject
    out = subprocess.run([sys.executable, "-m", "nepenthe_compress", "--version"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout == "nepenthe-compress, version 0.1.0\n"
