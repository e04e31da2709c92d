// The compiled code's shared math (SPEC §1), each formula written once for C++ and CUDA (the
// Python side's single home is fastgmmdiff/_math.py).  No torch headers: the ISA-specific CPU
// kernel translation units (csrc/cpu/problem.h) and CUDA device code include it.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTGMMDIFF_HD __host__ __device__ __forceinline__
#else
#define FASTGMMDIFF_HD inline
#endif

namespace fastgmmdiff {

// log 2π.  A component's log-normaliser is Σ_d log U_k[d,d] − D/2·log 2π, and
// a_k = log π_k + that (ℓ_nk = a_k − ½‖U_kᵀ(x_n − μ_k)‖²).
constexpr double kLog2Pi = 1.8378770664093454835606594728112;

// D/2·log 2π in T (the kernels' per-row form of the constant above).
template <typename T>
FASTGMMDIFF_HD T half_d_log_2pi(int64_t D) {
  return T(0.5 * kLog2Pi) * T(D);
}

// The precision-Cholesky gradient step (SPEC §1), from W = Σ_n w_nk and Sz = s Σ_n w z², each
// term formed as w·(s z)·z (weighted_uz): every term has the size of what it contributes to
// the gradient, so a far point whose gradient is representable never overflows it (z² can
// overflow where (s z)·z does not) and a tiny NGMG weight does not flush a sum whose gradient
// term is a normal number (Σ w (s z)² ≈ 1e-38 with s = 0.09: the term, Σ/s, is 1e-37):
//   diag (per d):  W/s − s Σ w z²_d  = W/s − Sz,      Sz = Σ_n w (s z_d) z_d    (n = 1)
//   spherical:     D·W/s − s Σ w ‖z‖² = D·(W/s) − Sz,  Sz = Σ_n w Σ_d (s z_d) z_d (n = D)
// W/s before the factor D: NGMG without normalisation weights points by p, and D·W overflows
// where the gradient does not (D = 17, s = 400: W = −3.3e37, ∂s = −1.4e36).
template <typename T>
FASTGMMDIFF_HD T prec_grad_scale(T n, T W, T s, T Sz) {
  return n * (W / s) - Sz;
}

// w·u·z for the sum Sz above (u = s z), in the order that keeps a representable result from
// an overflowed or flushed partial product: large w (|w| ≥ 1) last, small w first.
template <typename W>
FASTGMMDIFF_HD W weighted_uz(W w, W u, W z, bool big_w) {
  return big_w ? w * (u * z) : (w * u) * z;
}

// w Λ z for diag/spherical: w·s·y with y = s·z the scaled distance, multiplied in the order
// that keeps a representable result from an overflowed or underflowed (flushed) partial
// product.  The NGMG weights w by p̃ or p: 1e-37 with the term still a normal number (w y
// below the smallest normal, then × s = 1e4), or 3e37 at y = 0 (w s = inf, then × 0 = NaN).
// Small w (|w| < 1) takes s first when s ≥ 1 (|w s| ≤ s), else y first (|w y| ≥ the result);
// large w the other way round.  big_w: |w| ≥ 1 (for lanes of a tile: Σ |w| ≥ 1, one order for
// all of them).  W is a scalar or a vector of lanes; s one scalar for all of them.
template <typename W, typename T>
FASTGMMDIFF_HD W weighted_lz(W w, T s, W y, bool big_w) {
  return (s >= T(1)) != big_w ? (w * s) * y : (w * y) * s;
}

// Full covariance: q = ‖Uᵀz‖² is NaN where Uᵀz met an infinite coordinate (inf · 0) or
// overflowed (inf − inf).  That point is infinitely far (+inf: ℓ = −inf, a dead row where every
// component is so), unless a coordinate of x (its D values, ``stride`` apart) is NaN.
template <typename T>
FASTGMMDIFF_HD T far_q(T q, const T* x, int64_t D, int64_t stride = 1) {
  if (q == q) return q;
  for (int64_t d = 0; d < D; ++d)
    if (x[d * stride] != x[d * stride]) return q;
  return T(INFINITY);
}

//   full, entry (d, e):  triu(diag(W / U_dd) − S)[d, e],  S = Σ_n w z yᵀ, y = Uᵀz.
template <typename T>
FASTGMMDIFF_HD T prec_grad_full(int64_t d, int64_t e, T W, T Udd, T S) {
  return e < d ? T(0) : (d == e ? W / Udd : T(0)) - S;
}

}  // namespace fastgmmdiff
