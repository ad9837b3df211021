"""Loads the compiled extension fastseq2seq._C, which registers the C++ and CUDA ops; never fails the import."""
import torch

try:
    from fastseq2seq import _C  # noqa: F401  (the import registers torch.ops.fastseq2seq.*)

    LOAD_ERROR = None
except ImportError as error:  # a source checkout that was never built, or a broken build
    LOAD_ERROR = f"{type(error).__name__}: {error}"


def loaded() -> bool:
    return LOAD_ERROR is None


def build_info() -> dict:
    """What the extension was compiled with, e.g. {'cpu': '1', 'cuda': '1', 'cuda_archs': '8.0;9.0'}."""
    if not loaded():
        return {}
    return dict(item.split("=", 1) for item in torch.ops.fastseq2seq.build_info().split())
