"""decoder_step: one Seq2Seq decoder step as greedy decoding runs it (forward, attention weights returned): the fused
LSTM cell and fused attention vs the same model on eager nn.LSTMCell and the eager attention chain, and torch.compile
of that eager step. B=320 is a beam of 5 over 64 sentences. The model's weights stay in cache from step to step, as
in a decoding loop; the per-step data (states, encoder outputs, tokens) rotates through several input sets."""
import torch

from fastseq2seq.benchmarks.costs import decoder_step_cost
from fastseq2seq.benchmarks.runner import measure
from fastseq2seq.benchmarks.seq2seq import (add_model_arguments, make_batch, make_model, model_shape,
                                            on_reference_attention, plain_copy)
from fastseq2seq.benchmarks.timing import Candidate

NAME = "decoder_step"
REPEATS = 30
BATCHES, QUICK_BATCHES = [64, 320], [64]
ATTENTIONS, QUICK_ATTENTIONS = ["bahdanau", "luong-dot"], ["bahdanau"]


def add_arguments(parser):
    add_model_arguments(parser)
    parser.add_argument("--batches", type=int, nargs="+",
                        help=f"batch sizes (default {BATCHES}; quick {QUICK_BATCHES}); --B is ignored here")


def candidates(plain, ours, compiled_step, B, S, vocab, device, seed):
    src, lengths, _, _ = make_batch(B, S, 1, vocab, device, seed=seed)
    tokens = src[:, 0]
    with torch.no_grad():
        plain_memory, plain_state = plain.encode(src, lengths)
        memory, state = ours.encode(src, lengths)

    def step(step_fn, memory, state):
        def run():
            with torch.no_grad():
                return step_fn(tokens, state, memory, return_weights=True)
        return run

    found = {"eager": Candidate(on_reference_attention(step(plain.decode_step, plain_memory, plain_state)))}
    if compiled_step is not None:
        found["compile(eager)"] = Candidate(on_reference_attention(step(compiled_step, plain_memory, plain_state)))
    found["fastseq2seq"] = Candidate(step(ours.decode_step, memory, state), ours=True)
    return found


def run(bench, options):
    shape = model_shape(bench, options)
    S, H = shape["S"], shape["hidden"]
    rows = []
    for attention in options.attention or (QUICK_ATTENTIONS if bench.quick else ATTENTIONS):
        ours = make_model(bench, shape, attention, not options.no_input_feeding).eval()
        plain = plain_copy(ours)
        compiled_step = torch.compile(plain.decode_step) if bench.compile else None
        for B in options.batches or (QUICK_BATCHES if bench.quick else BATCHES):
            per_step_data = (2 * B * S * H + 3 * B * H) * bench.itemsize  # keys, values; h, c, input feed
            rows += measure(bench, NAME, {"attention": attention, "B": B, "S": S, "emb": shape["emb"], "hidden": H},
                            lambda seed: candidates(plain, ours, compiled_step, B, S, shape["vocab"], bench.device,
                                                    seed),
                            repeats=REPEATS, working_set_bytes=per_step_data,
                            cost=decoder_step_cost(ours.config, B, S, itemsize=bench.itemsize))
    return rows
