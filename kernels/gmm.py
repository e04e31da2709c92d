"""Triton kernels for the Gaussian-mixture log-density, forward and backward (backend "triton").

Math (SPEC §1), on the canonical layout of ``fastgmmdiff._checks`` (x ``[Gx, N, D]`` with
Gx ∈ {1, G}; means ``[G, K, D]``; prec_chol diag ``[G, K, D]`` / spherical ``[G, K]`` / full
``[G, K, D, D]`` upper triangular; logits ``[G, K]``):

    ℓ_nk = a_k − ½ q_nk,  q_nk = ‖U_kᵀ(x_n − μ_k)‖²,  a_k = log π_k + log|U_k| − D/2 log 2π
    log p_n = logsumexp_k ℓ_nk

a_k (G·K numbers) is computed on the device with torch ops before the launch; everything of
size N·K stays inside the kernels.

Tiling — the structure of a FlashAttention forward without the V product:

* forward: one program per (tile of BLOCK_N points, mixture g).  It loops over tiles of BLOCK_K
  components; for each it forms q for the [BLOCK_N, BLOCK_K] tile — diag/spherical as
  element-wise FMA over [BLOCK_N, BLOCK_K, BLOCK_D] chunks of z = x − μ (z formed before any
  product: no ‖x‖² − 2x·μ + ‖μ‖² expansion), full as ``tl.dot`` of the z tile with U_k (one
  component at a time, IEEE fp32 — no TF32; past FULL_ONE_MAX dimensions as the blocks d ≤ e of
  y[:, e] = Σ_d z[:, d] U[d, e] in FULL_CHUNK-wide blocks, the lower triangle skipped, any D)
  — and folds it into an online logsumexp in the
  natural-log domain.  Only log p ``[G, N]`` is written.  The backward recomputes ℓ_nk with the
  same operations in the same order, so ℓ_nk − log p_n is exact to rounding of the small
  difference even where log p is in the thousands (an exp2 domain with log p converted between
  bases lost eps·|log p| there: 5e-5 relative gradient error at D = 130).
* backward, from the saved log p: r_nk = exp((ℓ_nk − log p_n) − δ_n), w_nk = g_n r_nk, where in
  float32 δ_n (one more forward pass, ``_lse_residual``) is what the saved log p lacks of the
  exact log-sum-exp of the recomputed ℓ: log p's own rounding (~2e-5 at |log p| ~ 600) would
  otherwise scale every r of the point alike (δ = 0 in float64), and

      ∂x_n = −Σ_k w_nk Λ_k z_nk        ∂μ_k = Σ_n w_nk Λ_k z_nk       ∂logits_k = W_k − π_k Σ_n g_n
      diag ∂s_kd = W_k/s_kd − s_kd Σ_n w_nk z²_nkd       sph. ∂s_k = D W_k/s_k − s_k Σ_n w_nk ‖z_nk‖²
      full ∂U_k = triu(diag(W_k/U_k,dd) − Σ_n w_nk z_nk y_nkᵀ),  y = U_kᵀ z,  W_k = Σ_n w_nk

  Kernel 1 (grid: point tiles × G) recomputes ℓ and writes ∂x.  Kernel 2 (grid: component
  tiles × point splits × G) recomputes ℓ and writes, per split, the partial sums W, Σ w z,
  Σ w z² (Σ w z yᵀ for full); torch sums the splits in a fixed order.  No atomics: two runs
  are bit-identical.  The split count is chosen so that there are enough programs to fill a
  GPU and the partial buffers stay under 64 MiB.

NGMG with ``target`` (one component per point): the forward gathers each point's own
component (μ_t, s_t) — the other components are never read — and writes log N(x_n; μ_t, Σ_t);
the backward writes each point's terms (w s_t² z, w z²) and sums them per component with a
segment sum over the points sorted by target (a stable argsort): fixed order, no atomics.
Full covariance walks the sorted points instead: one program per component, its own μ and U,
the same blocked D×D tl.dot as above, ∂x per point and the sums Σ w, Σ w y, Σ w z yᵀ per
component (never a gathered U per point).

−inf rows (every ℓ = −inf) get log p = −inf and zero gradients; inside a live row a component
with r = 0 has w = 0 and is never multiplied with an infinite distance.

Block shapes (``_blocks``): a fixed table, no autotuning at first call (cold start matters).
Its origin: register pressure as compiled for sm_90 and sm_80 (compile_check.py: every variant
within 64 B of stack per thread in float32, most with none) — the 3-D diag tile
BLOCK_N·BLOCK_K·BLOCK_D ≤ 8192 values over 4 warps, half the components per tile in float64;
full covariance one block of the D×D product up to D = 32, 32×32 blocks past that (8 warps).
**Not yet tuned by measurement on a GPU** — bench/gpu_check.sh is where that happens.

Tests run these kernels on the CPU under ``TRITON_INTERPRET=1`` (tests/test_triton.py) and
compile every launch variant for a real GPU (tests/test_triton_compile.py).
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastgmmdiff._autograd import register_log_prob_op, register_target_op
from fastgmmdiff._dispatch import _triton_interpreted as interpreted
from fastgmmdiff._math import acc_dtype, component_const, component_lognorm, finish_prec_grad, ngmg_const

# (A constant read inside a @triton.jit function must be a tl.constexpr: Triton's compiler
# rejects a plain module-level float, its CPU interpreter does not — tests/test_triton_compile.py.)
# Full covariance: up to FULL_ONE_MAX dimensions the D×D product is one block; past that, the
# upper-triangular blocks of FULL_CHUNK × FULL_CHUNK.  Measured by compile_check.py: one 128×128
# block spilled kilobytes per thread, one 64×64 block 2 KB with half-precision inputs; 32×32
# blocks spill nothing (and skip the zero lower triangle).
FULL_ONE_MAX = 32
FULL_CHUNK = 32
_PARTIAL_BYTES = 64 << 20  # cap on the backward's per-split partial sums
_I32_PARAMS = ("N", "K", "D", "W", "n_per_split")  # sizes: int32 in the kernels (_check_sizes)


def _kernel(fn):
    """``triton.jit`` for a launched kernel, specialised on its ``tl.constexpr`` parameters only.

    Integer parameters have fixed types — sizes (``_I32_PARAMS``: the host checks they fit) as
    i32, strides as i64 — and no specialisation on their values (1, multiples of 16) or on
    pointer alignment.  So a kernel compiles once per block-table entry and dtype: a new N, K
    or D never recompiles at a first call, and the compile check (compile_check.py) covers
    every binary a launch can use."""
    params = inspect.signature(fn).parameters
    plain = [n for n, p in params.items() if "constexpr" not in str(p.annotation)]
    for n in plain:
        if not n.endswith("_ptr"):
            fn.__annotations__[n] = "i32" if n in _I32_PARAMS else "i64"
    fn.__signature__ = inspect.signature(fn).replace(
        parameters=[p.replace(annotation=fn.__annotations__.get(n, p.annotation)) for n, p in params.items()])
    return triton.jit(fn, do_not_specialize=plain, do_not_specialize_on_alignment=plain)


# --- kernels: diag and spherical ---------------------------------------------------------------

@triton.jit
def _z_chunk(x_row, mu_ptr, offs_n, mask_n, offs_k, mask_k, d0, D, sxn, smk,
             BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """z = x − μ for dimensions d0 … d0+BLOCK_D: ([BLOCK_N, BLOCK_K, BLOCK_D], the [K, D] mask
    and the offsets of the (k, d) entries, for loading s or storing partial sums)."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    xt = tl.load(x_row + offs_n[:, None].to(tl.int64) * sxn + offs_d[None, :],
                 mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(ACC)
    mkd = mask_k[:, None] & mask_d[None, :]
    kd = offs_k[:, None] * smk + offs_d[None, :]
    mu = tl.load(mu_ptr + kd, mask=mkd, other=0.0).to(ACC)
    return xt[:, None, :] - mu[None, :, :], mkd, kd


@triton.jit
def _row_weights(g_ptr, lp_ptr, offs_n, mask_n, ACC: tl.constexpr):
    """(upstream gradient, log p) per point; both 0 for padding and for −inf (dead) rows."""
    lp = tl.load(lp_ptr + offs_n, mask=mask_n, other=float("-inf")).to(ACC)
    live = mask_n & (lp > float("-inf"))
    gw = tl.where(live, tl.load(g_ptr + offs_n, mask=mask_n, other=0.0).to(ACC), 0.0)
    return gw, tl.where(live, lp, 0.0)


@triton.jit
def _row_weights_delta(g_ptr, lp_ptr, dl_ptr, offs_n, mask_n, ACC: tl.constexpr):
    """``_row_weights`` and δ per point (0 for padding and dead rows): the log-sum-exp of the
    recomputed ℓ minus the saved (rounded) log p (``_lse_residual``); the backward's r is
    exp((ℓ − log p) − δ)."""
    gw, lp = _row_weights(g_ptr, lp_ptr, offs_n, mask_n, ACC)
    dl = tl.load(dl_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)
    return gw, lp, tl.where(gw != 0, dl, 0.0)


@triton.jit
def _q_tile(x_row, mu_ptr, s_ptr, offs_n, mask_n, offs_k, mask_k, D, sxn, smk, ssk,
            SPHERICAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """q [BLOCK_N, BLOCK_K] = Σ_d ((x_nd − μ_kd) s_kd)² over chunks of BLOCK_D dimensions."""
    q = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    if SPHERICAL:
        s = tl.load(s_ptr + offs_k * ssk, mask=mask_k, other=0.0).to(ACC)
    for d0 in range(0, D, BLOCK_D):
        z, mkd, kd = _z_chunk(x_row, mu_ptr, offs_n, mask_n, offs_k, mask_k, d0, D, sxn, smk, BLOCK_D, ACC)
        # scaled before the square (z² overflows for far points whose ℓ is representable)
        if SPHERICAL:
            y = z * s[None, :, None]
        else:
            y = z * tl.load(s_ptr + kd, mask=mkd, other=0.0).to(ACC)[None, :, :]
        q += tl.sum(y * y, axis=2)
    return q


@triton.jit
def _online_lse(m, l, l2):
    """Fold a [BLOCK_N, k] tile of ℓ into the running (max m, sum l of exp(ℓ − m))."""
    m_new = tl.maximum(m, tl.max(l2, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(l2 - m_safe[:, None]), axis=1)
    return m_new, l


@triton.jit
def _lse_result(m, l):
    """log p from the running state; −inf where every ℓ was −inf."""
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m_safe + tl.log(l)


@triton.jit
def _lse_residual(m, l, lp):
    """δ = (m − log p) + log l: what the saved log p (rounded to the accumulation dtype) lacks
    of the log-sum-exp of these ℓ.  In float32 at |log p| ~ 600 that rounding is ~2e-5, an
    error every r = exp(ℓ − log p) of the point would share; with δ, r is the softmax of ℓ.
    0 for dead rows (log p or every ℓ −inf)."""
    ok = (m > float("-inf")) & (lp > float("-inf"))
    return tl.where(ok, (tl.where(ok, m, 0.0) - tl.where(ok, lp, 0.0)) + tl.log(tl.where(ok, l, 1.0)), 0.0)


@_kernel
def _fwd_diag_kernel(x_ptr, mu_ptr, s_ptr, a_ptr, out_ptr, lp_ptr, N, K, D,
                     sxg, sxn, smg, smk, ssg, ssk, sag, sog,
                     SPHERICAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_D: tl.constexpr, ACC: tl.constexpr, RESID: tl.constexpr):
    """log p of a tile of points (RESID: δ against the saved log p at lp_ptr instead)."""
    pid_n = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x_row = x_ptr + g * sxg
    m = tl.full((BLOCK_N,), float("-inf"), ACC)
    l = tl.zeros((BLOCK_N,), ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        q = _q_tile(x_row, mu_ptr + g * smg, s_ptr + g * ssg, offs_n, mask_n, offs_k, mask_k, D,
                    sxn, smk, ssk, SPHERICAL, BLOCK_N, BLOCK_K, BLOCK_D, ACC)
        a = tl.load(a_ptr + g * sag + offs_k, mask=mask_k, other=float("-inf")).to(ACC)
        l2 = a[None, :] - 0.5 * q
        m, l = _online_lse(m, l, tl.where(mask_k[None, :], l2, float("-inf")))
    if RESID:
        lp = tl.load(lp_ptr + g * sog + offs_n, mask=mask_n, other=float("-inf")).to(ACC)
        tl.store(out_ptr + g * sog + offs_n, _lse_residual(m, l, lp), mask=mask_n)
    else:
        tl.store(out_ptr + g * sog + offs_n, _lse_result(m, l), mask=mask_n)


@triton.jit
def _w_tile(x_row, mu_ptr, s_ptr, a_ptr, offs_n, mask_n, offs_k, mask_k, gw, lp, dl, D, sxn, smk, ssk,
            SPHERICAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """w [BLOCK_N, BLOCK_K] = g_n exp((ℓ_nk − log p_n) − δ_n), 0 outside the masks and for dead
    rows."""
    q = _q_tile(x_row, mu_ptr, s_ptr, offs_n, mask_n, offs_k, mask_k, D, sxn, smk, ssk,
                SPHERICAL, BLOCK_N, BLOCK_K, BLOCK_D, ACC)
    a = tl.load(a_ptr + offs_k, mask=mask_k, other=float("-inf")).to(ACC)
    l2 = a[None, :] - 0.5 * q
    w = gw[:, None] * tl.exp((l2 - lp[:, None]) - dl[:, None])
    return tl.where(mask_k[None, :] & (gw != 0)[:, None] & (l2 > float("-inf")), w, 0.0)


@_kernel
def _bwd_x_diag_kernel(g_ptr, lp_ptr, dl_ptr, x_ptr, mu_ptr, s_ptr, a_ptr, dx_ptr, N, K, D,
                       sxg, sxn, smg, smk, ssg, ssk, sag, sog, sdg, sdn,
                       SPHERICAL: tl.constexpr, ONE_D: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """∂x for a tile of points of mixture g (dx_ptr: [G, N, D] in ACC, rows owned here; zero-
    initialised when several D chunks accumulate in place)."""
    pid_n = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x_row = x_ptr + g * sxg
    mu_g = mu_ptr + g * smg
    s_g = s_ptr + g * ssg
    gw, lp, dl = _row_weights_delta(g_ptr + g * sog, lp_ptr + g * sog, dl_ptr + g * sog, offs_n, mask_n, ACC)
    dx_row = dx_ptr + g * sdg + offs_n[:, None].to(tl.int64) * sdn
    acc = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = _w_tile(x_row, mu_g, s_g, a_ptr + g * sag, offs_n, mask_n, offs_k, mask_k, gw, lp, dl, D,
                    sxn, smk, ssk, SPHERICAL, BLOCK_N, BLOCK_K, BLOCK_D, ACC)
        if SPHERICAL:
            s = tl.load(s_g + offs_k * ssk, mask=mask_k, other=0.0).to(ACC)
        for d0 in range(0, D, BLOCK_D):
            z, mkd, kd = _z_chunk(x_row, mu_g, offs_n, mask_n, offs_k, mask_k, d0, D, sxn, smk, BLOCK_D, ACC)
            # (w z) s²: w s² first can overflow (NGMG unnormalised weights by p) and meet z = 0
            t = w[:, :, None] * tl.where((w != 0)[:, :, None], z, 0.0)  # r = 0 never meets z = inf
            if SPHERICAL:
                t = t * (s * s)[None, :, None]
            else:
                sd = tl.load(s_g + kd, mask=mkd, other=0.0).to(ACC)
                t = t * (sd * sd)[None, :, :]
            part = -tl.sum(t, axis=1)
            if ONE_D:
                acc += part
            else:
                offs_d = d0 + tl.arange(0, BLOCK_D)
                msk = mask_n[:, None] & (offs_d < D)[None, :]
                ptrs = dx_row + offs_d[None, :]
                tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + part, mask=msk)
    if ONE_D:
        offs_d = tl.arange(0, BLOCK_D)
        tl.store(dx_row + offs_d[None, :], acc, mask=mask_n[:, None] & (offs_d < D)[None, :])


@_kernel
def _bwd_param_diag_kernel(g_ptr, lp_ptr, dl_ptr, x_ptr, mu_ptr, s_ptr, a_ptr, pz_ptr, pzz_ptr, pw_ptr,
                           N, K, D, n_per_split, sxg, sxn, smg, smk, ssg, ssk, sag, sog,
                           SPHERICAL: tl.constexpr, ONE_D: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """Partial sums over one split of the points, for a tile of components of mixture g:
    pw = Σ w [S, G, K], pz = Σ w z [S, G, K, D], pzz = Σ w y² [S, G, K, D] with y = s z (spherical:
    Σ w ‖y‖² [S, G, K]; _math.finish_prec_grad).  Contiguous, zero-initialised buffers (several
    D chunks accumulate in place)."""
    pid_k = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    g = tl.program_id(2).to(tl.int64)
    G = tl.num_programs(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    x_row = x_ptr + g * sxg
    mu_g = mu_ptr + g * smg
    s_g = s_ptr + g * ssg
    n_lo = split * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, N)
    row = (split * G + g) * K + offs_k            # [BLOCK_K] rows of the partial buffers
    if SPHERICAL:
        s_k = tl.load(s_g + offs_k * ssk, mask=mask_k, other=0.0).to(ACC)
    wsum = tl.zeros((BLOCK_K,), ACC)
    zz_sph = tl.zeros((BLOCK_K,), ACC)
    acc_z = tl.zeros((BLOCK_K, BLOCK_D), ACC)
    acc_zz = tl.zeros((BLOCK_K, BLOCK_D), ACC)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_hi
        gw, lp, dl = _row_weights_delta(g_ptr + g * sog, lp_ptr + g * sog, dl_ptr + g * sog, offs_n, mask_n, ACC)
        w = _w_tile(x_row, mu_g, s_g, a_ptr + g * sag, offs_n, mask_n, offs_k, mask_k, gw, lp, dl, D,
                    sxn, smk, ssk, SPHERICAL, BLOCK_N, BLOCK_K, BLOCK_D, ACC)
        wsum += tl.sum(w, axis=0)
        for d0 in range(0, D, BLOCK_D):
            z, mkd, kd = _z_chunk(x_row, mu_g, offs_n, mask_n, offs_k, mask_k, d0, D, sxn, smk, BLOCK_D, ACC)
            z = tl.where((w != 0)[:, :, None], z, 0.0)
            wz = w[:, :, None] * z
            pz = tl.sum(wz, axis=0)
            if SPHERICAL:
                y = z * s_k[None, :, None]
            else:
                y = z * tl.load(s_g + kd, mask=mkd, other=0.0).to(ACC)[None, :, :]
            pzz = tl.sum(w[:, :, None] * y * y, axis=0)
            if SPHERICAL:
                zz_sph += tl.sum(pzz, axis=1)
            if ONE_D:
                acc_z += pz
                if not SPHERICAL:
                    acc_zz += pzz
            else:
                ptr = row[:, None] * D + (d0 + tl.arange(0, BLOCK_D))[None, :]
                tl.store(pz_ptr + ptr, tl.load(pz_ptr + ptr, mask=mkd, other=0.0) + pz, mask=mkd)
                if not SPHERICAL:
                    tl.store(pzz_ptr + ptr, tl.load(pzz_ptr + ptr, mask=mkd, other=0.0) + pzz, mask=mkd)
    tl.store(pw_ptr + row, wsum, mask=mask_k)
    if SPHERICAL:
        tl.store(pzz_ptr + row, zz_sph, mask=mask_k)
    if ONE_D:
        offs_d = tl.arange(0, BLOCK_D)
        mkd = mask_k[:, None] & (offs_d < D)[None, :]
        ptr = row[:, None] * D + offs_d[None, :]
        tl.store(pz_ptr + ptr, acc_z, mask=mkd)
        if not SPHERICAL:
            tl.store(pzz_ptr + ptr, acc_zz, mask=mkd)


# --- kernels: full covariance (the D×D product in chunks of BLOCK_C × BLOCK_C) -------------------

@triton.jit
def _full_zu(x_row, mu_k, u_k, offs_n, mask_n, d0, e0, D, sxn, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """z = x − μ_k for dimensions d0 … d0+BLOCK_C ([BLOCK_N, BLOCK_C]) and the block
    U_k[d0:d0+BLOCK_C, e0:e0+BLOCK_C] (upper triangle only; the rest reads as 0)."""
    offs_d = d0 + tl.arange(0, BLOCK_C)
    offs_e = e0 + tl.arange(0, BLOCK_C)
    mask_d = offs_d < D
    xt = tl.load(x_row + offs_n[:, None].to(tl.int64) * sxn + offs_d[None, :],
                 mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(ACC)
    mu = tl.load(mu_k + offs_d, mask=mask_d, other=0.0).to(ACC)
    z = tl.where(mask_d[None, :], xt - mu[None, :], 0.0)
    ii = offs_d[:, None]
    jj = offs_e[None, :]
    u = tl.load(u_k + ii * D + jj, mask=(ii <= jj) & (ii < D) & (jj < D), other=0.0).to(ACC)
    return z, u


@triton.jit
def _full_y_chunk(x_row, mu_k, u_k, offs_n, mask_n, e0, D, sxn, BLOCK_N: tl.constexpr,
                  BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """y[:, e0:e0+BLOCK_C] of y = zᵀU_k: the blocks d0 ≤ e0 of the upper triangle."""
    y = tl.zeros((BLOCK_N, BLOCK_C), ACC)
    for d0 in range(0, e0 + BLOCK_C, BLOCK_C):
        z, u = _full_zu(x_row, mu_k, u_k, offs_n, mask_n, d0, e0, D, sxn, BLOCK_C, ACC)
        y += tl.dot(z, u, input_precision="ieee", out_dtype=ACC)
    return y


@triton.jit
def _full_q(x_row, mu_k, u_k, offs_n, mask_n, flags, D, sxn, BLOCK_N: tl.constexpr,
            BLOCK_C: tl.constexpr, ACC: tl.constexpr, ONE_C: tl.constexpr = False):
    """q = ‖y‖² (ONE_C: one product; else over the column chunks of y), made +inf where it is
    NaN for a far point (``_far``; ``flags`` from ``_row_flags``)."""
    if ONE_C:
        z, u = _full_zu(x_row, mu_k, u_k, offs_n, mask_n, 0, 0, D, sxn, BLOCK_C, ACC)
        y = tl.dot(z, u, input_precision="ieee", out_dtype=ACC)
        q = tl.sum(y * y, axis=1)
    else:
        q = tl.zeros((BLOCK_N,), ACC)
        for e0 in range(0, D, BLOCK_C):
            y = _full_y_chunk(x_row, mu_k, u_k, offs_n, mask_n, e0, D, sxn, BLOCK_N, BLOCK_C, ACC)
            q += tl.sum(y * y, axis=1)
    return _far(q, flags)


@triton.jit
def _row_flags(x_row, offs_n, mask_n, D, sxn, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per point of the tile: 1 if a coordinate is infinite, 2 if one is NaN (or both)."""
    bad = tl.zeros((BLOCK_N,), tl.int32)
    for d0 in range(0, D, BLOCK_C):
        offs_d = d0 + tl.arange(0, BLOCK_C)
        xt = tl.load(x_row + offs_n[:, None].to(tl.int64) * sxn + offs_d[None, :],
                     mask=mask_n[:, None] & (offs_d < D)[None, :], other=0.0)
        inf_x = tl.max(tl.where(tl.abs(xt) == float("inf"), 1, 0), axis=1)
        nan_x = tl.max(tl.where(xt != xt, 2, 0), axis=1)
        bad = bad | inf_x | nan_x
    return bad


@triton.jit
def _far(q, flags):
    """Full covariance: q = +inf (infinitely far: ℓ = −inf, a dead row where every component is
    so) for a point with an infinite coordinate, or whose q is NaN from inf · 0 or inf − inf in
    Uᵀz (a distance that overflowed); a point with a NaN coordinate keeps its NaN."""
    nan_x = (flags & 2) != 0
    return tl.where(~nan_x & (((flags & 1) != 0) | (q != q)), float("inf"), q)


@triton.jit
def _full_w(gw, lp, dl, a, q):
    """w = g exp((ℓ − log p) − δ) for one component; 0 for dead or padding rows and where ℓ = −inf."""
    l2 = a - 0.5 * q
    return tl.where((gw != 0) & (l2 > float("-inf")), gw * tl.exp((l2 - lp) - dl), 0.0)


@_kernel
def _fwd_full_kernel(x_ptr, mu_ptr, u_ptr, a_ptr, out_ptr, lp_ptr, N, K, D,
                     sxg, sxn, smg, smk, sug, suk, sag, sog,
                     ONE_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
                     RESID: tl.constexpr):
    """log p of a tile of points (RESID: δ against the saved log p at lp_ptr instead)."""
    pid_n = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x_row = x_ptr + g * sxg
    flags = _row_flags(x_row, offs_n, mask_n, D, sxn, BLOCK_N, BLOCK_C)
    m = tl.full((BLOCK_N,), float("-inf"), ACC)
    l = tl.zeros((BLOCK_N,), ACC)
    for k in range(0, K):
        mu_k = mu_ptr + g * smg + k * smk
        u_k = u_ptr + g * sug + k * suk
        q = _full_q(x_row, mu_k, u_k, offs_n, mask_n, flags, D, sxn, BLOCK_N, BLOCK_C, ACC, ONE_C)
        a = tl.load(a_ptr + g * sag + k).to(ACC)
        m, l = _online_lse(m, l, (a - 0.5 * q)[:, None])
    if RESID:
        lp = tl.load(lp_ptr + g * sog + offs_n, mask=mask_n, other=float("-inf")).to(ACC)
        tl.store(out_ptr + g * sog + offs_n, _lse_residual(m, l, lp), mask=mask_n)
    else:
        tl.store(out_ptr + g * sog + offs_n, _lse_result(m, l), mask=mask_n)


@_kernel
def _bwd_x_full_kernel(g_ptr, lp_ptr, dl_ptr, x_ptr, mu_ptr, u_ptr, a_ptr, dx_ptr, N, K, D,
                       sxg, sxn, smg, smk, sug, suk, sag, sog, sdg, sdn,
                       ONE_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                       ACC: tl.constexpr):
    """∂x_n = −Σ_k w_nk U_k y_nk.  ONE_C (D ≤ BLOCK_C): y from one product, ∂x in registers.
    Otherwise q first (all chunks), then per column chunk e of y the blocks U[d, e] (d ≤ e)
    add into ∂x[:, d] in place (dx_ptr zero-initialised; these rows are this program's)."""
    pid_n = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x_row = x_ptr + g * sxg
    dx_row = dx_ptr + g * sdg + offs_n[:, None].to(tl.int64) * sdn
    gw, lp, dl = _row_weights_delta(g_ptr + g * sog, lp_ptr + g * sog, dl_ptr + g * sog, offs_n, mask_n, ACC)
    flags = _row_flags(x_row, offs_n, mask_n, D, sxn, BLOCK_N, BLOCK_C)
    acc = tl.zeros((BLOCK_N, BLOCK_C), ACC)
    for k in range(0, K):
        mu_k = mu_ptr + g * smg + k * smk
        u_k = u_ptr + g * sug + k * suk
        a = tl.load(a_ptr + g * sag + k).to(ACC)
        if ONE_C:
            z, u = _full_zu(x_row, mu_k, u_k, offs_n, mask_n, 0, 0, D, sxn, BLOCK_C, ACC)
            y = tl.dot(z, u, input_precision="ieee", out_dtype=ACC)
            q = _far(tl.sum(y * y, axis=1), flags)
            w = _full_w(gw, lp, dl, a, q)
            wy = tl.where((w != 0)[:, None], w[:, None] * y, 0.0)
            acc -= tl.dot(wy, tl.trans(u), input_precision="ieee", out_dtype=ACC)
        else:
            q = _full_q(x_row, mu_k, u_k, offs_n, mask_n, flags, D, sxn, BLOCK_N, BLOCK_C, ACC)
            w = _full_w(gw, lp, dl, a, q)
            for e0 in range(0, D, BLOCK_C):
                y = _full_y_chunk(x_row, mu_k, u_k, offs_n, mask_n, e0, D, sxn, BLOCK_N, BLOCK_C, ACC)
                wy = tl.where((w != 0)[:, None], w[:, None] * y, 0.0)
                for d0 in range(0, e0 + BLOCK_C, BLOCK_C):
                    _, u = _full_zu(x_row, mu_k, u_k, offs_n, mask_n, d0, e0, D, sxn, BLOCK_C, ACC)
                    offs_d = d0 + tl.arange(0, BLOCK_C)
                    msk = mask_n[:, None] & (offs_d < D)[None, :]
                    ptrs = dx_row + offs_d[None, :]
                    part = tl.dot(wy, tl.trans(u), input_precision="ieee", out_dtype=ACC)
                    tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) - part, mask=msk)
    if ONE_C:
        offs_d = tl.arange(0, BLOCK_C)
        tl.store(dx_row + offs_d[None, :], acc, mask=mask_n[:, None] & (offs_d < D)[None, :])


@triton.jit
def _full_acc_one(z, y, w, acc_y, acc_zy, ACC: tl.constexpr):
    """One block (ONE_C): w y (0 where w = 0, never meeting an infinite z or y) and the running
    sums Σ w y, Σ z (w y)ᵀ of a tile of points."""
    wy = tl.where((w != 0)[:, None], w[:, None] * y, 0.0)
    zm = tl.where((w != 0)[:, None], z, 0.0)
    return wy, acc_y + tl.sum(wy, axis=0), acc_zy + tl.dot(tl.trans(zm), wy, input_precision="ieee", out_dtype=ACC)


@triton.jit
def _full_acc_chunk(x_row, mu_k, u_k, offs_n, mask_n, w, e0, D, sxn, py_row, pzy_row, dx_row,
                    DX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Past one block: column chunk e0 of y for a tile of points; adds Σ w y into py[e0 : e0+C]
    and Σ z (w y)ᵀ into the blocks pzy[d0 :, e0 :] (d0 ≤ e0) in place, and with DX −(w y) U[d0, e0]ᵀ
    into the tile's rows of ∂x (dx_row: [BLOCK_N, 1] row pointers), in place."""
    y = _full_y_chunk(x_row, mu_k, u_k, offs_n, mask_n, e0, D, sxn, BLOCK_N, BLOCK_C, ACC)
    wy = tl.where((w != 0)[:, None], w[:, None] * y, 0.0)
    offs_e = e0 + tl.arange(0, BLOCK_C)
    mask_e = offs_e < D
    tl.store(py_row + offs_e, tl.load(py_row + offs_e, mask=mask_e, other=0.0) + tl.sum(wy, axis=0), mask=mask_e)
    for d0 in range(0, e0 + BLOCK_C, BLOCK_C):
        z, u = _full_zu(x_row, mu_k, u_k, offs_n, mask_n, d0, e0, D, sxn, BLOCK_C, ACC)
        zm = tl.where((w != 0)[:, None], z, 0.0)
        offs_d = d0 + tl.arange(0, BLOCK_C)
        mask_d = offs_d < D
        ptrs = pzy_row + offs_d[:, None] * D + offs_e[None, :]
        msk = mask_d[:, None] & mask_e[None, :]
        part = tl.dot(tl.trans(zm), wy, input_precision="ieee", out_dtype=ACC)
        tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + part, mask=msk)
        if DX:
            xp = dx_row + offs_d[None, :]
            xm = mask_n[:, None] & mask_d[None, :]
            part = tl.dot(wy, tl.trans(u), input_precision="ieee", out_dtype=ACC)
            tl.store(xp, tl.load(xp, mask=xm, other=0.0) - part, mask=xm)


@triton.jit
def _full_acc_store(pw_ptr, row, wsum, py_row, pzy_row, acc_y, acc_zy, D, ONE_C: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """Σ w into pw[row]; with ONE_C the register sums Σ w y and Σ z (w y)ᵀ into py and pzy."""
    tl.store(pw_ptr + row, tl.sum(wsum, axis=0))
    if ONE_C:
        offs_d = tl.arange(0, BLOCK_C)
        mask_d = offs_d < D
        tl.store(py_row + offs_d, acc_y, mask=mask_d)
        tl.store(pzy_row + offs_d[:, None] * D + offs_d[None, :], acc_zy, mask=mask_d[:, None] & mask_d[None, :])


@_kernel
def _bwd_param_full_kernel(g_ptr, lp_ptr, dl_ptr, x_ptr, mu_ptr, u_ptr, a_ptr, py_ptr, pzy_ptr, pw_ptr,
                           N, K, D, n_per_split,
                           sxg, sxn, smg, smk, sug, suk, sag, sog,
                           ONE_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                           ACC: tl.constexpr):
    """For component k of mixture g over one split of points: pw = Σ w, py = Σ w y (∂μ = U py),
    pzy = Σ w z yᵀ.  Buffers [S, G, K, D] / [S, G, K, D, D] / [S, G, K], contiguous and
    zero-initialised (past one chunk the blocks of py and pzy accumulate in place)."""
    k = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    g = tl.program_id(2).to(tl.int64)
    G = tl.num_programs(2)
    x_row = x_ptr + g * sxg
    mu_k = mu_ptr + g * smg + k * smk
    u_k = u_ptr + g * sug + k * suk
    a = tl.load(a_ptr + g * sag + k).to(ACC)
    row = (split * G + g) * K + k
    py_row = py_ptr + row * D
    pzy_row = pzy_ptr + row * D * D
    n_lo = split * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, N)
    wsum = tl.zeros((BLOCK_N,), ACC)
    acc_y = tl.zeros((BLOCK_C,), ACC)
    acc_zy = tl.zeros((BLOCK_C, BLOCK_C), ACC)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_hi
        gw, lp, dl = _row_weights_delta(g_ptr + g * sog, lp_ptr + g * sog, dl_ptr + g * sog, offs_n, mask_n, ACC)
        flags = _row_flags(x_row, offs_n, mask_n, D, sxn, BLOCK_N, BLOCK_C)
        if ONE_C:
            z, u = _full_zu(x_row, mu_k, u_k, offs_n, mask_n, 0, 0, D, sxn, BLOCK_C, ACC)
            y = tl.dot(z, u, input_precision="ieee", out_dtype=ACC)
            w = _full_w(gw, lp, dl, a, _far(tl.sum(y * y, axis=1), flags))
            wsum += w
            _, acc_y, acc_zy = _full_acc_one(z, y, w, acc_y, acc_zy, ACC)
        else:
            q = _full_q(x_row, mu_k, u_k, offs_n, mask_n, flags, D, sxn, BLOCK_N, BLOCK_C, ACC)
            w = _full_w(gw, lp, dl, a, q)
            wsum += w
            for e0 in range(0, D, BLOCK_C):
                _full_acc_chunk(x_row, mu_k, u_k, offs_n, mask_n, w, e0, D, sxn, py_row, pzy_row, py_row,
                                False, BLOCK_N, BLOCK_C, ACC)
    _full_acc_store(pw_ptr, row, wsum, py_row, pzy_row, acc_y, acc_zy, D, ONE_C, BLOCK_C)


# --- kernels: one component per point (NGMG with target), full covariance ----------------------
# The points are sorted by target (a stable argsort; ``_target_segments``): one program per
# component and mixture walks its own points — rows perm[g, off[g, k] : off[g, k + 1]] — with
# that component's μ and U, so the D×D product is the same tl.dot in blocks as above and nothing
# per point beyond ∂x is written.  Fixed order, no atomics.

@_kernel
def _fwd_target_full_kernel(x_ptr, mu_ptr, u_ptr, c_ptr, perm_ptr, off_ptr, out_ptr, N, K, D,
                            sxg, sxn, smg, smk, sug, suk, scg, sog,
                            ONE_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                            ACC: tl.constexpr):
    """log N(x_n; μ_k, Σ_k) = c_k − ½‖U_kᵀ(x_n − μ_k)‖² for the points n of component k."""
    k = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    x_row = x_ptr + g * sxg
    mu_k = mu_ptr + g * smg + k * smk
    u_k = u_ptr + g * sug + k * suk
    c = tl.load(c_ptr + g * scg + k).to(ACC)
    lo = tl.load(off_ptr + g * (K + 1) + k)
    hi = tl.load(off_ptr + g * (K + 1) + k + 1)
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        m = offs < hi
        rows = tl.load(perm_ptr + g * N + offs, mask=m, other=0)
        flags = _row_flags(x_row, rows, m, D, sxn, BLOCK_N, BLOCK_C)
        q = _full_q(x_row, mu_k, u_k, rows, m, flags, D, sxn, BLOCK_N, BLOCK_C, ACC, ONE_C)
        tl.store(out_ptr + g * sog + rows, c - 0.5 * q, mask=m)


@_kernel
def _bwd_target_full_kernel(g_ptr, x_ptr, mu_ptr, u_ptr, perm_ptr, off_ptr, dx_ptr, py_ptr, pzy_ptr, pw_ptr,
                            N, K, D, sxg, sxn, smg, smk, sug, suk, sog, sdg, sdn,
                            ONE_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                            ACC: tl.constexpr):
    """For the points n of component k (w_n = upstream gradient, 0 for dead rows; g_ptr holds it
    already masked): ∂x_n = −w_n U_k y_n into dx [G, N, D] (rows owned here), and the sums
    pw = Σ w [G, K], py = Σ w y [G, K, D] (∂μ_k = U_k py), pzy = Σ w z yᵀ [G, K, D, D].  dx, py
    and pzy are zero-initialised when D spans several blocks (they accumulate in place)."""
    k = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    x_row = x_ptr + g * sxg
    mu_k = mu_ptr + g * smg + k * smk
    u_k = u_ptr + g * sug + k * suk
    row = g * K + k
    py_row = py_ptr + row * D
    pzy_row = pzy_ptr + row * D * D
    lo = tl.load(off_ptr + g * (K + 1) + k)
    hi = tl.load(off_ptr + g * (K + 1) + k + 1)
    wsum = tl.zeros((BLOCK_N,), ACC)
    acc_y = tl.zeros((BLOCK_C,), ACC)
    acc_zy = tl.zeros((BLOCK_C, BLOCK_C), ACC)
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        m = offs < hi
        rows = tl.load(perm_ptr + g * N + offs, mask=m, other=0)
        w = tl.load(g_ptr + g * sog + rows, mask=m, other=0.0).to(ACC)
        wsum += w
        dx_row = dx_ptr + g * sdg + rows[:, None].to(tl.int64) * sdn
        if ONE_C:
            z, u = _full_zu(x_row, mu_k, u_k, rows, m, 0, 0, D, sxn, BLOCK_C, ACC)
            y = tl.dot(z, u, input_precision="ieee", out_dtype=ACC)
            wy, acc_y, acc_zy = _full_acc_one(z, y, w, acc_y, acc_zy, ACC)
            offs_d = tl.arange(0, BLOCK_C)
            tl.store(dx_row + offs_d[None, :], -tl.dot(wy, tl.trans(u), input_precision="ieee", out_dtype=ACC),
                     mask=m[:, None] & (offs_d < D)[None, :])
        else:
            for e0 in range(0, D, BLOCK_C):
                _full_acc_chunk(x_row, mu_k, u_k, rows, m, w, e0, D, sxn, py_row, pzy_row, dx_row,
                                True, BLOCK_N, BLOCK_C, ACC)
    _full_acc_store(pw_ptr, row, wsum, py_row, pzy_row, acc_y, acc_zy, D, ONE_C, BLOCK_C)


# --- kernels: one component per point (NGMG with target), diag and spherical ------------------

@triton.jit
def _target_z(x_row, mu_g, s_g, t, offs_n, mask_n, d0, D, sxn, smk, ssk,
              SPHERICAL: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """z = x − μ_t and (z s_t, the [N, D] mask, d offsets) for dimensions d0 … d0+BLOCK_D,
    gathering each point's own component t."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    msk = mask_n[:, None] & (offs_d < D)[None, :]
    xt = tl.load(x_row + offs_n[:, None].to(tl.int64) * sxn + offs_d[None, :], mask=msk, other=0.0).to(ACC)
    kd = t[:, None] * smk + offs_d[None, :]
    z = xt - tl.load(mu_g + kd, mask=msk, other=0.0).to(ACC)
    if SPHERICAL:
        s = tl.load(s_g + t * ssk, mask=mask_n, other=0.0).to(ACC)[:, None]
    else:
        s = tl.load(s_g + kd, mask=msk, other=0.0).to(ACC)
    return z, s, msk, offs_d


@_kernel
def _fwd_target_kernel(x_ptr, mu_ptr, s_ptr, t_ptr, c_ptr, out_ptr, N, D,
                       sxg, sxn, smg, smk, ssg, ssk, scg, sog,
                       SPHERICAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       ACC: tl.constexpr):
    """log N(x_n; μ_t, Σ_t) = c_t − ½‖(x_n − μ_t) s_t‖², t = target[g, n]."""
    pid_n = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    t = tl.load(t_ptr + g * sog + offs_n, mask=mask_n, other=0)
    q = tl.zeros((BLOCK_N,), ACC)
    for d0 in range(0, D, BLOCK_D):
        z, s, msk, offs_d = _target_z(x_ptr + g * sxg, mu_ptr + g * smg, s_ptr + g * ssg, t, offs_n, mask_n,
                                      d0, D, sxn, smk, ssk, SPHERICAL, BLOCK_D, ACC)
        y = z * s
        q += tl.sum(y * y, axis=1)
    c = tl.load(c_ptr + g * scg + t, mask=mask_n, other=0.0).to(ACC)
    tl.store(out_ptr + g * sog + offs_n, c - 0.5 * q, mask=mask_n)


@_kernel
def _bwd_target_kernel(g_ptr, lp_ptr, x_ptr, mu_ptr, s_ptr, t_ptr, lz_ptr, zz_ptr, N, D,
                       sxg, sxn, smg, smk, ssg, ssk, sog,
                       SPHERICAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       ACC: tl.constexpr):
    """Per point: lz = w s_t² z (= −∂x_n, and point n's share of ∂μ_t) into [G, N, D], and
    w y² [G, N, D] with y = s_t z (spherical: w ‖y‖² [G, N]); w = g_n, 0 for dead rows."""
    pid_n = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    t = tl.load(t_ptr + g * sog + offs_n, mask=mask_n, other=0)
    w, _ = _row_weights(g_ptr + g * sog, lp_ptr + g * sog, offs_n, mask_n, ACC)
    zz_sph = tl.zeros((BLOCK_N,), ACC)
    row = (g * N + offs_n).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        z, s, msk, offs_d = _target_z(x_ptr + g * sxg, mu_ptr + g * smg, s_ptr + g * ssg, t, offs_n, mask_n,
                                      d0, D, sxn, smk, ssk, SPHERICAL, BLOCK_D, ACC)
        z = tl.where((w != 0)[:, None], z, 0.0)
        wz = w[:, None] * z
        y = z * s
        tl.store(lz_ptr + row[:, None] * D + offs_d[None, :], wz * s * s, mask=msk)
        if SPHERICAL:
            zz_sph += tl.sum(w[:, None] * y * y, axis=1)
        else:
            tl.store(zz_ptr + row[:, None] * D + offs_d[None, :], w[:, None] * y * y, mask=msk)
    if SPHERICAL:
        tl.store(zz_ptr + row, zz_sph, mask=mask_n)


@_kernel
def _segment_sum_kernel(src_ptr, perm_ptr, off_ptr, out_ptr, N, K, W,
                        BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, ACC: tl.constexpr):
    """out[g, k, :] = Σ over the points of component k (rows perm[g, off[g,k] : off[g,k+1]]) of
    src[g, row, :] — a fixed-order, atomic-free scatter-add of [G, N, W] into [G, K, W]."""
    k = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    lo = tl.load(off_ptr + g * (K + 1) + k)
    hi = tl.load(off_ptr + g * (K + 1) + k + 1)
    for w0 in range(0, W, BLOCK_W):
        offs_w = w0 + tl.arange(0, BLOCK_W)
        mask_w = offs_w < W
        acc = tl.zeros((BLOCK_W,), ACC)
        for n0 in range(lo, hi, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            m = offs < hi
            rows = tl.load(perm_ptr + g * N + offs, mask=m, other=0)
            v = tl.load(src_ptr + (g * N + rows)[:, None] * W + offs_w[None, :],
                        mask=m[:, None] & mask_w[None, :], other=0.0).to(ACC)
            acc += tl.sum(v, axis=0)
        tl.store(out_ptr + (g * K + k) * W + offs_w, acc, mask=mask_w)


# --- host side: launchers -------------------------------------------------------------------

class _Interpreted:
    """A launch under the CPU interpreter: like ``wrap_triton`` it does nothing on fake tensors
    (fake-tensor tracing of the host code derives the op's meta implementation)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            from torch._subclasses.fake_tensor import is_fake

            if any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
                return None
            return self.kernel[grid](*args, **kwargs)

        return run


def _launch(kernel):
    """``torch.library.wrap_triton`` so torch.compile sees the launch; under the CPU
    interpreter (CPU tensors, which wrap_triton does not take) a plain launch."""
    if interpreted():
        return _Interpreted(kernel)
    return torch.library.wrap_triton(kernel)


def _acc(dtype):
    """(Triton, torch) accumulation dtypes for inputs of ``dtype`` (``_math.acc_dtype``)."""
    acc = acc_dtype(dtype)
    return (tl.float64 if acc == torch.float64 else tl.float32), acc


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _blocks(cov: str, D: int, acc: torch.dtype = torch.float32) -> dict:
    """Block shapes per covariance type, D and accumulation dtype (module docstring).
    full: the D×D product in BLOCK_C × BLOCK_C blocks, one block up to FULL_ONE_MAX (ONE_C);
    diag/spherical (and the target kernels): [BLOCK_N, BLOCK_K, BLOCK_D] tiles, half the
    components per tile in float64 (twice the registers per value)."""
    if cov == "full":
        bc = max(16, _pow2(D)) if D <= FULL_ONE_MAX else FULL_CHUNK
        return dict(BLOCK_N=32, BLOCK_C=bc, ONE_C=D <= bc, num_warps=8 if bc >= 64 or D > bc else 4)
    bd = 4 if D <= 4 else 16
    return dict(BLOCK_N=32, BLOCK_K=8 if acc == torch.float64 else 16, BLOCK_D=bd, num_warps=4)


def _constants(means, prec, logits, cov, acc, normalize=False):
    """a_k = log π_k + log|U_k| − D/2 log 2π, [G, K] in the accumulation dtype; ``normalize``:
    a_k − c, NGMG's normaliser inside (``_math.ngmg_const``)."""
    const = ngmg_const if normalize else component_const
    return const(prec.to(acc), logits.to(acc), cov, means.shape[-1]).contiguous()


def _target_consts(means, prec, cov, acc, normalize=False):
    """c_k = log|U_k| − D/2 log 2π, [G, K] in the accumulation dtype; 0 with ``normalize``
    (NGMG's log p̃ = −½q_t: the log-normaliser is never added, so never cancelled)."""
    if normalize:
        return torch.zeros(means.shape[:2], dtype=acc, device=means.device)
    return component_lognorm(prec.to(acc), cov, means.shape[-1]).contiguous()


def _strides(x, means, prec, cov, G):
    Gx, N, D = x.shape
    K = means.shape[1]
    sxg = N * D if (Gx == G and G > 1) else 0
    if cov == "full":
        return sxg, D, K * D, D, K * D * D, D * D
    if cov == "spherical":
        return sxg, D, K * D, D, K, 1
    return sxg, D, K * D, D, K * D, D


def log_prob_fwd(x, means, prec, logits, cov, normalize=False):
    """log p ``[G, N]`` in the accumulation dtype (canonical layout); ``normalize``: NGMG's
    log p̃ = log p − c, with c inside the logsumexp."""
    G, K, D = means.shape
    N = x.shape[1]
    _, acc = _acc(x.dtype)
    x, means, prec = x.contiguous(), means.contiguous(), prec.contiguous()
    a = _constants(means, prec, logits, cov, acc, normalize)
    out = torch.empty(G, N, dtype=acc, device=x.device)
    if N == 0 or G == 0:
        return out
    if K == 0:
        return out.fill_(float("-inf"))
    _forward(x, means, prec, a, out, cov)
    return out


def _forward(x, means, prec, a, out, cov, lp=None):
    """The forward kernel over contiguous inputs: log p into ``out`` [G, N], or with ``lp`` (the
    saved log p) the residual δ of ``_lse_residual`` (for the backward)."""
    G, K, D = means.shape
    N = x.shape[1]
    acc_tl, acc = _acc(x.dtype)
    sxg, sxn, smg, smk, spg, spk = _strides(x, means, prec, cov, G)
    b = _blocks(cov, D, acc)
    grid = (triton.cdiv(N, b["BLOCK_N"]), G)
    args = (x, means, prec, a, out, out if lp is None else lp, N, K, D, sxg, sxn, smg, smk, spg, spk, K, N)
    if cov == "full":
        _launch(_fwd_full_kernel)[grid](*args, ONE_C=b["ONE_C"], BLOCK_N=b["BLOCK_N"], BLOCK_C=b["BLOCK_C"],
                                        ACC=acc_tl, RESID=lp is not None, num_warps=b["num_warps"])
    else:
        _launch(_fwd_diag_kernel)[grid](*args, SPHERICAL=cov == "spherical", BLOCK_N=b["BLOCK_N"],
                                        BLOCK_K=b["BLOCK_K"], BLOCK_D=b["BLOCK_D"], ACC=acc_tl,
                                        RESID=lp is not None, num_warps=b["num_warps"])


# Tests set this to force the number of point splits of the parameter-gradient kernel (the
# interpreter otherwise always uses 1, and the split-and-sum path would never run on a CPU).
FORCE_SPLITS = None


def _splits(N, K, D, G, cov, block_n, block_k, elem):
    """How many point splits the parameter-gradient kernel uses (see module docstring)."""
    if FORCE_SPLITS is not None:
        return max(1, min(int(FORCE_SPLITS), triton.cdiv(max(N, 1), block_n)))
    if interpreted():
        return 1
    k_tiles = K if cov == "full" else triton.cdiv(K, block_k)
    want = max(1, triton.cdiv(1024, max(1, k_tiles * G)))
    per = G * K * (D * D + D + 1 if cov == "full" else 2 * D + 1) * elem
    return max(1, min(want, triton.cdiv(N, block_n), _PARTIAL_BYTES // max(per, 1)))


def log_prob_bwd(grad, x, means, prec, logits, logp, cov, normalize=False):
    """Gradients (x, means, prec_chol, logits) of Σ grad·log p, each in its input's dtype
    (``normalize``: for the saved log p̃ of ``log_prob_fwd``; the same gradients)."""
    in_dtypes = [t.dtype for t in (x, means, prec, logits)]
    G, K, D = means.shape
    Gx, N, _ = x.shape
    acc_tl, acc = _acc(x.dtype)
    x, means, prec = x.contiguous(), means.contiguous(), prec.contiguous()
    p = prec.to(acc).triu() if cov == "full" else prec.to(acc)
    a = _constants(means, prec, logits, cov, acc, normalize)
    live = torch.isfinite(logp)
    g = torch.where(live, grad.to(acc), 0.0).contiguous()
    lp = logp.to(acc).contiguous()
    # δ per point (_lse_residual): in float32 one more forward pass, so that r is the softmax of
    # the recomputed ℓ and not exp(ℓ − log p) with log p's rounding; float64 does not need it.
    dl = torch.zeros(G, N, dtype=acc, device=x.device)
    if acc == torch.float32 and N > 0 and K > 0 and G > 0:
        _forward(x, means, prec, a, dl, cov, lp=lp)
    b = _blocks(cov, D, acc)
    BN = b["BLOCK_N"]
    one_d = b["ONE_C"] if cov == "full" else D <= b["BLOCK_D"]  # ∂x in registers, else in place
    dx = (torch.empty if one_d else torch.zeros)(G, N, D, dtype=acc, device=x.device)
    S = _splits(N, K, D, G, cov, BN, b.get("BLOCK_K", 1), torch.finfo(acc).bits // 8)
    n_per = triton.cdiv(triton.cdiv(max(N, 1), S), BN) * BN
    pw = torch.zeros(S, G, K, dtype=acc, device=x.device)
    sxg, sxn, smg, smk, spg, spk = _strides(x, means, prec, cov, G)
    if N > 0 and K > 0 and G > 0:
        grid_x = (triton.cdiv(N, BN), G)
        if cov == "full":
            py = torch.zeros(S, G, K, D, dtype=acc, device=x.device)
            pzy = torch.zeros(S, G, K, D, D, dtype=acc, device=x.device)
            kw = dict(ONE_C=one_d, BLOCK_N=BN, BLOCK_C=b["BLOCK_C"], ACC=acc_tl, num_warps=b["num_warps"])
            _launch(_bwd_x_full_kernel)[grid_x](g, lp, dl, x, means, prec, a, dx, N, K, D, sxg, sxn, smg, smk,
                                                spg, spk, K, N, N * D, D, **kw)
            _launch(_bwd_param_full_kernel)[(K, S, G)](g, lp, dl, x, means, prec, a, py, pzy, pw, N, K, D, n_per,
                                                       sxg, sxn, smg, smk, spg, spk, K, N, **kw)
            W, Y, Szy = pw.sum(0), py.sum(0), pzy.sum(0)
            gmu = torch.einsum("gkde,gke->gkd", p, Y)
            gprec = finish_prec_grad(p, W, Szy, cov, D)
        else:
            sph = cov == "spherical"
            pz = torch.zeros(S, G, K, D, dtype=acc, device=x.device)
            pzz = torch.zeros((S, G, K) if sph else (S, G, K, D), dtype=acc, device=x.device)
            kw = dict(SPHERICAL=sph, ONE_D=one_d, BLOCK_N=BN, BLOCK_K=b["BLOCK_K"], BLOCK_D=b["BLOCK_D"], ACC=acc_tl,
                      num_warps=b["num_warps"])
            _launch(_bwd_x_diag_kernel)[grid_x](g, lp, dl, x, means, prec, a, dx, N, K, D, sxg, sxn, smg, smk,
                                                spg, spk, K, N, N * D, D, **kw)
            grid_p = (triton.cdiv(K, b["BLOCK_K"]), S, G)
            _launch(_bwd_param_diag_kernel)[grid_p](g, lp, dl, x, means, prec, a, pz, pzz, pw, N, K, D, n_per,
                                                    sxg, sxn, smg, smk, spg, spk, K, N, **kw)
            W, Sz, Szz = pw.sum(0), pz.sum(0), pzz.sum(0)
            s2 = p * p
            gmu = (s2 if not sph else s2[..., None]) * Sz
            gprec = finish_prec_grad(p, W, Szz, cov, D)
    else:
        dx.zero_()
        W = torch.zeros(G, K, dtype=acc, device=x.device)
        gmu = torch.zeros(G, K, D, dtype=acc, device=x.device)
        gprec = torch.zeros_like(p)
    gx = dx.sum(0, keepdim=True) if (Gx == 1 and G > 1) else dx
    glog = W - torch.softmax(logits.to(acc), -1) * g.sum(-1, keepdim=True)
    return tuple(t.to(d) for t, d in zip((gx, gmu, gprec, glog), in_dtypes))


def _segment_sum(src, perm, offsets, K, acc_tl):
    """[G, N, W] → [G, K, W] summed per component in the fixed order of ``perm`` (see kernel)."""
    G, N, W = src.shape
    out = torch.empty(G, K, W, dtype=src.dtype, device=src.device)
    if K and G:
        _launch(_segment_sum_kernel)[(K, G)](src, perm, offsets, out, N, K, W, BLOCK_N=32,
                                             BLOCK_W=16, ACC=acc_tl)
    return out


def _target_segments(target, K):
    """The points of each component, in a fixed order: ``perm`` [G, N] (a stable argsort of
    target) and ``offsets`` [G, K + 1] (component k's points are perm[g, off[g,k] : off[g,k+1]])."""
    G = target.shape[0]
    perm = torch.argsort(target, dim=-1, stable=True).contiguous()
    counts = torch.zeros(G, K, dtype=torch.int64, device=target.device).scatter_add_(1, target,
                                                                                    torch.ones_like(target))
    offsets = torch.cat([counts.new_zeros(G, 1), counts.cumsum(-1)], -1).contiguous()
    return perm, offsets


def log_prob_target_fwd(x, means, prec, target, cov, normalize=False):
    """log N(x_n; μ_t, Σ_t) [G, N] for t = target [G, N]; −½q_t with ``normalize``."""
    G, K, D = means.shape
    N = x.shape[1]
    acc_tl, acc = _acc(x.dtype)
    x, means, prec, target = x.contiguous(), means.contiguous(), prec.contiguous(), target.contiguous()
    out = torch.empty(G, N, dtype=acc, device=x.device)
    if N == 0 or G == 0:
        return out
    c = _target_consts(means, prec, cov, acc, normalize)
    sxg, sxn, smg, smk, spg, spk = _strides(x, means, prec, cov, G)
    if cov == "full":
        b = _blocks(cov, D, acc)
        perm, offsets = _target_segments(target, K)
        _launch(_fwd_target_full_kernel)[(K, G)](x, means, prec, c, perm, offsets, out, N, K, D, sxg, sxn, smg,
                                                 smk, spg, spk, K, N, ONE_C=b["ONE_C"], BLOCK_N=b["BLOCK_N"],
                                                 BLOCK_C=b["BLOCK_C"], ACC=acc_tl, num_warps=b["num_warps"])
        return out
    BN, BD = 32, _blocks(cov, D, acc)["BLOCK_D"]
    _launch(_fwd_target_kernel)[(triton.cdiv(N, BN), G)](x, means, prec, target, c, out, N, D, sxg, sxn, smg, smk,
                                                         spg, spk, K, N, SPHERICAL=cov == "spherical",
                                                         BLOCK_N=BN, BLOCK_D=BD, ACC=acc_tl)
    return out


def log_prob_target_bwd(grad, x, means, prec, target, logp, cov, normalize=False):
    """Gradients (x, means, prec_chol) of Σ grad·log N(x_n; μ_t, Σ_t): per-point terms from one
    kernel, summed per component by the fixed-order segment sum (sorted by target: no atomics)."""
    in_dtypes = [t.dtype for t in (x, means, prec)]
    G, K, D = means.shape
    Gx, N, _ = x.shape
    acc_tl, acc = _acc(x.dtype)
    x, means, prec, target = x.contiguous(), means.contiguous(), prec.contiguous(), target.contiguous()
    sph = cov == "spherical"
    w = torch.where(torch.isfinite(logp), grad.to(acc), 0.0).contiguous()
    perm, offsets = _target_segments(target, K)
    if cov == "full":
        b = _blocks(cov, D, acc)
        launch = bool(N and G and K)
        # one block: the kernel writes every element; past it, the blocks accumulate in place
        new = torch.empty if (launch and b["ONE_C"]) else torch.zeros
        dx = new(G, N, D, dtype=acc, device=x.device)
        py = new(G, K, D, dtype=acc, device=x.device)
        pzy = new(G, K, D, D, dtype=acc, device=x.device)
        W = torch.zeros(G, K, dtype=acc, device=x.device)
        if launch:
            sxg, sxn, smg, smk, spg, spk = _strides(x, means, prec, cov, G)
            _launch(_bwd_target_full_kernel)[(K, G)](w, x, means, prec, perm, offsets, dx, py, pzy, W, N, K, D,
                                                     sxg, sxn, smg, smk, spg, spk, N, N * D, D, ONE_C=b["ONE_C"],
                                                     BLOCK_N=b["BLOCK_N"], BLOCK_C=b["BLOCK_C"], ACC=acc_tl,
                                                     num_warps=b["num_warps"])
        p = prec.to(acc).triu()
        gmu = torch.einsum("gkde,gke->gkd", p, py)
        gprec = finish_prec_grad(p, W, pzy, cov, D)
        gx = dx.sum(0, keepdim=True) if (Gx == 1 and G > 1) else dx
        return tuple(t.to(d) for t, d in zip((gx, gmu, gprec), in_dtypes))
    lz = torch.empty(G, N, D, dtype=acc, device=x.device)
    zz = torch.empty((G, N, 1) if sph else (G, N, D), dtype=acc, device=x.device)
    if N and G:
        sxg, sxn, smg, smk, spg, spk = _strides(x, means, prec, cov, G)
        BN, BD = 32, _blocks(cov, D, acc)["BLOCK_D"]
        _launch(_bwd_target_kernel)[(triton.cdiv(N, BN), G)](w, logp.contiguous(), x, means, prec, target, lz, zz,
                                                             N, D, sxg, sxn, smg, smk, spg, spk, N,
                                                             SPHERICAL=sph, BLOCK_N=BN, BLOCK_D=BD, ACC=acc_tl)
    gmu = _segment_sum(lz, perm, offsets, K, acc_tl)
    S = _segment_sum(zz, perm, offsets, K, acc_tl)
    W = _segment_sum(w.unsqueeze(-1), perm, offsets, K, acc_tl)[..., 0]
    gprec = finish_prec_grad(prec.to(acc), W, S[..., 0] if sph else S, cov, D)
    gx = -lz.sum(0, keepdim=True) if (Gx == 1 and G > 1) else -lz
    return tuple(t.to(d) for t, d in zip((gx, gmu, gprec), in_dtypes))


# --- op registration and autograd -------------------------------------------------------------



@torch.library.triton_op("fastgmmdiff::log_prob_triton", mutates_args=())
def log_prob_triton(x: Tensor, means: Tensor, prec_chol: Tensor, logits: Tensor,
                    covariance_type: str, normalize: bool = False) -> Tensor:
    return log_prob_fwd(x, means, prec_chol, logits, covariance_type, normalize)


@torch.library.triton_op("fastgmmdiff::log_prob_triton_backward", mutates_args=())
def log_prob_triton_backward(grad: Tensor, x: Tensor, means: Tensor, prec_chol: Tensor, logits: Tensor,
                             logp: Tensor, covariance_type: str, normalize: bool = False
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return log_prob_bwd(grad, x, means, prec_chol, logits, logp, covariance_type, normalize)


# triton_op derives the fake (meta) implementations by tracing the host code; only autograd is
# registered here.
register_log_prob_op("fastgmmdiff::log_prob_triton", "fastgmmdiff::log_prob_triton_backward", fakes=False)


@torch.library.triton_op("fastgmmdiff::log_prob_target_triton", mutates_args=())
def log_prob_target_triton(x: Tensor, means: Tensor, prec_chol: Tensor, target: Tensor,
                           covariance_type: str, normalize: bool = False) -> Tensor:
    return log_prob_target_fwd(x, means, prec_chol, target, covariance_type, normalize)


@torch.library.triton_op("fastgmmdiff::log_prob_target_triton_backward", mutates_args=())
def log_prob_target_triton_backward(grad: Tensor, x: Tensor, means: Tensor, prec_chol: Tensor, target: Tensor,
                                    logp: Tensor, covariance_type: str, normalize: bool = False
                                    ) -> tuple[Tensor, Tensor, Tensor]:
    return log_prob_target_bwd(grad, x, means, prec_chol, target, logp, covariance_type, normalize)


register_target_op("fastgmmdiff::log_prob_target_triton", "fastgmmdiff::log_prob_target_triton_backward",
                   fakes=False)
