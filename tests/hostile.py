"""Fabricated hostile inputs and the checks every bad-input case must pass.

Builders write small files that lie (code-execution payloads, forged headers, wrong types, corrupt
archives); ``invoke`` / ``run_process`` run a command line under a memory cap and a deadline;
``clean_failure_problems`` lists what is wrong with an outcome: a zero exit, no final ``error:``
line, a traceback, a payload's marker file, files left behind.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import traceback
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nepenthe_compress.archs import build_model
from nepenthe_compress.checkpoint import FORMAT, HASH_KEY, content_hash

ARCH = "cifar_resnet18"
KWARGS = {"num_classes": 10, "in_channels": 3, "width": 0.125}
SHAPE = (3, 32, 32)
SAMPLES = 8
MEMORY_HEADROOM = 6 * 2**30   # address space a case may add to the test process before allocations fail
DEADLINE_S = 60               # a case still running after this long has hung
MAX_ERROR_LINE = 2000         # characters: a 1 MB string from a file must not flood the terminal


# ---- models and checkpoints ---------------------------------------------------------------------

def small_model(seed: int = 0) -> nn.Module:
    """The corpus' valid model: a width-0.125 CIFAR ResNet-18 with non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    model = build_model(ARCH, **KWARGS)
    with torch.no_grad():
        model.train()(torch.randn(4, *SHAPE))
    return model.eval()


def raw_checkpoint(weights: dict[str, torch.Tensor], /, **changes: Any) -> dict[str, Any]:
    """This tool's checkpoint dict (no content hash) holding ``weights``, with top-level entries
    replaced by ``changes``."""
    raw = {"format": FORMAT, "arch": ARCH, "arch_kwargs": dict(KWARGS),
           "state_dict": {k: v.clone() for k, v in weights.items()}, "masks": {}, "meta": {}}
    return {**raw, **changes}


def with_hash(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with a correct content hash, as an attacker who read the format would write it."""
    return {**raw, HASH_KEY: content_hash(raw)}


def save(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


class Payload:
    """Unpickles to ``func(*args)``: the classic ``__reduce__`` code-execution payload."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.func, self.args


def touch_command(marker: Path) -> str:
    return f"touch '{marker}'"


def legacy_pickle_payload(path: Path, marker: Path) -> Path:
    """A plain (non-zip) pickle whose loading runs ``touch MARKER``."""
    path.write_bytes(pickle.dumps(Payload(os.system, touch_command(marker)), protocol=2))
    return path


def zip_pickle_payload(path: Path, marker: Path, wrap: Callable[[Any], Any] = lambda p: {"state_dict": p}) -> Path:
    """A torch zip checkpoint whose data.pkl runs ``touch MARKER`` when unpickled."""
    return save(wrap(Payload(os.system, touch_command(marker))), path)


# ---- data -----------------------------------------------------------------------------------------

def write_npz(path: Path, x: np.ndarray | None = None, **arrays: np.ndarray) -> Path:
    """An .npz with ``SAMPLES`` seeded N(0,1) samples of ``SHAPE`` (or ``x``) and integer labels."""
    if x is None:
        x = np.random.default_rng(0).standard_normal((SAMPLES, *SHAPE)).astype(np.float32)
    arrays.setdefault("y", np.arange(len(x)) % KWARGS["num_classes"])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, **{k: v for k, v in arrays.items() if v is not None})
    return path


def npy_bytes(shape: tuple[int, ...], descr: str = "<f4", payload: bytes = b"\0" * 16) -> bytes:
    """A .npy file whose header declares ``shape`` whatever the (tiny) data that follows."""
    header = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode()
    pad = 64 - (10 + len(header) + 1) % 64
    header += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + payload


def forged_npz(path: Path, shape: tuple[int, ...], descr: str = "<f4") -> Path:
    """An .npz whose ``x.npy`` header declares ``shape`` (e.g. 1e10 floats) over 16 bytes of data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("x.npy", npy_bytes(shape, descr))
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def forged_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR declares ``width`` x ``height`` RGB pixels over a few bytes of IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def real_png(path: Path, size: int = 32, seed: int = 0) -> Path:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


# ---- ONNX ------------------------------------------------------------------------------------------

def onnx_model(path: Path, in_features: int = 16, out_features: int = 4, inputs: int = 1,
               input_dims: list[Any] | None = None, elem_type: str = "FLOAT", op_domain: str = "",
               external: str | None = None) -> Path:
    """A Gemm ``y = x W^T`` ONNX model; ``inputs=2`` adds a second input summed into x; ``op_domain``
    puts the Gemm in a domain no runtime knows; ``external`` stores W as external data at that location."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((out_features, in_features), 0.1, np.float32), "w")
    if external is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for k, v in (("location", external), ("offset", "0"), ("length", str(4 * in_features * out_features))):
            entry = w.external_data.add()
            entry.key, entry.value = k, v
    dims = input_dims or ["N", in_features]
    dtype = getattr(TensorProto, elem_type)
    graph_inputs = [helper.make_tensor_value_info(f"x{i}", dtype, dims) for i in range(inputs)]
    nodes, first = [], "x0"
    if inputs == 2:
        nodes.append(helper.make_node("Add", ["x0", "x1"], ["s"]))
        first = "s"
    nodes.append(helper.make_node("Gemm", [first, "w"], ["y"], transB=1, domain=op_domain))
    graph = helper.make_graph(nodes, "g", graph_inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_features])],
                              initializer=[w])
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(op_domain, 1)] if op_domain else [])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def onnx_pool(path: Path, dims: list[Any]) -> Path:
    """``GlobalAveragePool`` over an input whose declared ``dims`` may be fixed and huge."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("GlobalAveragePool", ["x0"], ["y"])], "g",
                              [helper.make_tensor_value_info("x0", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims[:2], 1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def onnx_constant_of_shape(path: Path, shape: tuple[int, ...], in_features: int = 16) -> Path:
    """A valid single-input model whose output ``x[:, :1] * ConstantOfShape(shape)`` asks the runtime
    for ``prod(shape)`` floats: no header reveals it, only running it does."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(shape, np.int64), "shape"),
             *(numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("zero", 0), ("one", 1)))]
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("Slice", ["x0", "zero", "one", "one"], ["first"]),
             helper.make_node("Mul", ["first", "big"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, ["N", in_features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def rewrite_zip(src: Path, dst: Path, change: Callable[[str, bytes], tuple[str, bytes] | None]) -> Path:
    """Copy the zip ``src`` to ``dst`` with every entry passed through ``change`` (None drops it)."""
    with zipfile.ZipFile(src) as z:
        entries = [(i, z.read(i.filename)) for i in z.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as out:
        for info, data in entries:
            kept = change(info.filename, data)
            if kept is not None:
                out.writestr(kept[0], kept[1])
    dst.write_bytes(buf.getvalue())
    return dst


def pt2_with_pickled_weight(src: Path, dst: Path, marker: Path) -> Path:
    """A torch.export archive whose first weight is declared pickled and holds a ``touch`` payload."""
    blob = io.BytesIO()
    torch.save(Payload(os.system, touch_command(marker)), blob)

    def change(name: str, data: bytes) -> tuple[str, bytes]:
        if name.endswith("model_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return name, json.dumps(config).encode()
        if name.endswith("weights/weight_0"):
            return name, blob.getvalue()
        return name, data

    return rewrite_zip(src, dst, change)


# ---- running a case ---------------------------------------------------------------------------------

@dataclass
class Outcome:
    exit_code: int | None      # None: did not finish
    stdout: str
    stderr: str
    exception: str = ""        # formatted traceback of an exception that escaped the command
    native_stderr: str = ""    # what native code (onnxruntime, torch's C++ logs) wrote to fd 2 in process


class Hung(BaseException):
    """Raised in the test process when a case passes its deadline (BaseException: not swallowed)."""


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


@contextlib.contextmanager
def native_stderr() -> Iterator[Callable[[], str]]:
    """Send file descriptor 2 to a temporary file: in process, click captures ``sys.stderr`` but not
    what native libraries write straight to the descriptor, which a user's terminal shows all the same."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: (sink.seek(0), sink.read().decode(errors="replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def memory_cap(headroom: int = MEMORY_HEADROOM) -> Iterator[None]:
    """Make allocations beyond ``headroom`` fail (as on a small machine) instead of swapping or
    being OOM-killed: the cases are memory bombs, and CI machines differ in RAM."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _address_space() + headroom
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def invoke(argv: list[str], seconds: int = DEADLINE_S) -> Outcome:
    """Run ``nepenthe-compress ARGV`` in this process (click's CliRunner) under the memory cap and
    a deadline."""
    from click.testing import CliRunner

    from nepenthe_compress.cli import main

    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        runner = CliRunner()
    with native_stderr() as native, memory_cap(), deadline(seconds):
        try:
            result = runner.invoke(main, [str(a) for a in argv], catch_exceptions=True)
        except Hung as e:
            return Outcome(None, "", "", f"Hung: {e}", native())
        written = native()
    exception = ""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        exception = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else repr(result.exception)
    return Outcome(result.exit_code, result.stdout, result.stderr, exception, written)


def _cap_child(headroom: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30 + headroom, resource.RLIM_INFINITY))
    return apply


def run_process(argv: list[str], cwd: Path, timeout: int = DEADLINE_S) -> Outcome:
    """Run ``python -m nepenthe_compress ARGV`` as a real process (address space capped, killed at
    ``timeout``)."""
    env = {**os.environ, "PYTHONWARNINGS": os.environ.get("PYTHONWARNINGS", "")}
    try:
        done = subprocess.run([sys.executable, "-m", "nepenthe_compress", *map(str, argv)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout, preexec_fn=_cap_child(MEMORY_HEADROOM))
    except subprocess.TimeoutExpired as e:
        return Outcome(None, _text(e.stdout), _text(e.stderr), f"Hung: still running after {timeout} s (killed)")
    return Outcome(done.returncode, done.stdout, done.stderr)


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


# ---- judging an outcome ---------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (relative path -> size, mtime): to spot files left or changed."""
    out = {}
    for folder, _, files in os.walk(root):  # symlinks to folders are not followed
        for name in files:
            p = Path(folder, name)
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def clean_failure_problems(outcome: Outcome, before: dict[str, tuple[int, int]],
                           after: dict[str, tuple[int, int]], marker: Path,
                           only_error_line: bool = False) -> list[str]:
    """What makes ``outcome`` other than a clean user error: non-zero exit, the last stderr line an
    ``error:`` line (or click's usage ``Error:``, exit 2), exactly one such line, no traceback, no
    marker file, no file created or changed."""
    problems = []
    if outcome.exception.startswith("Hung"):
        problems.append(outcome.exception)
    elif outcome.exception:
        last = _lines(outcome.exception)[-1] if _lines(outcome.exception) else outcome.exception
        problems.append(f"uncaught exception: {last.strip()}")
    if outcome.exit_code == 0:
        problems.append("exit code 0 (accepted the input)")
    err = _lines(outcome.stderr)
    usage = outcome.exit_code == 2 and bool(err) and err[-1].startswith("Error:")
    error_lines = [line for line in err if line.lstrip().startswith("error:")]
    if outcome.exit_code not in (0, None) and not outcome.exception:
        if not usage and not (err and err[-1].startswith("error:")):
            problems.append("last stderr line is not 'error: ...'")
        if not usage and len(error_lines) != 1:
            problems.append(f"{len(error_lines)} 'error:' lines on stderr (expected 1)")
    if "Traceback" in outcome.stdout + outcome.stderr:
        problems.append("a traceback was printed")
    native = _lines(outcome.native_stderr)
    if native:
        problems.append(f"{len(native)} line(s) written to stderr by native code, e.g. {native[0][:200]!r}")
    if "\x1b" in outcome.stderr:
        problems.append("a terminal escape sequence reached stderr")
    if any(len(line) > MAX_ERROR_LINE for line in error_lines):
        problems.append(f"an error line of {max(map(len, error_lines)):,} characters (limit {MAX_ERROR_LINE})")
    if only_error_line and len(err) != 1:
        problems.append(f"{len(err)} non-empty stderr lines (expected only the error line)")
    if marker.exists():
        problems.append(f"PAYLOAD EXECUTED: {marker.name} was created")
    new = sorted(set(after) - set(before) - {str(marker.name)})
    changed = sorted(k for k in set(after) & set(before) if after[k] != before[k])
    if new:
        problems.append(f"files left behind: {', '.join(new[:5])}")
    if changed:
        problems.append(f"files changed: {', '.join(changed[:5])}")
    return problems


def report(case_id: str, argv: list[str], outcome: Outcome, problems: list[str], tail: int = 6) -> str:
    """An assertion message: the case, its command, the exit code, the problems and the output's tail."""
    shown = " ".join(str(a) for a in argv)
    parts = [f"[{case_id}] nepenthe-compress {shown}", f"  exit code: {outcome.exit_code}",
             *(f"  problem: {p}" for p in problems)]
    err = _lines(outcome.stderr)[-tail:]
    if err:
        parts += ["  stderr (last lines):", *(f"    | {line}" for line in err)]
    out = _lines(outcome.stdout)[-3:]
    if out:
        parts += ["  stdout (last lines):", *(f"    | {line}" for line in out)]
    if outcome.native_stderr:
        parts += ["  native stderr (first lines):", *(f"    | {line[:300]}" for line in _lines(outcome.native_stderr)[:3])]
    if outcome.exception and not outcome.exception.startswith("Hung"):
        parts += ["  exception (last lines):", *(f"    | {line}" for line in _lines(outcome.exception)[-4:])]
    return "\n".join(parts)
