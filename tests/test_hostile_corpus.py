"""A bad-input corpus, fabricated here, run through every verb that reads the input.

Every case must end as a clean user error: non-zero exit, the last stderr line ``error: ...`` (one
such line), no traceback, no file created or changed (the payloads' marker file included). Memory
bombs run under an address-space cap, and every case under a deadline, so a regression fails the
case instead of the machine.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nepenthe_compress.checkpoint import HASH_KEY
from hostile import (
    ARCH,
    KWARGS,
    SAMPLES,
    SHAPE,
    Payload,
    clean_failure_problems,
    forged_npz,
    forged_png,
    invoke,
    legacy_pickle_payload,
    onnx_constant_of_shape,
    onnx_model,
    onnx_pool,
    pt2_with_pickled_weight,
    raw_checkpoint,
    real_png,
    report,
    rewrite_zip,
    run_process,
    save,
    small_model,
    snapshot,
    touch_command,
    with_hash,
    write_npz,
    zip_pickle_payload,
)

VALID_META = {"input_shape": list(SHAPE)}   # plus "calib": the workspace's valid .npz


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return small_model().state_dict()


@dataclass
class Ws:
    """One case's folder: inputs in ``inp``, outputs aimed at ``out``, payloads touch ``marker``."""

    root: Path
    sd: dict[str, torch.Tensor]

    @property
    def inp(self) -> Path:
        return self.root / "in"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def marker(self) -> Path:
        return self.root / "MARKER"

    @property
    def data(self) -> Path:
        path = self.inp / "data.npz"
        return path if path.exists() else write_npz(path)

    def ckpt(self, name: str = "model.pt", hashed: bool = False, **changes: Any) -> Path:
        """This tool's checkpoint with top-level ``changes`` (meta defaults to the valid data)."""
        changes.setdefault("meta", {**VALID_META, "calib": str(self.data)})
        raw = raw_checkpoint(self.sd, **changes)
        return save(with_hash(raw) if hashed else raw, self.inp / name)

    def meta(self, **meta: Any) -> Path:
        """A valid checkpoint whose meta entries are replaced by ``meta``."""
        return self.ckpt(meta={**VALID_META, "calib": str(self.data), **meta})

    def valid(self) -> Path:
        return self.ckpt("valid.pt", hashed=True)


@pytest.fixture()
def ws(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> Ws:
    w = Ws(tmp_path, state_dict)
    w.inp.mkdir()
    w.out.mkdir()
    return w


def check(ws: Ws, case_id: str, argv: list[Any], *, process: bool = False, timeout: int = 60,
          only_error_line: bool = False) -> None:
    """Run ``argv`` (in process, or as a real process in ``ws.root``) and assert a clean failure."""
    argv = [str(a) for a in argv]
    before = snapshot(ws.root)
    outcome = run_process(argv, ws.root, timeout) if process else invoke(argv)
    problems = clean_failure_problems(outcome, before, snapshot(ws.root), ws.marker, only_error_line)
    assert not problems, report(case_id, argv, outcome, problems)


# ---- checkpoint files, through every verb that reads one ------------------------------------------

CkptBuilder = Callable[[Ws], Path]


def _state(ws: Ws, **replace: Any) -> dict[str, Any]:
    return {**ws.sd, **replace}


def _as(ws: Ws, dtype: torch.dtype) -> dict[str, Any]:
    return _state(ws, **{"fc.weight": torch.ones(ws.sd["fc.weight"].shape, dtype=dtype)})


def _touch(ws: Ws) -> str:
    return touch_command(ws.marker)


CODE_EXECUTION: dict[str, CkptBuilder] = {
    "arch-os-system": lambda ws: ws.ckpt(arch="os:system", arch_kwargs={"command": _touch(ws)}),
    "arch-os-system-hashed": lambda ws: ws.ckpt(hashed=True, arch="os:system", arch_kwargs={"command": _touch(ws)}),
    "arch-subprocess-getoutput": lambda ws: ws.ckpt(arch="subprocess:getoutput", arch_kwargs={"cmd": _touch(ws)}),
    "arch-builtins-exec": lambda ws: ws.ckpt(arch="builtins:exec",
                                             arch_kwargs={"source": f"open({str(ws.marker)!r}, 'w').close()"}),
    "arch-pathlib-touch": lambda ws: ws.ckpt(arch="pathlib:Path.touch", arch_kwargs={"self": str(ws.marker)}),
    "arch-dotted-os-system": lambda ws: ws.ckpt(arch="os.system", arch_kwargs={"command": _touch(ws)}),
    "arch-package-callable": lambda ws: ws.ckpt(arch=f"nepenthe_compress.archs:{ARCH}"),
    "wrapped-arch-os-system": lambda ws: save({"state_dict": ws.sd, "arch": "os:system",
                                              "arch_kwargs": {"command": _touch(ws)}}, ws.inp / "model.pt"),
    "pickle-reduce-legacy": lambda ws: legacy_pickle_payload(ws.inp / "model.pt", ws.marker),
    "pickle-reduce-zip": lambda ws: zip_pickle_payload(ws.inp / "model.pt", ws.marker),
    "pickle-reduce-zip-in-meta": lambda ws: save({**raw_checkpoint(ws.sd), "meta": Payload(os.system, _touch(ws))},
                                                 ws.inp / "model.pt"),
    "pickle-reduce-zip-as-tensor": lambda ws: save(_state(ws, **{"fc.bias": Payload(os.system, _touch(ws))}),
                                                   ws.inp / "model.pt"),
}

ARCH_KWARGS: dict[str, CkptBuilder] = {
    f"kwargs-{name}": (lambda kw: lambda ws: ws.ckpt(arch_kwargs={**KWARGS, **kw}))(kw) for name, kw in {
        "width-1e4": {"width": 1e4},
        "width-10000-int": {"width": 10000},
        "num_classes-1e11": {"num_classes": 1e11},
        "num_classes-10pow11": {"num_classes": 10 ** 11},
        "num_classes-10pow40": {"num_classes": 10 ** 40},
        "num_classes-negative": {"num_classes": -3},
        "num_classes-zero": {"num_classes": 0},
        "in_channels-10pow9": {"in_channels": 10 ** 9},
        "width-string": {"width": "x"},
        "width-zero": {"width": 0},
        "width-negative": {"width": -1},
        "width-nan": {"width": math.nan},
        "width-inf": {"width": math.inf},
        "width-list": {"width": [0.125]},
        "width-dict": {"width": {"a": 1}},
        "width-tensor": {"width": torch.tensor(0.125)},
        "unknown-name": {"command": "ls"},
    }.items()
} | {
    "kwargs-not-a-dict": lambda ws: ws.ckpt(arch_kwargs=[["width", 0.125]]),
    "kwargs-non-string-key": lambda ws: ws.ckpt(arch_kwargs={**KWARGS, 1: 2}),
    "torchvision-weights-download": lambda ws: ws.ckpt(arch="resnet18", arch_kwargs={"weights": "DEFAULT"}),
    "torchvision-norm_layer-string": lambda ws: ws.ckpt(arch="resnet18", arch_kwargs={"norm_layer": "os:system"}),
    "torchvision-num_classes-10pow11": lambda ws: ws.ckpt(arch="resnet18", arch_kwargs={"num_classes": 10 ** 11}),
    "unknown-arch": lambda ws: ws.ckpt(arch="resnet1800"),
    "arch-not-a-string": lambda ws: ws.ckpt(arch=["cifar_resnet18"]),
}

CONTENT: dict[str, CkptBuilder] = {
    "weights-int64": lambda ws: ws.ckpt(state_dict=_as(ws, torch.int64)),
    "weights-bool": lambda ws: ws.ckpt(state_dict=_as(ws, torch.bool)),
    "weights-complex": lambda ws: ws.ckpt(state_dict=_as(ws, torch.complex64)),
    "weights-int8": lambda ws: ws.ckpt(state_dict=_as(ws, torch.int8)),
    "weights-nan": lambda ws: ws.ckpt(state_dict=_state(ws, **{"fc.bias": torch.full((10,), math.nan)})),
    "weights-inf": lambda ws: ws.ckpt(state_dict=_state(ws, **{"fc.bias": torch.full((10,), math.inf)})),
    "weight-wrong-shape": lambda ws: ws.ckpt(state_dict=_state(ws, **{"fc.weight": ws.sd["fc.weight"].t().clone()})),
    "weight-missing": lambda ws: ws.ckpt(state_dict={k: v for k, v in ws.sd.items() if k != "fc.weight"}),
    "weight-extra": lambda ws: ws.ckpt(state_dict=_state(ws, **{"evil.weight": torch.zeros(3)})),
    "weight-stride0-1e12": lambda ws: ws.ckpt(state_dict=_state(ws, **{"fc.bias": torch.zeros(1).expand(10 ** 12)})),
    "weight-stride0-1e6x1e6": lambda ws: ws.ckpt(state_dict=_state(
        ws, **{"fc.weight": torch.zeros(1, 1).expand(10 ** 6, 10 ** 6)})),
    "weight-sparse": lambda ws: ws.ckpt(state_dict=_state(ws, **{"fc.weight": ws.sd["fc.weight"].to_sparse()})),
    "weight-list": lambda ws: ws.ckpt(state_dict=_state(ws, **{"fc.bias": [0.0] * 10})),
    "weight-string": lambda ws: ws.ckpt(state_dict=_state(ws, **{"fc.bias": "zeros"})),
    "weight-none": lambda ws: ws.ckpt(state_dict=_state(ws, **{"fc.bias": None})),
    "state_dict-empty": lambda ws: ws.ckpt(state_dict={}),
    "state_dict-list": lambda ws: ws.ckpt(state_dict=list(ws.sd.values())),
    "state_dict-missing": lambda ws: save({k: v for k, v in raw_checkpoint(ws.sd).items() if k != "state_dict"},
                                          ws.inp / "model.pt"),
    "masks-wrong-shape": lambda ws: ws.ckpt(masks={"fc.weight": torch.ones(3, 3, dtype=torch.bool)}),
    "masks-float-half": lambda ws: ws.ckpt(masks={"fc.weight": torch.full_like(ws.sd["fc.weight"], 0.5)}),
    "masks-unknown-key": lambda ws: ws.ckpt(masks={"evil.weight": torch.ones(3, dtype=torch.bool)}),
    "masks-not-tensor": lambda ws: ws.ckpt(masks={"fc.weight": [1, 0]}),
    "masks-list": lambda ws: ws.ckpt(masks=[torch.ones(3)]),
    "masks-stride0-1e12": lambda ws: ws.ckpt(masks={"fc.bias": torch.ones(1, dtype=torch.bool).expand(10 ** 12)}),
    "format-int": lambda ws: ws.ckpt(format=1),
    "format-none": lambda ws: ws.ckpt(format=None),
    "format-list": lambda ws: ws.ckpt(format=["nepenthe-compress/1"]),
    "format-future": lambda ws: ws.ckpt(format="nepenthe-compress/999"),
    "hash-mismatch": lambda ws: save({**raw_checkpoint(ws.sd, meta={**VALID_META, "calib": str(ws.data)}),
                                      HASH_KEY: "0" * 64}, ws.inp / "model.pt"),
    "hash-not-string": lambda ws: save({**raw_checkpoint(ws.sd, meta={**VALID_META, "calib": str(ws.data)}),
                                        HASH_KEY: 12345}, ws.inp / "model.pt"),
    "meta-list": lambda ws: ws.ckpt(meta=["calib", str(ws.data)]),
    "meta-string": lambda ws: ws.ckpt(meta="calib=mnist"),
    "meta-none": lambda ws: ws.ckpt(meta=None),
    "top-level-list": lambda ws: save([raw_checkpoint(ws.sd)], ws.inp / "model.pt"),
    "top-level-tensor": lambda ws: save(torch.zeros(3), ws.inp / "model.pt"),
    "empty-file": lambda ws: _write(ws.inp / "model.pt", b""),
    "text-file": lambda ws: _write(ws.inp / "model.pt", b"arch: os:system\n"),
    "truncated": lambda ws: _write(ws.inp / "model.pt", ws.valid().read_bytes()[:5000]),
    "zip-without-data-pkl": lambda ws: rewrite_zip(ws.valid(), ws.inp / "model.pt",
                                                   lambda n, d: None if n.endswith("data.pkl") else (n, d)),
    "zip-tensor-entry-missing": lambda ws: rewrite_zip(ws.valid(), ws.inp / "model.pt",
                                                       lambda n, d: None if n.endswith("/data/0") else (n, d)),
    "zip-tensor-entry-short": lambda ws: rewrite_zip(ws.valid(), ws.inp / "model.pt",
                                                     lambda n, d: (n, d[:3]) if "/data/" in n else (n, d)),
    "a-directory": lambda ws: _mkdir(ws.inp / "model.pt"),
    "missing-file": lambda ws: ws.inp / "nothing-here.pt",
    "symlink-to-dev-zero": lambda ws: _link(ws.inp / "model.pt", "/dev/zero"),
    "name-with-newline": lambda ws: _write(ws.inp / "evil\nerror: all fine.pt", b"not a checkpoint"),
    "arch-terminal-escapes": lambda ws: ws.ckpt(arch="\x1b[2J\x1b]0;owned\x07resnet\nerror: all fine"),
    "arch-1MB-string": lambda ws: ws.ckpt(arch="r" * 1_000_000),
}

SHAPES: dict[str, CkptBuilder] = {
    f"meta-{name}": (lambda m: lambda ws: ws.meta(**m))(m) for name, m in {
        "input_shape-huge": {"input_shape": [1, 100000, 100000]},
        "input_shape-10pow30": {"input_shape": [10 ** 30, 1, 1]},
        "input_shape-negative": {"input_shape": [3, -32, 32]},
        "input_shape-zero": {"input_shape": [0, 32, 32]},
        "input_shape-strings": {"input_shape": ["a", "b", "c"]},
        "input_shape-string": {"input_shape": "3,32,32"},
        "input_shape-float": {"input_shape": [3.5, 32, 32]},
        "input_shape-nan": {"input_shape": [3, math.nan, 32]},
        "input_shape-scalar": {"input_shape": 7},
        "input_shape-empty": {"input_shape": []},
        "input_shape-nested": {"input_shape": [[3], [32], [32]]},
        "input_shape-5000-dims": {"input_shape": [1] * 5000},
    }.items()
}

# without a recorded input shape, so that export reads meta.calib (and its normalisation) too
DATA_META: dict[str, CkptBuilder] = {
    f"meta-{name}": (lambda m: lambda ws: ws.ckpt(meta={"calib": str(ws.data), **m}))(m) for name, m in {
        "calib-int": {"calib": 123},
        "calib-list": {"calib": ["mnist"]},
        "calib-dict": {"calib": {"x": 1}},
        "calib-bool": {"calib": True},
        "calib-missing-path": {"calib": "/no/such/data.npz"},
        "calib-unknown-source": {"calib": "http://example.invalid/data.npz.exe"},
        "calib-cifar-root-missing": {"calib": "cifar10:/no/such/root"},
        "normalize-number": {"normalize": 5},
        "normalize-strings": {"normalize": {"mean": "abc", "std": [1]}},
        "normalize-zero-std": {"normalize": {"mean": [0, 0, 0], "std": [0, 0, 0]}},
        "normalize-wrong-channels": {"normalize": {"mean": [0], "std": [1]}},
        "linearised_sites-unknown": {"linearised_sites": ["no.such.relu"]},
        "linearised_sites-string": {"linearised_sites": "relu"},
        "linearised_sites-ints": {"linearised_sites": [1, 2]},
    }.items()
}
META = SHAPES | DATA_META

CKPT_VERBS: dict[str, Callable[[Ws, Path], list[Any]]] = {
    "entropy": lambda ws, ck: ["entropy", ck, "--limit", "4"],
    "fold": lambda ws, ck: ["fold", ck, "-o", ws.out, "--no-bench", "--no-pt2"],
    "export": lambda ws, ck: ["export", ck, "-o", ws.out / "model.onnx"],
    "verify": lambda ws, ck: ["verify", ck, ck, "--limit", "4"],
    "prune-init": lambda ws, ck: ["prune", "--init", ck, "--data", ws.data, "--method", "imp", "--rounds", "1",
                                  "--epochs", "0", "-o", ws.out / "run"],
}
# The loader is shared: every case runs through entropy and prune --init (which loads with its own
# options), a sample through the other verbs. Meta is read differently by entropy/fold, export and
# verify (prune reads its own --data), so those three see every meta case.
LOADER_VERBS = ("entropy", "prune-init")
LOADER_SAMPLE = ("kwargs-width-1e4", "kwargs-num_classes-10pow11", "kwargs-non-string-key",
                 "torchvision-weights-download", "weights-int64", "weights-bool", "weight-stride0-1e12",
                 "masks-float-half", "format-int", "meta-list", "truncated", "hash-mismatch")
META_VERBS = ("entropy", "export", "verify")
META_SAMPLE = ("meta-input_shape-huge", "meta-input_shape-strings", "meta-calib-int", "meta-normalize-zero-std")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _link(path: Path, target: str) -> Path:
    path.symlink_to(target)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _grid(cases: dict[str, Any], verbs: tuple[str, ...] | list[str], sample: tuple[str, ...] = (),
          sample_verbs: tuple[str, ...] | list[str] = ()) -> list[Any]:
    """(verb, case) pairs: every case through ``verbs``, the ``sample`` cases through ``sample_verbs`` too."""
    pairs = [(verb, name) for name in cases for verb in verbs] + \
            [(verb, name) for name in sample for verb in sample_verbs if verb not in verbs]
    assert all(name in cases for _, name in pairs)
    return [pytest.param(verb, name, id=f"{verb}:{name}") for verb, name in pairs]


@pytest.mark.parametrize("verb, name", _grid(CODE_EXECUTION, list(CKPT_VERBS)))
def test_code_execution_payload_is_refused(ws: Ws, verb: str, name: str) -> None:
    check(ws, f"{verb}:{name}", CKPT_VERBS[verb](ws, CODE_EXECUTION[name](ws)))


@pytest.mark.parametrize("verb, name", _grid(ARCH_KWARGS | CONTENT, LOADER_VERBS, LOADER_SAMPLE, list(CKPT_VERBS)))
def test_hostile_checkpoint_content_is_a_clean_error(ws: Ws, verb: str, name: str) -> None:
    check(ws, f"{verb}:{name}", CKPT_VERBS[verb](ws, (ARCH_KWARGS | CONTENT)[name](ws)))


@pytest.mark.parametrize("verb, name", _grid(META, META_VERBS, META_SAMPLE, ["fold"]))
def test_hostile_checkpoint_meta_is_a_clean_error(ws: Ws, verb: str, name: str) -> None:
    check(ws, f"{verb}:{name}", CKPT_VERBS[verb](ws, META[name](ws)))


# ---- data: --calib / --data / meta.calib --------------------------------------------------------------

DataBuilder = Callable[[Ws], str]


def _npz(name: str, x: Any, **arrays: Any) -> DataBuilder:
    return lambda ws: str(write_npz(ws.inp / name, x, **arrays))


def _folder(ws: Ws, files: dict[str, Callable[[Path], Any]]) -> str:
    """An image folder ``in/images`` whose files (relative path -> writer) are made by ``files``."""
    root = ws.inp / "images"
    root.mkdir()
    for rel, make in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        make(path)
    return str(root)


def _rand(*shape: int, dtype: Any = np.float32) -> np.ndarray:
    return np.random.default_rng(1).standard_normal(shape).astype(dtype)


DATA: dict[str, DataBuilder] = {
    "npz-header-1e10-floats": lambda ws: str(forged_npz(ws.inp / "bomb.npz", (100000, 100000))),
    "npz-header-4e13-floats": lambda ws: str(forged_npz(ws.inp / "bomb.npz", (10 ** 7, 3, 1000, 1000))),
    "npz-header-negative": lambda ws: str(forged_npz(ws.inp / "bomb.npz", (-8, 3, 32, 32))),
    "npz-header-object": lambda ws: str(forged_npz(ws.inp / "bomb.npz", (8, 3), descr="|O")),
    "npz-x-int64": _npz("d.npz", np.ones((SAMPLES, *SHAPE), np.int64)),
    "npz-x-complex": _npz("d.npz", np.ones((SAMPLES, *SHAPE), np.complex64)),
    "npz-x-bool": _npz("d.npz", np.ones((SAMPLES, *SHAPE), bool)),
    "npz-x-strings": _npz("d.npz", np.array([["a"] * 4] * SAMPLES)),
    "npz-x-1d": _npz("d.npz", _rand(SAMPLES)),
    "npz-x-empty": _npz("d.npz", _rand(0, *SHAPE), y=np.zeros(0, np.int64)),
    "npz-x-nan": _npz("d.npz", np.full((SAMPLES, *SHAPE), np.nan, np.float32)),
    "npz-x-one-channel": _npz("d.npz", _rand(SAMPLES, 1, 32, 32)),
    "npz-x-16x16": _npz("d.npz", _rand(SAMPLES, 3, 16, 16)),
    "npz-y-float": _npz("d.npz", _rand(SAMPLES, *SHAPE), y=np.full(SAMPLES, 0.5)),
    "npz-y-short": _npz("d.npz", _rand(SAMPLES, *SHAPE), y=np.zeros(3, np.int64)),
    "npz-no-x": lambda ws: _npz_raw(ws.inp / "d.npz", data=_rand(SAMPLES, *SHAPE)),
    "npz-object-array": lambda ws: _npz_raw(ws.inp / "d.npz", x=np.array([{"a": 1}] * SAMPLES, dtype=object)),
    "npz-garbage": lambda ws: str(_write(ws.inp / "d.npz", b"not a zip at all" * 10)),
    "npz-truncated": lambda ws: str(_write(ws.inp / "d.npz", ws.data.read_bytes()[:4000])),
    "pt-payload-zip": lambda ws: str(zip_pickle_payload(ws.inp / "d.pt", ws.marker, lambda p: {"x": p})),
    "pt-payload-legacy": lambda ws: str(legacy_pickle_payload(ws.inp / "d.pt", ws.marker)),
    "pt-x-list": lambda ws: str(save({"x": [[0.0] * 4] * SAMPLES}, ws.inp / "d.pt")),
    "pt-not-a-dict": lambda ws: str(save(torch.zeros(SAMPLES, *SHAPE), ws.inp / "d.pt")),
    "pt-x-stride0-huge": lambda ws: str(save({"x": torch.zeros(1, 1, 1, 1).expand(10 ** 6, 3, 1000, 1000)},
                                             ws.inp / "d.pt")),
    "folder-empty": lambda ws: _folder(ws, {}),
    "folder-class-without-images": lambda ws: _folder(ws, {"cls/README": lambda p: p.write_text("hi")}),
    "folder-png-30000x30000": lambda ws: _folder(ws, {"cls/bomb.png": lambda p: forged_png(p, 30000, 30000)}),
    "folder-png-70000x70000": lambda ws: _folder(ws, {"cls/bomb.png": lambda p: forged_png(p, 70000, 70000)}),
    "folder-png-truncated": lambda ws: _folder(ws, {"cls/a.png": lambda p: p.write_bytes(_png_bytes()[:60])}),
    "folder-not-an-image": lambda ws: _folder(ws, {"cls/a.png": lambda p: p.write_bytes(b"GIF89a nope")}),
    "folder-files-at-top": lambda ws: _folder(ws, {"a.png": real_png}),
    "cifar-root-missing": lambda ws: f"cifar10:{ws.inp / 'none'}",
    "cifar-batch-payload": lambda ws: _cifar_payload(ws),
    "unknown-suffix": lambda ws: str(_write(ws.inp / "d.csv", b"1,2,3\n")),
    "npz-symlink-dev-zero": lambda ws: str(_link(ws.inp / "d.npz", "/dev/zero")),
    "pt-symlink-dev-zero": lambda ws: str(_link(ws.inp / "d.pt", "/dev/zero")),
}
NEEDS_RECORDED_SHAPE = {"npz-x-16x16"}   # a fully convolutional model takes 16x16 inputs when nothing says 32x32


def _npz_raw(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _cifar_payload(ws: Ws) -> str:
    root = ws.inp / "cifar" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    legacy_pickle_payload(root / "test_batch", ws.marker)
    return f"cifar10:{ws.inp / 'cifar'}"


def _meta_ckpt(ws: Ws, spec: str, shape: bool) -> Path:
    """A checkpoint whose meta names ``spec`` as its data (with or without the input shape)."""
    return ws.ckpt("with-data.pt", meta={"calib": spec, **(VALID_META if shape else {})})


# entropy/fold, export and verify read --calib on their own paths, meta.calib is read with and without
# a recorded input shape (export reads it only without), prune reads --data with no shape to compare
DATA_VERBS: dict[str, Callable[[Ws, str], list[Any]]] = {
    "entropy--calib": lambda ws, s: ["entropy", ws.valid(), "--calib", s],
    "entropy-meta.calib": lambda ws, s: ["entropy", _meta_ckpt(ws, s, shape=True)],
    "export-meta.calib": lambda ws, s: ["export", _meta_ckpt(ws, s, shape=False), "-o", ws.out / "m.onnx"],
    "prune--data": lambda ws, s: ["prune", "--init", ws.valid(), "--data", s, "--method", "imp", "--rounds", "1",
                                  "--epochs", "0", "-o", ws.out / "run"],
    "fold--calib": lambda ws, s: ["fold", ws.valid(), "--calib", s, "-o", ws.out, "--no-bench", "--no-pt2"],
    "export--calib": lambda ws, s: ["export", ws.valid(), "--calib", s, "-o", ws.out / "m.onnx"],
    "verify--calib": lambda ws, s: ["verify", ws.valid(), ws.valid(), "--calib", s],
}
DATA_CORE_VERBS = ("entropy--calib", "entropy-meta.calib", "export-meta.calib", "prune--data")
DATA_SAMPLE = ("npz-header-1e10-floats", "npz-x-int64", "npz-x-one-channel", "npz-truncated", "pt-payload-zip",
               "pt-x-stride0-huge", "folder-png-30000x30000", "cifar-batch-payload")
DATA_GRID = [p for p in _grid(DATA, DATA_CORE_VERBS, DATA_SAMPLE, list(DATA_VERBS))
             if not (p.values[1] in NEEDS_RECORDED_SHAPE and p.values[0] in ("export-meta.calib", "prune--data"))]


@pytest.mark.parametrize("verb, name", DATA_GRID)
def test_hostile_data_is_a_clean_error(ws: Ws, verb: str, name: str) -> None:
    spec = DATA[name](ws)
    check(ws, f"{verb}:{name}", DATA_VERBS[verb](ws, spec))


@pytest.mark.parametrize("verb", ["entropy", "fold", "verify"])
def test_one_channel_data_on_a_three_channel_model_without_recorded_shape(ws: Ws, verb: str) -> None:
    """No input_shape in the checkpoint: the data/model mismatch must be found before a forward pass."""
    ck = ws.ckpt(meta={"calib": str(write_npz(ws.inp / "grey.npz", _rand(SAMPLES, 1, 32, 32)))})
    argv = {"entropy": ["entropy", ck], "fold": ["fold", ck, "-o", ws.out, "--no-bench", "--no-pt2"],
            "verify": ["verify", ck, ck]}[verb]
    check(ws, f"{verb}:grey-data-rgb-model", argv)


# ---- command-line values ---------------------------------------------------------------------------------

ARGS: dict[str, Callable[[Ws], list[Any]]] = {
    "entropy:input-shape-huge": lambda ws: ["entropy", ws.valid(), "--input-shape", "1,100000,100000"],
    "fold:input-shape-huge": lambda ws: ["fold", ws.valid(), "--input-shape", "1,100000,100000", "-o", ws.out,
                                         "--no-bench", "--no-pt2"],
    "export:input-shape-huge": lambda ws: ["export", ws.valid(), "--input-shape", "1,100000,100000",
                                           "-o", ws.out / "m.onnx"],
    "export:input-shape-overflow": lambda ws: ["export", ws.valid(), "--input-shape", "99999999999999999999999,1",
                                               "-o", ws.out / "m.onnx"],
    "export:input-shape-wrong-channels": lambda ws: ["export", ws.valid(), "--input-shape", "1,32,32",
                                                     "-o", ws.out / "m.onnx"],
    "verify:input-shape-huge": lambda ws: ["verify", ws.ckpt(meta={}), ws.ckpt("b.pt", meta={}),
                                           "--input-shape", "1,100000,100000"],
    "verify:input-shape-wrong-channels": lambda ws: ["verify", ws.ckpt(meta={}), ws.ckpt("b.pt", meta={}),
                                                     "--input-shape", "1,32,32"],
    "entropy:input-shape-zero": lambda ws: ["entropy", ws.valid(), "--input-shape", "0,32,32"],
    "entropy:input-shape-text": lambda ws: ["entropy", ws.valid(), "--input-shape", "three"],
    "entropy:batch-size-zero": lambda ws: ["entropy", ws.valid(), "--batch-size", "0"],
    "entropy:limit-negative": lambda ws: ["entropy", ws.valid(), "--limit", "-1"],
    "entropy:normalize-zero-std": lambda ws: ["entropy", ws.valid(), "--normalize", "0/0"],
    "entropy:normalize-channels": lambda ws: ["entropy", ws.valid(), "--normalize", "0,0/1"],
    "entropy:plot-unknown-format": lambda ws: ["entropy", ws.valid(), "--plot", ws.out / "p.exe"],
    "entropy:arch-kw-width-1e4": lambda ws: ["entropy", ws.valid(), "--arch", ARCH, "--arch-kw", "width=1e4"],
    "entropy:arch-kw-unknown": lambda ws: ["entropy", ws.valid(), "--arch", ARCH, "--arch-kw", "evil=1"],
    "entropy:arch-unknown": lambda ws: ["entropy", ws.valid(), "--arch", "resnet1800"],
    "entropy:user-arch-returns-dict": lambda ws: ["entropy", ws.valid(), "--arch", "builtins:dict"],
    "entropy:user-arch-not-importable": lambda ws: ["entropy", ws.valid(), "--arch", "no_such_pkg.mod:net"],
    "entropy:linearised-sites-unknown": lambda ws: ["entropy", ws.valid(), "--linearised-sites", "no.such.relu"],
    "entropy:linearised-sites-not-activation": lambda ws: ["entropy", ws.valid(), "--linearised-sites", "conv1"],
    "fold:holdout-out-of-range": lambda ws: ["fold", ws.valid(), "--holdout", "2", "-o", ws.out, "--no-bench",
                                             "--no-pt2"],
    "fold:limit-one": lambda ws: ["fold", ws.valid(), "--limit", "1", "-o", ws.out, "--no-bench", "--no-pt2"],
    "prune:data-empty-string": lambda ws: ["prune", "--init", ws.valid(), "--data", "", "--method", "imp",
                                           "--rounds", "1", "--epochs", "0", "-o", ws.out / "run"],
    "prune:arch-kw-bomb": lambda ws: ["prune", "--arch", ARCH, "--arch-kw", "width=1e4", "--data", ws.data,
                                      "--method", "imp", "--rounds", "1", "--epochs", "0", "-o", ws.out / "run"],
    "prune:file-arch-from-init": lambda ws: ["prune", "--init", ws.ckpt(arch="os:system",
                                                                        arch_kwargs={"command": _touch(ws)}),
                                             "--data", ws.data, "--method", "imp", "--rounds", "1",
                                             "--epochs", "0", "-o", ws.out / "run"],
}


@pytest.mark.parametrize("case", list(ARGS))
def test_hostile_command_line_values_are_a_clean_error(ws: Ws, case: str) -> None:
    check(ws, case, ARGS[case](ws))


def test_prune_refuses_an_arch_kw_bomb_for_its_size(ws: Ws) -> None:
    """The refusal must come from the model budget, not from failing to parse a well-formed --arch-kw."""
    argv = [str(a) for a in ARGS["prune:arch-kw-bomb"](ws)]
    outcome = invoke(argv)
    assert "would allocate more than" in outcome.stderr, report("prune:arch-kw-bomb", argv, outcome,
                                                                 ["not refused for its size"])


# ---- prune --resume: the run folder's state file is data too ---------------------------------------------

def _resume_argv(ws: Ws, init: Path) -> list[Any]:
    return ["prune", "--init", init, "--data", ws.data, "--method", "imp", "--rounds", "1", "--epochs", "0",
            "-o", ws.out, "--resume"]


def _state_file(ws: Ws, init: Path, rounds: Any, text: str | None = None) -> None:
    from nepenthe_compress.prune.run import PruneConfig

    config = PruneConfig(data=str(ws.data), init=str(init), method="imp", rounds=1, epochs=0, out_dir=ws.out,
                         resume=True, progress=True).identity()
    (ws.out / "prune_state.json").write_text(text if text is not None else
                                             json.dumps({"config": config, "rounds": rounds}))


def _round(checkpoint: str, **changes: Any) -> dict[str, Any]:
    row = {"round": 0, "method": "imp", "action": "initial", "sparsity": 0.0, "sites_removed": 0, "sites_total": 17,
           "accuracy": 10.0, "loss": None, "linearised": [], "zero_entropy": [], "checkpoint": checkpoint,
           "within_limit": True}
    return {**row, **changes}


RESUME: dict[str, Callable[[Ws, Path], None]] = {
    "state-not-json": lambda ws, init: _state_file(ws, init, None, text="{not json"),
    "rounds-not-a-list": lambda ws, init: _state_file(ws, init, "round_00.pt"),
    "round-wrong-fields": lambda ws, init: (save(raw_checkpoint(ws.sd), ws.out / "round_00.pt"),
                                            _state_file(ws, init, [{"evil": 1, "checkpoint": "round_00.pt"}])),
    "round-checkpoint-not-a-string": lambda ws, init: _state_file(ws, init, [_round(["x"])]),
    "round-checkpoint-is-payload": lambda ws, init: (
        save(raw_checkpoint(ws.sd, arch="os:system", arch_kwargs={"command": _touch(ws)}), ws.out / "round_00.pt"),
        _state_file(ws, init, [_round("round_00.pt")])),
    "round-checkpoint-is-pickle-payload": lambda ws, init: (
        legacy_pickle_payload(ws.out / "round_00.pt", ws.marker), _state_file(ws, init, [_round("round_00.pt")])),
    "round-checkpoint-outside-folder": lambda ws, init: _state_file(ws, init, [_round(str(init))]),
}


@pytest.mark.parametrize("case", list(RESUME))
def test_hostile_resume_state_is_a_clean_error(ws: Ws, case: str) -> None:
    init = ws.valid()
    RESUME[case](ws, init)
    check(ws, f"prune-resume:{case}", _resume_argv(ws, init))


# ---- ONNX and .pt2 files for bench / verify ---------------------------------------------------------------

@pytest.fixture(scope="module")
def valid_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    path = tmp_path_factory.mktemp("pt2") / "net.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(2, 3, 8, 8),)), str(path))
    return path


MODEL_FILES: dict[str, Callable[[Ws], Path]] = {
    "onnx-two-inputs": lambda ws: onnx_model(ws.inp / "m.onnx", inputs=2),
    "onnx-int64-input": lambda ws: onnx_model(ws.inp / "m.onnx", elem_type="INT64"),
    "onnx-unknown-op-domain": lambda ws: onnx_model(ws.inp / "m.onnx", op_domain="evil.ops"),
    "onnx-external-data-missing": lambda ws: onnx_model(ws.inp / "m.onnx", external="weights.bin"),
    "onnx-external-data-traversal": lambda ws: onnx_model(ws.inp / "m.onnx", external="../../../../../etc/hostname"),
    "onnx-external-data-absolute": lambda ws: onnx_model(ws.inp / "m.onnx", external="/etc/hostname"),
    "onnx-truncated": lambda ws: _write(ws.inp / "m.onnx", onnx_model(ws.inp / "t.onnx").read_bytes()[:40]),
    "onnx-not-onnx": lambda ws: _write(ws.inp / "m.onnx", b"this is not a protobuf \xff\xfe" * 8),
    "onnx-empty": lambda ws: _write(ws.inp / "m.onnx", b""),
    "onnx-huge-fixed-dims": lambda ws: onnx_pool(ws.inp / "m.onnx", [1, 16, 100000, 100000]),
    "onnx-runtime-allocation-bomb": lambda ws: onnx_constant_of_shape(ws.inp / "m.onnx", (1, 10 ** 11)),
}


TAKES_SHAPE_FROM_FILE = ("onnx-huge-fixed-dims",)


@pytest.mark.parametrize("verb, name", _grid(MODEL_FILES, ["bench", "verify"]))
def test_hostile_onnx_is_a_clean_error(ws: Ws, verb: str, name: str) -> None:
    model = MODEL_FILES[name](ws)
    argv = {"bench": ["bench", model, "--repeats", "1", "--warmup", "0", "--batch", "1"]
            + ([] if name in TAKES_SHAPE_FROM_FILE else ["--input-shape", "16"]),
            "verify": ["verify", model, model, "--limit", "4"]
            + ([] if name in TAKES_SHAPE_FROM_FILE else ["--input-shape", "16"])}[verb]
    check(ws, f"{verb}:{name}", argv)


BENCH_VERIFY_ARGS: dict[str, Callable[[Ws], list[Any]]] = {
    "verify:mismatched-input-shapes": lambda ws: ["verify", onnx_model(ws.inp / "a.onnx", 16),
                                                  onnx_model(ws.inp / "b.onnx", 8), "--input-shape", "16"],
    "verify:mismatched-output-shapes": lambda ws: ["verify", onnx_model(ws.inp / "a.onnx", 16, 4),
                                                   onnx_model(ws.inp / "b.onnx", 16, 5), "--input-shape", "16"],
    "verify:wrong-input-shape": lambda ws: ["verify", onnx_model(ws.inp / "a.onnx", 16),
                                            onnx_model(ws.inp / "b.onnx", 16), "--input-shape", "3,8,8"],
    "bench:wrong-input-shape": lambda ws: ["bench", onnx_model(ws.inp / "a.onnx", 16), "--input-shape", "3,8,8",
                                           "--repeats", "1", "--warmup", "0", "--batch", "1"],
    "bench:mismatched-input-shapes": lambda ws: ["bench", onnx_model(ws.inp / "a.onnx", 16),
                                                 onnx_model(ws.inp / "b.onnx", 8), "--input-shape", "16",
                                                 "--repeats", "1", "--warmup", "0", "--batch", "1"],
    "bench:input-shape-huge": lambda ws: ["bench", onnx_model(ws.inp / "a.onnx", 16), "--input-shape",
                                          "1,100000,100000", "--repeats", "1", "--warmup", "0", "--batch", "1"],
    "verify:input-shape-huge": lambda ws: ["verify", onnx_model(ws.inp / "a.onnx", 16),
                                           onnx_model(ws.inp / "b.onnx", 16), "--input-shape", "1,100000,100000"],
    "verify:calib-wrong-shape": lambda ws: ["verify", onnx_model(ws.inp / "a.onnx", 16),
                                            onnx_model(ws.inp / "b.onnx", 16), "--calib", ws.data],
    "verify:onnx-vs-checkpoint-shapes": lambda ws: ["verify", onnx_model(ws.inp / "a.onnx", 16), ws.valid(),
                                                    "--input-shape", "16"],
}


@pytest.mark.parametrize("case", list(BENCH_VERIFY_ARGS))
def test_bench_verify_mismatches_are_a_clean_error(ws: Ws, case: str) -> None:
    check(ws, case, BENCH_VERIFY_ARGS[case](ws))


PT2: dict[str, Callable[[Ws, Path], Path]] = {
    "pt2-random-bytes": lambda ws, good: _write(ws.inp / "m.pt2", os.urandom(4096)),
    "pt2-empty": lambda ws, good: _write(ws.inp / "m.pt2", b""),
    "pt2-truncated": lambda ws, good: _write(ws.inp / "m.pt2", good.read_bytes()[: good.stat().st_size // 2]),
    "pt2-model-json-missing": lambda ws, good: rewrite_zip(good, ws.inp / "m.pt2",
                                                           lambda n, d: None if n.endswith("model.json") else (n, d)),
    "pt2-model-json-garbage": lambda ws, good: rewrite_zip(
        good, ws.inp / "m.pt2", lambda n, d: (n, b"{" + d[1:50]) if n.endswith("model.json") else (n, d)),
    "pt2-weight-short": lambda ws, good: rewrite_zip(
        good, ws.inp / "m.pt2", lambda n, d: (n, d[:4]) if n.endswith("weights/weight_0") else (n, d)),
    "pt2-pickled-weight-payload": lambda ws, good: pt2_with_pickled_weight(good, ws.inp / "m.pt2", ws.marker),
}


PT2_PAYLOADS = ("pt2-pickled-weight-payload",)   # --trust-pickle runs it, by design


@pytest.mark.parametrize("name, trust", [pytest.param(n, t, id=f"{n}{'+trust' if t else ''}")
                                         for n in PT2 for t in (False, True) if not (t and n in PT2_PAYLOADS)])
def test_hostile_pt2_is_a_clean_error(ws: Ws, valid_pt2: Path, name: str, trust: bool) -> None:
    model = PT2[name](ws, valid_pt2)
    check(ws, f"verify:{name}", ["verify", model, model, "--input-shape", "3,8,8", "--limit", "4"]
          + (["--trust-pickle"] if trust else []))


TRUSTED: dict[str, CkptBuilder] = {
    "module-truncated": lambda ws: _write(ws.inp / "m.pt", _module_bytes()[:2000]),
    "module-data-truncated": lambda ws: _write(ws.inp / "m.pt", _module_bytes()[:-3000]),
    "not-a-module": lambda ws: save({"model": {1, 2, 3}}, ws.inp / "m.pt"),
    "missing-package": lambda ws: _missing_package_pickle(ws.inp / "m.pt"),
}


def _module_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(small_model(), buf)
    return buf.getvalue()


def _missing_package_pickle(path: Path) -> Path:
    """A whole pickled module whose class lives in a package that is gone by load time."""
    import sys
    import types

    from torch import nn

    pkg = types.ModuleType("vanished_pkg")
    net = type("Net", (nn.Sequential,), {"__module__": "vanished_pkg"})
    pkg.Net = net
    sys.modules["vanished_pkg"] = pkg
    try:
        save(net(nn.Linear(4, 2)), path)
    finally:
        del sys.modules["vanished_pkg"]
    return path


@pytest.mark.parametrize("name", list(TRUSTED))
def test_trusted_but_broken_pickles_are_a_clean_error(ws: Ws, name: str) -> None:
    check(ws, f"entropy+trust:{name}", ["entropy", TRUSTED[name](ws), "--trust-pickle", "--calib", ws.data,
                                        "--input-shape", "3,32,32"])


# ---- outputs -----------------------------------------------------------------------------------------------

def _blocker(ws: Ws) -> Path:
    """A regular file where the command would need a folder."""
    path = ws.root / "blocker"
    path.write_text("I am a file\n")
    return path


OUTPUTS: dict[str, Callable[[Ws], list[Any]]] = {
    "fold:-o-under-a-file": lambda ws: ["fold", ws.valid(), "-o", _blocker(ws) / "sub", "--no-bench", "--no-pt2"],
    "fold:-o-is-a-file": lambda ws: ["fold", ws.valid(), "-o", _blocker(ws), "--no-bench", "--no-pt2"],
    "fold:--json-under-a-file": lambda ws: ["fold", ws.valid(), "-o", ws.out, "--json", _blocker(ws) / "r.json",
                                            "--no-bench", "--no-pt2"],
    "export:-o-under-a-file": lambda ws: ["export", ws.valid(), "-o", _blocker(ws) / "m.onnx"],
    "export:-o-is-a-folder": lambda ws: ["export", ws.valid(), "-o", ws.out],
    "entropy:--json-under-a-file": lambda ws: ["entropy", ws.valid(), "--json", _blocker(ws) / "e.json"],
    "entropy:--plot-under-a-file": lambda ws: ["entropy", ws.valid(), "--plot", _blocker(ws) / "p.png"],
    "verify:--json-under-a-file": lambda ws: ["verify", ws.valid(), ws.valid(), "--json", _blocker(ws) / "v.json"],
    "bench:--json-under-a-file": lambda ws: ["bench", onnx_model(ws.inp / "a.onnx"), "--input-shape", "16",
                                             "--repeats", "1", "--warmup", "0", "--batch", "1",
                                             "--json", _blocker(ws) / "b.json"],
    "prune:-o-under-a-file": lambda ws: ["prune", "--init", ws.valid(), "--data", ws.data, "--method", "imp",
                                         "--rounds", "1", "--epochs", "0", "-o", _blocker(ws) / "run"],
}


@pytest.mark.parametrize("case", list(OUTPUTS))
def test_unwritable_output_is_a_clean_error(ws: Ws, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unwritable outputs fail cleanly, and fold fails before it measures anything."""
    import nepenthe_compress.workflow.fold as workflow

    def too_late(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("fold started measuring before it checked its output location")

    if case.startswith("fold:"):
        monkeypatch.setattr(workflow, "measure_entropy", too_late)
    check(ws, case, OUTPUTS[case](ws))


def test_existing_outputs_are_not_overwritten_without_force(ws: Ws) -> None:
    """A second fold / export into the same place must refuse, leaving the first outputs as they were."""
    ck = ws.valid()
    (ws.out / "valid.folded.onnx").write_text("earlier result\n")
    check(ws, "fold:existing-output", ["fold", ck, "-o", ws.out, "--no-bench", "--no-pt2"])
    (ws.out / "m.onnx").write_text("earlier export\n")
    check(ws, "export:existing-output", ["export", ck, "-o", ws.out / "m.onnx"])


# ---- real processes: tracebacks, warnings, hangs -----------------------------------------------------------

def _symlink_loops(ws: Ws) -> str:
    """An image folder with no image, only links back up the tree (2**depth paths if followed)."""
    root = ws.inp / "images" / "cls"
    root.mkdir(parents=True)
    for name in ("up1", "up2"):
        (root / name).symlink_to("..", target_is_directory=True)
    return str(ws.inp / "images")


def _fifo(ws: Ws) -> str:
    path = ws.inp / "data.fifo.npz"
    os.mkfifo(path)
    return str(path)


HANGS: dict[str, Callable[[Ws], list[Any]]] = {
    "fold:--calib-root": lambda ws: ["fold", ws.valid(), "--calib", "/", "-o", ws.out, "--no-bench", "--no-pt2"],
    "entropy:folder-symlink-loops": lambda ws: ["entropy", ws.valid(), "--calib", _symlink_loops(ws)],
    "entropy:npz-is-a-fifo": lambda ws: ["entropy", ws.valid(), "--calib", _fifo(ws)],
    "prune:data-is-a-fifo": lambda ws: ["prune", "--init", ws.valid(), "--data", _fifo(ws), "--method", "imp",
                                        "--rounds", "1", "--epochs", "0", "-o", ws.out / "run"],
}


@pytest.mark.parametrize("case", list(HANGS))
def test_unbounded_walks_and_blocking_files_fail_in_time(ws: Ws, case: str) -> None:
    """Each runs in process under a 60 s deadline (raised by SIGALRM, reported as a hang)."""
    check(ws, case, HANGS[case](ws))


PROCESS: dict[str, Callable[[Ws], list[Any]]] = {
    "entropy:meta.calib-root": lambda ws: ["entropy", ws.ckpt(meta={"calib": "/"})],
    "fold:arch-os-system": lambda ws: ["fold", ws.ckpt(arch="os:system", arch_kwargs={"command": _touch(ws)}),
                                       "-o", ws.out, "--no-bench", "--no-pt2"],
}


@pytest.mark.parametrize("case", list(PROCESS))
def test_real_process_fails_cleanly_and_in_time(ws: Ws, case: str) -> None:
    """No hang (60 s), no traceback from a real interpreter, no payload run."""
    check(ws, case, PROCESS[case](ws), process=True, timeout=60)


def test_corrupt_pt2_prints_only_the_error_line(ws: Ws, valid_pt2: Path) -> None:
    """torch's own warnings about a bad archive must not reach the user around the error line."""
    model = PT2["pt2-weight-short"](ws, valid_pt2)
    check(ws, "verify:pt2-weight-short+trust(process)", ["verify", model, model, "--input-shape", "3,8,8",
                                                         "--trust-pickle"], process=True, only_error_line=True)


def test_folded_pt2_embeds_no_calibration_sample(ws: Ws) -> None:
    """The deployable .pt2 must not carry the user's data (a privacy leak)."""
    import zipfile

    x = np.random.default_rng(7).uniform(0.25, 0.75, (SAMPLES, *SHAPE)).astype(np.float32)
    ck = ws.ckpt(meta={"calib": str(write_npz(ws.inp / "private.npz", x)), "input_shape": list(SHAPE)})
    outcome = invoke(["fold", str(ck), "-o", str(ws.out), "--no-bench", "--merge", "none", "--pt2"], seconds=240)
    assert outcome.exit_code == 0, report("fold:valid", ["fold", str(ck)], outcome, ["valid fold failed"])
    pt2 = ws.out / "model.folded.pt2"
    with zipfile.ZipFile(pt2) as z:
        blob = b"".join(z.read(n) for n in z.namelist())
    leaked = [i for i, sample in enumerate(x) if sample[0, 0, :8].tobytes() in blob]
    assert not leaked, f"{pt2.name} embeds calibration samples {leaked} (of {SAMPLES})"
