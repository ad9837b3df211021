"""Every Triton kernel, as the launchers call it, compiled for an H100/H200 (sm_90) without a GPU.

The interpreter runs the kernels' Python, not their GPU compilation: a kernel can pass every interpreter test and
still fail to compile for a GPU (types, layouts, shared memory). Here the ops run once on small CPU tensors under
the interpreter with every launch recorded (kernel, argument types, constexpr values, num_warps) instead of
interpreted, with the tile sizes a GPU would use; a subprocess without the interpreter then compiles each recorded
launch through Triton's whole pipeline down to a cubin for GPUTarget("cuda", 90, 32): the float32 and float16
launches as recorded, the float16 ones again in bfloat16 and the float32 matrix products again in TF32; each must
fit sm_90's shared memory per block. Triton here is 3.8, the H200 image's 3.6: evidence, not proof.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import interpreted_triton

pytestmark = pytest.mark.skipif(not interpreted_triton(), reason="records launches through the Triton interpreter")

RECURRENCE_ENV = "FASTSEQ2SEQ_LSTM_RECURRENCE"
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
         torch.int64: "i64", torch.int32: "i32", torch.bool: "i1", torch.uint8: "u8"}

COMPILE = r"""
import concurrent.futures, importlib, json, multiprocessing, os, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SHARED_MEMORY_LIMIT = 232448  # 227 KiB: the most one block may opt in to on sm_90
DTYPES = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16, "fp64": tl.float64}


def compile_one(launch):
    module, name = launch["kernel"].rsplit(".", 1)
    fn = getattr(importlib.import_module(module), name)
    constexprs = {k: DTYPES.get(v, v) if isinstance(v, str) and v in DTYPES and k != "DOT_PRECISION" else v
                  for k, v in launch["constexprs"].items()}
    signature = dict(launch["signature"], **{k: "constexpr" for k in constexprs})
    what = f"{launch['kernel']} {launch['signature']} {launch['constexprs']} {launch['options']}"
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32), options=launch["options"])
    except Exception as error:  # report every failing launch, not only the first
        return f"{what}: {type(error).__name__}: {str(error)[:2000]}"
    if compiled.metadata.shared > SHARED_MEMORY_LIMIT:
        return f"{what}: needs {compiled.metadata.shared} bytes of shared memory, sm_90 has {SHARED_MEMORY_LIMIT}"
    return None


launches = json.load(sys.stdin)
fork = multiprocessing.get_context("fork")
with concurrent.futures.ProcessPoolExecutor(os.cpu_count() or 1, mp_context=fork) as pool:
    failures = [failure for failure in pool.map(compile_one, launches) if failure]
print(json.dumps(failures))
"""


def _record_launches(monkeypatch):
    """Runs each Triton launcher path once under the interpreter; returns the distinct launches."""
    from triton.runtime.interpreter import InterpretedFunction

    import fastseq2seq.kernels.attention
    from fastseq2seq.ops import attention, lstm_cell, lstm_layer

    launches = {}
    def recording_run(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args), **kwargs)
        constexpr_names = {n for n, p in _parameters(self.fn).items() if "constexpr" in str(p.annotation)}
        signature, constexprs = {}, {}
        for name, value in bound.items():
            if name in ("num_warps", "num_stages"):
                continue
            if name in constexpr_names:
                constexprs[name] = _constexpr_value(value)
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + TYPES[value.dtype]
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int):
                signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise AssertionError(f"{self.fn.__name__}: argument {name} of type {type(value)} not handled")
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        launch = {"kernel": f"{self.fn.__module__}.{self.fn.__name__}", "signature": signature,
                  "constexprs": constexprs, "options": options}
        launches[json.dumps(launch, sort_keys=True)] = launch
        # Not run: the launch sequence depends on shapes only, and interpreting 512-wide tiles takes minutes.

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    monkeypatch.setattr(fastseq2seq.kernels.attention, "triton_interpreted", lambda: False)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        def rand(*shape):
            return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

        B, I, H, T, S = 3, 5, 20, 4, 6
        x, h, c = rand(B, I), rand(B, H), rand(B, H)
        w_ih, w_hh, b_ih, b_hh = rand(4 * H, I), rand(4 * H, H), rand(4 * H), rand(4 * H)
        for bias in ((b_ih, b_hh), (None, None)):
            sum(t.float().sum() for t in lstm_cell(x, (h, c), w_ih, w_hh, *bias, backend="triton")).backward()
        xs = rand(T, B, I)
        for mode in ("per-step", "persistent"):
            monkeypatch.setenv(RECURRENCE_ENV, mode)
            for lengths in (None, torch.tensor([4, 0, 2])):
                for reverse in (False, True):
                    out, (h_n, c_n) = lstm_layer(xs, (h, c), w_ih, w_hh, b_ih, b_hh, lengths=lengths,
                                                 reverse=reverse, backend="triton")
                    (out.float().sum() + h_n.float().sum() + c_n.float().sum()).backward()
        # The program loop's largest size (H = 64: eight warps, W_hh's blocks on chip).
        H64 = 64
        monkeypatch.setenv(RECURRENCE_ENV, "persistent")
        lstm_layer(xs, (rand(B, H64), rand(B, H64)), rand(4 * H64, I), rand(4 * H64, H64), rand(4 * H64),
                   rand(4 * H64), backend="triton")[0].float().sum().backward()
        monkeypatch.delenv(RECURRENCE_ENV)
        # Attention at the sizes a GPU runs (D = Dv = 512 as the benchmarks, and a 1024-wide value) with the GPU's
        # tile choice, not the interpreter's smaller one.
        mask = torch.tensor([[True] * S, [True, False] * (S // 2), [False] * S])
        # The 1024-wide value block only in float32, the largest in shared memory.
        for D, Dv in ((512, 512),) + (((64, 1024),) if dtype == torch.float32 else ()):
            for Tq in (None, 3):
                q = rand(B, D) if Tq is None else rand(B, Tq, D)
                k, v_, vv = rand(B, S, D), rand(B, S, Dv), rand(D)
                for score, extra in (("dot", {}), ("additive", {"v": vv})):
                    for return_weights in (True, False):
                        for m in (None, mask):
                            ctx, w = attention(q, k, v_, mask=m, score=score, return_weights=return_weights,
                                               backend="triton", **extra)
                            loss = ctx.float().sum() + (w.float().square().sum() if w is not None else 0)
                            loss.backward()
    return list(launches.values())


def _parameters(fn):
    import inspect

    return inspect.signature(fn).parameters


def _constexpr_value(value):
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    name = str(value)  # a tl.dtype such as fp32
    return name


def _gpu_variants(launches):
    """The recorded launches, plus what a GPU also runs and the interpreter cannot: the float16 launches with
    bfloat16 data, and the float32 matrix products in TF32 (when torch allows TF32 for matmuls)."""
    extra = []
    for launch in launches:
        signature, constexprs = launch["signature"], launch["constexprs"]
        if any(t == "*fp16" for t in signature.values()):
            extra.append(dict(launch, signature={k: "*bf16" if t == "*fp16" else t for k, t in signature.items()},
                              constexprs={k: "bf16" if v == "fp16" else v for k, v in constexprs.items()}))
        if constexprs.get("DOT_PRECISION") == "ieee" and "*fp32" in signature.values():
            extra.append(dict(launch, constexprs=dict(constexprs, DOT_PRECISION="tf32")))
    return launches + extra


def test_every_triton_kernel_compiles_for_sm90(monkeypatch):
    launches = _gpu_variants(_record_launches(monkeypatch))
    kernels = {launch["kernel"] for launch in launches}
    assert len(kernels) >= 8, f"too few kernels recorded: {sorted(kernels)}"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE], input=json.dumps(launches), capture_output=True,
                            text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(failures)
