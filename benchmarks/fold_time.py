"""Wall time of the CLI as a user runs it: ``nepenthe-compress --help`` and ``fold`` of torchvision
resnet18 (random weights, 3x32x32, 256 calibration samples, two always-ON sites and "a quarter plus 3"
dead channels per block, as in ``fold_latency.py``) with ``--no-bench``, once with an empty planner
cache (cold) and then with the cache the first run left (warm). Each is a fresh process (imports
included); medians of ``--repeats`` runs; the load average before the run is printed, since other
processes on the machine slow every figure alike.

    python benchmarks/fold_time.py [--repeats 3] [--pt2]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
from fold_latency import calibrate_and_pin, quiet  # noqa: E402

CLI = [sys.executable, "-m", "nepenthe_compress"]


def make_checkpoint(folder: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(256, 3, 32, 32)
    blocks = (*m.layer1, *m.layer2, *m.layer3, *m.layer4)
    quiet([b.bn2 for b in blocks])
    pins = {b.bn1: ("dead", 0.25) for b in blocks}
    pins |= {m.layer1[0].bn1: ("on", 0), m.layer2[1].bn1: ("on", 0)}
    calibrate_and_pin(m, x, pins)
    torch.save(m.state_dict(), folder / "r18.pt")
    np.savez(folder / "calib.npz", x=x.numpy())
    return folder / "r18.pt", folder / "calib.npz"


def wall(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pt2", action="store_true", help="also export the .pt2 (fold --pt2)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; medians of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt, calib = make_checkpoint(folder)
        cache = folder / "cache"
        env = {**os.environ, "NEPENTHE_CACHE_DIR": str(cache)}
        fold = [*CLI, "fold", str(ckpt), "--arch", "resnet18", "--calib", str(calib), "--no-bench", "--force",
                "-o", str(folder / "out"), *(["--pt2"] if args.pt2 else [])]
        helps, colds, warms = [], [], []
        for _ in range(args.repeats):
            helps.append(wall([*CLI, "--help"], env))
            shutil.rmtree(cache, ignore_errors=True)
            colds.append(wall(fold, env))
            warms.append(wall(fold, env))
    pt2 = "with" if args.pt2 else "without"
    print(f"--help: {statistics.median(helps):.2f} s")
    print(f"fold resnet18 --no-bench ({pt2} .pt2), cold planner cache: {statistics.median(colds):.1f} s "
          f"(runs: {', '.join(f'{t:.1f}' for t in colds)})")
    print(f"fold resnet18 --no-bench ({pt2} .pt2), warm planner cache: {statistics.median(warms):.1f} s "
          f"(runs: {', '.join(f'{t:.1f}' for t in warms)})")


if __name__ == "__main__":
    main()
