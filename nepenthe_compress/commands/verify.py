"""``nepenthe-compress verify``: output equivalence of two models (checkpoint, .onnx or .pt2) on data."""
from __future__ import annotations

from pathlib import Path
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
    from nepenthe_compress.certify import SiteCheck
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


def sites_table(report: str, checks: list[SiteCheck]) -> Table:
    """Per site the fold relied on: neurons and elements that flipped on the data, largest error."""
    table = Table(title=f"states relied on by the fold ({report}) on this data")
    for col in ("site", "neurons relied on", "n (samples x positions)", "neurons flipped", "elements flipped",
                "max |act - linear map|"):
        table.add_column(col, justify="left" if col == "site" else "right")
    for c in checks:
        style = "red" if c.flipped else None
        table.add_row(c.target, str(c.relied), f"{c.observations:,}", str(c.flipped),
                      f"{c.flipped_elements} ({c.element_flip_rate:.2e})", f"{c.max_abs_error:.3g}", style=style)
    return table


def fold_report_of(candidate: str) -> Path | None:
    """``<stem>.report.json`` beside a ``<stem>.folded.onnx`` / ``.folded.pt2`` written by ``fold``, if there."""
    from nepenthe_compress.workflow.outputs import OUTPUT_FILES

    name = Path(candidate).name
    for kind in ("onnx", "pt2"):
        suffix = OUTPUT_FILES[kind].format(stem="")
        if name.endswith(suffix) and len(name) > len(suffix):
            report = Path(candidate).with_name(OUTPUT_FILES["report"].format(stem=name[: -len(suffix)]))
            return report if report.is_file() else None
    return None


MAX_REPORT_BYTES = 64 << 20


def _relied(report: Path, original: object, reference: str) -> dict[str, list[int]]:
    """The per-site states a fold report says its fold relied on (``UserError`` when unusable)."""
    import json

    from nepenthe_compress.certify import relied_states

    if original is None:
        raise UserError(f"--report: the states a fold relied on are checked through the original model; "
                        f"REFERENCE must be the checkpoint that was folded, not '{reference}'")
    try:
        if report.stat().st_size > MAX_REPORT_BYTES:
            raise UserError(f"fold report '{report}' is over {MAX_REPORT_BYTES >> 20} MiB")
        data = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read fold report '{report}': {e}") from e
    return relied_states(data, str(report))


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
@click.option("--report", "report_path", type=click.Path(exists=True, dir_okay=False), default=None, metavar="JSON",
              help="A fold report: also check, per site, the neuron states the fold relied on (REFERENCE must "
                   "be the original checkpoint) [default: <stem>.report.json beside a <stem>.folded.onnx CANDIDATE].")
@json_option
@force_option
@ui_options
@user_errors
def verify(reference: str, candidate: str, load: LoadOptions, calib: str | None,
           limit: int | None, batch_size: int, input_shape: tuple[int, ...] | None, channels: int | None,
           tol: float, threads: int, report_path: str | None, json_path: str | None, force: bool, ui: Ui) -> None:
    """Check that CANDIDATE computes the same outputs as REFERENCE (each a checkpoint, .onnx or .pt2;
    a .pt2 holds code, so it needs --trust-pickle).

    With REFERENCE the original checkpoint and CANDIDATE a folded model, the states the fold relied on
    (its report: --report, or the one `fold` wrote beside CANDIDATE) are checked per site on the same
    data: neurons and elements that flipped, and the largest error the linear maps make there.

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
    fold_report = Path(report_path) if report_path else fold_report_of(candidate) if models[0].model is not None else None
    relied = None if fold_report is None else _relied(fold_report, models[0].model, reference)
    overrides = {k: v for k, v in (("input_shape", input_shape), ("channels", channels)) if v is not None}
    data = resolve_inputs(calib, {**merged_meta(models), **overrides}, where=reference, limit=limit,
                          random=RandomInputs.FALLBACK, declared_shape=declared_shape(models))
    check_data(models, data.x, batch_size)
    for model in (m.model for m in models if m.model is not None):
        check_fit(model, tuple(data.x.shape), random=data.spec == RANDOM_INPUTS)
    result = compare_runners(models[0].runner, models[1].runner, iter_batches(data.x, batch_size), tol,
                             names=(f"'{reference}'", f"'{candidate}'"))
    checks = None
    if relied is not None:
        from nepenthe_compress.verify import verify_sites

        ui.step(f"checking the states relied on at {len(relied)} site(s)")
        checks = verify_sites(models[0].model, iter_batches(data.x, batch_size), relied)
    ui.show(render_result(reference, candidate, data.spec, result), json_path)
    sites = {}
    if checks is not None:
        ui.show(sites_table(str(fold_report), checks), json_path)
        sites = {"fold_report": str(fold_report), "sites": [c.to_dict() for c in checks]}
    emit_json({"reference": reference, "candidate": candidate, "inputs": data.spec, **result.to_dict(), **sites},
              json_path)
    if not result.passed:
        raise UserError(f"not equivalent: max |diff| / max |ref| = {result.max_rel:.3g} > tol {tol:g}")
