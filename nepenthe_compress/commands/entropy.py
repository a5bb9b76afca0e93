"""``entropy``: per-site neuron states and layer entropy of a checkpoint on calibration data."""
from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from nepenthe_compress.checkpoint import LoadOptions, load_checkpoint
from nepenthe_compress.commands.common import (
    batch_option,
    checkpoint_options,
    data_options,
    data_overrides,
    emit_json,
    force_option,
    json_option,
    leaf_option,
    limit_option,
    out_console,
    report_load,
    user_errors,
)
from nepenthe_compress.data import iter_batches, load_checkpoint_data
from nepenthe_compress.entropy import EntropyReport, measure_entropy
from nepenthe_compress.fit import check_fit
from nepenthe_compress.io import check_writable
from nepenthe_compress.plot import plot_entropy, plot_format, site_labels


def entropy_table(report: EntropyReport) -> Table:
    """One row per site: neuron counts per constant state, mixed neurons, entropy (mean over all
    neurons, and over mixed neurons only as EGP reports it), zero-entropy mark."""
    caption = (f"zero-entropy sites {len(report.zero_entropy_sites)}/{len(report.sites)}  "
               "(entropy in bits, mean over all neurons and over mixed neurons only, as EGP reports)")
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
    for label, s in zip(site_labels(report.sites), report.sites):
        always = s.always()
        on = always.get("ON", always.get("LINEAR", 0))
        saturated = str(always["SATURATED"]) if "SATURATED" in always else "-"
        table.add_row(label, s.kind + ("" if s.exact else "~"), str(s.neurons), str(always["OFF"]), str(on),
                      saturated, str(s.mixed), f"{s.entropy:.4f}", f"{s.entropy_mixed:.4f}",
                      "[bold green]yes[/]" if s.zero_entropy else "",
                      style="bold" if s.zero_entropy else None)
    return table


@click.command("entropy")
@click.argument("ckpt")
@checkpoint_options
@data_options
@limit_option
@batch_option
@json_option
@click.option("--plot", "plot_path", type=click.Path(), default=None,
              help="Write the neuron-state figure here (.png, .svg or .pdf).")
@leaf_option
@force_option
@user_errors
def entropy(ckpt: str, load: LoadOptions, calib: str | None, input_shape: tuple[int, ...] | None,
            normalize: dict | None, channels: int | None, limit: int | None,
            batch_size: int, json_path: str | None, plot_path: str | None,
            leaf: tuple[str, ...], force: bool) -> None:
    """Measure, per activation site of CKPT, how many neurons never change state on calibration data.

    A site whose neurons are all always-OFF / always-ON (or LINEAR / SATURATED) has zero entropy: on
    that data it is a linear map that `fold` can remove.
    """
    if plot_path is not None:
        plot_format(plot_path)  # fail before the work, not after it
    check_writable([json_path, plot_path], force, inputs=[ckpt])
    loaded = load_checkpoint(ckpt, **load.as_kwargs())
    report_load(loaded)
    meta = {**loaded.meta, **data_overrides(input_shape, normalize, channels)}
    data = load_checkpoint_data(meta, calib, where=ckpt, limit=limit)
    check_fit(loaded.model, tuple(data.x.shape))
    report = measure_entropy(loaded.model, list(iter_batches(data.x, batch_size)), progress=True,
                             leaf_modules=leaf)
    out = out_console(json_path)
    table = entropy_table(report)
    if not out.is_terminal:  # a file or pipe gets the table's natural width, not 80 columns
        out = Console(file=out.file, width=out.measure(table, options=out.options.update_width(500)).maximum)
    out.print(table)
    if linear := loaded.meta.get("linearised_sites"):
        out.print(f"already linear in the checkpoint (replaced by identity when pruned): {', '.join(linear)}")
    emit_json(report.to_dict(), json_path)
    if plot_path is not None:
        out.print(f"plot written to {plot_entropy(report, plot_path)}")
