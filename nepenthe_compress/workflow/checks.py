"""The checks a fold must pass before anything is written: each has a name (its key in the report),
the stage it runs at, a ``run`` returning its outcome (verdict and figures) and, when ``fatal``, the
one-line error a failed verdict stops the fold with.

``CHECKS`` lists them in the order they run; add a check by writing a class with these members.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

from torch import Tensor, nn

from nepenthe_compress.data import iter_batches
from nepenthe_compress.entropy import EntropyReport, measure_entropy
from nepenthe_compress.errors import FoldError
from nepenthe_compress.verify import Runner, compare_runners, eval_mode, float32_noise, onnx_matches_torch, torch_runner
from nepenthe_compress.workflow.report import CheckName, CheckOutcome, Comparison, StateFlips, Verdict

EXACT_TOL = 1e-5   # max|diff| / max|ref| on data where the recorded states hold (docs/DESIGN.md 4)
NOISE_FACTOR = 10  # ... or 10x the original's own float32 rounding error, if that is larger
ONNX_BATCHES = (1, 7)  # onnxruntime is checked at two batch sizes (the export has a dynamic batch)


class Stage(Enum):
    FOLDED = "folded"      # the folded torch model exists
    EXPORTED = "exported"  # ... and its ONNX file


def tolerance(model: nn.Module, x: Tensor) -> tuple[float, float]:
    """(tolerance, noise): EXACT_TOL or NOISE_FACTOR x the model's own float32 rounding error on a
    few samples of ``x``, whichever is larger; a fold cannot be checked more tightly than that."""
    noise = float32_noise(model, [x[:2]])
    return max(EXACT_TOL, NOISE_FACTOR * noise), noise


@dataclass
class CheckContext:
    """Everything a check may read."""

    original: nn.Module
    folded: nn.Module
    calib: Tensor                   # calibration split (the states were measured on it)
    heldout: Tensor
    states: EntropyReport           # neuron states on ``calib``
    exact: bool                     # the fold claims exactness: comparisons are held to ``tolerance``
    tolerance: float
    batch_size: int = 64
    leaf_modules: tuple[str, ...] = ()
    onnx_path: Path | None = None   # the folded model's ONNX file (stage EXPORTED)
    _reference: dict = field(default_factory=dict, repr=False)   # the original's outputs, shared by copies

    def batches(self, x: Tensor) -> list[Tensor]:
        return list(iter_batches(x, self.batch_size))

    def reference(self) -> Runner:
        """The original model as a runner that computes each batch (of the context's splits) once:
        every folded variant is compared with the same outputs."""
        run = torch_runner(self.original)

        def cached(x: Tensor) -> list[Tensor]:
            key = (x.data_ptr(), tuple(x.shape), x.stride())
            if key not in self._reference:
                self._reference[key] = run(x)
            return self._reference[key]
        return cached


class Check(Protocol):
    name: CheckName
    stage: Stage
    fatal: bool      # a FAILED verdict stops the fold: nothing is written

    def run(self, ctx: CheckContext) -> CheckOutcome: ...

    def failure(self, outcome: CheckOutcome, ctx: CheckContext) -> str: ...


@dataclass(frozen=True)
class TorchEquivalence:
    """Original vs folded in torch on one split. Calibration: where the recorded states hold, an
    exact fold must match (fatal). Held-out: how well the states generalise (never fatal: where a
    state flips, the folded model differs by design)."""

    name: CheckName
    split: str                 # "calib" or "heldout", a tensor of the context
    fatal: bool
    stage: Stage = Stage.FOLDED

    def run(self, ctx: CheckContext) -> CheckOutcome:
        x = getattr(ctx, self.split)
        with eval_mode(ctx.original), eval_mode(ctx.folded):
            result = compare_runners(ctx.reference(), torch_runner(ctx.folded), ctx.batches(x), tol=ctx.tolerance)
        comparison = Comparison.of(result, ctx.exact)
        return CheckOutcome(self.name, comparison.verdict, comparison)

    def failure(self, outcome: CheckOutcome, ctx: CheckContext) -> str:
        where = "on the calibration data where the recorded states hold" if self.split == "calib" else \
            f"on the {self.split} data"
        return (f"folded model differs from the original {where}: max rel error "
                f"{outcome.figures.max_rel:.3g} > {ctx.tolerance:.3g}")  # type: ignore[union-attr]


def state_flips(calib: EntropyReport, held: EntropyReport) -> StateFlips:
    """Neurons constant on ``calib`` (the fold relies on them) whose state on ``held`` differs."""
    held_by = held.by_name()
    relied = flipped = 0
    for s in calib.sites:
        constant = s.constant_neurons
        other = held_by[s.name].neuron_state
        relied += int(constant.sum())
        flipped += int((constant & (other != s.neuron_state)).sum())
    return StateFlips(relied, flipped)


@dataclass(frozen=True)
class HeldoutStateFlips:
    """Figures only: the neurons the fold relies on that change state on the held-out split."""

    name: CheckName = CheckName.HELDOUT_STATE_FLIPS
    stage: Stage = Stage.FOLDED
    fatal: bool = False

    def run(self, ctx: CheckContext) -> CheckOutcome:
        held = measure_entropy(ctx.original, ctx.batches(ctx.heldout), leaf_modules=ctx.leaf_modules)
        return CheckOutcome(self.name, Verdict.MEASURED, state_flips(ctx.states, held))

    def failure(self, outcome: CheckOutcome, ctx: CheckContext) -> str:
        raise AssertionError("a measurement never fails")


@dataclass(frozen=True)
class OnnxMatchesTorch:
    """onnxruntime runs the exported file like torch runs the folded model, at two batch sizes;
    always held to the tolerance (also for inexact folds: the export itself must be exact)."""

    name: CheckName = CheckName.ONNX_VS_TORCH
    stage: Stage = Stage.EXPORTED
    fatal: bool = True

    def run(self, ctx: CheckContext) -> CheckOutcome:
        if ctx.onnx_path is None:
            raise ValueError("the ONNX check runs after the export")
        sizes = sorted({min(len(ctx.calib), n) for n in ONNX_BATCHES})
        results = tuple(Comparison.of(r, True, batch=r.samples) for r in (
            onnx_matches_torch(ctx.folded, ctx.onnx_path, [ctx.calib[:n]], tol=ctx.tolerance) for n in sizes))
        passed = all(c.verdict is Verdict.PASSED for c in results)
        return CheckOutcome(self.name, Verdict.PASSED if passed else Verdict.FAILED, results)

    def failure(self, outcome: CheckOutcome, ctx: CheckContext) -> str:
        worst = max(c.max_rel for c in outcome.figures)  # type: ignore[union-attr]
        return f"onnxruntime output of the folded model differs from torch: max rel error {worst:.3g}"


CHECKS: tuple[Check, ...] = (TorchEquivalence(CheckName.CALIBRATION, "calib", fatal=True),
                             TorchEquivalence(CheckName.HELDOUT, "heldout", fatal=False),
                             HeldoutStateFlips(), OnnxMatchesTorch())


def run_checks(checks: tuple[Check, ...], ctx: CheckContext, stage: Stage) -> list[CheckOutcome]:
    """Run the checks of ``stage`` in order; ``FoldError`` at the first fatal one that fails."""
    outcomes = []
    for check in (c for c in checks if c.stage is stage):
        outcome = check.run(ctx)
        if check.fatal and outcome.verdict is Verdict.FAILED:
            raise FoldError(check.failure(outcome, ctx))
        outcomes.append(outcome)
    return outcomes
