import os
import shutil

import pytest
import torch

from fastseq2seq import _extension


def test_extension_is_built_and_loaded():
    assert _extension.loaded(), _extension.LOAD_ERROR
    assert _extension.build_info()["cpu"] == "1"


@pytest.mark.skipif(torch.version.cuda is None or shutil.which("nvcc") is None
                    or os.environ.get("FASTSEQ2SEQ_CUDA") == "0", reason="needs a CUDA build of torch and nvcc")
def test_cuda_sources_are_compiled_when_possible():
    info = _extension.build_info()
    assert info["cuda"] == "1"
    assert "9.0" in info["cuda_archs"].split(";") or "9.0+PTX" in info["cuda_archs"].split(";")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastseq2seq::lstm_cell_fwd", "CUDA")
