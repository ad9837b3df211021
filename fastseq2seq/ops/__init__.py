"""The fused ops: one public function each, the backend chosen behind it (fastseq2seq.backends)."""
from fastseq2seq.ops.attention import attention, attention_reference
from fastseq2seq.ops.cross_entropy import cross_entropy, cross_entropy_reference
from fastseq2seq.ops.linear import (constant_weights, linear, linear_argmax, linear_argmax_reference,
                                    linear_reference)
from fastseq2seq.ops.lstm_cell import lstm_cell, lstm_cell_reference
from fastseq2seq.ops.lstm_layer import lstm_layer, lstm_layer_reference

__all__ = ["attention", "attention_reference", "constant_weights", "cross_entropy", "cross_entropy_reference",
           "linear", "linear_argmax", "linear_argmax_reference", "linear_reference", "lstm_cell",
           "lstm_cell_reference", "lstm_layer", "lstm_layer_reference"]
