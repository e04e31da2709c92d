// The operator schemas of fastgmmdiff._C, in one place: ops.cpp defines them for the package's
// library; the CUDA emulation build (tests/cuda_emu) defines the same ones for its own.
#pragma once

#include <torch/library.h>

namespace fastgmmdiff {

inline void define_schemas(torch::Library& m) {
  // log p (float32, or float64 for float64 inputs): [G, N], or [N] when no input has the G
  // axis (the API layout of ops.h).
  m.def("log_prob(Tensor x, Tensor means, Tensor prec_chol, Tensor logits, str covariance_type) -> Tensor");
  // Gradients of Σ grad·log p w.r.t. (x, means, prec_chol, logits), each in its input's dtype.
  m.def("log_prob_backward(Tensor grad, Tensor x, Tensor means, Tensor prec_chol, Tensor logits, "
        "Tensor logp, str covariance_type) -> (Tensor, Tensor, Tensor, Tensor)");
  // log_prob of a diag or spherical mixture given by σ = 1/U (torch.distributions' ``scale``:
  // [.., K, D] or [.., K]) instead of U; its backward's σ gradient is −∂U·U².  One autograd node
  // for MixtureOfGaussians.log_prob (an MDN head), where a separate reciprocal node and its
  // backward cost as much as the kernels.  Any device the log_prob pair serves (autograd.cpp).
  m.def("log_prob_scale(Tensor x, Tensor means, Tensor scale, Tensor logits, str covariance_type) -> Tensor");
  m.def("log_prob_scale_backward(Tensor grad, Tensor x, Tensor means, Tensor scale, Tensor logits, "
        "Tensor logp, str covariance_type) -> (Tensor, Tensor, Tensor, Tensor)");
  // Fused NGMG (SPEC §2): (loss, logp), both result-shaped: loss = −exp(logp) per point, logp
  // saved for the backward: without a target log p̃ = log p − c (normalize; c inside the
  // logsumexp, ops.h ngmg_const) or log p; with one the target component's a_t − ½q_t (a_t =
  // its log-normaliser, 0 when normalize).  With a target only each point's own component is
  // read (the gather kernels: csrc/cpu/target_cpu.cpp, the CUDA target kernels) for large K.
  m.def("ngmg(Tensor x, Tensor means, Tensor prec_chol, Tensor logits, Tensor? target, str covariance_type, "
        "bool normalize) -> (Tensor, Tensor)");
  // Gradients of Σ grad·loss w.r.t. (x, means, prec_chol, logits); logits' is 0 with a target.
  // normalize: the forward's, which says what the saved logp is relative to.
  m.def("ngmg_backward(Tensor grad, Tensor x, Tensor means, Tensor prec_chol, Tensor logits, Tensor? target, "
        "Tensor loss, Tensor logp, str covariance_type, bool normalize) -> (Tensor, Tensor, Tensor, Tensor)");
  // The E-step's statistics of x [N, D] under one mixture, one fused pass (CPU; GaussianMixture.fit):
  // (Σ log p, N_k, S1 = Σ r z, S2 = Σ r z² | Σ r ‖z‖² | Σ r y yᵀ upper triangle, y = U_kᵀz, regrouped),
  // float64, z = x − μ_k.  order: the rows in the order the kernel's tiles take them (int64 [N], a
  // permutation of 0..N−1; none: as they are); the sums are the same up to rounding.  regroup:
  // the 5th output is such an order for the next call, the rows grouped by their most likely
  // component (a stable counting sort; else it is empty), so that a tile's points reach few
  // components and the kernel leaves the others out.
  m.def("em_stats(Tensor x, Tensor means, Tensor prec_chol, Tensor logits, str covariance_type, "
        "Tensor? order=None, bool regroup=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

}  // namespace fastgmmdiff
