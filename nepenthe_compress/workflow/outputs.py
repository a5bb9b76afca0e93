"""The files ``fold`` writes (light: the CLI checks them before importing anything heavy)."""
from __future__ import annotations

import os
from pathlib import Path

# kind -> file name pattern; the order is the report's and the table's
OUTPUT_FILES: dict[str, str] = {
    "onnx": "{stem}.folded.onnx",          # the folded model (opset 18, dynamic batch)
    "original_onnx": "{stem}.onnx",        # the original, exported the same way
    "report": "{stem}.report.json",
    "pt2": "{stem}.folded.pt2",            # the folded torch.export program (optional)
}
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def stem_of(path: str | os.PathLike) -> str:
    """The checkpoint's file name without its checkpoint suffix."""
    name = Path(path).name
    for suffix in CHECKPOINT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def output_paths(outdir: str | os.PathLike, stem: str, pt2: bool = True) -> dict[str, Path]:
    """kind -> path of every file ``fold`` writes into ``outdir``."""
    return {kind: Path(outdir) / pattern.format(stem=stem) for kind, pattern in OUTPUT_FILES.items()
            if pt2 or kind != "pt2"}
