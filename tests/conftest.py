import os

import pytest
import torch

import fastseq2seq

HAS_CUDA = torch.cuda.is_available()

# Per-dtype (atol, rtol) for a fused kernel against the reference run in float64 on the same inputs.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (1.6e-2, 2e-2),
}
# On GPU float32 matrix products may use TF32 (10-bit mantissa) when the user allows it.
TF32_TOLERANCE = (2e-3, 2e-3)


def tolerance(dtype, device):
    if dtype == torch.float32 and torch.device(device).type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return TF32_TOLERANCE
    return TOLERANCES[dtype]


def assert_close(actual, expected, dtype, device, what="", scale=1.0):
    """expected is the float64 reference; scale widens for quantities that sum over many terms (weight grads)."""
    atol, rtol = tolerance(dtype, device)
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")


def backend_cases():
    """pytest params (backend, device, dtype): every fused backend on every dtype it supports; GPU ones marked."""
    cases = []
    for backend, dtypes in (("cpu", (torch.float32, torch.float64)), ("triton", (torch.float32, torch.float16))):
        runs = backend in fastseq2seq.available_backends("cpu")
        marks = [] if runs else [pytest.mark.skip(reason=f"the {backend} backend cannot run on cpu here")]
        cases += [pytest.param(backend, "cpu", dt, marks=marks, id=f"{backend}-cpu-{str(dt)[6:]}") for dt in dtypes]
    for backend in ("cuda", "triton"):
        runs = HAS_CUDA and backend in fastseq2seq.available_backends("cuda")
        marks = [pytest.mark.gpu] + ([] if runs else [pytest.mark.skip(reason=f"{backend} on cuda is not available")])
        cases += [pytest.param(backend, "cuda", dt, marks=marks, id=f"{backend}-cuda-{str(dt)[6:]}")
                  for dt in (torch.float32, torch.float16, torch.bfloat16)]
    return cases


def interpreted_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Bad arguments for the LSTM ops, as edits of the list (input, h, c, w_ih, w_hh, b_ih, b_hh), and the argument
# each error must name; shared by the cell and the layer tests.
LSTM_BAD_INPUTS = [
    (lambda a: a.__setitem__(0, a[0][0]), "input"),                      # wrong rank
    (lambda a: a.__setitem__(1, a[1][:2]), "hx[0]"),                     # mismatched B
    (lambda a: a.__setitem__(2, a[2][:, :-1]), "hx[1]"),                 # mismatched H
    (lambda a: a.__setitem__(3, a[3][:-1]), "w_ih"),                     # not 4H rows
    (lambda a: a.__setitem__(4, a[4][:, :-1]), "w_hh"),
    (lambda a: a.__setitem__(5, a[5][:-1]), "b_ih"),
    (lambda a: a.__setitem__(6, None), "b_ih"),                          # one bias only
    (lambda a: a.__setitem__(3, a[3].double()), "w_ih"),                 # mixed dtypes
    (lambda a: a.__setitem__(2, a[2].to("meta")), "hx[1]"),              # mixed devices
]
