"""Depth merges with border correction: onnxruntime CPU latency of a depth-merged ResNet.

torchvision resnet18 or resnet34 (random weights, seed 0, 10 classes, input 3x32x32) with every
BasicBlock's inner ReLU engineered always ON (bn1: gamma 0.01, beta 5), so every block is linear
inside. Folded two ways through the Python API (channels kept, so only the merges differ):

- ``auto``: merges where fold's cost model (``--cost``: ``measured``, each candidate timed alone in
  onnxruntime on this CPU and cached, or ``flops``) predicts a gain; BN folded, sites linearised;
- ``all``: every block merged with its border correction and shortcut (resnet18 depth 18 -> 10,
  resnet34 34 -> 18).

Every ONNX file is timed with ``nepenthe_compress.bench.compare_latency``: 2 threads, batch 1 and
32, all models interleaved in every repeat, fixed input seed, medians with the interquartile range
of the repeats. Also printed: the ONNX depth, the MAC ratio original / model and the max relative
error of onnxruntime (float32) against the original torch model.

    python benchmarks/depth_merge.py [--arch resnet18|resnet34] [--repeats 40] [--threads 2] [--cost measured]
"""
from __future__ import annotations

import argparse
import copy

import torch
import torchvision

import nepenthe_compress as nc
from nepenthe_compress.bench import compare_latency
from nepenthe_compress.onnx_depth import onnx_depth
from nepenthe_compress.verify import compare_runners, onnx_runner, torch_runner


def engineered(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.get_model(arch, weights=None, num_classes=10).eval()
    with torch.no_grad():
        for block in m.modules():
            if isinstance(block, torchvision.models.resnet.BasicBlock):
                block.bn1.weight.fill_(0.01)
                block.bn1.bias.fill_(5.0)
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet34"))
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cost", default="measured", choices=("measured", "flops"))
    args = p.parse_args()

    model = engineered(args.arch)
    x = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    results = {mode: nc.fold(copy.deepcopy(model), x, merge=mode, pt2=False, drop_channels=False, cost=args.cost)
               for mode in ("auto", "all")}
    paths = {"original": results["all"].files["original_onnx"],
             **{mode: r.files["onnx"] for mode, r in results.items()}}
    macs = {"original": results["all"].report.macs.before, **{m: r.report.macs.after for m, r in results.items()}}
    errors = {name: compare_runners(torch_runner(model), onnx_runner(path), [x]).max_rel
              for name, path in paths.items()}
    table = compare_latency(paths, (3, 32, 32), batches=(1, 32), threads=args.threads, repeats=args.repeats,
                            seed=0)

    print(f"{args.arch} 3x32x32, onnxruntime CPU, {args.threads} threads, {args.repeats} interleaved repeats "
          f"(median, IQR); auto priced by --cost {args.cost}")
    print(f"{'model':9} {'depth':>5} {'MACs':>12} {'MAC ratio':>9} {'max rel err':>11} {'batch':>5} "
          f"{'median ms':>10} {'IQR ms':>8} {'speed-up':>8}")
    for row in table.rows:
        print(f"{row.model:9} {onnx_depth(paths[row.model]):5d} {macs[row.model]:12,d} "
              f"{macs['original'] / macs[row.model]:9.3f} {errors[row.model]:11.2e} {row.batch:5d} "
              f"{row.median_s * 1e3:10.3f} {row.iqr_s * 1e3:8.3f} {row.speedup:7.2f}x")
    r = results["all"].report
    print(f"layers removed (papers' count) {r.layers_removed.removed}/{r.layers_removed.of}; "
          f"ONNX depth {r.depth.before} -> {r.depth.after}")


if __name__ == "__main__":
    main()
