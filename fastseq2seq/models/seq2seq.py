"""Seq2Seq: a bidirectional LSTM encoder, a bridge to the decoder's initial state, an LSTM decoder with attention
and an output layer, all on the fused ops (fastseq2seq.nn, fastseq2seq.ops); and `sequence_loss`.

One decoder step (`decode_step`), shared by teacher forcing and the decoders in `decoding.py`:
  bahdanau: a_t = attend(s_{t-1}), x_t = [emb(y_{t-1}); c_t (; ~h_{t-1})], s_t = LSTM(x_t, s_{t-1})
  luong:    x_t = [emb(y_{t-1}) (; ~h_{t-1})], s_t = LSTM(x_t, s_{t-1}), a_t = attend(s_t)
  both:     ~h_t = tanh(W_c [c_t; s_t]) (the attentional vector), logits_t = W_out ~h_t + b
where s is the top decoder layer's h, c_t the context and (; ~h_{t-1}) the input feeding.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastseq2seq.models import decoding
from fastseq2seq.nn import LSTM, Attention, LSTMCell, PrecomputedKeys
from fastseq2seq.ops import constant_weights, cross_entropy, linear, linear_argmax, lstm_layer

ATTENTION_KINDS = {"bahdanau": "additive", "luong-dot": "dot", "luong-general": "general"}


class EncoderMemory(NamedTuple):
    """What every decoder step attends over: encoder outputs [B, S, H], their precomputed keys, a bool mask [B, S]
    (True = real source position; a mask rather than lengths so no step reads lengths back to the host)."""

    values: Tensor
    keys: PrecomputedKeys
    mask: Tensor

    def index_select(self, rows: Tensor) -> "EncoderMemory":
        return EncoderMemory(self.values.index_select(0, rows), PrecomputedKeys(self.keys.keys.index_select(0, rows)),
                             self.mask.index_select(0, rows))


class DecoderState(NamedTuple):
    """h, c [num_layers, B, H]; feed [B, A]: the previous attentional vector (zeros at the start; unused without
    input feeding)."""

    h: Tensor
    c: Tensor
    feed: Tensor

    def index_select(self, rows: Tensor) -> "DecoderState":
        return DecoderState(self.h.index_select(1, rows), self.c.index_select(1, rows), self.feed.index_select(0, rows))


class Seq2Seq(torch.nn.Module):
    """forward(src [B, S], src_lengths [B], tgt_in [B, T]) -> logits [B, T, V] (teacher forcing).

    The encoder is bidirectional with hidden_size // 2 per direction, so its outputs, the decoder state and the
    attention all have size hidden_size (every attention kind, dot included, works without a projection). With
    tie_embeddings the attentional vector has size emb_dim, so the output layer can share the target embedding.
    """

    def __init__(self, src_vocab_size, tgt_vocab_size, *, emb_dim=256, hidden_size=512, num_layers=1,
                 attention="bahdanau", input_feeding=True, dropout=0.0, tie_embeddings=False, pad_id=0, bos_id=1,
                 eos_id=2):
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"Seq2Seq: attention must be one of {tuple(ATTENTION_KINDS)}, got {attention!r}")
        if hidden_size % 2:
            raise ValueError(f"Seq2Seq: hidden_size must be even (the encoder has hidden_size // 2 per direction), "
                             f"got {hidden_size}")
        self.config = dict(src_vocab_size=src_vocab_size, tgt_vocab_size=tgt_vocab_size, emb_dim=emb_dim,
                           hidden_size=hidden_size, num_layers=num_layers, attention=attention,
                           input_feeding=input_feeding, dropout=dropout, tie_embeddings=tie_embeddings, pad_id=pad_id,
                           bos_id=bos_id, eos_id=eos_id)
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.hidden_size, self.num_layers, self.dropout = hidden_size, num_layers, dropout
        self.bahdanau = attention == "bahdanau"
        self.input_feeding = input_feeding
        H = hidden_size
        self.attn_vector_dim = emb_dim if tie_embeddings else H

        self.src_embedding = torch.nn.Embedding(src_vocab_size, emb_dim, padding_idx=pad_id)
        self.tgt_embedding = torch.nn.Embedding(tgt_vocab_size, emb_dim, padding_idx=pad_id)
        self.encoder = LSTM(emb_dim, H // 2, num_layers, batch_first=True, bidirectional=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        # Shared across layers: layer l's [fwd; bwd] final states become the decoder's layer-l initial state.
        self.bridge_h = torch.nn.Linear(H, H)
        self.bridge_c = torch.nn.Linear(H, H)
        input_size = emb_dim + (H if self.bahdanau else 0) + (self.attn_vector_dim if input_feeding else 0)
        self.decoder = torch.nn.ModuleList(LSTMCell(input_size if layer == 0 else H, H) for layer in range(num_layers))
        self.attention = Attention(H, H, H, kind=ATTENTION_KINDS[attention], attn_dim=H)
        self.attn_combine = torch.nn.Linear(2 * H, self.attn_vector_dim, bias=False)
        self.output = torch.nn.Linear(self.attn_vector_dim, tgt_vocab_size)
        if tie_embeddings:
            self.output.weight = self.tgt_embedding.weight

    @classmethod
    def from_config(cls, config: dict) -> "Seq2Seq":
        config = dict(config)
        return cls(config.pop("src_vocab_size"), config.pop("tgt_vocab_size"), **config)

    # -- encoder ------------------------------------------------------------------------------------------------

    def encode(self, src: Tensor, src_lengths: Tensor) -> tuple[EncoderMemory, DecoderState]:
        """src [B, S], src_lengths [B] (each >= 1) -> the memory to attend over and the decoder's initial state."""
        B, S = src.shape
        embedded = F.dropout(self.src_embedding(src), self.dropout, self.training)
        packed = pack_padded_sequence(embedded, src_lengths.cpu(), batch_first=True, enforce_sorted=False)
        packed_out, (h_n, c_n) = self.encoder(packed)
        values, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=S)
        mask = torch.arange(S, device=src.device) < src_lengths.to(src.device).unsqueeze(1)
        # h_n [2 * layers, B, H/2], (layer, direction) major -> [layers, B, H] with [fwd; bwd] per layer
        h0 = torch.tanh(self.bridge_h(h_n.view(self.num_layers, 2, B, -1).permute(0, 2, 1, 3).reshape(
            self.num_layers, B, -1)))
        c0 = self.bridge_c(c_n.view(self.num_layers, 2, B, -1).permute(0, 2, 1, 3).reshape(self.num_layers, B, -1))
        feed = values.new_zeros(B, self.attn_vector_dim)
        return EncoderMemory(values, self.attention.precompute(values), mask), DecoderState(h0, c0, feed)

    # -- decoder ------------------------------------------------------------------------------------------------

    def _attend(self, query, memory: EncoderMemory, return_weights):
        return self.attention(query, memory.keys, memory.values, mask=memory.mask, return_weights=return_weights)

    def _attentional_vector(self, context, top):
        vector = torch.tanh(linear(torch.cat([context, top], dim=-1), self.attn_combine.weight))
        return F.dropout(vector, self.dropout, self.training)

    def decode_step(self, y_prev: Tensor, state: DecoderState, memory: EncoderMemory, return_weights=False):
        """One step for tokens y_prev [B] -> (attentional vector [B, A], new state, attention weights [B, S] or
        None). The output layer is applied by the caller (once for all steps under teacher forcing)."""
        embedded = F.dropout(self.tgt_embedding(y_prev), self.dropout, self.training)
        return self.step_from_embedding(embedded, state, memory, return_weights)

    def step_from_embedding(self, embedded: Tensor, state: DecoderState, memory: EncoderMemory, return_weights=False):
        """decode_step from the embedded (and dropped-out) previous tokens [B, E]."""
        inputs = [embedded]
        if self.bahdanau:
            context, weights = self._attend(state.h[-1], memory, return_weights)
            inputs.append(context)
        if self.input_feeding:
            inputs.append(state.feed)
        x = torch.cat(inputs, dim=-1) if len(inputs) > 1 else inputs[0]
        hs, cs = [], []
        for layer, cell in enumerate(self.decoder):
            h, c = cell(x, (state.h[layer], state.c[layer]))
            hs.append(h)
            cs.append(c)
            x = F.dropout(h, self.dropout, self.training) if layer < self.num_layers - 1 else h
        if not self.bahdanau:
            context, weights = self._attend(x, memory, return_weights)
        vector = self._attentional_vector(context, x)
        return vector, DecoderState(torch.stack(hs), torch.stack(cs), vector), weights

    def _decode_all_steps(self, tgt_in, state: DecoderState, memory: EncoderMemory):
        """Luong without input feeding: attention does not feed back, so each layer is one whole-sequence op and the
        attention of all steps one multi-query call."""
        x = F.dropout(self.tgt_embedding(tgt_in), self.dropout, self.training).transpose(0, 1)  # [T, B, E]
        for layer, cell in enumerate(self.decoder):
            x, _ = lstm_layer(x, (state.h[layer], state.c[layer]), cell.weight_ih, cell.weight_hh, cell.bias_ih,
                              cell.bias_hh)
            if layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, self.training)
        top = x.transpose(0, 1)  # [B, T, H]
        context, _ = self._attend(top, memory, return_weights=False)
        return self._attentional_vector(context, top)

    @constant_weights()  # no weight changes within a forward: each step's cell reuses the packed weights on CPU
    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        memory, state = self.encode(src, src_lengths)
        if not self.bahdanau and not self.input_feeding:
            vectors = self._decode_all_steps(tgt_in, state, memory)
        else:
            # All steps' tokens embedded at once: one embedding backward, not a dense [V, E] gradient per step.
            embedded = F.dropout(self.tgt_embedding(tgt_in), self.dropout, self.training)
            steps = []
            for step_input in embedded.unbind(1):
                vector, state, _ = self.step_from_embedding(step_input, state, memory)
                steps.append(vector)
            vectors = torch.stack(steps, dim=1)
        return self.logits(vectors)

    def logits(self, vectors: Tensor) -> Tensor:
        """The output layer over attentional vectors [..., A] -> [..., V]."""
        return linear(vectors, self.output.weight, self.output.bias)

    def greedy_tokens(self, vectors: Tensor) -> Tensor:
        """The most likely token under the output layer, [..., A] -> int64 [...], without returning the logits."""
        return linear_argmax(vectors, self.output.weight, self.output.bias)

    # -- decoding (fastseq2seq/models/decoding.py) ---------------------------------------------------------------

    def greedy(self, src, src_lengths, max_len=None, cuda_graph=False):
        """-> (tokens [B, L], lengths [B], attention [B, L, S]); see decoding.greedy."""
        return decoding.greedy(self, src, src_lengths, max_len=max_len, cuda_graph=cuda_graph)

    def beam_search(self, src, src_lengths, beam_size=5, length_penalty=1.0, max_len=None, n_best=1,
                    cuda_graph=False):
        """-> (tokens [B, n_best, L], lengths [B, n_best], scores [B, n_best]); see decoding.beam_search."""
        return decoding.beam_search(self, src, src_lengths, beam_size=beam_size, length_penalty=length_penalty,
                                    max_len=max_len, n_best=n_best, cuda_graph=cuda_graph)


def sequence_loss(logits: Tensor, target: Tensor, *, pad_id=0, label_smoothing=0.0) -> tuple[Tensor, Tensor]:
    """Cross-entropy of logits [B, T, V] against target [B, T], label-smoothed, averaged over the non-padding
    target tokens. Returns (loss, number of non-padding tokens)."""
    n_tokens = (target != pad_id).sum()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half-precision logits: sum in float32
    losses = cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=pad_id,
                           label_smoothing=label_smoothing)
    return losses.sum() / n_tokens.clamp(min=1), n_tokens
