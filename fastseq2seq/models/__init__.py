"""The Seq2Seq translation model on the fused ops, its loss and its decoders."""
from fastseq2seq.models.seq2seq import Seq2Seq, sequence_loss

__all__ = ["Seq2Seq", "sequence_loss"]
