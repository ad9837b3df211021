"""cross_entropy: the label-smoothed cross-entropy of logits rows against class ids, per row, as
torch.nn.functional.cross_entropy(..., reduction="none") gives it: a translation model's loss over its output layer.

Over [B*T, V] logits torch runs log_softmax, the nll gather, the smoothing sum and their backwards as separate passes
over the whole matrix (~82 ms fwd+bwd for [1920, 8000] on the 2-core development machine); the cpu backend's C++ ops
(csrc/cross_entropy.cpp) read each row once forward and read it and write its gradient once backward.

Backends: `cpu` the C++ ops fastseq2seq::cross_entropy_fwd / _bwd; `reference` and every GPU backend
torch.nn.functional.cross_entropy (no own GPU kernel: the CPU training step is where the passes were measured).
"""
import torch
import torch.nn.functional as F

from fastseq2seq import _extension
from fastseq2seq.backends import select_backend


def cross_entropy_reference(logits, target, ignore_index=-100, label_smoothing=0.0):
    return F.cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction="none")


def cross_entropy(logits, target, *, ignore_index=-100, label_smoothing=0.0, backend=None):
    """logits [N, V], target int64 [N] -> loss [N]: -sum_j q_j log softmax(logits)_j with q = (1 - label_smoothing)
    one_hot(target) + label_smoothing / V, and 0 where target == ignore_index. Sum or average it yourself."""
    if select_backend(backend, logits.device, "cross_entropy") == "cpu":
        loss, _ = torch.ops.fastseq2seq.cross_entropy_fwd(logits, target, ignore_index, float(label_smoothing))
        return loss
    return cross_entropy_reference(logits, target, ignore_index, label_smoothing)


if _extension.loaded():

    @torch.library.register_fake("fastseq2seq::cross_entropy_fwd")
    def _cross_entropy_fwd_fake(logits, target, ignore_index, label_smoothing):
        return logits.new_empty(logits.shape[0]), logits.new_empty(logits.shape[0])

    @torch.library.register_fake("fastseq2seq::cross_entropy_bwd")
    def _cross_entropy_bwd_fake(grad_loss, logits, target, lse, ignore_index, label_smoothing):
        return torch.empty_like(logits, memory_format=torch.contiguous_format)

    def _setup_context(ctx, inputs, output):
        logits, target, ctx.ignore_index, ctx.label_smoothing = inputs
        ctx.save_for_backward(logits, target, output[1])

    def _backward(ctx, grad_loss, _grad_lse):
        logits, target, lse = ctx.saved_tensors
        grad_logits = torch.ops.fastseq2seq.cross_entropy_bwd(grad_loss, logits, target, lse, ctx.ignore_index,
                                                              ctx.label_smoothing)
        return grad_logits, None, None, None

    torch.library.register_autograd("fastseq2seq::cross_entropy_fwd", _backward, setup_context=_setup_context)
