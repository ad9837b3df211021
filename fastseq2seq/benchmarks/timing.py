"""Timing for the benchmarks: warm-up, then the candidates alternated round by round (so machine drift hits all of
them alike), each round on the next of several input sets (so data that fits in cache is not found there), medians
with the spread.

On CUDA each sample is the time between two CUDA events recorded around the call on an idle stream (the device is
synchronized before each call), so launch overhead the GPU waits on is counted and nothing else is."""
import dataclasses
import math
import os
import statistics
import time
from typing import Callable, Optional

import torch

# Rotate among at most this many input sets; their total should pass twice the last-level cache.
MAX_INPUT_SETS = 16
DEFAULT_CPU_CACHE_BYTES = 32 * 2 ** 20
DEFAULT_GPU_CACHE_BYTES = 50 * 2 ** 20


@dataclasses.dataclass
class Candidate:
    """One implementation of a benchmark case. `ours`: a fastseq2seq implementation, compared with the baselines
    named in `against` (None: every baseline of the case). `optional`: a failure on its first call drops it from
    the case with a note instead of stopping the run (packages and settings that may be missing). `cost`: its own
    Cost where it does other work than the case's (costs.py)."""

    fn: Callable[[], object]
    ours: bool = False
    against: Optional[tuple] = None
    optional: bool = False
    cost: Optional[object] = None


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def last_level_cache_bytes(device) -> int:
    """The largest cache of the device: L2 on a GPU, the last-level CPU cache otherwise."""
    if torch.device(device).type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_GPU_CACHE_BYTES
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    for index in os.listdir(base) if os.path.isdir(base) else ():
        try:
            with open(os.path.join(base, index, "size")) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:].upper(), 1)
        sizes.append(int(text.rstrip("KMGkmg")) * scale)
    return max(sizes, default=DEFAULT_CPU_CACHE_BYTES)


def input_set_count(working_set_bytes, device) -> int:
    """How many input sets to rotate among so that each set is evicted before its next use."""
    if not working_set_bytes:
        return 1
    return max(1, min(MAX_INPUT_SETS, math.ceil(2 * last_level_cache_bytes(device) / working_set_bytes)))


def _sample_ms(fn, device):
    synchronize(device)
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_alternating(candidate_sets, device, *, repeats=30, min_repeats=5, warmup=3, max_seconds=None):
    """candidate_sets: one {name: Candidate} per input set, the same names in each. Round r runs every candidate
    once on set r % len(candidate_sets), in an order rotated each round; rounds go on until `repeats`, or, once
    `min_repeats` are done, until `max_seconds` have passed.
    Returns ({name: stats}, {name: why it was dropped}); stats: median_ms, q1_ms, q3_ms, min_ms, max_ms, repeats."""
    names = list(candidate_sets[0])
    dropped = {}
    for r in range(max(warmup, 1)):
        for name in list(names):
            candidate = candidate_sets[r % len(candidate_sets)][name]
            try:
                candidate.fn()
            except Exception as error:  # noqa: BLE001 - an optional baseline may fail in any way; say how
                if not candidate.optional or r > 0:
                    raise
                dropped[name] = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
                names.remove(name)
    synchronize(device)
    samples = {name: [] for name in names}
    start = time.perf_counter()
    r = 0
    while names and r < repeats and (r < min_repeats or max_seconds is None
                                     or time.perf_counter() - start < max_seconds):
        candidates = candidate_sets[r % len(candidate_sets)]
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(_sample_ms(candidates[name].fn, device))
        r += 1
    return {name: summarize(s) for name, s in samples.items()}, dropped


def summarize(samples_ms):
    q = statistics.quantiles(samples_ms, n=4, method="inclusive") if len(samples_ms) > 1 else samples_ms * 3
    return {"median_ms": statistics.median(samples_ms), "q1_ms": q[0], "q3_ms": q[2], "min_ms": min(samples_ms),
            "max_ms": max(samples_ms), "repeats": len(samples_ms)}


def forward_only(fn):
    """fn as a forward-only candidate: no autograd graph is built."""
    def run():
        with torch.no_grad():
            return fn()
    return run


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def forward_backward(fn, wrt):
    """fn's forward and the backward of all its differentiable outputs into the tensors `wrt`, with random output
    gradients drawn on the first call and reused after."""
    output_grads = []

    def run():
        outputs = [t for t in _tensors(fn()) if t.requires_grad]
        if not output_grads:
            output_grads.extend(torch.randn_like(t) for t in outputs)
        return torch.autograd.grad(outputs, wrt, output_grads, allow_unused=True)
    return run


def peak_memory_bytes(fn, device):
    """Peak device memory allocated while fn runs, above what was allocated before (CUDA only; None on CPU)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base
