// The extension module fastseq2seq._C: importing it registers the ops with the dispatcher.
#include <Python.h>
#include <torch/library.h>

#include <string>

extern "C" {
// An empty module: the ops are reached through torch.ops.fastseq2seq, never through Python bindings.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace fastseq2seq {

std::string build_info() {
  std::string info = "cpu=1";
#ifdef _OPENMP
  info += " openmp=1";
#else
  info += " openmp=0";
#endif
#ifdef FASTSEQ2SEQ_WITH_CUDA
  info += " cuda=1 cuda_archs=" FASTSEQ2SEQ_CUDA_ARCHS;
#else
  info += " cuda=0";
#endif
  return info;
}

TORCH_LIBRARY(fastseq2seq, m) {
  m.def("build_info() -> str", &build_info);
}

}  // namespace fastseq2seq
