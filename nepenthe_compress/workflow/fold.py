"""``fold`` end to end: measure, fold, check, export, bench, report; then save, all or nothing.

``fold_model`` runs everything up to the report and keeps the exported files in a private temporary
folder; ``FoldResult.save`` copies them (with the report) to their final names in one commit. The
CLI and the Python API both go through these two steps.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from nepenthe_compress.bench import LatencyTable, compare_latency
from nepenthe_compress.certify import DEFAULT_MARGIN, certify
from nepenthe_compress.cache import cached_export
from nepenthe_compress.checkpoint import LoadedCheckpoint
from nepenthe_compress.data import Dataset, Samples, iter_batches, resolve_inputs, split, training_split, untrained_part
from nepenthe_compress.entropy import measure_entropy
from nepenthe_compress.errors import FoldError, UserError
from nepenthe_compress.export import export_onnx, export_pt2
from nepenthe_compress.fold.core import FoldedGraph, fold_graph
from nepenthe_compress.fold.cost import AnalyticCost, CostModel
from nepenthe_compress.fold.graph import FoldOptions
from nepenthe_compress.fold.measured import MeasuredCost
from nepenthe_compress.fold.metrics import count_macs
from nepenthe_compress.guard import GuardDecision
from nepenthe_compress.io import OutputSet, check_writable, json_default
from nepenthe_compress.onnx_depth import onnx_depth, onnx_param_count
from nepenthe_compress.runtime import Runtime
from nepenthe_compress.trace import trace_model
from nepenthe_compress.workflow.checks import CHECKS, Check, CheckContext, Stage, run_checks, tolerance
from nepenthe_compress.workflow.outputs import output_paths, stem_of
from nepenthe_compress.workflow.report import (
    BeforeAfter,
    CalibrationData,
    CheckOutcome,
    Equivalence,
    Event,
    FoldReport,
    Planner,
    SiteCounts,
)
from nepenthe_compress.workflow.variants import GuardReport, VariantFigures, decide, variants_to_time

COST_MODELS = ("measured", "flops")
Progress = Callable[[str], None]   # told each step as it starts ("measuring 4000 samples", ...)


def _silent(step: str) -> None:
    pass


@dataclass(frozen=True)
class FoldSettings:
    """How to fold and what to check and measure (the CLI's options, the API's keyword arguments)."""

    options: FoldOptions = FoldOptions()
    holdout: float = 0.2            # fraction of the data held out to test that the states generalise
    batch_size: int = 64
    bench: bool = False             # the speed guard: time the variants against the original, choose
    bench_repeats: int = 20
    pt2: bool = False               # also export the folded model as a torch.export program
    leaf_modules: tuple[str, ...] = ()
    checks: tuple[Check, ...] = CHECKS
    bench_batches: tuple[int, ...] = (1, 32)
    runtime: Runtime = Runtime()    # where the guard times (provider, threads)
    require_speedup: float | None = None   # the written model must be this many times faster (needs bench)
    cost: str = "measured"          # the planner's cost model: measured on ``runtime`` (cached) or flops
    margin: float = DEFAULT_MARGIN  # a state is relied on only if it clears its boundary by this many stds
    max_flip_rate: float = 0.0      # held-out flips kept in the plan when at most this share of the relied-on neurons
    holdout_tolerance: float | None = None   # held-out max rel error allowed (None: the calibration tolerance)

    def __post_init__(self) -> None:
        if self.margin < 0 or not 0 <= self.max_flip_rate <= 1 or (self.holdout_tolerance or 0) < 0:
            raise ValueError("margin and holdout_tolerance must be >= 0 and max_flip_rate in [0, 1]")
        if self.require_speedup is not None and not self.bench:
            raise ValueError("require_speedup needs the speed guard (bench=True)")
        if self.cost not in COST_MODELS:
            raise ValueError(f"cost must be one of {', '.join(COST_MODELS)}, not {self.cost!r}")

    def cost_model(self) -> CostModel:
        return MeasuredCost(self.runtime, self.bench_batches) if self.cost == "measured" else AnalyticCost()


@dataclass(frozen=True)
class Provenance:
    """Where the model came from (a checkpoint, or memory) and what loading it said."""

    checkpoint: str | None = None
    arch: str | None = None
    linear_in_checkpoint: tuple[str, ...] = ()     # sites the saver replaced by identity
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @classmethod
    def of(cls, ck: LoadedCheckpoint) -> Provenance:
        linear = ck.meta.get("linearised_sites") or []
        return cls(str(ck.path), ck.arch, tuple(linear), tuple(ck.notes), tuple(ck.warnings))


@dataclass
class FoldResult:
    """A folded model, its report and its exported files (in a private temporary folder until saved)."""

    model: nn.Module
    report: FoldReport
    stem: str                                     # default file stem of ``save``
    files: dict[str, Path] = field(repr=False)   # kind -> exported file (onnx, original_onnx, pt2)
    _workdir: tempfile.TemporaryDirectory = field(repr=False)

    def save(self, outdir: str | os.PathLike, *, stem: str | None = None, force: bool = False) -> dict[str, Path]:
        """Write ``<stem>.folded.onnx``, ``<stem>.onnx``, ``<stem>.report.json`` (and ``<stem>.folded.pt2``)
        into ``outdir``, all or nothing; existing files are refused unless ``force``. Returns the paths."""
        paths = output_paths(outdir, stem or self.stem, "pt2" in self.files)
        check_writable(paths.values(), force)
        report = replace(self.report, outputs={k: str(p) for k, p in paths.items()})
        with OutputSet(force=force) as out:
            for kind, src in self.files.items():
                shutil.copyfile(src, out.stage(paths[kind]))
            out.stage(paths["report"]).write_text(report_json(report))
        self.report = report
        return paths


def report_json(report: FoldReport) -> str:
    return json.dumps(report.to_dict(), indent=2, default=json_default) + "\n"


def fold(source: nn.Module | LoadedCheckpoint, calib: Samples | None = None, settings: FoldSettings = FoldSettings(),
         *, data_overrides: Mapping | None = None, limit: int | None = None,
         progress: Progress = _silent) -> FoldResult:
    """Resolve the data (``calib``, else the checkpoint's own), check it fits, then ``fold_model``.
    ``data_overrides`` (input_shape, normalize, channels) replace what the checkpoint records."""
    if isinstance(source, LoadedCheckpoint):
        model, meta, origin = source.model, source.meta, Provenance.of(source)
    else:
        model, meta, origin = source, {}, Provenance()
    recorded = calib is None and training_split(meta) is not None
    data = resolve_inputs(calib, {**meta, **(data_overrides or {})}, where=origin.checkpoint or "the model",
                          limit=None if recorded else limit, models=[model])
    if recorded:
        data = untrained_part(data, meta, limit)
    return fold_model(model, data, settings, origin, progress)


@dataclass
class _Built:
    """One folded variant: the model, its exported ONNX file and its checks' outcomes."""

    folded: FoldedGraph
    onnx: Path
    outcomes: list[CheckOutcome]
    macs: int       # per sample
    depth: int      # of the ONNX file


def fold_model(model: nn.Module, data: Dataset, settings: FoldSettings = FoldSettings(),
               origin: Provenance = Provenance(), progress: Progress = _silent) -> FoldResult:
    """Measure neuron states on the calibration split of ``data``, fold, check (``FoldError`` when a
    fatal check fails), export to a temporary folder, check the export; with ``settings.bench`` time
    the plan and its simpler variants against the original and keep the fastest (``variants``); report."""
    calib, held = split(data, settings.holdout)
    model = model.eval()
    progress(f"measuring neuron states on {len(calib)} samples")
    states = measure_entropy(model, list(iter_batches(calib.x, settings.batch_size)),
                             leaf_modules=settings.leaf_modules, moments=True)
    held_states = measure_entropy(model, list(iter_batches(held.x, settings.batch_size)),
                                  leaf_modules=settings.leaf_modules)
    cert = certify(states, held_states, settings.margin, settings.max_flip_rate)
    example = calib.x[:2]
    tol, noise = tolerance(model, calib.x)
    exact = not (settings.options.allow_inexact or settings.options.approximate)
    ctx = CheckContext(model, model, calib.x, held.x, cert.states, exact, tol, settings.batch_size, settings.leaf_modules,
                       heldout_states=held_states, certification=cert,
                       heldout_tolerance=tol if settings.holdout_tolerance is None and exact else settings.holdout_tolerance)
    workdir = tempfile.TemporaryDirectory(prefix="nepenthe-fold-")
    try:
        folder = Path(workdir.name)
        options = variants_to_time(settings.options) if settings.bench else {"planned": settings.options}
        cost = settings.cost_model()
        built, same_as = _fold_variants(model, cert.states, example, options, settings, ctx, cost, folder, progress)
        if isinstance(cost, MeasuredCost):
            cost.cache.save()
        original_onnx = folder / "original.onnx"
        progress("exporting the original to ONNX")
        cached_export(trace_model(model, settings.leaf_modules), example, original_onnx)
        original_macs = count_macs(model, example)
        chosen, guard, latency = next(iter(built)), None, None
        if settings.bench:
            chosen, guard, latency = _time_and_choose(built, same_as, original_onnx, original_macs, settings, ctx,
                                                      progress)
        result = built[chosen]
        files = {"onnx": result.onnx, "original_onnx": original_onnx}
        if settings.pt2:
            progress("exporting .pt2")
            files["pt2"] = export_pt2(result.folded.model, example, folder / "model.folded.pt2")
        folded = result.folded
        report = FoldReport(
            checkpoint=origin.checkpoint, arch=origin.arch, options=options[chosen],
            calibration=CalibrationData(data.spec, len(calib), len(held), list(calib.x.shape[1:]), data.part),
            sites=SiteCounts(folded.sites_total + len(origin.linear_in_checkpoint), list(folded.linearised),
                             list(origin.linear_in_checkpoint), len(states.zero_entropy_sites)),
            events=[Event.of(e) for e in folded.events],
            channels_dropped=folded.channels_dropped,
            channels_kept_for_alignment=folded.channels_kept_for_alignment,
            depth=BeforeAfter(onnx_depth(original_onnx), result.depth),
            params=BeforeAfter(onnx_param_count(original_onnx), onnx_param_count(files["onnx"])),
            macs=BeforeAfter(original_macs, result.macs),
            equivalence=Equivalence(exact, tol if exact else None, tol, noise, result.outcomes),
            latency=latency, guard=guard, planner=Planner.of(cost), entropy=states, certification=cert,
            checkpoint_notes=list(origin.notes), checkpoint_warnings=[*origin.warnings, *_vacuous(ctx)])
    except BaseException:
        workdir.cleanup()
        raise
    stem = stem_of(origin.checkpoint) if origin.checkpoint else "model"
    return FoldResult(folded.model, report, stem, files, workdir)


def _vacuous(ctx: CheckContext) -> list[str]:
    if not ctx.reference_is_zero():
        return []
    return ["the original's outputs are all 0 on the data: the equivalence checks compare zeros and prove "
            "nothing about the fold (check the model's weights and the data)"]


def _fold_variants(model: nn.Module, states, example, options: dict[str, FoldOptions], settings: FoldSettings,
                   ctx: CheckContext, cost: CostModel, folder: Path,
                   progress: Progress) -> tuple[dict[str, _Built], dict[str, str]]:
    """Fold, check and export each variant (the planned one first: it must pass every check, a
    fallback only the fatal ones, else it is no candidate); a variant folding to the same model as an
    earlier one is recorded as its twin instead."""
    built: dict[str, _Built] = {}
    same_as: dict[str, str] = {}
    for i, (name, opts) in enumerate(options.items()):
        progress(f"folding ({name})" if settings.bench else "folding")
        folded = fold_graph(model, states, example, opts, settings.leaf_modules, cost)
        twin = next((n for n, b in built.items() if same_model(b.folded.model, folded.model)), None)
        if twin is not None:
            same_as[name] = twin
            continue
        checks = settings.checks if i == 0 else tuple(c for c in settings.checks if c.fatal)
        try:
            built[name] = _build(folded, example, replace(ctx), checks, folder / f"v{i}", progress if i == 0 else _silent)
        except UserError:
            if i == 0:
                raise
    return built, same_as


def _time_and_choose(built: dict[str, _Built], same_as: dict[str, str], original_onnx: Path, original_macs: int,
                     settings: FoldSettings, ctx: CheckContext,
                     progress: Progress) -> tuple[str, GuardReport, LatencyTable]:
    """The speed guard: time every built variant against the original, choose (``FoldError`` when no
    variant may be written), run every check on a chosen fallback."""
    progress(f"timing {len(built)} variant(s) against the original in onnxruntime ({settings.runtime.provider})")
    models = {"original": original_onnx, **{n: b.onnx for n, b in built.items()}}

    def time_all(repeats: int) -> LatencyTable:
        return compare_latency(models, tuple(ctx.calib.shape[1:]), settings.bench_batches, settings.runtime.threads,
                               repeats=repeats, provider=settings.runtime.provider)

    planned = next(iter(built))
    latency = time_all(settings.bench_repeats)
    decision = _decide(latency, built, planned, settings)
    if decision.chosen != planned:   # a fallback or a failure is decided by a second, longer run
        progress(f"timing again with twice the repeats before deciding ({decision.reason})")
        latency = time_all(2 * settings.bench_repeats)
        decision = _decide(latency, built, planned, settings)
    guard = _guard(decision, built, same_as, original_macs, planned, settings)
    if guard.chosen != planned:   # a fallback passed the fatal checks; run the others on it too
        progress(f"checking the fallback ({guard.chosen})")
        fallback = built[guard.chosen]
        full = replace(ctx, folded=fallback.folded.model, onnx_path=fallback.onnx)
        rest = tuple(c for c in settings.checks if not c.fatal)
        order = {c.name: i for i, c in enumerate(settings.checks)}
        outcomes = [*fallback.outcomes, *run_checks(rest, full, Stage.FOLDED), *run_checks(rest, full, Stage.EXPORTED)]
        built[guard.chosen] = replace(fallback, outcomes=sorted(outcomes, key=lambda o: order[o.name]))
    return guard.chosen, guard, _rename(latency, guard.chosen)


def _build(folded: FoldedGraph, example, ctx: CheckContext, checks: tuple[Check, ...],
           folder: Path, progress: Progress) -> _Built:
    """Run ``checks`` on the folded torch model, export it to ``folder``, check the export."""
    ctx.folded = folded.model
    progress(f"checking the folded model on {len(ctx.calib)} + {len(ctx.heldout)} samples")
    outcomes = run_checks(checks, ctx, Stage.FOLDED)
    folder.mkdir()
    progress("exporting ONNX")
    ctx.onnx_path = export_onnx(folded.model, example, folder / "model.folded.onnx")
    progress("checking the ONNX model in onnxruntime")
    outcomes += run_checks(checks, ctx, Stage.EXPORTED)
    return _Built(folded, ctx.onnx_path, outcomes, count_macs(folded.model, example), onnx_depth(ctx.onnx_path))


def same_model(a: nn.Module, b: nn.Module) -> bool:
    """Whether two folded GraphModules compute the same thing: same code, same tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    return (getattr(a, "code", None) == getattr(b, "code", None) and sa.keys() == sb.keys()
            and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa))


def _decide(latency: LatencyTable, built: dict[str, _Built], planned: str, settings: FoldSettings) -> GuardDecision:
    """The guard's decision on ``latency`` (fallbacks only under ``--merge auto``)."""
    fallback = settings.options.merge == "auto"
    return decide(latency, planned, list(built), settings.require_speedup, fallback)


def _guard(decision: GuardDecision, built: dict[str, _Built], same_as: dict[str, str], original_macs: int,
           planned: str, settings: FoldSettings) -> GuardReport:
    """The report of the guard's ``decision``; ``FoldError`` when no variant may be written."""
    if decision.chosen is None:
        raise FoldError(f"{decision.reason}: nothing written"
                        + ("" if settings.require_speedup else " (--no-bench skips the speed guard)"))
    figures = [VariantFigures(n, decision.speedups[n], decision.slower[n], original_macs / max(b.macs, 1), b.depth)
               for n, b in built.items()]
    figures += [replace(next(f for f in figures if f.name == twin), name=n, same_as=twin) for n, twin in same_as.items()]
    return GuardReport(planned, decision.chosen, decision.reason, settings.runtime.provider, settings.runtime.threads,
                       figures, settings.require_speedup)


def _rename(table: LatencyTable, chosen: str) -> LatencyTable:
    """The latency table with the written variant's rows named ``folded`` (the others keep their names)."""
    rows = [replace(r, model="folded") if r.model == chosen else r for r in table.rows]
    return replace(table, rows=rows)
