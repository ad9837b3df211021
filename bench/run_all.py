"""The whole benchmark suite, the same as `fastseq2seq bench` (same options):
  python bench/run_all.py [--device cpu|cuda] [--quick] [--only NAME ...] [--out DIR] [--dtype ...] [--no-compile]
"""
import sys

from fastseq2seq.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
