// CPU entry points of fastgmmdiff::log_prob / log_prob_backward: checks, upcast, the
// per-component constant, parallel work split (torch's intra-op pool), deterministic
// reduction of the backward's per-chunk sums, and the final parameter-gradient formulas.
// The kernels themselves are in kernels.inc (compiled once per instruction set).
#include <numeric>
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
#include "target_cpu.h"

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

template <typename T>
void run_consts(const T* lg, const T* pr, int cov, int64_t G, int64_t K, int64_t D, T* a, T* lse) {
  switch (current_isa()) {
#if defined(__x86_64__)
    case kAvx512: return avx512::consts(lg, pr, cov, G, K, D, a, lse);
    case kAvx2: return avx2::consts(lg, pr, cov, G, K, D, a, lse);
#endif
    default: return baseline::consts(lg, pr, cov, G, K, D, a, lse);
  }
}

template <typename T>
void run_exp_rows(const T* x, const T* c, int64_t G, int64_t K, T* out) {
  switch (current_isa()) {
#if defined(__x86_64__)
    case kAvx512: return avx512::exp_rows(x, c, G, K, out);
    case kAvx2: return avx2::exp_rows(x, c, G, K, out);
#endif
    default: return baseline::exp_rows(x, c, G, K, out);
  }
}

template <typename T>
void run_fwd_one(const Problem<T>& p, const T* lg, T* out, int64_t b, int64_t e) {
  switch (current_isa()) {
#if defined(__x86_64__)
    case kAvx512: return avx512::fwd_one(p, lg, out, b, e);
    case kAvx2: return avx2::fwd_one(p, lg, out, b, e);
#endif
    default: return baseline::fwd_one(p, lg, out, b, e);
  }
}

template <typename T>
void run_em(const Problem<T>& p, double* acc, double* lsum, int64_t b, int64_t e) {
  switch (current_isa()) {
#if defined(__x86_64__)
    case kAvx512: return avx512::em(p, acc, lsum, b, e);
    case kAvx2: return avx2::em(p, acc, lsum, b, e);
#endif
    default: return baseline::em(p, acc, lsum, b, e);
  }
}

template <typename T>
void run_bwd_one(const Problem<T>& p, const T* lg, const T* grad, const T* logp, T* gx, T* gmu, T* gprec, T* glog,
                 int64_t b, int64_t e) {
  switch (current_isa()) {
#if defined(__x86_64__)
    case kAvx512: return avx512::bwd_one(p, lg, grad, logp, gx, gmu, gprec, glog, b, e);
    case kAvx2: return avx2::bwd_one(p, lg, grad, logp, gx, gmu, gprec, glog, b, e);
#endif
    default: return baseline::bwd_one(p, lg, grad, logp, gx, gmu, gprec, glog, b, e);
  }
}

struct Prepared : Canonical {
  at::Tensor logits, a, lse;  // a [G, K], lse [G] = logsumexp_k logits
  Views v;
};

bool one_point(const Canonical& r) { return use_one_point(r.cov, r.G, r.Gx, r.N, r.K, r.D); }

// one_point_ok: the caller runs the one-point kernels when one_point(r) (plain log_prob), which
// compute a and lse per row, so they are left undefined then.  consts = false: never computed
// (log_prob_scale, whose prec holds σ: the caller computes nothing from it but the layout).
Prepared prepare(const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
                 const at::Tensor& logits, c10::string_view covariance_type, bool one_point_ok = false,
                 bool consts = true) {
  const int cov = parse_cov(covariance_type);
  Views v = canonical_views(x, means, prec, logits, cov, false);
  check_layout(v.x, v.means, v.prec, v.last, cov);
  FGD_CHECK(x.device().is_cpu(), "the CPU kernels got tensors on ", x.device());
  Prepared r;
  static_cast<Canonical&>(r) = canonical(v.x, v.means, v.prec, cov);
  r.logits = v.last.to(r.x.scalar_type()).contiguous();
  r.v = v;
  if (consts && !(one_point_ok && one_point(r)))
    r.a = component_consts_t(r.logits, r.prec, r.cov, r.G, r.K, r.D, &r.lse);
  return r;
}

// a is null where prepare left it undefined (the one-point kernels).
template <typename T>
Problem<T> problem(const Prepared& r) {
  return Problem<T>{r.G, r.Gx, r.N, r.K, r.D, r.cov, r.x.data_ptr<T>(), r.means.data_ptr<T>(), r.prec.data_ptr<T>(),
                    r.a.defined() ? r.a.data_ptr<T>() : nullptr};
}

bool row_tiles(const Prepared& r) { return use_row_tiles(r.cov, r.G, r.Gx, r.N, r.K, r.D); }

int64_t n_items(const Prepared& r) {
  if (row_tiles(r)) return (r.G * r.N + kTile - 1) / kTile;
  const int64_t tiles = (r.N + kTile - 1) / kTile;
  return (r.Gx == 1 && r.G > 1) ? tiles : r.G * tiles;
}

int64_t work_per_item(const Prepared& r) {
  const int64_t per_k = r.cov == kFull ? r.D * (r.D + 3) / 2 : r.D;
  return kTile * r.K * per_k * ((r.Gx == 1 && r.G > 1) ? r.G : 1);
}

// Optional inputs of the fused NGMG (see Problem): target [G, N] (canonical, int64), and in
// backward the per-point scale of the upstream gradient (the saved loss).
struct Fused {
  at::Tensor target, scale;
  bool ngmg = false;  // forward: also write the loss
  bool normalize = false;
};

// The fused NGMG's constants (forward and backward alike): with a target, the target
// component's log-normaliser, or 0 for the normalised p̃ = exp(−½q_t); without one, normalised,
// a_k − c (ngmg_const: the logsumexp then gives log p̃ itself, never log p − c, whose
// rounding at |c| ~ hundreds would be p̃'s relative error).  The logits' gradient keeps using
// r.lse (π), which the shift does not touch.
void ngmg_constants(Prepared& r, const Fused& f) {
  if (f.target.defined())
    r.a = f.normalize ? at::zeros_like(r.a) : component_consts_t(at::Tensor(), r.prec, r.cov, r.G, r.K, r.D);
  else if (f.normalize)
    r.a = ngmg_const(r.prec, r.logits, r.cov, r.D);
}

// log p (or a_t − ½q_t with a target) [G, N] and, for the fused NGMG, the loss [G, N].
std::tuple<at::Tensor, at::Tensor> forward_impl(Prepared& r, const Fused& f) {
  at::Tensor out = at::empty({r.G, r.N}, r.x.options());
  at::Tensor loss = f.ngmg ? at::empty({r.G, r.N}, r.x.options()) : at::Tensor();
  const int64_t items = n_items(r);
  if (items == 0) return {out, loss};
  const bool has_t = f.target.defined();
  // Threads only when each gets ≥ ~2^18 element-operations: below that, waking the pool costs
  // more than it saves (the latency-regime workloads).
  const int64_t grain = std::max<int64_t>(1, (1 << 18) / std::max<int64_t>(1, work_per_item(r)));
  if (f.ngmg) ngmg_constants(r, f);
  AT_DISPATCH_FLOATING_TYPES(r.x.scalar_type(), "fastgmmdiff_log_prob_cpu", [&] {
    Problem<scalar_t> p = problem<scalar_t>(r);
    if (has_t) p.target = f.target.data_ptr<int64_t>();
    if (f.ngmg) p.loss = loss.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, items, grain, [&](int64_t b, int64_t e) { run_fwd(p, o, b, e); });
  });
  return {out, loss};
}

// Gradients on the canonical layout; fitted to the inputs' shapes by the callers.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(const Prepared& r, const at::Tensor& grad,
                                                                         const at::Tensor& logp, const Fused& f) {
  const auto acc = r.x.scalar_type();
  at::Tensor g, lp;
  std::tie(g, lp) = backward_rows(grad, logp, r.v, r.G, r.N, acc);
  at::Tensor sc = f.scale.defined() ? canonical_rows(f.scale, r.v).to(acc).contiguous() : at::Tensor();
  if (sc.defined()) check_grad_logp(sc, lp, r.G, r.N);
  at::Tensor gx = at::empty_like(r.x);
  const int64_t items = n_items(r);
  const bool shared = r.Gx == 1 && r.G > 1;

  const int64_t ps = r.cov == kDiag ? r.D : r.cov == kSpherical ? 1 : r.D * r.D;
  const int64_t buf_elems = r.G * r.K * (r.D + ps + 1);
  // Row tiles mix mixtures within an item, but a chunk that starts at a row g·N starts at a
  // mixture: every (N / gcd(N, P))-th item does, so chunks aligned to that own their mixtures.
  const int64_t align = row_tiles(r) ? r.N / std::gcd<int64_t>(r.N, kTile) : 0;
  const ChunkPlan plan(items, r.G, shared, buf_elems * static_cast<int64_t>(r.x.element_size()),
                       items * work_per_item(r), align);
  at::Tensor gmu = at::empty_like(r.means), gprec = at::empty_like(r.prec),
             glog = at::empty({r.G, r.K}, r.x.options());

  // The parameter-gradient epilogue is plain loops (G·K·D work): at the latency-regime sizes
  // a dozen ATen calls here cost more than the kernel.
  AT_DISPATCH_FLOATING_TYPES(acc, "fastgmmdiff_log_prob_backward_cpu", [&] {
    Problem<scalar_t> p = problem<scalar_t>(r);
    if (f.target.defined()) p.target = f.target.data_ptr<int64_t>();
    if (sc.defined()) p.scale = sc.data_ptr<scalar_t>();
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
    scalar_t* gl = glog.data_ptr<scalar_t>();
    if (p.target != nullptr) {  // the mixture weights do not enter a targeted NGMG
      std::fill(gl, gl + r.G * r.K, scalar_t(0));
      return;
    }
    // logits: W_k − π_k Σ_n g_n over the live rows (π = softmax(logits), a_k holds log π_k
    // plus a constant per k, so π is recomputed from the logits here).
    const scalar_t* W = sums.W(0);
    run_exp_rows(r.logits.data_ptr<scalar_t>(), r.lse.data_ptr<scalar_t>(), r.G, r.K, gl);  // gl ← π
    for (int64_t gg = 0; gg < r.G; ++gg) {
      scalar_t gsum = 0;
      for (int64_t n = 0; n < r.N; ++n) {
        const int64_t i = gg * r.N + n;
        if (std::isfinite(lpp[i])) gsum += p.scale != nullptr ? gp[i] * p.scale[i] : gp[i];
      }
      for (int64_t k = 0; k < r.K; ++k) gl[gg * r.K + k] = W[gg * r.K + k] - gl[gg * r.K + k] * gsum;
    }
  });
  return {gx, gmu, gprec, glog};
}

// Components up to which the fused NGMG with a target evaluates every component on a tile and
// keeps the target's lanes (vectorised, K× the arithmetic); above it, the gather kernels of
// target_cpu.cpp (scalar, one component per point).
constexpr int64_t kTargetTileMaxK = 16;

}  // namespace

at::Tensor component_consts_t(const at::Tensor& logits, const at::Tensor& prec, int cov, int64_t G, int64_t K,
                              int64_t D, at::Tensor* lse) {
  at::Tensor a = at::empty({G, K}, prec.options());
  const at::Tensor ls = logits.defined() ? at::empty({G}, prec.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(prec.scalar_type(), "fastgmmdiff_component_consts", [&] {
    run_consts(logits.defined() ? logits.data_ptr<scalar_t>() : nullptr, prec.data_ptr<scalar_t>(), cov, G, K, D,
               a.data_ptr<scalar_t>(), ls.defined() ? ls.data_ptr<scalar_t>() : nullptr);
  });
  if (lse != nullptr) *lse = ls;
  return a;
}

namespace {

// Rows per parallel chunk: a row costs a few vector exps and logs besides its K·D
// element-operations (~100 ns at K = 8, D = 2), so ~2^15 / (K·(D + 4)) rows (tens of µs) are
// worth a thread.
int64_t one_point_grain(const Prepared& r) {
  return std::max<int64_t>(16, (int64_t{1} << 15) / std::max<int64_t>(1, r.K * (r.D + 4)));
}

// sigma: r.prec holds σ = 1/U (log_prob_scale; Problem::sigma).
at::Tensor forward_one(const Prepared& r, bool sigma = false) {
  at::Tensor out = at::empty({r.G, 1}, r.x.options());
  AT_DISPATCH_FLOATING_TYPES(r.x.scalar_type(), "fastgmmdiff_log_prob_one_cpu", [&] {
    Problem<scalar_t> p = problem<scalar_t>(r);
    p.sigma = sigma;
    const scalar_t* lg = r.logits.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, r.G, one_point_grain(r), [&](int64_t b, int64_t e) { run_fwd_one(p, lg, o, b, e); });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_one(const Prepared& r, const at::Tensor& grad,
                                                                        const at::Tensor& logp, bool sigma = false) {
  const auto acc = r.x.scalar_type();
  at::Tensor g, lp;
  std::tie(g, lp) = backward_rows(grad, logp, r.v, r.G, r.N, acc);
  at::Tensor gx = at::empty_like(r.x), gmu = at::empty_like(r.means), gprec = at::empty_like(r.prec),
             glog = at::empty({r.G, r.K}, r.x.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "fastgmmdiff_log_prob_backward_one_cpu", [&] {
    Problem<scalar_t> p = problem<scalar_t>(r);
    p.sigma = sigma;
    const scalar_t* lg = r.logits.data_ptr<scalar_t>();
    const scalar_t *gp = g.data_ptr<scalar_t>(), *lpp = lp.data_ptr<scalar_t>();
    scalar_t *gxp = gx.data_ptr<scalar_t>(), *gmp = gmu.data_ptr<scalar_t>(), *gpp = gprec.data_ptr<scalar_t>(),
             *glp = glog.data_ptr<scalar_t>();
    at::parallel_for(0, r.G, one_point_grain(r), [&](int64_t b, int64_t e) {
      run_bwd_one(p, lg, gp, lpp, gxp, gmp, gpp, glp, b, e);
    });
  });
  return {gx, gmu, gprec, glog};
}

}  // namespace

at::Tensor log_prob_cpu(const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
                        const at::Tensor& logits, c10::string_view covariance_type) {
  Prepared r = prepare(x, means, prec, logits, covariance_type, true);
  return api_rows(one_point(r) ? forward_one(r) : std::get<0>(forward_impl(r, Fused{})), r.v);
}

// The E-step's statistics in one fused pass: x [N, D] under one mixture (means [K, D],
// prec_chol diag [K, D] | spherical [K] | full [K, D, D], logits [K]) → (Σ log p [], N_k [K],
// S1 = Σ r z [K, D], S2: diag Σ r z² [K, D] | spherical Σ r ‖z‖² [K] | full [K, D, D], entries
// d ≤ e (the rest undefined) of Σ r z zᵀ for float64 data (kernels.inc em64_impl) and of the
// whitened Σ r y yᵀ, y = U_kᵀz, for float32 (em_impl; fastgmmdiff/_em.py forms M = U⁻ᵀ Y U⁻¹)),
// all float64, z = x − μ_k about the given means.  Tiles split as the backward's (ChunkPlan), the
// chunks' sums added in order: the same bits for any thread count.
namespace {

bool has(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Runs fn(b, e, chunk buffer) over the tiles and returns the chunks' buffers [per] summed in order.
template <typename Fn>
at::Tensor em_sum(const Prepared& r, int64_t per, Fn fn) {
  const int64_t tiles = (r.N + kTile - 1) / kTile;
  const ChunkPlan plan(tiles, 1, false, per * static_cast<int64_t>(sizeof(double)), tiles * work_per_item(r));
  at::Tensor buf = at::zeros({plan.nbuf, per}, r.x.options().dtype(at::kDouble));
  double* bp = buf.data_ptr<double>();
  plan.run([&](int64_t b, int64_t e, int64_t c) { fn(b, e, bp + c * per); });
  for (int64_t c = 1; c < plan.nbuf; ++c)
    for (int64_t i = 0; i < per; ++i) bp[i] += bp[c * per + i];
  return buf[0];
}

}  // namespace

// Row indices 0..N−1 grouped by label (labels in [0, K)) within each window of W consecutive rows, in
// row order within a group (a counting sort per window).  Windows, not the whole of x: a tile then
// gathers its rows from one window of x (W rows of 2 MB: within the TLB's reach), where rows
// from anywhere in x cost a page walk each (8% of the E-step at N = 200,000, D = 16, against
// 2% from within windows); a window of 16,384 rows still holds a few tiles of each of 64 components.
static at::Tensor group_by_label(const at::Tensor& labels, int64_t K, int64_t W) {
  const int64_t N = labels.numel();
  const int32_t* lab = labels.data_ptr<int32_t>();
  at::Tensor order = at::empty({N}, labels.options().dtype(at::kLong));
  int64_t* o = order.data_ptr<int64_t>();
  std::vector<int64_t> start(K + 1);
  for (int64_t w0 = 0; w0 < N; w0 += W) {
    const int64_t w1 = std::min(N, w0 + W);
    std::fill(start.begin(), start.end(), w0);
    for (int64_t n = w0; n < w1; ++n) ++start[lab[n] + 1];
    for (int64_t k = 0; k < K; ++k) start[k + 1] += start[k] - w0;
    for (int64_t n = w0; n < w1; ++n) o[start[lab[n]]++] = n;
  }
  return order;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> em_stats_cpu(
    const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec, const at::Tensor& logits,
    c10::string_view covariance_type, const c10::optional<at::Tensor>& order, bool regroup) {
  FGD_CHECK(x.dim() == 2 && means.dim() == 2 && logits.dim() == 1,
            "em_stats takes x [N, D], means [K, D] and logits [K] (one mixture); got x ", x.sizes(), ", means ",
            means.sizes(), ", logits ", logits.sizes());
  FGD_CHECK(covariance_type == "diag" || covariance_type == "spherical" || covariance_type == "full",
            "em_stats takes covariance_type 'diag', 'spherical' or 'full' (tied: pass U expanded to [K, D, D]); "
            "got '", std::string(covariance_type), "'");
  Prepared r = prepare(x, means, prec, logits, covariance_type, false);
  FGD_CHECK(r.G == 1 && r.Gx == 1, "em_stats takes one mixture");
  const int64_t K = r.K, D = r.D, ps = r.cov == kDiag ? D : r.cov == kSpherical ? 1 : D * D;
  const int64_t per = K * (1 + D + ps) + 1;  // N_k, S1, S2, Σ log p
  at::Tensor ord;
  if (has(order)) {
    ord = *order;
    FGD_CHECK(ord.dim() == 1 && ord.size(0) == r.N && ord.scalar_type() == at::kLong && ord.device().is_cpu(),
              "em_stats: order must be an int64 CPU tensor [N] = [", r.N, "] (a permutation of the rows); got ",
              ord.scalar_type(), " ", ord.sizes(), " on ", ord.device());
    ord = ord.contiguous();
    if (r.N > 0) {
      const auto [lo, hi] = at::aminmax(ord);
      FGD_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < r.N,
                "em_stats: order must hold row indices in [0, ", r.N, "); got values in [", lo.item<int64_t>(),
                ", ", hi.item<int64_t>(), "]");
    }
  }
  at::Tensor labels = regroup ? at::zeros({r.N}, r.x.options().dtype(at::kInt)) : at::Tensor();
  at::Tensor tot;
  AT_DISPATCH_FLOATING_TYPES(r.x.scalar_type(), "fastgmmdiff_em_stats_cpu", [&] {
    Problem<scalar_t> p = problem<scalar_t>(r);
    if (ord.defined()) p.order = ord.data_ptr<int64_t>();
    if (regroup) p.labels = labels.data_ptr<int32_t>();
    tot = em_sum(r, per, [&](int64_t b0, int64_t e0, double* acc) { run_em(p, acc, acc + per - 1, b0, e0); });
  });
  // windows of about 2 MB of rows, whole tiles
  const int64_t row_bytes = D * static_cast<int64_t>(r.x.element_size());
  const int64_t W = std::max<int64_t>(kTile, (int64_t{2} << 20) / row_bytes / kTile * kTile);
  at::Tensor next = regroup ? group_by_label(labels, K, W) : at::empty({0}, r.x.options().dtype(at::kLong));
  at::Tensor S2 = tot.narrow(0, K * (1 + D), K * ps);
  S2 = r.cov == kDiag ? S2.view({K, D}) : r.cov == kSpherical ? S2.view({K}) : S2.view({K, D, D});
  return {tot[per - 1].clone(), tot.narrow(0, 0, K).clone(), tot.narrow(0, K, K * D).view({K, D}).clone(),
          S2.clone(), next};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> log_prob_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
    const at::Tensor& logits, const at::Tensor& logp, c10::string_view covariance_type) {
  Prepared r = prepare(x, means, prec, logits, covariance_type, true);
  auto gr = one_point(r) ? backward_one(r, grad, logp) : backward_impl(r, grad, logp, Fused{});
  return {fit_grad(std::get<0>(gr), x), fit_grad(std::get<1>(gr), means), fit_grad(std::get<2>(gr), prec),
          fit_grad(std::get<3>(gr), logits)};
}

// log_prob_scale's pair on CPU (schemas.h): one point per mixture runs the one-point kernels on σ
// itself (Problem::sigma: 1/σ per row inside, the σ gradient written directly); other layouts
// take the composite implementation (U = 1/σ through log_prob's pair; autograd.cpp).
at::Tensor log_prob_scale_cpu(const at::Tensor& x, const at::Tensor& means, const at::Tensor& scale,
                              const at::Tensor& logits, c10::string_view covariance_type) {
  check_scale_cov(covariance_type);
  Prepared r = prepare(x, means, scale, logits, covariance_type, true, false);
  if (!one_point(r)) return log_prob_scale_composite(x, means, scale, logits, covariance_type);
  return api_rows(forward_one(r, true), r.v);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> log_prob_scale_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& means, const at::Tensor& scale,
    const at::Tensor& logits, const at::Tensor& logp, c10::string_view covariance_type) {
  check_scale_cov(covariance_type);
  Prepared r = prepare(x, means, scale, logits, covariance_type, true, false);
  if (!one_point(r)) return log_prob_scale_backward_composite(grad, x, means, scale, logits, logp, covariance_type);
  auto gr = backward_one(r, grad, logp, true);
  return {fit_grad(std::get<0>(gr), x), fit_grad(std::get<1>(gr), means), fit_grad(std::get<2>(gr), scale),
          fit_grad(std::get<3>(gr), logits)};
}

namespace {

// The canonical target [G, N] for prepared inputs r (the Python API gives it the result's
// shape); its range is checked by the caller (check_target_range) unless a kernel entry it
// also calls does so already.
at::Tensor canonical_target(const Prepared& r, const at::Tensor& target, const at::Tensor& x,
                            const at::Tensor& means, const at::Tensor& prec) {
  const Views vt = canonical_views(x, means, prec, target, r.cov, true);
  FGD_CHECK(vt.batched == r.v.batched && vt.G == r.G,
            "target must have the mixture axis G exactly when the other inputs do; got target ",
            target.sizes(), " for G = ", r.G);
  check_target(vt.last, r.G, r.N, x);
  return vt.last.contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> ngmg_cpu(const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
                                            const at::Tensor& logits, const c10::optional<at::Tensor>& target,
                                            c10::string_view covariance_type, bool normalize) {
  Prepared r = prepare(x, means, prec, logits, covariance_type);
  if (has(target) && r.K > kTargetTileMaxK) {
    // Many components: the target's own (log_prob_target: −½q_t when normalised), then the loss.
    at::Tensor lp = canonical_rows(log_prob_target_cpu(x, means, prec, *target, covariance_type, normalize), r.v);
    FlushDenormals ftz;
    at::Tensor loss = lp.exp().neg_();
    return {api_rows(loss, r.v), api_rows(lp, r.v)};
  }
  Fused f;
  f.ngmg = true;
  f.normalize = normalize;
  if (has(target)) {
    f.target = canonical_target(r, *target, x, means, prec);
    check_target_range(f.target, r.K);
  }
  auto res = forward_impl(r, f);
  return {api_rows(std::get<1>(res), r.v), api_rows(std::get<0>(res), r.v)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ngmg_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
    const at::Tensor& logits, const c10::optional<at::Tensor>& target, const at::Tensor& loss,
    const at::Tensor& logp, c10::string_view covariance_type, bool normalize) {
  Prepared r = prepare(x, means, prec, logits, covariance_type);
  FGD_CHECK(loss.sizes() == logp.sizes(), "loss and logp must have one shape, got ", loss.sizes(), " and ",
            logp.sizes());
  std::vector<at::Tensor> gr;
  if (has(target) && r.K > kTargetTileMaxK) {
    auto bwd = [&](const at::Tensor& scale) {
      auto g = log_prob_target_backward_cpu(grad * scale, x, means, prec, *target, logp, covariance_type);
      return std::vector<at::Tensor>{std::get<0>(g), std::get<1>(g), std::get<2>(g)};
    };
    gr = normalize ? bwd(loss) : overflow_split(loss, logp, true, bwd);
    return {gr[0], gr[1], gr[2], at::zeros_like(logits)};
  }
  Fused f;
  f.normalize = normalize;
  if (has(target)) {
    f.target = canonical_target(r, *target, x, means, prec);
    check_target_range(f.target, r.K);
  }
  ngmg_constants(r, f);  // the forward's constants: the saved logp is relative to them
  auto bwd = [&](const at::Tensor& scale) {
    f.scale = scale;
    auto g = backward_impl(r, grad, logp, f);
    return std::vector<at::Tensor>{fit_grad(std::get<0>(g), x), fit_grad(std::get<1>(g), means),
                                   fit_grad(std::get<2>(g), prec), fit_grad(std::get<3>(g), logits)};
  };
  gr = normalize ? bwd(loss) : overflow_split(loss, logp, true, bwd);  // −p can overflow
  return {gr[0], gr[1], gr[2], gr[3]};
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
  m.impl("log_prob_scale", &fastgmmdiff::cpu::log_prob_scale_cpu);
  m.impl("log_prob_scale_backward", &fastgmmdiff::cpu::log_prob_scale_backward_cpu);
  m.impl("ngmg", &fastgmmdiff::cpu::ngmg_cpu);
  m.impl("ngmg_backward", &fastgmmdiff::cpu::ngmg_backward_cpu);
  m.impl("em_stats", &fastgmmdiff::cpu::em_stats_cpu);
}
