"""fastseq2seq.ops.cross_entropy against torch.nn.functional.cross_entropy in float64 (the reference)."""
import pytest
import torch
from conftest import assert_close

import fastseq2seq
from fastseq2seq.ops import cross_entropy, cross_entropy_reference

needs_cpu_backend = pytest.mark.skipif("cpu" not in fastseq2seq.available_backends("cpu"),
                                       reason="the cpu backend is not built")
# (N, V): V off the 32-wide partial sums and the vector width, from 1 class up to a vocabulary's worth.
SHAPES = [(1, 1), (3, 5), (7, 33), (64, 1000), (5, 8000)]
IGNORE = 0


def make_inputs(N, V, dtype=torch.float32, seed=0, scale=3.0):
    """Logits with a spread like a trained output layer's; targets with every third row ignored."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, V, (N,), generator=g)
    target[::3] = IGNORE
    return logits, target


def loss_and_grad(logits, target, backend, **kwargs):
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, target, backend=backend, **kwargs)
    weights = torch.linspace(0.5, 2.0, len(loss), dtype=loss.dtype)  # a different upstream gradient per row
    (loss * weights).sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("backend", fastseq2seq.available_backends("cpu"))
@pytest.mark.parametrize("N,V", SHAPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(backend, N, V, smoothing, dtype):
    logits, target = make_inputs(N, V, dtype)
    loss, grad = loss_and_grad(logits, target, backend, ignore_index=IGNORE, label_smoothing=smoothing)
    ref_loss, ref_grad = loss_and_grad(logits.double(), target, "reference", ignore_index=IGNORE,
                                       label_smoothing=smoothing)
    assert loss.dtype == dtype and loss.shape == (N,) and grad.dtype == dtype
    assert (loss[target == IGNORE] == 0).all() and (grad[target == IGNORE] == 0).all()
    assert_close(loss, ref_loss, dtype, "cpu", "loss", scale=3.0)
    assert_close(grad, ref_grad, dtype, "cpu", "grad logits")


@needs_cpu_backend
def test_default_ignore_index_noncontiguous_logits_and_reference_is_torch():
    logits, target = make_inputs(6, 40)
    target[2] = -100
    x = logits.t().contiguous().t()  # same values, column-major
    assert not x.is_contiguous()
    got = cross_entropy(x, target, backend="cpu")
    assert_close(got, cross_entropy_reference(logits.double(), target), torch.float32, "cpu", scale=3.0)
    assert got[2] == 0
    target[2] = 0
    assert torch.equal(cross_entropy_reference(logits, target, 0, 0.2),
                       torch.nn.functional.cross_entropy(logits, target, ignore_index=0, label_smoothing=0.2,
                                                         reduction="none"))


@needs_cpu_backend
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_non_finite_logits_follow_torch(smoothing):
    """A NaN or +inf logit makes its row NaN; a -inf logit off the target is an ordinary class with probability 0
    (finite loss without smoothing, +inf with it); a row of -inf is NaN."""
    logits, target = make_inputs(4, 37)
    target[:] = 5
    logits[0, 9] = float("nan")
    logits[1, 9] = float("inf")
    logits[2, 9] = float("-inf")
    logits[3] = float("-inf")
    got, grad = loss_and_grad(logits, target, "cpu", label_smoothing=smoothing)
    want, want_grad = loss_and_grad(logits.double(), target, "reference", label_smoothing=smoothing)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    assert_close(got[finite], want[finite], torch.float32, "cpu", "finite losses", scale=3.0)
    assert torch.equal(grad.isnan(), want_grad.isnan())


@needs_cpu_backend
def test_gradcheck_float64_and_opcheck():
    logits, target = make_inputs(4, 7, torch.float64)
    x = logits.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: cross_entropy(x, target, ignore_index=IGNORE, label_smoothing=0.1, backend="cpu"), (x,))
    logits, target = make_inputs(5, 33)
    torch.library.opcheck(torch.ops.fastseq2seq.cross_entropy_fwd.default,
                          (logits.requires_grad_(), target, IGNORE, 0.1))


@needs_cpu_backend
def test_compiles_without_graph_breaks():
    logits, target = make_inputs(8, 50)

    def loss_sum(x):
        return cross_entropy(x, target, ignore_index=IGNORE, label_smoothing=0.1, backend="cpu").sum()

    x = logits.clone().requires_grad_()
    compiled = torch.compile(loss_sum, fullgraph=True, backend="aot_eager")(x)
    compiled.backward()
    assert_close(compiled, loss_sum(logits.double()), torch.float32, "cpu", scale=8 * 3.0)


@needs_cpu_backend
@pytest.mark.parametrize("make_bad,arg", [
    (lambda x, t: (x[0], t, {}), "logits"),
    (lambda x, t: (x[:, :0], t, {}), "logits"),
    (lambda x, t: (x.half(), t, {}), "logits"),
    (lambda x, t: (x, t[:-1], {}), "target"),
    (lambda x, t: (x, t.int(), {}), "target"),
    (lambda x, t: (x, t + x.shape[1], {}), "target"),
    (lambda x, t: (x, t - x.shape[1], {}), "target"),
    (lambda x, t: (x, t, {"label_smoothing": 1.5}), "label_smoothing"),
])
def test_bad_input_names_the_argument(make_bad, arg):
    logits, target = make_inputs(5, 17)
    x, t, kwargs = make_bad(logits, target.clamp(min=1))
    with pytest.raises(ValueError, match=f"argument '{arg}'"):
        cross_entropy(x, t, backend="cpu", **kwargs)
