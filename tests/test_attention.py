import pytest
import torch
from conftest import assert_close, backend_cases, interpreted_triton

import fastseq2seq
from fastseq2seq.ops import attention, attention_reference

# (B, T, S, D, Dv); T None is the single-step query [B, D]. Sizes sit off every block size.
SHAPES = [(2, None, 1, 1, 1), (3, None, 37, 19, 23), (2, 3, 20, 33, 17), (1, 17, 5, 16, 2)]
MASKS = ["all_real", "random", "single_real", "empty_row", "lengths"]
SCORES = ["dot", "additive"]


def make_inputs(B, T, S, D, Dv, dtype, device, score, seed=0, logit_scale=1.0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(device=device, dtype=dtype)

    query = rand(B, D, s=logit_scale) if T is None else rand(B, T, D, s=logit_scale)
    v = rand(D, s=logit_scale) if score == "additive" else None
    return query, rand(B, S, D), rand(B, S, Dv), v


def make_padding(kind, B, S, device, seed=0):
    """(mask, lengths) for one of MASKS; every row keeps a real position unless the kind says otherwise."""
    g = torch.Generator().manual_seed(seed)
    if kind == "all_real":
        return None, None
    if kind == "lengths":
        return None, torch.randint(1, S + 1, (B,), generator=g).to(device)
    if kind == "single_real":
        mask = torch.zeros(B, S, dtype=torch.bool)
        mask[torch.arange(B), torch.randint(0, S, (B,), generator=g)] = True
        return mask.to(device), None
    mask = torch.rand(B, S, generator=g) < 0.6
    mask[:, 0] |= ~mask.any(1)
    if kind == "empty_row":
        mask[0] = False
    return mask.to(device), None


def forward_backward(query, keys, values, v, backend, return_weights=True, **kwargs):
    """Outputs and the gradients of query, keys, values (and v) under random upstream gradients of both outputs."""
    leaves = [t.detach().clone().requires_grad_() for t in (query, keys, values) + ((v,) if v is not None else ())]
    context, weights = attention(*leaves[:3], v=leaves[3] if v is not None else None, backend=backend,
                                 return_weights=return_weights, **kwargs)
    g = torch.Generator().manual_seed(1)
    outs = (context, weights) if return_weights else (context,)
    grads = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outs]
    torch.autograd.backward(outs, grads)
    return outs, [t.grad for t in leaves]


def reference_of(query, keys, values, v, **kwargs):
    as64 = [t.double() if t is not None else None for t in (query, keys, values, v)]
    return forward_backward(*as64, "reference", **kwargs)


def grad_scale(name, B, T, S):
    """keys and values gradients add over the query rows, v's over every (row, position)."""
    return {"keys": (T or 1) ** 0.5, "values": (T or 1) ** 0.5, "v": (B * (T or 1) * S) ** 0.5}.get(name, 1.0)


NAMES = ["query", "keys", "values", "v"]


def check_against_reference(outs, grads, ref_outs, ref_grads, dtype, device, shape):
    B, T, S, _, _ = shape
    for name, out, ref in zip(("context", "weights"), outs, ref_outs):
        assert out.dtype == dtype and out.device.type == torch.device(device).type
        assert_close(out, ref, dtype, device, name)
    for name, grad, ref in zip(NAMES, grads, ref_grads):
        assert torch.isfinite(grad).all(), f"grad {name} is not finite"
        assert_close(grad, ref, dtype, device, f"grad {name}", scale=grad_scale(name, B, T, S))


def too_slow_for_the_interpreter(backend, device, shape, kind):
    # Each interpreted program costs milliseconds: run the Triton interpreter on a subset.
    return backend == "triton" and device == "cpu" and (shape[2] > 20 or kind in ("single_real", "all_real"))


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("score", SCORES)
def test_matches_reference(backend, device, dtype, shape, kind, score):
    if too_slow_for_the_interpreter(backend, device, shape, kind):
        pytest.skip("covered by the compiled backends; the interpreter runs the smaller cases")
    B, T, S, D, Dv = shape
    query, keys, values, v = make_inputs(*shape, dtype, device, score)
    mask, lengths = make_padding(kind, B, S, device)
    outs, grads = forward_backward(query, keys, values, v, backend, mask=mask, lengths=lengths, score=score)
    ref_outs, ref_grads = reference_of(query, keys, values, v, mask=mask, lengths=lengths, score=score)
    check_against_reference(outs, grads, ref_outs, ref_grads, dtype, device, shape)
    if kind == "empty_row":  # zeros, never NaN, for the row without a real position
        for t in list(outs) + [grads[0]]:
            assert not t[0].any()


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("score", SCORES)
def test_without_weights(backend, device, dtype, score):
    shape = (2, 3, 9, 5, 4)
    query, keys, values, v = make_inputs(*shape, dtype, device, score)
    mask, _ = make_padding("empty_row", 2, 9, device)
    (context,), grads = forward_backward(query, keys, values, v, backend, return_weights=False, mask=mask, score=score)
    _, weights = attention(query, keys, values, mask=mask, score=score, v=v, return_weights=False, backend=backend)
    assert weights is None
    (ref_context,), ref_grads = reference_of(query, keys, values, v, return_weights=False, mask=mask, score=score)
    check_against_reference((context,), grads, (ref_context,), ref_grads, dtype, device, shape)


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("score", SCORES)
def test_lengths_equal_the_mask(backend, device, dtype, score):
    B, S = 3, 11
    query, keys, values, v = make_inputs(B, 2, S, 6, 5, dtype, device, score)
    lengths = torch.tensor([11, 0, 4], device=device)
    mask = torch.arange(S, device=device) < lengths[:, None]
    by_lengths = forward_backward(query, keys, values, v, backend, lengths=lengths, score=score)
    by_mask = forward_backward(query, keys, values, v, backend, mask=mask, score=score)
    # GPU backwards add with atomics, in no fixed order: equal up to rounding
    for a, b in zip(by_lengths[0] + tuple(by_lengths[1]), by_mask[0] + tuple(by_mask[1])):
        assert_close(a, b, dtype, device)


@pytest.mark.parametrize("backend,device,dtype", backend_cases())
@pytest.mark.parametrize("score", SCORES)
def test_huge_logits_stay_finite(backend, device, dtype, score):
    # Scores in the thousands: a softmax without the running max overflows exp; half would overflow at 11.
    shape = (2, 2, 12, 8, 3)
    scale = 300.0 if score == "dot" else 2000.0
    query, keys, values, v = make_inputs(*shape, dtype, device, score, logit_scale=scale)
    mask, _ = make_padding("random", 2, 12, device)
    outs, grads = forward_backward(query, keys, values, v, backend, mask=mask, score=score)
    ref_outs, _ = reference_of(query, keys, values, v, mask=mask, score=score)
    for name, out, ref in zip(("context", "weights"), outs, ref_outs):
        assert torch.isfinite(out).all()
        assert_close(out, ref, dtype, device, name)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if b in fastseq2seq.available_backends("cpu")])
@pytest.mark.parametrize("score", SCORES)
def test_long_source(backend, score):
    shape = (2, None, 4096, 3, 2)
    query, keys, values, v = make_inputs(*shape, torch.float32, "cpu", score, logit_scale=2.0)
    mask, _ = make_padding("random", 2, 4096, "cpu")
    outs, grads = forward_backward(query, keys, values, v, backend, mask=mask, score=score)
    ref_outs, ref_grads = reference_of(query, keys, values, v, mask=mask, score=score)
    check_against_reference(outs, grads, ref_outs, ref_grads, torch.float32, "cpu", shape)


@pytest.mark.skipif("cpu" not in fastseq2seq.available_backends("cpu"), reason="the cpu backend is not built")
def test_cpu_dot_backward_across_query_chunks():
    """The CPU dot backward takes the query rows in chunks of 2^22 / (B * S) (512 here): T = 600 spans two."""
    shape = (2, 600, 4096, 3, 2)
    query, keys, values, v = make_inputs(*shape, torch.float32, "cpu", "dot")
    mask, _ = make_padding("empty_row", 2, 4096, "cpu")
    outs, grads = forward_backward(query, keys, values, v, "cpu", mask=mask, score="dot")
    ref_outs, ref_grads = reference_of(query, keys, values, v, mask=mask, score="dot")
    check_against_reference(outs, grads, ref_outs, ref_grads, torch.float32, "cpu", shape)


def cpu_fused_backends():
    return ["cpu"] * ("cpu" in fastseq2seq.available_backends("cpu")) + ["triton"] * interpreted_triton()


@pytest.mark.parametrize("backend", cpu_fused_backends())
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("T", [None, 3])
def test_gradcheck_float64(backend, score, T):
    query, keys, values, v = make_inputs(2, T, 5, 4, 3, torch.float64, "cpu", score)
    mask, _ = make_padding("empty_row", 2, 5, "cpu")
    leaves = [t.requires_grad_() for t in (query, keys, values) + ((v,) if v is not None else ())]

    def run(q, k, vals, *rest):
        return attention(q, k, vals, mask=mask, score=score, v=rest[0] if rest else None, backend=backend)

    assert torch.autograd.gradcheck(run, leaves)


def fused_ops():
    ops = [torch.ops.fastseq2seq.attention_fwd.default] if "cpu" in fastseq2seq.available_backends("cpu") else []
    if interpreted_triton():
        ops.append(torch.ops.fastseq2seq.attention_fwd_triton.default)
    return ops


@pytest.mark.parametrize("op", fused_ops(), ids=str)
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("return_weights", [True, False])
def test_opcheck(op, score, masked, return_weights):
    query, keys, values, v = make_inputs(2, 3, 6, 5, 4, torch.float32, "cpu", score)
    mask = make_padding("empty_row", 2, 6, "cpu")[0] if masked else None
    args = tuple(t.requires_grad_() for t in (query, keys, values)) + (mask, v.requires_grad_() if v is not None
                                                                       else None, return_weights)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("score", SCORES)
def test_torch_compile_fullgraph(score):
    query, keys, values, v = make_inputs(3, None, 7, 5, 4, torch.float32, "cpu", score)
    lengths = torch.tensor([7, 0, 3])
    torch._dynamo.reset()

    def run(q, k, vals, lengths, v):
        return attention(q, k, vals, lengths=lengths, score=score, v=v)

    compiled = torch.compile(run, fullgraph=True)
    for out, ref in zip(compiled(query, keys, values, lengths, v), run(query, keys, values, lengths, v)):
        torch.testing.assert_close(out, ref)


def test_reference_matches_manual_softmax():
    # The oracle against a hand-written chain: exp of the shifted scores over the real positions, normalized.
    query, keys, values, _ = make_inputs(2, None, 6, 4, 3, torch.float64, "cpu", "dot")
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    context, weights = attention_reference(query, keys, values, mask=mask)
    for b in range(2):
        real = mask[b].nonzero().squeeze(1)
        scores = keys[b, real] @ query[b]
        w = torch.exp(scores - scores.max())
        w = w / w.sum()
        torch.testing.assert_close(weights[b, real], w)
        assert not weights[b, ~mask[b]].any()
        torch.testing.assert_close(context[b], w @ values[b, real])


@pytest.mark.parametrize("backend", fastseq2seq.available_backends("cpu"))
@pytest.mark.parametrize("change,arg", [
    (dict(query=lambda a: a[0, 0]), "query"),                                  # 1-D query
    (dict(keys=lambda a: a[:, :, :-1]), "keys"),                               # D mismatch
    (dict(keys=lambda a: a[:1]), "keys"),                                      # B mismatch
    (dict(values=lambda a: a[:, :-1]), "values"),                              # S mismatch
    (dict(values=lambda a: a.double()), "values"),                             # mixed dtypes
    (dict(mask=lambda a: torch.ones(3, 7)), "mask"),                           # float mask
    (dict(mask=lambda a: torch.ones(3, 6, dtype=torch.bool)), "mask"),         # wrong S
    (dict(mask=lambda a: torch.ones(3, 7, dtype=torch.bool), lengths=lambda a: torch.full((3,), 7)), "mask"),
    (dict(lengths=lambda a: torch.tensor([7, 8, 1])), "lengths"),              # longer than S
    (dict(lengths=lambda a: torch.tensor([7, 2, 1], dtype=torch.int32)), "lengths"),
    (dict(score=lambda a: "additive"), "v"),                                   # additive without v
    (dict(v=lambda a: torch.ones(5)), "v"),                                    # v with dot scores
    (dict(score=lambda a: "general"), "score"),
])
def test_bad_input_names_the_argument(backend, change, arg):
    query, keys, values, _ = make_inputs(3, 2, 7, 5, 4, torch.float32, "cpu", "dot")
    kwargs = dict(query=query, keys=keys, values=values, mask=None, lengths=None, score="dot", v=None)
    for name, make in change.items():
        kwargs[name] = make(kwargs[name])
    q, k, vals = kwargs.pop("query"), kwargs.pop("keys"), kwargs.pop("values")
    with pytest.raises(ValueError, match=f"'{arg}'"):
        attention(q, k, vals, backend=backend, **kwargs)


@pytest.mark.parametrize("op", fused_ops(), ids=str)
def test_fused_op_checks_its_arguments(op):
    # The ops are public through torch.ops: they must not trust their caller.
    query, keys, values, v = make_inputs(2, 3, 6, 5, 4, torch.float32, "cpu", "additive")
    with pytest.raises(ValueError, match="'v'"):
        op(query, keys, values, None, v[:-1], True)
    with pytest.raises(ValueError, match="'mask'"):
        op(query, keys, values, torch.ones(2, 6), v, True)
