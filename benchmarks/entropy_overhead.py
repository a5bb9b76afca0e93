"""Overhead of the entropy pass over a plain eval forward (docs/DESIGN.md 2: it must stay small).

torchvision resnet18 (10 classes, random weights) on 3x32x32, batches of 64. Per repeat, in
alternating order: a plain ``model(x)`` over the batches, and the entropy pass (the instrumented
graph streaming the same batches, then building the report). Tracing + instrumenting is timed
separately and is not part of the ratio. Medians over repeats; wall and CPU (process) time.

    python benchmarks/entropy_overhead.py [--batches 8] [--batch-size 64] [--repeats 7] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torch import Tensor, nn

from nepenthe_compress.entropy import EntropyMeter, StateCounter

TARGET = 1.15


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def plain_pass(model: nn.Module, batches: list[Tensor]) -> None:
    for x in batches:
        model(x)


def entropy_pass(meter: EntropyMeter, batches: list[Tensor]) -> None:
    for x in batches:
        meter.update(x)
    meter.report()


def probe_inputs(meter: EntropyMeter, x: Tensor) -> list[tuple[StateCounter, Tensor]]:
    """Each probe with the pre-activation it sees for batch ``x``."""
    seen: list[tuple[StateCounter, Tensor]] = []
    hooks = [p.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0])))
             for p in meter.probes.values()]
    meter.update(x)
    for h in hooks:
        h.remove()
    return seen


def probes_only(pairs: list[tuple[StateCounter, Tensor]], batches: int) -> None:
    """The probes' own work for ``batches`` batches, on recorded pre-activations."""
    fresh = [(StateCounter(p.thresholds, p.axis), z) for p, z in pairs]
    for _ in range(batches):
        for probe, z in fresh:
            probe(z)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = [torch.randn(args.batch_size, 3, 32, 32, generator=gen) for _ in range(args.batches)]

    meter = EntropyMeter(model)
    pairs = probe_inputs(meter, batches[0])
    plain_pass(model, batches)  # warm-up
    entropy_pass(meter, batches)
    runs: dict[str, list[tuple[float, float]]] = {"plain forward": [], "entropy pass": [],
                                                  "probes only": [], "trace + instrument": []}
    for r in range(args.repeats):
        order = [("plain forward", lambda: plain_pass(model, batches)),
                 ("entropy pass", lambda: entropy_pass(meter, batches))]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            runs[name].append(timed(fn))
        runs["probes only"].append(timed(lambda: probes_only(pairs, args.batches)))
        runs["trace + instrument"].append(timed(lambda: EntropyMeter(model)))

    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in runs.items()}
    paired = statistics.median(e[0] / p[0] for e, p in zip(runs["entropy pass"], runs["plain forward"]))
    print(f"resnet18, {args.batches} batches x {args.batch_size} x 3x32x32, {args.threads} threads, "
          f"{args.repeats} interleaved repeats, {len(meter.sites)} sites (medians)")
    print(f"{'':20} {'wall s':>9} {'cpu s':>9}")
    for name, (wall, cpu) in med.items():
        print(f"{name:20} {wall:9.4f} {cpu:9.4f}")
    wall_ratio = med["entropy pass"][0] / med["plain forward"][0]
    cpu_ratio = med["entropy pass"][1] / med["plain forward"][1]
    print(f"ratio entropy/plain: wall {wall_ratio:.3f} (paired median {paired:.3f}), cpu {cpu_ratio:.3f}; "
          f"probes alone {med['probes only'][0] / med['plain forward'][0]:.3f} of a plain pass; "
          f"target <= {TARGET}: {'met' if wall_ratio <= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()
