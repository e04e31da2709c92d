// CUDA kernels of the fastgmmdiff ops, for the latency regime (PERF.md `paper`, `small`, `mdn`):
// forward in one launch, backward in one more, no N·K buffer.  The Triton backend is the
// throughput path.
//
// log_prob forward: one thread per point (1-D grid over (mixture, tile of B points)), loop over components with an
// online logsumexp in registers.
// log_prob backward: one block per (tile of B points, mixture g); the tile's points are staged
// in shared memory.  For each component k: every thread recomputes ℓ_nk for its point,
// w = g_n exp(ℓ_nk − log p_n) (kept in shared memory), and subtracts w Λ_k z from its row of
// ∂x; then threads over d (or (d, e) for full) sum the tile's contributions to ∂μ_k, ∂U_k and
// ∂logits_k in a fixed order.  Those sums enter the final gradients linearly
// (W/s − s S, W − π Σg, ...), so each block adds its finished share: a plain store when one
// block covers the mixture's points (N ≤ B: deterministic), an atomicAdd otherwise.  B is the
// largest power of two ≤ 256 (and ≥ 32) whose shared memory fits the device (plan.h); past
// that the op raises and backend="auto" takes the next backend.
// Targeted ops (NGMG with `target`): one thread per point, the target component gathered;
// parameter gradients by atomicAdd.  A target outside [0, K) is never read through: its point
// gets NaN (log p, and ∂x in the backward), so a range the host could not check (CUDA-graph
// capture, torch.compile, a direct torch.ops call) shows instead of reading out of bounds.
// The atomics paths tell torch.use_deterministic_algorithms (alertNotDeterministic).
//
// Dead rows (log p = −inf) and padding get w = 0 and x = 0, so every product stays finite.
// Compiled by nvcc for the package, and as plain C++ against the CPU emulation of emulation.h
// for the tests (compat.h: FGD_CUDA_EMULATION); the kernels name no CUDA API directly.
#include "compat.h"  // first: real CUDA or its emulation

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../ops.h"
#include "plan.h"

namespace fastgmmdiff {
namespace cuda {
namespace {

template <typename T>
__device__ __forceinline__ T ninf() {
  return static_cast<T>(-INFINITY);
}

// Parameter stride of one component: diag D, spherical 1, full D·D.
template <int COV>
__device__ __forceinline__ int64_t prec_stride(int D) {
  return COV == kDiag ? D : COV == kSpherical ? 1 : static_cast<int64_t>(D) * D;
}

// q = ‖U_kᵀ(x − μ_k)‖² for one point (x read through `xr`, stride 1).
template <typename T, int COV>
__device__ __forceinline__ T quad_point(const T* __restrict__ xr, const T* __restrict__ mu,
                                        const T* __restrict__ pr, int D) {
  // q in four chains over d (or e), added pairwise, as the CPU kernels: one float32 chain of D
  // terms is off by ~√D·eps relative, which far out (q in the hundreds and more) is the
  // responsibilities' error (measured: 1.3e-4 on a ∂x element at D = 17, 6× the CPU kernels').
  T qa[4] = {0, 0, 0, 0};
  if (COV == kDiag) {
    for (int d = 0; d < D; ++d) {
      const T t = (xr[d] - ldg(mu + d)) * ldg(pr + d);
      qa[d & 3] += t * t;
    }
  } else if (COV == kSpherical) {
    const T s = ldg(pr);
    for (int d = 0; d < D; ++d) {
      const T t = (xr[d] - ldg(mu + d)) * s;  // scaled before the square: z² overflows first
      qa[d & 3] += t * t;
    }
  } else {
    for (int e = 0; e < D; ++e) {
      T y = 0;
      for (int d = 0; d <= e; ++d) y += ldg(pr + static_cast<int64_t>(d) * D + e) * (xr[d] - ldg(mu + d));
      qa[e & 3] += y * y;
    }
    return far_q((qa[0] + qa[1]) + (qa[2] + qa[3]), xr, D);  // inf · 0, inf − inf: infinitely far
  }
  return (qa[0] + qa[1]) + (qa[2] + qa[3]);
}

template <typename T>
__device__ __forceinline__ void add_out(T* p, T v, bool atomic) {
  if (atomic)
    atomicAdd(p, v);
  else
    *p += v;
}

// The running (max m, Σ exp(ℓ − m)) of one point's ℓ_k = a_k − ½q_k over mixture g's K
// components (m = −inf, s = 0 when every ℓ is −inf); true when some ℓ is NaN.
template <typename T, int COV>
__device__ __forceinline__ bool point_lse(const T* __restrict__ xr, const T* __restrict__ means,
                                          const T* __restrict__ prec, const T* __restrict__ a, int64_t g,
                                          int K, int D, T& m, T& s) {
  const int64_t ps = prec_stride<COV>(D);
  bool nan = false;
  m = ninf<T>();
  s = 0;
  for (int k = 0; k < K; ++k) {
    const int64_t gk = g * K + k;
    const T l = ldg(a + gk) - T(0.5) * quad_point<T, COV>(xr, means + gk * D, prec + gk * ps, D);
    if (l != l) {
      nan = true;
    } else if (l > m) {
      s = s * dev_exp(m - l) + T(1);
      m = l;
    } else if (l > ninf<T>()) {
      s += dev_exp(l - m);
    }
  }
  return nan;
}

template <typename T, int COV>
__global__ void fwd_kernel(const T* __restrict__ x, const T* __restrict__ means,
                           const T* __restrict__ prec, const T* __restrict__ a, T* __restrict__ out,
                           int64_t Gx, int64_t N, int K, int D, int64_t tiles) {
  // 1-D grid over (mixture, tile of points): no 65535 limit on either.
  const int64_t g = blockIdx.x / tiles;
  const int64_t n = (blockIdx.x % tiles) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const T* xr = x + ((Gx == 1 ? 0 : g) * N + n) * D;
  T m, s;
  const bool nan = point_lse<T, COV>(xr, means, prec, a, g, K, D, m, s);
  out[g * N + n] = nan ? static_cast<T>(NAN) : (m == ninf<T>() ? m : m + dev_log(s));
}

// Shared memory of the backward block (plan.h backward_smem): xs [B][D], wy [B][D] (full),
// w [B], g-sum scratch [1].
template <typename T, int COV>
__global__ void bwd_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                           const T* __restrict__ means, const T* __restrict__ prec,
                           const T* __restrict__ a, const T* __restrict__ pi,
                           const T* __restrict__ logp, T* __restrict__ gx, T* __restrict__ gmu,
                           T* __restrict__ gprec, T* __restrict__ glog, int64_t G, int64_t Gx,
                           int64_t N, int K, int D, int64_t tiles) {
  FGD_DYNAMIC_SMEM(smem_raw);
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int B = blockDim.x;
  T* xs = smem;                                   // [B][D]
  T* wy = xs + static_cast<int64_t>(B) * D;       // [B][D] (full only)
  T* ws = wy + (COV == kFull ? static_cast<int64_t>(B) * D : 0);  // [B]
  T* gsum = ws + B;                               // [1]
  const int64_t g = blockIdx.x / tiles;
  const int tid = threadIdx.x;
  const int64_t n = (blockIdx.x % tiles) * B + tid;
  const bool atomic = tiles > 1;  // several blocks share this mixture's parameter gradients
  const bool shared_x = Gx == 1 && G > 1;
  const int64_t ps = prec_stride<COV>(D);

  const bool live = n < N && dev_isfinite(logp[g * N + n]);
  const T gn = live ? grad[g * N + n] : T(0);
  const T lpn = live ? logp[g * N + n] : T(0);
  const T* xg = x + ((Gx == 1 ? 0 : g) * N) * D;
  for (int d = 0; d < D; ++d) xs[tid * D + d] = live ? xg[n * D + d] : T(0);
  // r = exp(ℓ − log p) takes log p rounded to T; in float32 far out (|log p| ≥ 32: ~1e-6 and
  // more, shared by every r of the point) r is instead the softmax of the recomputed ℓ:
  // δ = (max ℓ − log p) + log Σ exp(ℓ − max ℓ), r = exp((ℓ − log p) − δ) (as the CPU kernels).
  T dl = 0;
  if (sizeof(T) == 4 && live && gn != T(0) && (lpn >= T(32) || lpn <= T(-32))) {
    T m, s;  // this thread's own row of xs: no barrier needed
    point_lse<T, COV>(xs + tid * D, means, prec, a, g, K, D, m, s);
    dl = (m - lpn) + dev_log(s);  // live: no NaN ℓ, m finite, s ≥ 1
  }
  ws[tid] = gn;
  __syncthreads();
  if (tid == 0) {  // Σ_n g_n of the tile, in point order
    T s = 0;
    for (int i = 0; i < B; ++i) s += ws[i];
    gsum[0] = s;
  }
  __syncthreads();
  T* gxr = gx + ((shared_x ? 0 : g) * N + n) * D;

  for (int k = 0; k < K; ++k) {
    const int64_t gk = g * K + k;
    const T* mu = means + gk * D;
    const T* pr = prec + gk * ps;
    const T* xr = xs + tid * D;
    const T q = quad_point<T, COV>(xr, mu, pr, D);
    // Only live rows: for padding and dead rows the exponent (a_k − ½q with x = 0) can overflow,
    // and 0 · inf would be NaN.  For a live row ℓ ≤ log p, so the exp is at most ~1.
    const T w = live ? gn * dev_exp(ldg(a + gk) - T(0.5) * q - lpn - dl) : T(0);
    ws[tid] = w;
    if (live && w != T(0)) {  // padding threads (n ≥ N) have no row of ∂x
      if (COV == kFull) {
        for (int e = 0; e < D; ++e) {
          T y = 0;
          for (int d = 0; d <= e; ++d) y += ldg(pr + static_cast<int64_t>(d) * D + e) * (xr[d] - ldg(mu + d));
          wy[tid * D + e] = w * y;
        }
        for (int d = 0; d < D; ++d) {
          T uy = 0;
          for (int e = d; e < D; ++e) uy += ldg(pr + static_cast<int64_t>(d) * D + e) * wy[tid * D + e];
          if (shared_x) atomicAdd(gxr + d, -uy); else gxr[d] -= uy;
        }
      } else {
        for (int d = 0; d < D; ++d) {
          const T s = COV == kDiag ? ldg(pr + d) : ldg(pr);
          const T v = -(w * (xr[d] - ldg(mu + d))) * s * s;  // w s² first can overflow and meet z = 0
          if (shared_x) atomicAdd(gxr + d, v); else gxr[d] += v;
        }
      }
    } else if (COV == kFull) {
      for (int e = 0; e < D; ++e) wy[tid * D + e] = 0;
    }
    __syncthreads();
    // Tile sums, each by one thread in point order.
    T W = 0;
    for (int i = 0; i < B; ++i) W += ws[i];
    if (COV == kFull) {
      for (int64_t pair = tid; pair < static_cast<int64_t>(D) * D; pair += B) {
        const int d = static_cast<int>(pair / D), e = static_cast<int>(pair % D);
        if (e < d) continue;
        T S = 0;
        for (int i = 0; i < B; ++i) S += (xs[i * D + d] - ldg(mu + d)) * wy[i * D + e];
        const T Udd = ldg(pr + static_cast<int64_t>(d) * D + d);
        add_out(gprec + gk * ps + pair, prec_grad_full<T>(d, e, W, Udd, S), atomic);
      }
      for (int d = tid; d < D; d += B) {
        T m = 0;
        for (int e = d; e < D; ++e) {
          T col = 0;
          for (int i = 0; i < B; ++i) col += wy[i * D + e];
          m += ldg(pr + static_cast<int64_t>(d) * D + e) * col;
        }
        add_out(gmu + gk * D + d, m, atomic);
      }
    } else if (COV == kSpherical) {
      // ∂s_k = D W/s − Σ_n w Σ_d (s z_d) z_d; ∂μ_k = s² Σ_n w z.
      const T s = ldg(pr);
      for (int d = tid; d < D; d += B) {
        const T md = ldg(mu + d);
        T sz = 0;
        for (int i = 0; i < B; ++i) sz += ws[i] * (xs[i * D + d] - md);
        add_out(gmu + gk * D + d, s * s * sz, atomic);
      }
      if (tid == 0) {
        T szz = 0;
        for (int i = 0; i < B; ++i) {
          T zz = 0;
          for (int d = 0; d < D; ++d) {
            const T z = xs[i * D + d] - ldg(mu + d);
            zz += (z * s) * z;
          }
          szz += ws[i] * zz;
        }
        add_out(gprec + gk, prec_grad_scale(T(D), W, s, szz), atomic);
      }
    } else {
      for (int d = tid; d < D; d += B) {
        const T md = ldg(mu + d), s = ldg(pr + d);
        T sz = 0, szz = 0;
        for (int i = 0; i < B; ++i) {
          const T z = xs[i * D + d] - md, y = z * s;
          sz += ws[i] * z;
          szz += weighted_uz(ws[i], y, z, (ws[i] < T(0) ? -ws[i] : ws[i]) >= T(1));
        }
        add_out(gmu + gk * D + d, s * s * sz, atomic);
        add_out(gprec + gk * D + d, prec_grad_scale(T(1), W, s, szz), atomic);
      }
    }
    if (tid == 0) add_out(glog + gk, W - ldg(pi + gk) * gsum[0], atomic);
    __syncthreads();
  }
}

// log N(x_n; μ_t, Σ_t) = c_t − ½q (c = nullptr: 0, i.e. NGMG's normalised value).
template <typename T, int COV>
__global__ void target_fwd_kernel(const T* __restrict__ x, const T* __restrict__ means,
                                  const T* __restrict__ prec, const T* __restrict__ c,
                                  const int64_t* __restrict__ target, T* __restrict__ out,
                                  int64_t G, int64_t Gx, int64_t N, int K, int D) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= G * N) return;
  const int64_t t = target[i];
  if (t < 0 || t >= K) {  // out of range: never read through it (module comment)
    out[i] = static_cast<T>(NAN);
    return;
  }
  const int64_t g = i / N, n = i % N;
  const int64_t gk = g * K + t;
  const int64_t ps = prec_stride<COV>(D);
  const T* xr = x + ((Gx == 1 ? 0 : g) * N + n) * D;
  out[i] = (c != nullptr ? ldg(c + gk) : T(0)) - T(0.5) * quad_point<T, COV>(xr, means + gk * D, prec + gk * ps, D);
}

template <typename T, int COV>
__global__ void target_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                  const T* __restrict__ means, const T* __restrict__ prec,
                                  const int64_t* __restrict__ target, const T* __restrict__ logp,
                                  T* __restrict__ gx, T* __restrict__ gmu, T* __restrict__ gprec,
                                  int64_t G, int64_t Gx, int64_t N, int K, int D) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= G * N) return;
  const int64_t g = i / N, n = i % N;
  const bool shared_x = Gx == 1 && G > 1;
  T* gxr = gx + ((shared_x ? 0 : g) * N + n) * D;
  const int64_t t = target[i];
  if (t < 0 || t >= K) {
    for (int d = 0; d < D; ++d) {
      if (shared_x) atomicAdd(gxr + d, static_cast<T>(NAN)); else gxr[d] = static_cast<T>(NAN);
    }
    return;
  }
  if (!dev_isfinite(logp[i])) return;
  const T w = grad[i];
  if (w == T(0)) return;
  const int64_t gk = g * K + t;
  const int64_t ps = prec_stride<COV>(D);
  const T* xr = x + ((Gx == 1 ? 0 : g) * N + n) * D;
  const T* mu = means + gk * D;
  const T* pr = prec + gk * ps;
  if (COV == kFull) {
    for (int d = 0; d < D; ++d) {
      // (U Uᵀ z)_d and the row d of −w z yᵀ (e ≥ d), recomputing y_e = Σ_{d' ≤ e} U[d',e] z_d'.
      T uy = 0;
      const T zd = xr[d] - ldg(mu + d);
      for (int e = d; e < D; ++e) {
        T y = 0;
        for (int dd = 0; dd <= e; ++dd) y += ldg(pr + static_cast<int64_t>(dd) * D + e) * (xr[dd] - ldg(mu + dd));
        const int64_t de = static_cast<int64_t>(d) * D + e;
        uy += ldg(pr + de) * y;
        atomicAdd(gprec + gk * ps + de, prec_grad_full<T>(d, e, w, ldg(pr + de), w * zd * y));
      }
      if (shared_x) atomicAdd(gxr + d, -w * uy); else gxr[d] = -w * uy;
      atomicAdd(gmu + gk * D + d, w * uy);
    }
  } else {
    T zz = 0;
    for (int d = 0; d < D; ++d) {
      const T s = COV == kDiag ? ldg(pr + d) : ldg(pr);
      const T z = xr[d] - ldg(mu + d), y = z * s;
      const T lz = (w * z) * s * s;
      if (shared_x) atomicAdd(gxr + d, -lz); else gxr[d] = -lz;
      atomicAdd(gmu + gk * D + d, lz);
      if (COV == kDiag) atomicAdd(gprec + gk * D + d, prec_grad_scale(T(1), w, s, weighted_uz(w, y, z, (w < T(0) ? -w : w) >= T(1))));
      else zz += y * z;
    }
    if (COV == kSpherical) {
      const T s = ldg(pr);
      atomicAdd(gprec + gk, prec_grad_scale(T(D), w, s, w * zz));
    }
  }
}

using Prep = Canonical;

Prep prep(const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec, int cov) {
  FGD_CHECK(on_device(x), "the CUDA kernels got tensors on ", x.device());
  Prep r = canonical(x, means, prec, cov);
  FGD_CHECK(r.D <= kMaxD && r.K <= kMaxGridX, "the CUDA kernels take D <= ", kMaxD,
            " and K < 2^31 (got K=", r.K, ", D=", r.D, "); use backend='triton' or 'torch'");
  return r;
}

// Blocks of a 1-D grid; the grid's limit checked by name, not left to the launch.
unsigned grid_blocks(int64_t blocks, const char* what) {
  FGD_CHECK(blocks <= kMaxGridX, "the CUDA ", what, " needs ", blocks, " blocks, more than a grid takes (2^31 - 1);"
            " use backend='triton' or 'torch', or split the batch");
  return static_cast<unsigned>(blocks);
}

#define FGD_DISPATCH_COV(cov, ...)                              \
  [&] {                                                         \
    if (cov == kDiag) {                                         \
      constexpr int COV = kDiag;                                \
      __VA_ARGS__();                                            \
    } else if (cov == kSpherical) {                             \
      constexpr int COV = kSpherical;                           \
      __VA_ARGS__();                                            \
    } else {                                                    \
      constexpr int COV = kFull;                                \
      __VA_ARGS__();                                            \
    }                                                           \
  }()

int device_index(const at::Tensor& t) { return t.is_cpu() ? 0 : t.device().index(); }

}  // namespace

size_t device_smem_optin(int device) { return smem_optin(device); }

namespace {

// The constants a_k, or with `normalize` a_k − c (the fused NGMG: log p̃ from the logsumexp
// itself, ops.h ngmg_const).
at::Tensor constants(const Prep& r, const at::Tensor& logits, int cov, bool normalize) {
  return normalize ? ngmg_const(r.prec, logits, cov, r.D) : component_const(r.prec, logits, cov, r.D);
}

// log p [G, N] (API rows), or log p̃ with `normalize`.
at::Tensor forward(const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec, const at::Tensor& logits,
                   c10::string_view covariance_type, bool normalize) {
  const int cov = parse_cov(covariance_type);
  const Views v = canonical_views(x, means, prec, logits, cov, false);
  check_layout(v.x, v.means, v.prec, v.last, cov);
  const DeviceGuard guard(x.device());
  Prep r = prep(v.x, v.means, v.prec, cov);
  at::Tensor a = constants(r, v.last.to(r.x.scalar_type()), cov, normalize);
  at::Tensor out = at::empty({r.G, r.N}, r.x.options());
  if (r.N == 0 || r.G == 0) return api_rows(out, v);
  const int B = block_for(r.N);
  const int64_t tiles = (r.N + B - 1) / B;
  const dim3 grid(grid_blocks(tiles * r.G, "forward"));
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(r.x.scalar_type(), "fastgmmdiff_log_prob_cuda", [&] {
    FGD_DISPATCH_COV(cov, [&] {
      FGD_LAUNCH(grid, B, 0, stream, fwd_kernel<scalar_t, COV>)(
          r.x.data_ptr<scalar_t>(), r.means.data_ptr<scalar_t>(), r.prec.data_ptr<scalar_t>(),
          a.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), r.Gx, r.N, static_cast<int>(r.K),
          static_cast<int>(r.D), tiles);
      FGD_KERNEL_LAUNCH_CHECK();
    });
  });
  return api_rows(out, v);
}

// Gradients of Σ grad·(log p or log p̃): `normalize` as the forward's, for its saved logp.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
    const at::Tensor& logits, const at::Tensor& logp, c10::string_view covariance_type, bool normalize) {
  const int cov = parse_cov(covariance_type);
  const Views v = canonical_views(x, means, prec, logits, cov, false);
  check_layout(v.x, v.means, v.prec, v.last, cov);
  const DeviceGuard guard(x.device());
  Prep r = prep(v.x, v.means, v.prec, cov);
  const auto acc = r.x.scalar_type();
  at::Tensor g, lp;
  std::tie(g, lp) = backward_rows(grad, logp, v, r.G, r.N, acc);
  at::Tensor lg = v.last.to(acc).contiguous();
  at::Tensor a = constants(r, lg, cov, normalize);
  at::Tensor pi = at::softmax(lg, -1).contiguous();
  at::Tensor gx = at::zeros_like(r.x), gmu = at::zeros_like(r.means), gprec = at::zeros_like(r.prec);
  at::Tensor glog = at::zeros_like(lg);
  if (r.N > 0 && r.G > 0) {
    const size_t limit = smem_optin(device_index(r.x));
    const BackwardPlan plan = plan_backward(r.N, cov, r.D, r.x.element_size(), limit);
    FGD_CHECK(plan.block > 0, unsupported_reason(cov, r.D, r.K, r.x.element_size(), limit),
              "; use backend='triton' or 'torch' (backend='auto' does)");
    const int B = plan.block;
    const int64_t tiles = (r.N + B - 1) / B;
    if (tiles > 1 || (r.Gx == 1 && r.G > 1))
      at::globalContext().alertNotDeterministic(
          "fastgmmdiff CUDA log_prob backward (atomicAdd across blocks: more points per mixture than one "
          "block takes, or x shared by several mixtures); the 'triton' backend is deterministic");
    const dim3 grid(grid_blocks(tiles * r.G, "backward"));
    const auto stream = current_stream();
    AT_DISPATCH_FLOATING_TYPES(acc, "fastgmmdiff_log_prob_backward_cuda", [&] {
      FGD_DISPATCH_COV(cov, [&] {
        auto kern = bwd_kernel<scalar_t, COV>;
        if (plan.smem > 48 * 1024)
          FGD_CHECK(set_max_dynamic_smem(kern, plan.smem), "the device refused ", plan.smem,
                    " bytes of shared memory per block (covariance_type='", cov_name(cov), "', D=", r.D,
                    "); use backend='triton' or 'torch'");
        FGD_LAUNCH(grid, B, plan.smem, stream, bwd_kernel<scalar_t, COV>)(
            g.data_ptr<scalar_t>(), r.x.data_ptr<scalar_t>(), r.means.data_ptr<scalar_t>(),
            r.prec.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), pi.data_ptr<scalar_t>(),
            lp.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), gmu.data_ptr<scalar_t>(),
            gprec.data_ptr<scalar_t>(), glog.data_ptr<scalar_t>(), r.G, r.Gx, r.N,
            static_cast<int>(r.K), static_cast<int>(r.D), tiles);
        FGD_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  // full: the kernel writes only the upper triangle of ∂U (gprec starts at zero).
  return {fit_grad(gx, x), fit_grad(gmu, means), fit_grad(gprec, prec), fit_grad(glog, logits)};
}

}  // namespace

at::Tensor log_prob_cuda(const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
                         const at::Tensor& logits, c10::string_view covariance_type) {
  return forward(x, means, prec, logits, covariance_type, false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> log_prob_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
    const at::Tensor& logits, const at::Tensor& logp, c10::string_view covariance_type) {
  return backward(grad, x, means, prec, logits, logp, covariance_type, false);
}

namespace {

// log N(x; μ_t, Σ_t) [G, N], or −½q_t when `normalize` (NGMG's p̃ in log).
at::Tensor target_forward(const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
                          const at::Tensor& target, int cov, bool normalize) {
  const Views v = canonical_views(x, means, prec, target, cov, true);
  check_points_and_params(v.x, v.means, v.prec, cov);
  const DeviceGuard guard(x.device());
  Prep r = prep(v.x, v.means, v.prec, cov);
  check_target(v.last, r.G, r.N, x);
  at::Tensor t = v.last.contiguous();
  at::Tensor c = normalize ? at::Tensor() : component_lognorm(r.prec, cov, r.D);
  at::Tensor out = at::empty({r.G, r.N}, r.x.options());
  const int64_t total = r.G * r.N;
  if (total == 0) return api_rows(out, v);
  const dim3 grid(grid_blocks((total + 255) / 256, "target forward"));
  const auto stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(r.x.scalar_type(), "fastgmmdiff_log_prob_target_cuda", [&] {
    FGD_DISPATCH_COV(cov, [&] {
      FGD_LAUNCH(grid, 256, 0, stream, target_fwd_kernel<scalar_t, COV>)(
          r.x.data_ptr<scalar_t>(), r.means.data_ptr<scalar_t>(), r.prec.data_ptr<scalar_t>(),
          c.defined() ? c.data_ptr<scalar_t>() : nullptr, t.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
          r.G, r.Gx, r.N, static_cast<int>(r.K), static_cast<int>(r.D));
      FGD_KERNEL_LAUNCH_CHECK();
    });
  });
  return api_rows(out, v);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> log_prob_target_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
    const at::Tensor& target, const at::Tensor& logp, c10::string_view covariance_type) {
  const int cov = parse_cov(covariance_type);
  const Views v = canonical_views(x, means, prec, target, cov, true);
  check_points_and_params(v.x, v.means, v.prec, cov);
  const DeviceGuard guard(x.device());
  Prep r = prep(v.x, v.means, v.prec, cov);
  check_target(v.last, r.G, r.N, x);
  const auto acc = r.x.scalar_type();
  at::Tensor g, lp;
  std::tie(g, lp) = backward_rows(grad, logp, v, r.G, r.N, acc);
  at::Tensor t = v.last.contiguous();
  at::Tensor gx = at::zeros_like(r.x), gmu = at::zeros_like(r.means), gprec = at::zeros_like(r.prec);
  const int64_t total = r.G * r.N;
  if (total > 0) {
    at::globalContext().alertNotDeterministic(
        "fastgmmdiff CUDA NGMG-with-target backward (parameter gradients by atomicAdd); the 'triton' "
        "backend is deterministic");
    const dim3 grid(grid_blocks((total + 255) / 256, "target backward"));
    const auto stream = current_stream();
    AT_DISPATCH_FLOATING_TYPES(acc, "fastgmmdiff_log_prob_target_backward_cuda", [&] {
      FGD_DISPATCH_COV(cov, [&] {
        FGD_LAUNCH(grid, 256, 0, stream, target_bwd_kernel<scalar_t, COV>)(
            g.data_ptr<scalar_t>(), r.x.data_ptr<scalar_t>(), r.means.data_ptr<scalar_t>(),
            r.prec.data_ptr<scalar_t>(), t.data_ptr<int64_t>(), lp.data_ptr<scalar_t>(),
            gx.data_ptr<scalar_t>(), gmu.data_ptr<scalar_t>(), gprec.data_ptr<scalar_t>(), r.G,
            r.Gx, r.N, static_cast<int>(r.K), static_cast<int>(r.D));
        FGD_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  return {fit_grad(gx, x), fit_grad(gmu, means), fit_grad(gprec, prec)};
}

// Fused NGMG on CUDA: the log-density kernels above plus an element-wise epilogue in ATen (the
// CPU build fuses the epilogue into its kernels).  Same contract as the CPU op (schemas.h): the
// saved logp is log p̃ (normalize: c inside the logsumexp) or log p without a target (the
// backward recomputes the responsibilities from it), and −½q_t (normalize) or log N(x; μ_t, Σ_t)
// with one.
std::tuple<at::Tensor, at::Tensor> ngmg_cuda(const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
                                             const at::Tensor& logits, const c10::optional<at::Tensor>& target,
                                             c10::string_view covariance_type, bool normalize) {
  const int cov = parse_cov(covariance_type);
  if (target.has_value() && target->defined()) {
    const at::Tensor lp = target_forward(x, means, prec, *target, cov, normalize);
    return {-lp.exp(), lp};
  }
  const at::Tensor lp = forward(x, means, prec, logits, covariance_type, normalize);
  return {-lp.exp(), lp};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ngmg_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
    const at::Tensor& logits, const c10::optional<at::Tensor>& target, const at::Tensor& loss,
    const at::Tensor& logp, c10::string_view covariance_type, bool normalize) {
  // ∂(−exp(logp))/∂logp = −p̃ = loss; without normalisation −p can overflow (ops.h overflow_split:
  // a second pass, no host sync)
  const bool targeted = target.has_value() && target->defined();
  auto bwd = [&](const at::Tensor& scale) {
    if (targeted) {
      auto r = log_prob_target_backward_cuda(grad * scale, x, means, prec, *target, logp, covariance_type);
      return std::vector<at::Tensor>{std::get<0>(r), std::get<1>(r), std::get<2>(r), at::zeros_like(logits)};
    }
    auto r = backward(grad * scale, x, means, prec, logits, logp, covariance_type, normalize);
    return std::vector<at::Tensor>{std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
  };
  const std::vector<at::Tensor> gr = normalize ? bwd(loss) : overflow_split(loss, logp, !loss.is_cuda(), bwd);
  return {gr[0], gr[1], gr[2], gr[3]};
}

}  // namespace cuda
}  // namespace fastgmmdiff

TORCH_LIBRARY_IMPL(FGD_CUDA_OPS_NAMESPACE, FGD_CUDA_DISPATCH_KEY, m) {
  m.impl("log_prob", &fastgmmdiff::cuda::log_prob_cuda);
  m.impl("log_prob_backward", &fastgmmdiff::cuda::log_prob_backward_cuda);
  m.impl("ngmg", &fastgmmdiff::cuda::ngmg_cuda);
  m.impl("ngmg_backward", &fastgmmdiff::cuda::ngmg_backward_cuda);
}
