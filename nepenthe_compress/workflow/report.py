"""The fold report: typed dataclasses with enums, serialised once (``FoldReport.to_dict()``) into the
JSON the CLI writes as ``<stem>.report.json``."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from nepenthe_compress.bench import LatencyTable
    from nepenthe_compress.certify import Certification
    from nepenthe_compress.entropy import EntropyReport
    from nepenthe_compress.fold.graph import FoldOptions
    from nepenthe_compress.verify import VerifyResult
    from nepenthe_compress.workflow.variants import GuardReport


class EventAction(str, Enum):
    """What a step of the fold pass did to the graph (or why it left it alone)."""

    LINEARISE = "linearise"   # a zero-entropy site became a per-channel linear map
    FOLD = "fold"             # BN / affine map folded into a neighbour
    CONSTANT = "constant"     # a layer computing a constant became a shift
    MERGE = "merge"           # linear layers composed into one
    DROP = "drop"             # dead / constant channels removed
    SKIP = "skip"             # a rewrite declined, with the reason


@dataclass(frozen=True)
class Event:
    action: EventAction
    where: str
    detail: str

    @classmethod
    def of(cls, event: Any) -> Event:
        """From the fold pass's ``FoldEvent`` (``action`` a string)."""
        return cls(EventAction(event.action), event.where, event.detail)

    def to_dict(self) -> dict:
        return {"action": self.action.value, "where": self.where, "detail": self.detail}


class Verdict(str, Enum):
    PASSED = "passed"        # within its tolerance
    FAILED = "failed"        # over its tolerance
    MEASURED = "measured"    # figures only: not held to a tolerance (inexact folds, statistics)


class CheckName(str, Enum):
    """The checks of a fold; each is the key of its figures under the report's ``equivalence``."""

    CALIBRATION = "calibration"                  # original vs folded, calibration split
    HELDOUT = "heldout"                          # original vs folded, held-out split
    HELDOUT_STATE_FLIPS = "heldout_state_flips"  # neurons the fold relies on that change state on held-out data
    ONNX_VS_TORCH = "onnx_vs_torch"              # onnxruntime vs torch, same folded model, two batch sizes


@dataclass(frozen=True)
class Comparison:
    """Two models compared on some samples, and the verdict (``tol`` is None when only measured)."""

    max_abs: float
    max_rel: float                  # max|diff| / max|ref|
    top1_agreement: float | None
    samples: int
    tol: float | None
    verdict: Verdict
    batch: int | None = None        # the batch size, for checks run per batch size

    @classmethod
    def of(cls, result: VerifyResult, held_to_tolerance: bool, batch: int | None = None) -> Comparison:
        verdict = (Verdict.PASSED if result.passed else Verdict.FAILED) if held_to_tolerance else Verdict.MEASURED
        return cls(result.max_abs, result.max_rel, result.top1_agreement, result.samples,
                   result.tol if held_to_tolerance else None, verdict, batch)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"max_abs": self.max_abs, "max_rel": self.max_rel, "top1_agreement": self.top1_agreement,
                             "samples": self.samples}
        if self.verdict is not Verdict.MEASURED:
            d |= {"passed": self.verdict is Verdict.PASSED, "tol": self.tol}
        return d if self.batch is None else d | {"batch": self.batch}


@dataclass(frozen=True)
class StateFlips:
    """Neurons constant on the calibration split (the fold relies on them) that took another state,
    or several, on the held-out split."""

    neurons_relied_on: int
    flipped: int

    @property
    def fraction(self) -> float:
        return self.flipped / self.neurons_relied_on if self.neurons_relied_on else 0.0

    def to_dict(self) -> dict:
        return {"neurons_relied_on": self.neurons_relied_on, "flipped": self.flipped, "fraction": self.fraction}


Figures = Union[Comparison, StateFlips, tuple[Comparison, ...]]


@dataclass(frozen=True)
class CheckOutcome:
    name: CheckName
    verdict: Verdict
    figures: Figures

    def figures_dict(self) -> dict | list:
        if isinstance(self.figures, tuple):
            return [c.to_dict() for c in self.figures]
        return self.figures.to_dict()


@dataclass
class Equivalence:
    """How the folded model was held to the original: the tolerance and every check's outcome."""

    exact_claimed: bool              # False with --allow-inexact / --approximate
    tolerance: float | None          # None when no exactness is claimed
    onnx_tolerance: float            # onnxruntime vs torch, always held
    original_float32_noise: float    # the original's own float32-vs-float64 error
    checks: list[CheckOutcome] = field(default_factory=list)

    def outcome(self, name: CheckName) -> CheckOutcome:
        return next(c for c in self.checks if c.name is name)

    @property
    def calibration(self) -> Comparison:
        return self.outcome(CheckName.CALIBRATION).figures  # type: ignore[return-value]

    @property
    def heldout(self) -> Comparison:
        return self.outcome(CheckName.HELDOUT).figures  # type: ignore[return-value]

    @property
    def heldout_state_flips(self) -> StateFlips:
        return self.outcome(CheckName.HELDOUT_STATE_FLIPS).figures  # type: ignore[return-value]

    @property
    def onnx_vs_torch(self) -> tuple[Comparison, ...]:
        return self.outcome(CheckName.ONNX_VS_TORCH).figures  # type: ignore[return-value]

    def to_dict(self) -> dict:
        return {"exact_claimed": self.exact_claimed, "tolerance": self.tolerance,
                "onnx_tolerance": self.onnx_tolerance, "original_float32_noise": self.original_float32_noise,
                **{c.name.value: c.figures_dict() for c in self.checks}}


@dataclass(frozen=True)
class BeforeAfter:
    before: int
    after: int

    def to_dict(self) -> dict:
        return {"before": self.before, "after": self.after}


@dataclass(frozen=True)
class LayersRemoved:
    """"Layers removed k/L" as the papers count them (k linear rectifier layers of L), beside the
    weighted layers the exported model's longest path actually lost."""

    removed: int     # k: sites linear after the fold (linearised, or already linear in the checkpoint)
    of: int          # L: sites
    depth: int       # ONNX depth before - after

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CalibrationData:
    source: str              # the data spec (or what the samples were given as)
    samples: int             # calibration split
    heldout: int             # held-out split
    input_shape: list[int]   # one sample
    part: str = "all samples"   # which samples of the source (e.g. those the checkpoint did not train on)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SiteCounts:
    total: int
    linearised_by_fold: list[str]       # fx site names the fold replaced by linear maps
    linear_in_checkpoint: list[str]     # replaced by identity before saving (EASIER)
    zero_entropy: int

    @property
    def linearised(self) -> int:
        return len(self.linearised_by_fold) + len(self.linear_in_checkpoint)

    def to_dict(self) -> dict:
        return {"total": self.total, "linearised": self.linearised, "linearised_by_fold": self.linearised_by_fold,
                "linear_in_checkpoint": self.linear_in_checkpoint, "zero_entropy": self.zero_entropy}


@dataclass(frozen=True)
class Planner:
    """The cost model that priced the merges: ``measured`` (layers timed, or read from the cache at
    ``cache``) or ``flops`` (analytic: MACs + memory)."""

    cost: str
    layers_timed: int = 0
    layers_cached: int = 0
    cache: str | None = None

    @classmethod
    def of(cls, cost: Any) -> Planner:
        cache = getattr(cost, "cache", None)
        if cache is None:
            return cls("flops")
        return cls("measured", cost.measured, cost.looked_up - cost.measured, str(cache.path))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FoldReport:
    checkpoint: str | None           # None for a model given in memory
    arch: str | None
    options: FoldOptions
    calibration: CalibrationData
    sites: SiteCounts
    events: list[Event]
    channels_dropped: int
    channels_kept_for_alignment: int  # droppable channels kept so counts stay aligned
    depth: BeforeAfter                # weighted layers on the longest path of the ONNX files
    params: BeforeAfter
    macs: BeforeAfter
    equivalence: Equivalence
    latency: LatencyTable | None
    entropy: EntropyReport            # neuron states on the calibration split
    guard: GuardReport | None = None  # the speed guard's measurements and choice (None: not timed)
    planner: Planner | None = None    # the cost model of the merge decisions
    certification: Certification | None = None   # the states relied on: margins, held-out flips, bounds
    outputs: dict[str, str] = field(default_factory=dict)   # kind -> path, once saved
    checkpoint_notes: list[str] = field(default_factory=list)     # what loading changed (upcasts, hooks)
    checkpoint_warnings: list[str] = field(default_factory=list)

    def count(self, action: EventAction) -> int:
        return sum(e.action is action for e in self.events)

    @property
    def layers_removed(self) -> LayersRemoved:
        return LayersRemoved(self.sites.linearised, self.sites.total, self.depth.before - self.depth.after)

    def to_dict(self) -> dict:
        return {"checkpoint": self.checkpoint, "arch": self.arch, "options": asdict(self.options),
                "calibration": self.calibration.to_dict(), "sites": self.sites.to_dict(),
                "events": [e.to_dict() for e in self.events], "channels_dropped": self.channels_dropped,
                "channels_kept_for_alignment": self.channels_kept_for_alignment,
                "depth": self.depth.to_dict(), "layers_removed": self.layers_removed.to_dict(),
                "params": self.params.to_dict(), "macs": self.macs.to_dict(),
                "equivalence": self.equivalence.to_dict(),
                "latency": None if self.latency is None else self.latency.to_dict(),
                "guard": None if self.guard is None else self.guard.to_dict(),
                "planner": None if self.planner is None else self.planner.to_dict(),
                "certification": None if self.certification is None else self.certification.to_dict(),
                "outputs": dict(self.outputs), "entropy": self.entropy.to_dict(),
                "checkpoint_notes": list(self.checkpoint_notes), "checkpoint_warnings": list(self.checkpoint_warnings)}
