"""convert_lstm / revert_lstm: swap torch's LSTM modules inside a model for the fused ones, and back.

The swap changes each module's class in place: the module object, its Parameters, hooks and buffers stay the same
objects, so optimizers, state_dicts, registered hooks and DDP wrappers built before the swap stay valid.
"""
import torch

from fastseq2seq.nn.lstm import LSTM, LSTMCell

_FUSED = {torch.nn.LSTM: LSTM, torch.nn.LSTMCell: LSTMCell}
_TORCH = {fused: plain for plain, fused in _FUSED.items()}


def _swap(model, table):
    for module in model.modules():
        cls = table.get(type(module))  # exact types only: leave users' own subclasses alone
        if cls is not None:
            module.__class__ = cls
    return model


def convert_lstm(model: torch.nn.Module) -> torch.nn.Module:
    """Make every torch.nn.LSTM / LSTMCell in `model` (itself included) a fused one, in place; returns `model`."""
    return _swap(model, _FUSED)


def revert_lstm(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `convert_lstm`: the fused modules become torch.nn.LSTM / LSTMCell again, in place; returns `model`."""
    return _swap(model, _TORCH)
