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


def check_lengths(lengths, B, ref, ref_arg):
    """lengths: int64 [B] on the device of `ref`. Its values are checked apart (check_lengths_range)."""
    check_shape(lengths, "lengths", (B,))
    if lengths.dtype != torch.int64:
        fail("lengths", f"expected dtype int64, got {lengths.dtype}")
    if lengths.device != ref.device:
        fail("lengths", f"is on {lengths.device} but '{ref_arg}' is on {ref.device}")


def check_lengths_range(lengths, upper, upper_name):
    """Every length in [0, upper]. Reads the values: one host round trip on CUDA (one aminmax, as this runs at
    every decoder step), and nothing a compiled graph can branch on."""
    if lengths is not None and lengths.numel():
        low, high = (x.item() for x in torch.aminmax(lengths))
        if low < 0:
            fail("lengths", f"must be >= 0, got {low}")
        if high > upper:
            fail("lengths", f"must be <= {upper_name} = {upper}, got {high}")


def check_float_dtype(t, arg, backend):
    allowed = SUPPORTED_DTYPES[(backend, t.device.type)]
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        fail(arg, f"dtype {t.dtype} is not supported by the {backend} backend on {t.device.type} ({names})")


def check_state_pair(hx, arg="hx"):
    if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
        fail(arg, f"expected a pair (h, c) of tensors, got {type(hx).__name__}")
    return hx


def check_lstm_args(input, input_rank, hx, cx, w_ih, w_hh, b_ih, b_hh, backend):
    """input [B, I] (a cell) or [T, B, I] (a layer), hx/cx [B, H], w_ih [4H, I], w_hh [4H, H], biases [4H]; one
    device and dtype. The C++ kernels check the same (csrc/lstm_cell.h)."""
    check_rank(input, "input", input_rank)
    for t, arg in ((hx, "hx[0]"), (cx, "hx[1]"), (w_ih, "w_ih"), (w_hh, "w_hh")):
        check_rank(t, arg, 2)
    (B, I), H = input.shape[-2:], hx.shape[1]
    check_float_dtype(input, "input", backend)
    for t, arg, shape in ((hx, "hx[0]", (B, H)), (cx, "hx[1]", (B, H)), (w_ih, "w_ih", (4 * H, I)),
                          (w_hh, "w_hh", (4 * H, H))):
        check_shape(t, arg, shape)
        check_like(t, arg, input, "input")
    if (b_ih is None) != (b_hh is None):
        fail("b_ih", "b_ih and b_hh must be given together")
    if b_ih is not None:
        for t, arg in ((b_ih, "b_ih"), (b_hh, "b_hh")):
            check_shape(t, arg, (4 * H,))
            check_like(t, arg, input, "input")
