"""fastseq2seq.ops.linear and the constant_weights scope in which the cpu backend packs each weight once."""
import contextlib

import pytest
import torch
from conftest import assert_close

import fastseq2seq
from fastseq2seq.ops import constant_weights, linear, linear_reference

HAS_CPU_BACKEND = "cpu" in fastseq2seq.available_backends("cpu")
needs_cpu_backend = pytest.mark.skipif(not HAS_CPU_BACKEND, reason="the cpu backend is not built")
# (M, K, N): rows off the 6-row block, K from 1 up, N off the 64-column panel (and under one panel).
SHAPES = [(1, 1, 1), (5, 17, 63), (7, 33, 65), (64, 512, 130), (67, 100, 64), (130, 24, 200)]


def make_inputs(M, K, N, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(N, K, generator=g, dtype=torch.float64) * K ** -0.5).to(dtype)
    b = torch.randn(N, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("backend", fastseq2seq.available_backends("cpu"))
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("scoped", [False, True], ids=["unscoped", "scoped"])
def test_matches_reference(backend, M, K, N, bias, scoped):
    x, w, b = make_inputs(M, K, N, bias=bias)
    expected = linear_reference(x.double(), w.double(), b.double() if bias else None)
    with torch.no_grad(), (constant_weights() if scoped else contextlib.nullcontext()):
        for call in range(2):  # the second call of a scope reuses the packed weight
            out = linear(x, w, b, backend=backend)
            assert out.shape == (M, N) and out.dtype == torch.float32
            assert_close(out, expected, torch.float32, "cpu", f"call {call}", scale=K ** 0.5)


@needs_cpu_backend
def test_leading_dimensions_and_noncontiguous_input():
    x, w, b = make_inputs(24, 40, 70)
    x3 = x.view(4, 6, 40).transpose(0, 1)  # [6, 4, 40], not contiguous
    with torch.no_grad(), constant_weights():
        out = linear(x3, w, b, backend="cpu")
    assert out.shape == (6, 4, 70)
    assert_close(out, linear_reference(x3.double(), w.double(), b.double()), torch.float32, "cpu", scale=40 ** 0.5)


@needs_cpu_backend
def test_scope_repacks_a_weight_changed_in_place_and_survives_many_weights():
    x, w, b = make_inputs(8, 48, 96)
    others = [make_inputs(8, 48, 96, seed=s)[1] for s in range(1, 21)]  # more weights than the scope keeps
    with torch.no_grad(), constant_weights():
        first = linear(x, w, b, backend="cpu")
        w.mul_(2.0)
        assert_close(linear(x, w, b, backend="cpu"), 2 * first.double() - b.double(), torch.float32, "cpu",
                     "after w.mul_", scale=48 ** 0.5)
        for _ in range(2):
            for other in others:
                assert_close(linear(x, other, None, backend="cpu"), linear_reference(x.double(), other.double()),
                             torch.float32, "cpu", scale=48 ** 0.5)


@needs_cpu_backend
def test_with_autograd_gradients_flow():
    x, w, b = make_inputs(5, 17, 63)
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    with constant_weights():
        linear(*args, backend="cpu").square().sum().backward()
    ref = [t.double().requires_grad_() for t in (x, w, b)]
    linear_reference(*ref).square().sum().backward()
    for name, got, want in zip(("input", "weight", "bias"), args, ref):
        assert_close(got.grad, want.grad, torch.float32, "cpu", f"grad {name}", scale=17 ** 0.5)


@needs_cpu_backend
@pytest.mark.parametrize("make_bad,arg", [
    (lambda x, w, b: (x[:, :-1], w, b), "input"),
    (lambda x, w, b: (x, w[0], b), "weight"),
    (lambda x, w, b: (x, w.double(), b), "weight"),
    (lambda x, w, b: (x, w, b[:-1]), "bias"),
])
def test_bad_input_names_the_argument(make_bad, arg):
    with torch.no_grad(), pytest.raises(ValueError, match=f"argument '{arg}'"):
        linear(*make_bad(*make_inputs(5, 17, 63)), backend="cpu")


@needs_cpu_backend
def test_opcheck_and_unbalanced_scope():
    torch.library.opcheck(torch.ops.fastseq2seq.linear.default, make_inputs(5, 17, 63))
    with pytest.raises(RuntimeError, match="without a matching enter"):
        torch.ops.fastseq2seq.constant_weights_scope(False)
