"""The ``"torch"`` backend: fused-by-formula log-density forward and backward in plain PyTorch.

Runs on any device PyTorch runs on.  It follows the same plan as the compiled kernels, with
PyTorch tensor ops in place of a kernel:

* forward: for each chunk of points, ℓ_nk = a_k − ½‖U_kᵀ(x_n − μ_k)‖² with
  a_k = log π_k + Σ_d log U_k[d,d] − D/2·log 2π, then log p_n = logsumexp_k ℓ_nk.
  Only log p (N floats per mixture) is kept.
* backward: recompute ℓ for the chunk, r_nk = softmax_k ℓ_nk (= exp(ℓ_nk − log p_n), computed
  from the row's maximum and sum so that log p's rounding does not enter), w_nk = g_n r_nk and the
  gradients of SPEC §1 written out by hand (no autograd through the chunk):

      ∂x_n = −Σ_k w_nk Λ_k z_nk            ∂μ_k = Σ_n w_nk Λ_k z_nk
      ∂logits_k = Σ_n w_nk − π_k Σ_n g_n
      diag  ∂s_kd = Σ_n w_nk (1/s_kd − s_kd z²_nkd)
      sph.  ∂s_k  = Σ_n w_nk (D/s_k − s_k ‖z_nk‖²)
      full  ∂U_k  = triu(diag(Σ_n w_nk / U_k[d,d]) − Σ_n w_nk z_nk y_nkᵀ),  y = U_kᵀ z

Chunks hold at most ``_CHUNK_ELEMS`` elements of the [G, C, K, D] intermediate, so memory is
O(G·C·K·D) for a fixed budget instead of O(N·K·D).

−inf rows: a row whose every ℓ is −inf has log p = −inf; its upstream gradient is zeroed, so it
contributes nothing anywhere.  Inside a live row a component with r = 0 is masked out before
any product with z, so an overflowing distance (z² = inf) never meets a zero (0·inf = NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._autograd import register_log_prob_op, register_target_op
from ._math import acc_dtype, component_const, component_lognorm, finish_prec_grad, ngmg_const

_CHUNK_ELEMS = 1 << 22  # elements of the [G, C, K, D] intermediate per chunk (16 MiB in fp32)


def _chunk(G: int, K: int, D: int) -> int:
    return max(1, _CHUNK_ELEMS // max(1, G * K * D))


def _quad(z: Tensor, prec: Tensor, cov: str):
    """For z [G, C, K, D]: (y, q) with y = U_kᵀ z (None for spherical) and q = ‖y‖²."""
    if cov == "diag":
        y = z * prec[:, None]
        return y, (y * y).sum(-1)
    if cov == "spherical":
        y = z * prec[:, None, :, None]  # scaled before the square: z² overflows first
        return y, (y * y).sum(-1)
    y = torch.einsum("gckd,gkde->gcke", z, prec)
    return y, _far_is_inf((y * y).sum(-1), z)


def _far_is_inf(q: Tensor, z: Tensor) -> Tensor:
    """Full covariance: q = ‖Uᵀz‖² is NaN where Uᵀz met an infinite coordinate (inf · 0) or
    overflowed (inf − inf); that point is infinitely far (q = +inf: ℓ = −inf, a dead row where
    every component is so).  A NaN coordinate stays NaN."""
    return torch.where(q.isnan() & ~z.isnan().any(-1), float("inf"), q)


def _prepare(x, means, prec, logits, cov, normalize=False):
    """Inputs in the accumulation dtype and the constants a_k (``normalize``: a_k − c, NGMG's
    normaliser inside, _math.ngmg_const)."""
    dt = acc_dtype(x.dtype)
    x, means, prec, logits = (t.to(dt) for t in (x, means, prec, logits))
    if cov == "full":
        prec = prec.triu()
    D = means.shape[-1]
    const = (ngmg_const if normalize else component_const)(prec, logits, cov, D)
    return x, means, prec, logits, const


def log_prob_fwd(x: Tensor, means: Tensor, prec: Tensor, logits: Tensor, cov: str,
                 normalize: bool = False) -> Tensor:
    """log p: [G, N] in the accumulation dtype (canonical layout, see _checks); ``normalize``:
    log p̃ = log p − c (SPEC §2), with c inside the logsumexp."""
    x, means, prec, logits, const = _prepare(x, means, prec, logits, cov, normalize)
    G, K, D = means.shape
    N = x.shape[1]
    out = torch.empty(G, N, dtype=x.dtype, device=x.device)
    C = _chunk(G, K, D)
    for n0 in range(0, N, C):
        z = x[:, n0:n0 + C, None, :] - means[:, None]
        _, q = _quad(z, prec, cov)
        out[:, n0:n0 + C] = torch.logsumexp(const[:, None, :] - 0.5 * q, -1)
    return out


def component_log_prob(x: Tensor, means: Tensor, prec: Tensor, logits: Tensor, cov: str) -> Tensor:
    """ℓ_nk (log π_k + log N(x_n; μ_k, Σ_k)): [G, N, K] in the accumulation dtype, differentiable
    (plain autograd), computed in chunks of points so the [G, C, K, D] work space stays bounded.
    The N·K result is the point (responsibilities, ``MixtureOfGaussians.posterior``)."""
    x, means, prec, logits, const = _prepare(x, means, prec, logits, cov)
    G, K, D = means.shape
    N = x.shape[1]
    C = _chunk(G, K, D)
    parts = []
    for n0 in range(0, N, C):
        z = x[:, n0:n0 + C, None, :] - means[:, None]
        _, q = _quad(z, prec, cov)
        parts.append(const[:, None, :] - 0.5 * q)
    return torch.cat(parts, 1) if parts else x.new_zeros(G, 0, K)


def log_prob_bwd(grad: Tensor, x: Tensor, means: Tensor, prec: Tensor, logits: Tensor,
                 logp: Tensor, cov: str, normalize: bool = False):
    """Gradients (x, means, prec_chol, logits) of Σ grad·log p, each in its input's dtype
    (c is a constant: ``normalize`` gives the same gradients, for the saved log p̃)."""
    in_dtypes = [t.dtype for t in (x, means, prec, logits)]
    x, means, prec, logits, const = _prepare(x, means, prec, logits, cov, normalize)
    G, K, D = means.shape
    Gx, N, _ = x.shape
    dead = ~torch.isfinite(logp)  # −inf rows (NaN rows come from NaN inputs)
    g = torch.where(dead, 0.0, grad.to(x.dtype))

    gx = torch.empty(Gx, N, D, dtype=x.dtype, device=x.device)
    gmu = torch.zeros_like(means)
    S = torch.zeros_like(prec)  # Σ w y² | Σ w ‖y‖² (y = s z) | Σ w z yᵀ
    W = torch.zeros(G, K, dtype=x.dtype, device=x.device)  # Σ_n w_nk
    C = _chunk(G, K, D)
    for n0 in range(0, N, C):
        n1 = min(N, n0 + C)
        z = x[:, n0:n1, None, :] - means[:, None]
        y, q = _quad(z, prec, cov)
        # r = softmax over k of the row's ℓ (its maximum and sum), not exp(ℓ − log p): the
        # saved log p's float32 rounding (~1e-4 at |log p| ~ 1e3) would be r's relative error.
        r = torch.softmax(const[:, None, :] - 0.5 * q, -1)
        r = torch.where(dead[:, n0:n1, None], 0.0, r)  # −inf rows: softmax is NaN, and g = 0 there
        w = g[:, n0:n1, None] * r  # [G, C, K]
        live = (w != 0)[..., None]
        zm = torch.where(live, z, 0.0)  # masked: finite wherever it is used
        wz = w[..., None] * zm
        if cov == "full":
            wym = w[..., None] * torch.where(live, y, 0.0)
            wlz = torch.einsum("gkde,gcke->gckd", prec, wym)  # w Λ z = w U Uᵀ z
            S += torch.einsum("gckd,gcke->gkde", zm, wym)
        else:
            s2 = (prec * prec)[:, None]
            wlz = wz * (s2 if cov == "diag" else s2[..., None])
            ym = torch.where(live, y, 0.0)
            wyy = w[..., None] * ym * ym
            S += wyy.sum(1) if cov == "diag" else wyy.sum((1, 3))
        gxc = -wlz.sum(2)
        gx[:, n0:n1] = gxc.sum(0, keepdim=True) if Gx == 1 and G > 1 else gxc
        gmu += wlz.sum(1)
        W += w.sum(1)

    gprec = finish_prec_grad(prec, W, S, cov, D)
    glog = W - torch.softmax(logits, -1) * g.sum(-1, keepdim=True)
    return tuple(t.to(d) for t, d in zip((gx, gmu, gprec, glog), in_dtypes))


def _gather_target(means: Tensor, prec: Tensor, target: Tensor):
    """μ_t [G, N, D] and U_t ([G, N, D] | [G, N] | [G, N, D, D]) for t = target [G, N]."""
    G, N = target.shape
    D = means.shape[-1]
    mu = torch.gather(means, 1, target[..., None].expand(G, N, D))
    tail = prec.shape[2:]
    idx = target.reshape(G, N, *([1] * len(tail))).expand(G, N, *tail)
    return mu, torch.gather(prec, 1, idx)


def log_prob_target_fwd(x: Tensor, means: Tensor, prec: Tensor, target: Tensor, cov: str,
                        normalize: bool = False) -> Tensor:
    """log N(x_n; μ_t, Σ_t) [G, N], t = target[g, n] (the other components are never read);
    ``normalize``: −½q_t, NGMG's log p̃ with a target (the log-normaliser never added, so never
    cancelled)."""
    dt = acc_dtype(x.dtype)
    x, means, prec = (t.to(dt) for t in (x, means, prec))
    if cov == "full":
        prec = prec.triu()
    G, K, D = means.shape
    mu, pt = _gather_target(means, prec, target)
    z = x.expand(G, -1, -1) - mu
    if cov == "diag":
        q = ((z * pt) ** 2).sum(-1)
    elif cov == "spherical":
        q = ((z * pt[..., None]) ** 2).sum(-1)
    else:
        q = _far_is_inf((torch.einsum("gnd,gnde->gne", z, pt) ** 2).sum(-1), z)
    if normalize:
        return -0.5 * q
    return component_lognorm(prec, cov, D).gather(1, target) - 0.5 * q


def log_prob_target_bwd(grad: Tensor, x: Tensor, means: Tensor, prec: Tensor, target: Tensor,
                        logp: Tensor, cov: str, normalize: bool = False):
    """Gradients (x, means, prec_chol) of Σ grad·log N(x_n; μ_t, Σ_t)."""
    in_dtypes = [t.dtype for t in (x, means, prec)]
    dt = acc_dtype(x.dtype)
    x, means, prec = (t.to(dt) for t in (x, means, prec))
    if cov == "full":
        prec = prec.triu()
    G, K, D = means.shape
    Gx = x.shape[0]
    w = torch.where(torch.isfinite(logp), grad.to(dt), 0.0)  # [G, N]
    mu, pt = _gather_target(means, prec, target)
    z = torch.where((w != 0)[..., None], x.expand(G, -1, -1) - mu, 0.0)
    if cov == "full":
        y = torch.einsum("gnd,gnde->gne", z, pt)
        lz = w[..., None] * torch.einsum("gnde,gne->gnd", pt, y)
        zy = w[..., None, None] * z[..., :, None] * y[..., None, :]
    else:
        s2 = pt * pt if cov == "diag" else (pt * pt)[..., None]
        lz = (w[..., None] * z) * s2  # w s² first can overflow and meet z = 0
        y = z * (pt if cov == "diag" else pt[..., None])  # S takes y = s z (_math.finish_prec_grad)
        zy = w[..., None] * y * y if cov == "diag" else w * (y * y).sum(-1)
    idx = target[..., None].expand_as(lz)
    gmu = torch.zeros_like(means).scatter_add_(1, idx, lz)
    sidx = target.reshape(*target.shape, *([1] * (zy.dim() - 2))).expand_as(zy)
    S = torch.zeros_like(prec).scatter_add_(1, sidx, zy)
    W = torch.zeros(G, K, dtype=dt, device=x.device).scatter_add_(1, target, w)
    gx = -lz.sum(0, keepdim=True) if Gx == 1 and G > 1 else -lz
    gprec = finish_prec_grad(prec, W, S, cov, D)
    return tuple(t.to(d) for t, d in zip((gx, gmu, gprec), in_dtypes))


# --- op registration -------------------------------------------------------------------------

@torch.library.custom_op("fastgmmdiff::log_prob_torch", mutates_args=())
def log_prob_torch(x: Tensor, means: Tensor, prec_chol: Tensor, logits: Tensor,
                   covariance_type: str, normalize: bool = False) -> Tensor:
    return log_prob_fwd(x, means, prec_chol, logits, covariance_type, normalize)


@torch.library.custom_op("fastgmmdiff::log_prob_torch_backward", mutates_args=())
def log_prob_torch_backward(grad: Tensor, x: Tensor, means: Tensor, prec_chol: Tensor,
                            logits: Tensor, logp: Tensor, covariance_type: str, normalize: bool = False
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return log_prob_bwd(grad, x, means, prec_chol, logits, logp, covariance_type, normalize)


register_log_prob_op("fastgmmdiff::log_prob_torch", "fastgmmdiff::log_prob_torch_backward")


@torch.library.custom_op("fastgmmdiff::log_prob_target_torch", mutates_args=())
def log_prob_target_torch(x: Tensor, means: Tensor, prec_chol: Tensor, target: Tensor,
                          covariance_type: str, normalize: bool = False) -> Tensor:
    return log_prob_target_fwd(x, means, prec_chol, target, covariance_type, normalize)


@torch.library.custom_op("fastgmmdiff::log_prob_target_torch_backward", mutates_args=())
def log_prob_target_torch_backward(grad: Tensor, x: Tensor, means: Tensor, prec_chol: Tensor,
                                   target: Tensor, logp: Tensor, covariance_type: str, normalize: bool = False
                                   ) -> tuple[Tensor, Tensor, Tensor]:
    return log_prob_target_bwd(grad, x, means, prec_chol, target, logp, covariance_type, normalize)


register_target_op("fastgmmdiff::log_prob_target_torch", "fastgmmdiff::log_prob_target_torch_backward")
