// CPU entry points of fastgmmdiff::log_prob / log_prob_backward: checks, upcast, the
// per-component constant, parallel work split (torch's intra-op pool), deterministic
// reduction of the backward's per-chunk sums, and the final parameter-gradient formulas.
// The kernels themselves are in kernels.inc (compiled once per instruction set).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../ops.h"
#include "chunks.h"
#include "problem.h"

namespace fastgmmdiff {
namespace cpu {

namespace {

enum Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detect_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kBaseline;
}

// FASTGMMDIFF_CPU_ISA=baseline|avx2|avx512 lowers (never raises) the detected level; read
// on every call so tests can exercise each build.
Isa current_isa() {
  static const Isa detected = detect_isa();
  const char* env = std::getenv("FASTGMMDIFF_CPU_ISA");
  if (env == nullptr || *env == '\0') return detected;
  Isa want = detected;
  if (std::strcmp(env, "baseline") == 0) want = kBaseline;
  else if (std::strcmp(env, "avx2") == 0) want = kAvx2;
  else if (std::strcmp(env, "avx512") == 0) want = kAvx512;
  else FGD_CHECK(false, "FASTGMMDIFF_CPU_ISA must be baseline, avx2 or avx512, got '", env, "'");
  return want < detected ? want : detected;
}

template <typename T>
void run_fwd(const Problem<T>& p, T* out, int64_t b, int64_t e) {
  switch (current_isa()) {
#if defined(__x86_64__)
    case kAvx512: return avx512::fwd(p, out, b, e);
    case kAvx2: return avx2::fwd(p, out, b, e);
#endif
    default: return baseline::fwd(p, out, b, e);
  }
}

template <typename T>
void run_bwd(const Problem<T>& p, const T* grad, const T* logp, T* gx, const Accum<T>& acc,
             int64_t b, int64_t e) {
  switch (current_isa()) {
#if defined(__x86_64__)
    case kAvx512: return avx512::bwd(p, grad, logp, gx, acc, b, e);
    case kAvx2: return avx2::bwd(p, grad, logp, gx, acc, b, e);
#endif
    default: return baseline::bwd(p, grad, logp, gx, acc, b, e);
  }
}

struct Prepared : Canonical {
  at::Tensor logits, a;
};

Prepared prepare(const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
                 const at::Tensor& logits, c10::string_view covariance_type) {
  const int cov = parse_cov(covariance_type);
  check_layout(x, means, prec, logits, cov);
  FGD_CHECK(x.device().is_cpu(), "the CPU kernels got tensors on ", x.device());
  Prepared r;
  static_cast<Canonical&>(r) = canonical(x, means, prec, cov);
  r.logits = logits.to(r.x.scalar_type()).contiguous();
  r.a = at::empty({r.G, r.K}, r.x.options());
  AT_DISPATCH_FLOATING_TYPES(r.x.scalar_type(), "fastgmmdiff_component_const", [&] {
    component_consts(r.logits.data_ptr<scalar_t>(), r.prec.data_ptr<scalar_t>(), r.cov, r.G, r.K, r.D,
                     r.a.data_ptr<scalar_t>());
  });
  return r;
}

template <typename T>
Problem<T> problem(const Prepared& r) {
  return Problem<T>{r.G, r.Gx, r.N, r.K, r.D, r.cov,
                    r.x.data_ptr<T>(), r.means.data_ptr<T>(), r.prec.data_ptr<T>(), r.a.data_ptr<T>()};
}

int64_t n_items(const Prepared& r) {
  const int64_t tiles = (r.N + kTile - 1) / kTile;
  return (r.Gx == 1 && r.G > 1) ? tiles : r.G * tiles;
}

int64_t work_per_item(const Prepared& r) {
  const int64_t per_k = r.cov == kFull ? r.D * (r.D + 3) / 2 : r.D;
  return kTile * r.K * per_k * ((r.Gx == 1 && r.G > 1) ? r.G : 1);
}

}  // namespace

at::Tensor log_prob_cpu(const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
                        const at::Tensor& logits, c10::string_view covariance_type) {
  Prepared r = prepare(x, means, prec, logits, covariance_type);
  at::Tensor out = at::empty({r.G, r.N}, r.x.options());
  const int64_t items = n_items(r);
  if (items == 0) return out;
  // Threads only when each gets ≥ ~2^18 element-operations: below that, waking the pool costs
  // more than it saves (the latency-regime workloads).
  const int64_t grain = std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(1, work_per_item(r)));
  AT_DISPATCH_FLOATING_TYPES(r.x.scalar_type(), "fastgmmdiff_log_prob_cpu", [&] {
    const Problem<scalar_t> p = problem<scalar_t>(r);
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, items, grain, [&](int64_t b, int64_t e) { run_fwd(p, o, b, e); });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> log_prob_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
    const at::Tensor& logits, const at::Tensor& logp, c10::string_view covariance_type) {
  Prepared r = prepare(x, means, prec, logits, covariance_type);
  check_grad_logp(grad, logp, r.G, r.N);
  const auto acc = r.x.scalar_type();
  at::Tensor g = grad.to(acc).contiguous();
  at::Tensor lp = logp.to(acc).contiguous();
  at::Tensor gx = at::empty_like(r.x);
  const int64_t items = n_items(r);
  const bool shared = r.Gx == 1 && r.G > 1;

  const int64_t ps = r.cov == kDiag ? r.D : r.cov == kSpherical ? 1 : r.D * r.D;
  const int64_t buf_elems = r.G * r.K * (r.D + ps + 1);
  const ChunkPlan plan(items, r.G, shared, buf_elems * static_cast<int64_t>(r.x.element_size()),
                       items * work_per_item(r));
  at::Tensor gmu = at::empty_like(r.means), gprec = at::empty_like(r.prec),
             glog = at::empty({r.G, r.K}, r.x.options());

  // The parameter-gradient epilogue is plain loops (G·K·D work): at the latency-regime sizes
  // a dozen ATen calls here cost more than the kernel.
  AT_DISPATCH_FLOATING_TYPES(acc, "fastgmmdiff_log_prob_backward_cpu", [&] {
    const Problem<scalar_t> p = problem<scalar_t>(r);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* lpp = lp.data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    const ParamSums<scalar_t> sums(plan.nbuf, r.G, r.K, r.D, ps, r.x.options());
    plan.run([&](int64_t b, int64_t e, int64_t buf) {
      run_bwd(p, gp, lpp, gxp, Accum<scalar_t>{sums.gmu(buf), sums.gS(buf), sums.W(buf)}, b, e);
    });
    sums.fold();
    finish_param_grads(sums, r.prec.data_ptr<scalar_t>(), r.cov, gmu.data_ptr<scalar_t>(),
                       gprec.data_ptr<scalar_t>());
    // logits: W_k − π_k Σ_n g_n over the live rows (π = softmax(logits), a_k holds log π_k
    // plus a constant per k, so π is recomputed from the logits here).
    const scalar_t* W = sums.W(0);
    const scalar_t* lg = r.logits.data_ptr<scalar_t>();
    scalar_t* gl = glog.data_ptr<scalar_t>();
    for (int64_t gg = 0; gg < r.G; ++gg) {
      scalar_t gsum = 0;
      for (int64_t n = 0; n < r.N; ++n)
        if (std::isfinite(lpp[gg * r.N + n])) gsum += gp[gg * r.N + n];
      const scalar_t* l = lg + gg * r.K;
      scalar_t m = -std::numeric_limits<scalar_t>::infinity(), z = 0;
      for (int64_t k = 0; k < r.K; ++k) m = std::max(m, l[k]);
      for (int64_t k = 0; k < r.K; ++k) z += std::exp(l[k] - m);
      for (int64_t k = 0; k < r.K; ++k)
        gl[gg * r.K + k] = W[gg * r.K + k] - std::exp(l[k] - m) / z * gsum;
    }
  });
  return {gx.to(x.scalar_type()), gmu.to(means.scalar_type()), gprec.to(prec.scalar_type()),
          glog.to(logits.scalar_type())};
}

const char* isa_name() {
  switch (current_isa()) {
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace cpu
}  // namespace fastgmmdiff

TORCH_LIBRARY_IMPL(fastgmmdiff, CPU, m) {
  m.impl("log_prob", &fastgmmdiff::cpu::log_prob_cpu);
  m.impl("log_prob_backward", &fastgmmdiff::cpu::log_prob_backward_cpu);
}
