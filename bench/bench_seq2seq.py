"""Seq2Seq: training step and greedy / beam-5 decoding, fastseq2seq vs the plain-PyTorch model and torch.compile of it.

  python bench/bench_seq2seq.py [--device cpu|cuda] [--dtype float32|bfloat16] [--threads N] [--no-compile]
                                [--quick] [--json PATH]
The plain-PyTorch model is the same Seq2Seq with its LSTMs reverted to torch.nn.LSTM / LSTMCell (cuDNN / oneDNN
encoder, eager LSTMCell decoder loop) and the attention on the `reference` backend (the naive torch chain): how
OpenNMT-py, fairseq and Joey NMT run this model. Its torch.compile variant compiles the model's forward (training)
and its decoder step (decoding). Decoding runs a random model for exactly max_len = T steps, so every candidate
does the same work. Times are medians of alternated runs after warm-up; ratios are plain time / this time.
"""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import bench_dtype, bench_parser, print_table, save_json, time_alternating  # noqa: E402

import fastseq2seq  # noqa: E402
from fastseq2seq.models import Seq2Seq, sequence_loss  # noqa: E402

PLAIN = "plain PyTorch"
COMPILED = "compile(plain)"
OURS = "fastseq2seq"


def make_batch(B, S, T, vocab, device):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(S // 2, S + 1, (B,), generator=g)
    lengths[0] = S
    src = torch.randint(3, vocab, (B, S), generator=g).masked_fill(torch.arange(S) >= lengths[:, None], 0)
    tgt = torch.randint(3, vocab, (B, T + 1), generator=g)
    tgt[:, 0] = 1
    return src.to(device), lengths.to(device), tgt[:, :-1].to(device), tgt[:, 1:].to(device)


def plain_copy(model):
    return fastseq2seq.revert_lstm(copy.deepcopy(model))


def on_reference_attention(fn):
    def run():
        with fastseq2seq.use_backend("reference"):
            return fn()
    return run


def training_candidates(model, batch, compile_plain):
    src, lengths, tgt_in, tgt_out = batch

    def train_step(module):
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)

        def step():
            loss, _ = sequence_loss(module(src, lengths, tgt_in), tgt_out, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    found = {PLAIN: on_reference_attention(train_step(plain_copy(model))), OURS: train_step(copy.deepcopy(model))}
    if compile_plain:
        found[COMPILED] = on_reference_attention(train_step(torch.compile(plain_copy(model))))
    return found


def decoding_candidates(model, batch, compile_plain, decode):
    src, lengths, tgt_in, _ = batch
    T = tgt_in.shape[1]
    plain, ours = plain_copy(model).eval(), copy.deepcopy(model).eval()
    found = {PLAIN: on_reference_attention(lambda: decode(plain, src, lengths, T)),
             OURS: lambda: decode(ours, src, lengths, T)}
    if compile_plain:
        compiled = plain_copy(model).eval()
        compiled.decode_step = torch.compile(compiled.decode_step)
        found[COMPILED] = on_reference_attention(lambda: decode(compiled, src, lengths, T))
    return found


def main(argv=None):
    p = bench_parser(__doc__, repeats=10, quick="few repeats")
    p.add_argument("--B", type=int, default=64)
    p.add_argument("--S", type=int, default=30)
    p.add_argument("--T", type=int, default=30)
    p.add_argument("--emb", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--attention", default="bahdanau", choices=["bahdanau", "luong-dot", "luong-general"])
    p.add_argument("--no-input-feeding", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = bench_dtype(args)
    repeats = 3 if args.quick else args.repeats
    torch.manual_seed(0)
    model = Seq2Seq(args.vocab, args.vocab, emb_dim=args.emb, hidden_size=args.hidden, attention=args.attention,
                    input_feeding=not args.no_input_feeding).to(args.device, dtype)
    batch = make_batch(args.B, args.S, args.T, args.vocab, args.device)
    tasks = {
        "train step": (training_candidates(model, batch, not args.no_compile), args.B * args.T, "target tok/s"),
        "greedy": (decoding_candidates(model, batch, not args.no_compile,
                                       lambda m, s, l, T: m.greedy(s, l, max_len=T)), args.B, "sentences/s"),
        "beam 5": (decoding_candidates(model, batch, not args.no_compile,
                                       lambda m, s, l, T: m.beam_search(s, l, beam_size=5, max_len=T)),
                   args.B, "sentences/s"),
    }
    rows = []
    for task, (found, units, unit_name) in tasks.items():
        stats = time_alternating(found, args.device, repeats=repeats, warmup=2)
        base = stats[PLAIN]["median_ms"]
        for name, s in stats.items():
            rows.append({"task": task, "impl": name, **s, "throughput": units / (s["median_ms"] / 1e3),
                         "unit": unit_name, "vs_plain": base / s["median_ms"]})
    print(f"Seq2Seq ({args.attention}, input feeding {not args.no_input_feeding}), {args.device}, {dtype}, "
          f"{torch.get_num_threads()} threads, B={args.B} S={args.S} T={args.T} emb={args.emb} "
          f"hidden={args.hidden} vocab={args.vocab}")
    table = print_table(rows, [("task", "task", "{}"), ("impl", "impl", "{}"), ("median_ms", "median ms", "{:.1f}"),
                               ("min_ms", "min", "{:.1f}"), ("max_ms", "max", "{:.1f}"),
                               ("throughput", "throughput", "{:.0f}"), ("unit", "unit", "{}"),
                               ("vs_plain", "plain / this", "{:.2f}x")])
    if args.json:
        save_json(args.json, args.device, rows, model="seq2seq", dtype=str(dtype), table=table, args=vars(args))
    return rows


if __name__ == "__main__":
    main()
