"""Model files as runners: a checkpoint, an ONNX file or a torch.export program, opened with what it
declares about its input and outputs, so two models and their data are checked to agree before
anything runs (the ``verify`` verb)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nepenthe_compress.checkpoint import LoadOptions, load_checkpoint
from nepenthe_compress.data import iter_batches, meta_input_shape
from nepenthe_compress.errors import UserError
from nepenthe_compress.export import load_pt2
from nepenthe_compress.signature import (
    Signature,
    check_input,
    check_same_input,
    check_same_outputs,
    onnx_signature,
    program_signature,
)
from nepenthe_compress.verify import Runner, error_line, ort_session, session_runner, torch_runner


@dataclass(frozen=True)
class OpenOptions:
    load: LoadOptions = LoadOptions()   # how to load checkpoints (--trust-pickle also gates .pt2)
    threads: int = 2                    # onnxruntime threads


@dataclass
class Opened:
    runner: Runner
    signature: Signature                                   # what the file declares about its tensors
    meta: dict[str, Any] = field(default_factory=dict)    # checkpoint metadata (calib, normalize, input_shape)
    model: torch.nn.Module | None = None                   # a checkpoint's model (its first layer is checked)
    notes: list[str] = field(default_factory=list)         # what loading a checkpoint changed ...
    warnings: list[str] = field(default_factory=list)      # ... or doubts


def _open_onnx(path: Path, opts: OpenOptions) -> Opened:
    session = ort_session(path, opts.threads)
    return Opened(session_runner(session, path), onnx_signature(session, str(path)))


def _open_pt2(path: Path, opts: OpenOptions) -> Opened:
    if not opts.load.trust_pickle:
        raise UserError(f"'{path}' is a torch.export program, and loading one runs code stored in the file: "
                        "pass --trust-pickle if you trust it, or verify the .onnx instead")
    program = load_pt2(path)
    try:
        module = program.module()
    except Exception as e:  # a damaged graph fails when it is turned back into a module
        raise UserError(f"cannot rebuild the module of '{path}': {error_line(e)}") from e
    return Opened(torch_runner(module, str(path)), program_signature(program, str(path)))


def _open_checkpoint(path: Path, opts: OpenOptions) -> Opened:
    ck = load_checkpoint(path, **opts.load.as_kwargs())
    shape = meta_input_shape(ck.meta, str(path))
    declared = None if shape is None else {"input": ("N", *shape)}
    # load_checkpoint returns eval-mode models
    return Opened(torch_runner(ck.model, str(path)), Signature(str(path), declared, None), ck.meta, ck.model,
                  ck.notes, ck.warnings)


OPENERS: dict[str, Callable[[Path, OpenOptions], Opened]] = {".onnx": _open_onnx, ".pt2": _open_pt2}


def open_model(path: str, opts: OpenOptions) -> Opened:
    """A runner for a .onnx, .pt2 or (any other suffix) checkpoint file."""
    p = Path(path)
    return OPENERS.get(p.suffix.lower(), _open_checkpoint)(p, opts)


def merged_meta(models: list[Opened]) -> dict[str, Any]:
    """Per metadata key, the first model's value that is set (the reference's first)."""
    keys = {k for m in models for k in m.meta}
    return {k: next(m.meta[k] for m in models if m.meta.get(k) is not None) for k in keys
            if any(m.meta.get(k) is not None for m in models)}


def declared_shape(models: list[Opened]) -> tuple[int, ...] | None:
    """The first fixed per-sample input shape a model file declares."""
    return next((s for m in models if (s := m.signature.sample_shape())), None)


def check_pair(ref: Opened, cand: Opened) -> None:
    """Refuse two models whose declared inputs or outputs differ."""
    check_same_input(ref.signature, cand.signature)
    check_same_outputs(ref.signature, cand.signature)


def check_data(models: list[Opened], x: Tensor, batch_size: int) -> None:
    """Refuse, before anything runs, models whose declared input does not fit batches of ``x``."""
    sizes = sorted({len(b) for b in iter_batches(x, batch_size)})
    for model in models:
        check_input(model.signature, tuple(x.shape[1:]), sizes, "the data")
