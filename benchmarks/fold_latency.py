"""onnxruntime CPU latency of original vs folded models under each ``--merge`` mode (none/auto/all)
and channel alignment (``channel_align`` 8, the default, vs 1: every dead channel dropped).

Three engineered models (fixed seeds, random weights, BatchNorm statistics calibrated on the random
calibration batch so every unengineered rectifier is mixed):

- cifar_resnet18 (3x32x32): the inner ReLUs of layer1.0 / layer2.1 / layer3.1 always ON (their
  3x3 -> 3x3 merges are border-inexact, so never made) and a quarter plus 3 of every block's inner
  channels dead (64 -> 45 left: misaligned, as real pruning outcomes are; align 8 keeps 48);
- cifar_mobilenet_v2 (3x32x32): inverted residual blocks 3, 6, 9 and 13 fully LINEAR and a quarter
  plus 3 of the depthwise channels of blocks 2, 4, 8, 12 and 15 dead (144 -> 105 / 112 left);
- a transformer MLP stack on (64, 96) tokens: 4 x [x + fc2(ReLU(fc1(LayerNorm(x))))], 96 -> 384 ->
  96, every ReLU always ON.

The last BN of every residual branch is scaled by 0.1 (a near-identity residual stream keeps the
random nets well-conditioned, so float32 equivalence errors stay below 1e-5 as for trained nets).
Each model is measured, folded once per (merge mode, alignment) variant (checked against the
original, max|diff|/max|ref|), exported, and every ONNX file is timed with
``nepenthe_compress.bench.compare_latency``: 2 threads, batch 1 and 32, all variants of one
architecture interleaved in every repeat, medians. The table shows milliseconds with the
interquartile range of the repeats, the ratio original / folded (> 1: the folded model is faster)
and the MAC ratio original / folded (the speed-up a MAC-bound runtime would reach).

    python benchmarks/fold_latency.py [--repeats 60] [--threads 2] [--models resnet18,mobilenet_v2,mlp]
                                      [--modes none,auto,all] [--aligns 8,1]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nepenthe_compress.archs import build_model
from nepenthe_compress.bench import LatencyTable, compare_latency
from nepenthe_compress.entropy import measure_entropy
from nepenthe_compress.export import export_onnx
from nepenthe_compress.fold.core import FoldedGraph, fold_graph
from nepenthe_compress.fold.graph import FoldOptions
from nepenthe_compress.fold.metrics import count_macs
from nepenthe_compress.onnx_depth import onnx_depth
from nepenthe_compress.verify import verify_equivalence

MODES = ("none", "auto", "all")
ALIGNS = (8, 1)
MISALIGN = 3  # dead channels beyond the engineered fraction: the count left is odd
NORM = nn.modules.batchnorm._BatchNorm


# ---- engineering ------------------------------------------------------------------------------------

def _channels(m: nn.Module, t: Tensor) -> Tensor:
    """``t`` as [channels, rest] (BN: axis 1, Linear: last axis)."""
    axis = 1 if isinstance(m, NORM) else t.dim() - 1
    return t.detach().transpose(0, axis).reshape(t.shape[axis], -1)


@torch.no_grad()
def calibrate_and_pin(model: nn.Module, x: Tensor, pins: dict[nn.Module, tuple[str, float]]) -> None:
    """One eval pass: every BN's running stats from its own input; then each pinned BN / Linear
    output is shifted (``("on", 0)``: min >= 1; ``("linear6", 0)``: squeezed into [1, 5] for ReLU6;
    ``("dead", fraction)``: that leading fraction of channels plus MISALIGN constant -1, the others
    centred so they stay mixed: a no-op after a calibrated BN, needed after a Linear)."""
    def stats(bn, args):
        z = _channels(bn, args[0])
        bn.running_mean.copy_(z.mean(1))
        bn.running_var.copy_(z.var(1, unbiased=False))

    def pin(m, args, out):
        kind, fraction = pins[m]
        z = _channels(m, out)
        lo, hi = z.min(1).values, z.max(1).values
        scale, shift = torch.ones_like(lo), torch.zeros_like(lo)
        if kind == "on":
            shift = 1 - lo
        elif kind == "linear6":
            scale = 4 / (hi - lo)
            shift = 1 - scale * lo
        else:
            k = int(len(lo) * fraction) + MISALIGN
            shift = -z.mean(1)
            scale[:k], shift[:k] = 0.0, -1.0
        m.weight.mul_(scale if isinstance(m, NORM) else scale[:, None])
        m.bias.mul_(scale).add_(shift)
        if isinstance(m, NORM):
            return F.batch_norm(args[0], m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
        return F.linear(args[0], m.weight, m.bias)

    handles = [m.register_forward_pre_hook(stats) for m in model.modules() if isinstance(m, NORM)]
    handles += [m.register_forward_hook(pin) for m in pins]
    try:
        model.eval()(x)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def quiet(bns: list[nn.Module], gain: float = 0.1) -> None:
    for bn in bns:
        bn.weight.mul_(gain)


# ---- models -----------------------------------------------------------------------------------------

@dataclass
class Bench:
    model: nn.Module
    x: Tensor           # calibration batch (also the equivalence check batch)


def resnet18() -> Bench:
    torch.manual_seed(0)
    m = build_model("cifar_resnet18", num_classes=10).eval()
    x = torch.randn(32, 3, 32, 32)
    blocks = (*m.layer1, *m.layer2, *m.layer3, *m.layer4)
    quiet([b.bn2 for b in blocks])
    pins = {b.bn1: ("dead", 0.25) for b in blocks}
    pins |= {m.layer1[0].bn1: ("on", 0), m.layer2[1].bn1: ("on", 0), m.layer3[1].bn1: ("on", 0)}
    calibrate_and_pin(m, x, pins)
    return Bench(m, x)


def mobilenet_v2() -> Bench:
    torch.manual_seed(0)
    m = build_model("cifar_mobilenet_v2", num_classes=10).eval()
    x = torch.randn(32, 3, 32, 32)
    quiet([b.conv[3] for b in m.features[1:18] if b.use_res_connect])
    pins = {m.features[b].conv[j][1]: ("linear6", 0) for b in (3, 6, 9, 13) for j in (0, 1)}
    pins |= {m.features[b].conv[1][1]: ("dead", 0.25) for b in (2, 4, 8, 12, 15)}
    calibrate_and_pin(m, x, pins)
    return Bench(m, x)


class MLPBlock(nn.Module):
    def __init__(self, dim: int = 96, hidden: int = 384) -> None:
        super().__init__()
        self.norm, self.act = nn.LayerNorm(dim), nn.ReLU()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def mlp() -> Bench:
    torch.manual_seed(0)
    m = nn.Sequential(*(MLPBlock() for _ in range(4))).eval()
    x = torch.randn(32, 64, 96)
    calibrate_and_pin(m, x, {b.fc1: ("on", 0) for b in m})
    return Bench(m, x)


MODELS: dict[str, Callable[[], Bench]] = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2, "mlp": mlp}


# ---- run ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    mode: str
    align: int

    @property
    def name(self) -> str:
        return f"{self.mode} a{self.align}"


def fold_all(b: Bench, variants: list[Variant]) -> dict[str, FoldedGraph]:
    report = measure_entropy(b.model, [b.x])
    return {v.name: fold_graph(b.model, report, b.x[:2], FoldOptions(merge=v.mode, channel_align=v.align))
            for v in variants}


def summary(name: str, b: Bench, folds: dict[str, FoldedGraph], paths: dict[str, Path]) -> list[str]:
    lines = []
    for variant, f in folds.items():
        err = verify_equivalence(b.model, f.model, [b.x]).max_rel
        lines.append(f"  {name} {variant:7}: sites linearised {len(f.linearised)}/{f.sites_total}, "
                     f"channels dropped {f.channels_dropped} (+{f.channels_kept_for_alignment} kept for "
                     f"alignment), merges {f.count('merge')}, depth {onnx_depth(paths['original'])} -> "
                     f"{onnx_depth(paths[variant])}, max rel err {err:.1e}")
    return lines


def table_rows(name: str, table: LatencyTable, macs: dict[str, float]) -> list[str]:
    """One line per model variant: MAC ratio, then per batch size median ms (interquartile range)
    and original / folded."""
    batches = sorted({r.batch for r in table.rows})
    rows = []
    for variant in dict.fromkeys(r.model for r in table.rows):
        cells = [f"{name:13} {variant:9}", f"{macs[variant]:5.2f}x" if variant != "original" else " " * 6]
        for batch in batches:
            r = next(r for r in table.rows if r.model == variant and r.batch == batch)
            cells.append(f"{r.median_s * 1e3:9.3f} ({r.iqr_s * 1e3:6.3f}) {r.speedup:4.2f}x")
        rows.append("  ".join(cells))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--aligns", default=",".join(map(str, ALIGNS)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = [Variant(m, int(a)) for m in args.modes.split(",") for a in args.aligns.split(",")]
    batches = (1, 32)
    start = time.perf_counter()
    header = f"{'model':13} {'variant':9}  {'MACs':>6}  " + "  ".join(
        f"{f'batch {b}: ms (iqr) ratio':>28}" for b in batches)
    rows, notes, slower = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            b = MODELS[name]()
            folds = fold_all(b, variants)
            example = b.x[:2]
            base_macs = count_macs(b.model, example)
            macs = {v: base_macs / count_macs(f.model, example) for v, f in folds.items()}
            paths = {"original": export_onnx(b.model, example, Path(tmp) / f"{name}.onnx")}
            paths |= {v: export_onnx(f.model, example, Path(tmp) / f"{name}.{v.replace(' ', '_')}.onnx")
                      for v, f in folds.items()}
            notes += summary(name, b, folds, paths)
            table = compare_latency(paths, tuple(b.x.shape[1:]), batches=batches, threads=args.threads,
                                    repeats=args.repeats)
            rows += table_rows(name, table, macs)
            slower += [f"  {name} {r.model} batch {r.batch}: {1 / r.speedup:.2f}x the original's time "
                       f"(iqr {r.iqr_s * 1e3:.3f} ms)"
                       for r in table.rows if r.model != "original" and r.speedup < 1]
    print(f"onnxruntime CPU, {args.threads} threads, {args.repeats} interleaved repeats: median ms "
          f"(interquartile range); ratio = original / folded median; MACs = original / folded")
    print(header)
    print("\n".join(rows))
    print("folds:")
    print("\n".join(notes))
    print("slower than the original:" if slower else "no variant is slower than the original")
    if slower:
        print("\n".join(slower))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
