"""Registers an op's fused implementations with torch.library: fake kernels and autograd, once per op pair."""
import torch

from fastseq2seq import _extension


def register_fused_ops(name, fwd_fake, bwd_fake, autograd_backward, setup_context):
    """{backend: (forward op, backward op)} for fastseq2seq::<name>_fwd/_bwd (C++: cpu and cuda, when the extension
    is loaded) and fastseq2seq::<name>_fwd_triton/_bwd_triton; autograd_backward(bwd_op) builds the backward."""
    ops = torch.ops.fastseq2seq
    fused = {"triton": (getattr(ops, f"{name}_fwd_triton").default, getattr(ops, f"{name}_bwd_triton").default)}
    if _extension.loaded():
        cpp = (getattr(ops, f"{name}_fwd").default, getattr(ops, f"{name}_bwd").default)
        fused.update(cpu=cpp, cuda=cpp)
    for fwd, bwd in set(fused.values()):
        torch.library.register_fake(fwd)(fwd_fake)
        torch.library.register_fake(bwd)(bwd_fake)
        torch.library.register_autograd(fwd, autograd_backward(bwd), setup_context=setup_context)
    return fused
