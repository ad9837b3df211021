"""Greedy and beam-search decoding for Seq2Seq, batched, with no host synchronization per step.

Both run inside `constant_weights()`: the weights cannot change during a decode, so on the cpu backend every step
multiplies by weights packed once. Each decoder is a step function over a carry of device tensors, the step index
included, so a step has fixed shapes and takes no decision on the host: the loop runs it eagerly, or on a GPU with
`cuda_graph=True` captures GPU_STOP_CHECK_EVERY steps once in a CUDA graph and replays that. The only reads back to
the host are the "is everything finished?" checks, every step on the CPU (free there) and every
GPU_STOP_CHECK_EVERY steps on a GPU, and the final trim of the output to its longest row.
"""
import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_leaves

from fastseq2seq.ops import constant_weights

GPU_STOP_CHECK_EVERY = 8


def default_max_len(src_len: int) -> int:
    return 2 * src_len + 10


def _stop_check_every(device) -> int:
    return 1 if device.type == "cpu" else GPU_STOP_CHECK_EVERY


def length_penalty_divisor(length, alpha):
    """GNMT's length penalty ((5 + length) / 6) ** alpha; a score is sum(log p) / this."""
    return ((5.0 + length) / 6.0) ** alpha


def _check_cuda_graph(cuda_graph, device, caller):
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"{caller}: cuda_graph=True needs the model and src on a CUDA device, got {device}")


def _capture(step, carry, n_steps):
    """A CUDA graph of n_steps steps over carry's tensors: each replay advances them in place by n_steps steps."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = carry
        for _ in range(n_steps):
            out = step(out)
        for static, new in zip(tree_leaves(carry), tree_leaves(out)):
            static.copy_(new)
    return graph


def _run_steps(step, carry, n_steps, finished, cuda_graph):
    """carry = step(carry) up to n_steps times, stopping after any multiple of the check interval where
    finished(carry) (a 0-d bool tensor) holds. With cuda_graph the first interval runs eagerly (every kernel
    compiles and warms up outside the capture), the next is captured over that carry, and whole intervals from
    then on are replays; a last partial interval runs eagerly."""
    device = tree_leaves(carry)[0].device
    every = _stop_check_every(device)
    graph = None
    steps = 0
    while steps < n_steps:
        block = min(every, n_steps - steps)
        if graph is not None and block == every:
            graph.replay()
        elif cuda_graph and steps > 0 and block == every:
            graph = _capture(step, carry, every)
            graph.replay()
        else:
            for _ in range(block):
                carry = step(carry)
        steps += block
        if steps < n_steps and bool(finished(carry)):
            break
    return carry


class _Greedy(NamedTuple):
    y: Tensor  # [B]: the last emitted token
    state: object  # the model's DecoderState
    finished: Tensor  # [B] bool
    t: Tensor  # [1] int64: the step index


def _greedy_step(model, memory, tokens, attention, carry: _Greedy) -> _Greedy:
    """One greedy step; writes column t of tokens [B, L] and attention [B, L, S] in place."""
    vector, state, weights = model.decode_step(carry.y, carry.state, memory, return_weights=True)
    y = model.greedy_tokens(vector).masked_fill(carry.finished, model.pad_id)
    tokens.index_copy_(1, carry.t, y.unsqueeze(1).to(tokens.dtype))
    attention.index_copy_(1, carry.t, weights.masked_fill(carry.finished.unsqueeze(1), 0.0).unsqueeze(1))
    return _Greedy(y, state, carry.finished | (y == model.eos_id), carry.t + 1)


@torch.no_grad()
@constant_weights()
def greedy(model, src, src_lengths, max_len=None, cuda_graph=False):
    """-> (tokens [B, L], lengths [B], attention [B, L, S]).

    tokens exclude BOS; a row ends at its first EOS (counted in lengths) and is pad_id after it; a row that never
    emits EOS runs max_len tokens (default 2 * S + 10). attention[b, t] is the step's weights over the source,
    zero on source padding and after the row's end. cuda_graph: replay the steps from a CUDA graph (CUDA only)."""
    _check_cuda_graph(cuda_graph, src.device, "greedy")
    B, S = src.shape
    max_len = default_max_len(S) if max_len is None else max_len
    memory, state = model.encode(src, src_lengths)
    tokens = src.new_full((B, max_len), model.pad_id)
    attention = memory.values.new_zeros(B, max_len, S)
    start = _Greedy(src.new_full((B,), model.bos_id), state, torch.zeros(B, dtype=torch.bool, device=src.device),
                    torch.zeros(1, dtype=torch.long, device=src.device))
    step = functools.partial(_greedy_step, model, memory, tokens, attention)
    _run_steps(step, start, max_len, lambda carry: carry.finished.all(), cuda_graph)
    is_eos = tokens == model.eos_id
    lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, max_len)
    L = int(lengths.max()) if B else 0
    return tokens[:, :L], lengths, attention[:, :L]


class _Beams(NamedTuple):
    y: Tensor  # [B * K]: each beam's last token
    state: object  # the model's DecoderState over B * K rows
    alive_scores: Tensor  # [B, K]: sum of log p; -inf for an empty beam
    alive_tokens: Tensor  # [B, K, max_len]
    done_scores: Tensor  # [B, N]: length-penalized, best first; -inf while missing
    done_tokens: Tensor  # [B, N, max_len]
    done_lengths: Tensor  # [B, N]
    t: Tensor  # [1] int64: the step index


def _beam_step(model, memory, length_penalty, first_row, carry: _Beams) -> _Beams:
    """One step of every sentence's beams: expand, keep the top K, move those ending (EOS, or the last step) to the
    finished hypotheses. first_row [B, 1]: the row of each sentence's first beam."""
    B, K, max_len = carry.alive_tokens.shape
    N = carry.done_scores.shape[1]
    vector, state, _ = model.decode_step(carry.y, carry.state, memory)
    log_probs = F.log_softmax(model.logits(vector).to(carry.alive_scores.dtype), dim=-1).view(B, K, -1)
    V = log_probs.shape[2]
    top_scores, top_index = (carry.alive_scores.unsqueeze(2) + log_probs).view(B, K * V).topk(K, dim=1)
    beam, token = top_index // V, top_index % V
    alive_tokens = carry.alive_tokens.gather(1, beam.unsqueeze(2).expand(B, K, max_len))
    alive_tokens.index_copy_(2, carry.t, token.unsqueeze(2).to(alive_tokens.dtype))
    length = carry.t + 1
    is_eos = token == model.eos_id
    ending = (is_eos | (length >= max_len)) & torch.isfinite(top_scores)
    divisor = length_penalty_divisor(length.to(top_scores.dtype), length_penalty)
    ending_scores = torch.where(ending, top_scores / divisor, -math.inf)
    done_scores, pick = torch.cat([carry.done_scores, ending_scores], 1).topk(N, dim=1)
    done_tokens = torch.cat([carry.done_tokens, alive_tokens], 1).gather(1, pick.unsqueeze(2).expand(B, N, max_len))
    done_lengths = torch.cat([carry.done_lengths, length.to(carry.done_lengths.dtype).expand(B, K)], 1).gather(1, pick)
    state = state.index_select((first_row + beam).view(-1))
    return _Beams(token.view(-1), state, top_scores.masked_fill(is_eos, -math.inf), alive_tokens, done_scores,
                  done_tokens, done_lengths, length)


@torch.no_grad()
@constant_weights()
def beam_search(model, src, src_lengths, beam_size=5, length_penalty=1.0, max_len=None, n_best=1, cuda_graph=False):
    """-> (tokens [B, n_best, L], lengths [B, n_best], scores [B, n_best]), best first per sentence.

    All B * beam_size beams step together. Each step keeps the top beam_size expansions per sentence; those ending in
    EOS move to the sentence's finished hypotheses (the best n_best kept, on the device) and leave the beam, which
    the next step refills. At max_len the remaining beams are finished as they are (no EOS). A hypothesis' score is
    sum(log p of its tokens, EOS included) / ((5 + length) / 6) ** length_penalty. A sentence is done when it has
    n_best finished hypotheses and, for length_penalty >= 0, none of its live beams can still beat the worst of them
    (log-probabilities only fall, and the divisor is largest at max_len). cuda_graph: replay the steps from a CUDA
    graph (CUDA only)."""
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"beam_search: need 1 <= n_best <= beam_size, got n_best={n_best}, beam_size={beam_size}")
    _check_cuda_graph(cuda_graph, src.device, "beam_search")
    B, S = src.shape
    K, N, device = beam_size, n_best, src.device
    max_len = default_max_len(S) if max_len is None else max_len
    memory, state = model.encode(src, src_lengths)
    rows = torch.arange(B, device=device).repeat_interleave(K)
    memory, state = memory.index_select(rows), state.index_select(rows)
    score_dtype = torch.promote_types(memory.values.dtype, torch.float32)
    # Beam 0 starts each sentence; the others are empty (-inf) until the first step fills them.
    alive_scores = torch.full((B, K), -math.inf, dtype=score_dtype, device=device)
    alive_scores[:, 0] = 0.0
    start = _Beams(src.new_full((B * K,), model.bos_id), state, alive_scores,
                   src.new_full((B, K, max_len), model.pad_id),
                   torch.full((B, N), -math.inf, dtype=score_dtype, device=device),
                   src.new_full((B, N, max_len), model.pad_id), src.new_zeros(B, N),
                   torch.zeros(1, dtype=torch.long, device=device))
    best_divisor = length_penalty_divisor(max_len, length_penalty) if length_penalty >= 0 else None

    def finished(beams):
        best_alive = beams.alive_scores.max(1).values
        done = best_alive == -math.inf
        if best_divisor is not None:
            done |= beams.done_scores[:, -1] >= best_alive / best_divisor
        return done.all()

    first_row = torch.arange(0, B * K, K, device=device).unsqueeze(1)  # each sentence's beam 0 in the B * K rows
    step = functools.partial(_beam_step, model, memory, length_penalty, first_row)
    beams = _run_steps(step, start, max_len, finished, cuda_graph)
    L = int(beams.done_lengths.max()) if B else 0
    return beams.done_tokens[:, :, :L], beams.done_lengths, beams.done_scores
