"""The ``nepenthe-compress`` command line: a thin layer over the library."""
from __future__ import annotations

import atexit
import importlib
import os
import sys
from typing import NoReturn

import click

from nepenthe_compress import __version__
from nepenthe_compress.commands.base import Group

# verb -> ("module:attribute" of its click command, one-line help). Commands are imported only when
# run or asked for their own --help, so the top-level --help never imports torch; command modules
# import nothing heavy either, so usage errors (missing inputs) come at once.
VERBS: dict[str, tuple[str, str]] = {
    "bench": ("nepenthe_compress.commands.bench:bench",
              "Median onnxruntime latency of ONNX models, interleaved, with speedups."),
    "entropy": ("nepenthe_compress.commands.entropy:entropy",
                "Per-site neuron states and layer entropy of a checkpoint on data."),
    "export": ("nepenthe_compress.commands.export:export",
               "Export a checkpoint to ONNX (checked in onnxruntime) and report its depth."),
    "fold": ("nepenthe_compress.commands.fold:fold",
             "Fold a pruned checkpoint into a shallower ONNX model and prove it equivalent."),
    "prune": ("nepenthe_compress.commands.prune:prune",
              "Prune a network round by round (NEPENTHE/EGP, IMP, EASIER)."),
    "verify": ("nepenthe_compress.commands.verify:verify",
               "Check that two models (checkpoint, .onnx, .pt2) compute the same outputs."),
}


class LazyGroup(Group):
    """The verbs of ``VERBS``, each imported only when it runs or shows its own --help."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(VERBS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in VERBS:
            return None
        module, attr = VERBS[name][0].split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, VERBS[name][1]) for name in self.list_commands(ctx)])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nepenthe-compress")
def main() -> None:
    """Fold zero-entropy rectifier layers of pruned networks into shallower ONNX models."""


def run() -> NoReturn:
    """The console entry point: ``main``, then an exit that skips the interpreter's teardown (0.7 s
    once torch is loaded, measured on torch 2.14). Exit handlers still run (temporary folders are
    removed) and the output streams are flushed first."""
    try:
        main()
        code: object = 0
    except SystemExit as e:
        code = e.code
    if not isinstance(code, int):   # sys.exit("message") / sys.exit(None), as the interpreter does it
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe: nothing more can be written anyway
            pass
    os._exit(code)
