"""The click classes every verb uses (light: click only, so usage errors come before any heavy import).

- errors: one line ``error: ...`` on stderr for click's usage errors too (exit 2);
- ``Command``: every missing required input named in one usage error, before the command runs;
- ``RegistryChoice``: a choice whose values live in a registry imported only when needed.
"""
from __future__ import annotations

import enum
import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import click


def one_line(message: str) -> str:
    """``message`` as one printable line: control characters (newlines in a path, terminal escape
    sequences read from a file) are shown escaped, never sent to the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message.strip())


def usage_line(e: click.ClickException) -> str:
    """``error: <message>`` with where to get help, for a usage error."""
    message = one_line(e.format_message()).rstrip(".")
    ctx = getattr(e, "ctx", None)
    if isinstance(e, click.UsageError) and ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return f"error: {message}"


class OneLineErrors:
    """Mixin for click commands and groups: click's own errors print as one ``error:`` line."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)  # type: ignore[misc]
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)  # type: ignore[misc]
        except click.ClickException as e:
            click.echo(usage_line(e), err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@dataclass(frozen=True)
class Need:
    """An input a verb needs that click cannot express as ``required`` (e.g. one of two options)."""

    label: str                                   # how the error names it: "--arch NAME (or --init CKPT)"
    missing: Callable[[AbstractSet[str]], bool]  # from the names of the parameters given


def _given(values: Mapping[str, Any]) -> set[str]:
    """Names of the parameters a parsed command line gives a value (click marks absent arguments
    with an enum sentinel)."""
    return {name for name, v in values.items() if v is not None and v != () and not isinstance(v, enum.Enum)}


def _label(param: click.Parameter) -> str:
    if isinstance(param, click.Option) and param.metavar:
        return f"{param.opts[-1]} {param.metavar}"
    return param.human_readable_name


def _join(labels: list[str]) -> str:
    return labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} and {labels[-1]}"


class Command(OneLineErrors, click.Command):
    """A verb whose missing inputs (required parameters and ``needs``) are all named at once, in one
    usage error raised before any value is converted or the command runs."""

    def __init__(self, *args: Any, needs: Sequence[Need] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.needs = tuple(needs)

    def missing(self, ctx: click.Context, args: Sequence[str]) -> list[str]:
        if any(a in args for a in ctx.help_option_names):
            return []
        try:
            values, _, _ = self.make_parser(ctx).parse_args(args=list(args))
        except click.UsageError:
            return []  # a malformed command line: click's own error says what is wrong
        given = _given(values)
        labels = [_label(p) for p in self.get_params(ctx) if p.required and p.name not in given]
        return labels + [n.label for n in self.needs if n.missing(given)]

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if labels := self.missing(ctx, args):
            raise click.UsageError(f"missing {_join(labels)}", ctx)
        return super().parse_args(ctx, args)


class Group(OneLineErrors, click.Group):
    """The command group, with one-line usage errors."""


class RegistryChoice(click.Choice):
    """``click.Choice`` over the keys of a registry (``"package.module:NAME"``), imported on first use."""

    def __init__(self, registry: str) -> None:
        self.registry = registry
        self.case_sensitive = True

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        module, name = self.registry.split(":")
        return tuple(getattr(importlib.import_module(module), name))


class RegistryOption(click.Option):
    """An option whose help is written from a registry only when --help is shown."""

    def __init__(self, *args: Any, describe: Callable[[], str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.describe = describe

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        self.help = self.describe()
        return super().get_help_record(ctx)
