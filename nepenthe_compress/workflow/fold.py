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

from torch import nn

from nepenthe_compress.checkpoint import LoadedCheckpoint
from nepenthe_compress.data import Dataset, Samples, iter_batches, resolve_inputs, split
from nepenthe_compress.entropy import measure_entropy
from nepenthe_compress.export import export_onnx, export_pt2
from nepenthe_compress.fold.core import fold_graph
from nepenthe_compress.fold.graph import FoldOptions
from nepenthe_compress.fold.metrics import count_macs
from nepenthe_compress.io import OutputSet, check_writable, json_default
from nepenthe_compress.trace import trace_model
from nepenthe_compress.onnx_depth import onnx_depth, onnx_param_count
from nepenthe_compress.workflow.checks import CHECKS, Check, CheckContext, Stage, run_checks, tolerance
from nepenthe_compress.workflow.outputs import output_paths, stem_of
from nepenthe_compress.workflow.report import (
    BeforeAfter,
    CalibrationData,
    Equivalence,
    Event,
    FoldReport,
    SiteCounts,
)

Progress = Callable[[str], None]   # told each step as it starts ("measuring 4000 samples", ...)


def _silent(step: str) -> None:
    pass


@dataclass(frozen=True)
class FoldSettings:
    """How to fold and what to check and measure (the CLI's options, the API's keyword arguments)."""

    options: FoldOptions = FoldOptions()
    holdout: float = 0.2            # fraction of the data held out to test that the states generalise
    batch_size: int = 64
    bench: bool = False             # time original vs folded in onnxruntime (batch 1 and 32)
    bench_repeats: int = 20
    pt2: bool = True                # also export the folded model as a torch.export program
    leaf_modules: tuple[str, ...] = ()
    checks: tuple[Check, ...] = CHECKS


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
    data = resolve_inputs(calib, {**meta, **(data_overrides or {})}, where=origin.checkpoint or "the model",
                          limit=limit, models=[model])
    return fold_model(model, data, settings, origin, progress)


def fold_model(model: nn.Module, data: Dataset, settings: FoldSettings = FoldSettings(),
               origin: Provenance = Provenance(), progress: Progress = _silent) -> FoldResult:
    """Measure neuron states on the calibration split of ``data``, fold, check (``FoldError`` when a
    fatal check fails), export to a temporary folder, check the export, optionally time it, report."""
    calib, held = split(data, settings.holdout)
    model = model.eval()
    progress(f"measuring neuron states on {len(calib)} samples")
    states = measure_entropy(model, list(iter_batches(calib.x, settings.batch_size)),
                             leaf_modules=settings.leaf_modules)
    example = calib.x[:2]
    progress("folding")
    folded = fold_graph(model, states, example, settings.options, settings.leaf_modules)
    progress(f"checking the folded model on {len(calib)} + {len(held)} samples")
    tol, noise = tolerance(model, calib.x)
    exact = not (settings.options.allow_inexact or settings.options.approximate)
    ctx = CheckContext(model, folded.model, calib.x, held.x, states, exact, tol, settings.batch_size,
                       settings.leaf_modules)
    outcomes = run_checks(settings.checks, ctx, Stage.FOLDED)
    workdir = tempfile.TemporaryDirectory(prefix="nepenthe-fold-")
    try:
        progress("exporting ONNX" + (" and .pt2" if settings.pt2 else ""))
        files = _export(model, folded.model, example, Path(workdir.name), settings.pt2, settings.leaf_modules)
        ctx.onnx_path = files["onnx"]
        progress("checking the ONNX model in onnxruntime")
        outcomes += run_checks(settings.checks, ctx, Stage.EXPORTED)
        latency = None
        if settings.bench:
            progress("timing original and folded models in onnxruntime")
            latency = _latency(files, calib.x, settings.bench_repeats)
        report = FoldReport(
            checkpoint=origin.checkpoint, arch=origin.arch, options=settings.options,
            calibration=CalibrationData(data.spec, len(calib), len(held), list(calib.x.shape[1:])),
            sites=SiteCounts(folded.sites_total + len(origin.linear_in_checkpoint), list(folded.linearised),
                             list(origin.linear_in_checkpoint), len(states.zero_entropy_sites)),
            events=[Event.of(e) for e in folded.events],
            channels_dropped=folded.channels_dropped,
            channels_kept_for_alignment=folded.channels_kept_for_alignment,
            depth=BeforeAfter(onnx_depth(files["original_onnx"]), onnx_depth(files["onnx"])),
            params=BeforeAfter(onnx_param_count(files["original_onnx"]), onnx_param_count(files["onnx"])),
            macs=BeforeAfter(count_macs(model, example), count_macs(folded.model, example)),
            equivalence=Equivalence(exact, tol if exact else None, tol, noise, outcomes),
            latency=latency, entropy=states,
            checkpoint_notes=list(origin.notes), checkpoint_warnings=list(origin.warnings))
    except BaseException:
        workdir.cleanup()
        raise
    stem = stem_of(origin.checkpoint) if origin.checkpoint else "model"
    return FoldResult(folded.model, report, stem, files, workdir)


def _export(original: nn.Module, folded: nn.Module, example, folder: Path, pt2: bool,
            leaf_modules: tuple[str, ...]) -> dict[str, Path]:
    """The folded model and the original (as its fx trace, which the fast TorchScript exporter may
    take: see ``export``) to ONNX, and the folded model to .pt2."""
    names = output_paths(folder, "model", pt2)
    del names["report"]
    export_onnx(folded, example, names["onnx"])
    export_onnx(trace_model(original, leaf_modules), example, names["original_onnx"])
    if pt2:
        export_pt2(folded, example, names["pt2"])
    return names


def _latency(files: dict[str, Path], x, repeats: int):
    from nepenthe_compress.bench import compare_latency

    return compare_latency({"original": files["original_onnx"], "folded": files["onnx"]},
                           tuple(x.shape[1:]), batches=(1, 32), threads=2, repeats=repeats)
