// The fastgmmdiff library's schemas (schemas.h) and the Python module stub of fastgmmdiff._C.
// Implementations: cpu/log_prob_cpu.cpp (CPU), cuda/log_prob_cuda.cu (CUDA).  Fake
// implementations and autograd are registered from Python (fastgmmdiff/_autograd.py).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cuda/plan.h"
#include "schemas.h"

namespace fastgmmdiff {
namespace cpu {
const char* isa_name();
}
#ifdef FASTGMMDIFF_WITH_CUDA
namespace cuda {
size_t device_smem_optin(int device);  // log_prob_cuda.cu
}
#endif
}  // namespace fastgmmdiff

TORCH_LIBRARY(fastgmmdiff, m) { fastgmmdiff::define_schemas(m); }

static PyObject* py_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(fastgmmdiff::cpu::isa_name());
}

static PyObject* py_has_cuda(PyObject*, PyObject*) {
#ifdef FASTGMMDIFF_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

// cuda_limits(covariance_type, D, K, element_size, device_index) -> (reason, max_block): why the
// CUDA kernels cannot take such a problem on that device ("" when they can), and the most points
// per mixture the backward takes in one block (more: atomics, nondeterministic); cuda/plan.h.
static PyObject* py_cuda_limits(PyObject*, PyObject* args) {
  const char* cov = nullptr;
  long long D = 0, K = 0, elem = 0;
  int device = 0;
  if (!PyArg_ParseTuple(args, "sLLLi", &cov, &D, &K, &elem, &device)) return nullptr;
  std::string why;
  int block = 0;
#ifdef FASTGMMDIFF_WITH_CUDA
  try {
    const int c = fastgmmdiff::parse_cov(cov);
    const size_t limit = fastgmmdiff::cuda::device_smem_optin(device);
    why = fastgmmdiff::cuda::unsupported_reason(c, D, K, static_cast<size_t>(elem), limit);
    block = fastgmmdiff::cuda::max_backward_block(c, D, static_cast<size_t>(elem), limit);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
#else
  (void)cov, (void)D, (void)K, (void)elem, (void)device;
  why = "fastgmmdiff._C was built without CUDA kernels";
#endif
  return Py_BuildValue("(si)", why.c_str(), block);
}

static PyMethodDef kMethods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS,
     "Instruction set the CPU kernels run with here (FASTGMMDIFF_CPU_ISA overrides)."},
    {"has_cuda", py_has_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {"cuda_limits", py_cuda_limits, METH_VARARGS,
     "cuda_limits(covariance_type, D, K, element_size, device_index) -> (reason, max_block): why the "
     "CUDA kernels cannot take such a problem on that device ('' when they can), and the most points "
     "per mixture their backward takes in one block (more: atomics)."},
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "fastgmmdiff compiled kernels", -1, kMethods};
  return PyModule_Create(&def);
}
