"""Safe checkpoint loading (weights-only unpickling) and this tool's own checkpoint format.

Accepted inputs: this tool's checkpoint (``FORMAT``), a plain state_dict, a dict holding one under
``WRAPPER_KEYS``, with ``module.`` / ``_orig_mod.`` prefixes and torch.nn.utils.prune
``X_orig``/``X_mask`` pairs; pickled whole modules only with ``trust_pickle``.
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.utils import prune

from nepenthe_compress.archs import build_model, infer_arch_kwargs
from nepenthe_compress.errors import CheckpointError
from nepenthe_compress.io import atomic_path
from nepenthe_compress.sites import find_sites
from nepenthe_compress.trace import trace_model

FORMAT = "nepenthe-compress/1"
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "weights")
PREFIXES = ("module.", "_orig_mod.")
JSON_SCALARS = (str, int, float, bool, type(None))
# torch's weights-only unpickler names the global it refused in one of these two forms
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module \S+ is blocked)")
# ... and wraps its own reason in advice to retry unsafely; this finds the reason
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error:\s*(.+)")


@dataclass
class LoadedCheckpoint:
    model: nn.Module            # eval mode; a GraphModule if meta["linearised_sites"] is non-empty
    arch: str | None            # None for a pickled whole module
    arch_kwargs: dict[str, Any]
    masks: dict[str, Tensor]    # bool, keyed like the state_dict ("layer1.0.conv1.weight")
    meta: dict[str, Any]
    path: Path


@dataclass
class _Content:
    """What a (non-module) checkpoint file holds, before the model is built."""

    state_dict: dict[str, Tensor]
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


# ---- reading the file ------------------------------------------------------------------------

def _check_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a directory, expected a file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' not found")
    return path


class _Refused(Exception):
    """Weights-only unpickling met a Python global (a class or function it will not run)."""


def _torch_load(path: Path, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        refused = _REFUSED_GLOBAL.search(str(e))
        if weights_only and refused:
            raise _Refused(refused.group(1)) from None
        reason = _UNPICKLER_REASON.search(str(e))
        raise CheckpointError(f"checkpoint '{path}' is corrupt or not a PyTorch file: unpickling failed: "
                              f"{reason.group(1) if reason else _first_line(e)}") from None
    except Exception as e:  # torch.load raises RuntimeError, EOFError, ValueError, ... on bad files
        raise CheckpointError(
            f"cannot read checkpoint '{path}' (truncated, corrupt or not a PyTorch file?): "
            f"{type(e).__name__}: {_first_line(e)}") from None


def _read(path: Path, trust_pickle: bool) -> Any:
    """``torch.load`` weights-only; unpickle arbitrary objects only when ``trust_pickle``."""
    try:
        return _torch_load(path, weights_only=True)
    except _Refused as e:
        if not trust_pickle:
            raise CheckpointError(
                f"refused to load '{path}': it pickles Python objects ({e}), not just tensors; "
                "pass --trust-pickle only for files you trust (unpickling runs code)") from None
    return _torch_load(path, weights_only=False)


# ---- recognising the content -----------------------------------------------------------------

def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _find_module(obj: Any) -> nn.Module | None:
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        return next((v for v in obj.values() if isinstance(v, nn.Module)), None)
    return None


def _field(obj: dict, key: str, kind: type, path: Path) -> Any:
    if not isinstance(obj.get(key), kind):
        raise CheckpointError(f"checkpoint '{path}' is malformed: '{key}' must be a {kind.__name__}")
    return obj[key]


def _own_format(obj: dict, path: Path) -> _Content:
    if obj["format"] != FORMAT:
        raise CheckpointError(
            f"checkpoint '{path}' has unsupported format {obj['format']!r} (expected {FORMAT!r})")
    meta = _field(obj, "meta", dict, path)
    sites = meta.get("linearised_sites", [])
    if not (isinstance(sites, list) and all(isinstance(s, str) for s in sites)):
        raise CheckpointError(f"checkpoint '{path}' is malformed: meta.linearised_sites must be a list of names")
    sd = _field(obj, "state_dict", dict, path)
    if not _is_state_dict(sd):
        raise CheckpointError(f"checkpoint '{path}' is malformed: 'state_dict' must map names to tensors")
    return _Content(sd, _field(obj, "arch", str, path), _field(obj, "arch_kwargs", dict, path),
                    _field(obj, "masks", dict, path), meta)


def _parse(obj: Any, path: Path) -> _Content:
    if isinstance(obj, dict) and str(obj.get("format", "")).startswith(FORMAT.split("/")[0] + "/"):
        return _own_format(obj, path)
    if _is_state_dict(obj):
        return _Content(obj)
    if isinstance(obj, dict):
        key = next((k for k in WRAPPER_KEYS if _is_state_dict(obj.get(k))), None)
        if key is not None:
            arch = obj.get("arch")
            return _Content(obj[key], arch if isinstance(arch, str) else None)
        raise CheckpointError(
            f"checkpoint '{path}' holds no state_dict: top-level keys {_few([str(k) for k in obj], 6)} "
            f"(expected tensors, or one of {', '.join(WRAPPER_KEYS)})")
    raise CheckpointError(f"checkpoint '{path}' holds a {type(obj).__name__}, expected a state_dict")


# ---- state_dict normalisation (shared by load and save) ---------------------------------------

def _strip_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop ``module.`` (DataParallel) / ``_orig_mod.`` (torch.compile) when every key has it."""
    while sd:
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _merge_prune_pairs(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """torch.nn.utils.prune's ``X_orig`` / ``X_mask`` -> ``X = orig * mask`` plus the mask."""
    out: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    for key, value in sd.items():
        base = key.removesuffix("_orig")
        if key.endswith("_orig") and base + "_mask" in sd:
            masks[base] = sd[base + "_mask"] != 0
            out[base] = value * masks[base]
        elif not (key.endswith("_mask") and key.removesuffix("_mask") + "_orig" in sd):
            out[key] = value
    return out, masks


def normalise_state_dict(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Strip wrapper prefixes and merge prune pairs: (state_dict, masks found in it)."""
    return _merge_prune_pairs(_strip_prefixes(dict(sd)))


def _checked_masks(masks: dict[str, Any], sd: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """Masks as bool tensors, each naming a state_dict entry of the same shape."""
    out: dict[str, Tensor] = {}
    for key, mask in masks.items():
        if key not in sd:
            raise CheckpointError(f"{where}: mask '{key}' names no tensor of the state_dict")
        if not isinstance(mask, Tensor) or mask.shape != sd[key].shape:
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise CheckpointError(f"{where}: mask '{key}' has shape {shape}, weight {tuple(sd[key].shape)}")
        out[key] = mask.detach().cpu() != 0
    return out


def _apply_masks(sd: dict[str, Tensor], masks: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v * masks[k] if k in masks else v for k, v in sd.items()}


def _check_finite(sd: dict[str, Tensor], path: Path) -> None:
    for key, value in sd.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"checkpoint '{path}': tensor '{key}' has {bad} NaN/Inf values")


def _load_weights(model: nn.Module, sd: dict[str, Tensor], arch: str, path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = ([f"{len(missing)} missing keys ({_few(missing)})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected keys ({_few(unexpected)})"] if unexpected else [])
        raise CheckpointError(f"checkpoint '{path}' does not fit architecture '{arch}': {'; '.join(parts)}")
    for key, value in sd.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"checkpoint '{path}' does not fit architecture '{arch}': '{key}' has shape "
                f"{tuple(value.shape)} in the checkpoint, {tuple(expected[key].shape)} in the model "
                "(pass --arch-kw to change num_classes/width/...)")
    model.load_state_dict(sd)


# ---- models ------------------------------------------------------------------------------------

def apply_linearised(model: nn.Module, names: list[str]) -> fx.GraphModule:
    """Trace ``model`` and replace the named rectifier sites by identity (EASIER); eval mode."""
    gm = trace_model(model)
    sites = {s.name: s for s in find_sites(gm)}
    unknown = [n for n in names if n not in sites]
    if unknown:
        raise CheckpointError(
            f"linearised site(s) {_few(unknown)} not found in {type(model).__name__} "
            f"(its sites: {_few(list(sites), 5)})")
    for name in dict.fromkeys(names):
        site = sites[name]
        site.node.replace_all_uses_with(site.input)
        gm.graph.erase_node(site.node)
    gm.graph.lint()
    gm.recompile()
    return gm.eval()


def _from_module(model: nn.Module, path: Path) -> LoadedCheckpoint:
    """A trusted pickled module: make torch prune reparametrisations permanent, keep the masks."""
    masks: dict[str, Tensor] = {}
    for mod_name, mod in model.named_modules():
        for hook in list(mod._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                name = hook._tensor_name
                masks[f"{mod_name}.{name}" if mod_name else name] = getattr(mod, name + "_mask") != 0
                prune.remove(mod, name)
    _check_finite(model.state_dict(), path)
    return LoadedCheckpoint(model.eval(), None, {}, masks, {}, path)


def load_checkpoint(path: str | os.PathLike, arch: str | None = None, arch_kwargs: dict | None = None,
                    trust_pickle: bool = False) -> LoadedCheckpoint:
    """Load any accepted checkpoint form into an eval-mode model (see the module docstring).

    ``arch`` overrides the stored architecture; ``arch_kwargs`` override stored and inferred kwargs.
    A trusted pickled module (``trust_pickle``) is returned as it is; ``arch`` is then not used.
    """
    path = _check_file(path)
    obj = _read(path, trust_pickle)
    module = _find_module(obj)
    if module is not None:
        return _from_module(module, path)
    content = _parse(obj, path)
    sd, masks = normalise_state_dict(content.state_dict)
    masks |= _checked_masks(content.masks, sd, f"checkpoint '{path}'")
    sd = _apply_masks(sd, masks)
    _check_finite(sd, path)
    arch = arch or content.arch
    if arch is None:
        raise CheckpointError(
            f"checkpoint '{path}' is a plain state_dict: pass --arch (a torchvision name such as resnet18, "
            "a built-in such as cifar_resnet18, or package.module:callable)")
    stored = content.arch_kwargs if arch == content.arch else {}
    kwargs = {**infer_arch_kwargs(arch, sd), **stored, **(arch_kwargs or {})}
    model = build_model(arch, **kwargs)
    _load_weights(model, sd, arch, path)
    model.eval()
    linearised = content.meta.get("linearised_sites", [])
    return LoadedCheckpoint(apply_linearised(model, linearised) if linearised else model,
                            arch, kwargs, masks, content.meta, path)


# ---- saving ------------------------------------------------------------------------------------

def check_json_like(value: Any, where: str) -> None:
    """Raise TypeError unless ``value`` is built from str/int/float/bool/None, lists and str-keyed dicts.

    Exact types: numpy scalars (float subclasses) would not load back with weights_only.
    """
    if isinstance(value, dict):
        for k, v in value.items():
            if type(k) is not str:
                raise TypeError(f"{where}: key {k!r} is not a str")
            check_json_like(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_json_like(v, f"{where}[{i}]")
    elif type(value) not in JSON_SCALARS:
        raise TypeError(f"{where}: {type(value).__name__} is not JSON-like (use str, int, float, bool, "
                        "None, list, dict)")


def save_checkpoint(path: str | os.PathLike, model: nn.Module, arch: str, arch_kwargs: dict[str, Any],
                    masks: dict[str, Tensor] | None = None, meta: dict[str, Any] | None = None) -> None:
    """Write this tool's checkpoint atomically; masks are applied to the saved weights.

    torch prune reparametrisations on ``model`` are merged (their masks saved too). ``arch_kwargs``
    and ``meta`` must be JSON-like (TypeError otherwise) so the file loads with weights_only.
    """
    arch_kwargs, meta = dict(arch_kwargs), dict(meta or {})
    check_json_like(arch_kwargs, "arch_kwargs")
    check_json_like(meta, "meta")
    sd, found = normalise_state_dict(model.state_dict())
    all_masks = found | _checked_masks(masks or {}, sd, f"saving '{path}'")
    obj = {
        "format": FORMAT,
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "state_dict": {k: v.detach().cpu().clone() for k, v in _apply_masks(sd, all_masks).items()},
        "masks": {k: m.clone() for k, m in all_masks.items()},
        "meta": meta,
    }
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
