"""The command group: every verb is reachable, the top-level --help never imports torch, and the
conventions every verb follows (errors, missing inputs, -o/--output, --quiet/--verbose, NO_COLOR)."""
from __future__ import annotations

import re
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from nepenthe_compress.cli import VERBS, main


def test_every_verb_resolves_to_its_command() -> None:
    ctx = click.Context(main)
    for name in VERBS:
        cmd = main.get_command(ctx, name)
        assert isinstance(cmd, click.Command) and cmd.name == name


def test_help_lists_every_verb_without_importing_torch() -> None:
    code = ("import sys\nfrom nepenthe_compress.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip().endswith("NO TORCH")
    for name in VERBS:
        assert f"  {name} " in out


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verbs_help_imports_neither_torch_nor_onnxruntime(verb: str) -> None:
    code = ("import sys\nfrom nepenthe_compress.cli import main\n"
            f"try:\n    main([{verb!r}, '--help'])\nexcept SystemExit:\n    pass\n"
            "print('heavy' if {'torch', 'onnxruntime'} & set(sys.modules) else 'light')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip().endswith("light") and "Usage:" in out


def test_the_light_prune_catalog_names_what_prune_implements() -> None:
    from nepenthe_compress.prune import METHODS
    from nepenthe_compress.prune.catalog import METHOD_SUMMARIES, SCHEDULE_NAMES
    from nepenthe_compress.prune.train import SCHEDULES

    assert list(METHODS) == list(METHOD_SUMMARIES) and set(SCHEDULES) == set(SCHEDULE_NAMES)
    assert all(METHODS[n].summary == s for n, s in METHOD_SUMMARIES.items())


# ---- conventions: one-line errors, missing inputs at once, -o/--output, --quiet/--verbose, colour -------

PROG = "nepenthe-compress"


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


@pytest.mark.parametrize("args, message", [
    (["folds"], "No such command 'folds' (see 'nepenthe-compress --help')"),
    (["fold", "--merge", "most", "a.pt"], "Invalid value for '--merge': 'most' is not one of 'auto', 'all', "
                                          "'none' (see 'nepenthe-compress fold --help')"),
    (["fold", "a.pt", "-q", "-v"], "--quiet and --verbose exclude each other (see 'nepenthe-compress fold --help')"),
    (["bench", "no-such.onnx"], "Invalid value for 'MODELS...': File 'no-such.onnx' does not exist "
                                "(see 'nepenthe-compress bench --help')"),
], ids=["unknown-verb", "bad-choice", "quiet-and-verbose", "missing-file"])
def test_usage_errors_are_one_error_line(args: list[str], message: str) -> None:
    res = CliRunner().invoke(main, args, prog_name=PROG)
    assert (res.exit_code, res.stdout, res.stderr) == (2, "", f"error: {message}\n")


def test_missing_inputs_are_named_at_once_before_any_heavy_import() -> None:
    cases = [["fold"], ["entropy", "--limit", "5"], ["prune"], ["prune", "--init", "x.pt"],
             ["prune", "--data", "mnist"], ["verify", "a.onnx"], ["bench"], ["export"]]
    code = ("import sys\nfrom nepenthe_compress.cli import main\n"
            f"for args in {cases!r}:\n"
            f"    try:\n        main(args, prog_name={PROG!r})\n    except SystemExit as e:\n        print(e.code)\n"
            "print('heavy' if {'torch', 'onnxruntime'} & set(sys.modules) else 'light')")
    out = python(code)
    assert out.stdout.split() == ["2"] * len(cases) + ["light"], out.stderr
    calib = "--calib SRC (unless the checkpoint names its calibration data)"
    assert out.stderr.splitlines() == [
        f"error: missing CHECKPOINT and {calib} (see '{PROG} fold --help')",
        f"error: missing CKPT and {calib} (see '{PROG} entropy --help')",
        f"error: missing --data SRC and --arch NAME (or --init CKPT) (see '{PROG} prune --help')",
        f"error: missing --data SRC (see '{PROG} prune --help')",
        f"error: missing --arch NAME (or --init CKPT) (see '{PROG} prune --help')",
        f"error: missing CANDIDATE (see '{PROG} verify --help')",
        f"error: missing MODELS (see '{PROG} bench --help')",
        f"error: missing CKPT (see '{PROG} export --help')",
    ]


def test_output_is_o_everywhere_and_old_names_still_work(tmp_path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder is needed\n")
    (tmp_path / "m.pt").write_bytes(b"")
    expected = f"'{blocker}' is a file, not a folder\n"
    for verb, old in (("fold", "--outdir"), ("prune", "--out")):
        help_text = CliRunner().invoke(main, [verb, "--help"]).stdout
        assert "-o, --output DIR" in help_text and not re.search(rf"{old}(?![\w-])", help_text)
        extra = ["--data", "mnist", "--arch", "cifar_resnet18", "--rounds", "1"] if verb == "prune" \
            else [str(tmp_path / "m.pt")]
        for name in ("-o", "--output", old):
            res = CliRunner().invoke(main, [verb, *extra, name, str(blocker / "out")])
            assert res.exit_code == 1 and res.stderr.startswith("error: "), (verb, name, res.output)
            assert res.stderr.endswith(expected) and res.stderr.count("\n") == 1, (verb, name, res.output)
    assert "-o, --output FILE" in CliRunner().invoke(main, ["export", "--help"]).stdout


@pytest.fixture()
def tiny_onnx(tmp_path):
    import torch

    from nepenthe_compress.export import export_onnx

    torch.manual_seed(0)
    return export_onnx(torch.nn.Linear(4, 3).eval(), torch.randn(2, 4), tmp_path / "tiny.onnx")


def test_quiet_prints_nothing_verbose_and_default_print_the_table(tiny_onnx) -> None:
    args = ["bench", str(tiny_onnx), "--batch", "1", "--repeats", "1", "--warmup", "0"]
    quiet = CliRunner().invoke(main, [*args, "--quiet"])
    assert (quiet.exit_code, quiet.stdout, quiet.stderr) == (0, "", "")
    for extra in ([], ["--verbose"]):
        res = CliRunner().invoke(main, [*args, *extra])
        assert res.exit_code == 0 and "tiny.onnx" in res.stdout and "speedup vs tiny.onnx" in res.stdout


def test_bench_shows_full_model_names(tiny_onnx) -> None:
    """Names that only differ at their end must not be cut to the same text (a file gets the table at
    its natural width)."""
    long = [tiny_onnx.with_name(f"resnet18_nepenthe_pruned_to_93_75_percent_sparsity_{v}.onnx") for v in ("a", "b")]
    for path in long:
        path.write_bytes(tiny_onnx.read_bytes())
    res = CliRunner().invoke(main, ["bench", *map(str, long), "--batch", "1", "--repeats", "1", "--warmup", "0"])
    assert res.exit_code == 0, res.output
    rows = [ln for ln in res.stdout.splitlines() if "sparsity_" in ln and "speedup" not in ln]
    assert [next(p.name for p in long if p.name in row) for row in rows] == [p.name for p in long]


COLOUR = re.compile(r"\x1b\[[0-9;]*(3[0-8]|9[0-7])m")   # an SGR sequence setting a foreground colour


def test_no_color_is_respected(tmp_path) -> None:
    (tmp_path / "blocker").write_text("x")
    (tmp_path / "m.onnx").write_bytes(b"")
    code = ("from nepenthe_compress.cli import main\n"
            f"main(['bench', {str(tmp_path / 'm.onnx')!r}, '--json', {str(tmp_path / 'blocker' / 'b.json')!r}])")
    coloured = python(code, FORCE_COLOR="1")
    plain = python(code, FORCE_COLOR="1", NO_COLOR="1")
    assert coloured.returncode == plain.returncode == 1
    assert COLOUR.search(coloured.stderr) and "error:" in coloured.stderr
    assert not COLOUR.search(plain.stderr) and "is a file, not a folder" in plain.stderr
