"""Argument checks for the Python-side backends (reference, triton); the C++ kernels mirror them in csrc/checks.h."""
import torch

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# What each backend computes correctly, per device type; the C++ kernels check the same in csrc/checks.h.
SUPPORTED_DTYPES = {
    ("reference", "cpu"): _FLOATS,
    ("reference", "cuda"): _FLOATS,
    ("cpu", "cpu"): (torch.float32, torch.float64),
    ("cuda", "cuda"): _FLOATS,
    ("triton", "cuda"): _FLOATS,
    ("triton", "cpu"): (torch.float32, torch.float64, torch.float16),  # the interpreter mishandles bfloat16
}


def fail(arg, message):
    raise ValueError(f"fastseq2seq: argument '{arg}': {message}")


def check_tensor(t, arg):
    if not isinstance(t, torch.Tensor):
        fail(arg, f"expected a tensor, got {type(t).__name__}")


def check_rank(t, arg, rank):
    check_tensor(t, arg)
    if t.dim() != rank:
        fail(arg, f"expected a {rank}-D tensor, got {t.dim()}-D with shape {tuple(t.shape)}")


def check_shape(t, arg, shape):
    check_tensor(t, arg)
    if tuple(t.shape) != tuple(shape):
        fail(arg, f"expected shape {tuple(shape)}, got {tuple(t.shape)}")


def check_like(t, arg, ref, ref_arg):
    if t.device != ref.device:
        fail(arg, f"is on {t.device} but '{ref_arg}' is on {ref.device}")
    if t.dtype != ref.dtype:
        fail(arg, f"has dtype {t.dtype} but '{ref_arg}' has {ref.dtype}")


def check_float_dtype(t, arg, backend):
    allowed = SUPPORTED_DTYPES[(backend, t.device.type)]
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        fail(arg, f"dtype {t.dtype} is not supported by the {backend} backend on {t.device.type} ({names})")


def check_state_pair(hx, arg="hx"):
    if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
        fail(arg, f"expected a pair (h, c) of tensors, got {type(hx).__name__}")
    return hx
