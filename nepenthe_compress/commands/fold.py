"""`nepenthe-compress fold`: linearise zero-entropy sites, merge, drop dead channels, export, prove."""
from __future__ import annotations

import click
from rich.table import Table

from nepenthe_compress.commands.common import (
    batch_option,
    checkpoint_options,
    console,
    data_options,
    data_overrides,
    emit_json,
    force_option,
    json_option,
    leaf_option,
    limit_option,
    out_console,
    print_notes,
    user_errors,
)
from nepenthe_compress.io import check_writable


@click.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@checkpoint_options
@data_options
@click.option("-o", "--outdir", type=click.Path(), default=None,
              help="Output folder (default: the checkpoint's folder).")
@click.option("--merge", type=click.Choice(["auto", "all", "none"]), default="auto", show_default=True,
              help="auto: merge where the cost model predicts a speed-up; all: every exact merge "
                   "(maximum depth reduction); none: linearise, fold BN, drop dead channels only.")
@click.option("--allow-inexact", is_flag=True,
              help="Also merge padded KxK -> padded KxK convs (border-inexact; the error is measured and reported).")
@click.option("--approximate", is_flag=True,
              help="Also linearise zero-entropy GELU/SiLU/Hardswish/ELU sites (approximate; error reported).")
@click.option("--keep-channels", is_flag=True, help="Do not drop dead / constant channels.")
@click.option("--channel-align", type=click.IntRange(min=1), default=8, show_default=True, metavar="N",
              help="Keep channel counts left by drops multiples of N (onnxruntime's fast conv kernels "
                   "need input channels in multiples of 4); 1 drops every constant channel.")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2, show_default=True,
              help="Fraction of the data held out to check that the recorded states generalise.")
@limit_option
@batch_option
@click.option("--bench/--no-bench", default=True, show_default=True, help="Measure onnxruntime latency before/after.")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True, help="Latency repeats (median).")
@click.option("--pt2/--no-pt2", default=True, show_default=True, help="Also save the folded torch.export program.")
@leaf_option
@json_option
@force_option
@user_errors
def fold(checkpoint, load, calib, input_shape, normalize, channels, outdir, merge, allow_inexact, approximate,
         keep_channels, channel_align, holdout, limit, batch_size, bench, repeats, pt2, leaf, json_path,
         force) -> None:
    """Fold a pruned CHECKPOINT into a shallower ONNX model and prove it equivalent.

    Writes OUTDIR/<stem>.folded.onnx, <stem>.onnx, <stem>.report.json and <stem>.folded.pt2, all or
    nothing; refuses up front when one of them (or --json's file) exists, unless --force.
    """
    from nepenthe_compress.fold.graph import FoldOptions
    from nepenthe_compress.fold.pipeline import FoldRequest, fold_checkpoint

    check_writable([json_path], force, inputs=[checkpoint])  # the outputs in OUTDIR are checked by fold_checkpoint, first thing
    req = FoldRequest(checkpoint, load, calib, outdir,
                      FoldOptions(merge, allow_inexact, approximate, not keep_channels, channel_align), holdout, limit,
                      batch_size, bench, repeats, pt2, leaf,
                      data_overrides(input_shape, normalize, channels), progress=console.is_terminal,
                      force=force)
    with console.status("folding...") if console.is_terminal else _null():
        result = fold_checkpoint(req)
    print_notes(result.checkpoint_notes, result.checkpoint_warnings)
    render(result, out_console(json_path))
    emit_json(result.to_dict(), json_path)


def _null():
    import contextlib

    return contextlib.nullcontext()


def render(r, console=console) -> None:
    eq = r.equivalence
    t = Table(title=f"fold {r.checkpoint}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    pre = len(r.sites["linear_in_checkpoint"])
    t.add_row("sites linearised", f"{r.sites['linearised']}/{r.sites['total']}"
              + (f" ({pre} already linear in the checkpoint)" if pre else ""))
    t.add_row("merges", str(sum(e["action"] == "merge" for e in r.events)))
    kept, align = r.channels_kept_for_alignment, r.options["channel_align"]
    t.add_row("channels dropped", f"{r.channels_dropped}" + (f" (+{kept} kept for alignment to {align})" if kept else ""))
    t.add_row("depth (weighted layers)", f"{r.depth['before']} -> {r.depth['after']}")
    t.add_row("parameters", f"{r.params['before']:,} -> {r.params['after']:,}")
    t.add_row("MACs / sample", f"{r.macs['before']:,} -> {r.macs['after']:,}")
    c, h = eq["calibration"], eq["heldout"]
    t.add_row("calibration", f"max rel err {c['max_rel']:.2e} ({_held_to(eq['tolerance'])}), "
              f"top-1 agreement {_pct(c['top1_agreement'])} ({c['samples']} samples)")
    t.add_row("held-out", f"max rel err {h['max_rel']:.2e}, top-1 agreement {_pct(h['top1_agreement'])}, "
              f"state flips {eq['heldout_state_flips']['fraction']:.2%}")
    t.add_row("onnxruntime vs torch", ", ".join(f"batch {o['batch']}: {o['max_rel']:.2e}" for o in eq["onnx_vs_torch"])
              + f" (tolerance {eq['onnx_tolerance']:.2g})")
    if r.latency:
        for row in r.latency["rows"]:
            if row["model"] == "folded":
                t.add_row(f"latency batch {row['batch']}",
                          f"{row['median_s'] * 1e3:.3f} ms ({row['speedup']:.2f}x vs original)")
    for k, v in r.outputs.items():
        t.add_row(k, v)
    console.print(t)
    skipped = [e for e in r.events if e["action"] == "skip"]
    for e in r.events:
        if e["action"] in ("linearise", "constant", "merge", "drop"):
            console.print(f"  [green]{e['action']:9}[/] {e['where']}: {e['detail']}", soft_wrap=True)
    for e in skipped:
        console.print(f"  [yellow]skip     [/] {e['where']}: {e['detail']}", soft_wrap=True)


def _held_to(tolerance: float | None) -> str:
    return "inexact: not held to a tolerance" if tolerance is None else f"tolerance {tolerance:.2g}"


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.2%}"
