"""Builds the one extension module, fastseq2seq._C: C++ CPU kernels always, CUDA kernels when possible.

FASTSEQ2SEQ_CUDA=0|1 forces the CUDA sources off or on; TORCH_CUDA_ARCH_LIST picks the GPU targets.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def find_cuda_home():
    """The toolkit folder whose lib holds libcudart: nvcc on PATH may be a wrapper script in /usr/local/bin."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        with open(nvcc, "rb") as f:  # a wrapper script names the real nvcc
            head = f.read(4096)
        if head.startswith(b"#!"):
            for word in head.decode(errors="ignore").split():
                if word.endswith("/bin/nvcc"):
                    candidates.append(os.path.dirname(os.path.dirname(word)))
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for home in filter(None, candidates):
        has_nvcc = os.path.exists(os.path.join(home, "bin", "nvcc"))
        has_cudart = glob.glob(os.path.join(home, "lib*", "libcudart.so*"))
        if has_nvcc and has_cudart and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def nvidia_wheel_include_dirs():
    """cusparse.h, cublas_v2.h and friends: pip's nvidia-* wheels keep them outside CUDA_HOME."""
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def want_cuda(torch):
    forced = os.environ.get("FASTSEQ2SEQ_CUDA")
    if forced not in (None, "", "0", "1"):
        sys.exit(f"FASTSEQ2SEQ_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False, None
    cuda_home = find_cuda_home()
    possible = torch.version.cuda is not None and cuda_home is not None
    if forced == "1" and not possible:
        why = "torch is a CPU build" if torch.version.cuda is None else "nvcc / the CUDA toolkit was not found"
        sys.exit(f"FASTSEQ2SEQ_CUDA=1 but the CUDA sources cannot be built: {why}")
    return possible, cuda_home


def extensions():
    import torch

    use_cuda, cuda_home = want_cuda(torch)
    if use_cuda:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx = ["-O3", "-fopenmp"]  # torch adds the C++ standard it needs
    macros = [("Py_LIMITED_API", "0x030A0000")]
    if use_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        nvcc = ["-O3", "--use_fast_math", "-lineinfo"]
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        macros += [("FASTSEQ2SEQ_WITH_CUDA", None), ("FASTSEQ2SEQ_CUDA_ARCHS", f'"{arch_list}"')]
        ext = CUDAExtension(
            "fastseq2seq._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")] + nvidia_wheel_include_dirs(),
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
            define_macros=macros,
            py_limited_api=True,
        )
    else:
        ext = CppExtension(
            "fastseq2seq._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
            define_macros=macros,
            py_limited_api=True,
        )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
