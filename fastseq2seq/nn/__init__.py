"""Drop-in modules on the fused ops."""
from fastseq2seq.nn.attention import Attention, PrecomputedKeys
from fastseq2seq.nn.convert import convert_lstm, revert_lstm
from fastseq2seq.nn.lstm import LSTM, LSTMCell

__all__ = ["LSTM", "LSTMCell", "Attention", "PrecomputedKeys", "convert_lstm", "revert_lstm"]
