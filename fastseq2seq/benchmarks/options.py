"""The command-line options of the suite and of the one-benchmark scripts; light to import (the program's parser
is built before any command runs)."""

BENCHMARK_NAMES = ("lstm_cell", "lstm_layer", "attention", "decoder_step", "lstm_module", "seq2seq")
DTYPES = ("float32", "float64", "float16", "bfloat16")
DEFAULT_OUT = "bench-results"


def add_common_arguments(parser):
    """The options of the suite and of every one-benchmark script."""
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is available, else cpu")
    parser.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes, few repeats, no torch.compile baselines (they take longer to compile "
                             "than the quick run itself): a smoke run")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--repeats", type=int, help="timed runs per case at most (default: per benchmark)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")


def add_suite_arguments(parser):
    add_common_arguments(parser)
    parser.add_argument("--only", nargs="+", choices=BENCHMARK_NAMES, metavar="NAME",
                        help=f"run only these benchmarks ({', '.join(BENCHMARK_NAMES)})")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"folder for results.md, results.json and the charts (default {DEFAULT_OUT})")
    parser.add_argument("--max-minutes", type=float,
                        help="start no new case after this long; what is left is listed as not run")
