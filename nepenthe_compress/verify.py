"""Output equivalence of two models (torch modules or ONNX files in onnxruntime) on given batches.

A *runner* maps an input batch to the model's flat list of output tensors; any two runners can be
compared. The error measure is docs/DESIGN.md 4: max|candidate - reference| / max|reference| over all outputs
and batches, computed in float64.
"""
from __future__ import annotations

import contextlib
import copy
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from nepenthe_compress.errors import UserError
from nepenthe_compress.runtime import provider_chain
from nepenthe_compress.signature import MAX_THREADS, onnx_signature

if TYPE_CHECKING:
    from nepenthe_compress.certify import SiteCheck

Runner = Callable[[Tensor], list[Tensor]]

ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
}
MESSAGE_CHARS = 300            # longest runtime error message passed on
_ORT_STATUS = re.compile(r"^\s*\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*")


@dataclass
class VerifyResult:
    max_abs: float
    max_rel: float                  # max|diff| / max|ref|
    top1_agreement: float | None    # fraction of equal argmax; None unless one (N, classes) output
    samples: int
    passed: bool                    # max_rel <= tol (False on NaN)
    tol: float

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------- runners

@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own training flag afterwards."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
    except NotImplementedError:  # torch.export's modules refuse mode switches (they keep the exported mode)
        modes = {}
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


def error_line(e: BaseException) -> str:
    """A runtime's (often multi-line) error message as one line: onnxruntime's status prefix dropped,
    whitespace collapsed; a message over ``MESSAGE_CHARS`` keeps its start (what failed) and its end
    (usually why), cut at word boundaries around ' ... '."""
    text = " ".join(_ORT_STATUS.sub("", str(e)).split()) or type(e).__name__
    if len(text) <= MESSAGE_CHARS:
        return text
    half = MESSAGE_CHARS // 2
    head, tail = text[:half].rsplit(" ", 1)[0], text[-half:].split(" ", 1)[-1]
    return f"{head} ... {tail}"


def ort_session(path: str | os.PathLike, threads: int = 2, provider: str = "cpu") -> ort.InferenceSession:
    """Session on ``provider`` (see ``runtime.PROVIDERS``; default CPU): ``threads`` intra-op threads (no
    spin-waiting), 1 inter-op thread, all graph optimisations."""
    if not 1 <= threads <= MAX_THREADS:
        raise UserError(f"threads must be between 1 and {MAX_THREADS}, got {threads}")
    providers = provider_chain(provider)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 4   # fatal only: errors reach the user once, as our own one-line message
    # Idle sessions must not keep spinning their threads: benchmarks interleave several sessions
    # on the same cores, and a spinning neighbour would be timed as part of the next model.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own pybind types (NoSuchFile, InvalidProtobuf, Fail, ...)
        raise UserError(f"onnxruntime cannot load '{path}': {error_line(e)}") from e


def input_dtype(session: ort.InferenceSession) -> np.dtype:
    """numpy dtype of the session's first input."""
    kind = session.get_inputs()[0].type
    if kind not in ORT_DTYPES:
        raise UserError(f"unsupported ONNX input type {kind} (expected one of {', '.join(ORT_DTYPES)})")
    return ORT_DTYPES[kind]


def _leaves(out: object) -> list[Tensor]:
    """Flatten a model output (tensor, or nested tuple / list / dict of tensors) in order."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _leaves(o)]
    raise UserError(f"model output of type {type(out).__name__} is not a tensor or a tuple/list/dict of tensors")


def torch_runner(model: nn.Module, name: str | None = None) -> Runner:
    """Runner of a torch module under ``no_grad`` (the caller sets eval mode, see :func:`eval_mode`).

    With a ``name`` (a model the user gave) any exception in the forward pass becomes a one-line
    ``UserError`` naming it; without, it propagates as is.
    """
    def run(x: Tensor) -> list[Tensor]:
        with torch.no_grad():
            if name is None:
                return _leaves(model(x))
            try:
                out = model(x)
            except Exception as e:  # anything the user's model raises on this input
                raise UserError(f"'{name}' failed on input {tuple(x.shape)}: {error_line(e)}") from e
            return _leaves(out)
    return run


def session_runner(session: ort.InferenceSession, path: str | os.PathLike) -> Runner:
    """Runner of a loaded single-input onnxruntime session; the batch is cast to its input dtype."""
    onnx_signature(session, str(path)).input_dims()   # refuses models without exactly one input
    name, dtype = session.get_inputs()[0].name, input_dtype(session)

    def run(x: Tensor) -> list[Tensor]:
        try:
            outs = session.run(None, {name: x.detach().cpu().numpy().astype(dtype)})
        except Exception as e:  # onnxruntime's pybind errors (wrong shape / rank, ...)
            raise UserError(f"onnxruntime failed on '{path}' with input {tuple(x.shape)}: {error_line(e)}") from e
        return [torch.from_numpy(np.asarray(o)) for o in outs]
    return run


def onnx_runner(path: str | os.PathLike, threads: int = 2) -> Runner:
    """Runner of an ONNX file in onnxruntime (CPU), see :func:`session_runner`."""
    return session_runner(ort_session(path, threads), path)


# ---------------------------------------------------------------------------------------- comparison

def _is_classification(outs: list[Tensor]) -> bool:
    return len(outs) == 1 and outs[0].ndim == 2 and outs[0].shape[1] > 1


@dataclass
class _Stats:
    """Running maxima and top-1 counts over batches (maxima kept as tensors so NaN propagates)."""

    abs_max: list[Tensor] = field(default_factory=list)
    ref_max: list[Tensor] = field(default_factory=list)
    agree: int = 0
    classified: int = 0
    samples: int = 0
    names: tuple[str, str] = ("the reference", "the candidate")

    def add(self, ref: list[Tensor], cand: list[Tensor], batch: int) -> None:
        a, b = self.names
        if len(ref) != len(cand):
            raise UserError(f"{a} gives {len(ref)} output(s) but {b} gives {len(cand)}")
        for i, (r, c) in enumerate(zip(ref, cand, strict=True)):
            if r.shape != c.shape:
                raise UserError(f"output {i}: {a} gives {tuple(r.shape)} but {b} gives {tuple(c.shape)}")
            r64, c64 = r.detach().double(), c.detach().double()
            self.abs_max.append((c64 - r64).abs().max() if r.numel() else torch.zeros((), dtype=torch.float64))
            self.ref_max.append(r64.abs().max() if r.numel() else torch.zeros((), dtype=torch.float64))
        if _is_classification(ref):
            self.agree += int((ref[0].argmax(1) == cand[0].argmax(1)).sum())
            self.classified += ref[0].shape[0]
        self.samples += batch

    def result(self, tol: float) -> VerifyResult:
        if not self.abs_max:
            raise UserError("no batches to compare")
        max_abs = float(torch.stack(self.abs_max).max())
        max_ref = float(torch.stack(self.ref_max).max())
        max_rel = max_abs / max_ref if max_ref > 0 else (0.0 if max_abs == 0 else float("inf"))
        top1 = self.agree / self.classified if self.classified else None
        return VerifyResult(max_abs, max_rel, top1, self.samples, bool(max_rel <= tol), tol)


def compare_runners(reference: Runner, candidate: Runner, batches: Iterable[Tensor],
                    tol: float = 1e-5, names: tuple[str, str] = ("the reference", "the candidate")) -> VerifyResult:
    """Run both on every batch (sizes may differ) and compare all outputs; ``names`` name the two
    models in errors."""
    stats = _Stats(names=names)
    for x in batches:
        stats.add(reference(x), candidate(x), x.shape[0])
    return stats.result(tol)


def verify_equivalence(reference: nn.Module, candidate: nn.Module, batches: Iterable[Tensor],
                       tol: float = 1e-5) -> VerifyResult:
    """Compare two torch modules (both in eval mode, no_grad) on ``batches``."""
    with eval_mode(reference), eval_mode(candidate):
        return compare_runners(torch_runner(reference), torch_runner(candidate), batches, tol)


def onnx_matches_torch(model: nn.Module, onnx_path: str | os.PathLike, batches: Iterable[Tensor],
                       tol: float = 1e-5, threads: int = 2) -> VerifyResult:
    """Compare the torch module (reference) with the ONNX file run in onnxruntime (CPU)."""
    with eval_mode(model):
        return compare_runners(torch_runner(model), onnx_runner(onnx_path, threads), batches, tol)


def verify_float64(reference: nn.Module, candidate: nn.Module, batches: Iterable[Tensor],
                   tol: float = 1e-10) -> VerifyResult:
    """:func:`verify_equivalence` on float64 deep copies of both models and batches (exactness tests)."""
    ref64, cand64 = copy.deepcopy(reference).double(), copy.deepcopy(candidate).double()
    return verify_equivalence(ref64, cand64, (x.double() for x in batches), tol)


def float32_noise(model: nn.Module, batches: Iterable[Tensor]) -> float:
    """The model's own float32 rounding error: max rel difference of its float32 outputs from a
    float64 copy's. A fold cannot be checked more tightly than this."""
    ref64 = copy.deepcopy(model).double()
    run64 = torch_runner(ref64)
    with eval_mode(model), eval_mode(ref64):
        return compare_runners(lambda x: run64(x.double()), torch_runner(model), batches).max_rel


def verify_sites(model: nn.Module, batches: Iterable[Tensor], relied: Mapping[str, Sequence[int]],
                 leaf_modules: Iterable[type | str] = ()) -> list[SiteCheck]:
    """The states a fold relied on (site name -> per-neuron state, -1 for none; see
    ``certify.relied_states``) checked on ``batches`` through the original ``model``: per site the
    neurons and elements that flipped and the largest error of the linear maps there."""
    from nepenthe_compress.certify import check_relied
    from nepenthe_compress.entropy import EntropyMeter

    meter = EntropyMeter(model, leaf_modules, moments=True)
    for x in batches:
        meter.update(x)
    return check_relied(meter.report(), meter.sites, relied)
