"""attention: the fused op vs the eager chain it replaces, torch.compile of that chain and, for dot scores with
many query rows, torch.nn.functional.scaled_dot_product_attention.

  python bench/bench_attention.py [--device cpu|cuda] [--dtype float32|bfloat16|...] [--score dot additive]
                                  [--B 1 64 256] [--S 50 400 4096] [--D 512] [--backward|--forward]
                                  [--no-compile] [--quick] [--json PATH]
Shapes: decode steps (query [B, D]) for every B and S, and one teacher-forced shape (query [B, T, D], T=S=50).
Eager chain, dot: bmm, masked_fill, softmax, bmm; additive: add, tanh, matmul, masked_fill, softmax, bmm.
The fused op and the chains return the weights; SDPA cannot, so it is compared with the op's return_weights=False.
Times are medians of alternated runs after warm-up; "vs eager" is eager time / this time (> 1: faster than eager).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import bench_dtype, bench_parser, peak_memory_bytes, print_table, save_json, time_alternating  # noqa: E402

from fastseq2seq.ops import attention  # noqa: E402


def eager_chain(query, keys, values, mask, v):
    """What a Seq2Seq decoder runs without the fused op; query [B, T, D]."""
    if v is None:
        scores = torch.bmm(query, keys.transpose(1, 2))
    else:
        scores = torch.tanh(query.unsqueeze(2) + keys.unsqueeze(1)).matmul(v)
    weights = torch.softmax(scores.masked_fill(~mask.unsqueeze(1), float("-inf")), dim=-1)
    return torch.bmm(weights, values), weights


def make_inputs(B, T, S, D, score, dtype, device, backward):
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_(backward)

    query = rand(B, T, D, scale=D ** -0.5)
    keys, values = rand(B, S, D), rand(B, S, D)
    v = rand(D, scale=D ** -0.5) if score == "additive" else None
    lengths = torch.randint(S // 2 + 1, S + 1, (B,), generator=g)
    mask = (torch.arange(S) < lengths[:, None]).to(device)  # every row keeps a real position: eager stays finite
    return query, keys, values, mask, v


def candidates(B, T, S, D, score, dtype, device, backward, compiled_chains):
    query, keys, values, mask, v = make_inputs(B, T, S, D, score, dtype, device, backward)
    inputs = [t for t in (query, keys, values, v) if t is not None]
    q = query[:, 0] if T == 1 else query  # the op's single-step form
    grads = {}

    def step(fn):
        def run():
            if not backward:
                with torch.no_grad():
                    return fn()
            outs = [o for o in fn() if o is not None]
            if id(fn) not in grads:
                grads[id(fn)] = [torch.randn_like(o) for o in outs]
            return torch.autograd.grad(outs, inputs, grads[id(fn)])
        return run

    found = {"eager": step(lambda: eager_chain(query, keys, values, mask, v))}
    if compiled_chains is not None:
        found["compile(eager)"] = step(lambda: compiled_chains[score](query, keys, values, mask, v))
    found["fastseq2seq"] = step(lambda: attention(q, keys, values, mask=mask, score=score, v=v))
    if score == "dot" and T > 1:
        sdpa_mask = mask[:, None, None, :]
        found["sdpa (no weights)"] = step(lambda: (torch.nn.functional.scaled_dot_product_attention(
            query.unsqueeze(1), keys.unsqueeze(1), values.unsqueeze(1), attn_mask=sdpa_mask, scale=1.0),))
        found["fastseq2seq (no weights)"] = step(
            lambda: attention(q, keys, values, mask=mask, score=score, v=v, return_weights=False))
    return found


def main(argv=None):
    p = bench_parser(__doc__, repeats=20, quick="decode B=64, S=50 and the teacher-forced shape, few repeats")
    p.add_argument("--score", nargs="+", default=["dot", "additive"], choices=["dot", "additive"])
    p.add_argument("--B", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--S", type=int, nargs="+", default=[50, 400, 4096])
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--teacher-T", type=int, default=50, help="T = S of the teacher-forced shape; 0 skips it")
    passes = p.add_mutually_exclusive_group()
    passes.add_argument("--forward", action="store_true", help="forward only")
    passes.add_argument("--backward", action="store_true", help="forward+backward only")
    args = p.parse_args(argv)
    dtype = bench_dtype(args)
    if args.quick:
        args.B, args.S, args.repeats = [64], [50], 10
    shapes = [(B, 1, S) for B in args.B for S in args.S]
    if args.teacher_T:
        shapes.append((args.B[len(args.B) // 2], args.teacher_T, args.teacher_T))
    # dynamic=True: one compilation serves every shape
    compiled = None if args.no_compile else {s: torch.compile(eager_chain, dynamic=True) for s in ("dot", "additive")}
    rows = []
    for backward in [b for b in (False, True) if not (b and args.forward) and not (not b and args.backward)]:
        for score in args.score:
            for B, T, S in shapes:
                found = candidates(B, T, S, args.D, score, dtype, args.device, backward, compiled)
                stats = time_alternating(found, args.device, repeats=args.repeats)
                base = stats["eager"]["median_ms"]
                for name, s in stats.items():
                    rows.append({"pass": "fwd+bwd" if backward else "fwd", "score": score, "B": B, "T": T, "S": S,
                                 "impl": name, **s, "vs_eager": base / s["median_ms"],
                                 "peak_mib": (lambda b: b / 2 ** 20 if b is not None else None)(
                                     peak_memory_bytes(found[name], args.device))})
    print(f"attention, {args.device}, {dtype}, D=Dv={args.D}")
    table = print_table(rows, [("pass", "pass", "{}"), ("score", "score", "{}"), ("B", "B", "{}"), ("T", "T", "{}"),
                               ("S", "S", "{}"), ("impl", "impl", "{}"), ("median_ms", "median ms", "{:.3f}"),
                               ("min_ms", "min", "{:.3f}"), ("q1_ms", "q1", "{:.3f}"), ("q3_ms", "q3", "{:.3f}"),
                               ("vs_eager", "vs eager", "{:.2f}x"), ("peak_mib", "peak MiB", "{:.1f}")])
    if args.json:
        save_json(args.json, args.device, rows, op="attention", dtype=str(dtype), table=table)
    return rows


if __name__ == "__main__":
    main()
