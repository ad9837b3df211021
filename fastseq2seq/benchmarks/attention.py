"""attention: the fused op vs the eager chain it replaces, torch.compile of that chain and, for dot scores with many
query rows, torch.nn.functional.scaled_dot_product_attention; decoder steps (one query row) and teacher-forced
Luong attention (T = S query rows), forward and forward+backward. The eager chain, dot: bmm, masked_fill, softmax,
bmm; additive: add, tanh, matmul, masked_fill, softmax, bmm. The op and the chains return the weights; SDPA cannot,
so it is compared with the op's return_weights=False. D = Dv."""
import torch

from fastseq2seq.benchmarks.costs import attention_cost
from fastseq2seq.benchmarks.runner import measure
from fastseq2seq.benchmarks.timing import Candidate, forward_backward, forward_only
from fastseq2seq.ops import attention

NAME = "attention"
REPEATS = 20
GRID = {"cuda": {"B": [1, 64, 256], "S": [50, 400, 4096], "teacher_T": 50},
        # the CPU grid leaves out S=4096 and B=256: the eager additive chain's [B, T, S, D] tensor needs GBs there
        "cpu": {"B": [1, 64], "S": [50, 400], "teacher_T": 50}}
QUICK_GRID = {"B": [64], "S": [50], "teacher_T": 20}
TEACHER_B = 64


def add_arguments(parser):
    parser.add_argument("--score", nargs="+", default=["dot", "additive"], choices=["dot", "additive"])
    parser.add_argument("--B", type=int, nargs="+", help="batch sizes of the decoder-step shapes")
    parser.add_argument("--S", type=int, nargs="+", help="source lengths of the decoder-step shapes")
    parser.add_argument("--D", type=int, default=512)
    parser.add_argument("--teacher-T", type=int,
                        help=f"T = S of the teacher-forced shape (B={TEACHER_B}; default 50, quick 20); 0: none")
    passes = parser.add_mutually_exclusive_group()
    passes.add_argument("--forward", action="store_true", help="forward only")
    passes.add_argument("--backward", action="store_true", help="forward+backward only")


def eager_chain(query, keys, values, mask, v):
    """What a Seq2Seq decoder runs without the fused op; query [B, T, D]."""
    if v is None:
        scores = torch.bmm(query, keys.transpose(1, 2))
    else:
        scores = torch.tanh(query.unsqueeze(2) + keys.unsqueeze(1)).matmul(v)
    weights = torch.softmax(scores.masked_fill(~mask.unsqueeze(1), float("-inf")), dim=-1)
    return torch.bmm(weights, values), weights


def candidates(B, T, S, D, score, dtype, device, backward, compiled_chain, no_weights_cost, seed):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_(backward)

    query = rand(B, T, D, scale=D ** -0.5)
    keys, values = rand(B, S, D), rand(B, S, D)
    v = rand(D, scale=D ** -0.5) if score == "additive" else None
    lengths = torch.randint(S // 2 + 1, S + 1, (B,), generator=g)
    mask = (torch.arange(S) < lengths[:, None]).to(device)  # every row keeps a real position: eager stays finite
    q = query[:, 0] if T == 1 else query  # the op's single-step form
    inputs = [t for t in (query, keys, values, v) if t is not None]

    def step(fn):
        return forward_backward(fn, inputs) if backward else forward_only(fn)

    found = {"eager": Candidate(step(lambda: eager_chain(query, keys, values, mask, v)))}
    if compiled_chain is not None:
        found["compile(eager)"] = Candidate(step(lambda: compiled_chain(query, keys, values, mask, v)))
    found["fastseq2seq"] = Candidate(step(lambda: attention(q, keys, values, mask=mask, score=score, v=v)), ours=True,
                                     against=("eager", "compile(eager)"))
    if score == "dot" and T > 1:
        sdpa_mask = mask[:, None, None, :]
        found["sdpa (no weights)"] = Candidate(step(lambda: torch.nn.functional.scaled_dot_product_attention(
            query.unsqueeze(1), keys.unsqueeze(1), values.unsqueeze(1), attn_mask=sdpa_mask, scale=1.0)),
            cost=no_weights_cost)
        found["fastseq2seq (no weights)"] = Candidate(
            step(lambda: attention(q, keys, values, mask=mask, score=score, return_weights=False)), ours=True,
            against=("sdpa (no weights)",), cost=no_weights_cost)
    return found


def run(bench, options):
    grid = QUICK_GRID if bench.quick else GRID[bench.device_type]
    shapes = [(B, 1, S) for B in options.B or grid["B"] for S in options.S or grid["S"]]
    teacher_T = grid["teacher_T"] if options.teacher_T is None else options.teacher_T
    if teacher_T:
        shapes.append((TEACHER_B, teacher_T, teacher_T))
    passes = [False] if options.forward else [True] if options.backward else [False, True]
    # dynamic=True: one compilation serves every shape
    compiled_chain = torch.compile(eager_chain, dynamic=True) if bench.compile else None
    rows = []
    for backward in passes:
        for score in options.score:
            for B, T, S in shapes:
                def cost(return_weights):
                    return attention_cost(B, T, S, options.D, options.D, score=score, itemsize=bench.itemsize,
                                          backward=backward, return_weights=return_weights)
                rows += measure(bench, NAME, {"pass": "fwd+bwd" if backward else "fwd", "score": score, "B": B,
                                              "T": T, "S": S},
                                lambda seed: candidates(B, T, S, options.D, score, bench.dtype, bench.device,
                                                        backward, compiled_chain, cost(False), seed),
                                repeats=REPEATS, cost=cost(True), memory=True)
    return rows
