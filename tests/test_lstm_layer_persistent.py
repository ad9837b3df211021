"""The recurrence paths FASTSEQ2SEQ_LSTM_RECURRENCE chooses for lstm_layer: the persistent CUDA kernels (forward and
backward: the weight slice resident in shared memory, one cooperative launch a pass), the Triton program loop (one
program per batch block over all steps) and the Triton per-step launches captured in a CUDA graph. Each is forced and
compared with torch.nn.LSTM in float64, forward and backward, on both sides of its size rule; plus determinism,
poisoned buffers, which kernels run, the size rule itself and bad values of the variable. GPU tests are marked `gpu`;
the program loop also runs under the interpreter.
"""
import contextlib

import pytest
import torch
from conftest import HAS_CUDA, interpreted_triton
from test_lstm_layer import check_against_torch, make_inputs, random_lengths

import fastseq2seq
from fastseq2seq.backends import TRITON_IMPORT_ERROR

ENV = "FASTSEQ2SEQ_LSTM_RECURRENCE"
# H200: 132 SMs, 227 KB of opt-in shared memory per block, sm_90.
H200 = (132, 232448, 9)

needs_extension = pytest.mark.skipif("cpu" not in fastseq2seq.available_backends("cpu"),
                                     reason="the C++ extension is not built")
needs_triton = pytest.mark.skipif(TRITON_IMPORT_ERROR is not None, reason="Triton is not installed")
interpreter_only = pytest.mark.skipif(not interpreted_triton(), reason="needs TRITON_INTERPRET=1")


def gpu_backend(backend):
    runs = HAS_CUDA and backend in fastseq2seq.available_backends("cuda")
    return [pytest.mark.gpu, pytest.mark.skipif(not runs, reason=f"{backend} on cuda is not available")]


cuda_only = gpu_backend("cuda")
triton_gpu_only = gpu_backend("triton")
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def plan(batch, hidden, dtype, device_numbers=H200, backward=False):
    """[units, rows, blocks, chunk, depth, splits, ld, smem bytes] of a persistent CUDA kernel; [] if it won't fit."""
    return torch.ops.fastseq2seq.lstm_layer_persistent_plan(batch, hidden, dtype, *device_numbers, backward)


def this_gpu():
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.multi_processor_count, props.shared_memory_per_block_optin, props.major


def kernel_names(fn):
    """Names of the CUDA kernels fn() launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events()}


# ---- the size rule (runs anywhere: it is a pure function of the device's numbers) ----

# The largest H that fits on an H200, per pass, dtype and batch: what the README states.
H200_LIMITS = {
    (False, torch.bfloat16): {8: 1584, 64: 1584, 128: 1584},
    (False, torch.float16): {8: 1584, 64: 1584, 128: 1584},
    (False, torch.float32): {8: 1056, 64: 1056, 128: 1056},
    (True, torch.bfloat16): {8: 872, 64: 856, 128: 840},
    (True, torch.float16): {8: 872, 64: 856, 128: 840},
    (True, torch.float32): {8: 592, 64: 588, 128: 580},
}


@needs_extension
@pytest.mark.parametrize("backward,dtype", list(H200_LIMITS), ids=str)
def test_size_rule_on_h200(backward, dtype):
    """Every H up to the limit fits, the next one does not."""
    for batch, largest in H200_LIMITS[(backward, dtype)].items():
        fits = [bool(plan(batch, h, dtype, backward=backward)) for h in range(1, largest + 2)]
        assert all(fits[:-1]) and not fits[-1], (batch, largest)


@needs_extension
@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 8, 17, 64, 130, 1000])
@pytest.mark.parametrize("hidden", [1, 7, 64, 100, 512, 1000, 1024, 1584])
def test_plan_invariants(backward, dtype, batch, hidden):
    """What the kernels rely on: whole tiles, one resident block per SM, every unit covered, the elementwise pairs
    within what a thread carries, rows 16-byte aligned, the shared memory within the limit."""
    sms, smem_limit, _ = H200
    p = plan(batch, hidden, dtype, backward=backward)
    if not p:
        return
    units, rows, blocks, chunk, depth, splits, ld, smem = p
    tensor_cores = dtype in (torch.float16, torch.bfloat16)
    assert rows == (units if backward else 4 * units) and units % 4 == 0 and rows % (16 if tensor_cores else 4) == 0
    assert chunk % 16 == 0 and 1 <= splits <= depth // 16
    assert blocks <= sms and units * blocks >= hidden > units * (blocks - 1)
    assert units * chunk <= 4 * 256
    element_size = torch.finfo(dtype).bits // 8
    assert depth == -(-(4 * hidden if backward else hidden) // 16) * 16 and ld == depth + 16 // element_size
    assert smem <= smem_limit


@needs_extension
def test_plan_refuses_what_cannot_run():
    assert plan(64, 2048, torch.bfloat16) == []                       # the W_hh slice alone is over 227 KB
    assert plan(64, 1024, torch.bfloat16, backward=True) == []        # 16 columns of W_hh and 16 rows of dgates
    assert plan(64, 512, torch.bfloat16, (132, 232448, 7)) == []      # before sm_80
    assert plan(0, 512, torch.float32) == [] and plan(8, 0, torch.float32) == []
    assert plan(64, 1024, torch.bfloat16, (132, 48 * 1024, 9)) == []  # without the opt-in shared memory


# ---- the variable ----

@needs_triton
@pytest.mark.parametrize("value,expected", [(None, "per-step"), ("", "per-step"), ("auto", "per-step"),
                                            ("per-step", "per-step"), ("graph", "graph"),
                                            ("persistent", "persistent")])
def test_triton_recurrence_values(monkeypatch, value, expected):
    from fastseq2seq.kernels import lstm_layer as kernels

    if value is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, value)
    assert kernels.recurrence() == expected


@needs_triton
def test_triton_bad_value_names_the_variable(monkeypatch):
    from fastseq2seq.kernels import lstm_layer as kernels

    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(ValueError, match=f"{ENV}.*'fast'"):
        kernels.recurrence()


@pytest.mark.parametrize("value", [pytest.param(v, marks=cuda_only) for v in ("fast", "Persistent")])
def test_cuda_bad_value_names_the_variable(monkeypatch, value):
    """The cuda backend takes auto, per-step, graph (per step there) and persistent."""
    monkeypatch.setenv(ENV, value)
    x, h0, c0, *weights = make_inputs(2, 3, 4, 5, torch.float32, "cuda")
    with pytest.raises(ValueError, match=f"{ENV}.*'{value}'"):
        fastseq2seq.ops.lstm_layer(x, (h0, c0), *weights, backend="cuda")


# ---- the Triton program loop, on the CPU through the interpreter ----

# (T, B, I, H, lengths, reverse): H <= 64 runs the program loop; B = 17 crosses its batch block, H = 37 and 64
# its padding and its largest block.
LOOP_CASES = [
    (1, 3, 5, 7, None, False),
    (6, 1, 4, 6, None, True),
    (7, 6, 3, 9, "random", False),
    (7, 6, 3, 9, "random", True),
    (3, 17, 5, 37, "random", True),
    (4, 5, 3, 64, "random", False),
]


@needs_triton
@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("T,B,I,H,lengths,reverse", LOOP_CASES, ids=lambda v: str(v))
def test_program_loop_interpreted(monkeypatch, dtype, T, B, I, H, lengths, reverse):
    from fastseq2seq.kernels import lstm_layer as kernels

    monkeypatch.setenv(ENV, "persistent")
    monkeypatch.setattr(kernels, "_run_steps", _must_not_run)
    check_against_torch("triton", "cpu", dtype, T, B, I, H, lengths, reverse)


def _must_not_run(*args, **kwargs):
    raise AssertionError("the per-step path ran where the program loop fits")


@needs_triton
@interpreter_only
@pytest.mark.parametrize("mode,H", [("persistent", 65), ("graph", 9)])
def test_interpreted_fallbacks_run_per_step(monkeypatch, mode, H):
    """Past the loop's size rule, and for graphs on CPU tensors, the per-step path runs."""
    from fastseq2seq.kernels import lstm_layer as kernels

    calls = []
    run_steps = kernels._run_steps
    monkeypatch.setattr(kernels, "_run_steps", lambda *args: calls.append(1) or run_steps(*args))
    monkeypatch.setenv(ENV, mode)
    check_against_torch("triton", "cpu", torch.float32, 3, 4, 3, H, "random", True)
    assert calls


@needs_triton
@interpreter_only
def test_program_loop_interpreted_is_deterministic(monkeypatch):
    monkeypatch.setenv(ENV, "persistent")
    assert_runs_identical("triton", "cpu", torch.float32, 5, 17, 4, 37)


def assert_runs_identical(backend, device, dtype, T, B, I, H):
    """Two runs on the same input: bit-identical outputs and gradients."""
    args = make_inputs(T, B, I, H, dtype, device)
    lengths = random_lengths(T, B).to(device)
    runs = []
    for _ in range(2):
        leaves = [a.detach().clone().requires_grad_() for a in args]
        output, (h_n, c_n) = fastseq2seq.ops.lstm_layer(leaves[0], (leaves[1], leaves[2]), *leaves[3:],
                                                        lengths=lengths, backend=backend)
        g = torch.Generator().manual_seed(1)
        grads_out = [torch.randn(o.shape, generator=g).to(o) for o in (output, h_n, c_n)]
        runs.append([output, h_n, c_n, *torch.autograd.grad((output, h_n, c_n), leaves, grads_out)])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


# ---- on the GPU ----

def rule_sides(dtype):
    """(B, H, forward fits, backward fits) on an H200, on both sides of both rules: small, tiles crossed, several
    batch chunks, the largest H each pass takes, and just past it."""
    fwd, bwd = H200_LIMITS[(False, dtype)][8], H200_LIMITS[(True, dtype)][8]
    return [(3, 9, True, True), (17, 37, True, True), (5, 100, True, True), (130, 512, True, True),
            (8, bwd, True, True), (8, bwd + 1, True, False), (20, 1024, True, False), (8, fwd, True, False),
            (4, fwd + 1, False, False)]


# Each shape with one of the four (lengths, reverse) combinations, in turn.
LENGTHS_REVERSE = [(None, False), ("random", True), ("random", False), (None, True)]
CUDA_CASES = [pytest.param(dtype, B, H, fwd, bwd, *LENGTHS_REVERSE[(d + i) % 4], marks=cuda_only,
                           id=f"{str(dtype)[6:]}-B{B}-H{H}-{LENGTHS_REVERSE[(d + i) % 4]}")
              for d, dtype in enumerate(GPU_DTYPES) for i, (B, H, fwd, bwd) in enumerate(rule_sides(dtype))]


@pytest.mark.parametrize("dtype,B,H,fwd,bwd,lengths,reverse", CUDA_CASES)
def test_cuda_persistent_matches_torch_lstm(monkeypatch, dtype, B, H, fwd, bwd, lengths, reverse):
    """Forward and backward; each pass runs persistent where its rule fits, per step elsewhere."""
    if this_gpu() == H200:  # elsewhere the same shapes fall on the sides that GPU's numbers give
        assert (bool(plan(B, H, dtype, this_gpu())), bool(plan(B, H, dtype, this_gpu(), backward=True))) == (fwd, bwd)
    monkeypatch.setenv(ENV, "persistent")
    check_against_torch("cuda", "cuda", dtype, 6, B, 5, H, lengths, reverse)


@pytest.mark.parametrize("B,H", [pytest.param(64, 512, marks=cuda_only), pytest.param(4, 1024, marks=cuda_only),
                                 pytest.param(4, 2100, marks=cuda_only)])
def test_cuda_persistent_kernels_run_where_they_fit(monkeypatch, B, H):
    monkeypatch.setenv(ENV, "persistent")
    args = [a.requires_grad_() for a in make_inputs(3, B, 4, H, torch.bfloat16, "cuda")]

    def forward_backward():
        output, (h_n, c_n) = fastseq2seq.ops.lstm_layer(args[0], (args[1], args[2]), *args[3:], backend="cuda")
        (output.sum() + h_n.sum() + c_n.sum()).backward()

    names = " ".join(kernel_names(forward_backward))
    for backward in (False, True):
        fits = bool(plan(B, H, torch.bfloat16, this_gpu(), backward=backward))
        pass_name = "bwd" if backward else "fwd"
        assert (f"lstm_layer_persistent_{pass_name}_kernel" in names) == fits, names
        assert (f"lstm_layer_step_{pass_name}_kernel" in names) == (not fits), names


@pytest.mark.parametrize("dtype", [pytest.param(d, marks=cuda_only, id=str(d)[6:]) for d in GPU_DTYPES])
def test_cuda_persistent_is_deterministic(monkeypatch, dtype):
    monkeypatch.setenv(ENV, "persistent")
    assert_runs_identical("cuda", "cuda", dtype, 9, 40, 8, 256)


@contextlib.contextmanager
def poisoned_allocations(numels, dtype):
    """Inside, new CUDA tensors come from a private pool whose free blocks were filled with NaN: an output element
    the kernel never writes stays NaN."""
    pool = torch.cuda.MemPool()
    with torch.cuda.use_mem_pool(pool):
        blocks = [torch.full((n,), float("nan"), dtype=dtype, device="cuda") for n in numels for _ in range(3)]
        del blocks
        probe = torch.empty(numels[0], dtype=dtype, device="cuda")
        assert probe.isnan().all(), "the pool did not hand back a poisoned block"
        del probe
        yield


def assert_all_written(T, B, H, lengths, output, h_n, c_n, gates, cells):
    for t in (output, h_n, c_n, gates, cells):
        assert not t.isnan().any()
    past = torch.arange(T, device=lengths.device)[:, None] >= lengths[None, :]  # [T, B]
    for t in (output, gates, cells):
        assert (t[past] == 0).all()


@pytest.mark.parametrize("dtype", [pytest.param(d, marks=cuda_only, id=str(d)[6:]) for d in GPU_DTYPES])
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_persistent_backward_writes_every_gradient(monkeypatch, dtype, reverse):
    """Poisoned buffers: an unwritten gate gradient would reach every gradient through the GEMMs after the loop."""
    monkeypatch.setenv(ENV, "persistent")
    T, B, I, H = 7, 19, 5, 48
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = make_inputs(T, B, I, H, dtype, "cuda")
    lengths = random_lengths(T, B).cuda()
    output, _, _, gates, cells = torch.ops.fastseq2seq.lstm_layer_fwd(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths,
                                                                     reverse)
    grads_in = [torch.randn_like(t) for t in (output, h0, c0)]
    with poisoned_allocations([T * B * 4 * H, B * 4 * H, B * H], dtype):
        grads = torch.ops.fastseq2seq.lstm_layer_bwd(*grads_in, x, h0, c0, w_ih, w_hh, lengths, reverse, output,
                                                     gates, cells)
        for grad in grads:
            assert not grad.isnan().any()


WRITE_CASES = [pytest.param(backend, mode, dtype, marks=gpu_backend(backend), id=f"{backend}-{mode}-{str(dtype)[6:]}")
               for backend, mode in (("cuda", "persistent"), ("triton", "persistent"), ("triton", "graph"))
               for dtype in GPU_DTYPES]


@pytest.mark.parametrize("backend,mode,dtype", WRITE_CASES)
@pytest.mark.parametrize("reverse", [False, True])
def test_every_output_is_written(monkeypatch, backend, mode, dtype, reverse):
    """Poisoned buffers: output, h_n, c_n and the saved gates and cells are all written, zero past each length."""
    monkeypatch.setenv(ENV, mode)
    T, B, I, H = 7, 19, 5, 48
    args = make_inputs(T, B, I, H, dtype, "cuda")
    lengths = random_lengths(T, B).cuda()
    op = torch.ops.fastseq2seq.lstm_layer_fwd if backend == "cuda" else torch.ops.fastseq2seq.lstm_layer_fwd_triton
    if mode == "graph":
        # The first call runs eagerly and captures; the replay writes into the graph's own buffers: poison those.
        from fastseq2seq.kernels import lstm_layer as kernels

        op(*args, lengths, reverse)
        graph = kernels._step_graph(T, B, H, dtype, args[0].device, True, reverse, kernels._dot_precision(dtype))
        for buffer in (graph.gates, graph.cells, graph.output, graph.h, graph.h_next, graph.c):
            buffer.fill_(float("nan"))
        assert_all_written(T, B, H, lengths, *op(*args, lengths, reverse))
    else:
        with poisoned_allocations([T * B * 4 * H, T * B * H, B * H], dtype):
            assert_all_written(T, B, H, lengths, *op(*args, lengths, reverse))


@pytest.mark.parametrize("dtype", [pytest.param(d, marks=triton_gpu_only, id=str(d)[6:]) for d in GPU_DTYPES])
@pytest.mark.parametrize("T,B,I,H,lengths,reverse", [(6, 17, 5, 37, "random", True), (5, 4, 3, 64, None, False),
                                                     (4, 5, 3, 65, "random", False)], ids=lambda v: str(v))
def test_triton_program_loop_on_gpu(monkeypatch, dtype, T, B, I, H, lengths, reverse):
    monkeypatch.setenv(ENV, "persistent")
    check_against_torch("triton", "cuda", dtype, T, B, I, H, lengths, reverse)


@pytest.mark.parametrize("dtype", [pytest.param(d, marks=triton_gpu_only, id=str(d)[6:]) for d in GPU_DTYPES])
@pytest.mark.parametrize("T,B,I,H,lengths,reverse", [(6, 17, 5, 37, "random", True), (5, 4, 3, 70, None, False)],
                         ids=lambda v: str(v))
def test_triton_graph_on_gpu(monkeypatch, dtype, T, B, I, H, lengths, reverse):
    """The first call captures, the later ones replay: both match, and one graph serves the key."""
    from fastseq2seq.kernels import lstm_layer as kernels

    monkeypatch.setenv(ENV, "graph")
    kernels._step_graph.cache_clear()
    for _ in range(3):
        check_against_torch("triton", "cuda", dtype, T, B, I, H, lengths, reverse)
    info = kernels._step_graph.cache_info()
    assert (info.misses, info.hits) == (1, 2)


@pytest.mark.parametrize("mode", [pytest.param(m, marks=triton_gpu_only) for m in ("graph", "persistent")])
def test_triton_paths_are_deterministic(monkeypatch, mode):
    monkeypatch.setenv(ENV, mode)
    assert_runs_identical("triton", "cuda", torch.bfloat16, 5, 17, 4, 37)
