"""Output safety of every verb: output locations checked before any work, existing files replaced only
with --force (atomically), and the shared helpers behind it (``check_writable``, ``OutputSet``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from nepenthe_compress.cli import main
from nepenthe_compress import bench as bench_lib
from nepenthe_compress import checkpoint as checkpoint_lib
from nepenthe_compress import prune as prune_lib
from nepenthe_compress.workflow import models as models_lib
from nepenthe_compress.errors import UserError
from nepenthe_compress.export import export_onnx
from nepenthe_compress.io import OutputError, OutputSet, check_writable
from test_fold_cli import Saved, saved  # noqa: F401  (module fixture: a small checkpoint and its calib npz)

UNWRITABLE = "/proc/self"   # a folder in which nobody, root included, can create a file


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(res: Result) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert "Traceback" not in res.output
    return lines[0]


def record_calls(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[tuple]:
    """Replace ``module.name`` by a stub that records its calls and stops the command."""
    calls: list[tuple] = []

    def stub(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise UserError("stub reached")

    monkeypatch.setattr(module, name, stub)
    return calls


# ---- check_writable -----------------------------------------------------------------------------------

def test_new_nested_path_passes_and_creates_nothing(tmp_path: Path) -> None:
    check_writable([tmp_path / "a" / "b" / "out.json", None, "-"])
    assert list(tmp_path.iterdir()) == []


def test_existing_file_needs_force(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("x")
    (tmp_path / "b.json").write_text("y")
    with pytest.raises(OutputError, match=r"output '.*a\.json' already exists \(and 1 more output\(s\)\): "
                                          r"pass --force to replace it"):
        check_writable([tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"])
    check_writable([tmp_path / "a.json", tmp_path / "b.json"], force=True)


@pytest.mark.parametrize("force", [False, True])
def test_bad_locations_are_refused_even_with_force(tmp_path: Path, force: bool) -> None:
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    cases = {tmp_path / "file" / "out.json": f"'{tmp_path / 'file'}' is a file, not a folder",
             tmp_path / "file" / "a" / "b.onnx": f"'{tmp_path / 'file'}' is a file, not a folder",
             tmp_path: f"output '{tmp_path}' is a folder",
             tmp_path / "fifo": "is not a regular file",
             Path(UNWRITABLE) / "x.json": f"folder '{UNWRITABLE}' is not writable"}
    for path, message in cases.items():
        with pytest.raises(OutputError, match=message.replace("(", r"\(")):
            check_writable([path], force)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "file"]


def test_forced_output_replaces_a_symlink_not_its_target(tmp_path: Path) -> None:
    target = tmp_path / "target.json"
    target.write_text("keep me\n")
    (tmp_path / "out.json").symlink_to(target)
    with pytest.raises(OutputError, match="already exists"):
        check_writable([tmp_path / "out.json"])
    check_writable([tmp_path / "out.json"], force=True)
    with OutputSet(force=True) as out:
        out.stage(tmp_path / "out.json").write_text("new\n")
    assert not (tmp_path / "out.json").is_symlink() and (tmp_path / "out.json").read_text() == "new\n"
    assert target.read_text() == "keep me\n"


def test_output_set_refuses_a_file_that_appeared_meanwhile(tmp_path: Path) -> None:
    """All or nothing: a target created while the work ran stops the commit before any rename."""
    out = OutputSet()
    out.stage(tmp_path / "a.onnx").write_text("a")
    out.stage(tmp_path / "b.json").write_text("b")
    (tmp_path / "b.json").write_text("someone else's\n")
    with pytest.raises(OutputError, match=r"'.*b\.json' appeared while this command ran: pass --force"):
        out.commit()
    assert files(tmp_path) == {"b.json": b"someone else's\n"}

    forced = OutputSet(force=True)
    forced.stage(tmp_path / "a.onnx").write_text("a")
    forced.stage(tmp_path / "b.json").write_text("b")
    forced.commit()
    assert files(tmp_path) == {"a.onnx": b"a", "b.json": b"b"}


# ---- entropy: --json and --plot ---------------------------------------------------------------------------

@pytest.mark.parametrize("option, name", [("--json", "e.json"), ("--plot", "p.png")])
def test_entropy_refuses_existing_output_before_loading(saved: Saved, tmp_path: Path, monkeypatch,  # noqa: F811
                                                        option: str, name: str) -> None:
    calls = record_calls(monkeypatch, checkpoint_lib, "load_checkpoint")
    (tmp_path / name).write_bytes(b"earlier\n")
    before = files(tmp_path)
    line = one_error_line(run("entropy", saved.ckpt, option, tmp_path / name))
    assert line == f"error: output '{tmp_path / name}' already exists: pass --force to replace it"
    assert calls == [] and files(tmp_path) == before


def test_entropy_unwritable_plot_fails_before_loading(saved: Saved, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    calls = record_calls(monkeypatch, checkpoint_lib, "load_checkpoint")
    (tmp_path / "blocker").write_text("x")
    line = one_error_line(run("entropy", saved.ckpt, "--plot", tmp_path / "blocker" / "p.png"))
    assert f"'{tmp_path / 'blocker'}' is a file, not a folder" in line and calls == []


def test_entropy_force_replaces_json_and_plot(saved: Saved, tmp_path: Path) -> None:  # noqa: F811
    for name in ("e.json", "p.png"):
        (tmp_path / name).write_bytes(b"earlier\n")
    res = run("entropy", saved.ckpt, "--json", tmp_path / "e.json", "--plot", tmp_path / "p.png", "--force")
    assert res.exit_code == 0, res.output
    assert len(json.loads((tmp_path / "e.json").read_text())["sites"]) == 17
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- verify and bench: --json ---------------------------------------------------------------------------

def test_verify_refuses_existing_json_before_opening_models(saved: Saved, tmp_path: Path,  # noqa: F811
                                                            monkeypatch) -> None:
    calls = record_calls(monkeypatch, models_lib, "open_model")
    (tmp_path / "v.json").write_bytes(b"earlier\n")
    line = one_error_line(run("verify", saved.ckpt, saved.ckpt, "--json", tmp_path / "v.json"))
    assert "already exists: pass --force" in line
    assert calls == [] and (tmp_path / "v.json").read_bytes() == b"earlier\n"


def test_verify_force_replaces_json(saved: Saved, tmp_path: Path) -> None:  # noqa: F811
    (tmp_path / "v.json").write_bytes(b"earlier\n")
    res = run("verify", saved.ckpt, saved.ckpt, "--json", tmp_path / "v.json", "--force")
    assert res.exit_code == 0, res.output
    verdict = json.loads((tmp_path / "v.json").read_text())
    assert verdict["passed"] is True and verdict["max_rel"] == 0.0 and verdict["samples"] == 40


@pytest.fixture()
def tiny_onnx(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return export_onnx(torch.nn.Linear(4, 3).eval(), torch.randn(2, 4), tmp_path / "tiny.onnx")


def test_bench_refuses_existing_json_before_timing(tiny_onnx: Path, tmp_path: Path, monkeypatch) -> None:
    calls = record_calls(monkeypatch, bench_lib, "compare_latency")
    (tmp_path / "b.json").write_bytes(b"earlier\n")
    line = one_error_line(run("bench", tiny_onnx, "--json", tmp_path / "b.json"))
    assert "already exists: pass --force" in line
    assert calls == [] and (tmp_path / "b.json").read_bytes() == b"earlier\n"


def test_bench_force_replaces_json(tiny_onnx: Path, tmp_path: Path) -> None:
    (tmp_path / "b.json").write_bytes(b"earlier\n")
    res = run("bench", tiny_onnx, "--batch", "1", "--repeats", "1", "--warmup", "0",
              "--json", tmp_path / "b.json", "--force")
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [("tiny.onnx", 1)]


# ---- prune: the run folder ------------------------------------------------------------------------------

def _prune(out: Path, *extra: object) -> Result:
    return run("prune", "--arch", "cifar_resnet18", "--data", "mnist", "--method", "imp", "--rounds", "1",
               "-o", out, *extra)


@pytest.mark.parametrize("name", ["final.pt", "summary.json", "round_00.pt"])
def test_prune_refuses_a_folder_with_run_files_it_cannot_resume(tmp_path: Path, monkeypatch, name: str) -> None:
    calls = record_calls(monkeypatch, prune_lib, "run_prune")
    (tmp_path / name).write_bytes(b"someone's earlier result\n")
    before = files(tmp_path)
    for extra in ((), ("--resume",)):   # --resume has nothing to continue here: a fresh run would replace it
        line = one_error_line(_prune(tmp_path, *extra))
        assert line == (f"error: '{tmp_path}' already holds {name}, not from a run --resume can continue: "
                        "pass --force to replace its files, or choose another -o folder")
    assert calls == [] and files(tmp_path) == before


def test_prune_force_or_unrelated_files_let_the_run_start(tmp_path: Path, monkeypatch) -> None:
    calls = record_calls(monkeypatch, prune_lib, "run_prune")
    (tmp_path / "notes.txt").write_text("not a run file\n")
    assert one_error_line(_prune(tmp_path)) == "error: stub reached"
    (tmp_path / "final.pt").write_bytes(b"earlier\n")
    assert one_error_line(_prune(tmp_path, "--force")) == "error: stub reached"
    assert len(calls) == 2


def test_prune_keeps_a_resumable_run_even_with_force(tmp_path: Path) -> None:
    """A folder holding a run's state is continued with --resume, never restarted over it."""
    (tmp_path / "prune_state.json").write_text(json.dumps({"config": {}, "rounds": []}))
    before = files(tmp_path)
    line = one_error_line(_prune(tmp_path, "--force"))
    assert "already holds a prune run (prune_state.json); pass --resume" in line
    assert files(tmp_path) == before


@pytest.mark.parametrize("where, message", [
    (lambda t: t / "blocker" / "run", "'{t}/blocker' is a file, not a folder"),
    (lambda t: t / "blocker", "'{t}/blocker' is a file, not a folder"),
    (lambda t: Path(UNWRITABLE) / "run", f"folder '{UNWRITABLE}' is not writable"),
])
def test_prune_unwritable_folder_fails_before_any_work(tmp_path: Path, monkeypatch, where, message) -> None:
    calls = record_calls(monkeypatch, prune_lib, "run_prune")
    (tmp_path / "blocker").write_text("x")
    line = one_error_line(_prune(where(tmp_path)))
    assert message.format(t=tmp_path) in line and calls == []
    assert files(tmp_path) == {"blocker": b"x"}


def test_prune_json_is_checked_before_any_work(tmp_path: Path, monkeypatch) -> None:
    calls = record_calls(monkeypatch, prune_lib, "run_prune")
    (tmp_path / "p.json").write_bytes(b"earlier\n")
    line = one_error_line(_prune(tmp_path / "run", "--json", tmp_path / "p.json"))
    assert "already exists: pass --force" in line and calls == []
    assert files(tmp_path) == {"p.json": b"earlier\n"}


def test_an_input_is_never_an_output_even_with_force(saved: Saved, tmp_path: Path) -> None:  # noqa: F811
    before = files(saved.ckpt.parent)
    for verb in (["entropy", saved.ckpt, "--calib", saved.calib], ["fold", saved.ckpt, "--calib", saved.calib,
                 "-o", tmp_path / "o"]):
        line = one_error_line(run(*verb, "--json", saved.ckpt, "--force"))
        assert line == f"error: output '{saved.ckpt}' is also an input of this command; choose another path"
    assert files(saved.ckpt.parent) == before
    with pytest.raises(OutputError, match="is also an input"):
        check_writable([tmp_path / "a" / ".." / "x.pt"], force=True, inputs=[_touch(tmp_path / "x.pt")])


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path
