"""The rewrite protocol: every transformation of the fold pass is a declared ``Rewrite``.

A rewrite names the graph pattern it looks for, the pure algebra (``fold.algebra``) that computes
its result, the condition under which that result is exact, whether it consults the cost model,
and the test file that checks it. It acts in three steps:

- ``match(rw)`` yields candidates: places in the graph where the pattern holds (lazily, so each
  candidate is looked at against the graph as earlier candidates of the same sweep left it);
- ``plan(rw, candidate)`` computes what to do (new specs, modules, channel lists) without touching
  the graph, or returns None, recording a ``skip`` event with the reason when the pattern holds
  but the rewrite is refused (not exact, no gain, unsupported);
- ``apply(rw, plan)`` changes the graph and records what it did.

``fold.driver.run_rewrites`` runs a list of them to a fixpoint; ``fold.rewrites.REWRITES`` is the
registry (in priority order) and ``fold.rewrites.table`` documents it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from nepenthe_compress.fold.rewriter import FoldOptions, GraphRewriter


def always(options: FoldOptions) -> bool:
    return True


def merging(options: FoldOptions) -> bool:
    """Merges are made unless ``--merge none``."""
    return options.merge != "none"


@dataclass(frozen=True)
class Rewrite:
    name: str
    pattern: str                              # e.g. "conv|linear -> per-channel affine"
    algebra: tuple[Callable, ...]             # the pure functions computing the result
    exactness: str                            # when the result equals the original
    tests: str                                # test file, relative to the repository root
    match: Callable[[GraphRewriter], Iterable[Any]]
    plan: Callable[[GraphRewriter, Any], Any | None]
    apply: Callable[[GraphRewriter, Any], None]
    cost: str | None = None                   # None, or how candidates are priced
    enabled: Callable[[FoldOptions], bool] = always

    def sweep(self, rw: GraphRewriter) -> bool:
        """Plan and apply every candidate once; True if the graph changed."""
        changed = False
        for candidate in self.match(rw):
            plan = self.plan(rw, candidate)
            if plan is not None:
                self.apply(rw, plan)
                changed = True
        return changed
