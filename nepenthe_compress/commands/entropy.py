"""``entropy``: per-site neuron states and layer entropy of a checkpoint on calibration data."""
from __future__ import annotations

from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from nepenthe_compress.commands.base import Command
from nepenthe_compress.commands.common import (
    Ui,
    batch_option,
    checkpoint_options,
    data_options,
    data_overrides,
    emit_json,
    force_option,
    json_option,
    leaf_option,
    limit_option,
    ui_options,
    user_errors,
)
from nepenthe_compress.commands.fold import calib_need
from nepenthe_compress.io import check_writable

if TYPE_CHECKING:
    from nepenthe_compress.checkpoint import LoadOptions
    from nepenthe_compress.entropy import EntropyReport


def entropy_table(report: EntropyReport, margin: float | None = None) -> Table:
    """One row per site: neuron counts per constant state, mixed neurons, entropy (mean over all
    neurons, and over mixed neurons only as EGP reports it), zero-entropy mark; with a ``margin``,
    also the one-state neurons inside it and the per-element flip bound of the site's observations."""
    from nepenthe_compress.certify import flip_bound, inside_margin
    from nepenthe_compress.plot import site_labels

    caption = (f"zero-entropy sites {len(report.zero_entropy_sites)}/{len(report.sites)}  "
               "(entropy in bits, mean over all neurons and over mixed neurons only, as EGP reports)")
    if margin is not None:
        caption += (f"\ninside margin: one state, but within {margin:g} std of its boundary (fold does not rely on "
                    "it); flip bound: 95% upper bound on the per-element flip probability, n = samples x positions")
    if any(not s.exact for s in report.sites):
        caption += "  (~: linearising this kind is approximate)"
    table = Table(title=f"Neuron states on {report.samples} calibration samples", caption=caption,
                  caption_justify="left")
    table.add_column("site", overflow="fold", min_width=14)
    table.add_column("kind")
    for name in ("neurons", "always\nOFF", "always\nON/LINEAR", "always\nSATURATED", "mixed",
                 "entropy\nall neurons", "entropy\nmixed (EGP)"):
        table.add_column(name, justify="right")
    table.add_column("zero\nentropy", justify="center")
    if margin is not None:
        table.add_column(f"inside\nmargin {margin:g}", justify="right")
        table.add_column("flip bound\n(95%)", justify="right")
    for label, s in zip(site_labels(report.sites), report.sites):
        always = s.always()
        on = always.get("ON", always.get("LINEAR", 0))
        saturated = str(always["SATURATED"]) if "SATURATED" in always else "-"
        evidence = [] if margin is None else [str(int(inside_margin(s, margin).sum())), f"{flip_bound(s.elements):.1e}"]
        table.add_row(escape(label), s.kind + ("" if s.exact else "~"), str(s.neurons), str(always["OFF"]), str(on),
                      saturated, str(s.mixed), f"{s.entropy:.4f}", f"{s.entropy_mixed:.4f}",
                      "[bold green]yes[/]" if s.zero_entropy else "", *evidence,
                      style="bold" if s.zero_entropy else None)
    return table


@click.command("entropy", cls=Command, needs=[calib_need("ckpt")])
@click.argument("ckpt")
@checkpoint_options
@data_options
@limit_option
@batch_option
@json_option
@click.option("--plot", "plot_path", type=click.Path(), default=None,
              help="Write the neuron-state figure here (.png, .svg or .pdf).")
@click.option("--margin", type=click.FloatRange(min=0), default=None, metavar="K",
              help="Show, per site, the one-state neurons whose extreme pre-activation is within K of their "
                   "std from the state boundary (fold relies only on the others; default: fold's 0.5).")
@leaf_option
@force_option
@ui_options
@user_errors
def entropy(ckpt: str, load: LoadOptions, calib: str | None, input_shape: tuple[int, ...] | None,
            normalize: dict | None, channels: int | None, limit: int | None,
            batch_size: int, json_path: str | None, plot_path: str | None, margin: float | None,
            leaf: tuple[str, ...], force: bool, ui: Ui) -> None:
    """Measure, per activation site of CKPT, how many neurons never change state on calibration data.

    A site whose neurons are all always-OFF / always-ON (or LINEAR / SATURATED) has zero entropy: on
    that data it is a linear map that `fold` can remove.
    """
    from nepenthe_compress.plot import plot_format

    if plot_path is not None:
        plot_format(plot_path)  # fail before the work, not after it
    check_writable([json_path, plot_path], force, inputs=[ckpt])
    from nepenthe_compress.certify import DEFAULT_MARGIN
    from nepenthe_compress.checkpoint import load_checkpoint
    from nepenthe_compress.data import iter_batches, resolve_inputs
    from nepenthe_compress.entropy import measure_entropy
    from nepenthe_compress.plot import plot_entropy

    loaded = load_checkpoint(ckpt, **load.as_kwargs())
    ui.notes(loaded.notes, loaded.warnings)
    meta = {**loaded.meta, **data_overrides(input_shape, normalize, channels)}
    data = resolve_inputs(calib, meta, where=ckpt, limit=limit, models=[loaded.model])
    ui.step(f"measuring neuron states on {len(data)} samples")
    report = measure_entropy(loaded.model, list(iter_batches(data.x, batch_size)), progress=ui.bars,
                             leaf_modules=leaf, moments=True)
    margin = DEFAULT_MARGIN if margin is None else margin
    ui.show(entropy_table(report, margin), json_path)
    if linear := loaded.meta.get("linearised_sites"):
        ui.show(Text(f"already linear in the checkpoint (replaced by identity when pruned): {', '.join(linear)}"),
                json_path)
    emit_json(report.to_dict(), json_path)
    if plot_path is not None:
        ui.step(f"drawing {plot_path}")
        written = plot_entropy(report, plot_path, margin)
        ui.show(Text(f"plot written to {written}"), json_path)
