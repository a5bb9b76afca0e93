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
    checkpoint_options,
    emit_json,
    input_shape_option,
    json_option,
    limit_option,
    out_console,
    report_load,
    user_errors,
)
from nepenthe_compress.data import iter_batches, load_data
from nepenthe_compress.errors import UserError
from nepenthe_compress.export import load_pt2
from nepenthe_compress.verify import Runner, VerifyResult, compare_runners, onnx_runner, torch_runner

RANDOM_SAMPLES = 64
RANDOM_SEED = 0


@dataclass
class Opened:
    runner: Runner
    meta: dict[str, Any] = field(default_factory=dict)   # checkpoint metadata (calib, normalize, input_shape)


def _open_onnx(path: Path, opts: dict[str, Any]) -> Opened:
    return Opened(onnx_runner(path, opts["threads"]))


def _open_pt2(path: Path, opts: dict[str, Any]) -> Opened:
    return Opened(torch_runner(load_pt2(path).module()))


def _open_checkpoint(path: Path, opts: dict[str, Any]) -> Opened:
    ck = load_checkpoint(path, **opts["load"].as_kwargs())
    report_load(ck)
    return Opened(torch_runner(ck.model), ck.meta)   # load_checkpoint returns eval-mode models


OPENERS: dict[str, Callable[[Path, dict[str, Any]], Opened]] = {".onnx": _open_onnx, ".pt2": _open_pt2}


def open_model(path: str, opts: dict[str, Any]) -> Opened:
    """A runner for a .onnx, .pt2 or (any other suffix) checkpoint file."""
    p = Path(path)
    return OPENERS.get(p.suffix.lower(), _open_checkpoint)(p, opts)


def inputs(calib: str | None, metas: list[dict[str, Any]], input_shape: tuple[int, ...] | None,
           limit: int | None) -> tuple[Tensor, str]:
    """(samples, description): --calib (or a checkpoint's own calib) data, else random N(0,1) of the shape."""
    def first(key: str) -> Any:
        return next((m[key] for m in metas if m.get(key) is not None), None)

    shape = input_shape or first("input_shape")
    spec = calib or first("calib")
    if spec:
        return load_data(spec, normalize=first("normalize"), input_shape=shape, limit=limit).x, spec
    if shape:
        gen = torch.Generator().manual_seed(RANDOM_SEED)
        return torch.randn((limit or RANDOM_SAMPLES, *shape), generator=gen), "random N(0,1)"
    raise UserError("no input data: pass --calib SRC (or --input-shape C,H,W for random inputs)")


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
@click.option("--tol", type=click.FloatRange(min=0), default=1e-5, show_default=True,
              help="Largest accepted max|diff| / max|ref|.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="onnxruntime threads.")
@json_option
@user_errors
def verify(reference: str, candidate: str, load: LoadOptions, calib: str | None,
           limit: int | None, batch_size: int, input_shape: tuple[int, ...] | None,
           tol: float, threads: int, json_path: str | None) -> None:
    """Check that CANDIDATE computes the same outputs as REFERENCE (each a checkpoint, .onnx or .pt2).

    Exits non-zero when max|diff| / max|ref| exceeds --tol.
    """
    opts = {"load": load, "threads": threads}
    ref, cand = open_model(reference, opts), open_model(candidate, opts)
    x, data = inputs(calib, [ref.meta, cand.meta], input_shape, limit)
    result = compare_runners(ref.runner, cand.runner, iter_batches(x, batch_size), tol)
    out_console(json_path).print(render_result(reference, candidate, data, result))
    emit_json({"reference": reference, "candidate": candidate, "inputs": data, **result.to_dict()}, json_path)
    if not result.passed:
        raise UserError(f"not equivalent: max |diff| / max |ref| = {result.max_rel:.3g} > tol {tol:g}")
