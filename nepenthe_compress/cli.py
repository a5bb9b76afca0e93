"""The ``nepenthe-compress`` command line: a thin layer over the library."""
from __future__ import annotations

import importlib

import click

from nepenthe_compress import __version__

# verb -> "module:attribute" of its click command (imported lazily so --help stays fast)
VERBS: dict[str, str] = {
    "entropy": "nepenthe_compress.commands.entropy:entropy",
    "fold": "nepenthe_compress.commands.fold:fold",
    "export": "nepenthe_compress.commands.export:export",
    "verify": "nepenthe_compress.commands.verify:verify",
    "bench": "nepenthe_compress.commands.bench:bench",
    "prune": "nepenthe_compress.commands.prune:prune",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(VERBS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in VERBS:
            return None
        module, attr = VERBS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nepenthe-compress")
def main() -> None:
    """Fold zero-entropy rectifier layers of pruned networks into shallower ONNX models."""
