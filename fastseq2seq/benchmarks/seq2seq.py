"""Seq2Seq: the training step (forward, backward, Adam) in target tokens/s and greedy / beam-5 decoding in sentences/s,
fastseq2seq vs the plain-PyTorch model and torch.compile of it.

The plain-PyTorch model is the same Seq2Seq with its LSTMs reverted to torch.nn.LSTM / LSTMCell (cuDNN / oneDNN
encoder, eager LSTMCell decoder loop) and the attention on the `reference` backend (the naive torch chain): how
OpenNMT-py, fairseq and Joey NMT run this model. Its torch.compile variant compiles the model's forward (training)
and its decoder step (decoding). Decoding runs a random model for exactly max_len = T steps, so every candidate does
the same work; on a GPU our decoders also run with cuda_graph=True (steps replayed from a CUDA graph)."""
import copy

import torch

import fastseq2seq
from fastseq2seq.benchmarks.runner import measure
from fastseq2seq.benchmarks.timing import Candidate
from fastseq2seq.models import Seq2Seq, sequence_loss
from fastseq2seq.ops import constant_weights

NAME = "seq2seq"
REPEATS = 10
MODEL = {"B": 64, "S": 30, "T": 30, "emb": 256, "hidden": 512, "vocab": 8000}
QUICK_MODEL = {"B": 16, "S": 12, "T": 12, "emb": 64, "hidden": 128, "vocab": 1000}
PLAIN, COMPILED, OURS, OURS_GRAPH = "plain PyTorch", "compile(plain)", "fastseq2seq", "fastseq2seq, CUDA graph"
TASKS = ("train step", "greedy", "beam 5")
BEAM_SIZE = 5


def add_model_arguments(parser):
    """The model and batch options shared with the decoder-step benchmark (defaults: MODEL, QUICK_MODEL)."""
    for key, help_text in (("B", "batch size"), ("S", "source length"), ("emb", "embedding size"),
                           ("hidden", "hidden size"), ("vocab", "vocabulary size (source and target)")):
        parser.add_argument(f"--{key}", type=int, help=f"{help_text} (default {MODEL[key]}; quick {QUICK_MODEL[key]})")
    parser.add_argument("--attention", nargs="+", choices=["bahdanau", "luong-dot", "luong-general"])
    parser.add_argument("--no-input-feeding", action="store_true")


def add_arguments(parser):
    add_model_arguments(parser)
    parser.add_argument("--T", type=int, help=f"target length (default {MODEL['T']}; quick {QUICK_MODEL['T']})")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))


def model_shape(bench, options):
    """{B, S, T, emb, hidden, vocab}: the options given, else the defaults of the run's length."""
    defaults = QUICK_MODEL if bench.quick else MODEL
    return {key: getattr(options, key, None) or value for key, value in defaults.items()}


def make_model(bench, shape, attention, input_feeding):
    torch.manual_seed(0)
    return Seq2Seq(shape["vocab"], shape["vocab"], emb_dim=shape["emb"], hidden_size=shape["hidden"],
                   attention=attention, input_feeding=input_feeding).to(bench.device, bench.dtype)


def make_batch(B, S, T, vocab, device, seed=0):
    """(src, src_lengths, tgt_in, tgt_out): random tokens (never the pad, BOS or EOS ids 0-2 inside a sentence),
    source lengths from S/2 to S with one of length S."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(S // 2, S + 1, (B,), generator=g)
    lengths[0] = S
    src = torch.randint(3, vocab, (B, S), generator=g).masked_fill(torch.arange(S) >= lengths[:, None], 0)
    tgt = torch.randint(3, vocab, (B, T + 1), generator=g)
    tgt[:, 0] = 1
    return src.to(device), lengths.to(device), tgt[:, :-1].to(device), tgt[:, 1:].to(device)


def plain_copy(model):
    """The same model on torch's own LSTM modules (its attention goes on the reference backend at call time)."""
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
            # As `fastseq2seq train` runs it: the weights change only at optimizer.step() (for the plain model
            # the scope changes nothing: torch's modules and the reference backend pack nothing).
            with constant_weights():
                loss, _ = sequence_loss(module(src, lengths, tgt_in), tgt_out, label_smoothing=0.1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
        return step

    found = {PLAIN: Candidate(on_reference_attention(train_step(plain_copy(model)))),
             OURS: Candidate(train_step(copy.deepcopy(model)), ours=True)}
    if compile_plain:
        found[COMPILED] = Candidate(on_reference_attention(train_step(torch.compile(plain_copy(model)))))
    return found


def decoding_candidates(model, batch, compile_plain, decode):
    src, lengths, tgt_in, _ = batch
    T = tgt_in.shape[1]
    plain, ours = plain_copy(model).eval(), copy.deepcopy(model).eval()
    found = {PLAIN: Candidate(on_reference_attention(lambda: decode(plain, src, lengths, T))),
             OURS: Candidate(lambda: decode(ours, src, lengths, T), ours=True)}
    if src.is_cuda:
        # Unverified on a GPU so far: optional, so a failing capture drops it with a note rather than stopping the run.
        found[OURS_GRAPH] = Candidate(lambda: decode(ours, src, lengths, T, cuda_graph=True), ours=True,
                                      optional=True)
    if compile_plain:
        compiled = plain_copy(model).eval()
        compiled.decode_step = torch.compile(compiled.decode_step)
        found[COMPILED] = Candidate(on_reference_attention(lambda: decode(compiled, src, lengths, T)))
    return found


def run(bench, options):
    shape = model_shape(bench, options)
    B, S, T = shape["B"], shape["S"], shape["T"]
    def greedy(m, s, l, T, **kw):
        return m.greedy(s, l, max_len=T, **kw)

    def beam(m, s, l, T, **kw):
        return m.beam_search(s, l, beam_size=BEAM_SIZE, max_len=T, **kw)

    tasks = {
        "train step": (lambda model, batch: training_candidates(model, batch, bench.compile), B * T, "target tok/s"),
        "greedy": (lambda model, batch: decoding_candidates(model, batch, bench.compile, greedy), B, "sentences/s"),
        "beam 5": (lambda model, batch: decoding_candidates(model, batch, bench.compile, beam), B, "sentences/s"),
    }
    rows = []
    for attention in options.attention or ["bahdanau"]:
        model = make_model(bench, shape, attention, not options.no_input_feeding)
        batch = make_batch(B, S, T, shape["vocab"], bench.device)
        for task in options.tasks:
            build, units, unit = tasks[task]
            # a step's working set (weights, optimizer state, activations of 30 steps) is past any cache: one input set
            rows += measure(bench, NAME, {"task": task, "attention": attention, **shape},
                            lambda seed: build(model, batch), repeats=3 if bench.quick else REPEATS,
                            working_set_bytes=0, work=(units, unit))
    return rows
