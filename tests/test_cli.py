"""The command group: every verb is reachable, and the top-level --help never imports torch."""
from __future__ import annotations

import subprocess
import sys

import click
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


def test_unknown_verb_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["folds"])
    assert result.exit_code == 2 and "No such command 'folds'" in result.output
