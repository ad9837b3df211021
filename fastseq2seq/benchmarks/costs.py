"""Cost models: the FLOPs and the minimal bytes moved of each benchmarked op, for achieved GFLOP/s and GB/s and the
fraction of the device's roofline.

Conventions, the same for every op:
- FLOPs: 2 per multiply-add of the matrix (and matrix-vector) products, plus the adds and multiplies of additive
  attention's scores; the other elementwise work (bias adds, activations, softmax), under 1% of the products at
  these sizes, is not counted. A backward pass costs twice the forward's FLOPs (two products per forward product).
- Minimal bytes: every input read once and every output written once; a backward also reads one gradient per
  output and writes one per input. Intermediates (gates, scores, saved activations) are free: a kernel that keeps
  them on chip reaches this floor.
"""
from typing import NamedTuple

MASK_ITEMSIZE = 1  # bool
INDEX_ITEMSIZE = 8  # int64 token ids and lengths


class Cost(NamedTuple):
    flops: float
    bytes: float


def _cost(forward_flops, input_elems, output_elems, itemsize, backward, index_bytes=0):
    """index_bytes: masks, lengths and token ids, read once and never differentiated."""
    passes = 2 if backward else 1
    return Cost(forward_flops * (3 if backward else 1),
                passes * (input_elems + output_elems) * itemsize + index_bytes)


def _lstm_weights(I, H):
    return 4 * H * (I + H) + 2 * 4 * H  # W_ih, W_hh, b_ih, b_hh


def lstm_cell_cost(B, I, H, *, itemsize, backward=False) -> Cost:
    """lstm_cell: input [B, I], (h, c) [B, H] -> (h, c)."""
    return _cost(2 * B * (I + H) * 4 * H, B * I + 2 * B * H + _lstm_weights(I, H), 2 * B * H, itemsize, backward)


def lstm_layer_cost(T, B, I, H, *, itemsize, backward=False, steps=None) -> Cost:
    """lstm_layer: input [T, B, I] -> output [T, B, H], (h_n, c_n). steps: how many (t, b) positions are real
    (the sum of the lengths; default T * B): padding costs no FLOPs."""
    steps = T * B if steps is None else steps
    return _cost(2 * steps * (I + H) * 4 * H, T * B * I + 2 * B * H + _lstm_weights(I, H), T * B * H + 2 * B * H,
                 itemsize, backward, index_bytes=B * INDEX_ITEMSIZE if steps != T * B else 0)


def attention_cost(B, T, S, D, Dv, *, score, itemsize, backward=False, return_weights=True) -> Cost:
    """attention with T query rows per batch entry (T=1: a decoder step), a [B, S] mask; additive scores
    v . tanh(q + k) count an add, a multiply and an add per (query, key, feature)."""
    score_flops = (3 if score == "additive" else 2) * B * T * S * D
    inputs = B * T * D + B * S * D + B * S * Dv + (D if score == "additive" else 0)
    outputs = B * T * Dv + (B * T * S if return_weights else 0)
    return _cost(score_flops + 2 * B * T * S * Dv, inputs, outputs, itemsize, backward,
                 index_bytes=B * S * MASK_ITEMSIZE)


def decoder_step_cost(config, B, S, *, itemsize) -> Cost:
    """One forward step of Seq2Seq.decode_step (config: Seq2Seq.config) over a source of S positions, returning
    the attention weights: target embedding rows, the query projection (Bahdanau), the stack of LSTM cells,
    one-query attention over the precomputed keys and the encoder outputs, and the attentional vector
    tanh(W_c [context; s]). The query and the context stay intermediates."""
    E, H, layers = config["emb_dim"], config["hidden_size"], config["num_layers"]
    bahdanau = config["attention"] == "bahdanau"
    A = E if config["tie_embeddings"] else H
    cell_inputs = [E + (H if bahdanau else 0) + (A if config["input_feeding"] else 0)] + [H] * (layers - 1)
    flops = (sum(2 * B * (I + H) * 4 * H for I in cell_inputs) + 2 * B * 2 * H * A
             + (3 if bahdanau else 2) * B * S * H + 2 * B * S * H)
    weights = sum(_lstm_weights(I, H) for I in cell_inputs) + A * 2 * H
    if bahdanau:
        flops += 2 * B * H * H
        weights += H * H + H  # W_q and v
    state = 2 * layers * B * H
    inputs = B * E + state + (B * A if config["input_feeding"] else 0) + 2 * B * S * H + weights
    outputs = B * A + state + B * S
    return _cost(flops, inputs, outputs, itemsize, False, index_bytes=B * INDEX_ITEMSIZE + B * S * MASK_ITEMSIZE)


def roofline(cost: Cost, median_ms, ceilings) -> dict:
    """Achieved rates and the fraction of the roofline: the time the ceilings allow for this cost (the slower of
    the compute time and the memory time) over the measured time."""
    seconds = median_ms / 1e3
    compute_s = cost.flops / ceilings["flops_per_s"]
    memory_s = cost.bytes / ceilings["bytes_per_s"]
    return {"flops": cost.flops, "bytes": cost.bytes, "gflops": cost.flops / seconds / 1e9,
            "gbps": cost.bytes / seconds / 1e9, "roofline_fraction": max(compute_s, memory_s) / seconds,
            "bound": "compute" if compute_s >= memory_s else "memory"}
