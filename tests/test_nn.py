import copy
import importlib
import itertools
import pickle
import random
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastseq2seq
from fastseq2seq.nn import LSTM, Attention, LSTMCell, PrecomputedKeys, convert_lstm, revert_lstm
from fastseq2seq.ops import attention_reference

CPU_BACKENDS = [b for b in fastseq2seq.available_backends("cpu")]
GPU_BACKENDS = [pytest.param(b, marks=[pytest.mark.gpu, pytest.mark.skipif(
    not (torch.cuda.is_available() and b in fastseq2seq.available_backends("cuda")),
    reason=f"{b} on cuda is not available")]) for b in ("cuda", "triton")]
lstm_module = importlib.import_module("fastseq2seq.nn.lstm")
TOL = {torch.float64: dict(atol=1e-9, rtol=1e-7), torch.float32: dict(atol=2e-5, rtol=1e-4)}


def lstm_configs(n=14, seed=0):
    rng = random.Random(seed)
    grid = list(itertools.product([1, 2, 3], [False, True], [False, True], [False, True], [False, True],
                                  [False, True], [torch.float64, torch.float32]))
    return rng.sample(grid, n)


def pair(cls, torch_cls, *args, **kwargs):
    ref = torch_cls(*args, **kwargs)
    ours = cls(*args, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def run_both(ours, ref, make_input, hx, backend):
    outs, grads = [], []
    for module in (ours, ref):
        module.zero_grad()
        x = make_input()
        with fastseq2seq.use_backend(backend):
            out, (h, c) = module(x, hx)
        data = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
        (data.square().sum() + h.sum() + 2 * c.sum()).backward()
        outs.append((out, h, c))
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
    return outs, grads


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layers,bidirectional,batch_first,bias,packed,with_hx,dtype", lstm_configs())
def test_lstm_matches_torch(backend, layers, bidirectional, batch_first, bias, packed, with_hx, dtype):
    if backend == "triton" and dtype == torch.float64 and layers == 3:
        pytest.skip("keep the interpreter run short")
    torch.manual_seed(0)
    T, B, I, H = 6, 4, 5, 7
    ours, ref = pair(LSTM, torch.nn.LSTM, I, H, num_layers=layers, bias=bias, batch_first=batch_first,
                     dropout=0.3 if layers > 1 else 0.0, bidirectional=bidirectional, dtype=dtype)
    ours.eval(), ref.eval()  # dropout is a no-op in eval mode
    D = 2 if bidirectional else 1
    x = torch.randn(B, T, I, dtype=dtype) if batch_first else torch.randn(T, B, I, dtype=dtype)
    lengths = torch.tensor([6, 2, 5, 1])
    hx = (torch.randn(layers * D, B, H, dtype=dtype), torch.randn(layers * D, B, H, dtype=dtype)) if with_hx else None

    def make_input():
        xi = x.clone().requires_grad_()
        return pack_padded_sequence(xi, lengths, batch_first=batch_first, enforce_sorted=False) if packed else xi

    (o1, h1, c1), (o2, h2, c2) = (r for r in run_both(ours, ref, make_input, hx, backend)[0])
    _, (g1, g2) = run_both(ours, ref, make_input, hx, backend)
    if packed:
        assert type(o1) is type(o2)
        assert torch.equal(o1.batch_sizes, o2.batch_sizes) and torch.equal(o1.sorted_indices, o2.sorted_indices)
        o1, o2 = o1.data, o2.data
    tol = TOL[dtype]
    torch.testing.assert_close(o1, o2, **tol)
    torch.testing.assert_close(h1, h2, **tol)
    torch.testing.assert_close(c1, c2, **tol)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], **tol, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("layers,batch_first,packed,with_hx", [(1, False, False, False), (2, True, True, True),
                                                               (3, False, True, False)])
def test_bidirectional_lstm_on_gpu_runs_directions_on_two_streams_and_matches_torch(backend, layers, batch_first,
                                                                                    packed, with_hx, monkeypatch):
    torch.manual_seed(0)
    T, B, I, H = 9, 5, 6, 8
    ref = torch.nn.LSTM(I, H, num_layers=layers, batch_first=batch_first, bidirectional=True, dtype=torch.float64)
    ours = LSTM(I, H, num_layers=layers, batch_first=batch_first, bidirectional=True, device="cuda")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(B, T, I, dtype=torch.float64) if batch_first else torch.randn(T, B, I, dtype=torch.float64)
    lengths = torch.tensor([9, 3, 1, 7, 9])
    hx = (torch.randn(2 * layers, B, H, dtype=torch.float64), torch.randn(2 * layers, B, H, dtype=torch.float64))
    streams = []
    layer_op = lstm_module.lstm_layer

    def lstm_layer_noting_its_stream(*args, reverse=False, **kwargs):
        streams.append((reverse, torch.cuda.current_stream()))
        return layer_op(*args, reverse=reverse, **kwargs)

    monkeypatch.setattr(lstm_module, "lstm_layer", lstm_layer_noting_its_stream)
    results = []
    for module, to in ((ours, dict(device="cuda", dtype=torch.float32)), (ref, {})):
        xi = x.to(**to).requires_grad_()
        inp = pack_padded_sequence(xi, lengths, batch_first=batch_first, enforce_sorted=False) if packed else xi
        with fastseq2seq.use_backend(backend):
            out, (h, c) = module(inp, tuple(t.to(**to) for t in hx) if with_hx else None)
        out = out.data if packed else out
        (out.square().sum() + h.sum() + 2 * c.sum()).backward()
        grads = (xi.grad, *(p.grad for p in module.parameters()))
        results.append([t.detach().cpu().double() for t in (out, h, c, *grads)])
    for ours_t, ref_t in zip(*results):
        torch.testing.assert_close(ours_t, ref_t, **TOL[torch.float32])
    main = torch.cuda.current_stream()
    assert len(streams) == 2 * layers
    assert all((stream == main) != reverse for reverse, stream in streams)


def test_lstm_state_dict_loads_both_ways_and_unbatched_input():
    ours, ref = pair(LSTM, torch.nn.LSTM, 3, 4, num_layers=2)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 3)
    torch.testing.assert_close(ours(x)[0], ref(x)[0])
    hx = (torch.randn(2, 4), torch.randn(2, 4))
    for a, b in zip(ours(x, hx)[1], ref(x, hx)[1]):
        torch.testing.assert_close(a, b)


def test_lstm_bad_input_raises_like_torch():
    ours, ref = pair(LSTM, torch.nn.LSTM, 3, 4)
    for bad in (torch.randn(5, 2, 4), torch.randn(2, 3, 5, 3)):
        with pytest.raises((RuntimeError, ValueError)) as theirs:
            ref(bad)
        with pytest.raises(type(theirs.value)):
            ours(bad)
    with pytest.raises(RuntimeError, match="Expected hidden"):
        ours(torch.randn(5, 2, 3), (torch.randn(1, 3, 4), torch.randn(1, 3, 4)))


def test_lstm_dropout_in_training_changes_output_and_is_off_in_eval():
    torch.manual_seed(0)
    ours = LSTM(3, 4, num_layers=2, dropout=0.5)
    x = torch.randn(5, 2, 3)
    ours.eval()
    a, b = ours(x)[0], ours(x)[0]
    torch.testing.assert_close(a, b)
    ours.train()
    assert not torch.allclose(ours(x)[0], a)


def test_lstm_proj_size_falls_back_to_torch_with_one_warning():
    ours, ref = pair(LSTM, torch.nn.LSTM, 3, 6, proj_size=2)
    LSTM._warned_fallback = False
    x = torch.randn(4, 2, 3)
    with pytest.warns(UserWarning, match="proj_size"):
        out = ours(x)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(x)
    torch.testing.assert_close(out, ref(x)[0])


def test_lstm_pickle_deepcopy_half_and_to():
    ours = LSTM(3, 4)
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert type(clone) is LSTM
        x = torch.randn(2, 1, 3)
        torch.testing.assert_close(clone(x)[0], ours(x)[0])
    assert ours.double().weight_ih_l0.dtype == torch.float64


def test_lstm_torch_compile_fullgraph():
    torch._dynamo.reset()
    ours = LSTM(3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3)
    compiled = torch.compile(ours, fullgraph=True)
    torch.testing.assert_close(compiled(x)[0], ours(x)[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("batched,with_hx", [(True, True), (True, False), (False, True), (False, False)])
def test_lstm_cell_matches_torch(backend, batched, with_hx):
    ours, ref = pair(LSTMCell, torch.nn.LSTMCell, 5, 7, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64) if batched else torch.randn(5, dtype=torch.float64)
    shape = (3, 7) if batched else (7,)
    hx = (torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)) if with_hx else None
    with fastseq2seq.use_backend(backend):
        outs = ours(x, hx)
    for a, b in zip(outs, ref(x, hx)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError):
        ours(torch.randn(2, 3, 5, dtype=torch.float64))


class LanguageModel(torch.nn.Module):
    def __init__(self, vocab=20, emb=6, hidden=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, emb)
        self.lstm = torch.nn.LSTM(emb, hidden, num_layers=2, batch_first=True)
        self.out = torch.nn.Linear(hidden, vocab)

    def forward(self, tokens):
        return self.out(self.lstm(self.embed(tokens))[0])


class Tagger(torch.nn.Module):
    """A bidirectional encoder over packed input with an LSTMCell head."""

    def __init__(self, vocab=20, emb=6, hidden=8, tags=5):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, emb)
        self.encoder = torch.nn.LSTM(emb, hidden, bidirectional=True)
        self.head = torch.nn.LSTMCell(2 * hidden, hidden)
        self.out = torch.nn.Linear(hidden, tags)

    def forward(self, tokens, lengths):
        packed = pack_padded_sequence(self.embed(tokens), lengths, enforce_sorted=False)
        enc, _ = pad_packed_sequence(self.encoder(packed)[0])
        state, logits = None, []
        for t in range(enc.shape[0]):
            state = self.head(enc[t], state)
            logits.append(self.out(state[0]))
        return torch.stack(logits)


@pytest.mark.parametrize("make_model,make_args", [
    (LanguageModel, lambda: (torch.randint(0, 20, (3, 7)),)),
    (Tagger, lambda: (torch.randint(0, 20, (6, 3)), torch.tensor([6, 3, 4]))),
])
def test_convert_lstm_keeps_outputs_parameters_and_training(make_model, make_args):
    torch.manual_seed(0)
    model = make_model()
    args = make_args()
    before = model(*args)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    assert convert_lstm(model) is model
    assert any(isinstance(m, (LSTM, LSTMCell)) for m in model.modules())
    assert all(a is b for a, b in zip(model.parameters(), params))
    torch.testing.assert_close(model(*args), before, atol=1e-5, rtol=1e-4)
    target = torch.randint(0, before.shape[-1], before.shape[:-1])
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(*args).flatten(0, 1), target.flatten())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    revert_lstm(model)
    assert not any(isinstance(m, (LSTM, LSTMCell)) for m in model.modules())
    assert all(a is b for a, b in zip(model.parameters(), params))


@pytest.mark.parametrize("kind", Attention.KINDS)
@pytest.mark.parametrize("multi_query", [False, True])
def test_attention_module_matches_naive_chain(kind, multi_query):
    torch.manual_seed(0)
    B, S, Dq, Dk, Dv = 3, 5, 6 if kind != "dot" else 4, 4, 7
    module = Attention(Dq, Dk, Dv, kind=kind, dtype=torch.float64)
    q = torch.randn(B, 2, Dq, dtype=torch.float64) if multi_query else torch.randn(B, Dq, dtype=torch.float64)
    k, v = torch.randn(B, S, Dk, dtype=torch.float64), torch.randn(B, S, Dv, dtype=torch.float64)
    lengths = torch.tensor([5, 1, 3])
    if kind == "additive" and multi_query:
        q = q[:, 0]
    ctx, w = module(q, k, v, lengths=lengths)
    pre = module.precompute(k)
    assert isinstance(pre, PrecomputedKeys)
    ctx2, w2 = module(q, pre, v, lengths=lengths)
    torch.testing.assert_close(ctx, ctx2)
    mask = torch.arange(S)[None, :] < lengths[:, None]
    if kind == "additive":
        ref = attention_reference(q @ module.query_proj.weight.t(), k @ module.key_proj.weight.t() + module.key_proj.bias,
                                  v, mask=mask, score="additive", v=module.v)
    elif kind == "general":
        ref = attention_reference(q @ module.weight.t(), k, v, mask=mask)
    else:
        ref = attention_reference(q, k, v, mask=mask)
    torch.testing.assert_close(ctx, ref[0])
    torch.testing.assert_close(w, ref[1])
    with pytest.raises(ValueError):
        Attention(4, 5, kind="dot")


def test_lstm_under_distributed_data_parallel(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
        model = torch.nn.parallel.DistributedDataParallel(convert_lstm(copy.deepcopy(plain)))
        x = torch.randn(5, 2, 3)
        model(x)[0].square().sum().backward()
        plain(x)[0].square().sum().backward()
        for (name, a), b in zip(model.module.named_parameters(), plain.parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lstm_autocast_and_half_on_gpu(dtype):
    torch.manual_seed(0)
    ours, ref = pair(LSTM, torch.nn.LSTM, 16, 32, num_layers=2, bidirectional=True, device="cuda")
    x = torch.randn(7, 3, 16, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out = ours(x)[0]
        expected = ref(x)[0]
    assert out.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 5e-2  # 2 layers x 7 steps of rounding to 11 or 8 mantissa bits
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)
    ours.to(dtype)
    assert ours(x.to(dtype))[0].dtype == dtype
