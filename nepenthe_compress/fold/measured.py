"""A cost model measured on the target runtime (``--cost measured``), with an on-disk cache.

Each layer spec the planner prices (a layer as it is, or a merge candidate) is exported alone to
ONNX and timed in onnxruntime with its real input shape at every batch size the guard uses. Its cost
is, summed over those batch sizes, its median latency per sample divided by that of a fixed
reference conv at the same batch size: every batch size weighs alike, so a merge that saves per-call
overhead at batch 1 but costs more arithmetic at batch 32 is not bought by batch 1 alone. Timings
depend only on shapes and the runtime, so they are cached on disk per batch size, keyed by (the
spec's structure: kind, tensor shapes, stride, padding, ...; the input shape; the batch size;
onnxruntime's version, provider, threads and the CPU's flags): a second fold of the same
architecture measures nothing.

The cache is a JSON file of positive finite floats (``NEPENTHE_CACHE_DIR``, default
``$XDG_CACHE_HOME/nepenthe-compress`` or ``~/.cache/nepenthe-compress``). A file that is too large,
unreadable or holds anything else is ignored (and replaced on the next save): it only ever costs a
re-measurement. Per-layer timing misses fusions across layers; the whole-model guard catches what
it mispredicts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nepenthe_compress.cache import cache_dir
from nepenthe_compress.fold.ops import Shape, Spec, kind_of_spec, module_of
from nepenthe_compress.io import atomic_path
from nepenthe_compress.runtime import Runtime

CACHE_FILE = "layer-costs-v1.json"
MAX_CACHE_BYTES = 16 << 20
MAX_CACHE_ENTRIES = 100_000
WARMUP, REPEATS = 2, 7


def _structure(value: Any) -> Any:
    """A JSON-able description of a spec that keeps what timing depends on: tensors by shape."""
    if isinstance(value, Tensor):
        return ["tensor", list(value.shape)]
    if dataclasses.is_dataclass(value):
        return [type(value).__name__, {f.name: _structure(getattr(value, f.name)) for f in dataclasses.fields(value)}]
    if isinstance(value, (tuple, list)):
        return [_structure(v) for v in value]
    return value


def cost_key(spec: Spec, in_shape: Shape, batch: int, runtime: Runtime) -> str:
    text = json.dumps([runtime.fingerprint(), _structure(spec), list(in_shape[1:]), batch], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class CostCache:
    """Measured costs on disk (one JSON object: key -> seconds); ``save`` merges and replaces atomically."""

    def __init__(self, folder: Path | None = None) -> None:
        self.path = (folder or cache_dir()) / CACHE_FILE
        self.entries = self._read()
        self.new: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        try:
            if not self.path.is_file() or self.path.stat().st_size > MAX_CACHE_BYTES:
                return {}
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or len(data) > MAX_CACHE_ENTRIES:
            return {}
        return {k: float(v) for k, v in data.items() if isinstance(k, str) and isinstance(v, (int, float))
                and not isinstance(v, bool) and math.isfinite(v) and v > 0}

    def get(self, key: str) -> float | None:
        return self.new.get(key, self.entries.get(key))

    def put(self, key: str, seconds: float) -> None:
        self.new[key] = seconds

    def save(self) -> None:
        """Write the merged entries (best effort: a cache that cannot be written is not an error)."""
        if not self.new:
            return
        merged = {**self._read(), **self.new}
        if len(merged) > MAX_CACHE_ENTRIES:
            merged = dict(self.new)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(merged), encoding="utf-8")
        except OSError:
            return
        self.entries, self.new = merged, {}


def time_layer(spec: Spec, in_shape: Shape, batches: Sequence[int], runtime: Runtime) -> dict[int, float]:
    """Median latency per sample (s) of ``spec`` alone in onnxruntime, per batch size."""
    from nepenthe_compress.export import export_onnx
    from nepenthe_compress.verify import ort_session

    like = nn.Conv2d(1, 1, 1)   # float32 on the CPU: the dtype and device the layer is timed in
    layer = module_of(spec, like).eval()
    example = torch.randn(2, *in_shape[1:])
    per_sample = {}
    with tempfile.TemporaryDirectory(prefix="nepenthe-cost-") as folder:
        path = export_onnx(layer, example, Path(folder) / "layer.onnx", check=False, exporter="torchscript")
        session = ort_session(path, runtime.threads, runtime.provider)
        name = session.get_inputs()[0].name
        for b in batches:
            feed = {name: torch.randn(b, *in_shape[1:]).numpy()}
            for _ in range(WARMUP):
                session.run(None, feed)
            times = []
            for _ in range(REPEATS):
                start = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - start)
            per_sample[b] = statistics.median(times) / b
    return per_sample


def reference_spec() -> tuple[Spec, Shape]:
    """The yardstick of every batch size: a 3x3 conv, 64 -> 64 channels, on 16x16."""
    from nepenthe_compress.fold.algebra import ConvSpec

    weight = torch.zeros(64, 64, 3, 3, dtype=torch.float64)
    return ConvSpec(weight, torch.zeros(64, dtype=torch.float64), (1, 1), (1, 1), (1, 1), 1, None), (1, 64, 16, 16)


@dataclasses.dataclass
class MeasuredCost:
    """``layer_cost`` measured on ``runtime`` at ``batches`` (cached; ``cache.save()`` after the fold)."""

    runtime: Runtime = dataclasses.field(default_factory=Runtime)
    batches: tuple[int, ...] = (1, 32)
    cache: CostCache = dataclasses.field(default_factory=CostCache)
    measured: int = 0     # layers timed (cache misses)
    looked_up: int = 0    # layers priced
    _yardstick: dict[int, float] | None = dataclasses.field(default=None, repr=False)

    def per_sample(self, spec: Spec, in_shape: Shape) -> tuple[dict[int, float], bool]:
        """Seconds per sample at each batch size, from the cache or timed (and cached); and whether
        anything had to be timed."""
        keys = {b: cost_key(spec, in_shape, b, self.runtime) for b in self.batches}
        known = {b: self.cache.get(k) for b, k in keys.items()}
        missing = [b for b, t in known.items() if t is None]
        for b, seconds in (time_layer(spec, in_shape, missing, self.runtime) if missing else {}).items():
            self.cache.put(keys[b], seconds)
            known[b] = seconds
        return known, bool(missing)  # type: ignore[return-value]

    def layer_cost(self, spec: Spec, in_shape: Shape) -> float:
        kind_of_spec(spec)   # unknown spec types fail here, before any export
        self.looked_up += 1
        times, timed = self.per_sample(spec, in_shape)
        self.measured += timed
        if self._yardstick is None:
            self._yardstick = self.per_sample(*reference_spec())[0]
        return sum(times[b] / self._yardstick[b] for b in self.batches)
