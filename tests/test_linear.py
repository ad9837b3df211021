"""fastseq2seq.ops.linear and the constant_weights scope in which the cpu backend packs each weight once."""
import contextlib

import pytest
import torch
from conftest import assert_close

import fastseq2seq
from fastseq2seq.ops import constant_weights, linear, linear_argmax, linear_argmax_reference, linear_reference

HAS_CPU_BACKEND = "cpu" in fastseq2seq.available_backends("cpu")
needs_cpu_backend = pytest.mark.skipif(not HAS_CPU_BACKEND, reason="the cpu backend is not built")
# (M, K, N): rows off the 6-row block, K from 1 up, N off the 64-column panel (and under one panel); N past
# kMaxPanelDepth (2048), the depth of the input gradient, which then runs in slices.
SHAPES = [(1, 1, 1), (5, 17, 63), (7, 33, 65), (64, 512, 130), (67, 100, 64), (130, 24, 200), (6, 8, 4100)]


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


@pytest.mark.parametrize("backend", fastseq2seq.available_backends("cpu"))
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("scoped", [False, True], ids=["unscoped", "scoped"])
def test_gradients_match_reference(backend, M, K, N, scoped):
    x, w, b = make_inputs(M, K, N)
    g = torch.randn(M, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    with constant_weights() if scoped else contextlib.nullcontext():
        for call in range(2):  # in a scope the second backward reuses the packed weight
            for t in args:
                t.grad = None
            linear(*args, backend=backend).backward(g.float())
    ref = [t.double().requires_grad_() for t in (x, w, b)]
    linear_reference(*ref).backward(g)
    for name, got, want, scale in zip(("input", "weight", "bias"), args, ref, (N, M, M)):
        assert_close(got.grad, want.grad, torch.float32, "cpu", f"grad {name}", scale=scale ** 0.5)


@needs_cpu_backend
def test_scope_repacks_a_weight_given_other_data_or_shape():
    """set_ points a weight at other data (and another shape) without an in-place op on its values."""
    x, w, _ = make_inputs(8, 48, 96)
    other = make_inputs(8, 48, 64, seed=5)[1]
    with torch.no_grad(), constant_weights():
        linear(x, w, None, backend="cpu")
        w.set_(other.clone())
        assert_close(linear(x, w, None, backend="cpu"), linear_reference(x.double(), other.double()), torch.float32,
                     "cpu", scale=48 ** 0.5)


@needs_cpu_backend
def test_backward_op_names_a_mismatched_grad_output():
    x, w, _ = make_inputs(5, 17, 63)
    with pytest.raises(ValueError, match="argument 'grad_output'"):
        torch.ops.fastseq2seq.linear_bwd(torch.zeros(5, 62), x, w, False)


@needs_cpu_backend
def test_gradcheck_float64_and_opcheck_with_autograd():
    x, w, b = (t.double().requires_grad_() for t in make_inputs(4, 6, 5))
    assert torch.autograd.gradcheck(lambda *a: linear(*a, backend="cpu"), (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: linear(*a, backend="cpu"), (x, w))
    torch.library.opcheck(torch.ops.fastseq2seq.linear.default,
                          tuple(t.requires_grad_() for t in make_inputs(5, 17, 63)))


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


@pytest.mark.parametrize("backend", fastseq2seq.available_backends("cpu"))
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("scoped", [False, True], ids=["unscoped", "scoped"])
def test_linear_argmax_matches_reference(backend, M, K, N, scoped):
    """Exact indices: the logits differ from the float64 ones only by rounding, so compare with torch's argmax of
    our own float32 logits, then check that the pick is a maximum of the float64 logits up to that rounding."""
    x, w, b = make_inputs(M, K, N)
    with torch.no_grad(), (constant_weights() if scoped else contextlib.nullcontext()):
        index = linear_argmax(x, w, b, backend=backend)
        logits = linear(x, w, b, backend=backend)
    assert index.dtype == torch.long and index.shape == (M,)
    assert torch.equal(index, logits.argmax(-1))
    exact_logits = linear_reference(x.double(), w.double(), b.double())
    picked = exact_logits.gather(1, index[:, None]).squeeze(1)
    assert (exact_logits.amax(-1) - picked <= 1e-4 * K ** 0.5).all()
    assert torch.equal(linear_argmax_reference(x, w, b), torch.nn.functional.linear(x, w, b).argmax(-1))


@needs_cpu_backend
def test_linear_argmax_ties_nan_and_infinity_follow_torch():
    """Logits set through the bias (zero input and weight): ties go to the first index, a NaN wins (its first
    occurrence), a row of -inf picks index 0; columns past the last multiple of 16 are searched too."""
    N = 37
    rows = torch.full((5, N), -1.0)
    rows[0, [3, 20, 36]] = 2.0              # a three-way tie
    rows[1, [5, 30]] = float("nan")         # NaN wins, first one
    rows[2] = float("-inf")
    rows[3, 35] = 1.0                       # in the tail after the last 16-column chunk
    rows[4, [33, 34]] = float("inf")
    x, w = torch.zeros(2, 3), torch.zeros(N, 3)
    with torch.no_grad(), constant_weights():
        got = [linear_argmax(x, w, row, backend="cpu").tolist() for row in rows]
    assert got == [[i, i] for i in rows.argmax(-1).tolist()] == [[i, i] for i in (3, 5, 0, 35, 33)]


@needs_cpu_backend
def test_linear_argmax_rejects_an_empty_output_and_passes_opcheck():
    x, w, _ = make_inputs(4, 6, 5)
    with torch.no_grad(), pytest.raises(ValueError, match="argument 'weight'"):
        linear_argmax(x, w[:0], None, backend="cpu")
    torch.library.opcheck(torch.ops.fastseq2seq.linear_argmax.default, make_inputs(5, 17, 63))
