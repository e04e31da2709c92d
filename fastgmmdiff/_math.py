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


def ngmg_log_normalizer(prec: Tensor, logits: Tensor, cov: str, D: int) -> Tensor:
    """NGMG's c = logsumexp_k a_k = log Σ_k π_k N(μ_k; μ_k, Σ_k) per mixture, [...] (SPEC §2)."""
    return torch.logsumexp(component_const(prec, logits, cov, D), -1)


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
