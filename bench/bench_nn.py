"""Module overhead: fastseq2seq.nn.LSTM vs the raw lstm_layer op calls it makes, and vs torch.nn.LSTM.

  python bench/bench_nn.py [--device cpu|cuda] [--dtype ...] [--T 50] [--B 64] [--H 512] [--layers 1]
                           [--bidirectional] [--quick] [--json PATH]
"module overhead" = module time / raw-op time - 1 (target: <= 5% at B=64, H=512).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import bench_dtype, bench_parser, print_table, save_json, time_alternating, without_grad  # noqa: E402

from fastseq2seq.nn import LSTM  # noqa: E402
from fastseq2seq.ops import lstm_layer  # noqa: E402


def candidates(T, B, H, layers, bidirectional, dtype, device, backward):
    torch.manual_seed(0)
    module = LSTM(H, H, num_layers=layers, bidirectional=bidirectional, device=device, dtype=dtype)
    plain = torch.nn.LSTM(H, H, num_layers=layers, bidirectional=bidirectional, device=device, dtype=dtype)
    plain.load_state_dict(module.state_dict())
    x = torch.randn(T, B, H, device=device, dtype=dtype, requires_grad=backward)
    D = 2 if bidirectional else 1
    zeros = torch.zeros(B, H, device=device, dtype=dtype)

    def raw_ops():
        inp = x
        for layer in range(layers):
            outs = [lstm_layer(inp, (zeros, zeros), *[getattr(module, n) for n in module._all_weights[layer * D + d]],
                               reverse=d == 1)[0] for d in range(D)]
            inp = outs[0] if D == 1 else torch.cat(outs, 2)
        return inp

    def step(fn):
        if not backward:
            return without_grad(fn)
        return lambda: fn().sum().backward()

    return {"torch.nn.LSTM": step(lambda: plain(x)[0]), "raw lstm_layer ops": step(raw_ops),
            "fastseq2seq.nn.LSTM": step(lambda: module(x)[0])}


def main(argv=None):
    p = bench_parser(__doc__, repeats=20, quick="T=20, few repeats")
    p.add_argument("--T", type=int, default=50)
    p.add_argument("--B", type=int, default=64)
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--bidirectional", action="store_true")
    args = p.parse_args(argv)
    dtype = bench_dtype(args)
    if args.quick:
        args.T, args.repeats = 20, 10
    rows = []
    for backward in (False, True):
        found = candidates(args.T, args.B, args.H, args.layers, args.bidirectional, dtype, args.device, backward)
        stats = time_alternating(found, args.device, repeats=args.repeats)
        raw = stats["raw lstm_layer ops"]["median_ms"]
        for name, s in stats.items():
            rows.append({"pass": "fwd+bwd" if backward else "fwd", "impl": name, **s,
                         "overhead": s["median_ms"] / raw - 1 if name == "fastseq2seq.nn.LSTM" else None})
    print(f"nn.LSTM module overhead, {args.device}, {dtype}, T={args.T} B={args.B} H={args.H} layers={args.layers}"
          f"{' bidirectional' if args.bidirectional else ''}")
    table = print_table(rows, [("pass", "pass", "{}"), ("impl", "impl", "{}"), ("median_ms", "median ms", "{:.3f}"),
                               ("min_ms", "min", "{:.3f}"), ("max_ms", "max", "{:.3f}"),
                               ("overhead", "module overhead", "{:+.1%}")])
    if args.json:
        save_json(args.json, args.device, rows, op="nn.LSTM", dtype=str(dtype), table=table)
    return rows


if __name__ == "__main__":
    main()
