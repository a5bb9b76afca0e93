"""``fold`` end to end: load, measure, fold, verify, export, benchmark, report (all-or-nothing)."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import Tensor, nn

from nepenthe_compress.checkpoint import LoadOptions, load_checkpoint
from nepenthe_compress.data import iter_batches, load_checkpoint_data, split
from nepenthe_compress.entropy import EntropyReport, measure_entropy
from nepenthe_compress.errors import FoldError
from nepenthe_compress.export import export_onnx, export_pt2
from nepenthe_compress.fit import check_fit
from nepenthe_compress.fold.core import FoldedGraph, fold_graph
from nepenthe_compress.fold.graph import FoldOptions
from nepenthe_compress.fold.metrics import count_macs
from nepenthe_compress.io import OutputSet, check_writable, json_default
from nepenthe_compress.onnx_depth import onnx_depth, onnx_param_count
from nepenthe_compress.verify import VerifyResult, float32_noise, onnx_matches_torch, verify_equivalence

EXACT_TOL = 1e-5  # max|diff| / max|ref| on data where the recorded states hold (DESIGN 4)
NOISE_FACTOR = 10  # ... or 10x the original's own float32 rounding error, if that is larger


@dataclass
class FoldRequest:
    checkpoint: str
    load: LoadOptions = LoadOptions()
    calib: str | None = None
    outdir: str | None = None
    options: FoldOptions = FoldOptions()
    holdout: float = 0.2
    limit: int | None = None
    batch_size: int = 64
    bench: bool = True
    bench_repeats: int = 20
    pt2: bool = True
    leaf_modules: tuple[str, ...] = ()
    data_overrides: dict = field(default_factory=dict)  # input_shape / normalize / channels over the checkpoint's
    progress: bool = False
    force: bool = False      # replace existing outputs


@dataclass
class FoldResult:
    checkpoint: str
    arch: str | None
    options: dict
    calibration: dict
    sites: dict
    events: list[dict]
    channels_dropped: int
    channels_kept_for_alignment: int
    depth: dict
    params: dict
    macs: dict
    equivalence: dict
    latency: dict | None
    outputs: dict
    entropy: dict
    checkpoint_notes: list[str] = field(default_factory=list)     # what loading changed (upcasts, hooks)
    checkpoint_warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def stem_of(path: str | os.PathLike) -> str:
    name = Path(path).name
    for suffix in (".pt", ".pth", ".ckpt", ".bin"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def output_paths(req: FoldRequest) -> dict[str, Path]:
    """What ``fold`` writes: <stem>.folded.onnx, <stem>.onnx, <stem>.report.json (and .folded.pt2)."""
    outdir = Path(req.outdir) if req.outdir else Path(req.checkpoint).parent
    stem = stem_of(req.checkpoint)
    paths = {"onnx": outdir / f"{stem}.folded.onnx", "original_onnx": outdir / f"{stem}.onnx",
             "report": outdir / f"{stem}.report.json"}
    if req.pt2:
        paths["pt2"] = outdir / f"{stem}.folded.pt2"
    return paths


def state_flips(calib: EntropyReport, held: EntropyReport) -> dict:
    """Neurons that were constant on the calibration part (the fold relies on them) but took
    another state, or several, on the held-out part."""
    held_by = held.by_name()
    relied = flipped = 0
    for s in calib.sites:
        constant = s.constant_neurons
        other = held_by[s.name].neuron_state
        relied += int(constant.sum())
        flipped += int((constant & (other != s.neuron_state)).sum())
    return {"neurons_relied_on": relied, "flipped": flipped,
            "fraction": flipped / relied if relied else 0.0}


def fold_checkpoint(req: FoldRequest) -> FoldResult:
    """Check the outputs can be written, then load, measure, fold, verify (failure: FoldError, nothing
    written), export and report."""
    paths = output_paths(req)
    check_writable(paths.values(), req.force, inputs=[req.checkpoint])   # before any work
    ck = load_checkpoint(req.checkpoint, **req.load.as_kwargs())
    data = load_checkpoint_data({**ck.meta, **req.data_overrides}, req.calib, where=str(ck.path), limit=req.limit)
    check_fit(ck.model, tuple(data.x.shape))  # before any forward pass
    calib, held = split(data, req.holdout)
    model = ck.model.eval()
    pre_linear = list(ck.meta.get("linearised_sites", []))  # replaced by identity when pruned (EASIER)
    report = measure_entropy(model, _batches(calib.x, req), progress=req.progress, leaf_modules=req.leaf_modules)
    example = calib.x[:2]
    folded = fold_graph(model, report, example, req.options, req.leaf_modules)
    equivalence = _equivalence(model, folded, report, calib.x, held.x, req)

    with OutputSet(force=req.force) as out:
        staged = {k: out.stage(p) for k, p in paths.items()}
        export_onnx(folded.model, example, staged["onnx"])
        export_onnx(model, example, staged["original_onnx"])
        if req.pt2:
            export_pt2(folded.model, example, staged["pt2"])
        equivalence["onnx_vs_torch"] = _onnx_checks(folded, staged["onnx"], calib.x, equivalence["onnx_tolerance"])
        result = FoldResult(
            checkpoint=str(ck.path), arch=ck.arch, options=asdict(req.options),
            calibration={"source": data.spec, "samples": len(calib), "heldout": len(held),
                         "input_shape": list(calib.x.shape[1:])},
            sites={"total": folded.sites_total + len(pre_linear),
                   "linearised": len(folded.linearised) + len(pre_linear),
                   "linearised_by_fold": folded.linearised,
                   "linear_in_checkpoint": pre_linear,
                   "zero_entropy": len(report.zero_entropy_sites)},
            events=[e.to_dict() for e in folded.events],
            channels_dropped=folded.channels_dropped,
            channels_kept_for_alignment=folded.channels_kept_for_alignment,
            depth={"before": onnx_depth(staged["original_onnx"]), "after": onnx_depth(staged["onnx"])},
            params={"before": onnx_param_count(staged["original_onnx"]), "after": onnx_param_count(staged["onnx"])},
            macs={"before": count_macs(model, example), "after": count_macs(folded.model, example)},
            equivalence=equivalence,
            latency=_latency(staged, calib.x, req) if req.bench else None,
            outputs={k: str(p) for k, p in paths.items()},
            entropy=report.to_dict(),
            checkpoint_notes=ck.notes, checkpoint_warnings=ck.warnings)
        staged["report"].write_text(json.dumps(result.to_dict(), indent=2, default=json_default) + "\n")
    return result


def _batches(x: Tensor, req: FoldRequest) -> list[Tensor]:
    return list(iter_batches(x, req.batch_size))


def _equivalence(model: nn.Module, folded: FoldedGraph, report: EntropyReport, calib: Tensor, held: Tensor,
                 req: FoldRequest) -> dict:
    """Original vs folded on the calibration and held-out parts; raises FoldError when an exact fold
    differs where the recorded states hold. The tolerance is EXACT_TOL or NOISE_FACTOR x the
    original's own float32 rounding error, whichever is larger. An inexact fold (--allow-inexact,
    --approximate) is measured only: ``tolerance`` is None and its figures carry no pass/fail;
    ``onnx_tolerance`` (onnxruntime vs torch on the same folded model) always holds."""
    noise = float32_noise(model, [calib[:2]])
    tol = max(EXACT_TOL, NOISE_FACTOR * noise)
    exact = not (req.options.allow_inexact or req.options.approximate)
    on_calib = verify_equivalence(model, folded.model, _batches(calib, req), tol=tol)
    if exact and not on_calib.passed:
        raise FoldError(f"folded model differs from the original on the calibration data where the "
                        f"recorded states hold: max rel error {on_calib.max_rel:.3g} > {tol:.3g}")
    on_held = verify_equivalence(model, folded.model, _batches(held, req), tol=tol)
    held_report = measure_entropy(model, _batches(held, req), leaf_modules=req.leaf_modules)
    return {"exact_claimed": exact, "tolerance": tol if exact else None, "onnx_tolerance": tol,
            "original_float32_noise": noise,
            "calibration": _figures(on_calib, exact), "heldout": _figures(on_held, exact),
            "heldout_state_flips": state_flips(report, held_report)}


def _figures(result: VerifyResult, held_to_tolerance: bool) -> dict:
    """A comparison's figures; its tolerance and verdict only when the fold is held to one."""
    d = result.to_dict()
    return d if held_to_tolerance else {k: v for k, v in d.items() if k not in ("passed", "tol")}


def _onnx_checks(folded: FoldedGraph, onnx_path: Path, x: Tensor, tol: float) -> list[dict]:
    """onnxruntime vs the folded torch model at batch 1 and 7; FoldError when they differ."""
    checks = [onnx_matches_torch(folded.model, onnx_path, [x[:n]], tol=tol) for n in sorted({1, min(len(x), 7)})]
    if not all(r.passed for r in checks):
        worst = max(r.max_rel for r in checks)
        raise FoldError(f"onnxruntime output of the folded model differs from torch: max rel error {worst:.3g}")
    return [dict(r.to_dict(), batch=r.samples) for r in checks]


def _latency(staged: dict[str, Path], x: Tensor, req: FoldRequest) -> dict:
    from nepenthe_compress.bench import compare_latency

    table = compare_latency({"original": staged["original_onnx"], "folded": staged["onnx"]},
                            tuple(x.shape[1:]), batches=(1, 32), threads=2, repeats=req.bench_repeats)
    return table.to_dict()
