"""``nepenthe-compress export``: checkpoint -> ONNX (and optionally .pt2), with depth and parameters."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.table import Table

from nepenthe_compress.commands.base import Command
from nepenthe_compress.commands.common import (
    Ui,
    channels_option,
    checkpoint_options,
    emit_json,
    force_option,
    input_shape_option,
    json_option,
    output_option,
    ui_options,
    user_errors,
)
from nepenthe_compress.errors import UserError
from nepenthe_compress.io import check_writable

if TYPE_CHECKING:
    from nepenthe_compress.checkpoint import LoadOptions
    from nepenthe_compress.onnx_depth import OnnxSummary


def output_paths(ckpt: str, output: str | None, pt2: bool) -> list[Path]:
    """The ONNX file (-o, default CKPT with suffix .onnx) and, with --pt2, the .pt2 beside it."""
    onnx_path = Path(output) if output else Path(ckpt).with_suffix(".onnx")
    if not pt2:
        return [onnx_path]
    if onnx_path.suffix.lower() == ".pt2":
        raise UserError(f"-o '{onnx_path}' ends in .pt2, the name --pt2 writes beside the ONNX file: "
                        "give the ONNX file's name, e.g. model.onnx")
    return [onnx_path, onnx_path.with_suffix(".pt2")]


def render_summary(paths: list[Path], summary: OnnxSummary) -> Table:
    table = Table(title="exported", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("files", "\n".join(map(str, paths)))
    table.add_row("depth (weighted layers on the longest path)", str(summary.depth))
    table.add_row("weighted layers", ", ".join(f"{k} {v}" for k, v in sorted(summary.weighted.items())))
    table.add_row("parameters", f"{summary.params:,}")
    return table


@click.command("export", cls=Command)
@click.argument("ckpt", type=click.Path(exists=True, dir_okay=False))
@checkpoint_options
@input_shape_option
@channels_option
@output_option("ONNX file to write [default: CKPT with suffix .onnx].", metavar="FILE")
@click.option("--opset", type=click.IntRange(min=7), default=18, show_default=True, help="ONNX opset version.")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True,
              help="Batch size of the example input used for export.")
@click.option("--static-batch", is_flag=True, help="Fix the batch dimension to --batch-size (default: dynamic).")
@click.option("--pt2", is_flag=True, help="Also write a torch.export program (.pt2) next to the ONNX file.")
@json_option
@force_option
@ui_options
@user_errors
def export(ckpt: str, load: LoadOptions, calib: str | None,
           input_shape: tuple[int, ...] | None, channels: int | None, output: str | None, opset: int,
           batch_size: int, static_batch: bool, pt2: bool, json_path: str | None, force: bool, ui: Ui) -> None:
    """Export checkpoint CKPT to ONNX (checked against torch in onnxruntime) and report its depth.

    Refuses up front when an output (the .onnx, the .pt2, --json's file) exists, unless --force. A
    .pt2 keeps a synthetic example input (seeded N(0,1)), never the --calib data.
    """
    paths = output_paths(ckpt, output, pt2)
    check_writable([*paths, json_path], force, inputs=[ckpt])  # before any work
    from nepenthe_compress.checkpoint import load_checkpoint
    from nepenthe_compress.data import RandomInputs, resolve_inputs
    from nepenthe_compress.export import export_onnx, export_pt2
    from nepenthe_compress.io import OutputSet
    from nepenthe_compress.onnx_depth import onnx_summary

    ck = load_checkpoint(ckpt, **load.as_kwargs())
    ui.notes(ck.notes, ck.warnings)
    overrides = {k: v for k, v in (("input_shape", input_shape), ("channels", channels)) if v is not None}
    example = resolve_inputs(calib, {**ck.meta, **overrides}, where=str(ck.path), limit=batch_size,
                             random=RandomInputs.PREFERRED, models=[ck.model]).x
    with OutputSet(force=force) as out:  # both files or neither
        ui.step(f"exporting {paths[0]}")
        staged_onnx = export_onnx(ck.model, example, out.stage(paths[0]), opset=opset, dynamic_batch=not static_batch)
        summary = onnx_summary(staged_onnx)
        if pt2:
            ui.step(f"exporting {paths[1]}")
            export_pt2(ck.model, example, out.stage(paths[1]), dynamic_batch=not static_batch)
    ui.show(render_summary(paths, summary), json_path)
    emit_json({"files": [str(p) for p in paths], "opset": opset, "dynamic_batch": not static_batch,
               **summary.to_dict()}, json_path)
