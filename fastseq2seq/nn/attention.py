"""fastseq2seq.nn.Attention: Luong (dot, general) and Bahdanau (additive) attention on the fused attention op."""
from typing import NamedTuple

import torch
from torch import Tensor

from fastseq2seq.ops import attention, linear


class PrecomputedKeys(NamedTuple):
    """Keys after the per-source-sentence work (`Attention.precompute`): reuse them at every decoder step."""

    keys: Tensor


class Attention(torch.nn.Module):
    """kind="dot": e_s = q . k_s; "general": e_s = (W q) . k_s; "additive": e_s = v . tanh(W_q q + W_k k_s).

    forward(query [B, Dq] or [B, T, Dq], keys [B, S, Dk] or PrecomputedKeys, values [B, S, Dv], mask=None,
    lengths=None) -> (context [B, (T,) Dv], weights [B, (T,) S]).
    """

    KINDS = ("dot", "general", "additive")

    def __init__(self, query_dim, key_dim, value_dim=None, kind="dot", attn_dim=None, device=None, dtype=None):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"Attention: kind must be one of {self.KINDS}, got {kind!r}")
        if kind == "dot" and query_dim != key_dim:
            raise ValueError(f"Attention: kind='dot' needs query_dim == key_dim, got {query_dim} and {key_dim}")
        self.query_dim, self.key_dim, self.kind = query_dim, key_dim, kind
        self.value_dim = key_dim if value_dim is None else value_dim
        factory = {"device": device, "dtype": dtype}
        if kind == "general":
            self.weight = torch.nn.Parameter(torch.empty(key_dim, query_dim, **factory))
        elif kind == "additive":
            self.attn_dim = attn_dim or key_dim
            self.query_proj = torch.nn.Linear(query_dim, self.attn_dim, bias=False, **factory)
            self.key_proj = torch.nn.Linear(key_dim, self.attn_dim, bias=True, **factory)
            self.v = torch.nn.Parameter(torch.empty(self.attn_dim, **factory))
        self.reset_parameters()

    def reset_parameters(self):
        if self.kind == "general":
            torch.nn.init.xavier_uniform_(self.weight)
        elif self.kind == "additive":
            self.query_proj.reset_parameters()
            self.key_proj.reset_parameters()
            torch.nn.init.uniform_(self.v, -self.attn_dim ** -0.5, self.attn_dim ** -0.5)

    def precompute(self, keys: Tensor) -> PrecomputedKeys:
        """The per-source work, once per sentence: W_k k for additive, W^T k for general (so a step is a dot)."""
        if self.kind == "additive":
            return PrecomputedKeys(self.key_proj(keys))
        if self.kind == "general":
            return PrecomputedKeys(keys @ self.weight)
        return PrecomputedKeys(keys)

    def forward(self, query, keys, values, mask=None, lengths=None, return_weights=True):
        keys = keys.keys if isinstance(keys, PrecomputedKeys) else self.precompute(keys).keys
        if self.kind == "additive":
            query = linear(query, self.query_proj.weight, self.query_proj.bias)
            return attention(query, keys, values, mask=mask, lengths=lengths, score="additive",
                             v=self.v, return_weights=return_weights)
        return attention(query, keys, values, mask=mask, lengths=lengths, score="dot", return_weights=return_weights)

    def extra_repr(self):
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, value_dim={self.value_dim}, kind={self.kind!r}"
