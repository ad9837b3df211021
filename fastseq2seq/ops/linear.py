"""linear: torch.nn.functional.linear for the products of a decoder step, and `constant_weights`, the scope in which
the cpu backend packs each weight once (fastseq2seq::constant_weights_scope; csrc/weight_panels.h).

A decoder step multiplies a few rows (the batch, or batch x beam) by the same weights at every step, and MKL's sgemm
repacks the whole weight at every call: on the 2-core AVX-512 development machine, [64, 512] @ [512, 8000] runs at
117 GFLOP/s that way against 213 from panels packed once. Inside `constant_weights()` the cpu backend's lstm_cell
and `linear` (forward, and the input gradient of the backward) multiply by AVX-512 panels made at the first call of
the scope.

Backends: `reference` and every GPU backend run torch.nn.functional.linear (cuBLAS repacks nothing; no own GPU
kernel is written for a plain product); `cpu` the C++ ops fastseq2seq::linear / linear_bwd (csrc/linear.cpp),
which outside a scope, for non-float32 data or without AVX-512 are at::linear and its products.
"""
import contextlib

import torch
import torch.nn.functional as F

from fastseq2seq import _extension
from fastseq2seq.backends import select_backend


@contextlib.contextmanager
def constant_weights():
    """A promise that no weight handed to the ops changes inside the block, so the cpu backend packs each float32
    weight of lstm_cell and linear once per layout and reuses it until the block ends. A weight changed in place by
    an ordinary in-place op is repacked (its version counter moves); one changed through `.data` is not, which is
    why this is a scope the caller opens and not the default. The Seq2Seq decoders, Seq2Seq.forward and each
    `fastseq2seq train` step (forward and backward; the optimizer steps outside) run inside one."""
    if not _extension.loaded() or torch.compiler.is_compiling():  # a compiled graph keeps no host-side state
        yield
        return
    torch.ops.fastseq2seq.constant_weights_scope(True)
    try:
        yield
    finally:
        torch.ops.fastseq2seq.constant_weights_scope(False)


def linear_reference(input, weight, bias=None):
    return F.linear(input, weight, bias)


def linear(input, weight, bias=None, *, backend=None):
    """input [..., K] @ weight [N, K]^T + bias [N] -> [..., N]. The C++ op (with its backward op) runs on the cpu
    backend; the other backends run torch.nn.functional.linear."""
    if select_backend(backend, input.device, "linear") == "cpu":
        return torch.ops.fastseq2seq.linear(input, weight, bias)
    return linear_reference(input, weight, bias)


def linear_argmax_reference(input, weight, bias=None):
    return F.linear(input, weight, bias).argmax(-1)


def linear_argmax(input, weight, bias=None, *, backend=None):
    """argmax(linear(input, weight, bias), -1) -> int64 [...]: a greedy decoder's choice of token, ties to the first
    index and NaN counting as the largest, as torch.argmax. On the cpu backend the C++ op, whose argmax is
    vectorized (aten's is not: ~230 us for [64, 8000] against ~20); elsewhere the reference."""
    if select_backend(backend, input.device, "linear_argmax") == "cpu":
        return torch.ops.fastseq2seq.linear_argmax(input, weight, bias)
    return linear_argmax_reference(input, weight, bias)


if _extension.loaded():

    @torch.library.register_fake("fastseq2seq::linear")
    def _linear_fake(input, weight, bias):
        return input.new_empty(*input.shape[:-1], weight.shape[0])

    @torch.library.register_fake("fastseq2seq::linear_bwd")
    def _linear_bwd_fake(grad_output, input, weight, has_bias):
        return (torch.empty_like(input, memory_format=torch.contiguous_format),
                torch.empty_like(weight, memory_format=torch.contiguous_format),
                weight.new_empty(weight.shape[0] if has_bias else 0))

    def _setup_context(ctx, inputs, output):
        input, weight, bias = inputs
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None

    def _backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input, grad_weight, grad_bias = torch.ops.fastseq2seq.linear_bwd(grad_output, input, weight, ctx.has_bias)
        return grad_input, grad_weight, grad_bias if ctx.has_bias else None

    torch.library.register_autograd("fastseq2seq::linear", _backward, setup_context=_setup_context)

    @torch.library.register_fake("fastseq2seq::linear_argmax")
    def _linear_argmax_fake(input, weight, bias):
        return input.new_empty(input.shape[:-1], dtype=torch.long)
