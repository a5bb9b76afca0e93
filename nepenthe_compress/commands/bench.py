"""``nepenthe-compress bench``: side-by-side onnxruntime latency of ONNX models."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.table import Table

from nepenthe_compress.commands.base import Command
from nepenthe_compress.commands.common import (
    Ui,
    emit_json,
    force_option,
    input_shape_option,
    provider_option,
    json_option,
    ui_options,
    user_errors,
)
from nepenthe_compress.io import check_writable
from nepenthe_compress.signature import MAX_THREADS

if TYPE_CHECKING:
    from nepenthe_compress.bench import LatencyTable


def display_names(paths: tuple[str, ...]) -> dict[str, str]:
    """name -> path: file names when they are unique, else the paths as given."""
    names = [Path(p).name for p in paths]
    return dict(zip(names, paths, strict=True)) if len(set(names)) == len(set(paths)) else {p: p for p in paths}


def render_latency(table: LatencyTable) -> Table:
    """One row per model and batch; model names are never cut (a narrow terminal wraps them)."""
    out = Table(title=f"onnxruntime CPU latency, {table.threads} thread(s), median of {table.repeats}, "
                      f"input (batch, {', '.join(map(str, table.input_shape))})")
    for col in ("model", "batch", "median ms", "IQR ms", f"speedup vs {table.baseline}"):
        out.add_column(col, justify="left" if col == "model" else "right",
                       overflow="fold" if col == "model" else "ellipsis")
    for r in table.rows:
        out.add_row(escape(r.model), str(r.batch), f"{r.median_s * 1e3:.3f}", f"{r.iqr_s * 1e3:.3f}", f"{r.speedup:.2f}x")
    return out


@click.command("bench", cls=Command)
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--batch", "batches", type=click.IntRange(min=1), multiple=True, default=(1, 32), show_default=True,
              help="Batch size to measure (repeatable).")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=2, show_default=True,
              help="onnxruntime intra-op threads.")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed runs per model and batch.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed runs first.")
@provider_option
@input_shape_option
@json_option
@force_option
@ui_options
@user_errors
def bench(models: tuple[str, ...], batches: tuple[int, ...], threads: int, repeats: int, warmup: int, provider: str,
          input_shape: tuple[int, ...] | None, json_path: str | None, force: bool, ui: Ui) -> None:
    """Median latency of MODEL.onnx files measured side by side (interleaved), with speedups vs the first."""
    check_writable([json_path], force, inputs=models)
    from nepenthe_compress.bench import compare_latency

    table = compare_latency(display_names(models), input_shape, batches, threads, warmup, repeats,
                            provider=provider)
    ui.show(render_latency(table), json_path)
    emit_json(table.to_dict(), json_path)
