"""The on-disk cache folder, and exports of original models kept there so that a second ``fold`` of
the same model does not export it again.

Folder: ``NEPENTHE_CACHE_DIR``, else ``$XDG_CACHE_HOME/nepenthe-compress``, else
``~/.cache/nepenthe-compress``. An exported original is keyed by a hash of what determines the
file: the traced graph's code, every tensor (name, dtype, shape, bytes), the example's per-sample
shape and dtype, the opset, and the torch / onnx versions. A cached file is only used after the same
onnxruntime-vs-torch check a fresh export passes; a file that fails it is removed and the model is
exported anew. At most ``MAX_EXPORTS`` files are kept (the least recently used go first). Writing
the cache is best effort: a cache that cannot be written is never an error.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from nepenthe_compress.errors import ExportError
from nepenthe_compress.io import atomic_path

MAX_EXPORTS = 16


def cache_dir() -> Path:
    if os.environ.get("NEPENTHE_CACHE_DIR"):
        return Path(os.environ["NEPENTHE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nepenthe-compress"


def model_key(model: nn.Module, example: Tensor, opset: int) -> str:
    """sha256 of the model's code and tensors, the per-sample input shape, opset and versions."""
    h = hashlib.sha256()
    header = [getattr(model, "code", type(model).__qualname__), str(tuple(example.shape[1:])), str(example.dtype),
              str(opset), torch.__version__, onnx.__version__]
    h.update("\0".join(header).encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cached_export(model: nn.Module, example: Tensor, path: Path, *, opset: int = 18,
                  folder: Path | None = None) -> Path:
    """``export.export_onnx(model, example, path)``, reusing an earlier export of the same model."""
    from nepenthe_compress.export import ONNX_SIZE_LIMIT, export_onnx, self_check

    exports = (folder or cache_dir()) / "exports"
    cached = exports / f"{model_key(model, example, opset)}.onnx"
    if cached.is_file() and cached.stat().st_size < ONNX_SIZE_LIMIT:   # no larger than an export can be
        shutil.copyfile(cached, path)
        try:
            self_check(model, path, example, dynamic_batch=True)
            os.utime(cached)
            return path
        except ExportError:
            cached.unlink(missing_ok=True)
            path.unlink(missing_ok=True)
    export_onnx(model, example, path, opset=opset)
    try:
        exports.mkdir(parents=True, exist_ok=True)
        with atomic_path(cached) as tmp:
            shutil.copyfile(path, tmp)
        for old in sorted(exports.glob("*.onnx"), key=lambda p: p.stat().st_mtime)[:-MAX_EXPORTS]:
            old.unlink(missing_ok=True)
    except OSError:
        pass
    return path
