"""A zoo of torchvision architectures with engineered pruning outcomes: original vs every fold
variant and the whole-model guard's choice, timed side by side on onnxruntime CPU.

Each model has random weights (fixed seeds) and BatchNorm statistics calibrated on its random
calibration batch, so every rectifier is mixed except the engineered ones (``calibrate_and_pin`` of
``fold_latency.py``): sites pinned always ON (ReLU6: always LINEAR), which make linear blocks, and
sites with "a quarter plus 3" of their channels dead, which leave misaligned counts (64 -> 45,
384 -> 285, ...) as real pruning does. See ``MODELS`` for each model's engineering.

Per model, four folds (``fold_graph`` with fold's default cost model, ``--cost measured``: layer
timings cached on disk like fold's): ``none`` (merge none), ``auto`` (the default), ``all`` (merge
all) and ``keep-channels`` (merge auto, no channel drops); each is checked against the original
(max|diff| / max|ref| on the calibration batch, fold's tolerance), exported to ONNX, and the original
and all four are timed in ONE ``compare_latency`` call (interleaved repeats, medians, IQRs; a
variant that folds to the same model as an earlier one is timed once, as it). The guard
(``nepenthe_compress.guard.choose_variant``: planned ``auto``, fallbacks ``keep-channels``, ``none``)
is applied to those same timings, and a line per model says whether its choice is at least as fast
as the original and as every other variant, within noise.

    python benchmarks/planner.py [--models resnet18,...] [--repeats 15] [--threads 2] [--batches 1,32]
                                 [--cost measured|flops]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnxruntime as ort
import torch
import torchvision
from torch import Tensor, nn

from fold_latency import calibrate_and_pin, quiet
from nepenthe_compress.bench import LatencyTable, compare_latency
from nepenthe_compress.entropy import EntropyReport, measure_entropy
from nepenthe_compress.export import export_onnx
from nepenthe_compress.fold.core import FoldedGraph, fold_graph
from nepenthe_compress.fold.cost import AnalyticCost, CostModel
from nepenthe_compress.fold.graph import FoldOptions
from nepenthe_compress.fold.measured import MeasuredCost
from nepenthe_compress.fold.metrics import count_macs
from nepenthe_compress.guard import GuardDecision, Timing, choose_variant, slower_beyond_noise
from nepenthe_compress.onnx_depth import onnx_depth
from nepenthe_compress.runtime import Runtime
from nepenthe_compress.trace import trace_model
from nepenthe_compress.verify import verify_equivalence
from nepenthe_compress.workflow.checks import EXACT_TOL, NOISE_FACTOR, tolerance
from nepenthe_compress.workflow.fold import same_model
from nepenthe_compress.workflow.variants import timings

VARIANTS: dict[str, FoldOptions] = {
    "none": FoldOptions(merge="none"),
    "auto": FoldOptions(merge="auto"),
    "all": FoldOptions(merge="all"),
    "keep-channels": FoldOptions(merge="auto", drop_channels=False),
}
PLANNED, FALLBACKS = "auto", ("keep-channels", "none")
ORIGINAL = "original"
DEAD = ("dead", 0.25)      # a quarter of the channels plus fold_latency.MISALIGN dead
ON, LINEAR6 = ("on", 0.0), ("linear6", 0.0)
CALIBRATION = 32           # samples in the calibration (and equivalence) batch

Pins = dict[nn.Module, tuple[str, float]]


# ---- models -----------------------------------------------------------------------------------------

@dataclass
class Engineered:
    model: nn.Module
    x: Tensor                      # calibration batch: the states hold on it, equivalence is checked on it
    pins: Pins = field(default_factory=dict)
    exporter: str = "auto"         # export_onnx's exporter for the original and every fold


def engineer(model: nn.Module, shape: tuple[int, ...], pins: Pins, quiet_norms: list[nn.Module]) -> Engineered:
    """Scale the residual branches' last norms down, calibrate every BN and pin ``pins`` on a seeded
    batch of ``shape`` samples."""
    x = torch.randn(CALIBRATION, *shape)
    quiet(quiet_norms)
    calibrate_and_pin(model.eval(), x, pins)
    return Engineered(model, x, pins)


def resnet18() -> Engineered:
    """3x64x64. Every block's inner site: a quarter + 3 dead (64 -> 45 ... 512 -> 381), except three
    always ON (linear 3x3 -> 3x3 chains: one 5x5 conv would cost more)."""
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10)
    blocks = [*m.layer1, *m.layer2, *m.layer3, *m.layer4]
    pins: Pins = {b.bn1: DEAD for b in blocks} | {m.layer1[0].bn1: ON, m.layer2[1].bn1: ON, m.layer3[1].bn1: ON}
    return engineer(m, (3, 64, 64), pins, [b.bn2 for b in blocks])


def resnet50() -> Engineered:
    """3x64x64. Every bottleneck's first site a quarter + 3 dead (64 -> 45 ... 512 -> 381) and
    layer3's second sites too (256 -> 189); linear: layer1.1's first site (1x1 -> 3x3), layer2.1's
    second (3x3 -> 1x1), all of layer3.2 (the whole bottleneck)."""
    torch.manual_seed(0)
    m = torchvision.models.resnet50(num_classes=10)
    blocks = [*m.layer1, *m.layer2, *m.layer3, *m.layer4]
    pins: Pins = {b.bn1: DEAD for b in blocks} | {b.bn2: DEAD for b in m.layer3}
    pins |= {m.layer1[1].bn1: ON, m.layer2[1].bn2: ON, m.layer3[2].bn1: ON, m.layer3[2].bn2: ON}
    return engineer(m, (3, 64, 64), pins, [b.bn3 for b in blocks])


def mobilenet_v2() -> Engineered:
    """3x64x64. Inverted residuals 3, 6, 9, 13 fully LINEAR (ReLU6 in [1, 5]); depthwise sites of
    blocks 2, 4, 8, 12, 15 a quarter + 3 dead (96 -> 69, 144 -> 105, 384 -> 285, 576 -> 429,
    960 -> 717)."""
    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v2(num_classes=10)
    f = m.features
    pins: Pins = {f[b].conv[j][1]: LINEAR6 for b in (3, 6, 9, 13) for j in (0, 1)}
    pins |= {f[b].conv[1][1]: DEAD for b in (2, 4, 8, 12, 15)}
    return engineer(m, (3, 64, 64), pins, [b.conv[-1] for b in f[1:18] if b.use_res_connect])


def mobilenet_v3_large() -> Engineered:
    """3x64x64, ReLU sites only (Hardswish sites stay). Block 3 fully linear (24 -> 72 -> 24 with
    residual); a quarter + 3 dead: block 1's depthwise (16 -> 9: 8-alignment keeps all 16), block
    2's expansion (64 -> 45, 48 kept), block 5's expansion (120 -> 87; kept: through the depthwise
    conv they reach a squeeze-excitation's pooling and product, not only conv layers)."""
    torch.manual_seed(0)
    m = torchvision.models.mobilenet_v3_large(num_classes=10)
    f = m.features
    pins: Pins = {f[3].block[0][1]: ON, f[3].block[1][1]: ON}
    pins |= {f[1].block[0][1]: DEAD, f[2].block[0][1]: DEAD, f[5].block[0][1]: DEAD}
    return engineer(m, (3, 64, 64), pins, [b.block[-1][1] for b in f[1:16] if b.use_res_connect])


def vgg11_bn() -> Engineered:
    """3x32x32 with the 32x32 head (features -> 512 -> ReLU -> 512 -> ReLU -> 10; the 4096-wide
    ImageNet head would dominate every timing). Conv sites 2, 4, 6, 7 a quarter + 3 dead
    (128 -> 93, 256 -> 189, 512 -> 381); conv site 3 always ON (a linear 3x3 -> 3x3 chain);
    the first head site always ON (512 -> 512 -> 512 merges) and the second a quarter + 3 dead."""
    torch.manual_seed(0)
    m = torchvision.models.vgg11_bn(num_classes=10)
    m.avgpool = nn.Identity()
    m.classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(True), nn.Dropout(), nn.Linear(512, 512),
                                 nn.ReLU(True), nn.Dropout(), nn.Linear(512, 10))
    bns = [x for x in m.features if isinstance(x, nn.BatchNorm2d)]
    pins: Pins = {bns[i]: DEAD for i in (1, 3, 5, 6)} | {bns[2]: ON}
    pins |= {m.classifier[0]: ON, m.classifier[3]: DEAD}
    return engineer(m, (3, 32, 32), pins, [])


def vit() -> Engineered:
    """torchvision VisionTransformer on 3x32x32 (patch 4: 65 tokens of 96; 4 layers, 4 heads, MLP
    384) with ReLU MLPs. Layers 0 and 2: MLP site always ON (96 -> 384 -> 96 merges to 96 -> 96);
    layers 1 and 3: a quarter + 3 of the MLP dead (384 -> 285)."""
    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4,
                                             hidden_dim=96, mlp_dim=384, num_classes=10)
    m.heads.head.reset_parameters()   # torchvision zero-initialises it: every output would be 0
    layers = list(m.encoder.layers)
    for layer in layers:
        layer.mlp[1] = nn.ReLU()
    pins: Pins = {layers[i].mlp[0]: ON for i in (0, 2)} | {layers[i].mlp[0]: DEAD for i in (1, 3)}
    # TorchScript cannot export the fused attention op (it fails after a long dump): dynamo at once
    return replace(engineer(m, (3, 32, 32), pins, []), exporter="dynamo")


MODELS: dict[str, Callable[[], Engineered]] = {
    "resnet18": resnet18, "resnet50": resnet50, "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_large": mobilenet_v3_large, "vgg11_bn": vgg11_bn, "vit": vit,
}


def pinned_sites(e: Engineered) -> dict[str, tuple[str, float]]:
    """Site (traced node) name -> pin of the module whose output it rectifies."""
    by_module = {name: e.pins[mod] for name, mod in e.model.named_modules() if mod in e.pins}
    sites = {}
    for node in trace_model(e.model).graph.nodes:
        if node.op == "call_module" and node.target in by_module:
            (user,) = node.users
            sites[user.name] = by_module[node.target]
    return sites


def engineering_summary(e: Engineered, report: EntropyReport) -> str:
    """What the entropy pass measured at the pinned sites (not what was asked for)."""
    stats = report.by_name()
    pinned = pinned_sites(e)
    zero = [s for s in report.sites if s.zero_entropy]
    dead = [f"{s.neurons}->{s.neurons - s.always()['OFF']}" for name, (kind, _) in pinned.items()
            if kind == "dead" for s in [stats[name]]]
    return (f"{len(zero)}/{len(report.sites)} sites zero-entropy; channels left at the dead sites: "
            f"{', '.join(dead)}")


# ---- run ----------------------------------------------------------------------------------------

def guard(times: dict[str, dict[int, Timing]]) -> GuardDecision:
    """The guard's choice on measured timings: ``PLANNED`` unless slower, else a fallback."""
    return choose_variant(times[ORIGINAL], {v: times[v] for v in (PLANNED, *FALLBACKS)}, PLANNED)


@dataclass
class Result:
    name: str
    times: dict[str, dict[int, Timing]]   # model -> batch -> median, IQR (a twin has its twin's)
    twins: dict[str, str]         # variant -> earlier variant whose fold is the same model (timed once, as it)
    macs: dict[str, float]        # variant -> original MACs / variant MACs
    depth: dict[str, int]         # model -> weighted layers on the longest ONNX path
    max_rel: dict[str, float]     # variant -> max|diff| / max|ref| vs the original
    tol: float                    # fold's tolerance for max_rel
    decision: GuardDecision
    notes: list[str]
    rerun: dict[str, dict[int, Timing]] | None = None   # original and the choice, timed again on their own

    def timing(self, model: str, batch: int) -> Timing:
        return self.times[model][batch]

    @property
    def batches(self) -> list[int]:
        return sorted(self.times[ORIGINAL])

    def ratio(self, model: str, batch: int) -> float:
        return self.timing(ORIGINAL, batch).median_s / self.timing(model, batch).median_s


def fold_variants(e: Engineered, report: EntropyReport, cost: CostModel) -> dict[str, FoldedGraph]:
    return {name: fold_graph(e.model, report, e.x[:2], options, cost=cost) for name, options in VARIANTS.items()}


def twins_of(folds: dict[str, FoldedGraph]) -> dict[str, str]:
    """Variant -> the first earlier variant whose fold is the same model (``same_model``, as fold)."""
    names, twins = list(folds), {}
    for i, v in enumerate(names):
        twin = next((t for t in names[:i] if t not in twins and same_model(folds[t].model, folds[v].model)), None)
        if twin is not None:
            twins[v] = twin
    return twins


def run_model(name: str, tmp: Path, batches: tuple[int, ...], threads: int, repeats: int,
              cost: CostModel) -> Result:
    """Engineer, fold every variant, check, export and time ``name``; apply the guard."""
    e = MODELS[name]()
    report = measure_entropy(e.model, [e.x])
    notes = [f"{name}: {engineering_summary(e, report)}"]
    folds = fold_variants(e, report, cost)
    twins = twins_of(folds)
    example = e.x[:2]
    base_macs = count_macs(e.model, example)
    macs = {v: base_macs / count_macs(f.model, example) for v, f in folds.items()}
    max_rel = {v: verify_equivalence(e.model, f.model, [e.x]).max_rel for v, f in folds.items()}
    tol, noise = tolerance(e.model, e.x)
    notes.append(f"  equivalence tolerance {tol:.1e} (the original's own float32 error {noise:.1e})")
    models = {ORIGINAL: trace_model(e.model)} | {v: f.model for v, f in folds.items() if v not in twins}
    paths = {m: export_onnx(model, example, tmp / f"{name}.{m}.onnx", exporter=e.exporter)
             for m, model in models.items()}
    depth = {m: onnx_depth(paths[twins.get(m, m)]) for m in (ORIGINAL, *folds)}
    notes += [f"  {v:13} sites linearised {len(f.linearised)}/{f.sites_total}, merges {f.count('merge')}, "
              f"channels dropped {f.channels_dropped} (+{f.channels_kept_for_alignment} kept for alignment)"
              + (f"; the same model as {twins[v]}" if v in twins else "") for v, f in folds.items()]

    def time_all(files: dict[str, Path], repeats: int) -> LatencyTable:
        return compare_latency(files, tuple(e.x.shape[1:]), batches=batches, threads=threads, repeats=repeats)

    def times_of(table: LatencyTable) -> dict[str, dict[int, Timing]]:
        return {m: timings(table, twins.get(m, m)) for m in (ORIGINAL, *folds)}

    times = times_of(time_all(paths, repeats))
    if guard(times).chosen != PLANNED:   # as fold does: a fallback or a failure is decided by a longer run
        times = times_of(time_all(paths, 2 * repeats))
    decision = guard(times)
    rerun = None
    if decision.chosen is not None:   # an independent run of the original and the choice alone
        chosen = twins.get(decision.chosen, decision.chosen)
        table = time_all({ORIGINAL: paths[ORIGINAL], chosen: paths[chosen]}, repeats)
        rerun = {ORIGINAL: timings(table, ORIGINAL), decision.chosen: timings(table, chosen)}
    return Result(name, times, twins, macs, depth, max_rel, tol, decision, notes, rerun)


def verdict(r: Result) -> str:
    """PASS when the guard's choice is not slower beyond noise than the original nor than any other
    variant, at every batch size, nor than the original in the independent re-run; the numbers
    either way."""
    chosen = r.decision.chosen
    if chosen is None:
        return f"FAIL {r.name}: the guard chose nothing ({r.decision.reason})"
    ratios = " ".join(f"b{b} {r.ratio(chosen, b):.2f}x" for b in r.batches)
    others = [m for m in (ORIGINAL, *VARIANTS) if m != chosen]   # a twin has the same timings: never slower
    problems = [f"slower than {other} at batch {b} ({r.timing(chosen, b).median_s * 1e3:.3g} vs "
                f"{r.timing(other, b).median_s * 1e3:.3g} ms)"
                for other in others for b in r.batches if slower_beyond_noise(r.timing(chosen, b), r.timing(other, b))]
    if r.rerun is not None:
        problems += [f"slower than the original at batch {b} in the re-run ({r.rerun[chosen][b].median_s * 1e3:.3g} vs "
                     f"{r.rerun[ORIGINAL][b].median_s * 1e3:.3g} ms)"
                     for b in r.batches if slower_beyond_noise(r.rerun[chosen][b], r.rerun[ORIGINAL][b])]
    strict = all(r.ratio(chosen, b) >= 1.0 for b in r.batches)
    tail = "; ".join(problems) if problems else (
        "not slower than the original or any variant beyond noise" + ("" if strict else " (below 1.00x within noise)"))
    return f"{'FAIL' if problems else 'PASS'} {r.name}: guard -> {chosen} ({ratios} vs original): {tail}"


def rows(r: Result) -> list[list[str]]:
    def cells(model: str, label: str) -> list[str]:
        out = [r.name, label, f"{r.macs[model]:.2f}x" if model in r.macs else "",
               f"{r.depth[ORIGINAL]} -> {r.depth[model]}" if model != ORIGINAL else str(r.depth[model]),
               f"{r.max_rel[model]:.1e}" + ("" if r.max_rel[model] <= r.tol else " !") if model in r.max_rel else ""]
        for b in r.batches:
            t = r.timing(model, b)
            out += [f"{t.median_s * 1e3:.3g} ({t.iqr_s * 1e3:.2g})", f"{r.ratio(model, b):.2f}x"]
        return out

    chosen = r.decision.chosen
    lines = [cells(m, m + (f" (= {r.twins[m]})" if m in r.twins else "")) for m in (ORIGINAL, *VARIANTS)]
    return lines + [cells(chosen, f"guarded: {chosen}") if chosen else
                    [r.name, "guarded: none", *[""] * (3 + 2 * len(r.batches))]]


def markdown(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return int(text)


def positive_ints(text: str) -> tuple[int, ...]:
    """'1,32' -> (1, 32)."""
    return tuple(positive_int(v) for v in text.split(","))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--repeats", type=positive_int, default=15)
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--batches", type=positive_ints, default=(1, 32), metavar="B,B")
    ap.add_argument("--cost", choices=("measured", "flops"), default="measured",
                    help="the merge planner's cost model (fold's --cost; measured layer timings are cached)")
    args = ap.parse_args()
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    repeats, threads, batches = args.repeats, args.threads, args.batches
    torch.set_num_threads(threads)
    start, load = time.perf_counter(), os.getloadavg()[0]
    cost = MeasuredCost(Runtime(threads=threads), batches) if args.cost == "measured" else AnalyticCost()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_model(n, Path(tmp), batches, threads, repeats, cost) for n in names]
    if isinstance(cost, MeasuredCost):
        cost.cache.save()
    print(f"onnxruntime {ort.__version__} CPUExecutionProvider, torch {torch.__version__}, "
          f"{threads} threads, machine: {os.cpu_count()} CPUs ({platform.machine()}), "
          f"load average {load:.2f} at start; planner cost model: {args.cost}"
          + (f" ({cost.measured} of {cost.looked_up} layer costs measured, the rest cached)"
             if isinstance(cost, MeasuredCost) else ""))
    print(f"ms = median of {repeats} interleaved repeats (all variants of a model in every repeat), "
          f"IQR in brackets; ratio = original median / variant median (> 1: faster); MACs = original / "
          f"variant; depth = weighted layers on the longest ONNX path; max rel err = max|diff|/max|ref| "
          f"vs the original on the calibration batch (! above fold's tolerance: {EXACT_TOL:g} or {NOISE_FACTOR}x the "
          f"original's own float32 error); (= v): the same model as v, timed once; guarded = choose_variant("
          f"planned {PLANNED}, fallbacks {', '.join(FALLBACKS)}) on the same timings")
    header = ["model", "variant", "MACs", "depth", "max rel err"]
    for b in batches:
        header += [f"b{b} ms (IQR)", f"b{b} ratio"]
    print(markdown(header, [row for r in results for row in rows(r)]))
    print("engineering and folds:")
    for r in results:
        print("\n".join(r.notes))
    print("guard:")
    for r in results:
        print(f"  {r.name}: {r.decision.reason}")
    print("independent re-run of the original and the guard's choice alone (ratio = original / choice):")
    for r in results:
        if r.rerun is not None:
            ratios = " ".join(f"b{b} {r.rerun[ORIGINAL][b].median_s / r.rerun[r.decision.chosen][b].median_s:.2f}x"
                              for b in r.batches)
            print(f"  {r.name}: {r.decision.chosen} {ratios}")
    print("acceptance (guarded choice >= original and >= every other variant within noise, and >= original "
          "in the re-run):")
    for r in results:
        print(f"  {verdict(r)}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
