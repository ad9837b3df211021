"""The `fastseq2seq` command (also `python -m fastseq2seq`)."""
import argparse
import platform
import sys


def info() -> str:
    import torch

    from fastseq2seq import _extension, backends

    lines = [f"fastseq2seq {__import__('fastseq2seq').__version__}",
             f"python {platform.python_version()}, torch {torch.__version__}, "
             f"torch CUDA {torch.version.cuda or 'none (CPU build)'}",
             f"triton {__import__('triton').__version__}" if backends.TRITON_IMPORT_ERROR is None
             else f"triton not usable: {backends.TRITON_IMPORT_ERROR}"]
    if _extension.loaded():
        built = _extension.build_info()
        compiled = "C++ CPU kernels" + (f", CUDA kernels for sm {built['cuda_archs']}" if built.get("cuda") == "1"
                                        else ", no CUDA kernels")
        lines.append(f"compiled extension: {compiled}")
    else:
        lines.append(f"compiled extension: not loaded ({_extension.LOAD_ERROR})")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    lines.append(f"CUDA device: {gpu}")
    for device in ("cpu", "cuda"):
        for name in backends.BACKENDS:
            reason = backends.unavailable_reason(name, device)
            lines.append(f"  {device:4} {name:9} " + ("usable" if reason is None else f"no: {reason}"))
    lines.append("default backend: cpu -> " + backends.select_backend(None, torch.device("cpu"), "info"))
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing its usage block."""

    def error(self, message):
        from fastseq2seq.config import UsageError

        raise UsageError(message)


def _parser():
    from fastseq2seq.config import add_config_flags

    parser = _Parser(prog="fastseq2seq", description="Fused LSTM / attention Seq2Seq toolkit.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser("info", help="versions, what was compiled, and which backends are usable here")

    demo = commands.add_parser("demo", help="train a small model on an embedded task (numbers and dates written "
                                            "out in English, French and German -> digits), no download needed")
    demo.add_argument("--out", default="runs/demo", help="folder for the data, checkpoints, log and plots")
    demo.add_argument("--minutes", type=float, default=2.4,
                      help="training time budget; with data, vocabulary and scoring, under 3 in all (default 2.4)")

    train = commands.add_parser("train", help="train a model from a YAML config (every key also a flag)")
    train.add_argument("--config", help="YAML file of config keys (see configs/)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    add_config_flags(train)

    for name, help_text in (("translate", "translate stdin to stdout, one sentence a line"),
                            ("evaluate", "BLEU and chrF (with signatures) of a checkpoint's translations")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--checkpoint", required=True, help="a .pt file written by train (best.pt, last.pt)")
        command.add_argument("--beam", type=int, default=5, help="beam size; 1: greedy (default 5)")
        command.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        command.add_argument("--max-chars", type=int, default=1000, help="longer input lines are an error")
        if name == "evaluate":
            command.add_argument("--src", required=True, help="source sentences (plain or .gz)")
            command.add_argument("--ref", required=True, help="reference translations, aligned with --src")

    from fastseq2seq.benchmarks.options import add_suite_arguments

    add_suite_arguments(commands.add_parser(
        "bench", help="the benchmark suite: every op and the model against their baselines, side by side; "
                      "markdown, JSON and charts in --out"))
    return parser


def _run(args):
    if args.command == "info":
        print(info())
    elif args.command == "demo":
        from fastseq2seq.demo import run_demo

        run_demo(args.out, args.minutes)
    elif args.command == "train":
        from fastseq2seq.config import config_from_args
        from fastseq2seq.train import train

        train(config_from_args(args), resume=args.resume)
    elif args.command == "translate":
        from fastseq2seq.translate import run_translate

        run_translate(args)
    elif args.command == "evaluate":
        from fastseq2seq.translate import run_evaluate

        run_evaluate(args)
    elif args.command == "bench":
        from fastseq2seq.benchmarks.suite import run_suite

        run_suite(args)


def main(argv=None):
    """Bad input (files, data, config, checkpoints) ends in one line on stderr and exit status 2, no traceback."""
    from fastseq2seq.config import Interrupted, UsageError

    try:
        args = _parser().parse_args(argv)
        if getattr(args, "beam", 1) < 1:
            raise UsageError("--beam must be at least 1")
        _run(args)
    except (UsageError, OSError, UnicodeError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"fastseq2seq: error: {message}", file=sys.stderr)
        return 2
    except Interrupted as error:
        print(f"fastseq2seq: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("fastseq2seq: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
