"""lstm_cell: every fastseq2seq backend vs torch.nn.LSTMCell (eager) and torch.compile of the reference.

  python bench/bench_lstm_cell.py [--device cpu|cuda] [--dtype float32|bfloat16|...] [--B 8 64] [--H 512]
                                  [--no-compile] [--quick] [--json PATH]
Times are medians of alternated runs after warm-up; ratios are baseline time / our time (> 1: we are faster).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import bench_dtype, bench_parser, print_table, save_json, time_alternating, without_grad  # noqa: E402

import fastseq2seq  # noqa: E402
from fastseq2seq.ops import lstm_cell, lstm_cell_reference  # noqa: E402


def candidates(B, H, dtype, device, backward, compile_reference):
    g = torch.Generator(device="cpu").manual_seed(0)
    cell = torch.nn.LSTMCell(H, H, device=device, dtype=dtype)
    x = torch.randn(B, H, generator=g).to(device, dtype).requires_grad_(backward)
    h = torch.randn(B, H, generator=g).to(device, dtype).requires_grad_(backward)
    c = torch.randn(B, H, generator=g).to(device, dtype).requires_grad_(backward)
    grads = (torch.randn(B, H, generator=g).to(device, dtype), torch.randn(B, H, generator=g).to(device, dtype))
    params = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    inputs = (x, h, c) + params

    def step(fn):
        if not backward:
            return without_grad(fn)
        return lambda: torch.autograd.grad(fn(), inputs, grads)

    found = {"nn.LSTMCell": step(lambda: cell(x, (h, c)))}
    if compile_reference:
        ref = torch.compile(lstm_cell_reference, dynamic=False)
        found["compile(reference)"] = step(lambda: ref(x, (h, c), *params))
    for backend in fastseq2seq.available_backends(device):
        if backend != "reference":
            found[f"fastseq2seq[{backend}]"] = step(lambda b=backend: lstm_cell(x, (h, c), *params, backend=b))
    return found


def main(argv=None):
    p = bench_parser(__doc__, repeats=30, quick="B=64, H=512 only, few repeats")
    p.add_argument("--B", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--H", type=int, nargs="+", default=[256, 512, 1024])
    args = p.parse_args(argv)
    dtype = bench_dtype(args)
    if args.quick:
        args.B, args.H, args.repeats = [64], [512], 10
    rows = []
    for backward in (False, True):
        for B in args.B:
            for H in args.H:
                found = candidates(B, H, dtype, args.device, backward, not args.no_compile)
                stats = time_alternating(found, args.device, repeats=args.repeats)
                base = stats["nn.LSTMCell"]["median_ms"]
                for name, s in stats.items():
                    rows.append({"pass": "fwd+bwd" if backward else "fwd", "B": B, "H": H, "impl": name,
                                 **s, "vs_nn": base / s["median_ms"]})
    print(f"lstm_cell, {args.device}, {dtype}, I=H")
    table = print_table(rows, [("pass", "pass", "{}"), ("B", "B", "{}"), ("H", "H", "{}"), ("impl", "impl", "{}"),
                               ("median_ms", "median ms", "{:.3f}"), ("min_ms", "min", "{:.3f}"),
                               ("max_ms", "max", "{:.3f}"), ("vs_nn", "nn.LSTMCell / this", "{:.2f}x")])
    if args.json:
        save_json(args.json, args.device, rows, op="lstm_cell", dtype=str(dtype), table=table)
    return rows


if __name__ == "__main__":
    main()
