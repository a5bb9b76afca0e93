"""What a model file declares about its inputs and outputs, and the checks made on it before anything runs.

A *signature* lists the declared shape of each input and output: per dim an int when the file fixes
it, a name (or None) when it is free, e.g. ``("batch", 3, 32, 32)``. ``bench`` and ``verify`` compare
signatures with each other and with the data they are about to feed, so that a mismatch is reported
as "'b.onnx' expects input (N, 3, 32, 32) but the data is (N, 1, 28, 28)" instead of a runtime's
traceback; inputs are also sized against a memory budget before they are allocated.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from nepenthe_compress.errors import UserError

Dims = tuple[int | str | None, ...]

MAX_INPUT_BYTES = 4 << 30     # largest input tensor bench / verify will allocate
MAX_THREADS = 256             # onnxruntime creates every thread up front (5,000 take minutes)


@dataclass(frozen=True)
class Signature:
    """Declared tensors of one model; ``None`` where the file declares nothing (torch modules)."""

    model: str                                   # how messages name the model (its path as given)
    inputs: dict[str, Dims | None] | None
    outputs: list[Dims | None] | None

    def input_dims(self) -> Dims | None:
        """The declared dims of the model's only input; ``UserError`` unless it has exactly one."""
        if self.inputs is None:
            return None
        if len(self.inputs) != 1:
            names = f" ({', '.join(self.inputs)})" if self.inputs else ""
            raise UserError(f"'{self.model}' has {len(self.inputs)} inputs{names}; bench/verify need single-input models")
        return next(iter(self.inputs.values()))

    def sample_shape(self) -> tuple[int, ...] | None:
        """Per-sample input shape when every dim but the batch is fixed, else None."""
        dims = self.input_dims()
        if not dims or not all(_fixed(d) for d in dims[1:]):
            return None
        return tuple(int(d) for d in dims[1:])  # type: ignore[arg-type]


def _fixed(d: object) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d > 0


def _dims(shape: Sequence[Any] | None) -> Dims | None:
    """A runtime's shape list as Dims: positive ints stay, anything else (names, None, -1) is free."""
    if not shape:   # onnxruntime reports an undeclared shape as []
        return None
    return tuple(int(d) if _fixed(d) else (d if isinstance(d, str) and d else None) for d in shape)


def onnx_signature(session: Any, model: str) -> Signature:
    """Signature of an onnxruntime ``InferenceSession``."""
    return Signature(model, {i.name: _dims(i.shape) for i in session.get_inputs()},
                     [_dims(o.shape) for o in session.get_outputs()])


def program_signature(program: Any, model: str) -> Signature:
    """Signature of a ``torch.export.ExportedProgram`` (symbolic dims become free, the batch named 'batch')."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs = {name: _tensor_dims(placeholders[name].meta.get("val")) for name in program.graph_signature.user_inputs}
    returned = list(next(n for n in program.graph.nodes if n.op == "output").args[0])
    users = returned[len(returned) - len(program.graph_signature.user_outputs):]   # buffer mutations come first
    return Signature(model, inputs, [_tensor_dims(getattr(a, "meta", {}).get("val")) for a in users])


def _tensor_dims(value: Any) -> Dims | None:
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    return tuple(int(d) if isinstance(d, int) else ("batch" if i == 0 else None) for i, d in enumerate(shape))


def format_dims(dims: Sequence[int | str | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def _fits(dims: Dims, shape: Sequence[int]) -> bool:
    return len(dims) == len(shape) and all(not _fixed(d) or d == s for d, s in zip(dims, shape, strict=True))


def _agree(a: Dims, b: Dims) -> bool:
    return len(a) == len(b) and all(not (_fixed(x) and _fixed(y)) or x == y for x, y in zip(a, b, strict=True))


def check_input(sig: Signature, sample: Sequence[int], batches: Iterable[int], source: str = "the data") -> None:
    """``UserError`` naming the model unless each (batch, *sample) input fits its declared input."""
    dims = sig.input_dims()
    if dims is None:
        return
    if not _fits(dims[1:], sample):
        raise UserError(f"'{sig.model}' expects input {format_dims(dims)} but {source} is "
                        f"{format_dims(('N', *sample))}")
    for b in batches:
        if _fixed(dims[0]) and dims[0] != b:
            raise UserError(f"'{sig.model}' expects input {format_dims(dims)} (a fixed batch of {dims[0]}) "
                            f"but {source} comes in batches of {b}")


def check_same_input(a: Signature, b: Signature) -> None:
    """``UserError`` when the two models' declared inputs cannot take the same tensor."""
    da, db = a.input_dims(), b.input_dims()
    if da is not None and db is not None and not _agree(da, db):
        raise UserError(f"'{a.model}' expects input {format_dims(da)} but '{b.model}' expects {format_dims(db)}")


def check_same_outputs(a: Signature, b: Signature) -> None:
    """``UserError`` when the two models' declared outputs differ in number or in a fixed dim."""
    if a.outputs is None or b.outputs is None:
        return
    if len(a.outputs) != len(b.outputs):
        raise UserError(f"'{a.model}' has {_count(a.outputs)} but '{b.model}' has {_count(b.outputs)}")
    for i, (oa, ob) in enumerate(zip(a.outputs, b.outputs, strict=True)):
        if oa is not None and ob is not None and not _agree(oa, ob):
            raise UserError(f"output {i}: '{a.model}' gives {format_dims(oa)} but '{b.model}' gives {format_dims(ob)}")


def _count(outputs: list[Dims | None]) -> str:
    shapes = ", ".join("(?)" if o is None else format_dims(o) for o in outputs)
    return f"{len(outputs)} output{'s' if len(outputs) != 1 else ''} ({shapes})"


def check_input_bytes(shape: Sequence[int], itemsize: int, what: str = "input") -> None:
    """``UserError`` before allocating a ``shape`` tensor of ``itemsize``-byte elements over MAX_INPUT_BYTES."""
    nbytes = math.prod(shape) * itemsize
    if nbytes > MAX_INPUT_BYTES:
        raise UserError(f"{what} {format_dims(shape)} would take {_size(nbytes)}, over the "
                        f"{_size(MAX_INPUT_BYTES)} input budget: use a smaller batch or input shape")


def _size(nbytes: float) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    while nbytes >= 1024 and len(units) > 1:
        nbytes /= 1024
        units.pop(0)
    return f"{nbytes:.3g} {units[0]}"
