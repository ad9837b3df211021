"""Which implementation runs an op. Every public op asks `select_backend`; nothing else decides.

Strongest first: the op's `backend=` keyword, the innermost `use_backend(...)` block, the
FASTSEQ2SEQ_BACKEND environment variable, else the fastest backend available for the tensors' device.
"""
import contextlib
import os

import torch

from fastseq2seq import _extension

BACKENDS = ("reference", "cpu", "cuda", "triton")
# Fastest first, per device type, when the user names no backend.
DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

_forced = []  # stack of use_backend() names

try:
    import triton  # noqa: F401

    TRITON_IMPORT_ERROR = None
except ImportError as error:
    TRITON_IMPORT_ERROR = str(error)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(name: str, device_type: str):
    """None when `name` can run on tensors of `device_type`, else why not (said to the user)."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}"
    if device_type not in DEFAULT_ORDER:
        return f"device type {device_type!r} is not supported (cpu or cuda)"
    if name in ("cpu", "cuda") and name != device_type:
        return f"the '{name}' backend runs on {name} tensors, these are on {device_type}"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if name == "reference":
        return None
    if name in ("cpu", "cuda"):
        if not _extension.loaded():
            return f"the compiled extension fastseq2seq._C could not be loaded ({_extension.LOAD_ERROR})"
        if name == "cuda" and _extension.build_info().get("cuda") != "1":
            return "fastseq2seq was built without its CUDA sources (reinstall with a CUDA build of torch and nvcc)"
        return None
    if TRITON_IMPORT_ERROR is not None:
        return f"Triton is not installed ({TRITON_IMPORT_ERROR})"
    if device_type == "cpu" and not triton_interpreted():
        return "Triton runs on CPU tensors only under its interpreter (set TRITON_INTERPRET=1 before importing triton)"
    return None


def available_backends(device="cpu") -> list:
    """The backends that can run on `device` here, the default choice first."""
    device_type = torch.device(device).type
    preferred = DEFAULT_ORDER.get(device_type, ())
    order = list(preferred) + [name for name in BACKENDS if name not in preferred]
    return [name for name in order if unavailable_reason(name, device_type) is None]


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block on backend `name` unless a call names its own."""
    if name not in BACKENDS:
        raise ValueError(f"fastseq2seq: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def select_backend(backend, device: torch.device, op: str) -> str:
    """The backend that runs `op` on tensors of `device`; raises if the chosen one cannot run there."""
    device_type = device.type
    name = backend or (_forced[-1] if _forced else None) or os.environ.get("FASTSEQ2SEQ_BACKEND") or None
    if name is None:
        for candidate in DEFAULT_ORDER.get(device_type, ("reference",)):
            if unavailable_reason(candidate, device_type) is None:
                return candidate
        return "reference"
    reason = unavailable_reason(name, device_type)
    if reason is not None:
        raise RuntimeError(f"fastseq2seq.ops.{op}: backend {name!r} cannot run on {device_type} here: {reason}")
    return name
