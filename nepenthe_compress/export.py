"""ONNX and torch.export (.pt2) export with a dynamic batch dimension, checked before it is committed.

Two exporters, chosen per model (``exporter="auto"``):

- **TorchScript** (``dynamo=False``) for fx GraphModules made only of torch.nn modules, this package's
  fold modules and plain functions: fx tracing already refused data-dependent Python control flow, so
  the one-example trace cannot bake a branch into the graph. It is 4-5x faster than dynamo (resnet18:
  about 1.4 s vs 6 s). Its output must pass the same onnxruntime check as dynamo's; when it fails to
  export or differs from torch, the dynamo exporter is used instead.
- **dynamo** (``torch.export.export(strict=False)`` then ``torch.onnx.export(ep, dynamo=True)``) for
  everything else: arbitrary nn.Modules (TorchScript would silently bake the branch taken by the
  example into the graph where Python control flow depends on data) and GraphModules with opaque
  user leaf modules. Capturing here shares one code path with the .pt2 export and keeps the
  ExportedProgram at hand to name the module of an operator that has no ONNX translation.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from nepenthe_compress.errors import ExportError, UserError
from nepenthe_compress.io import atomic_path
from nepenthe_compress.verify import eval_mode, onnx_matches_torch

BATCH = "batch"
ONNX_SIZE_LIMIT = 2**31 - 1          # protobuf's limit for a single-file model (external data unsupported)
PT2_EXAMPLE_SEED = 0                 # the synthetic example input saved inside a .pt2
EXPORT_CHECK_TOL = 1e-4              # catches broken exports; exact equivalence is verify's job (1e-5)
EXPORTERS = ("auto", "torchscript", "dynamo")
TRUSTED_MODULE_PREFIXES = ("torch.nn.", "nepenthe_compress.fold.")   # no data-dependent control flow
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CALL_SITE = re.compile(r'The following call raised this error:\s*\n\s*File "([^"]+)", line (\d+)')
_NO_ONNX_OP = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'")


# ---------------------------------------------------------------------------------------- messages

def _lines(e: BaseException) -> list[str]:
    return [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]


def _first_sentence(line: str) -> str:
    return re.split(r"(?<=[.!])\s+", line, maxsplit=1)[0]


def _summary(e: BaseException) -> str:
    """One line: the exception's first sentence, its first '- ' detail, and the user call site."""
    lines = _lines(e) or [type(e).__name__]
    detail = next((ln[2:] for ln in lines[1:3] if ln.startswith("- ")), None)
    text = _first_sentence(lines[0]) + (f" {_first_sentence(detail)}" if detail else "")
    site = _CALL_SITE.search(_ANSI.sub("", str(e)))
    return f"{text} (at {site[1]}:{site[2]})" if site else text


def _op_key(name: str) -> str:
    """'aten._linalg_svd' / 'aten.linalg_svd.default' -> 'linalg_svd' (decompositions add/drop '_')."""
    parts = name.split(".")
    return parts[min(1, len(parts) - 1)].lstrip("_")


def _module_of(ep: ExportedProgram, op: str) -> str | None:
    """Innermost module path (and class) of the first graph node calling ``op``, if any."""
    for node in ep.graph.nodes:
        if node.op == "call_function" and _op_key(str(node.target)) == _op_key(op):
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            if stack:
                path, cls = stack[-1]
                return f"'{path or '<root>'}' ({str(cls).rsplit('.', 1)[-1]})"
    return None


def _conversion_message(e: BaseException, ep: ExportedProgram) -> str:
    chain = [e]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    op = next((m[1] for c in chain if (m := _NO_ONNX_OP.search(str(c)))), None)
    if op is None:
        return f"ONNX translation failed: {_summary(chain[-1])}"
    where = _module_of(ep, op)
    return f"no ONNX translation for operator {op}" + (f" in module {where}" if where else "")


# ---------------------------------------------------------------------------------------- capture

@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress prints, warnings and torch's log records (restored afterwards)."""
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with (warnings.catch_warnings(), open(os.devnull, "w") as null, contextlib.redirect_stdout(null),
              contextlib.redirect_stderr(null)):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


@contextlib.contextmanager
def _native_quiet() -> Iterator[None]:
    """Also silence output written by native code straight to file descriptors 1 and 2 (the
    TorchScript exporter dumps its IR graph there when it fails); restored afterwards."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def _example(example: Tensor, dynamic_batch: bool) -> Tensor:
    """A batch of >= 2 for dynamic export: torch.export specialises a size-1 dim to the constant 1."""
    if dynamic_batch and example.shape[0] < 2:
        return torch.cat([example, example])
    return example


def _check_size(model: nn.Module) -> None:
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if nbytes >= ONNX_SIZE_LIMIT:
        raise ExportError(f"model has {nbytes / 2**30:.1f} GiB of weights; single-file ONNX is limited to 2 GiB "
                          "(external data is not supported)")


def capture(model: nn.Module, example: Tensor, *, dynamic_batch: bool = True) -> ExportedProgram:
    """``torch.export.export`` in eval mode (batch dim dynamic if asked); failures -> ExportError."""
    shapes = ({0: Dim(BATCH)},) if dynamic_batch else None
    try:
        with eval_mode(model), _quiet():
            return torch.export.export(model, (_example(example, dynamic_batch),), dynamic_shapes=shapes)
    except Exception as e:  # torch.export raises many unrelated types; each means "cannot capture"
        hint = " (a static-batch export avoids this)" if dynamic_batch and "specialized" in str(e) else ""
        raise ExportError(f"torch.export cannot capture {type(model).__name__}: {_summary(e)}{hint}") from e


# ---------------------------------------------------------------------------------------- ONNX

def _output_names(ep: ExportedProgram) -> list[str]:
    n = len(ep.graph_signature.user_outputs)
    return ["output"] if n == 1 else [f"output{i}" for i in range(n)]


def _to_onnx(ep: ExportedProgram, opset: int) -> onnx.ModelProto:
    try:
        with _quiet():
            program = torch.onnx.export(ep, (), dynamo=True, opset_version=opset, input_names=["input"],
                                        output_names=_output_names(ep), verbose=False)
            proto = program.model_proto
    except torch.onnx.OnnxExporterError as e:
        raise ExportError(_conversion_message(e, ep)) from e
    # the exporter implements opset 18+ and version-converts other requests, keeping 18 when that fails
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise ExportError(f"cannot export to ONNX opset {opset}: the exporter produced opset {got}")
    return proto


def _name_batch_dim(proto: onnx.ModelProto) -> None:
    """Rename the exporter's symbol for the input's dim 0 (e.g. 's77') to 'batch' everywhere."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    symbol = dims[0].dim_param if dims else ""
    if not symbol:
        raise ExportError("the batch dimension was specialised to a constant during export")
    for info in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for d in info.type.tensor_type.shape.dim:
            if d.dim_param == symbol:
                d.dim_param = BATCH


def self_check(model: nn.Module, path: Path, example: Tensor, dynamic_batch: bool) -> None:
    """onnx.checker, then onnxruntime vs torch at the example's batch size and (if dynamic) another."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"exported ONNX model is invalid: {_summary(e)}") from e
    batches = [example, torch.cat([example, example[:1]])] if dynamic_batch else [example]
    try:
        result = onnx_matches_torch(model, path, batches, tol=EXPORT_CHECK_TOL)
    except UserError as e:   # onnxruntime cannot load or run it
        raise ExportError(f"exported ONNX model fails its onnxruntime check: {e}") from e
    if not result.passed:
        raise ExportError(f"exported ONNX model differs from torch: max rel error {result.max_rel:.3g} "
                          f"> {EXPORT_CHECK_TOL:g}")


def torchscript_safe(model: nn.Module) -> bool:
    """Whether a one-example TorchScript trace of ``model`` is the model: an fx GraphModule (tracing
    refused data-dependent control flow) whose called modules are torch.nn's or this package's."""
    if not isinstance(model, fx.GraphModule):
        return False
    called = (model.get_submodule(n.target) for n in model.graph.nodes if n.op == "call_module")
    return all(type(m).__module__.startswith(TRUSTED_MODULE_PREFIXES) for m in called)


def _output_count(model: nn.Module, example: Tensor) -> int:
    with torch.no_grad(), eval_mode(model):
        out = model(example)
    return len(out) if isinstance(out, (tuple, list)) else 1


def _torchscript_onnx(model: nn.Module, example: Tensor, opset: int, dynamic_batch: bool) -> onnx.ModelProto:
    """The TorchScript exporter's model (in memory); any failure -> ExportError."""
    n = _output_count(model, example)
    outputs = ["output"] if n == 1 else [f"output{i}" for i in range(n)]
    axes = {name: {0: BATCH} for name in ["input", *outputs]} if dynamic_batch else None
    buffer = io.BytesIO()
    try:
        with eval_mode(model), torch.no_grad(), _quiet(), _native_quiet():
            torch.onnx.export(model, (_example(example, dynamic_batch),), buffer, dynamo=False,
                              opset_version=opset, input_names=["input"], output_names=outputs,
                              dynamic_axes=axes)
    except Exception as e:  # the TorchScript exporter raises many types; each means "use dynamo"
        raise ExportError(f"TorchScript export failed: {_summary(e)}") from e
    return onnx.load_model_from_string(buffer.getvalue())


def _dynamo_onnx(model: nn.Module, example: Tensor, opset: int, dynamic_batch: bool) -> onnx.ModelProto:
    proto = _to_onnx(capture(model, example, dynamic_batch=dynamic_batch), opset)
    if dynamic_batch:
        _name_batch_dim(proto)
    return proto


def _write(model: nn.Module, proto: onnx.ModelProto, example: Tensor, path: Path, check: bool,
           dynamic_batch: bool) -> None:
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
        if check:
            self_check(model, tmp, example, dynamic_batch)


def export_onnx(model: nn.Module, example: Tensor, path: str | os.PathLike, *, opset: int = 18,
                dynamic_batch: bool = True, check: bool = True, exporter: str = "auto") -> Path:
    """Export ``model`` (input: ``example`` batch) to a single-file ONNX model at ``path``, atomically.

    With ``check`` the written file must pass ``onnx.checker`` and match torch in onnxruntime (also at
    a second batch size when ``dynamic_batch``) before it replaces ``path``. ``exporter``: ``auto``
    uses TorchScript where :func:`torchscript_safe` (falling back to dynamo when it fails or does not
    match), else dynamo.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, not {exporter!r}")
    path = Path(path)
    _check_size(model)
    if exporter == "torchscript" or (exporter == "auto" and torchscript_safe(model)):
        try:
            _write(model, _torchscript_onnx(model, example, opset, dynamic_batch), example, path, check,
                   dynamic_batch)
            return path
        except ExportError:
            if exporter == "torchscript":
                raise
    _write(model, _dynamo_onnx(model, example, opset, dynamic_batch), example, path, check, dynamic_batch)
    return path


# ---------------------------------------------------------------------------------------- .pt2

def synthetic_like(example: Tensor) -> Tensor:
    """A fresh tensor of ``example``'s shape, dtype and device holding no data of it: seeded N(0,1) for
    floating types, zeros otherwise."""
    if not example.is_floating_point():
        return torch.zeros(example.shape, dtype=example.dtype, device=example.device)
    g = torch.Generator().manual_seed(PT2_EXAMPLE_SEED)
    return torch.randn(example.shape, generator=g).to(dtype=example.dtype, device=example.device)


def export_pt2(model: nn.Module, example: Tensor, path: str | os.PathLike, *, dynamic_batch: bool = True) -> Path:
    """Save ``torch.export`` of ``model`` (dynamic batch by default) to ``path`` (.pt2), atomically.

    A .pt2 keeps the example input it was captured with; it is captured with :func:`synthetic_like`
    of ``example`` so that no real (e.g. calibration) data ships inside a deployable file."""
    path = Path(path)
    ep = capture(model, synthetic_like(example), dynamic_batch=dynamic_batch)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.export.save(ep, f)
    return path


def load_pt2(path: str | os.PathLike) -> ExportedProgram:
    """Load a .pt2 written by :func:`export_pt2`. Like ``torch.export.load`` this runs code stored in the
    file (pickles, guard expressions): only for trusted files. Unreadable files -> one ExportError line
    naming the file; torch's own warnings and log lines about it are silenced."""
    try:
        with _quiet():
            return torch.export.load(str(path))
    except Exception as e:  # missing file, not a zip, wrong version: all mean "cannot load this file"
        raise ExportError(f"cannot load exported program '{path}': {_summary(e)}") from e
