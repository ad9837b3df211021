"""Runs fastseq2seq/benchmarks/lstm_cell.py alone, with its shape options (--help)."""
from fastseq2seq.benchmarks.suite import run_script

if __name__ == "__main__":
    run_script("lstm_cell")
