import os
import subprocess
import sys

import pytest
import torch

import fastseq2seq
from fastseq2seq.backends import select_backend

CPU = torch.device("cpu")


def test_available_backends_cpu_lists_reference_and_default_first():
    names = fastseq2seq.available_backends("cpu")
    assert "reference" in names
    assert names[0] == select_backend(None, CPU, "test")
    assert "cuda" not in names


def test_keyword_beats_context_beats_environment(monkeypatch):
    monkeypatch.setenv("FASTSEQ2SEQ_BACKEND", "reference")
    assert select_backend(None, CPU, "test") == "reference"
    with fastseq2seq.use_backend("cpu"):
        assert select_backend(None, CPU, "test") == "cpu"
        with fastseq2seq.use_backend("reference"):
            assert select_backend(None, CPU, "test") == "reference"
        assert select_backend("reference", CPU, "test") == "reference"
    assert select_backend(None, CPU, "test") == "reference"


def test_unknown_backend_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cuDNN'"):
        with fastseq2seq.use_backend("cuDNN"):
            pass
    monkeypatch.setenv("FASTSEQ2SEQ_BACKEND", "fast")
    with pytest.raises(RuntimeError, match="unknown backend 'fast'"):
        select_backend(None, CPU, "test")


def test_backend_that_cannot_run_says_why():
    with pytest.raises(RuntimeError, match="'cuda' backend runs on cuda tensors"):
        select_backend("cuda", CPU, "lstm_cell")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            select_backend("reference", torch.device("cuda"), "lstm_cell")


def test_op_raises_for_unavailable_backend():
    x, h = torch.randn(2, 3), torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="lstm_cell: backend 'cuda'"):
        fastseq2seq.ops.lstm_cell(x, (h, h), torch.randn(16, 3), torch.randn(16, 4), backend="cuda")


def test_info_command_reports_versions_and_backends():
    out = subprocess.run([sys.executable, "-m", "fastseq2seq", "info"], capture_output=True, text=True, check=True)
    assert f"torch {torch.__version__}" in out.stdout
    assert "compiled extension: C++ CPU kernels" in out.stdout
    assert "cpu  reference usable" in out.stdout


def test_import_without_the_extension_or_triton_falls_back_to_reference():
    # None in sys.modules makes an import fail: the package must still import and run on the reference backend.
    code = (
        "import sys, torch\n"
        "sys.modules['fastseq2seq._C'] = None\n"
        "sys.modules['triton'] = None\n"
        "import fastseq2seq\n"
        "assert fastseq2seq.available_backends('cpu') == ['reference'], fastseq2seq.available_backends('cpu')\n"
        "x, h = torch.randn(2, 3), torch.randn(2, 4)\n"
        "print(fastseq2seq.ops.lstm_cell(x, (h, h), torch.randn(16, 3), torch.randn(16, 4))[0].shape)\n"
        "from fastseq2seq.__main__ import info\n"
        "print(info())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([2, 4])" in out.stdout
    assert "compiled extension: not loaded" in out.stdout and "triton not usable" in out.stdout
