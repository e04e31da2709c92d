"""Plain-PyTorch implementations of the two functions: the oracle for tests and the naive peers
for benchmarks.

These are the code users would write themselves.  Autograd differentiates them; they
materialise N·K (both forms) and N·K·D (the broadcast form) and make no attempt at the
−inf-row guarantees of the package's own ops.  Run them in float64 to get a reference.

Forms
-----
``"broadcast"``
    z = x − μ_k for every (n, k), then the quadratic form: the textbook formula.
``"matmul"``
    scikit-learn's expansion.  diag/spherical:
    ‖s ⊙ (x − μ)‖² = (x²)·(s²) − 2 x·(s² ⊙ μ) + Σ s² μ², three GEMM-shaped products;
    full: y = x U_k − μ_k U_k per component (one batched matmul).
    The expansion loses digits when ‖x‖ ≫ σ (see SPEC §1, "Numerics").

Shapes and conventions are those of :func:`fastgmmdiff.gmm_log_prob` (SPEC §1); the G axis
broadcasts by ordinary PyTorch broadcasting.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_covariance_type, check_reduction, reduce

FORMS = ("broadcast", "matmul")
LOG_2PI = math.log(2.0 * math.pi)


def _upper(prec_chol: torch.Tensor, covariance_type: str) -> torch.Tensor:
    """Upper triangle of a full/tied factor, with tied given a K axis."""
    U = prec_chol.triu()
    return U.unsqueeze(-3) if covariance_type == "tied" else U


def log_det(prec_chol: torch.Tensor, covariance_type: str, D: int) -> torch.Tensor:
    """Σ_d log U[d, d] per component: shape [(G,) K] ([(G,) 1] for tied)."""
    if covariance_type == "diag":
        return prec_chol.log().sum(-1)
    if covariance_type == "spherical":
        return D * prec_chol.log()
    d = torch.diagonal(prec_chol, dim1=-2, dim2=-1).log().sum(-1)
    return d.unsqueeze(-1) if covariance_type == "tied" else d


def _sq_broadcast(x, means, prec_chol, covariance_type):
    z = x.unsqueeze(-2) - means.unsqueeze(-3)  # [..., N, K, D]
    if covariance_type == "diag":
        return ((z * prec_chol.unsqueeze(-3)) ** 2).sum(-1)
    if covariance_type == "spherical":
        return (z * z).sum(-1) * (prec_chol**2).unsqueeze(-2)
    U = _upper(prec_chol, covariance_type)  # [..., K, D, D]
    y = (z.unsqueeze(-2) @ U.unsqueeze(-4)).squeeze(-2)  # Uᵀz as a row: z U
    return (y * y).sum(-1)


def _sq_matmul(x, means, prec_chol, covariance_type):
    if covariance_type in ("diag", "spherical"):
        s2 = prec_chol**2
        if covariance_type == "spherical":
            s2 = s2.unsqueeze(-1).expand(means.shape)
        xx = (x * x) @ s2.transpose(-1, -2)  # [..., N, K]
        xm = x @ (s2 * means).transpose(-1, -2)
        mm = (s2 * means * means).sum(-1).unsqueeze(-2)
        return xx - 2.0 * xm + mm
    U = _upper(prec_chol, covariance_type)  # [..., K, D, D]
    y = x.unsqueeze(-3) @ U  # [..., K, N, D]
    y = y - (means.unsqueeze(-2) @ U)  # minus μ_k U_k, broadcast over N
    return (y * y).sum(-1).transpose(-1, -2)


def _sq(x, means, prec_chol, covariance_type, form):
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}; got {form!r}")
    return (_sq_broadcast if form == "broadcast" else _sq_matmul)(x, means, prec_chol, covariance_type)


def component_log_prob(x, means, prec_chol, logits, covariance_type="diag", form="broadcast"):
    """ℓ_nk = log π_k + log|U_k| − D/2 log 2π − ½‖U_kᵀ(x_n − μ_k)‖²: shape [..., N, K]."""
    check_covariance_type(covariance_type)
    D = means.shape[-1]
    sq = _sq(x, means, prec_chol, covariance_type, form)
    const = torch.log_softmax(logits, -1) + log_det(prec_chol, covariance_type, D) - 0.5 * D * LOG_2PI
    return const.unsqueeze(-2) - 0.5 * sq


def logsumexp(l, dim=-1):
    """m + log Σ exp(ℓ − m), m the (detached) maximum: its autograd gradient is the softmax of ℓ
    itself.  ``torch.logsumexp``'s backward is exp(ℓ − result), which takes the result's rounding:
    far out (|log p| ~ 1e17 in float64) that is larger than log K, and K tied components would
    each get r = 1 instead of 1/K — a wrong oracle, K× too steep."""
    m = l.detach().amax(dim, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return (m + torch.log(torch.exp(l - m).sum(dim, keepdim=True))).squeeze(dim)


def gmm_log_prob(x, means, prec_chol, logits, covariance_type="diag", form="broadcast"):
    """log p(x_n) = logsumexp_k ℓ_nk, shape [N] or [G, N] (SPEC §1)."""
    return logsumexp(component_log_prob(x, means, prec_chol, logits, covariance_type, form), -1)


def ngmg_log_normalizer(prec_chol, logits, covariance_type, D):
    """c = logsumexp_k(log π_k + log|U_k|) − D/2 log 2π per mixture (not detached here)."""
    a = torch.log_softmax(logits, -1) + log_det(prec_chol, covariance_type, D)
    return logsumexp(a, -1) - 0.5 * D * LOG_2PI


def ngmg_loss(z, means, prec_chol, logits, covariance_type="diag", *, target=None,
              normalize=True, reduction="mean", form="broadcast", scales=None):
    """The NGMG loss of SPEC §2, written the obvious way (autograd gives the NGMG); ``scales``:
    Σ_j s_j L_j / Σ_j s_j, L_j the normalised loss with U/s_j (``functional.ngmg_loss``)."""
    check_reduction(reduction)
    if scales is not None:
        total = sum(float(s) for s in scales)
        loss = 0
        for s in scales:
            loss = loss + float(s) / total * ngmg_loss(z, means, prec_chol / float(s), logits, covariance_type,
                                                       target=target, reduction="none", form=form)
        return reduce(loss, reduction)
    D = means.shape[-1]
    if target is None:
        logp = gmm_log_prob(z, means, prec_chol, logits, covariance_type, form)
        if normalize:
            c = ngmg_log_normalizer(prec_chol, logits, covariance_type, D).detach()
            logp = logp - c.unsqueeze(-1)
        return reduce(-torch.exp(logp), reduction)
    # One component per point: p = N(z; μ_t, Σ_t), and c = sg(log|U_t| − D/2 log 2π), so that
    # p̃ = exp(−½‖U_tᵀ(z − μ_t)‖²) in value while its gradient is −p̃ ∇ log N(z; μ_t, Σ_t).
    K = means.shape[-2]
    sq = _sq(z, means, prec_chol, covariance_type, form)
    idx = target.long().expand(sq.shape[:-1]).unsqueeze(-1)
    ld = log_det(prec_chol, covariance_type, D).expand(sq.shape[:-2] + (K,))
    ld_t = torch.gather(ld, -1, idx.squeeze(-1)) - 0.5 * D * LOG_2PI
    log_pt = ld_t - 0.5 * torch.gather(sq, -1, idx).squeeze(-1)
    if normalize:
        log_pt = log_pt - ld_t.detach()
    return reduce(-torch.exp(log_pt), reduction)
