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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastseq2seq", description="Fused LSTM / attention Seq2Seq toolkit.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="versions, what was compiled, and which backends are usable here")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
