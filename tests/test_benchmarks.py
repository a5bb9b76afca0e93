"""benchmarks/planner.py: its engineered states are what it claims, and its acceptance line is honest."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import planner  # noqa: E402
from fold_latency import MISALIGN  # noqa: E402

from nepenthe_compress.entropy import measure_entropy  # noqa: E402
from nepenthe_compress.guard import Timing  # noqa: E402


def test_vit_engineering_pins_measured_states() -> None:
    e = planner.vit()
    report = measure_entropy(e.model, [e.x])
    stats = report.by_name()
    pinned = planner.pinned_sites(e)
    assert sorted(kind for kind, _ in pinned.values()) == ["dead", "dead", "on", "on"]
    for name, (kind, fraction) in pinned.items():
        s = stats[name]
        if kind == "on":
            assert s.zero_entropy and s.always()["ON"] == s.neurons == 384
        else:
            dead = int(s.neurons * fraction) + MISALIGN
            assert s.always() == {"OFF": dead, "ON": 0} and s.mixed == s.neurons - dead == 285
            assert (s.neurons - dead) % 4 != 0           # misaligned for the runtime's blocked kernels
    assert sum(s.zero_entropy for s in report.sites) == 2   # nothing else became zero-entropy


def _result(ms: dict[str, float], iqr: float = 0.1) -> planner.Result:
    times = {m: {b: Timing(t * b / 1e3, iqr * b / 1e3) for b in (1, 32)} for m, t in ms.items()}
    return planner.Result("toy", times, {}, {}, {}, {}, 1e-5, planner.guard(times), [])


def test_guard_falls_back_and_verdict_compares_with_every_variant() -> None:
    slow_auto = {"original": 10.0, "none": 9.5, "auto": 12.0, "all": 9.4, "keep-channels": 9.0}
    r = _result(slow_auto)
    assert r.decision.chosen == "keep-channels"
    assert planner.verdict(r).startswith("PASS toy: guard -> keep-channels (b1 1.11x b32 1.11x")
    r = _result(slow_auto | {"all": 8.0})
    line = planner.verdict(r)
    assert line.startswith("FAIL toy: guard -> keep-channels") and "slower than all at batch 1 (9 vs 8 ms)" in line
    assert planner.verdict(_result({v: 12.0 for v in slow_auto} | {"original": 10.0})).startswith(
        "FAIL toy: the guard chose nothing")


def test_verdict_fails_a_choice_slower_than_the_original_in_the_independent_rerun() -> None:
    r = _result({"original": 10.0, "none": 9.0, "auto": 8.0, "all": 12.0, "keep-channels": 9.5})
    assert r.decision.chosen == "auto" and planner.verdict(r).startswith("PASS")
    r.rerun = {m: {b: Timing(t * b / 1e3, 0.1 * b / 1e3) for b in (1, 32)}
               for m, t in {"original": 10.0, "auto": 11.0}.items()}
    line = planner.verdict(r)
    assert line.startswith("FAIL toy: guard -> auto")
    assert "slower than the original at batch 1 in the re-run (11 vs 10 ms)" in line
    r.rerun["auto"] = {b: Timing(10.04 * b / 1e3, 0.1 * b / 1e3) for b in (1, 32)}   # within noise
    assert planner.verdict(r).startswith("PASS")
