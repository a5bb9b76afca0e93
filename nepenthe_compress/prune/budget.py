"""How many weights each layer loses in one pruning round (docs/DESIGN.md 3). Pure numpy, no graphs.

NEPENTHE / EGP (eq. 4-8): ``I_l = H_l * mean|theta_l|`` over the non-zero weights of layer l;
``R_l = (sum_j I_j) / I_l`` (0 when ``I_l = 0``); ``P_l = P * softmax(R)_l``. A layer asked for more
than it has left is pruned completely and the excess goes to the other layers by the same rule
(softmax of their R); integer counts are then rounded so that they sum to P exactly.

IMP: the k smallest surviving magnitudes over all considered layers (one global threshold).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def prune_amount(zeta: float, nonzero: int, cap: int | None = None) -> int:
    """``zeta * nonzero`` rounded half up, at most ``cap`` (what a sparsity target still allows)."""
    amount = math.floor(zeta * nonzero + 0.5)
    return amount if cap is None else max(0, min(amount, cap))


def target_cap(nonzero: int, total: int, target: float | None) -> int | None:
    """Most weights that may still go before the sparsity over ``total`` weights exceeds ``target``."""
    if target is None:
        return None
    keep = math.ceil((1.0 - target) * total - 1e-9)
    return max(0, nonzero - keep)


def importance(entropies: Sequence[float], mean_abs: Sequence[float]) -> np.ndarray:
    """``I_l = H_l * mean|theta_l|`` (eq. 6), float64."""
    return np.asarray(entropies, dtype=np.float64) * np.asarray(mean_abs, dtype=np.float64)


def redundancy(importances: np.ndarray) -> np.ndarray:
    """``R_l = sum_j I_j / I_l``; 0 for ``I_l = 0`` (eq. 7). May hold ``inf`` for tiny ``I_l``."""
    total = importances.sum()
    with np.errstate(divide="ignore", over="ignore"):
        return np.where(importances > 0, total / np.where(importances > 0, importances, 1.0), 0.0)


def softmax(r: np.ndarray) -> np.ndarray:
    """Numerically stable softmax (max subtracted); infinite entries share everything equally."""
    r = np.asarray(r, dtype=np.float64)
    infinite = np.isposinf(r)
    if infinite.any():
        return infinite / infinite.sum()
    e = np.exp(r - r.max())
    return e / e.sum()


def nepenthe_budget(total: int, entropies: Sequence[float], mean_abs: Sequence[float],
                    remaining: Sequence[int]) -> np.ndarray:
    """Per-layer prune counts (int64) summing to ``min(total, sum(remaining))`` (eq. 8).

    ``entropies[l]``: H_l in bits; ``mean_abs[l]``: mean |weight| over its non-zero weights;
    ``remaining[l]``: its non-zero weight count.
    """
    remaining = np.asarray(remaining, dtype=np.int64)
    total = int(min(total, remaining.sum()))
    r = redundancy(importance(entropies, mean_abs))
    alloc = np.zeros(len(remaining), dtype=np.float64)
    open_ = remaining > 0
    while total > 0 and open_.any():
        left = total - alloc[~open_].sum()
        share = np.zeros_like(alloc)
        share[open_] = softmax(r[open_])
        want = left * share
        over = open_ & (want >= remaining)
        if not over.any():
            alloc[open_] = want[open_]
            break
        alloc[over] = remaining[over]
        open_ &= ~over
    return round_preserving_total(alloc, total, remaining)


def round_preserving_total(alloc: np.ndarray, total: int, cap: np.ndarray) -> np.ndarray:
    """Largest-remainder rounding of ``alloc`` to integers <= ``cap`` that sum to ``total``."""
    floors = np.minimum(np.floor(alloc), cap).astype(np.int64)
    short = total - int(floors.sum())
    if short <= 0:
        return floors
    frac = np.where(floors < cap, alloc - floors, -np.inf)
    order = np.argsort(-frac, kind="stable")[:short]
    floors[order] += 1
    return floors


def global_magnitude_counts(magnitudes: Sequence[np.ndarray], k: int) -> np.ndarray:
    """How many of each layer's surviving weights are among the ``k`` globally smallest (IMP).

    ``magnitudes[l]`` holds layer l's surviving |weights| in flat order. Ties go to the earlier
    layer / position, so the result matches a stable per-layer smallest-first selection.
    """
    sizes = np.array([len(m) for m in magnitudes], dtype=np.int64)
    k = int(min(k, sizes.sum()))
    if k <= 0:
        return np.zeros(len(sizes), dtype=np.int64)
    flat = np.concatenate([np.asarray(m, dtype=np.float64).ravel() for m in magnitudes])
    chosen = np.argsort(flat, kind="stable")[:k]
    layer_of = np.repeat(np.arange(len(sizes)), sizes)
    return np.bincount(layer_of[chosen], minlength=len(sizes)).astype(np.int64)
