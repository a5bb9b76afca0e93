"""Mutate a valid checkpoint of this tool's format 200+ times (seeded) and load every mutant.

Each outcome must be a clean ``UserError`` (one line), or a load whose model, kwargs and meta equal
the original's bit for bit. Anything else fails the test: another exception type, or a load that
silently differs from what was saved (silent corruption).
"""
from __future__ import annotations

import io
import random
import struct
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hostile import KWARGS, deadline, memory_cap, small_model
from nepenthe_compress.checkpoint import load_checkpoint, save_checkpoint
from nepenthe_compress.errors import UserError

SEED = 20240607
META = {"calib": "digits", "input_shape": [3, 32, 32], "note": "fuzz"}
PER_KIND = {"flip-tensor-data": 70, "flip-anywhere": 40, "truncate": 25, "zip-entry": 40, "swap-tensors": 30}
LOAD_DEADLINE_S = 20


@dataclass(frozen=True)
class Mutant:
    name: str      # kind and number, e.g. "flip-tensor-data#12"
    detail: str    # what was changed
    data: bytes


@dataclass(frozen=True)
class Verdict:
    mutant: Mutant
    outcome: str   # "error", "same", "silent-corruption" or "crash"
    message: str


def _entries(blob: bytes) -> list[tuple[zipfile.ZipInfo, int]]:
    """Each zip entry with the offset of its (stored) data in ``blob``."""
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        out = []
        for info in z.infolist():
            name_len, extra_len = struct.unpack("<HH", blob[info.header_offset + 26: info.header_offset + 30])
            out.append((info, info.header_offset + 30 + name_len + extra_len))
        return out


def _rezip(blob: bytes, change) -> bytes:
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        entries = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as out:
        for name, data in entries:
            kept = change(name, data)
            if kept is not None:
                out.writestr(*kept)
    return buf.getvalue()


def _flip(blob: bytes, offset: int, rng: random.Random) -> tuple[bytes, int]:
    mask = rng.randrange(1, 256)
    out = bytearray(blob)
    out[offset] ^= mask
    return bytes(out), mask


def _tensor_data_flips(blob: bytes, rng: random.Random, n: int) -> Iterator[Mutant]:
    tensors = [(info, start) for info, start in _entries(blob) if "/data/" in info.filename and info.file_size]
    weights = [info.file_size for info, _ in tensors]
    for i in range(n):
        info, start = rng.choices(tensors, weights)[0]
        offset = start + rng.randrange(info.file_size)
        data, mask = _flip(blob, offset, rng)
        yield Mutant(f"flip-tensor-data#{i}", f"{info.filename} byte {offset - start} ^= {mask:#04x}", data)


def _anywhere_flips(blob: bytes, rng: random.Random, n: int) -> Iterator[Mutant]:
    for i in range(n):
        offset = rng.randrange(len(blob))
        data, mask = _flip(blob, offset, rng)
        yield Mutant(f"flip-anywhere#{i}", f"file byte {offset} ^= {mask:#04x}", data)


def _truncations(blob: bytes, rng: random.Random, n: int) -> Iterator[Mutant]:
    cuts = [0, 1, 100, len(blob) - 1, len(blob) - 22] + [rng.randrange(len(blob)) for _ in range(n)]
    for i, cut in enumerate(cuts[:n]):
        yield Mutant(f"truncate#{i}", f"first {cut} of {len(blob)} bytes", blob[:cut])


def _zip_entry_changes(blob: bytes, rng: random.Random, n: int) -> Iterator[Mutant]:
    names = [info.filename for info, _ in _entries(blob)]
    for i in range(n):
        target, action = rng.choice(names), rng.choice(["alter", "remove", "rename", "empty"])
        if action == "alter":
            def change(name: str, data: bytes, t=target) -> tuple[str, bytes]:
                if name != t or not data:
                    return name, data
                pos = rng.randrange(len(data))
                return name, data[:pos] + bytes([rng.randrange(256)]) + data[pos + 1:]
        elif action == "remove":
            def change(name: str, data: bytes, t=target) -> tuple[str, bytes] | None:
                return None if name == t else (name, data)
        elif action == "rename":
            def change(name: str, data: bytes, t=target) -> tuple[str, bytes]:
                return (name + "x" if name == t else name), data
        else:
            def change(name: str, data: bytes, t=target) -> tuple[str, bytes]:
                return name, (b"" if name == t else data)
        yield Mutant(f"zip-entry#{i}", f"{action} {target}", _rezip(blob, change))


def _swaps(path: Path, rng: random.Random, n: int) -> Iterator[Mutant]:
    """Rewrites of the checkpoint dict (its stored hash kept): tensors exchanged or replaced."""
    raw = torch.load(path, weights_only=True)
    sd = raw["state_dict"]
    floats = [k for k, v in sd.items() if v.is_floating_point()]
    pairs = [(a, b) for a in floats for b in floats if a < b and sd[a].shape == sd[b].shape
             and not torch.equal(sd[a], sd[b])]
    for i in range(n):
        obj = torch.load(path, weights_only=True)
        sd = obj["state_dict"]
        how = rng.choice(["swap", "swap", "shape", "dtype", "meta", "kwargs"])
        if how == "swap":
            a, b = rng.choice(pairs)
            sd[a], sd[b] = sd[b], sd[a]
            detail = f"exchanged {a} and {b}"
        elif how == "shape":
            key = rng.choice(floats)
            sd[key] = torch.zeros(sd[key].numel() + 1)
            detail = f"{key} replaced by shape ({sd[key].numel()},)"
        elif how == "dtype":
            key = rng.choice(floats)
            dtype = rng.choice([torch.float64, torch.float16, torch.int32])
            sd[key] = sd[key].to(dtype)
            detail = f"{key} cast to {dtype}"
        elif how == "meta":
            obj["meta"] = {**obj["meta"], "calib": "mnist"}
            detail = "meta.calib changed"
        else:
            obj["arch_kwargs"] = {**obj["arch_kwargs"], "num_classes": 11}
            detail = "arch_kwargs.num_classes changed"
        buf = io.BytesIO()
        torch.save(obj, buf)
        yield Mutant(f"swap-tensors#{i}", detail, buf.getvalue())


def mutants(path: Path) -> Iterator[Mutant]:
    rng = random.Random(SEED)
    blob = path.read_bytes()
    yield from _tensor_data_flips(blob, rng, PER_KIND["flip-tensor-data"])
    yield from _anywhere_flips(blob, rng, PER_KIND["flip-anywhere"])
    yield from _truncations(blob, rng, PER_KIND["truncate"])
    yield from _zip_entry_changes(blob, rng, PER_KIND["zip-entry"])
    yield from _swaps(path, rng, PER_KIND["swap-tensors"])


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> str:
    """'' when ``a`` and ``b`` hold the same names, dtypes, shapes and bits, else the first difference."""
    if a.keys() != b.keys():
        return f"keys differ ({sorted(a.keys() ^ b.keys())[:3]})"
    for k in a:
        if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k]):
            return f"tensor {k} differs"
    return ""


def judge(mutant: Mutant, path: Path, reference: dict[str, torch.Tensor]) -> Verdict:
    path.write_bytes(mutant.data)
    try:
        with memory_cap(), deadline(LOAD_DEADLINE_S):
            loaded = load_checkpoint(path)
    except UserError as e:
        text = str(e)
        if "\n" in text.strip() or not text.strip():
            return Verdict(mutant, "crash", f"UserError message is not one line: {text[:200]!r}")
        return Verdict(mutant, "error", text)
    except BaseException as e:  # noqa: BLE001 - every other outcome is the finding
        if isinstance(e, KeyboardInterrupt):
            raise
        return Verdict(mutant, "crash", f"{type(e).__module__}.{type(e).__name__}: {str(e)[:200]}")
    diff = _same(reference, {k: v.detach() for k, v in loaded.model.state_dict().items()})
    if not diff and loaded.meta != META:
        diff = f"meta differs: {loaded.meta}"
    if not diff and loaded.arch_kwargs != KWARGS:
        diff = f"arch_kwargs differ: {loaded.arch_kwargs}"
    return Verdict(mutant, "silent-corruption" if diff else "same", diff)


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    model = small_model(seed=3)
    path = tmp_path_factory.mktemp("fuzz") / "valid.pt"
    save_checkpoint(path, model, "cifar_resnet18", KWARGS, meta=META)
    return path, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_valid_checkpoint_loads_as_saved(original: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    """The unmutated file is a verified success (so the judge can tell 'same' from 'different')."""
    path, reference = original
    verdict = judge(Mutant("original", "no change", path.read_bytes()), tmp_path / "m.pt", reference)
    assert verdict.outcome == "same", verdict.message
    changed = dict(reference)
    changed["fc.bias"] = changed["fc.bias"] + 1
    assert _same(reference, changed) == "tensor fc.bias differs"


def test_every_mutant_is_a_clean_error_or_a_verified_success(original: tuple[Path, dict[str, torch.Tensor]],
                                                             tmp_path: Path) -> None:
    path, reference = original
    start = time.perf_counter()
    verdicts = [judge(m, tmp_path / "mutant.pt", reference) for m in mutants(path)]
    elapsed = time.perf_counter() - start
    assert len(verdicts) >= 200
    counts = {k: sum(v.outcome == k for v in verdicts) for k in ("error", "same", "silent-corruption", "crash")}
    bad = [v for v in verdicts if v.outcome in ("crash", "silent-corruption")]
    lines = [f"{v.outcome}: {v.mutant.name} ({v.mutant.detail}): {v.message}" for v in bad]
    assert not bad, (f"{len(bad)} of {len(verdicts)} mutants are neither a clean error nor a verified success "
                     f"({counts}, {elapsed:.1f} s):\n" + "\n".join(lines))
