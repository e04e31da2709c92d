// Plain-C++ description of one log-density problem, shared by the torch-facing wrapper
// (log_prob_cpu.cpp) and the ISA-specific kernel translation units (kernels_*.cpp).
// No torch headers here: the kernel TUs are compiled under `#pragma GCC target(...)` and must
// not instantiate torch's inline functions with wider instruction sets.
#pragma once

#include <cstdint>

#include "../gmm_math.h"
#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

namespace fastgmmdiff {
namespace cpu {

enum Cov : int { DIAG = 0, SPHERICAL = 1, FULL = 2 };

// Points per tile: the lane count of the kernels' vectors (4 AVX-512 registers of floats; the
// compiler splits them, which gives each accumulation 4+ independent dependency chains).
constexpr int kTile = 64;

// Canonical layout (see fastgmmdiff/_checks.py), all contiguous:
//   x [Gx, N, D] (Gx == 1: shared by all G mixtures), means [G, K, D],
//   prec diag [G, K, D] | spherical [G, K] | full [G, K, D, D] (upper triangle read),
//   a [G, K] = log π_k + Σ_d log U_k[d,d] − D/2 log 2π.
//
// Fused NGMG (SPEC §2; all optional, null when unused):
//   target [G, N]: one component per point: forward gives a_t − ½q_t, backward takes r = 1 for
//     the target and 0 elsewhere (the callers set a_k to the component's log-normaliser, or to
//     0 for the normalised p̃);
//   loss (fwd output, [G, N]) = −exp(out), the per-point NGMG loss (for the normalised NGMG
//     the callers put the normaliser into a: a_k − c, and out is log p̃);
//   scale (bwd input, [G, N]): the upstream gradient of out is grad·scale (scale = the loss:
//     ∂(−exp(out))/∂out = −p̃).
template <typename T>
struct Problem {
  int64_t G, Gx, N, K, D;
  int cov;
  const T* x;
  const T* means;
  const T* prec;
  const T* a;
  const int64_t* target = nullptr;
  T* loss = nullptr;
  const T* scale = nullptr;
  // The one-point kernels only (log_prob_scale): prec holds σ = 1/U (diag, spherical); they use
  // 1/σ and return the σ gradient, −∂U·U².
  bool sigma = false;
  // The E-step (em) only: order, when set, names the rows of x in the order the tiles take them
  // (a permutation of 0..N−1: points grouped by their likely component, so that a tile's
  // points reach the same few components); labels, when set, gets each row's most likely
  // component (indexed by row of x).
  const int64_t* order = nullptr;
  int32_t* labels = nullptr;
};

// Backward accumulators for one range of work: Σ_n of w Λ z (gmu), of w z² / w‖z‖² / w z yᵀ
// (gS, shaped like prec), and of w (W, [G, K]).  w_nk = g_n r_nk.
template <typename T>
struct Accum {
  T* gmu;
  T* gS;
  T* W;
};

// Denormals: products like w·z with w = g·r ≈ 1e-38 are denormal, and on many x86 cores every
// denormal operand or result costs a microcode assist (10–100× slower).  The kernels run with
// flush-to-zero and denormals-are-zero set, restoring the caller's MXCSR on exit; values that
// small are below float32's resolution of every sum they enter.
struct FlushDenormals {
#if defined(__x86_64__)
  unsigned int saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// Row tiles (kernels.inc): for many mixtures of few points each (the `mdn` workload), a tile
// is P consecutive rows g·N + n of a batched x instead of P points of one mixture (int32
// gather offsets: G·K·D < 2^31).  Work item
// i is then the rows [i·P, i·P + P).  diag and spherical.
inline bool use_row_tiles(int cov, int64_t G, int64_t Gx, int64_t N, int64_t K, int64_t D) {
  return cov != FULL && G > 1 && Gx == G && 2 * N <= kTile && G * K * D < (int64_t{1} << 31);  // int32 gathers
}

// One point per mixture, plain log_prob (no target, no NGMG): the fused per-row kernels.
inline bool use_one_point(int cov, int64_t G, int64_t Gx, int64_t N, int64_t K, int64_t D) {
  return use_row_tiles(cov, G, Gx, N, K, D) && N == 1;
}

// Work items: batched x (Gx == G): item i = (g = i / tiles, tile = i % tiles);
// shared x (Gx == 1 < G): item i = tile i, every g inside (so gx rows have one owner).
// consts: a [G, K] = log π_k + Σ_d log U_k[d,d] − D/2 log 2π (without log π when logits is
//   null) and lse [G] = logsumexp_k logits (written when logits is not null), vectorised.
// exp_rows: out [G, K] = exp(x − c[g]).
// fwd: log p for items [begin, end) into out [G, N].
// bwd: gx rows of those items (written, not accumulated), and `acc` += their parameter sums.
// fwd_one / bwd_one: one point per mixture (use_one_point), rows [b, e): log p, and the final
//   gradients of those rows' mixtures (written); a [G, K] is not used (computed per row).
// em: the E-step's sums over tiles [b, e) of one mixture (G = 1), added to acc (double,
//   [N_k | S1 | S2]) and lsum (Σ log p); kernels.inc em_impl (float: full's S2 is the whitened
//   Σ r y yᵀ) and em64_impl (double: full's S2 is Σ r z zᵀ), upper triangles.
#define FASTGMMDIFF_DECLARE_KERNELS(NS)                                                        \
  namespace NS {                                                                               \
  void fwd(const Problem<float>& p, float* out, int64_t begin, int64_t end);                   \
  void fwd(const Problem<double>& p, double* out, int64_t begin, int64_t end);                 \
  void bwd(const Problem<float>& p, const float* grad, const float* logp, float* gx,           \
           const Accum<float>& acc, int64_t begin, int64_t end);                               \
  void bwd(const Problem<double>& p, const double* grad, const double* logp, double* gx,       \
           const Accum<double>& acc, int64_t begin, int64_t end);                              \
  void consts(const float* logits, const float* prec, int cov, int64_t G, int64_t K, int64_t D, float* a,  \
              float* lse);                                                                     \
  void consts(const double* logits, const double* prec, int cov, int64_t G, int64_t K, int64_t D,        \
              double* a, double* lse);                                                         \
  void exp_rows(const float* x, const float* c, int64_t G, int64_t K, float* out);             \
  void exp_rows(const double* x, const double* c, int64_t G, int64_t K, double* out);          \
  void fwd_one(const Problem<float>& p, const float* logits, float* out, int64_t b, int64_t e);  \
  void fwd_one(const Problem<double>& p, const double* logits, double* out, int64_t b, int64_t e); \
  void bwd_one(const Problem<float>& p, const float* logits, const float* grad, const float* logp, \
               float* gx, float* gmu, float* gprec, float* glog, int64_t b, int64_t e);        \
  void bwd_one(const Problem<double>& p, const double* logits, const double* grad,             \
               const double* logp, double* gx, double* gmu, double* gprec, double* glog,       \
               int64_t b, int64_t e);                                                          \
  void em(const Problem<float>& p, double* acc, double* lsum, int64_t b, int64_t e);           \
  void em(const Problem<double>& p, double* acc, double* lsum, int64_t b, int64_t e);          \
  }

FASTGMMDIFF_DECLARE_KERNELS(avx512)
FASTGMMDIFF_DECLARE_KERNELS(avx2)
FASTGMMDIFF_DECLARE_KERNELS(baseline)

}  // namespace cpu
}  // namespace fastgmmdiff
