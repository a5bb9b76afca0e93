"""The driver: the registry runs to a fixpoint in priority order, guarded against rewrites that
undo each other; the rewriting state (log, module replacement) and the backwards-compatible names."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from kit import assert_exact, fold, image, set_states, weighted
from nepenthe_compress.fold import core, graph
from nepenthe_compress.fold.driver import FoldedModel, fold_model, run_rewrites
from nepenthe_compress.fold.protocol import Rewrite
from nepenthe_compress.fold.rewriter import FoldEvent, FoldOptions, GraphRewriter
from nepenthe_compress.fold.rewrites import REWRITES
from nepenthe_compress.trace import trace_model


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x))


def rewriter() -> GraphRewriter:
    return GraphRewriter(trace_model(Two()))


def counter(name: str, budget: dict[str, int], seen: list[str]) -> Rewrite:
    """A rewrite that changes the graph ``budget[name]`` times (one candidate per sweep)."""
    def match(rw):
        seen.append(name)
        return [name] if budget[name] > 0 else []

    def apply(rw, plan):
        budget[name] -= 1

    return Rewrite(name, "test", (), "test", "tests/fold/test_driver.py", match, lambda rw, c: c, apply)


def test_the_first_rewrite_that_changes_the_graph_runs_then_the_driver_starts_over() -> None:
    seen: list[str] = []
    budget = {"first": 2, "second": 1, "third": 0}
    rewrites = [counter(n, budget, seen) for n in budget]
    assert run_rewrites(rewriter(), rewrites) == 3
    assert seen == ["first", "first", "first", "second", "first", "second", "third"]
    assert budget == {"first": 0, "second": 0, "third": 0}


def test_rewrites_undoing_each_other_are_an_internal_error() -> None:
    def flip(rw, plan):
        rw.channels_dropped += 1

    forever = Rewrite("flip", "test", (), "test", "tests/fold/test_driver.py", lambda rw: [1], lambda rw, c: c, flip)
    rw = rewriter()
    with pytest.raises(RuntimeError, match="internal error: the fold rewrites did not reach a fixpoint"):
        run_rewrites(rw, [forever])
    assert rw.channels_dropped == 20 * (len(rw.gm.graph.nodes) + 1) + 1


def test_disabled_rewrites_do_not_run() -> None:
    seen: list[str] = []
    merging = Rewrite("merge", "test", (), "test", "tests/fold/test_driver.py", lambda rw: seen.append("m") or [],
                      lambda rw, c: c, lambda rw, p: None, enabled=lambda options: options.merge != "none")
    assert run_rewrites(GraphRewriter(trace_model(Two()), FoldOptions(merge="none")), [merging]) == 0
    assert run_rewrites(GraphRewriter(trace_model(Two()), FoldOptions(merge="all")), [merging]) == 0
    assert seen == ["m"]


class LinearResidualThenConv(nn.Module):
    """A fully linear identity block (1x1 -> ReLU -> 1x1, + x) followed by a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.c(self.b(F.relu(self.a(x))) + x)


def test_merges_enabled_by_a_residual_merge_are_made_without_channel_drops() -> None:
    """(b a + I) -> c: the residual merge creates a new chain; merge='all' must reach one conv
    even though no channel is dropped (the fold runs to a fixpoint)."""
    torch.manual_seed(0)
    m, x = LinearResidualThenConv().double(), image(8)
    set_states(m, x, {m.a: "on"})
    f = fold(m, x, merge="all")
    assert f.channels_dropped == 0
    assert len(weighted(f)) == 1
    assert_exact(m, f, x)


def test_unknown_merge_mode_is_refused() -> None:
    m, x = Two(), torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="merge must be auto, all or none, not 'some'"):
        fold_model(m, None, x, FoldOptions(merge="some"))


def test_skips_are_recorded_once_and_set_module_never_mutates_a_shared_module() -> None:
    rw = rewriter()
    for _ in range(2):
        rw.record("skip", "a", "same reason")
        rw.record("fold", "a", "into b")
    assert [e.to_dict() for e in rw.log] == [{"action": "skip", "where": "a", "detail": "same reason"},
                                             {"action": "fold", "where": "a", "detail": "into b"},
                                             {"action": "fold", "where": "a", "detail": "into b"}]
    a = next(n for n in rw.gm.graph.nodes if n.target == "a")
    old = rw.module(a)
    rw.set_module(a, nn.Conv2d(2, 2, 1))
    assert rw.gm.get_submodule("a") is old and rw.label(a) == "a" and rw.module(a) is not old


def test_backwards_compatible_names() -> None:
    assert core.fold_graph is fold_model and core.FoldedGraph is FoldedModel
    assert graph.FoldGraph is GraphRewriter and graph.FoldOptions is FoldOptions and graph.FoldEvent is FoldEvent
    assert isinstance(REWRITES, tuple) and all(isinstance(r, Rewrite) for r in REWRITES)


def test_folded_model_counts_events() -> None:
    f = FoldedModel(fx.symbolic_trace(Two()), [FoldEvent("merge", "a", ""), FoldEvent("skip", "b", ""),
                                              FoldEvent("merge", "c", "")], 3, [], 0)
    assert (f.count("merge"), f.count("skip"), f.count("drop")) == (2, 1, 0)
