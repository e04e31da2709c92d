"""Converters between the ways a Gaussian's shape is written and the precision Cholesky factor
U (scikit-learn's ``precisions_cholesky_``) that fastgmmdiff's functions take.

======================  =========================================================================
covariance type         what ``prec_chol`` holds (each with any leading batch axes)
======================  =========================================================================
``"full"``              ``[K, D, D]`` upper-triangular U_k with Λ_k = U_k U_kᵀ = Σ_k⁻¹
``"tied"``              ``[D, D]``, one such U for every component
``"diag"``              ``[K, D]``, 1/σ_kd (σ² the variances: scikit-learn's diag ``covariances_``)
``"spherical"``         ``[K]``, 1/σ_k
======================  =========================================================================

Every function takes a torch tensor (differentiable, on any device) or a numpy array (numpy in,
numpy out) and computes what scikit-learn computes, with the same factorisations:

* :func:`covariance_to_prec_chol`: the Cholesky factor L of Σ, then U = L⁻ᵀ by a triangular solve
  (scikit-learn's ``_compute_precision_cholesky``); 1/√σ² for diag and spherical.
* :func:`precision_to_prec_chol`: Λ's rows and columns reversed, its Cholesky factor, reversed
  back (upper triangular, no inverse: scikit-learn's ``_compute_precision_cholesky_from_precisions``).
* :func:`scale_tril_to_prec_chol`: torch's ``scale_tril`` (L with Σ = L Lᵀ, as in
  ``MultivariateNormal``) to U = L⁻ᵀ; :func:`scale_to_prec_chol`: torch's σ (``Normal``'s scale)
  to 1/σ.
* and the way back: :func:`prec_chol_to_covariance`, :func:`prec_chol_to_precision`,
  :func:`prec_chol_to_scale_tril`, :func:`prec_chol_to_scale`.

Factorisations and inverses of float32 (or half) matrices are computed in float64 and rounded
back to the input's dtype (on devices without float64, such as MPS, in the input's dtype): in
float32 their own rounding, ~κ(Σ)·eps, would otherwise be the largest error of a log-density and
its gradients downstream.  Gradients flow through the cast as usual.

Entries of U below the diagonal are ignored (read as 0), as everywhere in fastgmmdiff.  A
covariance or precision that is not positive definite is a ValueError naming the first bad
matrix; a non-positive variance or scale likewise.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["covariance_to_prec_chol", "prec_chol_to_covariance", "precision_to_prec_chol",
           "prec_chol_to_precision", "scale_tril_to_prec_chol", "prec_chol_to_scale_tril",
           "scale_to_prec_chol", "prec_chol_to_scale"]

_TYPES = ("full", "tied", "diag", "spherical")
_MIN_NDIM = {"full": 3, "tied": 2, "diag": 2, "spherical": 1}


def _as_tensor(a, name: str):
    """(tensor, back) where back turns a result into the caller's kind (numpy in, numpy out)."""
    if isinstance(a, Tensor):
        if not a.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {a.dtype}")
        return a, lambda t: t
    arr = np.asarray(a)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real array, got dtype {arr.dtype}")
    dtype = arr.dtype if arr.dtype.kind == "f" else np.float64
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=dtype)), lambda t: t.detach().cpu().numpy()


def _wide(t: Tensor, back):
    """(t in float64, back after rounding to t's dtype) for a float32 or half t, for the
    factorisations; (t, back) for float64 or where the device has no float64."""
    if t.dtype == torch.float64 or t.device.type == "mps":
        return t, back
    return t.double(), lambda r: back(r.to(t.dtype))


def _check_type(covariance_type: str, t: Tensor, name: str) -> None:
    if covariance_type not in _TYPES:
        raise ValueError(f"covariance_type must be one of {', '.join(map(repr, _TYPES))}; got {covariance_type!r}")
    nd = _MIN_NDIM[covariance_type]
    if t.dim() < nd or (covariance_type in ("full", "tied") and t.shape[-1] != t.shape[-2]):
        want = {"full": "[..., K, D, D]", "tied": "[..., D, D]", "diag": "[..., K, D]", "spherical": "[..., K]"}
        raise ValueError(f"{name} for covariance_type={covariance_type!r} must be {want[covariance_type]}; "
                         f"got shape {tuple(t.shape)}")


def _first_bad(mask: Tensor) -> str:
    """'[i, j]' of the first True entry (a matrix index over the leading axes)."""
    if mask.dim() == 0:
        return ""
    idx = mask.nonzero()[0].tolist()
    return "[" + ", ".join(map(str, idx)) + "]" if idx else ""


def _cholesky(m: Tensor, name: str) -> Tensor:
    """Lower Cholesky factor, or ValueError naming the first matrix that is not positive definite."""
    L, info = torch.linalg.cholesky_ex(m)
    if not torch.compiler.is_compiling() and bool((info != 0).any()):
        raise ValueError(f"{name}{_first_bad(info != 0)} is not positive definite (its Cholesky "
                         "factorisation failed); a covariance or precision must be symmetric positive definite")
    return L


def _check_positive(t: Tensor, name: str) -> None:
    if not torch.compiler.is_compiling() and bool((~(t > 0)).any()):
        raise ValueError(f"{name}{_first_bad(~(t > 0))} is not positive (got "
                         f"{t[~(t > 0)][0].item()}); variances and scales must be > 0")


def _eye_like(m: Tensor) -> Tensor:
    return torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).expand(m.shape)


def _inv_lower_t(L: Tensor) -> Tensor:
    """L⁻ᵀ for lower-triangular L (upper triangular)."""
    return torch.linalg.solve_triangular(L, _eye_like(L), upper=False).mT


def _inv_upper_t(U: Tensor) -> Tensor:
    """U⁻ᵀ for upper-triangular U (lower triangular)."""
    return torch.linalg.solve_triangular(U, _eye_like(U), upper=True).mT


def covariance_to_prec_chol(covariances, covariance_type: str = "full"):
    """U from covariances (scikit-learn's ``covariances_``: full ``[..., K, D, D]``, tied
    ``[..., D, D]``, diag variances ``[..., K, D]``, spherical variances ``[..., K]``)."""
    t, back = _as_tensor(covariances, "covariances")
    _check_type(covariance_type, t, "covariances")
    if covariance_type in ("diag", "spherical"):
        _check_positive(t, "covariances")
        return back(1.0 / torch.sqrt(t))
    w, back = _wide(t, back)
    return back(_inv_lower_t(_cholesky(w, "covariances")))


def prec_chol_to_covariance(prec_chol, covariance_type: str = "full"):
    """Covariances Σ = (U Uᵀ)⁻¹ = U⁻ᵀ U⁻¹ (variances 1/s² for diag and spherical)."""
    t, back = _as_tensor(prec_chol, "prec_chol")
    _check_type(covariance_type, t, "prec_chol")
    if covariance_type in ("diag", "spherical"):
        _check_positive(t, "prec_chol")
        return back(1.0 / (t * t))
    w, back = _wide(t, back)
    Uinv_t = _inv_upper_t(w.triu())  # U⁻ᵀ, lower
    return back(Uinv_t @ Uinv_t.mT)


def precision_to_prec_chol(precisions, covariance_type: str = "full"):
    """U from precisions Λ (scikit-learn's ``precisions_``): the Cholesky factor of Λ with rows
    and columns reversed, reversed back, so that Λ = U Uᵀ with U upper triangular; √Λ for diag
    and spherical."""
    t, back = _as_tensor(precisions, "precisions")
    _check_type(covariance_type, t, "precisions")
    if covariance_type in ("diag", "spherical"):
        _check_positive(t, "precisions")
        return back(torch.sqrt(t))
    w, back = _wide(t, back)
    return back(_cholesky(w.flip(-1, -2), "precisions").flip(-1, -2))


def prec_chol_to_precision(prec_chol, covariance_type: str = "full"):
    """Precisions Λ = U Uᵀ (s² for diag and spherical)."""
    t, back = _as_tensor(prec_chol, "prec_chol")
    _check_type(covariance_type, t, "prec_chol")
    if covariance_type in ("diag", "spherical"):
        return back(t * t)
    w, back = _wide(t, back)
    U = w.triu()
    return back(U @ U.mT)


def scale_tril_to_prec_chol(scale_tril):
    """U = L⁻ᵀ from torch's ``scale_tril`` L (lower triangular, Σ = L Lᵀ), ``[..., D, D]``.
    Entries of L above the diagonal are ignored, as ``torch.linalg.solve_triangular`` does."""
    t, back = _as_tensor(scale_tril, "scale_tril")
    _check_type("tied", t, "scale_tril")
    w, back = _wide(t, back)
    return back(_inv_lower_t(w.tril()))


def prec_chol_to_scale_tril(prec_chol):
    """torch's ``scale_tril`` L = U⁻ᵀ (lower triangular, Σ = L Lᵀ) from U, ``[..., D, D]``."""
    t, back = _as_tensor(prec_chol, "prec_chol")
    _check_type("tied", t, "prec_chol")
    w, back = _wide(t, back)
    return back(_inv_upper_t(w.triu()))


def scale_to_prec_chol(scale):
    """1/σ from torch's scale σ (diag ``[..., K, D]`` or spherical ``[..., K]``)."""
    t, back = _as_tensor(scale, "scale")
    _check_positive(t, "scale")
    return back(1.0 / t)


def prec_chol_to_scale(prec_chol):
    """σ = 1/s from diag or spherical U."""
    t, back = _as_tensor(prec_chol, "prec_chol")
    _check_positive(t, "prec_chol")
    return back(1.0 / t)
