import pytest
import torch
from conftest import LSTM_BAD_INPUTS, assert_close, backend_cases, interpreted_triton
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastseq2seq
from fastseq2seq.ops import lstm_layer, lstm_layer_reference

NAMES = ["input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"]


def make_inputs(T, B, I, H, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = H ** -0.5

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(device=device, dtype=dtype)

    args = [rand(T, B, I), rand(B, H), rand(B, H), rand(4 * H, I, s=scale), rand(4 * H, H, s=scale)]
    args += [rand(4 * H, s=scale), rand(4 * H, s=scale)] if bias else [None, None]
    return args


def random_lengths(T, B, seed=0):
    """Random order, with 0 and T among them when B allows."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[:2] = torch.tensor([T, 0])[:B]
    return lengths[torch.randperm(B, generator=g)]


def torch_lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
    """torch.nn.LSTM (a PackedSequence when lengths are given); reverse is the backward half of a bidirectional one."""
    T, B, I = x.shape
    H = h0.shape[1]
    lstm = torch.nn.LSTM(I, H, bias=b_ih is not None, bidirectional=reverse, dtype=x.dtype, device=x.device)
    suffix = "_reverse" if reverse else ""
    params = {f"weight_ih_l0{suffix}": w_ih, f"weight_hh_l0{suffix}": w_hh}
    if b_ih is not None:
        params.update({f"bias_ih_l0{suffix}": b_ih, f"bias_hh_l0{suffix}": b_hh})

    def state(s):  # the forward half of a bidirectional LSTM gets an unused zero state
        return torch.stack([torch.zeros_like(s), s]) if reverse else s[None]

    # pack_padded_sequence refuses length 0: such rows output zeros and keep their initial state.
    rows = torch.arange(B) if lengths is None else torch.nonzero(lengths.cpu() > 0).flatten()
    output, h_n, c_n = x.new_zeros(T, B, H), h0.clone(), c0.clone()
    if len(rows):
        sequences = x[:, rows]
        if lengths is not None:
            sequences = pack_padded_sequence(sequences, lengths.cpu()[rows], enforce_sorted=False)
        out, (h, c) = functional_call(lstm, params, (sequences, (state(h0[rows]), state(c0[rows]))))
        if lengths is not None:
            out, _ = pad_packed_sequence(out, total_length=T)
        output[:, rows], h_n[rows], c_n[rows] = out[..., -H:], h[-1], c[-1]
    return output, (h_n, c_n)


def forward_backward(fn, args, **kwargs):
    """Outputs and the gradients of every input under random upstream gradients."""
    args = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
    x, h0, c0, *weights = args
    output, (h_n, c_n) = fn(x, (h0, c0), *weights, **kwargs)
    g = torch.Generator().manual_seed(1)
    grads_out = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in (output, h_n, c_n)]
    leaves = [a for a in args if a is not None]
    grads = torch.autograd.grad((output, h_n, c_n), leaves, grads_out, allow_unused=True)
    return (output, h_n, c_n), [g if g is not None else torch.zeros_like(a) for g, a in zip(grads, leaves)]


def expected(args, lengths, reverse):
    """torch.nn.LSTM in float64 on the same (already rounded) inputs."""
    args64 = [a.double() if a is not None else None for a in args]

    def run(x, hx, w_ih, w_hh, b_ih, b_hh, lengths, reverse):
        return torch_lstm(x, *hx, w_ih, w_hh, b_ih, b_hh, lengths, reverse)

    return forward_backward(run, args64, lengths=lengths, reverse=reverse)


def check_against_torch(backend, device, dtype, T, B, I, H, lengths_kind, reverse, bias=True):
    args = make_inputs(T, B, I, H, dtype, device, bias)
    lengths = random_lengths(T, B).to(device) if lengths_kind == "random" else None
    outs, grads = forward_backward(lstm_layer, args, lengths=lengths, reverse=reverse, backend=backend)
    ref_outs, ref_grads = expected(args, lengths, reverse)
    for name, out, ref in zip(("output", "h_n", "c_n"), outs, ref_outs):
        assert out.dtype == dtype and out.device.type == torch.device(device).type
        assert_close(out, ref, dtype, device, name)
    names = [n for n, a in zip(NAMES, args) if a is not None]
    for name, grad, ref in zip(names, grads, ref_grads):
        # weight and bias gradients sum over steps and rows
        scale = 1.0 if name in ("input", "h0", "c0") else (T * B) ** 0.5
        assert_close(grad, ref, dtype, device, f"grad {name}", scale=scale)


# (T, B, I, H, lengths, reverse, bias): small enough for the Triton interpreter; B=17 and H=37 cross its block sizes.
CASES = [
    (1, 3, 5, 7, None, False, True),
    (1, 4, 3, 6, "random", True, True),
    (6, 1, 4, 6, None, False, True),
    (6, 1, 4, 6, None, True, True),
    (7, 6, 3, 9, "random", False, True),
    (7, 6, 3, 9, "random", True, True),
    (5, 4, 6, 5, None, True, False),
    (5, 4, 6, 5, "random", False, False),
    (3, 17, 5, 37, "random", True, True),
]


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("T,B,I,H,lengths,reverse,bias", CASES, ids=lambda v: str(v))
def test_matches_torch_lstm(backend, device, dtype, T, B, I, H, lengths, reverse, bias):
    check_against_torch(backend, device, dtype, T, B, I, H, lengths, reverse, bias)


@pytest.mark.parametrize("T,B,I,H,lengths,reverse,bias", CASES, ids=lambda v: str(v))
def test_reference_matches_torch_lstm(T, B, I, H, lengths, reverse, bias):
    check_against_torch("reference", "cpu", torch.float64, T, B, I, H, lengths, reverse, bias)


@pytest.mark.parametrize("backend,dtype", [("reference", torch.float64), ("cpu", torch.float64),
                                           ("cpu", torch.float32)])
@pytest.mark.parametrize("reverse", [False, True])
def test_long_sequences(backend, dtype, reverse):
    if backend not in fastseq2seq.available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    check_against_torch(backend, "cpu", dtype, 1000, 4, 3, 5, "random", reverse)


# The CPU kernel's fp32 loop on an AVX-512 CPU splits the hidden units into panels (16 units forward, 64 backward)
# shared out among threads, and the batch into blocks of 6 rows: these sizes cross every such boundary.
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("T,B,H,lengths,reverse", [(5, 13, 130, "random", False), (4, 7, 200, "random", True),
                                                   (3, 6, 64, None, False), (3, 1, 17, None, True)])
def test_cpu_kernel_across_panel_and_thread_splits(threads, T, B, H, lengths, reverse):
    if "cpu" not in fastseq2seq.available_backends("cpu"):
        pytest.skip("the cpu backend is not built")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_torch("cpu", "cpu", torch.float32, T, B, 11, H, lengths, reverse)
    finally:
        torch.set_num_threads(previous)


def gradcheck_backends():
    backends = ["reference"] + [b for b in ("cpu",) if b in fastseq2seq.available_backends("cpu")]
    return backends + (["triton"] if interpreted_triton() else [])


@pytest.mark.parametrize("backend", gradcheck_backends())
@pytest.mark.parametrize("lengths,reverse", [(None, False), (torch.tensor([3, 0, 2]), False),
                                             (torch.tensor([1, 3, 0]), True)])
def test_gradcheck_float64(backend, lengths, reverse):
    x, h0, c0, *weights = [a.requires_grad_() for a in make_inputs(3, 3, 2, 3, torch.float64, "cpu")]

    def fn(x, h0, c0, *weights):
        output, (h_n, c_n) = lstm_layer(x, (h0, c0), *weights, lengths=lengths, reverse=reverse, backend=backend)
        return output, h_n, c_n

    # fast_mode (a random projection of the Jacobian) keeps the interpreted Triton launches within budget
    assert torch.autograd.gradcheck(fn, (x, h0, c0, *weights), fast_mode=backend == "triton")


def fused_ops():
    ops = [torch.ops.fastseq2seq.lstm_layer_fwd.default] if "cpu" in fastseq2seq.available_backends("cpu") else []
    if interpreted_triton():
        ops.append(torch.ops.fastseq2seq.lstm_layer_fwd_triton.default)
    return ops


@pytest.mark.parametrize("op", fused_ops(), ids=str)
@pytest.mark.parametrize("bias,lengths,reverse", [(True, None, False), (False, torch.tensor([2, 0, 4]), True)])
def test_opcheck(op, bias, lengths, reverse):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = [a.requires_grad_() if a is not None else None
                                         for a in make_inputs(4, 3, 5, 6, torch.float32, "cpu", bias)]
    torch.library.opcheck(op, (x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, reverse))


@pytest.mark.parametrize("lengths,reverse", [(None, False), (torch.tensor([4, 0, 2]), True)])
def test_torch_compile_fullgraph(lengths, reverse):
    args = make_inputs(4, 3, 5, 6, torch.float32, "cpu")

    def fn(x, h0, c0, *weights):
        output, (h_n, c_n) = lstm_layer(x, (h0, c0), *weights, lengths=lengths, reverse=reverse)
        return output, h_n, c_n

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    eager_outs, eager_grads = forward_backward(lambda x, hx, *w, **kw: _pack(fn(x, *hx, *w)), args)
    outs, grads = forward_backward(lambda x, hx, *w, **kw: _pack(compiled(x, *hx, *w)), args)
    for out, ref in zip(outs + tuple(grads), eager_outs + tuple(eager_grads)):
        torch.testing.assert_close(out, ref)


def _pack(outs):
    output, h_n, c_n = outs
    return output, (h_n, c_n)


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
def test_noncontiguous_inputs(backend, device, dtype):
    T, B, I, H = 4, 3, 5, 6
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = make_inputs(T, B, I, H, dtype, device)
    x_batch_first = x.transpose(0, 1).contiguous().transpose(0, 1)  # what a batch_first caller passes
    w_hh_t = w_hh.t().contiguous().t()  # column-major weights
    lengths = torch.tensor([4, 0, 3], device=device)
    out = lstm_layer(x_batch_first, (h0[:1].expand(B, H), c0), w_ih, w_hh_t, b_ih, b_hh, lengths=lengths,
                     backend=backend)
    ref = lstm_layer_reference(x.double(), (h0[:1].expand(B, H).double(), c0.double()), w_ih.double(),
                               w_hh.double(), b_ih.double(), b_hh.double(), lengths=lengths)
    for o, r in zip((out[0], *out[1]), (ref[0], *ref[1])):
        assert_close(o, r, dtype, device)


def all_backends_here():
    return fastseq2seq.available_backends("cpu")


@pytest.mark.parametrize("backend", all_backends_here())
def test_hx_none_means_zeros(backend):
    x, h0, c0, *weights = make_inputs(3, 2, 3, 4, torch.float64, "cpu")
    zeros = torch.zeros_like(h0)
    out = lstm_layer(x, None, *weights, backend=backend)
    ref = lstm_layer_reference(x, (zeros, zeros), *weights)
    for o, r in zip((out[0], *out[1]), (ref[0], *ref[1])):
        torch.testing.assert_close(o, r)


@pytest.mark.parametrize("backend", all_backends_here())
def test_empty_sequence_returns_initial_state(backend):
    """T = 0: an empty output, (h_n, c_n) = hx, and the gradients of h_n, c_n pass straight to hx."""
    x, h0, c0, *weights = make_inputs(0, 2, 3, 4, torch.float64, "cpu")
    h0.requires_grad_()
    c0.requires_grad_()
    output, (h_n, c_n) = lstm_layer(x, (h0, c0), *weights, lengths=torch.zeros(2, dtype=torch.int64),
                                    backend=backend)
    assert output.shape == (0, 2, 4)
    torch.testing.assert_close(h_n, h0)
    torch.testing.assert_close(c_n, c0)
    grad_h, grad_c = torch.randn_like(h0), torch.randn_like(c0)
    torch.testing.assert_close(torch.autograd.grad((h_n, c_n), (h0, c0), (grad_h, grad_c)), (grad_h, grad_c))


@pytest.mark.parametrize("backend", all_backends_here())
@pytest.mark.parametrize("lengths,arg,match", [
    (torch.tensor([2, 5, 1]), "lengths", "<= T"),                        # longer than the input
    (torch.tensor([2, -1, 1]), "lengths", ">= 0"),
    (torch.tensor([2, 1]), "lengths", "shape"),                          # one per row
    (torch.tensor([2, 1, 1], dtype=torch.int32), "lengths", "int64"),
    (torch.tensor([2, 1, 1], device="meta"), "lengths", "is on meta"),   # not on input's device
    ([2, 1, 1], "lengths", "tensor"),
])
def test_bad_lengths_name_the_argument(backend, lengths, arg, match):
    x, h0, c0, *weights = make_inputs(4, 3, 2, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match=f"'{arg}'.*{match}"):
        lstm_layer(x, (h0, c0), *weights, lengths=lengths, backend=backend)


@pytest.mark.parametrize("backend", all_backends_here())
@pytest.mark.parametrize("mutate,arg", LSTM_BAD_INPUTS)
def test_bad_input_names_the_argument(backend, mutate, arg):
    args = make_inputs(4, 3, 2, 3, torch.float32, "cpu")
    mutate(args)
    x, h0, c0, *weights = args
    with pytest.raises((ValueError, RuntimeError), match=f"'{arg}'".replace("[", r"\[").replace("]", r"\]")):
        lstm_layer(x, (h0, c0), *weights, backend=backend)


@pytest.mark.skipif("cpu" not in fastseq2seq.available_backends("cpu"), reason="the C++ extension is not built")
@pytest.mark.parametrize("lengths,match", [(torch.tensor([2, 5, 1]), "<= T"), (torch.tensor([2, -1, 1]), ">= 0")])
def test_cpp_kernel_checks_lengths_values(lengths, match):
    """The C++ op checks the values itself: it is reachable without the Python checks (torch.ops, compile)."""
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = make_inputs(4, 3, 2, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match=f"'lengths'.*{match}"):
        torch.ops.fastseq2seq.lstm_layer_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths, False)
