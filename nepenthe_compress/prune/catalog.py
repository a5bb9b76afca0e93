"""The names (and one-line summaries) of the pruning methods and learning-rate schedules, without
importing torch: the CLI's ``prune --help`` and option checks read them here. ``methods.METHODS`` and
``train.SCHEDULES`` implement exactly these names (a test keeps them in step)."""
from __future__ import annotations

METHOD_SUMMARIES: dict[str, str] = {
    "nepenthe": "NEPENTHE/EGP: entropy-guided per-layer budget, zero-entropy sites linearised",
    "imp": "iterative global magnitude pruning",
    "easier": "EASIER: linearise the lowest-entropy site per round",
}
SCHEDULE_NAMES: tuple[str, ...] = ("cosine", "multistep", "constant")
