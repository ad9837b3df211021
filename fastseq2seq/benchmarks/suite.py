"""The benchmark suite (`fastseq2seq bench`, bench/run_all.py) and the one-benchmark scripts (bench/bench_<name>.py):
their options, the run's settings, the ceilings, and the report written as each benchmark ends (so a run stopped
early keeps what it measured)."""
import argparse
import os
import time

import torch

from fastseq2seq.benchmarks import attention, decoder_step, lstm_cell, lstm_layer, lstm_module, seq2seq
from fastseq2seq.benchmarks.ceilings import measure_ceilings
from fastseq2seq.benchmarks.options import add_common_arguments
from fastseq2seq.benchmarks.report import (environment, markdown_table, report_data, write_charts, write_json,
                                           write_markdown)
from fastseq2seq.benchmarks.runner import BenchRun
from fastseq2seq.config import UsageError

BENCHMARKS = {module.NAME: module for module in (lstm_cell, lstm_layer, attention, decoder_step, lstm_module, seq2seq)}
CPU_DTYPES = ("float32", "float64")  # what the C++ CPU kernels run


def make_run(args) -> BenchRun:
    """The run's settings from the parsed options; bad combinations are a UsageError."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if device == "cpu" and dtype not in CPU_DTYPES:
        raise UsageError(f"--dtype {dtype}: on cpu the fused kernels run {' and '.join(CPU_DTYPES)}")
    if args.repeats is not None and args.repeats < 1:
        raise UsageError("--repeats must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    max_minutes = getattr(args, "max_minutes", None)
    if max_minutes is not None and max_minutes <= 0:
        raise UsageError("--max-minutes must be positive")
    return BenchRun(device=device, dtype=getattr(torch, dtype), quick=args.quick,
                    compile=not (args.no_compile or args.quick), repeats=args.repeats,
                    deadline=time.monotonic() + 60 * max_minutes if max_minutes else None)


def default_options(module):
    """A benchmark's own options at their defaults (its shapes then follow the device and --quick)."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args([])


def _settings(bench):
    return {"device": bench.device, "dtype": str(bench.dtype).replace("torch.", ""), "quick": bench.quick,
            "compile": bench.compile, "repeats": bench.repeats or "per benchmark"}


def run_benchmarks(bench, modules_and_options, out_dir=None, json_path=None):
    """Runs each (module, options) in turn after measuring the ceilings, prints each table, and (re)writes the
    report after each benchmark. Returns the results {name: {"description", "seconds", "rows", "charts"}}."""
    started = time.monotonic()
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)  # fail before the run, not after
    if json_path and not os.path.isdir(os.path.dirname(os.path.abspath(json_path))):
        raise UsageError(f"--json {json_path}: its folder does not exist")
    env = environment(bench.device)
    bench.log(f"device: {env['device']}; measuring the ceilings")
    bench.ceilings = measure_ceilings(bench.device, bench.dtype, quick=bench.quick)
    bench.log(f"ceilings: {bench.ceilings['flops_per_s'] / 1e12:.3g} TFLOP/s ({bench.ceilings['matmul']}), "
              f"{bench.ceilings['bytes_per_s'] / 1e9:.4g} GB/s ({bench.ceilings['copy']})")
    results = {}
    for i, (module, options) in enumerate(modules_and_options):
        bench.log(f"== {module.NAME} ({i + 1}/{len(modules_and_options)})")
        t0 = time.monotonic()
        rows = module.run(bench, options)
        results[module.NAME] = {"description": " ".join(module.__doc__.split()), "seconds": time.monotonic() - t0,
                                "rows": rows}
        print(f"\n{module.NAME}, {bench.device}, {str(bench.dtype).replace('torch.', '')}\n{markdown_table(rows)}\n",
              flush=True)
        if out_dir:
            results[module.NAME]["charts"] = [os.path.basename(path) for path in
                                              write_charts(out_dir, module.NAME, rows, env["device"])]
        data = report_data(results, environment=env, settings=_settings(bench), ceilings=bench.ceilings,
                           notes=bench.notes)
        if out_dir:
            write_json(os.path.join(out_dir, "results.json"), data)
            write_markdown(os.path.join(out_dir, "results.md"), data)
        if json_path:
            write_json(json_path, data)
    bench.log(f"done in {time.monotonic() - started:.0f} s" + (f"; results in {out_dir}" if out_dir else ""))
    return results


def run_suite(args):
    """`fastseq2seq bench`: every benchmark (or --only), its results in --out."""
    bench = make_run(args)
    names = args.only or list(BENCHMARKS)
    return run_benchmarks(bench, [(BENCHMARKS[name], default_options(BENCHMARKS[name])) for name in names],
                          out_dir=args.out)


def run_script(name, argv=None):
    """bench/bench_<name>.py: one benchmark with its own shape options; prints the table, --json / --out to save."""
    module = BENCHMARKS[name]
    parser = argparse.ArgumentParser(description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    module.add_arguments(parser)
    parser.add_argument("--json", help="write the rows, the environment and the ceilings to this JSON file")
    parser.add_argument("--out", help="write results.md, results.json and the charts into this folder")
    args = parser.parse_args(argv)
    try:
        results = run_benchmarks(make_run(args), [(module, args)], out_dir=args.out, json_path=args.json)
    except (UsageError, OSError) as error:
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(error).split())}\n")
    return results[name]["rows"]
