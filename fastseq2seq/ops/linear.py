"""linear: torch.nn.functional.linear for the products of a decoder step, and `constant_weights`, the scope in which
the cpu backend packs each weight once (fastseq2seq::constant_weights_scope; csrc/weight_panels.h).

A decoder step multiplies a few rows (the batch, or batch x beam) by the same weights at every step, and MKL's sgemm
repacks the whole weight at every call: on the 2-core AVX-512 development machine, [64, 512] @ [512, 8000] runs at
117 GFLOP/s that way against 213 from panels packed once. Inside `constant_weights()` the cpu backend's lstm_cell
forward and `linear` (without autograd) multiply by AVX-512 panels made at the first call of the scope.

Backends: `reference` and every GPU backend run torch.nn.functional.linear (cuBLAS repacks nothing; no own GPU
kernel is written for a plain product); `cpu` the C++ op fastseq2seq::linear (csrc/linear.cpp), which outside a
scope, for non-float32 data or without AVX-512 is at::linear itself.
"""
import contextlib

import torch
import torch.nn.functional as F

from fastseq2seq import _extension
from fastseq2seq.backends import select_backend


@contextlib.contextmanager
def constant_weights():
    """A promise that no weight handed to the ops changes inside the block, so the cpu backend packs each float32
    weight of lstm_cell (forward) and linear once and reuses it until the block ends. A weight changed in place by
    an ordinary in-place op is repacked (its version counter moves); one changed through `.data` is not, which is
    why this is a scope the caller opens and not the default. The Seq2Seq decoders run inside one."""
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


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear(input, weight, bias=None, *, backend=None):
    """input [..., K] @ weight [N, K]^T + bias [N] -> [..., N]. The C++ op runs on the cpu backend when no gradient
    is needed (decoding); with autograd, and on the other backends, torch.nn.functional.linear."""
    if select_backend(backend, input.device, "linear") == "cpu" and not _needs_grad(input, weight, bias):
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

    @torch.library.register_fake("fastseq2seq::linear_argmax")
    def _linear_argmax_fake(input, weight, bias):
        return input.new_empty(input.shape[:-1], dtype=torch.long)
