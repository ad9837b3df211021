"""lstm_module: the overhead of the drop-in module fastseq2seq.nn.LSTM over the raw lstm_layer op calls it makes,
next to torch.nn.LSTM; "overhead" = module time / raw-op time - 1 (target: <= 5% at T=50, B=64, H=512)."""
import torch

from fastseq2seq.benchmarks.runner import measure
from fastseq2seq.benchmarks.timing import Candidate, forward_backward, forward_only
from fastseq2seq.nn import LSTM
from fastseq2seq.ops import lstm_layer

NAME = "lstm_module"
REPEATS = 20
RAW, MODULE = "raw lstm_layer ops", "fastseq2seq.nn.LSTM"


def add_arguments(parser):
    parser.add_argument("--T", type=int, help="sequence length (default 50; quick 20)")
    parser.add_argument("--B", type=int, default=64)
    parser.add_argument("--H", type=int, default=512)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--bidirectional", action="store_true")


def candidates(T, B, H, layers, bidirectional, dtype, device, backward, seed):
    torch.manual_seed(seed)
    module = LSTM(H, H, num_layers=layers, bidirectional=bidirectional, device=device, dtype=dtype)
    plain = torch.nn.LSTM(H, H, num_layers=layers, bidirectional=bidirectional, device=device, dtype=dtype)
    plain.load_state_dict(module.state_dict())
    x = torch.randn(T, B, H, device=device, dtype=dtype, requires_grad=backward)
    directions = 2 if bidirectional else 1
    zeros = torch.zeros(B, H, device=device, dtype=dtype)  # the module's own initial state when hx is not given

    def raw_ops():
        inp = x
        for layer in range(layers):
            outs = [lstm_layer(inp, (zeros, zeros), *[getattr(module, n) for n in
                                                      module._all_weights[layer * directions + d]],
                               reverse=d == 1)[0] for d in range(directions)]
            inp = outs[0] if directions == 1 else torch.cat(outs, 2)
        return inp

    def step(fn, parameters):
        return forward_backward(fn, (x, *parameters)) if backward else forward_only(fn)

    return {"torch.nn.LSTM": Candidate(step(lambda: plain(x)[0], plain.parameters())),
            RAW: Candidate(step(raw_ops, module.parameters())),
            MODULE: Candidate(step(lambda: module(x)[0], module.parameters()), ours=True)}


def run(bench, options):
    T = options.T or (20 if bench.quick else 50)
    directions = 2 if options.bidirectional else 1
    weights = sum(directions * 4 * options.H * ((options.H if layer == 0 else directions * options.H) + options.H + 2)
                  for layer in range(options.layers))
    rows = []
    for backward in (False, True):
        case = {"pass": "fwd+bwd" if backward else "fwd", "T": T, "B": options.B, "H": options.H,
                "layers": options.layers, "bidirectional": options.bidirectional}
        rows += measure(bench, NAME, case,
                        lambda seed: candidates(T, options.B, options.H, options.layers, options.bidirectional,
                                                bench.dtype, bench.device, backward, seed), repeats=REPEATS,
                        working_set_bytes=(T * options.B * options.H + weights) * bench.itemsize)
    for row in rows:
        if row["impl"] == MODULE:
            row["overhead"] = 1 / row["speedup"][RAW] - 1
    return rows
