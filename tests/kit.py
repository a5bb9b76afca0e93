"""Test kit: synthetic zero-entropy models and the helpers every fold test uses.

Neuron states are engineered on the model's own input batch ``x`` (the batch that is then measured,
folded on and compared on), in one of two ways:

- ``set_states`` (small BN-free graphs): shift the biases of chosen conv / linear layers so that
  their outputs are >= 1 (a rectifier after them is always ON), <= -1 (always OFF) or zero-mean per
  channel (mixed);
- ``calibrate`` + ``engineer`` (real architectures with BatchNorm): every BN's running statistics
  from its own input, so each rectifier input has zero mean per neuron (every site MIXED by
  construction); then chosen BN / Linear output channels are re-mapped to always ON, always LINEAR
  (ReLU6) or dead, every later BN / Linear compensated so its input keeps its calibrated mean.
  ``calibrate(..., bias=...)`` instead pins chosen BN channels by their bias (e.g. -100: dead).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nepenthe_compress.entropy import EntropyReport, measure_entropy
from nepenthe_compress.fold.driver import FoldedModel, fold_model
from nepenthe_compress.fold.protocol import Rewrite
from nepenthe_compress.fold.rewrites import REWRITES
from nepenthe_compress.fold.rewriter import FoldOptions
from nepenthe_compress.verify import verify_equivalence, verify_float64

D = torch.float64
EXACT64 = 1e-10        # float64 fold of a float64 model: max|diff| / max|ref|
RESIDUAL_GAIN = 0.1
NORM = nn.modules.batchnorm._BatchNorm
WEIGHTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
ON, LINEAR6, DEAD = "on", "linear6", "dead"


# ---- engineering by biases (small graphs) ---------------------------------------------------------

@torch.no_grad()
def set_states(model: nn.Module, x: Tensor, states: dict[nn.Module, str | tuple[str, list[int]]]) -> None:
    """Shift the biases of conv / linear modules (in one forward pass, so later layers see the
    shifted values): "on" every output >= 1, "off" every output <= -1, "mixed" zero mean per
    channel; ``(kind, channels)`` shifts only those channels."""
    def hook(m, args, out):
        kind, channels = states[m] if isinstance(states[m], tuple) else (states[m], None)
        axis = 1 if isinstance(m, nn.modules.conv._ConvNd) else out.dim() - 1
        z = out.transpose(0, axis).reshape(out.shape[axis], -1)
        shift = {"on": 1 - z.min(1).values, "off": -1 - z.max(1).values, "mixed": -z.mean(1)}[kind]
        if channels is not None:
            keep = torch.ones(len(shift), dtype=torch.bool)
            keep[channels] = False
            shift[keep] = 0
        m.bias.add_(shift)
        view = [1] * out.dim()
        view[axis] = -1
        return out + shift.view(view)

    _with_hooks(model, x, {}, {m: hook for m in states})


def randomise_bn(*bns: nn.modules.batchnorm._BatchNorm) -> None:
    """Non-trivial eval statistics and affine parameters."""
    with torch.no_grad():
        for bn in bns:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()


# ---- engineering through BatchNorm statistics (real architectures) ---------------------------------

def _axis(m: nn.Module) -> int:
    return 1 if isinstance(m, NORM) else -1


def _per_channel(m: nn.Module, t: Tensor) -> Tensor:
    """``t`` as [channels, everything else] along ``m``'s channel axis."""
    axis = _axis(m) % t.dim()
    return t.detach().transpose(0, axis).reshape(t.shape[axis], -1)


def _run(m: nn.Module, x: Tensor) -> Tensor:
    """``m(x)`` without hooks (BN in eval)."""
    if isinstance(m, NORM):
        return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
    return F.linear(x, m.weight, m.bias)


@torch.no_grad()
def _with_hooks(model: nn.Module, x: Tensor, pre: dict, post: dict) -> None:
    handles = [m.register_forward_pre_hook(h) for m, h in pre.items()]
    handles += [m.register_forward_hook(h) for m, h in post.items()]
    try:
        model.eval()(x)
    finally:
        for h in handles:
            h.remove()


def calibrate(model: nn.Module, x: Tensor, centre: Sequence[nn.Linear] = (),
              bias: dict[nn.Module, dict[int, float]] | None = None) -> None:
    """BN running stats from each BN's own input; ``centre`` Linear outputs get zero mean.
    ``bias`` pins BN channels to the given biases right after their statistics are set (later BNs
    are calibrated on the pinned values), e.g. -100 for a dead ReLU, +100 for a saturated ReLU6."""
    pins = bias or {}

    def stats(bn, args):
        z = _per_channel(bn, args[0])
        bn.running_mean.copy_(z.mean(1))
        bn.running_var.copy_(z.var(1, unbiased=False))
        for i, value in pins.get(bn, {}).items():
            bn.bias[i] = value

    def centred(lin, args, out):
        mean = _per_channel(lin, out).mean(1)
        lin.bias.sub_(mean)
        return out - mean

    bns = [m for m in model.modules() if isinstance(m, NORM)]
    _with_hooks(model, x, {bn: stats for bn in bns}, {lin: centred for lin in centre})


def engineer(model: nn.Module, x: Tensor, edits: dict[nn.Module, tuple[str, list[int] | None]]) -> None:
    """Re-map the output channels of BN / Linear modules (``kind``, channels or None for all):
    ON z -> z + 1 - min(z); LINEAR6 z -> [1, 5]; DEAD z -> -1. Later BN / Linear inputs keep
    their pre-edit mean (BN running_mean, Linear bias compensated)."""
    followers = [m for m in model.modules() if isinstance(m, (NORM, nn.Linear))]
    before: dict[nn.Module, Tensor] = {}

    def record(m, args):
        before.setdefault(m, _per_channel(m, args[0]).mean(1))

    _with_hooks(model, x, {m: record for m in followers}, {})

    def keep_mean(m, args):
        delta = _per_channel(m, args[0]).mean(1) - before[m]
        if isinstance(m, NORM):
            m.running_mean.add_(delta)
        elif m.bias is not None:
            m.bias.sub_(m.weight @ delta)

    def remap(m, args, out):
        kind, channels = edits[m]
        z = _per_channel(m, out)
        idx = torch.arange(len(z)) if channels is None else torch.tensor(channels)
        lo, hi = z.min(1).values[idx], z.max(1).values[idx]
        s, t = torch.ones(len(z)), torch.zeros(len(z))
        if kind == ON:
            t[idx] = 1 - lo
        elif kind == LINEAR6:
            s[idx] = 4 / (hi - lo)
            t[idx] = 1 - s[idx] * lo
        else:
            s[idx], t[idx] = 0.0, -1.0
        m.weight.mul_(s if isinstance(m, NORM) else s[:, None])
        m.bias.mul_(s).add_(t)
        return _run(m, args[0])

    _with_hooks(model, x, {m: keep_mean for m in followers}, {m: remap for m in edits})


@torch.no_grad()
def quiet_residuals(bns: list[nn.Module]) -> None:
    """Scale the last BN of residual branches (a near-identity residual stream keeps a random net
    well-conditioned in float32)."""
    for bn in bns:
        bn.weight.mul_(RESIDUAL_GAIN)


# ---- measuring, folding, checking ------------------------------------------------------------------

def image(c: int = 4, hw: int = 10, n: int = 4, dtype: torch.dtype = D) -> Tensor:
    return torch.randn(n, c, hw, hw, dtype=dtype)


def measure(model: nn.Module, x: Tensor) -> EntropyReport:
    return measure_entropy(model, [x])


def zero_entropy(report: EntropyReport) -> set[str]:
    return {s.name for s in report.sites if s.zero_entropy}


def fold(model: nn.Module, x: Tensor, report: EntropyReport | None = None,
         rewrites: Sequence[Rewrite] = REWRITES, **options) -> FoldedModel:
    """``fold_model`` on ``x``'s size with the states measured on ``x`` (or ``report``)."""
    return fold_model(model, report or measure(model, x), x[:2], FoldOptions(**options), rewrites=rewrites)


def modules(f: FoldedModel, kind: type | tuple[type, ...] = WEIGHTED) -> list[nn.Module]:
    """The modules of ``kind`` the folded graph calls, in graph order."""
    gm = f.model
    return [gm.get_submodule(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kind)]


def weighted(f: FoldedModel) -> list[nn.Module]:
    """The weighted layers the folded graph calls, in graph order."""
    return modules(f, WEIGHTED)


def called(f: FoldedModel, kind: type) -> int:
    return len(modules(f, kind))


def events(f: FoldedModel, action: str) -> list[str]:
    return [f"{e.where}: {e.detail}" for e in f.events if e.action == action]


def max_rel(model: nn.Module, f: FoldedModel, x: Tensor) -> float:
    return verify_equivalence(model, f.model, [x]).max_rel


def assert_exact(model: nn.Module, f: FoldedModel, x: Tensor) -> None:
    """The fold computes the original: float64 models within 1e-10 (float64 copies of both, see
    ``verify_float64``), float32 ones within 1e-6."""
    if x.dtype == D:
        assert verify_float64(model, f.model, [x]).max_rel <= EXACT64
    else:
        assert max_rel(model, f, x) <= 1e-6
