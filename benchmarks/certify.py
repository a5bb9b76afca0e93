"""Certified folds on fresh inputs: torchvision ResNets folded on random calibration data, then
compared with the original on inputs neither split saw.

Each model has random weights (seed 0, 10 classes); the BatchNorm before two inner ReLUs
(``layer1[0].bn1`` and ``layer2[1].bn1``) is edited so those sites are always ON (bias raised until
the smallest value over the calibration data is 4 of the channel's stds above zero), so two sites are
linear; every other site is left as it comes, with many neurons that happen to be always OFF on the
calibration data (no held-out check, no margin: "dead" channels that are not). 256 seeded N(0, 1)
calibration inputs (``fold`` splits them 205 / 51 into calibration and held-out), 64 fresh ones.

Per row: the fold through the Python API (``nc.fold``, exactly what ``fold`` runs, without the speed
guard) under one policy; ``relied`` neurons the plan relies on, ``inside`` one-state neurons left
non-linear by the margin, ``flips`` held-out flips (excluded unless the policy keeps them), sites
linearised, channels dropped, ONNX depth, and max|diff| / max|ref| on the held-out split and on the
fresh inputs. "before" is the policy before certification: margin 0, held-out flips kept and the
held-out error not held to a tolerance.

    python benchmarks/certify.py [--models resnet18:32,resnet50:64] [--margins 0.25,0.5,1] [--fresh 64]
"""
from __future__ import annotations

import argparse
import math

import torch
import torchvision
from torch import Tensor, nn

import nepenthe_compress as nc
from nepenthe_compress.errors import UserError
from nepenthe_compress.verify import verify_equivalence

CALIB, SEED, ON_STDS = 256, 0, 4.0


@torch.no_grad()
def engineered(arch: str, x: Tensor) -> nn.Module:
    """Random-weight ``arch`` with two inner ReLU sites always ON on ``x`` (BN bias edits, in order)."""
    torch.manual_seed(SEED)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10).eval()
    for bn in (model.layer1[0].bn1, model.layer2[1].bn1):
        seen: list[Tensor] = []
        handle = bn.register_forward_hook(lambda m, a, out: seen.append(out.transpose(0, 1).flatten(1)))
        model(x)
        handle.remove()
        z = seen[0]
        bn.bias += ON_STDS * z.std(1) - z.min(1).values
    return model


def row(arch: str, policy: str, model: nn.Module, x: Tensor, fresh: Tensor, **kw) -> str:
    try:
        result = nc.fold(model, x, bench=False, pt2=False, cost="flops", **kw)
    except UserError as e:
        return f"| {arch} | {policy} | error: {e} |"
    r = result.report
    c = r.certification
    fresh_err = verify_equivalence(model, result.model, [fresh]).max_rel
    return (f"| {arch} | {policy} | {c.relied - (c.flipped if c.excluded else 0)} | {c.inside_margin} | "
            f"{c.flipped}{' excl.' if c.excluded else ''} | {len(r.sites.linearised_by_fold)} | {r.channels_dropped} | "
            f"{r.depth.before} -> {r.depth.after} | {r.equivalence.heldout.max_rel:.2e} | {fresh_err:.2e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18:32,resnet50:64", help="arch:input size, comma-separated")
    ap.add_argument("--margins", default="0.25,0.5,1")
    ap.add_argument("--fresh", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| model | policy | relied | inside margin | held-out flips | sites linearised | channels dropped "
          "| depth | held-out max rel | fresh max rel |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for spec in args.models.split(","):
        arch, size = spec.split(":")
        gen = torch.Generator().manual_seed(SEED + 1)
        x = torch.randn(CALIB, 3, int(size), int(size), generator=gen)
        fresh = torch.randn(args.fresh, 3, int(size), int(size), generator=gen)
        model = engineered(arch, x)
        name = f"{arch} 3x{size}x{size}"
        print(row(name, "before (margin 0, flips kept)", model, x, fresh, margin=0.0, max_flip_rate=1.0,
                  holdout_tolerance=math.inf), flush=True)
        for m in (float(v) for v in args.margins.split(",")):
            print(row(name, f"margin {m:g}", model, x, fresh, margin=m), flush=True)


if __name__ == "__main__":
    main()
