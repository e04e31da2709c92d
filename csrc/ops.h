// Shared by the CPU and CUDA entry points: schema-level checks and the per-component constant.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "gmm_math.h"

namespace fastgmmdiff {

enum CovType : int { kDiag = 0, kSpherical = 1, kFull = 2 };

#define FGD_CHECK(cond, ...) TORCH_CHECK(cond, "fastgmmdiff: ", __VA_ARGS__)
// A bad value (not a bad layout): ValueError in Python, as the API's own value checks.
#define FGD_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, "fastgmmdiff: ", __VA_ARGS__)

inline int parse_cov(c10::string_view cov) {
  if (cov == "diag") return kDiag;
  if (cov == "spherical") return kSpherical;
  if (cov == "full") return kFull;
  FGD_CHECK(false, "covariance_type must be 'diag', 'spherical' or 'full' (the ops take the "
                   "canonical layout; 'tied' is expanded in Python), got '", std::string(cov), "'");
  return -1;
}

// log_prob_scale's pair: σ per dimension or per component only.
inline void check_scale_cov(c10::string_view cov) {
  FGD_CHECK(cov == "diag" || cov == "spherical", "log_prob_scale: covariance_type must be 'diag' or "
            "'spherical' (scale is σ per dimension or per component), got '", std::string(cov), "'");
}

// log_prob_scale's pair through log_prob's, on any device: U = 1/σ, and ∂σ = −∂U·U² (autograd.cpp).
at::Tensor log_prob_scale_composite(const at::Tensor& x, const at::Tensor& means, const at::Tensor& scale,
                                    const at::Tensor& logits, c10::string_view cov);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> log_prob_scale_backward_composite(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& means, const at::Tensor& scale,
    const at::Tensor& logits, const at::Tensor& logp, c10::string_view cov);

// The ops take the API layout (after dtype promotion and "tied" → "full" in Python): every
// tensor with or without its leading mixture axis G, i.e. x [N, D] | [Gx, N, D], means [K, D] |
// [G, K, D], prec diag [K, D] | spherical [K] | full [K, D, D] (each | with G), logits or
// target [K] | [G, K] resp. [N] | [G, N].  The result is [G, N] when any input has the G axis,
// else [N].  Entry points turn the inputs into the canonical layout below (views: an unsqueeze,
// or a stride-0 expand that `canonical` makes contiguous) and fit the gradients back to the
// inputs' shapes (`fit_grad`), so the Python API needs no view ops (and autograd no view
// nodes) on the latency path.
struct Views {
  at::Tensor x, means, prec, last;  // canonical; last = logits [G, K] or target [G, N]
  bool batched = false;             // the result has the G axis
  int64_t G = 1;
};

inline int64_t prec_dims(int cov) { return cov == kDiag ? 2 : cov == kSpherical ? 1 : 3; }

// last: logits (is_target false) or target (true).
inline Views canonical_views(const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
                             const at::Tensor& last, int cov, bool is_target) {
  const int64_t pd = prec_dims(cov);
  FGD_CHECK(x.dim() == 2 || x.dim() == 3, "x must be [N, D] or [G, N, D], got ", x.sizes());
  FGD_CHECK(means.dim() == 2 || means.dim() == 3, "means must be [K, D] or [G, K, D], got ", means.sizes());
  FGD_CHECK(prec.dim() == pd || prec.dim() == pd + 1, "prec_chol must have ", pd, " or ", pd + 1,
            " dimensions for this covariance type, got ", prec.sizes());
  FGD_CHECK(last.dim() == 1 || last.dim() == 2, is_target ? "target" : "logits", " must be 1-D or 2-D, got ",
            last.sizes());
  Views v;
  int64_t G = -1;
  auto take = [&](const at::Tensor& t, bool has, const char* name) {
    if (!has) return;
    FGD_CHECK(G < 0 || t.size(0) == G, "the mixture-batch axis G differs: ", name, " has ", t.size(0),
              ", another input ", G);
    G = t.size(0);
  };
  take(x, x.dim() == 3, "x");
  take(means, means.dim() == 3, "means");
  take(prec, prec.dim() == pd + 1, "prec_chol");
  take(last, last.dim() == 2, is_target ? "target" : "logits");
  v.batched = G >= 0;
  v.G = G < 0 ? 1 : G;
  auto with_g = [&](const at::Tensor& t, bool has) {
    if (has) return t;
    at::Tensor u = t.unsqueeze(0);
    if (v.G == 1) return u;
    std::vector<int64_t> sz(u.sizes().begin(), u.sizes().end());
    sz[0] = v.G;
    return u.expand(sz);
  };
  v.x = x.dim() == 3 ? x : x.unsqueeze(0);  // a shared x stays Gx = 1
  v.means = with_g(means, means.dim() == 3);
  v.prec = with_g(prec, prec.dim() == pd + 1);
  v.last = with_g(last, last.dim() == 2);
  return v;
}

// The canonical [G, N] of a result-shaped tensor (grad, log p).
inline at::Tensor canonical_rows(const at::Tensor& t, const Views& v) {
  return v.batched ? t : t.unsqueeze(0);
}
// The result [G, N] in the API layout.
inline at::Tensor api_rows(const at::Tensor& t, const Views& v) { return v.batched ? t : t.squeeze(0); }

// A gradient computed on the canonical layout, fitted to `input`'s shape and dtype: summed over
// G where the input had no G axis (it was broadcast), cast back to the input's dtype.
inline at::Tensor fit_grad(const at::Tensor& g, const at::Tensor& input) {
  at::Tensor r = g;
  if (input.dim() < g.dim()) r = g.size(0) == 1 ? g.squeeze(0) : g.sum(0);
  return r.to(input.scalar_type());
}

// Checks the canonical layout (fastgmmdiff/_checks.py): x [Gx, N, D] with Gx ∈ {1, G},
// means [G, K, D], prec diag [G, K, D] / spherical [G, K] / full [G, K, D, D], logits [G, K];
// one device, floating dtypes.  The Python API checks first with friendlier messages; these
// keep a direct torch.ops call from reading out of bounds.
inline void check_points_and_params(const at::Tensor& x, const at::Tensor& means,
                                    const at::Tensor& prec, int cov) {
  FGD_CHECK(x.dim() == 3, "x must be [Gx, N, D], got ", x.sizes());
  FGD_CHECK(means.dim() == 3, "means must be [G, K, D], got ", means.sizes());
  const int64_t G = means.size(0), K = means.size(1), D = means.size(2);
  FGD_CHECK(K >= 1 && D >= 1, "need K >= 1 and D >= 1, got means ", means.sizes());
  FGD_CHECK(x.size(2) == D && (x.size(0) == G || x.size(0) == 1),
            "x must be [G or 1, N, ", D, "], got ", x.sizes(), " (means ", means.sizes(), ")");
  if (cov == kDiag) {
    FGD_CHECK(prec.sizes() == means.sizes(), "diag prec_chol must be ", means.sizes(), ", got ", prec.sizes());
  } else if (cov == kSpherical) {
    FGD_CHECK(prec.dim() == 2 && prec.size(0) == G && prec.size(1) == K,
              "spherical prec_chol must be [", G, ", ", K, "], got ", prec.sizes());
  } else {
    FGD_CHECK(prec.dim() == 4 && prec.size(0) == G && prec.size(1) == K && prec.size(2) == D && prec.size(3) == D,
              "full prec_chol must be [", G, ", ", K, ", ", D, ", ", D, "], got ", prec.sizes());
  }
  for (const at::Tensor* t : {&x, &means, &prec}) {
    FGD_CHECK(t->is_floating_point(), "inputs must be floating point, got ", t->scalar_type());
    FGD_CHECK(t->device() == x.device(), "inputs must be on one device: ", t->device(), " vs ", x.device());
  }
}

inline void check_layout(const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
                         const at::Tensor& logits, int cov) {
  check_points_and_params(x, means, prec, cov);
  const int64_t G = means.size(0), K = means.size(1);
  FGD_CHECK(logits.dim() == 2 && logits.size(0) == G && logits.size(1) == K,
            "logits must be [", G, ", ", K, "], got ", logits.sizes());
  FGD_CHECK(logits.is_floating_point() && logits.device() == x.device(),
            "logits must be floating point and on ", x.device());
}

// target [G, N] int64 on x's device, for x [Gx, N, D] and G mixtures.
inline void check_target(const at::Tensor& target, int64_t G, int64_t N, const at::Tensor& x) {
  FGD_CHECK(target.scalar_type() == at::kLong, "target must be int64, got ", target.scalar_type());
  FGD_CHECK(target.dim() == 2 && target.size(0) == G && target.size(1) == N,
            "target must be [", G, ", ", N, "], got ", target.sizes());
  FGD_CHECK(target.device() == x.device(), "target is on ", target.device(), ", x on ", x.device());
}

// The backward's upstream gradient and saved log p, both [G, N].
inline void check_grad_logp(const at::Tensor& grad, const at::Tensor& logp, int64_t G, int64_t N) {
  FGD_CHECK(grad.sizes() == at::IntArrayRef({G, N}) && logp.sizes() == grad.sizes(),
            "grad and logp must be [", G, ", ", N, "], got ", grad.sizes(), " and ", logp.sizes());
  FGD_CHECK(grad.device() == logp.device(), "grad and logp must be on one device");
}

// The backward's upstream gradient and saved log p in the canonical [G, N] layout, checked,
// contiguous in the accumulation dtype `acc`.
inline std::pair<at::Tensor, at::Tensor> backward_rows(const at::Tensor& grad, const at::Tensor& logp, const Views& v,
                                                       int64_t G, int64_t N, at::ScalarType acc) {
  at::Tensor g = canonical_rows(grad, v), lp = canonical_rows(logp, v);
  check_grad_logp(g, lp, G, N);
  return {g.to(acc).contiguous(), lp.to(acc).contiguous()};
}

inline at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The inputs upcast to the accumulation dtype, contiguous, full factors read as upper
// triangular, with their sizes.  Shared by the CPU and CUDA entry points.
struct Canonical {
  at::Tensor x, means, prec;
  int cov;
  int64_t G, Gx, N, K, D;
};

inline Canonical canonical(const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec, int cov) {
  const auto acc = acc_type(x);
  Canonical r;
  r.cov = cov;
  r.x = x.to(acc).contiguous();
  r.means = means.to(acc).contiguous();
  r.prec = cov == kFull ? prec.to(acc).triu().contiguous() : prec.to(acc).contiguous();
  r.G = r.means.size(0);
  r.K = r.means.size(1);
  r.D = r.means.size(2);
  r.Gx = r.x.size(0);
  r.N = r.x.size(1);
  return r;
}

// Σ_d log U[d,d] per component, [G, K].
inline at::Tensor log_det(const at::Tensor& prec, int cov, int64_t D) {
  if (cov == kDiag) return prec.log().sum(-1);
  if (cov == kSpherical) return prec.log() * static_cast<double>(D);
  return prec.diagonal(0, -2, -1).log().sum(-1);
}

// Σ_d log U_k[d,d] − D/2 log 2π, [G, K]: a component's log-normaliser (no weight).
inline at::Tensor component_lognorm(const at::Tensor& prec, int cov, int64_t D) {
  return log_det(prec, cov, D).sub_(0.5 * D * kLog2Pi).contiguous();
}

// a_k = log π_k + Σ_d log U_k[d,d] − D/2 log 2π, [G, K], in prec's dtype.
inline at::Tensor component_const(const at::Tensor& prec, const at::Tensor& logits, int cov, int64_t D) {
  return (at::log_softmax(logits, -1) + component_lognorm(prec, cov, D)).contiguous();
}

// log(a / b) to a few ulps of its own size: log1p((a − b)/b) near a/b = 1, log(a/b) elsewhere.
inline at::Tensor log_ratio(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor d = (a - b) / b;
  return at::where(d.abs() < 0.5, at::log1p(d), (a / b).log());
}

// a_k − c, [G, K]: the constants with NGMG's normaliser c = logsumexp_k a_k inside, so that the
// fused NGMG's logsumexp gives log p̃ itself, never log p − c (|c| reaches hundreds: log p's
// rounding would be p̃'s relative error).  As differences from the largest a_m, logit and
// log U_dd ratios dimension by dimension, so nothing of size |c| is rounded
// (fastgmmdiff/_math.py ngmg_const, the same).
inline at::Tensor ngmg_const(const at::Tensor& prec, const at::Tensor& logits, int cov, int64_t D) {
  const at::Tensor u = cov == kSpherical ? prec.unsqueeze(-1) : cov == kDiag ? prec : prec.diagonal(0, -2, -1);
  const at::Tensor m = component_const(prec, logits, cov, D).argmax(-1, /*keepdim=*/true);
  std::vector<int64_t> um(m.sizes().begin(), m.sizes().end());
  um.push_back(u.size(-1));
  const at::Tensor lr = log_ratio(u, u.gather(-2, m.unsqueeze(-1).expand(um)));
  at::Tensor diff = logits - logits.gather(-1, m);
  diff = diff + (cov == kSpherical ? lr.select(-1, 0) * static_cast<double>(D) : lr.sum(-1));
  return (diff - at::logsumexp(diff, {-1}, /*keepdim=*/true)).contiguous();
}

// NGMG without normalisation, loss = −p: p = exp(logp) can pass the dtype's largest value
// (loss −inf, logp finite).  Such a row's gradient terms are p·(finite), so one backward with
// upstream grad·loss gives inf·0 = NaN wherever a term is 0 (a coordinate at its mean; logits'
// Σ(r − π) for one component) and loses every magnitude.  `bwd(scale)` runs the backward with
// upstream grad·scale per row and returns the gradients; this runs it for the other rows and,
// where a row overflowed, once more for those rows scaled by exp(−M) (M their largest logp),
// then adds that part as sign·exp(log|·| + M): ±inf where the exact term is beyond the range,
// the term itself where it is not, 0 where it is 0.  `look`: check for such rows first (a host
// read: CPU tensors) and skip the split when there are none; otherwise the second pass always
// runs (on a GPU without a sync; its weights are then all 0).  Normalised NGMG (p̃ ≤ 1) never
// needs it.  fastgmmdiff/_autograd.py overflow_split is the same for the Python backends.
template <class F>
std::vector<at::Tensor> overflow_split(const at::Tensor& loss, const at::Tensor& logp, bool look, F bwd) {
  const at::Tensor over = at::isinf(loss).logical_and_(at::isfinite(logp));
  if (look && !over.any().item<bool>()) return bwd(loss);
  std::vector<at::Tensor> fin = bwd(loss.masked_fill(over, 0));
  at::Tensor M = at::where(over, logp, -std::numeric_limits<double>::infinity()).amax();
  M = at::where(at::isfinite(M), M, at::zeros_like(M));
  std::vector<at::Tensor> big = bwd(at::where(over, -(logp - M).exp(), at::zeros_like(logp)));
  for (size_t i = 0; i < fin.size(); ++i) {
    const at::Tensor b = big[i].to(logp.scalar_type());
    const at::Tensor add = at::where(b == 0, at::zeros_like(b), b.sign() * (b.abs().log() + M).exp());
    fin[i] = (fin[i].to(logp.scalar_type()) + add).to(fin[i].scalar_type());
  }
  return fin;
}

}  // namespace fastgmmdiff
