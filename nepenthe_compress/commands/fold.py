"""`nepenthe-compress fold`: linearise zero-entropy sites, merge, drop dead channels, export, prove."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from nepenthe_compress.commands.base import Command, Need
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
    output_option,
    provider_option,
    ui_options,
    user_errors,
)
from nepenthe_compress.io import check_writable
from nepenthe_compress.signature import MAX_THREADS

if TYPE_CHECKING:
    from nepenthe_compress.certify import Certification
    from nepenthe_compress.workflow.report import FoldReport


def calib_need(argument: str) -> Need:
    """With no checkpoint argument, nothing names calibration data: --calib is missing too."""
    return Need("--calib SRC (unless the checkpoint names its calibration data)",
                lambda given: not {argument, "calib"} & given)


@click.command(cls=Command, needs=[calib_need("checkpoint")])
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@checkpoint_options
@data_options
@output_option("Output folder [default: the checkpoint's folder].", "--outdir", metavar="DIR")
@click.option("--merge", type=click.Choice(["auto", "all", "none"]), default="auto", show_default=True,
              help="auto: merge where the cost model predicts a speed-up; all: every exact merge "
                   "(maximum depth reduction; a padded KxK -> padded KxK pair merges exactly with a border "
                   "correction); none: linearise, fold BN, drop dead channels only.")
@click.option("--cost", type=click.Choice(["measured", "flops"]), default="measured", show_default=True,
              help="How --merge auto prices a merge: measured (each candidate layer timed on --provider at "
                   "--batch sizes, cached on disk) or flops (MACs + memory, deterministic).")
@click.option("--allow-inexact", is_flag=True,
              help="Also merge runs of three or more padded KxK convs without border correction "
                   "(border-inexact; the error is measured and reported).")
@click.option("--approximate", is_flag=True,
              help="Also linearise zero-entropy GELU/SiLU/Hardswish/ELU sites (approximate; error reported).")
@click.option("--keep-channels", is_flag=True, help="Do not drop dead / constant channels.")
@click.option("--channel-align", type=click.IntRange(min=1), default=8, show_default=True, metavar="N",
              help="Keep channel counts left by drops multiples of N (onnxruntime's fast conv kernels "
                   "need input channels in multiples of 4); 1 drops every constant channel.")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2, show_default=True,
              help="Fraction of the data held out to check that the recorded states generalise.")
@click.option("--margin", type=click.FloatRange(min=0), default=None, metavar="K",
              help="Rely on a neuron's recorded state only when its extreme pre-activation clears the state's "
                   "boundary by K times that neuron's std (default 0.5); neurons inside it stay non-linear.")
@click.option("--max-flip-rate", type=click.FloatRange(0, 1), default=0.0, metavar="R",
              help="Neurons relied on that flip on the held-out split are excluded from the fold, unless they "
                   "are at most this fraction of them (then they are kept and the held-out error decides).")
@click.option("--holdout-tolerance", type=click.FloatRange(min=0), default=None, metavar="T",
              help="Largest accepted held-out max|diff| / max|ref| (default: the calibration tolerance; with "
                   "--allow-inexact / --approximate, only measured).")
@limit_option
@batch_option
@click.option("--bench/--no-bench", default=True, show_default=True,
              help="The speed guard: time the fold and its simpler variants against the original in onnxruntime "
                   "and write the fastest that is not slower (--no-bench skips it).")
@click.option("--batch", "batches", type=click.IntRange(min=1), multiple=True, default=(1, 32), show_default=True,
              help="Batch size the guard times (repeatable).")
@click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=2, show_default=True,
              help="onnxruntime intra-op threads the guard times with.")
@provider_option
@click.option("--require-speedup", type=click.FloatRange(min=0, min_open=True), default=None, metavar="X",
              help="Fail (non-zero exit, nothing written) unless the written model is at least X times faster "
                   "than the original at every --batch.")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True, help="Latency repeats (median).")
@click.option("--pt2/--no-pt2", default=False, show_default=True,
              help="Also save the folded torch.export program (torch.export takes about 3 s more).")
@leaf_option
@json_option
@force_option
@ui_options
@user_errors
def fold(checkpoint: str, load, calib: str | None, input_shape, normalize, channels, output: str | None, merge: str,
         cost: str, allow_inexact: bool, approximate: bool, keep_channels: bool, channel_align: int, holdout: float,
         margin: float | None, max_flip_rate: float, holdout_tolerance: float | None, limit: int | None,
         batch_size: int, bench: bool, batches: tuple[int, ...], threads: int, provider: str,
         require_speedup: float | None, repeats: int, pt2: bool, leaf: tuple[str, ...], json_path: str | None,
         force: bool, ui: Ui) -> None:
    """Fold a pruned CHECKPOINT into a shallower ONNX model and prove it equivalent.

    Writes DIR/<stem>.folded.onnx, <stem>.onnx, <stem>.report.json (and <stem>.folded.pt2 with --pt2;
    DIR: -o, default the checkpoint's folder), all or nothing; refuses up front when one of them (or --json's
    file) exists, unless --force.
    """
    from nepenthe_compress.workflow.outputs import output_paths, stem_of

    if require_speedup is not None and not bench:
        raise click.UsageError("--require-speedup needs the speed guard: drop --no-bench")
    outdir = Path(output) if output else Path(checkpoint).parent
    check_writable([*output_paths(outdir, stem_of(checkpoint), pt2).values(), json_path], force,
                   inputs=[checkpoint])  # before any work
    with ui.working("loading the checkpoint"):
        from nepenthe_compress.checkpoint import load_checkpoint
        from nepenthe_compress.fold.graph import FoldOptions
        from nepenthe_compress.runtime import Runtime, provider_chain
        from nepenthe_compress.workflow.fold import FoldSettings
        from nepenthe_compress.workflow.fold import fold as fold_loaded

        if bench or cost == "measured":
            provider_chain(provider)   # before any work
        ck = load_checkpoint(checkpoint, **load.as_kwargs())
        settings = FoldSettings(FoldOptions(merge, allow_inexact, approximate, not keep_channels, channel_align),
                                holdout, batch_size, bench, repeats, pt2, leaf, bench_batches=tuple(sorted(set(batches))),
                                runtime=Runtime(provider, threads), require_speedup=require_speedup, cost=cost,
                                max_flip_rate=max_flip_rate, holdout_tolerance=holdout_tolerance,
                                **({} if margin is None else {"margin": margin}))
        result = fold_loaded(ck, calib, settings, data_overrides=data_overrides(input_shape, normalize, channels),
                             limit=limit, progress=ui.step)
        ui.step(f"writing {outdir}")
        result.save(outdir, force=force)
    ui.notes(result.report.checkpoint_notes, result.report.checkpoint_warnings)
    for part in render(result.report):
        ui.show(part, json_path)
    emit_json(result.report.to_dict(), json_path)


def render(r: FoldReport) -> list[Table | Text]:
    """The summary table, then one line per linearise / constant / merge / drop event and per skip."""
    from nepenthe_compress.workflow.report import EventAction

    eq = r.equivalence
    t = Table(title=escape(f"fold {r.checkpoint or 'model'}"), show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    pre = len(r.sites.linear_in_checkpoint)
    t.add_row("sites linearised", f"{r.sites.linearised}/{r.sites.total}"
              + (f" ({pre} already linear in the checkpoint)" if pre else ""))
    t.add_row("merges", str(r.count(EventAction.MERGE)))
    kept, align = r.channels_kept_for_alignment, r.options.channel_align
    t.add_row("channels dropped", f"{r.channels_dropped}" + (f" (+{kept} kept for alignment to {align})" if kept else ""))
    t.add_row("depth (weighted layers)", f"{r.depth.before} -> {r.depth.after}")
    removed = r.layers_removed
    t.add_row("layers removed", f"{removed.removed}/{removed.of} (linear sites, as the papers count); "
              f"ONNX depth -{removed.depth}")
    t.add_row("parameters", f"{r.params.before:,} -> {r.params.after:,}")
    t.add_row("MACs / sample", f"{r.macs.before:,} -> {r.macs.after:,}")
    c, h = eq.calibration, eq.heldout
    t.add_row("data", escape(f"{r.calibration.source}: {r.calibration.part}"))
    t.add_row("calibration", f"max rel err {c.max_rel:.2e} ({_held_to(eq.tolerance)}), "
              f"top-1 agreement {_pct(c.top1_agreement)} ({c.samples} samples)")
    held_to = "" if h.tol is None else f" (tolerance {h.tol:.2g})"
    t.add_row("held-out", f"max rel err {h.max_rel:.2e}{held_to}, top-1 agreement "
              f"{_pct(h.top1_agreement)} ({h.samples} samples), state flips {eq.heldout_state_flips.fraction:.2%}")
    if r.certification:
        t.add_row("certified states", certified_line(r.certification))
    t.add_row("onnxruntime vs torch", ", ".join(f"batch {o.batch}: {o.max_rel:.2e}" for o in eq.onnx_vs_torch)
              + f" (tolerance {eq.onnx_tolerance:.2g})")
    for row in r.latency.rows if r.latency else ():
        if row.model == "folded":
            t.add_row(f"latency batch {row.batch}", f"{row.median_s * 1e3:.3f} ms ({row.speedup:.2f}x vs original)")
    if r.planner and r.planner.cost == "measured" and r.planner.layers_timed + r.planner.layers_cached:
        t.add_row("planner", f"measured: {r.planner.layers_timed} layer(s) timed, "
                             f"{r.planner.layers_cached} priced from the cache")
    if r.guard:
        t.add_row("speed guard", escape(f"wrote {r.guard.chosen}: {r.guard.reason}"))
    for kind, path in r.outputs.items():
        t.add_row(kind, escape(path))
    shown = (EventAction.LINEARISE, EventAction.CONSTANT, EventAction.MERGE, EventAction.DROP)
    lines = [Text.from_markup(f"  [green]{e.action.value:9}[/] {escape(e.where)}: {escape(e.detail)}")
             for e in r.events if e.action in shown]
    lines += [Text.from_markup(f"  [yellow]skip     [/] {escape(e.where)}: {escape(e.detail)}")
              for e in r.events if e.action is EventAction.SKIP]
    return [t, *([guard_table(r)] if r.guard else []), *evidence(r), *lines]


def certified_line(c: Certification) -> str:
    """The headline: what the fold relies on and the whole-model bound."""
    flips = (f"{c.flipped} flipped on held-out data " + ("(excluded)" if c.excluded else "(kept: --max-flip-rate)")
             if c.flipped else "none flipped on held-out data")
    bound = (f"P(a new input flips a relied-on state) < {c.input_bound:.2g} (95%, no flip in {c.samples} inputs)"
             if c.input_bound is not None else "no bound: flipped neurons kept")
    return (f"{c.relied - (c.flipped if c.excluded else 0)} neurons relied on (margin {c.margin:g} std; "
            f"{c.inside_margin} inside it), {flips}; {bound}")


def evidence(r: FoldReport) -> list[Table]:
    """The evidence table, when the fold relies on a recorded state or one flipped."""
    c = r.certification
    return [evidence_table(r)] if c is not None and any(s.relied or s.flipped for s in c.sites) else []


def evidence_table(r: FoldReport) -> Table:
    """Per site the fold relies on: neurons, observations, smallest margin, per-element flip bound."""
    c = r.certification
    assert c is not None
    linearised = set(r.sites.linearised_by_fold)
    t = Table(title="evidence per site (flip bound: 95% upper bound on the per-element flip probability, "
                    "given no flip in n observations)", title_justify="left")
    for col in ("site", "linearised", "neurons relied on", "n (samples x positions)", "min margin (std)",
                "inside margin", "flipped (held-out)", "flip bound"):
        t.add_column(col, justify="left" if col == "site" else "right")
    for s in c.sites:
        if s.relied or s.flipped:
            margin = "inf" if s.min_margin == float("inf") else f"{s.min_margin:.2f}"
            t.add_row(escape(s.target), "yes" if s.name in linearised else "", str(s.relied), f"{s.observations:,}",
                      margin, str(s.inside_margin), str(s.flipped), f"{s.flip_bound:.2g}")
    return t


def guard_table(r: FoldReport) -> Table:
    """Every timed variant: original / variant latency per batch size beside the MAC ratio (the limit)."""
    g = r.guard
    assert g is not None
    batches = sorted({b for v in g.variants for b in v.speedups})
    t = Table(title=f"speed guard ({g.provider}, {g.threads} threads; ratio = original / variant, "
                    "> 1 is faster)", title_justify="left")
    for col in ("variant", *(f"batch {b}" for b in batches), "MAC ratio", "depth"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for v in g.variants:
        mark = " (written)" if v.name == g.chosen else f" (= {v.same_as})" if v.same_as else ""
        t.add_row(escape(v.name + mark), *(f"{v.speedups[b]:.2f}x" + (" slower" if b in v.slower_at else "")
                                            for b in batches), f"{v.mac_ratio:.2f}x", str(v.depth))
    return t


def _held_to(tolerance: float | None) -> str:
    return "inexact: not held to a tolerance" if tolerance is None else f"tolerance {tolerance:.2g}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2%}"
