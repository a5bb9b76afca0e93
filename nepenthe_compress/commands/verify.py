"""``nepenthe-compress verify``: output equivalence of two models (checkpoint, .onnx or .pt2) on data."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch
from rich.table import Table
from torch import Tensor

from nepenthe_compress.checkpoint import LoadOptions, load_checkpoint
from nepenthe_compress.commands.common import (
    batch_option,
    channels_option,
    checkpoint_options,
    emit_json,
    force_option,
    input_shape_option,
    json_option,
    limit_option,
    out_console,
    report_load,
    user_errors,
)
from nepenthe_compress.data import iter_batches, load_data, meta_input_shape
from nepenthe_compress.errors import UserError
from nepenthe_compress.export import load_pt2
from nepenthe_compress.fit import check_fit
from nepenthe_compress.io import check_writable
from nepenthe_compress.signature import (
    Signature,
    check_input,
    check_input_bytes,
    check_same_input,
    check_same_outputs,
    onnx_signature,
    program_signature,
)
from nepenthe_compress.verify import (
    MAX_THREADS,
    Runner,
    VerifyResult,
    compare_runners,
    error_line,
    ort_session,
    session_runner,
    torch_runner,
)

RANDOM_SAMPLES = 64
RANDOM_INPUTS = "random N(0,1)"
RANDOM_SEED = 0


@dataclass
class Opened:
    runner: Runner
    signature: Signature                                   # what the file declares about its tensors
    meta: dict[str, Any] = field(default_factory=dict)    # checkpoint metadata (calib, normalize, input_shape)
    model: torch.nn.Module | None = None                   # a checkpoint's model (its first layer is checked)


def _open_onnx(path: Path, opts: dict[str, Any]) -> Opened:
    session = ort_session(path, opts["threads"])
    return Opened(session_runner(session, path), onnx_signature(session, str(path)))


def _open_pt2(path: Path, opts: dict[str, Any]) -> Opened:
    if not opts["load"].trust_pickle:
        raise UserError(f"'{path}' is a torch.export program, and loading one runs code stored in the file: "
                        "pass --trust-pickle if you trust it, or verify the .onnx instead")
    program = load_pt2(path)
    try:
        module = program.module()
    except Exception as e:  # a damaged graph fails when it is turned back into a module
        raise UserError(f"cannot rebuild the module of '{path}': {error_line(e)}") from e
    return Opened(torch_runner(module, str(path)), program_signature(program, str(path)))


def _open_checkpoint(path: Path, opts: dict[str, Any]) -> Opened:
    ck = load_checkpoint(path, **opts["load"].as_kwargs())
    report_load(ck)
    shape = meta_input_shape(ck.meta, str(path))
    declared = None if shape is None else {"input": ("N", *shape)}
    # load_checkpoint returns eval-mode models
    return Opened(torch_runner(ck.model, str(path)), Signature(str(path), declared, None), ck.meta, ck.model)


OPENERS: dict[str, Callable[[Path, dict[str, Any]], Opened]] = {".onnx": _open_onnx, ".pt2": _open_pt2}


def open_model(path: str, opts: dict[str, Any]) -> Opened:
    """A runner for a .onnx, .pt2 or (any other suffix) checkpoint file."""
    p = Path(path)
    return OPENERS.get(p.suffix.lower(), _open_checkpoint)(p, opts)


def inputs(calib: str | None, models: list[Opened], input_shape: tuple[int, ...] | None,
           limit: int | None, channels: int | None = None) -> tuple[Tensor, str]:
    """(samples, description): --calib (or a checkpoint's own calib) data, else random N(0,1) of
    --input-shape, a checkpoint's recorded shape or a model file's declared one."""
    def first(key: str) -> Any:
        return next((m.meta[key] for m in models if m.meta.get(key) is not None), None)

    shape = input_shape or first("input_shape")
    spec = calib or first("calib")
    if spec:
        return load_data(spec, normalize=first("normalize"), input_shape=shape, limit=limit, channels=channels).x, spec
    shape = shape or next((s for m in models if (s := m.signature.sample_shape())), None)
    if shape:
        size = (limit or RANDOM_SAMPLES, *shape)
        check_input_bytes(size, 4, "random input")
        return torch.randn(size, generator=torch.Generator().manual_seed(RANDOM_SEED)), RANDOM_INPUTS
    raise UserError("no input data: pass --calib SRC (or --input-shape C,H,W for random inputs)")


def check_pair(ref: Opened, cand: Opened) -> None:
    """Refuse two models whose declared inputs or outputs differ."""
    check_same_input(ref.signature, cand.signature)
    check_same_outputs(ref.signature, cand.signature)


def check_data(models: list[Opened], x: Tensor, batch_size: int) -> None:
    """Refuse, before anything runs, models whose declared input does not fit batches of ``x``."""
    sizes = sorted({len(b) for b in iter_batches(x, batch_size)})
    for model in models:
        check_input(model.signature, tuple(x.shape[1:]), sizes, "the data")


def render_result(reference: str, candidate: str, data: str, result: VerifyResult) -> Table:
    table = Table(title=f"{candidate} vs {reference}", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("inputs", data)
    table.add_row("samples", str(result.samples))
    table.add_row("max |diff|", f"{result.max_abs:.3g}")
    table.add_row("max |diff| / max |ref|", f"{result.max_rel:.3g}")
    table.add_row("tolerance", f"{result.tol:g}")
    table.add_row("top-1 agreement", "n/a" if result.top1_agreement is None else f"{result.top1_agreement:.2%}")
    table.add_row("verdict", "[green]equivalent[/]" if result.passed else "[red]NOT equivalent[/]")
    return table


@click.command("verify")
@click.argument("reference", type=click.Path(exists=True, dir_okay=False))
@click.argument("candidate", type=click.Path(exists=True, dir_okay=False))
@checkpoint_options
@limit_option
@batch_option
@input_shape_option
@channels_option
@click.option("--tol", type=click.FloatRange(min=0), default=1e-5, show_default=True,
              help="Largest accepted max|diff| / max|ref|.")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=2, show_default=True,
              help="onnxruntime threads.")
@json_option
@force_option
@user_errors
def verify(reference: str, candidate: str, load: LoadOptions, calib: str | None,
           limit: int | None, batch_size: int, input_shape: tuple[int, ...] | None, channels: int | None,
           tol: float, threads: int, json_path: str | None, force: bool) -> None:
    """Check that CANDIDATE computes the same outputs as REFERENCE (each a checkpoint, .onnx or .pt2;
    a .pt2 holds code, so it needs --trust-pickle).

    Exits 1 when max|diff| / max|ref| exceeds --tol. With --json, the verdict ("passed": true or
    false, with the error figures) is written whenever the comparison ran, also when it exits 1;
    nothing is written when the comparison could not run (unreadable model, inputs or outputs that
    do not match, no data).
    """
    check_writable([json_path], force, inputs=[reference, candidate])
    opts = {"load": load, "threads": threads}
    ref, cand = open_model(reference, opts), open_model(candidate, opts)
    check_pair(ref, cand)
    x, data = inputs(calib, [ref, cand], input_shape, limit, channels)
    check_data([ref, cand], x, batch_size)
    for model in (m.model for m in (ref, cand) if m.model is not None):
        check_fit(model, tuple(x.shape), random=data == RANDOM_INPUTS)
    result = compare_runners(ref.runner, cand.runner, iter_batches(x, batch_size), tol,
                             names=(f"'{reference}'", f"'{candidate}'"))
    out_console(json_path).print(render_result(reference, candidate, data, result))
    emit_json({"reference": reference, "candidate": candidate, "inputs": data, **result.to_dict()}, json_path)
    if not result.passed:
        raise UserError(f"not equivalent: max |diff| / max |ref| = {result.max_rel:.3g} > tol {tol:g}")
