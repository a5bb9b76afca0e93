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
from nepenthe_compress.certify import Certification, flipped
from nepenthe_compress.entropy import EntropyReport, measure_entropy
from nepenthe_compress.errors import FoldError
from nepenthe_compress.verify import Runner, compare_runners, eval_mode, float32_noise, onnx_runner, torch_runner
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
    heldout_states: EntropyReport | None = None     # neuron states on ``heldout`` (measured when None)
    certification: Certification | None = None      # what the plan relies on, and the evidence
    heldout_tolerance: float | None = None          # held-out max rel error allowed (None: only measured)
    _reference: dict = field(default_factory=dict, repr=False)   # the original's outputs, shared by copies

    def batches(self, x: Tensor) -> list[Tensor]:
        return list(iter_batches(x, self.batch_size))

    def held_to(self, split: str) -> float | None:
        """The tolerance a comparison on ``split`` is held to (None: figures only)."""
        if split == "calib":
            return self.tolerance if self.exact else None
        return self.heldout_tolerance

    def held_states(self) -> EntropyReport:
        """Neuron states on the held-out split (measured here when not given)."""
        return self.heldout_states or measure_entropy(self.original, self.batches(self.heldout),
                                                      leaf_modules=self.leaf_modules)

    def flipped_sites(self) -> dict[str, int]:
        """Site label -> neurons the plan relies on whose state differs on the held-out split."""
        held_by = self.held_states().by_name()
        counts = {s.target: int(flipped(s, held_by[s.name]).sum()) for s in self.states.sites if s.name in held_by}
        return {k: v for k, v in counts.items() if v}

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

    def reference_is_zero(self) -> bool:
        """Whether every output of the original computed so far is exactly 0 (then a comparison
        with it proves nothing)."""
        outputs = [t for outs in self._reference.values() for t in outs]
        return bool(outputs) and all(not t.any() for t in outputs)


class Check(Protocol):
    name: CheckName
    stage: Stage
    fatal: bool      # a FAILED verdict stops the fold: nothing is written

    def run(self, ctx: CheckContext) -> CheckOutcome: ...

    def failure(self, outcome: CheckOutcome, ctx: CheckContext) -> str: ...


@dataclass(frozen=True)
class TorchEquivalence:
    """Original vs folded in torch on one split. Calibration: where the recorded states hold, an
    exact fold must match. Held-out: the states the plan relies on were checked there (flipped ones
    are excluded, see ``certify``), so the fold must match it too, to ``heldout_tolerance``."""

    name: CheckName
    split: str                 # "calib" or "heldout", a tensor of the context
    fatal: bool
    stage: Stage = Stage.FOLDED

    def run(self, ctx: CheckContext) -> CheckOutcome:
        x = getattr(ctx, self.split)
        tol = ctx.held_to(self.split)
        with eval_mode(ctx.original), eval_mode(ctx.folded):
            result = compare_runners(ctx.reference(), torch_runner(ctx.folded), ctx.batches(x),
                                     tol=ctx.tolerance if tol is None else tol)
        comparison = Comparison.of(result, tol is not None)
        return CheckOutcome(self.name, comparison.verdict, comparison)

    def failure(self, outcome: CheckOutcome, ctx: CheckContext) -> str:
        figures = f"max rel error {outcome.figures.max_rel:.3g} > {outcome.figures.tol:.3g}"  # type: ignore[union-attr]
        if self.split == "calib":
            return f"folded model differs from the original on the calibration data where the recorded states hold: {figures}"
        sites = ctx.flipped_sites()
        why = (f"neurons it relies on flip there at {', '.join(f'{k} ({v})' for k, v in sites.items())}"
               if sites else "no neuron it relies on flips there")
        return (f"folded model differs from the original on the held-out data: {figures}; {why} "
                "(lower --max-flip-rate to exclude flipped neurons, or accept with --holdout-tolerance T)")


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
        return CheckOutcome(self.name, Verdict.MEASURED, state_flips(ctx.states, ctx.held_states()))

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
        session = onnx_runner(ctx.onnx_path)   # one session for every batch size
        with eval_mode(ctx.folded):
            folded = torch_runner(ctx.folded)
            results = tuple(Comparison.of(r, True, batch=r.samples) for r in (
                compare_runners(folded, session, [ctx.calib[:n]], tol=ctx.tolerance) for n in sizes))
        passed = all(c.verdict is Verdict.PASSED for c in results)
        return CheckOutcome(self.name, Verdict.PASSED if passed else Verdict.FAILED, results)

    def failure(self, outcome: CheckOutcome, ctx: CheckContext) -> str:
        worst = max(c.max_rel for c in outcome.figures)  # type: ignore[union-attr]
        return f"onnxruntime output of the folded model differs from torch: max rel error {worst:.3g}"


CHECKS: tuple[Check, ...] = (TorchEquivalence(CheckName.CALIBRATION, "calib", fatal=True),
                             TorchEquivalence(CheckName.HELDOUT, "heldout", fatal=True),
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
