"""lstm_cell: every fused backend vs torch.nn.LSTMCell (eager) and torch.compile of the reference, forward and
forward+backward, I = H. One more case runs LOOP_STEPS forward+backward calls with the same weights, as a decoder
loop does; there the cpu backend also runs inside one `constant_weights()` scope (each weight packed once for the
loop), something the baselines have no use for (MKL repacks at every call)."""
import contextlib

import torch

from fastseq2seq.benchmarks.costs import Cost, lstm_cell_cost
from fastseq2seq.benchmarks.runner import measure, our_backends
from fastseq2seq.benchmarks.timing import Candidate, forward_backward, forward_only
from fastseq2seq.ops import constant_weights, lstm_cell, lstm_cell_reference

NAME = "lstm_cell"
REPEATS = 30
GRID = {"B": [8, 64, 256], "H": [256, 512, 1024]}
QUICK_GRID = {"B": [64], "H": [512]}
LOOP_STEPS = 10


def add_arguments(parser):
    parser.add_argument("--B", type=int, nargs="+", help=f"batch sizes (default {GRID['B']}; quick {QUICK_GRID['B']})")
    parser.add_argument("--H", type=int, nargs="+", help=f"hidden sizes (default {GRID['H']}; quick {QUICK_GRID['H']})")


def candidates(B, H, dtype, device, backward, compiled_reference, seed, loop_steps=1):
    g = torch.Generator().manual_seed(seed)
    cell = torch.nn.LSTMCell(H, H, device=device, dtype=dtype)
    x, h, c = (torch.randn(B, H, generator=g).to(device, dtype).requires_grad_(backward) for _ in range(3))
    params = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)

    def step(fn, scope=contextlib.nullcontext):
        one = forward_backward(fn, (x, h, c) + params) if backward else forward_only(fn)
        if loop_steps == 1:
            return one

        def loop():
            with scope():
                for _ in range(loop_steps):
                    one()
        return loop

    found = {"nn.LSTMCell": Candidate(step(lambda: cell(x, (h, c))))}
    if compiled_reference is not None:
        found["compile(reference)"] = Candidate(step(lambda: compiled_reference(x, (h, c), *params)))
    for backend in our_backends(device):
        found[f"fastseq2seq[{backend}]"] = Candidate(
            step(lambda b=backend: lstm_cell(x, (h, c), *params, backend=b)), ours=True)
    if loop_steps > 1 and "cpu" in our_backends(device):
        found["fastseq2seq[cpu], constant_weights()"] = Candidate(
            step(lambda: lstm_cell(x, (h, c), *params, backend="cpu"), constant_weights), ours=True)
    return found


def run(bench, options):
    grid = QUICK_GRID if bench.quick else GRID
    # dynamic=True: one compilation serves every shape
    compiled_reference = torch.compile(lstm_cell_reference, dynamic=True) if bench.compile else None
    rows = []
    for backward in (False, True):
        for B in options.B or grid["B"]:
            for H in options.H or grid["H"]:
                rows += measure(
                    bench, NAME, {"pass": "fwd+bwd" if backward else "fwd", "B": B, "H": H},
                    lambda seed: candidates(B, H, bench.dtype, bench.device, backward, compiled_reference, seed),
                    repeats=REPEATS, cost=lstm_cell_cost(B, H, H, itemsize=bench.itemsize, backward=backward))
    for B in options.B or grid["B"]:
        for H in options.H or grid["H"]:
            one = lstm_cell_cost(B, H, H, itemsize=bench.itemsize, backward=True)
            rows += measure(
                bench, NAME, {"pass": f"fwd+bwd x{LOOP_STEPS}, same weights", "B": B, "H": H},
                lambda seed: candidates(B, H, bench.dtype, bench.device, True, compiled_reference, seed, LOOP_STEPS),
                repeats=max(3, REPEATS // LOOP_STEPS), cost=Cost(one.flops * LOOP_STEPS, one.bytes * LOOP_STEPS))
    return rows
