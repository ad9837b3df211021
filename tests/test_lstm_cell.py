import pytest
import torch
from conftest import LSTM_BAD_INPUTS, assert_close, backend_cases, interpreted_triton

import fastseq2seq
from fastseq2seq.ops import lstm_cell, lstm_cell_reference

# (B, I, H): sizes off every block size; B = 64 with I, H multiples of 64 takes the cpu paths that read the weights in
# place (outside a constant-weights scope)
SHAPES = [(1, 1, 1), (3, 5, 37), (2, 130, 257), (17, 16, 64), (64, 128, 64)]


def make_inputs(B, I, H, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = H ** -0.5

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(device=device, dtype=dtype)

    args = [rand(B, I), rand(B, H), rand(B, H), rand(4 * H, I, s=scale), rand(4 * H, H, s=scale)]
    args += [rand(4 * H, s=scale), rand(4 * H, s=scale)] if bias else [None, None]
    return args


def run(args, backend):
    x, h, c, w_ih, w_hh, b_ih, b_hh = args
    return lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh, backend=backend)


def forward_backward(args, backend):
    """Outputs and the gradients of every input under a random upstream gradient."""
    args = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    h, c = run(args, backend)
    g = torch.Generator().manual_seed(1)
    grad_h = torch.randn(h.shape, generator=g, dtype=torch.float64).to(h)
    grad_c = torch.randn(c.shape, generator=g, dtype=torch.float64).to(c)
    torch.autograd.backward((h, c), (grad_h, grad_c))
    return (h, c), [a.grad for a in args if a is not None]


NAMES = ["input", "h", "c", "w_ih", "w_hh", "b_ih", "b_hh"]


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("B,I,H", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(backend, device, dtype, B, I, H, bias):
    args = make_inputs(B, I, H, dtype, device, bias)
    outs, grads = forward_backward(args, backend)
    ref_outs, ref_grads = forward_backward([a.double() if a is not None else None for a in args], "reference")
    for name, out, ref in zip(("h", "c"), outs, ref_outs):
        assert out.dtype == dtype and out.device.type == torch.device(device).type
        assert_close(out, ref, dtype, device, name)
    for name, grad, ref in zip(NAMES, grads, ref_grads):
        # weight and bias gradients sum over the batch
        assert_close(grad, ref, dtype, device, f"grad {name}", scale=1.0 if name in ("input", "h", "c") else B ** 0.5)


@pytest.mark.parametrize("backend", ["cpu"] + (["triton"] if interpreted_triton() else []))
def test_gradcheck_float64(backend):
    args = [a.requires_grad_() for a in make_inputs(3, 4, 5, torch.float64, "cpu")]
    assert torch.autograd.gradcheck(lambda *a: run(a, backend), args, fast_mode=backend == "triton")  # interpreter: slow


def fused_ops():
    ops = [torch.ops.fastseq2seq.lstm_cell_fwd.default] if "cpu" in fastseq2seq.available_backends("cpu") else []
    if interpreted_triton():
        ops.append(torch.ops.fastseq2seq.lstm_cell_fwd_triton.default)
    return ops


@pytest.mark.parametrize("op", fused_ops(), ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(op, bias):
    args = [a.requires_grad_() if a is not None else None for a in make_inputs(4, 6, 9, torch.float32, "cpu", bias)]
    torch.library.opcheck(op, tuple(args))


def test_torch_compile_fullgraph():
    args = make_inputs(4, 6, 9, torch.float32, "cpu")
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: run(a, None), fullgraph=True)
    for out, ref in zip(compiled(*args), run(args, None)):
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
def test_noncontiguous_and_expanded_inputs(backend, device, dtype):
    B, I, H = 3, 6, 9
    x, h, c, w_ih, w_hh, b_ih, b_hh = make_inputs(B, I, H, dtype, device)
    x_strided = torch.cat([x, x], dim=1)[:, ::2]  # same values as x, stride 2
    x_strided.copy_(x)
    h_expanded = h[:1].expand(B, H)
    w_hh_t = w_hh.t().contiguous().t()  # column-major weights
    out = lstm_cell(x_strided, (h_expanded, c), w_ih, w_hh_t, b_ih, b_hh, backend=backend)
    ref = lstm_cell_reference(x.double(), (h[:1].expand(B, H).double(), c.double()), w_ih.double(), w_hh.double(),
                              b_ih.double(), b_hh.double())
    for o, r in zip(out, ref):
        assert_close(o, r, dtype, device)


def all_backends_here():
    return [b for b in fastseq2seq.available_backends("cpu")]


@pytest.mark.parametrize("backend", all_backends_here())
@pytest.mark.parametrize("mutate,arg", LSTM_BAD_INPUTS)
def test_bad_input_names_the_argument(backend, mutate, arg):
    args = make_inputs(3, 4, 5, torch.float32, "cpu")
    mutate(args)
    with pytest.raises((ValueError, RuntimeError), match=f"'{arg}'".replace("[", r"\[").replace("]", r"\]")):
        run(args, backend)


def test_hx_none_means_zeros():
    x, h, c, w_ih, w_hh, b_ih, b_hh = make_inputs(2, 3, 4, torch.float64, "cpu")
    zeros = torch.zeros_like(h)
    for o, r in zip(lstm_cell(x, None, w_ih, w_hh, b_ih, b_hh), lstm_cell_reference(x, (zeros, zeros), w_ih, w_hh,
                                                                                     b_ih, b_hh)):
        torch.testing.assert_close(o, r)


def test_reference_matches_torch_lstm_cell():
    cell = torch.nn.LSTMCell(6, 11, dtype=torch.float64)
    x, h, c = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 11, dtype=torch.float64), torch.randn(
        4, 11, dtype=torch.float64)
    for o, r in zip(lstm_cell_reference(x, (h, c), cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh),
                    cell(x, (h, c))):
        torch.testing.assert_close(o, r)


@pytest.mark.skipif("cpu" not in fastseq2seq.available_backends("cpu"), reason="the cpu backend is not built")
@pytest.mark.parametrize("B,I,H", SHAPES + [(64, 96, 200)])
def test_cpu_forward_in_constant_weights_scope(B, I, H):
    """Inside constant_weights() the cpu forward multiplies by gate weights packed once (AVX-512 panels): every
    call of the scope, including those after an in-place change of a weight, must match the reference."""
    args = make_inputs(B, I, H, torch.float32, "cpu")
    with fastseq2seq.ops.constant_weights():
        for call in range(3):
            if call == 2:
                with torch.no_grad():
                    args[4].mul_(-0.5)  # w_hh changed in place: its version counter moves, the scope repacks it
            outs, grads = forward_backward(args, "cpu")
            ref_outs, ref_grads = forward_backward([a.double() for a in args], "reference")
            for name, out, ref in zip(("h", "c"), outs, ref_outs):
                assert_close(out, ref, torch.float32, "cpu", f"call {call}: {name}")
            for name, grad, ref in zip(NAMES, grads, ref_grads):
                assert_close(grad, ref, torch.float32, "cpu", f"call {call}: grad {name}",
                             scale=1.0 if name in ("input", "h", "c") else B ** 0.5)
