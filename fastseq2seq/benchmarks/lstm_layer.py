"""lstm_layer: every fused backend vs torch.nn.LSTM (cuDNN on GPU, oneDNN on CPU), the nn.LSTMCell Python loop,
torch.compile of the reference loop and, on GPU, the flashrnn package where it is installed; forward and
forward+backward, without and with random lengths (nn.LSTM then runs on a PackedSequence, packing and unpacking
timed with it; the loops mask per step). I = H. On GPU, each recurrence path that FASTSEQ2SEQ_LSTM_RECURRENCE can
select gets its own row next to the default ("auto") one; a path the build does not offer is skipped with a note.
flashrnn compiles its CUDA kernels on first use, inside the warm-up (minutes the first time on a machine)."""
import os

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastseq2seq.benchmarks.costs import lstm_layer_cost
from fastseq2seq.benchmarks.runner import measure, our_backends
from fastseq2seq.benchmarks.timing import Candidate, forward_backward, forward_only
from fastseq2seq.ops import lstm_layer, lstm_layer_reference

NAME = "lstm_layer"
REPEATS = 15
# Every T x B x H without lengths; with random lengths, every B at lengths_T x lengths_H (the targets' T and H).
GRID = {"cuda": {"T": [50, 100, 500], "B": [8, 64, 256], "H": [256, 512, 1024], "lengths_T": [100], "lengths_H": [512]},
        # on 2 CPU cores T=500 or H=1024 take minutes a case: the targets' shapes and their neighbours
        "cpu": {"T": [50], "B": [8, 64], "H": [256, 512], "lengths_T": [50], "lengths_H": [512]}}
QUICK_GRID = {"T": [20], "B": [64], "H": [256], "lengths_T": [], "lengths_H": []}
# torch.compile unrolls the reference loop: its compile time grows with T (minutes for T=100 forward+backward)
COMPILE_MAX_T = 50
RECURRENCE_VARIABLE = "FASTSEQ2SEQ_LSTM_RECURRENCE"
RECURRENCE_PATHS = {"cuda": ("per-step", "persistent"), "triton": ("per-step", "graph", "persistent")}
FLASHRNN_BACKENDS = ("cuda_fused", "cuda")


def add_arguments(parser):
    parser.add_argument("--T", type=int, nargs="+", help="sequence lengths")
    parser.add_argument("--B", type=int, nargs="+", help="batch sizes")
    parser.add_argument("--H", type=int, nargs="+", help="hidden sizes, also the input size")
    parser.add_argument("--lengths", choices=("none", "random", "both"),
                        help="without / with random lengths (default: both, with lengths at fewer shapes)")
    parser.add_argument("--passes", choices=("fwd", "fwd+bwd", "both"), default="both")


def cell_loop(cell, x, hx, lengths):
    """The plain PyTorch way: nn.LSTMCell called once per step from Python, masked past each row's length."""
    h, c = hx
    outputs = []
    for t in range(x.shape[0]):
        h_new, c_new = cell(x[t], (h, c))
        if lengths is not None:
            valid = (lengths > t).unsqueeze(1)
            h_new, c_new = torch.where(valid, h_new, h), torch.where(valid, c_new, c)
            outputs.append(h_new * valid)
        else:
            outputs.append(h_new)
        h, c = h_new, c_new
    return torch.stack(outputs), (h, c)


def nn_lstm(lstm, x, hx, lengths):
    h0, c0 = hx
    if lengths is None:
        return lstm(x, (h0[None], c0[None]))
    packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
    out, (h, c) = lstm(packed, (h0[None], c0[None]))
    return pad_packed_sequence(out, total_length=x.shape[0])[0], (h, c)


def flashrnn_lstm(flashrnn, backend, x, hx, w_ih, w_hh, bias):
    """flashrnn's LSTM (one head of size H) with the input projection it leaves to the caller. Its gate layout
    differs from torch's: the same work on the same sizes, not the same numbers."""
    T, B, _ = x.shape
    H = w_hh.shape[1]
    wx = torch.matmul(x.transpose(0, 1), w_ih.t()).view(B, T, 4, 1, H)
    states = torch.stack(hx).view(2, B, 1, 1, H)
    out, _ = flashrnn(wx, w_hh.view(4, 1, H, H), bias.view(4, 1, H), states=states, function="lstm",
                      backend=backend)
    return out[0]


def with_recurrence(path, fn):
    """fn run with FASTSEQ2SEQ_LSTM_RECURRENCE=path (forward and backward), the variable restored after."""
    def run():
        before = os.environ.get(RECURRENCE_VARIABLE)
        os.environ[RECURRENCE_VARIABLE] = path
        try:
            return fn()
        finally:
            if before is None:
                del os.environ[RECURRENCE_VARIABLE]
            else:
                os.environ[RECURRENCE_VARIABLE] = before
    return run


def _flashrnn():
    try:
        from flashrnn import flashrnn
    except ImportError:
        return None
    return flashrnn


def random_lengths(T, B):
    """The same lengths for every input set, so that every round does the same work; each >= 1, as
    pack_padded_sequence needs."""
    return torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(T * B))


def candidates(T, B, H, dtype, device, backward, lengths, compiled_reference, seed):
    g = torch.Generator().manual_seed(seed)
    lstm = torch.nn.LSTM(H, H, device=device, dtype=dtype)
    cell = torch.nn.LSTMCell(H, H, device=device, dtype=dtype)
    params = (lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)
    with torch.no_grad():
        for mine, theirs in zip((cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh), params):
            mine.copy_(theirs)
    x, h0, c0 = (t.to(device, dtype).requires_grad_(backward) for t in (
        torch.randn(T, B, H, generator=g), torch.randn(B, H, generator=g), torch.randn(B, H, generator=g)))
    lengths = lengths.to(device) if lengths is not None else None
    inputs = (x, h0, c0) + params
    cell_inputs = (x, h0, c0, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)

    def step(fn, wrt=inputs):
        return forward_backward(fn, wrt) if backward else forward_only(fn)

    found = {"nn.LSTM": Candidate(step(lambda: nn_lstm(lstm, x, (h0, c0), lengths))),
             "nn.LSTMCell loop": Candidate(step(lambda: cell_loop(cell, x, (h0, c0), lengths), cell_inputs))}
    if compiled_reference is not None and T <= COMPILE_MAX_T:
        found["compile(reference)"] = Candidate(step(lambda: compiled_reference(x, (h0, c0), *params,
                                                                                 lengths=lengths)))
    flashrnn = _flashrnn() if torch.device(device).type == "cuda" and lengths is None else None
    if flashrnn is not None:
        bias = (params[2] + params[3]).detach().requires_grad_(backward)
        for backend in FLASHRNN_BACKENDS:
            found[f"flashrnn[{backend}]"] = Candidate(step(
                lambda b=backend: flashrnn_lstm(flashrnn, b, x, (h0, c0), params[0], params[1], bias),
                (x, h0, c0, params[0], params[1], bias)), optional=True)
    for backend in our_backends(device):
        def ours(b=backend):
            return lstm_layer(x, (h0, c0), *params, lengths=lengths, backend=b)
        if torch.device(device).type != "cuda":
            found[f"fastseq2seq[{backend}]"] = Candidate(step(ours), ours=True)
            continue
        # the default row is "auto" whatever the caller's environment says
        found[f"fastseq2seq[{backend}]"] = Candidate(with_recurrence("auto", step(ours)), ours=True)
        for path in RECURRENCE_PATHS.get(backend, ()):
            found[f"fastseq2seq[{backend}, {path}]"] = Candidate(with_recurrence(path, step(ours)), ours=True,
                                                                 optional=True)
    return found


def shapes(bench, options):
    """[(with_lengths, T, B, H)]: the grid without lengths, then the random-lengths cases (at one T and H unless
    --T / --H / --lengths ask otherwise)."""
    grid = QUICK_GRID if bench.quick else GRID[bench.device_type]
    with_lengths = {None: [False, True], "none": [False], "random": [True], "both": [False, True]}[options.lengths]
    found = []
    for lengths in with_lengths:
        for T in options.T or (grid["T"] if not lengths else grid["lengths_T"]):
            for B in options.B or grid["B"]:
                for H in options.H or (grid["H"] if not lengths else grid["lengths_H"]):
                    found.append((lengths, T, B, H))
    return found


def run(bench, options):
    passes = {"fwd": [False], "fwd+bwd": [True], "both": [False, True]}[options.passes]
    # dynamic=True: one compilation serves every B and H (T stays static: the reference loop unrolls it)
    compiled_reference = torch.compile(lstm_layer_reference, dynamic=True) if bench.compile else None
    rows = []
    for with_lengths, T, B, H in shapes(bench, options):
        lengths = random_lengths(T, B) if with_lengths else None
        for backward in passes:
            rows += measure(
                bench, NAME, {"pass": "fwd+bwd" if backward else "fwd", "lengths": "random" if with_lengths else "none",
                              "T": T, "B": B, "H": H},
                lambda seed: candidates(T, B, H, bench.dtype, bench.device, backward, lengths, compiled_reference,
                                        seed),
                repeats=REPEATS, memory=backward,
                cost=lstm_layer_cost(T, B, H, H, itemsize=bench.itemsize, backward=backward,
                                     steps=None if lengths is None else int(lengths.sum())))
    return rows
