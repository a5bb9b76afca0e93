"""The target runtime: onnxruntime execution providers by short name, and a fingerprint of the
machine and runtime that measured timings depend on (the key of cached measurements).

Timings are taken on the provider the user names (``--provider``); equivalence is always checked on
the CPU provider, whose float32 arithmetic is the reference (GPU providers may use TF32 or fused
kernels with different rounding).
"""
from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from functools import cache

from nepenthe_compress.errors import UserError

PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
DEFAULT_PROVIDER = "cpu"


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build offers (unknown ones by their own name)."""
    import onnxruntime as ort

    short = {v: k for k, v in PROVIDERS.items()}
    return [short.get(p, p) for p in ort.get_available_providers() if p != "AzureExecutionProvider"]


def provider_chain(name: str) -> list[str]:
    """onnxruntime's ``providers`` list for ``name`` (a short name or a full provider name): the
    provider, then the CPU provider for operators it does not implement. Not installed -> UserError."""
    full = PROVIDERS.get(name.lower(), name)
    import onnxruntime as ort

    if full not in ort.get_available_providers():
        raise UserError(f"execution provider '{name}' is not available in this onnxruntime "
                        f"(available: {', '.join(available_providers())}); GPU providers need the "
                        "onnxruntime-gpu (CUDA, TensorRT) or onnxruntime-openvino package")
    return [full] if full == PROVIDERS["cpu"] else [full, PROVIDERS["cpu"]]


@cache
def _cpu_flags() -> str:
    """The CPU's model name and feature flags (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f.read(1 << 20).splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


@dataclass(frozen=True)
class Runtime:
    """Where timings are taken: provider, threads, and the runtime / machine they hold for."""

    provider: str = DEFAULT_PROVIDER
    threads: int = 2

    def fingerprint(self) -> str:
        """A short hash of onnxruntime's version, the provider, threads and the CPU's flags."""
        return _fingerprint(PROVIDERS.get(self.provider, self.provider), self.threads)


@cache
def _fingerprint(provider: str, threads: int) -> str:
    import onnxruntime as ort

    text = "|".join([ort.__version__, provider, str(threads), _cpu_flags()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
