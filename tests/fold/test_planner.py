"""The merge planner: on a synthetic cost table the chain partition is the brute-force optimum; the
measured cost model times layers on the runtime once and serves them from its on-disk cache."""
from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from kit import D, measure, set_states
from nepenthe_compress.fold import algebra as A
from nepenthe_compress.fold import measured as M
from nepenthe_compress.fold.driver import fold_model
from nepenthe_compress.fold.rewriter import FoldOptions
from nepenthe_compress.runtime import Runtime
from test_merge_chains import Chain


@dataclass
class TableCost:
    """A linear layer (in, out) costs ``table[in, out]``: arbitrary, so only the optimum is right."""

    table: dict[tuple[int, int], float]

    def layer_cost(self, spec, in_shape) -> float:
        out_f, in_f = spec.weight.shape
        return self.table[in_f, out_f]


def brute_force(widths: list[int], table: dict[tuple[int, int], float]) -> list[tuple[int, int]]:
    """Cheapest split of the chain widths[0] -> ... -> widths[-1] into merged segments, by trying all."""
    n = len(widths) - 1
    best = None
    for cuts in itertools.product([False, True], repeat=n - 1):   # cut after layer i?
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
        layers = [(widths[a], widths[b]) for a, b in zip(bounds, bounds[1:])]
        price = sum(table[p] for p in layers)
        if best is None or price < best[0]:
            best = (price, layers)
    return best[1]


@pytest.mark.parametrize("seed", range(12))
def test_chain_partition_is_the_brute_force_optimum_on_a_synthetic_table(seed: int) -> None:
    rng = random.Random(seed)
    widths = [rng.choice([3, 5, 8, 13, 21]) for _ in range(6)]      # 5 linear layers, 4 ON sites
    table = {(a, b): rng.uniform(1, 10) for a in set(widths) for b in set(widths)}
    torch.manual_seed(seed)
    m = Chain(*(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))).double()
    x = torch.randn(16, widths[0], dtype=D)
    set_states(m, x, {layer: "on" for layer in m.layers[:-1]})
    folded = fold_model(m, measure(m, x), x[:2], FoldOptions(merge="auto"), cost=TableCost(table))
    gm = folded.model
    called = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]   # in order
    got = [(mod.in_features, mod.out_features) for mod in called if isinstance(mod, nn.Linear)]
    assert got == brute_force(widths, table)
    with torch.no_grad():
        assert (folded.model(x) - m(x)).abs().max() <= 1e-10 * m(x).abs().max()


# ---- the measured cost model and its cache ------------------------------------------------------------

def conv(ci: int, co: int, k: int, stride: int = 1, seed: int = 0) -> A.ConvSpec:
    g = torch.Generator().manual_seed(seed)
    return A.ConvSpec(torch.randn(co, ci, k, k, generator=g, dtype=D), torch.zeros(co, dtype=D), (stride, stride),
                      (0, 0), (1, 1), 1, None)


def test_cost_key_is_the_structure_not_the_values() -> None:
    rt, shape = Runtime(), (1, 8, 12, 12)
    key = M.cost_key(conv(8, 16, 3), shape, 1, rt)
    assert key == M.cost_key(conv(8, 16, 3, seed=1), shape, 1, rt)       # other weights
    others = [M.cost_key(conv(8, 16, 5), shape, 1, rt), M.cost_key(conv(8, 16, 3, 2), shape, 1, rt),
              M.cost_key(conv(8, 16, 3), (1, 8, 13, 12), 1, rt), M.cost_key(conv(8, 16, 3), shape, 32, rt),
              M.cost_key(conv(8, 16, 3), shape, 1, Runtime(threads=1))]
    assert len({key, *others}) == 6


def test_measured_costs_are_timed_once_then_read_from_the_cache(tmp_path) -> None:
    spec, small = conv(8, 16, 3), conv(8, 16, 1)
    first = M.MeasuredCost(Runtime(threads=1), (1, 4), M.CostCache(tmp_path))
    big_cost, small_cost = first.layer_cost(spec, (1, 8, 16, 16)), first.layer_cost(small, (1, 8, 16, 16))
    assert first.measured == 2 and big_cost > 0 and small_cost > 0
    first.cache.save()
    stored = json.loads((tmp_path / M.CACHE_FILE).read_text())
    assert len(stored) == 3 * 2            # two layers and the yardstick, at two batch sizes each
    second = M.MeasuredCost(Runtime(threads=1), (1, 4), M.CostCache(tmp_path))
    assert second.layer_cost(spec, (1, 8, 16, 16)) == big_cost and second.measured == 0


def test_every_batch_size_weighs_alike(tmp_path, monkeypatch) -> None:
    """cost = sum over batches of (seconds per sample / the yardstick's at that batch)."""
    ref, _ = M.reference_spec()

    def fake(spec, in_shape, batches, runtime):
        per = {1: 2e-3, 32: 1e-4} if spec.weight.shape == ref.weight.shape else {1: 1e-3, 32: 3e-4}
        return {b: per[b] for b in batches}
    monkeypatch.setattr(M, "time_layer", fake)
    cost = M.MeasuredCost(Runtime(), (1, 32), M.CostCache(tmp_path)).layer_cost(conv(8, 16, 3), (1, 8, 8, 8))
    assert cost == pytest.approx(1e-3 / 2e-3 + 3e-4 / 1e-4)


@pytest.mark.parametrize("content", [b"not json", b'{"k": "1.0"}', b'{"k": NaN}', b'{"k": -1}', b'[1, 2]',
                                     b'{"k": true}'])
def test_a_bad_cache_file_is_ignored_and_replaced(tmp_path, content: bytes) -> None:
    (tmp_path / M.CACHE_FILE).write_bytes(content)
    cache = M.CostCache(tmp_path)
    assert cache.entries == {}
    cache.put("a", 0.5)
    cache.save()
    assert json.loads((tmp_path / M.CACHE_FILE).read_text()) == {"a": 0.5}


def test_an_oversized_cache_file_is_not_read(tmp_path, monkeypatch) -> None:
    (tmp_path / M.CACHE_FILE).write_text(json.dumps({"a": 1.0, "b": 2.0}))
    assert M.CostCache(tmp_path).entries == {"a": 1.0, "b": 2.0}
    monkeypatch.setattr(M, "MAX_CACHE_BYTES", 10)
    assert M.CostCache(tmp_path).entries == {}


def test_cache_location_follows_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NEPENTHE_CACHE_DIR", str(tmp_path / "c"))
    assert M.CostCache().path == tmp_path / "c" / M.CACHE_FILE
    monkeypatch.delenv("NEPENTHE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert M.CostCache().path == tmp_path / "x" / "nepenthe-compress" / M.CACHE_FILE
