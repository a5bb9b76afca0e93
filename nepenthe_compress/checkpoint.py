"""Safe checkpoint loading (weights-only unpickling) and this tool's own checkpoint format.

Accepted inputs: this tool's checkpoint (``FORMAT``, with a content hash checked on load), a plain
state_dict, a dict holding one under ``WRAPPER_KEYS``, with ``module.`` / ``_orig_mod.`` prefixes and
torch.nn.utils.prune ``X_orig``/``X_mask`` pairs; pickled whole modules only with ``trust_pickle``.

A file is data: its architecture name is looked up in the registry only (never imported), its
kwargs are JSON scalars built within a budget, its tensors must be floating point where the model
has floating point. Only the caller's own ``arch``, ``trust_pickle`` and ``code_path`` run user code.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.utils import prune

from nepenthe_compress import archs
from nepenthe_compress.archs import build_model, import_path, infer_arch_kwargs, resolve_arch
from nepenthe_compress.errors import CheckpointError, first_line
from nepenthe_compress.io import atomic_path
from nepenthe_compress.sites import MODULE_RULES, find_sites
from nepenthe_compress.trace import trace_model

FORMAT = "nepenthe-compress/1"
HASH_KEY = "sha256"  # content hash of this tool's checkpoints (files written before it have none)
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net", "weights")
PREFIXES = ("module.", "_orig_mod.")
JSON_SCALARS = (str, int, float, bool, type(None))
# torch's weights-only unpickler names the global it refused in one of these two forms
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module \S+ is blocked)")
# ... and wraps its own reason in advice to retry unsafely; this finds the reason
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error:\s*(.+)")
# EASIER's run names: "..._iteration<k>..." after k activations were replaced by identity
_EASIER_ITERATION = re.compile(r"EASIER_.*_iteration(\d+)")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LoadOptions:
    """What the user said about a checkpoint: these may run user code (``arch`` as
    ``package.module:callable`` imported from ``code_path``, ``trust_pickle``)."""

    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_pickle: bool = False
    code_path: str | None = None               # where user packages are imported from (default: cwd)
    linearised_sites: tuple[str, ...] = ()     # module paths the saver replaced by identity (EASIER)

    def as_kwargs(self) -> dict[str, Any]:
        return {"arch": self.arch, "arch_kwargs": self.arch_kwargs or None, "trust_pickle": self.trust_pickle,
                "code_path": self.code_path, "linearised_sites": self.linearised_sites}


@dataclass
class LoadedCheckpoint:
    model: nn.Module            # eval mode; a GraphModule if meta["linearised_sites"] is non-empty
    arch: str | None            # None for a pickled whole module
    arch_kwargs: dict[str, Any]
    masks: dict[str, Tensor]    # bool, keyed like the state_dict ("layer1.0.conv1.weight")
    meta: dict[str, Any]
    path: Path
    notes: list[str] = field(default_factory=list)     # what loading changed (upcasts, hooks removed)
    warnings: list[str] = field(default_factory=list)  # what the user should check


@dataclass
class _Content:
    """What a (non-module) checkpoint file holds, before the model is built."""

    state_dict: dict[str, Tensor]
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    stored_hash: Any = ""       # this tool's format: the sha256 it was written with ("": none)


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


# ---- reading the file ------------------------------------------------------------------------

def _check_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a directory, expected a file")
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' not found")
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' is not a regular file")
    return path


class _Refused(Exception):
    """Weights-only unpickling met a Python global (a class or function it will not run)."""


class _Inert:
    """Stands for a class or function of the saver's ``__main__`` (EGP's forward-hook helpers): it
    unpickles to an object that keeps no state and does nothing when called."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()


class _TrustedUnpickler(pickle.Unpickler):
    """The full unpickler (user-trusted files only), with ``__main__`` objects made inert."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "__main__":
            return type(name, (_Inert,), {"__module__": "__main__"})
        return super().find_class(module, name)


_TRUSTED_PICKLE = types.SimpleNamespace(Unpickler=_TrustedUnpickler, load=pickle.load, __name__="pickle")


def _torch_load(path: Path, weights_only: bool) -> Any:
    try:
        if weights_only:
            return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_TRUSTED_PICKLE)
    except pickle.UnpicklingError as e:
        refused = _REFUSED_GLOBAL.search(str(e))
        if weights_only and refused:
            raise _Refused(refused.group(1)) from None
        reason = _UNPICKLER_REASON.search(str(e))
        raise CheckpointError(f"checkpoint '{path}' is corrupt or not a PyTorch file: unpickling failed: "
                              f"{reason.group(1) if reason else first_line(e)}") from None
    except ModuleNotFoundError as e:
        raise CheckpointError(
            f"checkpoint '{path}' pickles objects of module '{e.name}', which cannot be imported: pass "
            f"--code-path DIR, the folder that holds the package '{(e.name or '').split('.')[0]}' "
            "(default: the current directory)") from None
    except AttributeError as e:
        raise CheckpointError(f"checkpoint '{path}' pickles an object its module does not define "
                              f"({first_line(e)}): is --code-path the code the file was saved with?") from None
    except MemoryError:
        raise CheckpointError(f"checkpoint '{path}' does not fit in memory") from None
    except Exception as e:  # torch.load raises RuntimeError, EOFError, ValueError, ... on bad files
        raise CheckpointError(
            f"cannot read checkpoint '{path}' (truncated, corrupt or not a PyTorch file?): "
            f"{type(e).__name__}: {first_line(e)}") from None


def _read(path: Path, trust_pickle: bool, code_path: str | None) -> Any:
    """``torch.load`` weights-only; unpickle arbitrary objects only when ``trust_pickle``."""
    try:
        return _torch_load(path, weights_only=True)
    except _Refused as e:
        if not trust_pickle:
            raise CheckpointError(
                f"refused to load '{path}': it pickles Python objects ({e}), not just tensors; "
                "pass --trust-pickle only for files you trust (unpickling runs code)") from None
    with import_path(code_path):
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


def content_hash(obj: dict) -> str:
    """sha256 over this tool's checkpoint content: arch, kwargs and meta as canonical JSON, then every
    tensor of the state_dict and masks (name, dtype, shape, bytes) in name order."""
    h = hashlib.sha256(json.dumps([obj["arch"], obj["arch_kwargs"], obj["meta"]], sort_keys=True).encode())
    for group in ("state_dict", "masks"):
        for name in sorted(obj[group]):
            t = obj[group][name].detach().cpu().contiguous()
            h.update(f"{group}/{name}/{t.dtype}/{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _own_format(obj: dict, path: Path) -> _Content:
    if obj["format"] != FORMAT:
        raise CheckpointError(
            f"checkpoint '{path}' has unsupported format {str(obj['format'])[:60]!r} (expected {FORMAT!r})")
    meta = _field(obj, "meta", dict, path)
    sites = meta.get("linearised_sites", [])
    if not (isinstance(sites, list) and all(isinstance(s, str) for s in sites)):
        raise CheckpointError(f"checkpoint '{path}' is malformed: meta.linearised_sites must be a list of names")
    sd = _field(obj, "state_dict", dict, path)
    if not _is_state_dict(sd):
        raise CheckpointError(f"checkpoint '{path}' is malformed: 'state_dict' must map names to tensors")
    kwargs = _field(obj, "arch_kwargs", dict, path)
    if not all(isinstance(k, str) for k in kwargs):
        raise CheckpointError(f"checkpoint '{path}' is malformed: 'arch_kwargs' keys must be strings")
    masks = _field(obj, "masks", dict, path)
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in masks.items()):
        raise CheckpointError(f"checkpoint '{path}' is malformed: 'masks' must map names to tensors")
    return _Content(sd, _field(obj, "arch", str, path), kwargs, masks, meta, stored_hash=obj.get(HASH_KEY, ""))


def _verify_hash(content: _Content, path: Path) -> None:
    """This tool's files written with a hash must still match it (older files have none)."""
    if content.stored_hash == "":
        return
    obj = {"arch": content.arch, "arch_kwargs": content.arch_kwargs, "meta": content.meta,
           "state_dict": content.state_dict, "masks": content.masks}
    try:
        actual = content_hash(obj)
    except (TypeError, ValueError, RuntimeError):  # content that cannot even be hashed
        actual = None
    if content.stored_hash != actual:
        raise CheckpointError(f"checkpoint '{path}' failed its integrity check: the content hash does not "
                              "match (the file was corrupted or modified after it was written)")


def _parse(obj: Any, path: Path) -> _Content:
    if isinstance(obj, dict) and "format" in obj and not isinstance(obj["format"], str):
        raise CheckpointError(f"checkpoint '{path}' is malformed: 'format' must be a string, "
                              f"got {type(obj['format']).__name__}")
    if isinstance(obj, dict) and obj.get("format", "").startswith(FORMAT.split("/")[0] + "/"):
        return _own_format(obj, path)
    if _is_state_dict(obj):
        return _Content(obj)
    if isinstance(obj, dict):
        key = next((k for k in WRAPPER_KEYS if _is_state_dict(obj.get(k))), None)
        if key is not None:
            arch = obj.get("arch")
            return _Content(obj[key], arch if isinstance(arch, str) else None)
        raise CheckpointError(
            f"checkpoint '{path}' holds no state_dict: top-level keys {_few([str(k)[:40] for k in obj], 6)} "
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


def _check_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """Dense tensors whose logical size, all together, fits the model budget (a stride-0 view can
    claim 1e12 elements over one stored value): checked before anything reads them element-wise."""
    total = 0
    for key, value in tensors.items():
        if value.layout != torch.strided:
            raise CheckpointError(f"checkpoint '{path}': tensor '{key[:80]}' is {value.layout}, expected a dense tensor")
        total += value.numel() * value.element_size()
    if total > archs.MAX_MODEL_BYTES:
        raise CheckpointError(f"checkpoint '{path}': its tensors would take {total / 2**30:.3g} GiB, over the "
                              f"{archs.MAX_MODEL_BYTES / 2**30:g} GiB model budget (NEPENTHE_MAX_MODEL_BYTES)")


def _checked_masks(masks: dict[str, Any], sd: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """Masks as bool tensors, each naming a state_dict entry of the same shape and holding 0/1 only."""
    out: dict[str, Tensor] = {}
    for key, mask in masks.items():
        if key not in sd:
            raise CheckpointError(f"{where}: mask '{key[:80]}' names no tensor of the state_dict")
        if not isinstance(mask, Tensor) or mask.shape != sd[key].shape:
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise CheckpointError(f"{where}: mask '{key}' has shape {shape}, weight {tuple(sd[key].shape)}")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise CheckpointError(f"{where}: mask '{key}' holds values other than 0 and 1")
        out[key] = mask.detach().cpu() != 0
    return out


def _apply_masks(sd: dict[str, Tensor], masks: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v * masks[k] if k in masks else v for k, v in sd.items()}


def _check_finite(sd: dict[str, Tensor], path: Path) -> None:
    for key, value in sd.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"checkpoint '{path}': tensor '{key}' has {bad} NaN/Inf values")


def _load_weights(model: nn.Module, sd: dict[str, Tensor], arch: str, path: Path) -> list[str]:
    """Copy ``sd`` into ``model`` after checking keys, shapes and dtypes; returns notes on upcasts."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = ([f"{len(missing)} missing keys ({_few(missing)})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected keys ({_few(unexpected)})"] if unexpected else [])
        raise CheckpointError(f"checkpoint '{path}' does not fit architecture '{arch}': {'; '.join(parts)}")
    upcast = []
    for key, value in sd.items():
        want = expected[key]
        if value.shape != want.shape:
            raise CheckpointError(
                f"checkpoint '{path}' does not fit architecture '{arch}': '{key}' has shape "
                f"{tuple(value.shape)} in the checkpoint, {tuple(want.shape)} in the model "
                "(pass --arch-kw to change num_classes/width/...)")
        if want.is_floating_point() != value.is_floating_point() or value.is_complex():
            raise CheckpointError(
                f"checkpoint '{path}': tensor '{key}' has dtype {value.dtype}, the model needs "
                f"{'floating point' if want.is_floating_point() else want.dtype} (refusing to cast it)")
        if value.dtype in _LOW_PRECISION and want.dtype not in _LOW_PRECISION:
            upcast.append(key)
    model.load_state_dict(sd)
    return [f"{len(upcast)} tensor(s) stored in {sd[upcast[0]].dtype} were upcast to "
            f"{expected[upcast[0]].dtype} ({_few(upcast)})"] if upcast else []


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


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def remove_stored_hooks(model: nn.Module) -> int:
    """Drop hooks a pickled module carries (e.g. EGP's entropy probes); prune's are kept for
    :func:`_from_module`. Returns how many were removed."""
    removed = 0
    for mod in model.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(mod, attr, None)
            for key, hook in list((hooks or {}).items()):
                if not isinstance(hook, prune.BasePruningMethod):
                    del hooks[key]
                    removed += 1
    return removed


def _from_module(model: nn.Module, path: Path) -> LoadedCheckpoint:
    """A trusted pickled module: stored hooks removed, torch prune reparametrisations made
    permanent (their masks kept)."""
    removed = remove_stored_hooks(model)
    masks: dict[str, Tensor] = {}
    for mod_name, mod in model.named_modules():
        for hook in list(mod._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                name = hook._tensor_name
                masks[f"{mod_name}.{name}" if mod_name else name] = getattr(mod, name + "_mask") != 0
                prune.remove(mod, name)
    _check_finite(model.state_dict(), path)
    notes = [f"removed {removed} hook(s) stored with the pickled model"] if removed else []
    return LoadedCheckpoint(model.eval(), None, {}, masks, {}, path, notes)


def replace_with_identity(model: nn.Module, paths: tuple[str, ...] | list[str]) -> None:
    """Replace the activation modules at ``paths`` (module paths such as ``layer1.0.relu``) with
    ``nn.Identity``, as EASIER does before it saves its state_dict."""
    activations = tuple(MODULE_RULES)
    for target in dict.fromkeys(paths):
        parent_name, _, child = target.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            module = parent.get_submodule(child)
        except AttributeError:
            known = [n for n, m in model.named_modules() if isinstance(m, activations)]
            raise CheckpointError(f"--linearised-sites: {type(model).__name__} has no module '{target}' "
                                  f"(its activation modules: {_few(known, 5)})") from None
        if not isinstance(module, (nn.Identity, *activations)):
            raise CheckpointError(f"--linearised-sites: '{target}' is a {type(module).__name__}, not an activation")
        setattr(parent, child, nn.Identity())


def _warnings(path: Path, model: nn.Module, linearised: tuple[str, ...], from_meta: list[str]) -> list[str]:
    """What the metadata says was linearised but the built model does not reflect."""
    found = _EASIER_ITERATION.search(path.name)
    if found and int(found.group(1)) > 0 and not linearised and not from_meta \
            and not any(isinstance(m, nn.Identity) for m in model.modules()):
        return [f"'{path.name}' looks like an EASIER checkpoint after {found.group(1)} removal(s), but the model "
                "has all its activations: a state_dict cannot say which were replaced by identity; pass "
                "--linearised-sites with their module paths (e.g. layer1.0.relu1)"]
    return []


def load_checkpoint(path: str | os.PathLike, arch: str | None = None, arch_kwargs: dict | None = None,
                    trust_pickle: bool = False, code_path: str | None = None,
                    linearised_sites: tuple[str, ...] | list[str] = ()) -> LoadedCheckpoint:
    """Load any accepted checkpoint form into an eval-mode model (see the module docstring).

    ``arch`` (the user's: may be ``package.module:callable``, imported from ``code_path``, default
    the current directory) overrides the stored architecture, which is only ever a registry name;
    ``arch_kwargs`` override stored and inferred kwargs. A trusted pickled module (``trust_pickle``)
    is used as it is, hooks removed; ``arch`` is then not used. ``linearised_sites`` names activation
    modules the saver replaced by identity (EASIER's state_dicts).
    """
    path = _check_file(path)
    obj = _read(path, trust_pickle, code_path)
    module = _find_module(obj)
    if module is not None:
        loaded = _from_module(module, path)
        replace_with_identity(loaded.model, tuple(linearised_sites))
        return loaded
    content = _parse(obj, path)
    _check_tensors({**content.state_dict, **{f"mask {k}": v for k, v in content.masks.items()}}, path)
    _verify_hash(content, path)
    sd, masks = normalise_state_dict(content.state_dict)
    masks |= _checked_masks(content.masks, sd, f"checkpoint '{path}'")
    sd = _apply_masks(sd, masks)
    _check_finite(sd, path)
    if arch is None and content.arch is None:
        raise CheckpointError(
            f"checkpoint '{path}' is a plain state_dict: pass --arch (a torchvision name such as resnet18, "
            "a built-in such as cifar_resnet18, or package.module:callable)")
    user_arch = arch is not None
    arch = arch or content.arch
    builder = resolve_arch(arch, allow_import=user_arch, code_path=code_path)
    stored = content.arch_kwargs if arch == content.arch else {}
    kwargs = {**infer_arch_kwargs(arch, sd, builder), **stored, **(arch_kwargs or {})}
    model = build_model(arch, allow_import=user_arch, code_path=code_path, **kwargs)
    replace_with_identity(model, tuple(linearised_sites))
    notes = _load_weights(model, sd, arch, path)
    model.eval()
    linearised = content.meta.get("linearised_sites", [])
    return LoadedCheckpoint(apply_linearised(model, linearised) if linearised else model,
                            arch, kwargs, masks, content.meta, path, notes,
                            _warnings(path, model, tuple(linearised_sites), linearised))


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
    """Write this tool's checkpoint atomically, with its content hash; masks are applied to the saved
    weights.

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
    obj[HASH_KEY] = content_hash(obj)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
