"""fastseq2seq: fused LSTM and attention kernels as torch ops, drop-in modules and a Seq2Seq model."""
from fastseq2seq import ops
from fastseq2seq.backends import BACKENDS, available_backends, use_backend

__version__ = "0.1.0"
__all__ = ["BACKENDS", "available_backends", "ops", "use_backend"]
