"""fastseq2seq.nn.LSTM and LSTMCell: torch.nn.LSTM / LSTMCell subclasses whose forward runs on the fused ops.

Same constructor, parameters, state_dict, forward signature and outputs as torch's modules, so they load each
other's weights and swap in with `convert_lstm`. What is not fused falls back to torch's own forward.
"""
import functools
import warnings

import torch
from torch.nn.utils.rnn import PackedSequence

from fastseq2seq.ops import lstm_cell, lstm_layer
from fastseq2seq.ops.lstm_layer import persistent_recurrence_requested


def _let_dynamo_trace_fused_lstm():
    """Dynamo refuses every torch.nn.LSTM instance (torch's own run one opaque _VF.lstm call on flat weights).
    Ours run registered ops, so let Dynamo wrap them, and only them: torch's own LSTMs keep their graph break."""
    try:
        from torch._dynamo import config
        from torch._dynamo.variables.builder import VariableBuilder
    except ImportError:
        return
    wrap_module = VariableBuilder.wrap_module

    def wrap_module_allowing_fused_lstm(self, value):
        if isinstance(value, LSTM):
            with config.patch(allow_rnn=True):
                return wrap_module(self, value)
        return wrap_module(self, value)

    VariableBuilder.wrap_module = wrap_module_allowing_fused_lstm


def _autocast_dtype(device):
    """The dtype CUDA autocast would run an LSTM in, or None: our ops are not autocast-registered themselves."""
    if device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return None


def _cast(tensors, dtype):
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]


_side_streams = {}


def _overlap_directions(x):
    """Whether the two directions of a bidirectional layer run side by side: on a GPU, outside torch.compile (which
    traces one stream), and not on the persistent kernels, whose cooperative grids are sized to fill the GPU alone."""
    return x.is_cuda and not torch.compiler.is_compiling() and not persistent_recurrence_requested()


def _run_directions_concurrently(run_forward, run_backward, device):
    """run_backward() on a side stream while run_forward() runs on the current one; both return (out, (h, c)).
    Autograd runs each op's backward on the stream of its forward, so the backward passes overlap as well."""
    side = _side_streams.get(device)
    if side is None:
        side = _side_streams[device] = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        backward = run_backward()
    forward = run_forward()
    main.wait_stream(side)
    out, (h, c) = backward
    # Allocated on the side stream, used on the current one: the allocator must not hand their memory back to
    # the side stream before the current stream's uses of them are done.
    for t in (out, h, c):
        t.record_stream(main)
    return forward, backward


class LSTM(torch.nn.LSTM):
    """torch.nn.LSTM running each layer and direction as one whole-sequence fused op (`fastseq2seq.ops.lstm_layer`)."""

    _warned_fallback = False

    def _torch_fallback(self, why):
        if not LSTM._warned_fallback:
            warnings.warn(f"fastseq2seq.nn.LSTM: {why}; running torch.nn.LSTM's own forward", stacklevel=3)
            LSTM._warned_fallback = True

    def forward(self, input, hx=None):
        if self.proj_size > 0:
            self._torch_fallback("proj_size > 0 has no fused path")
            return super().forward(input, hx)
        packed = isinstance(input, PackedSequence)
        D = 2 if self.bidirectional else 1
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            # PackedSequence rows are in sorted order; pad them into [T, B, I] with the lengths they imply.
            T, B = batch_sizes.numel(), int(batch_sizes[0])
            valid = torch.arange(B)[None, :] < batch_sizes[:, None]  # [T, B], on the CPU like batch_sizes
            rows = valid.flatten().nonzero().squeeze(1).to(data.device)
            lengths = valid.sum(0).to(data.device)
            x = data.new_zeros(T * B, data.shape[1]).index_copy(0, rows, data).view(T, B, -1)
            if hx is None:
                zeros = data.new_zeros(self.num_layers * D, B, self.hidden_size)
                hx = (zeros, zeros)
            else:
                self.check_forward_args(data, hx, batch_sizes)
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            x = input if batched else input.unsqueeze(batch_dim)
            if hx is None:
                zeros = x.new_zeros(self.num_layers * D, x.shape[batch_dim], self.hidden_size)
                hx = (zeros, zeros)
            else:
                rank = 3 if batched else 2
                if hx[0].dim() != rank or hx[1].dim() != rank:
                    kind = "batched 3-D" if batched else "unbatched 2-D"
                    raise RuntimeError(f"For {kind} input, hx and cx should also be {rank}-D but got "
                                       f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                if not batched:
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            self.check_forward_args(x, hx, None)
            if self.batch_first:
                x = x.transpose(0, 1)
            lengths = None
        output, hidden = self._run_layers(x, lengths, hx)
        if packed:
            output = PackedSequence(output.reshape(T * B, -1).index_select(0, rows), batch_sizes, sorted_indices,
                                    unsorted_indices)
            return output, self.permute_hidden(hidden, unsorted_indices)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not batched:
            output = output.squeeze(batch_dim)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return output, hidden

    def _run_layers(self, x, lengths, hx):
        """x [T, B, I] (time-major), lengths [B] or None; returns output [T, B, D*H] and (h_n, c_n)."""
        D = 2 if self.bidirectional else 1
        h0, c0 = hx
        cast_to = _autocast_dtype(x.device)
        if cast_to is not None:
            x, h0, c0 = _cast((x, h0, c0), cast_to)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            runs = [functools.partial(self._run_direction, x, h0, c0, layer * D + direction, direction == 1, lengths,
                                      cast_to) for direction in range(D)]
            if D == 2 and _overlap_directions(x):
                results = _run_directions_concurrently(*runs, x.device)
            else:
                results = [run() for run in runs]
            for _, (h, c) in results:
                h_n.append(h)
                c_n.append(c)
            x = results[0][0] if D == 1 else torch.cat([out for out, _ in results], dim=2)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = torch.nn.functional.dropout(x, self.dropout, training=True)
        return x, (torch.stack(h_n), torch.stack(c_n))

    def _run_direction(self, x, h0, c0, k, reverse, lengths, cast_to):
        """Layer-direction k (torch's flat index: layer * D + direction) over x [T, B, I] -> (out, (h_n, c_n))."""
        weights = [getattr(self, name) for name in self._all_weights[k]]
        if cast_to is not None:
            weights = _cast(weights, cast_to)
        return lstm_layer(x, (h0[k], c0[k]), *weights, lengths=lengths, reverse=reverse)


class LSTMCell(torch.nn.LSTMCell):
    """torch.nn.LSTMCell running one fused op (`fastseq2seq.ops.lstm_cell`)."""

    def forward(self, input, hx=None):
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and (hx[0].dim() != input.dim() or hx[1].dim() != input.dim()):
            raise ValueError(f"LSTMCell: Expected hx[0] and hx[1] to be {input.dim()}D, "
                             f"got {hx[0].dim()}D and {hx[1].dim()}D instead")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if hx is None:
            zeros = x.new_zeros(x.shape[0], self.hidden_size)
            hx = (zeros, zeros)
        elif not batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        cast_to = _autocast_dtype(x.device)
        if cast_to is not None:
            x, hx, weights = _cast([x], cast_to)[0], _cast(hx, cast_to), _cast(weights, cast_to)
        h, c = lstm_cell(x, hx, *weights)
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


_let_dynamo_trace_fused_lstm()
