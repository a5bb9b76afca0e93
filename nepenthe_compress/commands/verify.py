"""``nepenthe-compress verify``: output equivalence of two models (checkpoint, .onnx or .pt2) on data."""
from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich.table import Table

from nepenthe_compress.commands.base import Command
from nepenthe_compress.commands.common import (
    Ui,
    batch_option,
    channels_option,
    checkpoint_options,
    emit_json,
    force_option,
    input_shape_option,
    json_option,
    limit_option,
    ui_options,
    user_errors,
)
from nepenthe_compress.errors import UserError
from nepenthe_compress.io import check_writable
from nepenthe_compress.signature import MAX_THREADS

if TYPE_CHECKING:
    from nepenthe_compress.checkpoint import LoadOptions
    from nepenthe_compress.verify import VerifyResult


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


@click.command("verify", cls=Command)
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
@ui_options
@user_errors
def verify(reference: str, candidate: str, load: LoadOptions, calib: str | None,
           limit: int | None, batch_size: int, input_shape: tuple[int, ...] | None, channels: int | None,
           tol: float, threads: int, json_path: str | None, force: bool, ui: Ui) -> None:
    """Check that CANDIDATE computes the same outputs as REFERENCE (each a checkpoint, .onnx or .pt2;
    a .pt2 holds code, so it needs --trust-pickle).

    Exits 1 when max|diff| / max|ref| exceeds --tol. With --json, the verdict ("passed": true or
    false, with the error figures) is written whenever the comparison ran, also when it exits 1;
    nothing is written when the comparison could not run (unreadable model, inputs or outputs that
    do not match, no data).
    """
    check_writable([json_path], force, inputs=[reference, candidate])
    from nepenthe_compress.data import RANDOM_INPUTS, RandomInputs, iter_batches, resolve_inputs
    from nepenthe_compress.fit import check_fit
    from nepenthe_compress.verify import compare_runners
    from nepenthe_compress.workflow.models import (
        OpenOptions,
        check_data,
        check_pair,
        declared_shape,
        merged_meta,
        open_model,
    )

    opts = OpenOptions(load, threads)
    models = []
    for path in (reference, candidate):
        models.append(open_model(path, opts))
        ui.notes(models[-1].notes, models[-1].warnings)
    check_pair(*models)
    overrides = {k: v for k, v in (("input_shape", input_shape), ("channels", channels)) if v is not None}
    data = resolve_inputs(calib, {**merged_meta(models), **overrides}, where=reference, limit=limit,
                          random=RandomInputs.FALLBACK, declared_shape=declared_shape(models))
    check_data(models, data.x, batch_size)
    for model in (m.model for m in models if m.model is not None):
        check_fit(model, tuple(data.x.shape), random=data.spec == RANDOM_INPUTS)
    result = compare_runners(models[0].runner, models[1].runner, iter_batches(data.x, batch_size), tol,
                             names=(f"'{reference}'", f"'{candidate}'"))
    ui.show(render_result(reference, candidate, data.spec, result), json_path)
    emit_json({"reference": reference, "candidate": candidate, "inputs": data.spec, **result.to_dict()}, json_path)
    if not result.passed:
        raise UserError(f"not equivalent: max |diff| / max |ref| = {result.max_rel:.3g} > tol {tol:g}")
