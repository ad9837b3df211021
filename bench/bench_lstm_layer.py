"""lstm_layer: every fastseq2seq backend vs torch.nn.LSTM (cuDNN on GPU, oneDNN/MKL on CPU), the nn.LSTMCell Python
loop and torch.compile of the reference loop, forward and forward+backward, without and with random lengths.

  python bench/bench_lstm_layer.py [--device cpu|cuda] [--dtype float32|bfloat16|...] [--T 50] [--B 8 64] [--H 512]
                                   [--lengths none|random|both] [--no-compile] [--quick] [--json PATH]
I = H. Times are medians of alternated runs after warm-up; ratios are nn.LSTM time / this time (> 1: we are faster).
With lengths, nn.LSTM runs on a PackedSequence (packing and unpacking timed with it) and the loops mask per step.
"peak MiB" is the peak device memory of one training step (forward+backward), CUDA only.
"""
import os
import sys

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import bench_dtype, bench_parser, peak_memory_bytes, print_table, save_json, time_alternating  # noqa: E402

import fastseq2seq  # noqa: E402
from fastseq2seq.ops import lstm_layer, lstm_layer_reference  # noqa: E402

# torch.compile unrolls the reference loop: compile time grows with T, so longer sequences skip that baseline.
COMPILE_MAX_T = 100


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


def candidates(T, B, H, dtype, device, backward, with_lengths, compile_reference):
    g = torch.Generator(device="cpu").manual_seed(0)
    lstm = torch.nn.LSTM(H, H, device=device, dtype=dtype)
    cell = torch.nn.LSTMCell(H, H, device=device, dtype=dtype)
    params = (lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)
    with torch.no_grad():
        for mine, theirs in zip((cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh), params):
            mine.copy_(theirs)
    x = torch.randn(T, B, H, generator=g).to(device, dtype).requires_grad_(backward)
    h0 = torch.randn(B, H, generator=g).to(device, dtype).requires_grad_(backward)
    c0 = torch.randn(B, H, generator=g).to(device, dtype).requires_grad_(backward)
    # pack_padded_sequence needs every length >= 1
    lengths = torch.randint(1, T + 1, (B,), generator=g).to(device) if with_lengths else None
    grad_out = torch.randn(T, B, H, generator=g).to(device, dtype)
    inputs = (x, h0, c0) + params
    cell_inputs = (x, h0, c0, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)

    def step(fn, wrt=inputs):
        if not backward:
            def run():
                with torch.no_grad():
                    fn()
            return run
        return lambda: torch.autograd.grad(fn()[0], wrt, grad_out)

    found = {"nn.LSTM": step(lambda: nn_lstm(lstm, x, (h0, c0), lengths)),
             "nn.LSTMCell loop": step(lambda: cell_loop(cell, x, (h0, c0), lengths), cell_inputs)}
    if compile_reference and T <= COMPILE_MAX_T:
        ref = torch.compile(lstm_layer_reference, dynamic=False)
        found["compile(reference)"] = step(lambda: ref(x, (h0, c0), *params, lengths=lengths))
    for backend in fastseq2seq.available_backends(device):
        if backend != "reference":
            found[f"fastseq2seq[{backend}]"] = step(
                lambda b=backend: lstm_layer(x, (h0, c0), *params, lengths=lengths, backend=b))
    return found


def main(argv=None):
    p = bench_parser(__doc__, repeats=15, quick="T=50, B=64, H=512, no lengths, few repeats")
    p.add_argument("--T", type=int, nargs="+", default=[50, 100, 500])
    p.add_argument("--B", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--H", type=int, nargs="+", default=[256, 512, 1024], help="hidden size, also the input size")
    p.add_argument("--lengths", choices=("none", "random", "both"), default="both")
    p.add_argument("--passes", choices=("fwd", "fwd+bwd", "both"), default="both")
    args = p.parse_args(argv)
    dtype = bench_dtype(args)
    if args.quick:
        args.T, args.B, args.H, args.lengths, args.repeats = [50], [64], [512], "none", 5
    passes = {"fwd": [False], "fwd+bwd": [True], "both": [False, True]}[args.passes]
    length_modes = {"none": [False], "random": [True], "both": [False, True]}[args.lengths]
    rows = []
    for with_lengths in length_modes:
        for backward in passes:
            for T in args.T:
                for B in args.B:
                    for H in args.H:
                        found = candidates(T, B, H, dtype, args.device, backward, with_lengths, not args.no_compile)
                        stats = time_alternating(found, args.device, repeats=args.repeats)
                        base = stats["nn.LSTM"]["median_ms"]
                        for name, s in stats.items():
                            peak = peak_memory_bytes(found[name], args.device) if backward else None
                            rows.append({"pass": "fwd+bwd" if backward else "fwd", "lengths": with_lengths, "T": T,
                                         "B": B, "H": H, "impl": name, **s, "vs_nn": base / s["median_ms"],
                                         "peak_mib": peak / 2 ** 20 if peak is not None else None})
    print(f"lstm_layer, {args.device}, {dtype}, I=H, {torch.get_num_threads()} CPU threads")
    table = print_table(rows, [("pass", "pass", "{}"), ("lengths", "lengths", "{}"), ("T", "T", "{}"),
                               ("B", "B", "{}"), ("H", "H", "{}"), ("impl", "impl", "{}"),
                               ("median_ms", "median ms", "{:.2f}"), ("q1_ms", "q1", "{:.2f}"),
                               ("q3_ms", "q3", "{:.2f}"), ("vs_nn", "nn.LSTM / this", "{:.2f}x"),
                               ("peak_mib", "peak MiB", "{:.1f}")])
    if args.json:
        save_json(args.json, args.device, rows, op="lstm_layer", dtype=str(dtype), table=table)
    return rows


if __name__ == "__main__":
    main()
