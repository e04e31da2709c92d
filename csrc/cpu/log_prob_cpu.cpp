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
  // a_k = log π_k + Σ_d log U_k[d,d] − D/2 log 2π, in a plain loop (G·K·D work: cheaper than
  // the four ATen ops of component_const at the latency-regime sizes).
  r.a = at::empty({r.G, r.K}, r.x.options());
  AT_DISPATCH_FLOATING_TYPES(r.x.scalar_type(), "fastgmmdiff_component_const", [&] {
    const scalar_t* lg = r.logits.data_ptr<scalar_t>();
    const scalar_t* pr = r.prec.data_ptr<scalar_t>();
    scalar_t* a = r.a.data_ptr<scalar_t>();
    const int64_t K = r.K, D = r.D;
    const int64_t ps = cov == kDiag ? D : cov == kSpherical ? 1 : D * D;
    const scalar_t half_d_log2pi = scalar_t(0.5 * 1.8378770664093454835606594728112) * scalar_t(D);
    for (int64_t g = 0; g < r.G; ++g) {
      const scalar_t* l = lg + g * K;
      scalar_t m = -std::numeric_limits<scalar_t>::infinity();
      for (int64_t k = 0; k < K; ++k) m = std::max(m, l[k]);
      scalar_t sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += std::exp(l[k] - m);
      const scalar_t lse = m + std::log(sum);
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* u = pr + (g * K + k) * ps;
        scalar_t ld = 0;
        if (cov == kDiag)
          for (int64_t d = 0; d < D; ++d) ld += std::log(u[d]);
        else if (cov == kSpherical)
          ld = scalar_t(D) * std::log(u[0]);
        else
          for (int64_t d = 0; d < D; ++d) ld += std::log(u[d * D + d]);
        a[g * K + k] = l[k] - lse + ld - half_d_log2pi;
      }
    }
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

  const int64_t buf_elems = r.G * r.K * (2 * r.D + 1 + (r.cov == kFull ? r.D * r.D : 0));
  const ChunkPlan plan(items, r.G, shared, buf_elems * static_cast<int64_t>(r.x.element_size()),
                       items * work_per_item(r));
  at::Tensor gmu = at::zeros({plan.nbuf, r.G, r.K, r.D}, r.x.options());
  std::vector<int64_t> sshape = {plan.nbuf};
  for (auto s : r.prec.sizes()) sshape.push_back(s);
  at::Tensor S = at::zeros(sshape, r.x.options());
  at::Tensor W = at::zeros({plan.nbuf, r.G, r.K}, r.x.options());

  AT_DISPATCH_FLOATING_TYPES(acc, "fastgmmdiff_log_prob_backward_cpu", [&] {
    const Problem<scalar_t> p = problem<scalar_t>(r);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* lpp = lp.data_ptr<scalar_t>();
    scalar_t* gxp = gx.data_ptr<scalar_t>();
    plan.run([&](int64_t b, int64_t e, int64_t buf) {
      const Accum<scalar_t> a{gmu[buf].data_ptr<scalar_t>(), S[buf].data_ptr<scalar_t>(),
                              W[buf].data_ptr<scalar_t>()};
      run_bwd(p, gp, lpp, gxp, a, b, e);
    });
  });
  at::Tensor gmu_t = fold_chunks(gmu), S_t = fold_chunks(S), W_t = fold_chunks(W);
  at::Tensor gsum = at::where(lp.isfinite(), g, at::zeros({}, g.options())).sum(-1, true);
  at::Tensor glog = W_t - at::softmax(r.logits, -1) * gsum;
  at::Tensor gprec = finish_prec_grad(r.prec, W_t, S_t, r.cov, r.D);
  return {gx.to(x.scalar_type()), gmu_t.to(means.scalar_type()), gprec.to(prec.scalar_type()),
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
