"""Shared timing for the benchmark scripts: warm-up, then candidates alternated call by call so that
machine drift hits all of them alike; medians with the spread; ratios against a named baseline."""
import argparse
import json
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone

import torch


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(candidates, device, repeats=30, warmup=3, min_seconds=0.0):
    """candidates: {name: zero-argument callable}. Returns {name: {median_ms, min_ms, max_ms, q1_ms, q3_ms}}."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    _sync(device)
    samples = {name: [] for name in names}
    start = time.perf_counter()
    r = 0
    while r < repeats or time.perf_counter() - start < min_seconds:
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            candidates[name]()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) * 1e3)
        r += 1
    stats = {}
    for name, s in samples.items():
        q = statistics.quantiles(s, n=4) if len(s) > 1 else [s[0]] * 3
        stats[name] = {"median_ms": statistics.median(s), "min_ms": min(s), "max_ms": max(s), "q1_ms": q[0],
                       "q3_ms": q[2], "repeats": len(s)}
    return stats


def without_grad(fn):
    """fn as a forward-only candidate: no autograd graph is built."""
    def run():
        with torch.no_grad():
            fn()
    return run


def peak_memory_bytes(fn, device):
    """Peak device memory allocated while fn runs (CUDA only; None on CPU)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def environment(device):
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or None
    except OSError:
        commit = None
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit,
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.device(device).type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    else:
        info["device"] = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    return info


def print_table(rows, columns):
    """rows: list of dicts; columns: list of (key, header, format)."""
    headers = [h for _, h, _ in columns]
    lines = [[fmt.format(row[k]) if row.get(k) is not None else "-" for k, _, fmt in columns] for row in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    text = "\n".join(out)
    print(text)
    return text


def save_json(path, device, rows, **extra):
    with open(path, "w") as f:
        json.dump({"environment": environment(device), "rows": rows, **extra}, f, indent=2)


def bench_parser(doc, *, repeats, quick):
    """The options every benchmark script takes; each adds its own shapes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (slow to compile)")
    p.add_argument("--quick", action="store_true", help=quick)
    p.add_argument("--json", default=None, help="also write the rows and the environment to this JSON file")
    return p


def bench_dtype(args):
    return getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
