"""Triton kernels (installed as fastseq2seq.kernels). Importing a module here needs Triton.

Each module holds one op's `_..._fwd_kernel` / `_..._bwd_kernel` and their launchers. The launchers trust
their caller (fastseq2seq.ops) to have checked the arguments. On CPU tensors they run only under
TRITON_INTERPRET=1.
"""
