"""fastseq2seq: fused LSTM and attention kernels as torch ops, drop-in modules and a Seq2Seq model."""
from fastseq2seq import nn, ops
from fastseq2seq.backends import BACKENDS, available_backends, use_backend
from fastseq2seq.nn import convert_lstm, revert_lstm

__version__ = "0.1.0"
__all__ = ["BACKENDS", "available_backends", "convert_lstm", "nn", "ops", "revert_lstm", "use_backend"]
