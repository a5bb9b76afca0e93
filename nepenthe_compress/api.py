"""The Python API (``import nepenthe_compress as nc``): ``nc.load_checkpoint``, ``nc.measure_entropy``
and ``nc.fold``, the same library the CLI verbs run.

``model`` is an ``nn.Module``, a ``LoadedCheckpoint`` or a checkpoint path (loaded with the safe
defaults). ``calib`` is a data spec string (``"mnist"``, ``"data.npz"``, an image folder, ...), a
tensor or numpy array of samples, or an iterable of batches such as a ``DataLoader`` (yielding
tensors or ``(x, y)`` tuples); in-memory samples are used as given (no normalisation). Without
``calib``, a checkpoint's own calibration data is used.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import nn

from nepenthe_compress.certify import DEFAULT_MARGIN
from nepenthe_compress.checkpoint import LoadedCheckpoint
from nepenthe_compress.checkpoint import load_checkpoint as _load
from nepenthe_compress.data import Samples, iter_batches, resolve_inputs
from nepenthe_compress.entropy import EntropyReport
from nepenthe_compress.entropy import measure_entropy as _measure
from nepenthe_compress.fold.graph import FoldOptions
from nepenthe_compress.runtime import Runtime
from nepenthe_compress.workflow import fold as workflow
from nepenthe_compress.workflow.fold import FoldResult, FoldSettings
from nepenthe_compress.workflow.report import FoldReport

__all__ = ["FoldReport", "FoldResult", "LoadedCheckpoint", "fold", "load_checkpoint", "measure_entropy"]

MERGE_MODES = ("auto", "all", "none")
Model = nn.Module | LoadedCheckpoint | str | os.PathLike


def load_checkpoint(path: str | os.PathLike, *, arch: str | None = None, arch_kwargs: dict | None = None,
                    trust_pickle: bool = False, code_path: str | None = None,
                    linearised_sites: tuple[str, ...] = ()) -> LoadedCheckpoint:
    """Load a checkpoint of any accepted form (this tool's, a state_dict with ``arch``, a pickled
    module with ``trust_pickle``) into an eval-mode model: ``.model``, ``.meta``, ``.notes``, ..."""
    return _load(path, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle, code_path=code_path,
                 linearised_sites=linearised_sites)


def _loaded(model: Model) -> nn.Module | LoadedCheckpoint:
    if isinstance(model, (str, os.PathLike)):
        return load_checkpoint(model)
    if not isinstance(model, (nn.Module, LoadedCheckpoint)):
        raise TypeError(f"model must be an nn.Module, a LoadedCheckpoint or a checkpoint path, "
                        f"not {type(model).__name__}")
    return model


def _overrides(input_shape: Any, normalize: Any, channels: Any) -> dict[str, Any]:
    return {k: v for k, v in (("input_shape", input_shape), ("normalize", normalize), ("channels", channels))
            if v is not None}


def measure_entropy(model: Model, calib: Samples | None = None, *, limit: int | None = None, batch_size: int = 64,
                    leaf_modules: tuple[str, ...] = (), input_shape: tuple[int, ...] | None = None,
                    normalize: dict | None = None, channels: int | None = None) -> EntropyReport:
    """Neuron states of every rectifier site of ``model`` on ``calib`` (eval mode): per site the
    neurons always OFF / ON (or LINEAR / SATURATED) and the entropy; ``.zero_entropy_sites``,
    ``.to_dict()``. ``input_shape`` / ``normalize`` / ``channels`` override a checkpoint's own."""
    source = _loaded(model)
    net, meta, where = ((source.model, source.meta, str(source.path)) if isinstance(source, LoadedCheckpoint)
                        else (source, {}, "the model"))
    data = resolve_inputs(calib, {**meta, **_overrides(input_shape, normalize, channels)}, where=where,
                          limit=limit, models=[net])
    return _measure(net, list(iter_batches(data.x, batch_size)), leaf_modules=leaf_modules)


def fold(model: Model, calib: Samples | None = None, merge: str = "auto", *, allow_inexact: bool = False,
         approximate: bool = False, drop_channels: bool = True, channel_align: int = 8, holdout: float = 0.2,
         limit: int | None = None, batch_size: int = 64, bench: bool = False, bench_repeats: int = 20,
         pt2: bool = False, leaf_modules: tuple[str, ...] = (), input_shape: tuple[int, ...] | None = None,
         normalize: dict | None = None, channels: int | None = None, bench_batches: tuple[int, ...] = (1, 32),
         provider: str = "cpu", threads: int = 2, require_speedup: float | None = None, cost: str = "measured",
         margin: float = DEFAULT_MARGIN, max_flip_rate: float = 0.0, holdout_tolerance: float | None = None,
         progress: Callable[[str], None] | None = None) -> FoldResult:
    """Fold ``model`` on ``calib`` as ``nepenthe-compress fold`` does, without writing anything.

    ``merge``: ``auto`` (where the cost model predicts a gain), ``all`` (every exact merge) or
    ``none``. The result holds ``.model`` (the folded ``nn.Module``), ``.report`` (a ``FoldReport``;
    ``.to_dict()`` is the CLI's report.json) and ``.save(outdir, force=False)``, which writes the
    CLI's files, all or nothing. Raises ``FoldError`` when the folded model differs from the original
    where the recorded states hold (or onnxruntime differs from torch). ``bench=True`` runs the speed
    guard: the fold and its simpler exact variants are timed against the original in onnxruntime
    (``provider``, ``threads``, at ``bench_batches``) and the fastest one not slower is kept
    (``.report.guard``); ``FoldError`` when none is, or none is ``require_speedup`` times faster.
    ``cost``: how ``merge="auto"`` prices merges, ``measured`` on ``provider`` (cached on disk) or ``flops``.
    ``margin`` / ``max_flip_rate`` / ``holdout_tolerance``: which recorded states the fold relies on and
    how the held-out split is held (``.report.certification``; ``FoldError`` when it differs there).
    ``progress`` is called with each step's name as it starts.
    """
    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {', '.join(MERGE_MODES)}, not {merge!r}")
    settings = FoldSettings(FoldOptions(merge, allow_inexact, approximate, drop_channels, channel_align), holdout,
                            batch_size, bench, bench_repeats, pt2, tuple(leaf_modules), bench_batches=tuple(bench_batches),
                            runtime=Runtime(provider, threads), require_speedup=require_speedup, cost=cost,
                            margin=margin, max_flip_rate=max_flip_rate, holdout_tolerance=holdout_tolerance)
    return workflow.fold(_loaded(model), calib, settings, data_overrides=_overrides(input_shape, normalize, channels),
                         limit=limit, progress=progress or (lambda step: None))
