"""What every benchmark shares: the settings of a run (`BenchRun`) and `measure`, which times one case's candidates
side by side and turns the times into rows (ratios against the baselines, roofline, memory, throughput)."""
import dataclasses
import time
from typing import Callable, Optional

import torch

import fastseq2seq
from fastseq2seq.benchmarks.costs import roofline
from fastseq2seq.benchmarks.report import case_label, format_ms
from fastseq2seq.benchmarks.timing import input_set_count, peak_memory_bytes, time_alternating

# Time spent timing one case before stopping at fewer than the asked repeats (at least MIN_REPEATS stay).
CASE_SECONDS = {"cpu": 2.0, "cuda": 0.5}
QUICK_CASE_SECONDS = 0.5
MIN_REPEATS, QUICK_MIN_REPEATS = 5, 3
WARMUP, QUICK_WARMUP = 3, 1


@dataclasses.dataclass
class BenchRun:
    """The settings every benchmark of a run shares, and what the run notes on the way."""

    device: str
    dtype: torch.dtype
    quick: bool = False
    compile: bool = True  # the torch.compile baselines
    repeats: Optional[int] = None  # per case; None: the benchmark's own default
    deadline: Optional[float] = None  # time.monotonic() after which no new case starts
    ceilings: Optional[dict] = None
    log: Callable[[str], None] = print
    notes: list = dataclasses.field(default_factory=list)

    @property
    def device_type(self):
        return torch.device(self.device).type

    @property
    def itemsize(self):
        return torch.empty((), dtype=self.dtype).element_size()

    def note(self, text):
        self.notes.append(text)
        self.log(f"note: {text}")


def our_backends(device):
    """The fused backends to time on `device`. Triton on CPU tensors runs only in its interpreter, which checks
    correctness and says nothing about speed."""
    device_type = torch.device(device).type
    return [b for b in fastseq2seq.available_backends(device)
            if b != "reference" and not (b == "triton" and device_type == "cpu")]


def measure(run: BenchRun, benchmark: str, case: dict, build, *, repeats, cost=None, working_set_bytes=None,
            memory=False, work=None) -> list:
    """Times the candidates of one case and returns one row per candidate.

    build(seed) -> {name: Candidate} on fresh inputs; it is called once per input set rotated through (enough sets
    to pass twice the cache, judged from working_set_bytes, else from the cost's minimal bytes). cost: the case's
    Cost for the roofline; memory: also measure each candidate's peak device memory; work: (units, unit name) done
    by one call, for a throughput column."""
    label = case_label(case)
    if run.deadline is not None and time.monotonic() > run.deadline:
        run.note(f"{benchmark} {label}: not run (time limit reached)")
        return []
    sets = [build(seed) for seed in range(input_set_count(
        working_set_bytes if working_set_bytes is not None else cost.bytes if cost else None, run.device))]
    stats, dropped = time_alternating(
        sets, run.device, repeats=run.repeats or repeats, min_repeats=QUICK_MIN_REPEATS if run.quick else MIN_REPEATS,
        warmup=QUICK_WARMUP if run.quick else WARMUP,
        max_seconds=QUICK_CASE_SECONDS if run.quick else CASE_SECONDS[run.device_type])
    for name, why in dropped.items():
        run.note(f"{benchmark} {label}: {name} skipped: {why}")
    baselines = [name for name in stats if not sets[0][name].ours]
    rows = []
    for name, timing in stats.items():
        candidate = sets[0][name]
        row = {"benchmark": benchmark, "case": case, "impl": name, "ours": candidate.ours, **timing,
               "input_sets": len(sets)}
        if candidate.ours:
            row["speedup"] = {b: stats[b]["median_ms"] / timing["median_ms"] for b in baselines
                              if candidate.against is None or b in candidate.against}
        if (candidate.cost or cost) is not None and run.ceilings is not None:
            row.update(roofline(candidate.cost or cost, timing["median_ms"], run.ceilings))
        if memory and run.device_type == "cuda":
            row["peak_mib"] = peak_memory_bytes(candidate.fn, run.device) / 2 ** 20
        if work is not None:
            row["throughput"], row["unit"] = work[0] / (timing["median_ms"] / 1e3), work[1]
        rows.append(row)

    def summary(row):
        ratios = ", ".join(f"{ratio:.2f}x vs {baseline}" for baseline, ratio in row.get("speedup", {}).items())
        return f"{row['impl']} {format_ms(row['median_ms'])} ms" + (f" ({ratios})" if ratios else "")
    run.log(f"{benchmark} {label}: " + ", ".join(summary(row) for row in rows))
    return rows
