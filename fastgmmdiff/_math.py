"""The backends' shared math (SPEC §1, §2), each formula written once for Python.

Used by the ``torch`` backend (``_torch_ops``), the Triton backend's host code
(``kernels/gmm.py``), the functional API (``functional``) and the fake kernels (``_autograd``).
The C++ and CUDA code has its own single home, ``csrc/gmm_math.h``.  ``reference.py`` does *not*
use this module on purpose: it is the independent oracle the tests compare against.

Notation: U_k is the precision Cholesky factor (diag/spherical: 1/σ), D the dimension,
π = softmax(logits).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float64 stays float64; every other floating dtype (float32,
    bfloat16, float16) accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def log_det(prec: Tensor, cov: str, D: int) -> Tensor:
    """log|U_k| = Σ_d log U_k[d, d] per component, [..., K] (canonical layout, no tied)."""
    if cov == "diag":
        return prec.log().sum(-1)
    if cov == "spherical":
        return D * prec.log()
    return torch.diagonal(prec, dim1=-2, dim2=-1).log().sum(-1)


def component_lognorm(prec: Tensor, cov: str, D: int) -> Tensor:
    """log N(μ_k; μ_k, Σ_k) = log|U_k| − D/2 log 2π, [..., K]: a component's log-normaliser."""
    return log_det(prec, cov, D) - 0.5 * D * LOG_2PI


def component_const(prec: Tensor, logits: Tensor, cov: str, D: int) -> Tensor:
    """a_k = log π_k + log|U_k| − D/2 log 2π, [..., K], so that ℓ_nk = a_k − ½‖U_kᵀ(x_n − μ_k)‖²."""
    return torch.log_softmax(logits, -1) + component_lognorm(prec, cov, D)


def ngmg_const(prec: Tensor, logits: Tensor, cov: str, D: int) -> Tensor:
    """a_k − c, [..., K]: the component constants with NGMG's normaliser inside, so that
    logsumexp_k(a_k − c − ½q_nk) is log p̃ itself (SPEC §2), never log p − c.

    Near a mean log p ≈ c, and |c| reaches hundreds (D·log U: 180 at D = 129, U = 10): log p
    rounded to float32 carries |c|·u of absolute error, which log p − c keeps and exp turns into
    p̃'s relative error (3e-5: over the 1e-5 bar).  Formed here as differences from the largest
    constant a_m — logit_k − logit_m plus Σ_d log(U_k[d,d] / U_m[d,d]) (``_log_ratio``), so
    that log π's normaliser and −D/2 log 2π cancel exactly and nothing of size |c| is rounded —
    minus logsumexp_k of those differences (≤ log K).  csrc/ops.h has the same for C++."""
    if cov == "spherical":
        u = prec[..., None]
    else:
        u = prec if cov == "diag" else torch.diagonal(prec, dim1=-2, dim2=-1)
    m = component_const(prec, logits, cov, D).argmax(-1, keepdim=True)
    lr = _log_ratio(u, u.gather(-2, m[..., None].expand(*m.shape, u.shape[-1])))
    diff = (logits - logits.gather(-1, m)) + (D * lr[..., 0] if cov == "spherical" else lr.sum(-1))
    return diff - torch.logsumexp(diff, -1, keepdim=True)


def _log_ratio(a: Tensor, b: Tensor) -> Tensor:
    """log(a / b) to a few ulps of its own size: log1p((a − b)/b) when a/b is near 1 (where
    log(a/b) would carry one ulp of 1 instead), log(a/b) elsewhere."""
    d = (a - b) / b
    return torch.where(d.abs() < 0.5, torch.log1p(d), (a / b).log())


def finish_prec_grad(prec: Tensor, W: Tensor, S: Tensor, cov: str, D: int) -> Tensor:
    """The prec_chol gradient from W = Σ_n w_nk and S (SPEC §1).  diag and spherical take the
    sums of the *scaled* distance y = s z — S = Σ_n w_nk y² (diag, per d) or Σ_n w_nk ‖y‖²
    (spherical) — and return W/s − S/s or D (W/s) − S/s (= W/s − s Σ w z²: z² overflows for far
    points whose log p is representable, (s z)² ~ 2|log p| does not; and D·W can overflow where
    the gradient does not, csrc/gmm_math.h).  full: S = Σ_n w z yᵀ, triu(diag(W / U_dd) − S)."""
    if cov == "diag":
        return W[..., None] / prec - S / prec
    if cov == "spherical":
        return D * (W / prec) - S / prec
    diag = torch.diagonal(prec, dim1=-2, dim2=-1)
    return (torch.diag_embed(W[..., None] / diag) - S).triu()
