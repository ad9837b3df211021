"""Greedy and beam-search decoding for Seq2Seq, batched, with no host synchronization per step.

Both loops keep every decision on the device (masks, where, topk, gather); the only reads back to the host are the
"is everything finished?" checks, every step on the CPU (free there) and every `GPU_STOP_CHECK_EVERY` steps on a GPU,
and the final trim of the output to its longest row.
"""
import math

import torch
import torch.nn.functional as F

GPU_STOP_CHECK_EVERY = 8


def default_max_len(src_len: int) -> int:
    return 2 * src_len + 10


def _stop_check_every(device) -> int:
    return 1 if device.type == "cpu" else GPU_STOP_CHECK_EVERY


def length_penalty_divisor(length, alpha):
    """GNMT's length penalty ((5 + length) / 6) ** alpha; a score is sum(log p) / this."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def greedy(model, src, src_lengths, max_len=None):
    """-> (tokens [B, L], lengths [B], attention [B, L, S]).

    tokens exclude BOS; a row ends at its first EOS (counted in lengths) and is pad_id after it; a row that never
    emits EOS runs max_len tokens (default 2 * S + 10). attention[b, t] is the step's weights over the source,
    zero on source padding and after the row's end."""
    B, S = src.shape
    max_len = default_max_len(S) if max_len is None else max_len
    memory, state = model.encode(src, src_lengths)
    tokens = src.new_full((B, max_len), model.pad_id)
    attention = memory.values.new_zeros(B, max_len, S)
    finished = torch.zeros(B, dtype=torch.bool, device=src.device)
    y = src.new_full((B,), model.bos_id)
    check_every = _stop_check_every(src.device)
    for t in range(max_len):
        vector, state, weights = model.decode_step(y, state, memory, return_weights=True)
        y = model.output(vector).argmax(-1).masked_fill(finished, model.pad_id)
        tokens[:, t] = y
        attention[:, t] = weights.masked_fill(finished.unsqueeze(1), 0.0)
        finished |= y == model.eos_id
        if (t + 1) % check_every == 0 and bool(finished.all()):
            break
    is_eos = tokens == model.eos_id
    lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, max_len)
    L = int(lengths.max()) if B else 0
    return tokens[:, :L], lengths, attention[:, :L]


@torch.no_grad()
def beam_search(model, src, src_lengths, beam_size=5, length_penalty=1.0, max_len=None, n_best=1):
    """-> (tokens [B, n_best, L], lengths [B, n_best], scores [B, n_best]), best first per sentence.

    All B * beam_size beams step together. Each step keeps the top beam_size expansions per sentence; those ending in
    EOS move to the sentence's finished hypotheses (the best n_best kept, on the device) and leave the beam, which
    the next step refills. At max_len the remaining beams are finished as they are (no EOS). A hypothesis' score is
    sum(log p of its tokens, EOS included) / ((5 + length) / 6) ** length_penalty. A sentence is done when it has
    n_best finished hypotheses and, for length_penalty >= 0, none of its live beams can still beat the worst of them
    (log-probabilities only fall, and the divisor is largest at max_len)."""
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"beam_search: need 1 <= n_best <= beam_size, got n_best={n_best}, beam_size={beam_size}")
    B, S = src.shape
    K, N, device = beam_size, n_best, src.device
    max_len = default_max_len(S) if max_len is None else max_len
    memory, state = model.encode(src, src_lengths)
    rows = torch.arange(B, device=device).repeat_interleave(K)
    memory, state = memory.index_select(rows), state.index_select(rows)
    V = model.output.out_features
    score_dtype = torch.promote_types(memory.values.dtype, torch.float32)
    # Beam 0 starts each sentence; the others are empty (-inf) until the first step fills them.
    alive_scores = torch.full((B, K), -math.inf, dtype=score_dtype, device=device)
    alive_scores[:, 0] = 0.0
    alive_tokens = src.new_full((B, K, max_len), model.pad_id)
    done_scores = torch.full((B, N), -math.inf, dtype=score_dtype, device=device)
    done_tokens = src.new_full((B, N, max_len), model.pad_id)
    done_lengths = src.new_zeros(B, N)
    first_row = (torch.arange(B, device=device) * K).unsqueeze(1)
    best_divisor = length_penalty_divisor(max_len, length_penalty) if length_penalty >= 0 else None
    y = src.new_full((B * K,), model.bos_id)
    check_every = _stop_check_every(device)
    for t in range(max_len):
        vector, state, _ = model.decode_step(y, state, memory)
        log_probs = F.log_softmax(model.output(vector).to(score_dtype), dim=-1).view(B, K, V)
        top_scores, top_index = (alive_scores.unsqueeze(2) + log_probs).view(B, K * V).topk(K, dim=1)
        beam, token = top_index // V, top_index % V
        alive_tokens = alive_tokens.gather(1, beam.unsqueeze(2).expand(B, K, max_len))
        alive_tokens[:, :, t] = token
        is_eos = token == model.eos_id
        ending = (is_eos if t < max_len - 1 else torch.ones_like(is_eos)) & torch.isfinite(top_scores)
        ending_scores = torch.where(ending, top_scores / length_penalty_divisor(t + 1, length_penalty), -math.inf)
        done_scores, pick = torch.cat([done_scores, ending_scores], 1).topk(N, dim=1)
        done_tokens = torch.cat([done_tokens, alive_tokens], 1).gather(1, pick.unsqueeze(2).expand(B, N, max_len))
        done_lengths = torch.cat([done_lengths, torch.full_like(beam, t + 1)], 1).gather(1, pick)
        alive_scores = top_scores.masked_fill(is_eos, -math.inf)
        state = state.index_select((first_row + beam).view(-1))
        y = token.view(-1)
        if (t + 1) % check_every == 0:
            best_alive = alive_scores.max(1).values
            done = best_alive == -math.inf
            if best_divisor is not None:
                done |= done_scores[:, -1] >= best_alive / best_divisor
            if bool(done.all()):
                break
    L = int(done_lengths.max()) if B else 0
    return done_tokens[:, :, :L], done_lengths, done_scores
