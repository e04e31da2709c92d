// CPU kernels of the fused NGMG's one-component-per-point path (fastgmmdiff::ngmg with `target`
// and many components: log_prob_cpu.cpp): log N(x_n; μ_t, Σ_t) and its backward.  The target
// component's parameters are read directly (a gather), never the other K − 1:
//
//   out_n = c_t − ½ q_n,   q_n = ‖U_tᵀ(x_n − μ_t)‖²,   c_t = Σ_d log U_t[d,d] − D/2 log 2π
//   ∂x_n = −g_n Λ_t z_n,  ∂μ_t += g_n Λ_t z_n,  and the prec_chol gradient of SPEC §1 with
//   r = 1 for the target and 0 elsewhere (W_t = Σ g_n, S_t = Σ g_n z z | z yᵀ).
//
// Work is per point (D is small in this regime; the inner loops over D vectorise with the
// compiler's default target).  Rows with a non-finite output get zero gradients.
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../ops.h"
#include "chunks.h"
#include "problem.h"
#include "target_cpu.h"

namespace fastgmmdiff {
namespace cpu {
namespace {

struct TPrepared : Canonical {
  at::Tensor target, c;
  Views v;
};

// c: each component's log-normaliser, or 0 with `normalize` (NGMG's p̃ = exp(−½q_t): the
// log-normaliser never added, so never cancelled).
TPrepared tprepare(const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
                   const at::Tensor& target, c10::string_view covariance_type, bool normalize = false) {
  const int cov = parse_cov(covariance_type);
  Views v = canonical_views(x, means, prec, target, cov, true);
  check_points_and_params(v.x, v.means, v.prec, cov);
  FGD_CHECK(x.device().is_cpu(), "the CPU kernels got tensors on ", x.device());
  TPrepared r;
  static_cast<Canonical&>(r) = canonical(v.x, v.means, v.prec, cov);
  check_target(v.last, r.G, r.N, x);
  r.target = v.last.contiguous();
  r.v = v;
  check_target_range(r.target, r.K);
  r.c = normalize ? at::zeros({r.G, r.K}, r.prec.options())
                  : component_consts_t(at::Tensor(), r.prec, cov, r.G, r.K, r.D);
  return r;
}

// q for one point and its component; for FULL also y = Uᵀz into y (length D).
template <typename T>
inline T quad1(int cov, const T* __restrict xr, const T* __restrict mu, const T* __restrict pr,
               int64_t D, T* __restrict y) {
  T q = 0;
  if (cov == kDiag) {
    for (int64_t d = 0; d < D; ++d) {
      const T t = (xr[d] - mu[d]) * pr[d];
      q += t * t;
    }
  } else if (cov == kSpherical) {
    for (int64_t d = 0; d < D; ++d) {
      const T t = (xr[d] - mu[d]) * pr[0];  // scaled before the square: z² overflows first
      q += t * t;
    }
  } else {
    for (int64_t e = 0; e < D; ++e) y[e] = 0;
    for (int64_t d = 0; d < D; ++d) {
      const T zd = xr[d] - mu[d];
      for (int64_t e = d; e < D; ++e) y[e] += pr[d * D + e] * zd;
    }
    for (int64_t e = 0; e < D; ++e) q += y[e] * y[e];
    q = far_q(q, xr, D);
  }
  return q;
}

inline int64_t prec_stride(int cov, int64_t D) { return cov == kDiag ? D : cov == kSpherical ? 1 : D * D; }

}  // namespace

void check_target_range(const at::Tensor& target, int64_t K) {
  const int64_t* tp = target.data_ptr<int64_t>();
  int64_t lo = 0, hi = 0;
  for (int64_t i = 0, n = target.numel(); i < n; ++i) {  // a reduction (vectorises), then one check
    lo = std::min(lo, tp[i]);
    hi = std::max(hi, tp[i]);
  }
  FGD_CHECK_VALUE(lo >= 0 && hi < K, "target holds ", lo < 0 ? lo : hi, ", outside the component range [0, ", K, ")");
}

at::Tensor log_prob_target_cpu(const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
                               const at::Tensor& target, c10::string_view covariance_type, bool normalize) {
  TPrepared r = tprepare(x, means, prec, target, covariance_type, normalize);
  at::Tensor out = at::empty({r.G, r.N}, r.x.options());
  if (r.N == 0) return api_rows(out, r.v);
  const int64_t ps = prec_stride(r.cov, r.D);
  AT_DISPATCH_FLOATING_TYPES(r.x.scalar_type(), "fastgmmdiff_log_prob_target_cpu", [&] {
    const scalar_t *xp = r.x.data_ptr<scalar_t>(), *mp = r.means.data_ptr<scalar_t>(),
                   *pp = r.prec.data_ptr<scalar_t>(), *cp = r.c.data_ptr<scalar_t>();
    const int64_t* tp = r.target.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(1, ps + r.D));
    at::parallel_for(0, r.G * r.N, grain, [&](int64_t b, int64_t e) {
      FlushDenormals ftz;
      std::vector<scalar_t> y(r.cov == kFull ? r.D : 1);
      for (int64_t i = b; i < e; ++i) {
        const int64_t g = i / r.N, n = i % r.N, gk = g * r.K + tp[i];
        const scalar_t* xr = xp + ((r.Gx == 1 ? 0 : g) * r.N + n) * r.D;
        const scalar_t q = quad1(r.cov, xr, mp + gk * r.D, pp + gk * ps, r.D, y.data());
        op[i] = cp[gk] - scalar_t(0.5) * q;
      }
    });
  });
  return api_rows(out, r.v);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> log_prob_target_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
    const at::Tensor& target, const at::Tensor& logp, c10::string_view covariance_type) {
  TPrepared r = tprepare(x, means, prec, target, covariance_type);
  const auto acc = r.x.scalar_type();
  at::Tensor g, lp;
  std::tie(g, lp) = backward_rows(grad, logp, r.v, r.G, r.N, acc);
  const bool shared = r.Gx == 1 && r.G > 1;
  at::Tensor gx = at::zeros_like(r.x);
  const int64_t ps = prec_stride(r.cov, r.D);
  // Items: batched x: (g, n) g-major; shared x: n, every g inside (one owner per gx row).
  const int64_t items = shared ? r.N : r.G * r.N;
  const ChunkPlan plan(items, r.G, shared, r.G * r.K * (r.D + ps + 1) * static_cast<int64_t>(r.x.element_size()),
                       r.G * r.N * (ps + r.D));
  at::Tensor gmu_out = at::empty_like(r.means), gprec = at::empty_like(r.prec);
  AT_DISPATCH_FLOATING_TYPES(acc, "fastgmmdiff_log_prob_target_backward_cpu", [&] {
    const ParamSums<scalar_t> sums(plan.nbuf, r.G, r.K, r.D, ps, r.x.options());
    if (items > 0) {
      const scalar_t *xp = r.x.data_ptr<scalar_t>(), *mp = r.means.data_ptr<scalar_t>(),
                     *pp = r.prec.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>(),
                     *lpp = lp.data_ptr<scalar_t>();
      const int64_t* tp = r.target.data_ptr<int64_t>();
      scalar_t* gxp = gx.data_ptr<scalar_t>();
      const int64_t D = r.D;
      plan.run([&](int64_t b, int64_t e, int64_t buf) {
        scalar_t* gm = sums.gmu(buf);
        scalar_t* gs = sums.gS(buf);
        scalar_t* gw = sums.W(buf);
        FlushDenormals ftz;
        std::vector<scalar_t> y(D), z(D), uy(D);
        for (int64_t it = b; it < e; ++it) {
          const int64_t g0 = shared ? 0 : it / r.N, g1 = shared ? r.G : g0 + 1;
          const int64_t n = shared ? it : it % r.N;
          const scalar_t* xr = xp + ((shared ? 0 : g0) * r.N + n) * D;
          scalar_t* gxr = gxp + ((shared ? 0 : g0) * r.N + n) * D;
          for (int64_t gg = g0; gg < g1; ++gg) {
            const int64_t i = gg * r.N + n;
            if (!std::isfinite(lpp[i]) || gp[i] == scalar_t(0)) continue;
            const scalar_t w = gp[i];
            const int64_t gk = gg * r.K + tp[i];
            const scalar_t* mu = mp + gk * D;
            const scalar_t* pr = pp + gk * ps;
            gw[gk] += w;
            if (r.cov == kFull) {
              quad1(r.cov, xr, mu, pr, D, y.data());
              for (int64_t d = 0; d < D; ++d) z[d] = xr[d] - mu[d];
              scalar_t* gsk = gs + gk * ps;
              for (int64_t d = 0; d < D; ++d) {
                scalar_t acc_uy = 0;
                for (int64_t e2 = d; e2 < D; ++e2) {
                  acc_uy += pr[d * D + e2] * y[e2];
                  gsk[d * D + e2] += w * z[d] * y[e2];
                }
                gxr[d] -= w * acc_uy;
                gm[gk * D + d] += w * acc_uy;
              }
            } else {
              scalar_t zz = 0;
              for (int64_t d = 0; d < D; ++d) {
                const scalar_t s = r.cov == kDiag ? pr[d] : pr[0];
                const scalar_t zd = xr[d] - mu[d], yd = zd * s;
                const scalar_t lz = (w * zd) * s * s;  // w s² first can overflow and meet z = 0
                gxr[d] -= lz;
                gm[gk * D + d] += lz;
                if (r.cov == kDiag)
                  gs[gk * D + d] += (w * yd) * zd;  // Σ w (s z) z: csrc/gmm_math.h prec_grad_scale
                else
                  zz += yd * zd;
              }
              if (r.cov == kSpherical) gs[gk] += w * zz;
            }
          }
        }
      });
    }
    sums.fold();
    finish_param_grads(sums, r.prec.data_ptr<scalar_t>(), r.cov, gmu_out.data_ptr<scalar_t>(),
                       gprec.data_ptr<scalar_t>());
  });
  return {fit_grad(gx, x), fit_grad(gmu_out, means), fit_grad(gprec, prec)};
}

}  // namespace cpu
}  // namespace fastgmmdiff
