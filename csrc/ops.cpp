// Operator schemas of fastgmmdiff._C (one place for all of them) and the Python module stub.
// Implementations: cpu/log_prob_cpu.cpp (CPU), cuda/log_prob_cuda.cu (CUDA).  Fake
// implementations and autograd are registered from Python (fastgmmdiff/_autograd.py).
#include <Python.h>
#include <torch/library.h>

namespace fastgmmdiff {
namespace cpu {
const char* isa_name();
}
}  // namespace fastgmmdiff

TORCH_LIBRARY(fastgmmdiff, m) {
  // log p (float32, or float64 for float64 inputs): [G, N], or [N] when no input has the G
  // axis (the API layout of ops.h).
  m.def("log_prob(Tensor x, Tensor means, Tensor prec_chol, Tensor logits, str covariance_type) -> Tensor");
  // Gradients of Σ grad·log p w.r.t. (x, means, prec_chol, logits), each in its input's dtype.
  m.def("log_prob_backward(Tensor grad, Tensor x, Tensor means, Tensor prec_chol, Tensor logits, "
        "Tensor logp, str covariance_type) -> (Tensor, Tensor, Tensor, Tensor)");
  // One component per point: log N(x_n; μ_t, Σ_t) [G, N] with t = target[g, n] (int64 [G, N]).
  m.def("log_prob_target(Tensor x, Tensor means, Tensor prec_chol, Tensor target, str covariance_type) -> Tensor");
  // Gradients of Σ grad·log N w.r.t. (x, means, prec_chol).
  m.def("log_prob_target_backward(Tensor grad, Tensor x, Tensor means, Tensor prec_chol, Tensor target, "
        "Tensor logp, str covariance_type) -> (Tensor, Tensor, Tensor)");
  // Fused NGMG (SPEC §2): (loss, logp), both result-shaped: loss = −p̃ per point, logp = log p
  // (no target) or the target component's a_t − ½q_t (a_t = its log-normaliser, 0 when
  // normalize), saved for the backward.
  m.def("ngmg(Tensor x, Tensor means, Tensor prec_chol, Tensor logits, Tensor? target, str covariance_type, "
        "bool normalize) -> (Tensor, Tensor)");
  // Gradients of Σ grad·loss w.r.t. (x, means, prec_chol, logits); logits' is 0 with a target.
  m.def("ngmg_backward(Tensor grad, Tensor x, Tensor means, Tensor prec_chol, Tensor logits, Tensor? target, "
        "Tensor loss, Tensor logp, str covariance_type) -> (Tensor, Tensor, Tensor, Tensor)");
}

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

static PyMethodDef kMethods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS,
     "Instruction set the CPU kernels run with here (FASTGMMDIFF_CPU_ISA overrides)."},
    {"has_cuda", py_has_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "fastgmmdiff compiled kernels", -1, kMethods};
  return PyModule_Create(&def);
}
