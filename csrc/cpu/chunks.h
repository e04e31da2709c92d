// Deterministic work split for the CPU backward passes: a fixed number of chunks (not
// threads), each with its own parameter-gradient buffers summed in chunk order afterwards, so
// results are bit-identical from run to run, whatever the thread count.  When every chunk can
// own whole mixtures (batched x and G >= chunks), chunks write the outputs in place.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "../ops.h"

namespace fastgmmdiff {
namespace cpu {

// Chunks a backward is split into at most (each a parallel task; the threads take them in turn).
constexpr int64_t kMaxChunks = 32;

struct ChunkPlan {
  int64_t chunks = 1;
  bool own_mixtures = false;
  int64_t nbuf = 1;
  int64_t items = 0, G = 1;

  int64_t align = 0;  // > 0: chunks start at multiples of `align` items and share one buffer

  // items: work items; per_g: items per mixture when items are g-major (batched x);
  // buf_bytes: bytes of one set of parameter-gradient buffers.
  // work: total element-operations; a chunk gets at least ~2^18 of them.
  // align_ > 0 (row tiles): items are consecutive rows, and a chunk boundary at a multiple of
  // align_ items is a mixture boundary, so chunks own their mixtures' sums in one buffer (no
  // per-chunk copies to zero and fold) and each mixture is summed in row order whatever the
  // chunk count.
  ChunkPlan(int64_t items_, int64_t G_, bool shared, int64_t buf_bytes, int64_t work, int64_t align_ = 0)
      : items(items_), G(G_) {
    // A fixed number of chunks, not the thread count: the per-chunk sums and their order, and
    // so every bit of the result, are the same whatever the number of threads.
    chunks = std::min<int64_t>(kMaxChunks, std::max<int64_t>(items, 1));
    chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, work >> 18));
    if (align_ > 0) {
      align = align_;
      chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, items / align));
      nbuf = 1;
      return;
    }
    if (shared || G < chunks) {  // a buffer per chunk: at most 64 MiB of them, and zeroing and
      // folding them stays within ~1/16 of the kernels' work
      chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, (int64_t{64} << 20) / std::max<int64_t>(1, buf_bytes)));
      chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, work / (16 * std::max<int64_t>(1, buf_bytes / 4))));
    }
    own_mixtures = !shared && G >= chunks;
    nbuf = own_mixtures ? 1 : chunks;
  }
  // Item range and buffer index of chunk c.
  void range(int64_t c, int64_t* b, int64_t* e, int64_t* buf) const {
    if (align > 0) {
      const int64_t units = (items + align - 1) / align;
      *b = std::min(items, (c * units / chunks) * align);
      *e = std::min(items, ((c + 1) * units / chunks) * align);
      *buf = 0;
    } else if (own_mixtures) {
      const int64_t per_g = items / G;
      *b = (c * G / chunks) * per_g;
      *e = ((c + 1) * G / chunks) * per_g;
      *buf = 0;
    } else {
      *b = c * items / chunks;
      *e = (c + 1) * items / chunks;
      *buf = c;
    }
  }
  template <typename F>
  void run(const F& f) const {
    if (chunks == 1) {
      int64_t b, e, buf;
      range(0, &b, &e, &buf);
      f(b, e, buf);
      return;
    }
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t b, e, buf;
        range(c, &b, &e, &buf);
        f(b, e, buf);
      }
    });
  }
};

// a [G, K] = log π_k + Σ_d log U_k[d,d] − D/2 log 2π (no log π_k term when logits is
// undefined), and lse [G] = logsumexp_k logits when asked for; vectorised kernels
// (log_prob_cpu.cpp).  prec and logits canonical and contiguous, in the accumulation dtype.
at::Tensor component_consts_t(const at::Tensor& logits, const at::Tensor& prec, int cov, int64_t G, int64_t K,
                              int64_t D, at::Tensor* lse = nullptr);

// The backward's parameter sums, one set per buffer of a ChunkPlan, in one zeroed allocation
// (one ATen call instead of three): per set, Σ w Λ z [G, K, D], the prec sums shaped like prec
// [G, K, ps] (ps = D, 1 or D·D) and Σ w [G, K].  `fold` adds sets 1.. into set 0 in order.
template <typename T>
struct ParamSums {
  at::Tensor buf;
  int64_t nbuf, GK, D, ps, stride;
  ParamSums(int64_t nbuf_, int64_t G, int64_t K, int64_t D_, int64_t ps_, const at::TensorOptions& opt)
      : nbuf(nbuf_), GK(G * K), D(D_), ps(ps_), stride(G * K * (D_ + ps_ + 1)) {
    buf = at::zeros({nbuf * stride}, opt);
  }
  T* gmu(int64_t b) const { return buf.data_ptr<T>() + b * stride; }
  T* gS(int64_t b) const { return gmu(b) + GK * D; }
  T* W(int64_t b) const { return gS(b) + GK * ps; }
  void fold() const {
    T* s0 = gmu(0);
    for (int64_t b = 1; b < nbuf; ++b) {
      const T* sb = gmu(b);
      for (int64_t i = 0; i < stride; ++i) s0[i] += sb[i];
    }
  }
};

// The gradients of means and prec_chol from folded sums (SPEC §1), written into gmu_out and
// gprec_out (shaped like means and prec):
//   diag W/s − S, S = Σ w (s z) z;  spherical D (W/s) − S, S = Σ w Σ_d (s z_d) z_d;
//   full triu(diag(W / U_dd) − S), S = Σ w z yᵀ  (csrc/gmm_math.h).
template <typename T>
void finish_param_grads(const ParamSums<T>& s, const T* prec, int cov, T* gmu_out, T* gprec_out) {
  const int64_t GK = s.GK, D = s.D;
  const T *gmu = s.gmu(0), *S = s.gS(0), *W = s.W(0);
  std::copy(gmu, gmu + GK * D, gmu_out);
  for (int64_t i = 0; i < GK; ++i) {
    if (cov == kDiag) {
      for (int64_t d = 0; d < D; ++d) {
        const T u = prec[i * D + d];
        gprec_out[i * D + d] = prec_grad_scale(T(1), W[i], u, S[i * D + d]);
      }
    } else if (cov == kSpherical) {
      gprec_out[i] = prec_grad_scale(T(D), W[i], prec[i], S[i]);
    } else {
      const T* U = prec + i * D * D;
      const T* Si = S + i * D * D;
      T* o = gprec_out + i * D * D;
      for (int64_t d = 0; d < D; ++d)
        for (int64_t e = 0; e < D; ++e)
          o[d * D + e] = prec_grad_full(d, e, W[i], U[d * D + d], Si[d * D + e]);
    }
  }
}

}  // namespace cpu
}  // namespace fastgmmdiff
