"""Reproduce the papers' comparison on MNIST-5k with a narrow CIFAR ResNet-18 (fixed seeds).

IMP vs NEPENTHE at equal sparsities (50, 75, 93.75 %): sites removed k/L (linearised or zero-entropy
on the training split) and top-1 on the held-out 20 %; then EASIER's curve (one site per round until
top-1 falls more than --max-drop points below the dense model). All three start from the same dense
model. Runs resume: re-running continues where an interrupted run stopped.

    python benchmarks/reproduce_table.py            # about 6 minutes on 2 CPU cores (OMP_NUM_THREADS=1)
    python benchmarks/reproduce_table.py --quick    # smoke run: 500 digits, a narrower network
    torchrun --nproc_per_node 2 benchmarks/reproduce_table.py   # the same on 2 processes / GPUs
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nepenthe_compress.prune import PruneConfig, PruneResult, RoundResult, run_prune

SPARSITIES = (0.5, 0.75, 0.9375)
# mode -> settings: samples used, network width, dense epochs, retraining epochs per round, most
# EASIER rounds
MODES = {
    "full": dict(limit=None, width=0.125, epochs=10, finetune=3, easier_rounds=10),
    "quick": dict(limit=500, width=0.0625, epochs=2, finetune=1, easier_rounds=2),
}


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 500 digits, width 0.0625, 2 EASIER rounds")
    p.add_argument("--out", default="out/reproduce_table", help="output folder (one sub-folder per run)")
    p.add_argument("--width", type=float, default=None, help="cifar_resnet18 width multiplier [0.125; quick 0.0625]")
    p.add_argument("--max-drop", type=float, default=1.0, help="EASIER's top-1 allowance in points")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def _run(out: Path, **kw) -> PruneResult:
    return run_prune(PruneConfig(out_dir=out, resume=True, progress=True, **kw))


def _closest(result: PruneResult, sparsity: float) -> RoundResult:
    return min(result.rounds, key=lambda r: abs(r.sparsity - sparsity))


def _sites(r: RoundResult) -> str:
    return f"{r.sites_removed}/{r.sites_total}"


def comparison_table(imp: PruneResult, nep: PruneResult) -> Table:
    table = Table(title="IMP vs NEPENTHE at equal sparsity (sites removed k/L, top-1 %)")
    for col in ("target %", "IMP sparsity %", "IMP sites", "IMP top-1", "NEPENTHE sparsity %", "NEPENTHE sites",
                "NEPENTHE top-1"):
        table.add_column(col, justify="right")
    dense = imp.rounds[0]
    table.add_row("dense", "0.00", _sites(dense), f"{dense.accuracy:.2f}", "0.00", _sites(nep.rounds[0]),
                  f"{nep.rounds[0].accuracy:.2f}")
    for s in SPARSITIES:
        a, b = _closest(imp, s), _closest(nep, s)
        table.add_row(f"{100 * s:.2f}", f"{100 * a.sparsity:.2f}", _sites(a), f"{a.accuracy:.2f}",
                      f"{100 * b.sparsity:.2f}", _sites(b), f"{b.accuracy:.2f}")
    return table


def easier_table(easier: PruneResult) -> Table:
    table = Table(title=f"EASIER: one site per round ({easier.stopped}; kept round {easier.selected})")
    for col in ("round", "linearised", "sites removed", "top-1 %", "within limit"):
        table.add_column(col, justify="right")
    for r in easier.rounds:
        table.add_row(str(r.round), r.linearised[-1] if r.linearised else "-", _sites(r), f"{r.accuracy:.2f}",
                      "yes" if r.within_limit else "no")
    return table


def main() -> None:
    args = _args()
    mode = "quick" if args.quick else "full"
    m = MODES[mode]
    out = Path(args.out) / mode
    width = args.width or m["width"]
    common = dict(data="mnist", limit=m["limit"], seed=args.seed, batch_size=64, lr=0.05, holdout=0.2)
    start = time.perf_counter()
    _run(out / "dense", arch="cifar_resnet18", arch_kwargs={"in_channels": 1, "width": width},
         method="imp", rounds=0, epochs=m["epochs"], **common)
    init = str(out / "dense" / "round_00.pt")
    imp, nep = (_run(out / method, init=init, method=method, zeta=0.5, target_sparsity=SPARSITIES[-1],
                     finetune_epochs=m["finetune"], **common) for method in ("imp", "nepenthe"))
    easier = _run(out / "easier", init=init, method="easier", max_drop=args.max_drop,
                  rounds=m["easier_rounds"], finetune_epochs=m["finetune"], **common)
    if os.environ.get("RANK", "0") == "0":
        console = Console()
        console.print(comparison_table(imp, nep))
        console.print(easier_table(easier))
        console.print(f"{mode} run, width {width}, seed {args.seed}: {time.perf_counter() - start:.0f} s; "
                      f"checkpoints in {out}")


if __name__ == "__main__":
    main()
