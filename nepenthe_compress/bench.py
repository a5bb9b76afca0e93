"""Latency measurement of ONNX models in onnxruntime (CPU) and of torch modules, same protocol.

Models compared together are timed in interleaved order (each repeat runs every model once, the
starting model rotating) on the same input tensor, so drifting machine load hits all of them alike.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from nepenthe_compress.errors import UserError
from nepenthe_compress.signature import (
    Signature,
    check_input,
    check_input_bytes,
    check_same_input,
    format_dims,
    onnx_signature,
)
from nepenthe_compress.verify import error_line, eval_mode, input_dtype, ort_session


def _sample_shape(sig: Signature) -> tuple[int, ...]:
    """Per-sample input shape declared by the model (all dims but the batch must be fixed)."""
    shape, dims = sig.sample_shape(), sig.input_dims()
    if shape is None:
        declared = f"input {format_dims(dims)} with free dims beyond the batch" if dims else "no input shape"
        raise UserError(f"'{sig.model}' declares {declared}: give the input shape explicitly")
    return shape


def _sample(shape: Sequence[int], seed: int) -> np.ndarray:
    """The seeded standard-normal input (float64): the same values for every model and runtime.
    Refused before allocation when over the input budget."""
    check_input_bytes(shape, np.dtype(np.float64).itemsize)
    return np.random.default_rng(seed).standard_normal(tuple(shape))


def _checked_shape(sigs: Mapping[str, Signature], baseline: str, input_shape: Sequence[int] | None,
                   batches: Sequence[int]) -> tuple[int, ...]:
    """The per-sample shape every model will be fed, after checking that each one declares an input
    that fits it (and the baseline's) at every batch size."""
    base = sigs[baseline]
    for sig in sigs.values():
        check_same_input(base, sig)
    shape = tuple(input_shape) if input_shape else _sample_shape(base)
    for sig in sigs.values():
        check_input(sig, shape, batches, "the input")
    return shape


def _input(session: ort.InferenceSession, shape: Sequence[int], seed: int) -> dict[str, np.ndarray]:
    return {session.get_inputs()[0].name: _sample(shape, seed).astype(input_dtype(session))}


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _interleaved(runs: Mapping[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Warm every model up, then time ``repeats`` rounds, each running every model once (rotating start)."""
    if repeats < 1 or warmup < 0:
        raise UserError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    names = list(runs)
    for name in names:
        for _ in range(warmup):
            runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(_timed(runs[name]))
    return times


def _onnx_run(session: ort.InferenceSession, feed: dict[str, np.ndarray], path: str | os.PathLike) -> Callable[[], object]:
    def run() -> object:
        try:
            return session.run(None, feed)
        except Exception as e:  # onnxruntime's pybind errors
            shape = tuple(next(iter(feed.values())).shape)
            raise UserError(f"onnxruntime failed on '{path}' with input {shape}: {error_line(e)}") from e
    return run


def bench_onnx(path: str | os.PathLike, input_shape: Sequence[int] | None, batch: int, threads: int = 2,
               warmup: int = 3, repeats: int = 20, seed: int = 0, provider: str = "cpu") -> list[float]:
    """Latencies (s) of ``repeats`` runs of the ONNX model on one seeded (batch, *input_shape) input."""
    session = ort_session(path, threads, provider)
    shape = _checked_shape({"model": onnx_signature(session, str(path))}, "model", input_shape, [batch])
    run = _onnx_run(session, _input(session, (batch, *shape), seed), path)
    return _interleaved({"model": run}, warmup, repeats)["model"]


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bench_torch(model: nn.Module, input_shape: Sequence[int], batch: int, threads: int = 2,
                warmup: int = 3, repeats: int = 20, seed: int = 0) -> list[float]:
    """Latencies (s) of the torch module (eval, no_grad, ``threads`` threads); same input as bench_onnx."""
    x = torch.from_numpy(_sample((batch, *input_shape), seed)).float()
    with eval_mode(model), torch.no_grad(), _torch_threads(threads):
        return _interleaved({"model": lambda: model(x)}, warmup, repeats)["model"]


@dataclass
class LatencyRow:
    model: str
    batch: int
    median_s: float
    iqr_s: float          # interquartile range of the repeats: the noise to judge a ratio against
    speedup: float        # baseline median / this median (> 1: faster than the baseline)


@dataclass
class LatencyTable:
    baseline: str
    input_shape: tuple[int, ...]
    threads: int
    repeats: int
    rows: list[LatencyRow]
    provider: str = "cpu"

    def median(self, model: str, batch: int) -> float:
        return next(r.median_s for r in self.rows if r.model == model and r.batch == batch)

    def to_dict(self) -> dict:
        return asdict(self)


def _row(name: str, batch: int, times: list[float], base: float) -> LatencyRow:
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    median = statistics.median(times)
    return LatencyRow(name, batch, median, q3 - q1, base / median)


def compare_latency(paths: Mapping[str, str | os.PathLike], input_shape: Sequence[int] | None = None,
                    batches: Sequence[int] = (1, 32), threads: int = 2, warmup: int = 3, repeats: int = 20,
                    seed: int = 0, baseline: str | None = None, provider: str = "cpu") -> LatencyTable:
    """Median latency of every ONNX model at every batch size, measured side by side (interleaved).

    All models get the same seeded input per batch size; ``baseline`` (default: the first model)
    is the reference of the speedups. ``input_shape`` defaults to the baseline model's input dims.
    ``provider``: the onnxruntime execution provider timed (``runtime.PROVIDERS``).
    """
    if not paths:
        raise UserError("no models to benchmark")
    baseline = baseline or next(iter(paths))
    if baseline not in paths:
        raise UserError(f"baseline {baseline!r} is not one of the models ({', '.join(paths)})")
    sessions = {name: ort_session(p, threads, provider) for name, p in paths.items()}
    sigs = {name: onnx_signature(s, str(paths[name])) for name, s in sessions.items()}
    shape = _checked_shape(sigs, baseline, input_shape, batches)
    for batch in batches:
        check_input_bytes((batch, *shape), np.dtype(np.float64).itemsize)
    rows: list[LatencyRow] = []
    for batch in batches:
        runs = {name: _onnx_run(s, _input(s, (batch, *shape), seed), paths[name]) for name, s in sessions.items()}
        times = _interleaved(runs, warmup, repeats)
        base = statistics.median(times[baseline])
        rows += [_row(name, batch, t, base) for name, t in times.items()]
    return LatencyTable(baseline, shape, threads, repeats, rows, provider)
