"""``GaussianMixture``: a trainable batch of G Gaussian mixtures with K components in D dims."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from .functional import gmm_log_prob, ngmg_loss

_TYPES = ("diag", "spherical", "full")


def _upper_flat_index(D: int, device) -> Tensor:
    """Flat indices into a D×D matrix: the strict upper triangle row by row, then the diagonal."""
    iu = torch.triu_indices(D, D, 1, device=device)
    diag = torch.arange(D, device=device)
    return torch.cat([iu[0] * D + iu[1], diag * (D + 1)])


class GaussianMixture(nn.Module):
    """G Gaussian mixtures (or one, ``n_mixtures=None``) of K components in D dimensions.

    Parameters are stored so that plain gradient descent keeps them valid: ``logits``
    (π = softmax(logits)), ``means``, and the precision Cholesky factor U through
    ``log_prec_diag`` (log of its positive diagonal: 1/σ for diag/spherical) and, for
    ``"full"``, ``prec_offdiag`` (its strict upper triangle, the free entries only: an optimiser's
    state and weight decay touch nothing else).
    ``prec_chol`` rebuilds U in scikit-learn's ``precisions_cholesky_`` convention.

    Args:
        n_components: K.
        n_features: D.
        covariance_type: ``"diag"`` (default), ``"spherical"`` or ``"full"``
            (scikit-learn's ``"tied"`` arrives as ``"full"`` through :meth:`from_sklearn`).
        n_mixtures: G, or None for a single mixture without the G axis.
        backend: backend used by :meth:`log_prob` and :meth:`ngmg_loss` (default ``"auto"``).
        dtype, device: of the parameters.

    Attributes:
        logits: ``[(G,) K]`` parameter, unnormalised log weights (π = softmax(logits)).
        means: ``[(G,) K, D]`` parameter, the component means μ_k.
        log_prec_diag: parameter, log of the diagonal of U (log 1/σ): ``[(G,) K, D]``
            (diag, full) or ``[(G,) K]`` (spherical).
        prec_offdiag: ``[(G,) K, D(D-1)/2]`` parameter (full only, else None): U's strict upper
            triangle, row by row (``torch.triu_indices(D, D, 1)`` order).
        covariance_type: ``"diag"``, ``"spherical"`` or ``"full"``.
        backend: the default backend of :meth:`log_prob` and :meth:`ngmg_loss`.

    ``state_dict()`` records the covariance type and the sizes (G, K, D) beside the parameters:
    :meth:`from_state_dict` rebuilds the module from it alone, and loading it into a module of
    another covariance type or size is an error that says which.
    """

    def __init__(self, n_components: int, n_features: int, covariance_type: str = "diag",
                 n_mixtures: int | None = None, *, backend: str = "auto",
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        if covariance_type not in _TYPES:
            raise ValueError(f"covariance_type must be one of {_TYPES}; got {covariance_type!r}")
        if n_components < 1 or n_features < 1:
            raise ValueError(f"need n_components >= 1 and n_features >= 1; got {n_components}, {n_features}")
        if n_mixtures is not None and n_mixtures < 1:
            raise ValueError(f"n_mixtures must be None or >= 1; got {n_mixtures}")
        self.covariance_type = covariance_type
        self.backend = backend
        G = () if n_mixtures is None else (n_mixtures,)
        K, D = n_components, n_features
        kw = dict(dtype=dtype, device=device)
        self.logits = nn.Parameter(torch.zeros(G + (K,), **kw))
        self.means = nn.Parameter(torch.randn(G + (K, D), **kw))
        diag_shape = G + ((K,) if covariance_type == "spherical" else (K, D))
        self.log_prec_diag = nn.Parameter(torch.zeros(diag_shape, **kw))
        if covariance_type == "full":
            self.prec_offdiag = nn.Parameter(torch.zeros(G + (K, D * (D - 1) // 2), **kw))
        else:
            self.register_parameter("prec_offdiag", None)

    # -- shape facts -------------------------------------------------------------------------
    @property
    def n_mixtures(self):
        """G, the number of mixtures, or None for a single mixture held without the G axis."""
        return self.means.shape[0] if self.means.dim() == 3 else None

    @property
    def n_components(self) -> int:
        """K, the number of components of each mixture."""
        return self.means.shape[-2]

    @property
    def n_features(self) -> int:
        """D, the dimension of the points."""
        return self.means.shape[-1]

    @property
    def prec_chol(self) -> Tensor:
        """U in scikit-learn's convention (1/σ for diag/spherical, upper triangular for full)."""
        s = self.log_prec_diag.exp()
        if self.covariance_type != "full":
            return s
        D = self.n_features
        lead = s.shape[:-1]
        idx = _upper_flat_index(D, s.device)  # strict upper triangle, then the diagonal
        vals = torch.cat([self.prec_offdiag, s], -1)
        return vals.new_zeros(lead + (D * D,)).scatter(-1, idx.expand(lead + idx.shape), vals).view(lead + (D, D))

    @property
    def weights(self) -> Tensor:
        """π = softmax(logits), ``[(G,) K]`` (scikit-learn's ``weights_``); differentiable."""
        return torch.softmax(self.logits, -1)

    # -- state_dict: the structure travels with the parameters --------------------------------
    def get_extra_state(self) -> dict:
        return {"covariance_type": self.covariance_type, "n_mixtures": self.n_mixtures,
                "n_components": self.n_components, "n_features": self.n_features}

    def set_extra_state(self, state: dict) -> None:
        mine = self.get_extra_state()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError("this state_dict is of a GaussianMixture with " + ", ".join(
                f"{k}={a!r} (this module: {b!r})" for k, (a, b) in diff.items())
                + "; build one from it with GaussianMixture.from_state_dict(state_dict)")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "prec_offdiag"
        old = state_dict.get(key)
        if old is not None and self.prec_offdiag is not None and old.dim() == self.prec_offdiag.dim() + 1:
            # saved before only the free entries were stored: [.., K, D, D] -> its strict upper triangle
            iu = torch.triu_indices(old.shape[-1], old.shape[-1], 1, device=old.device)
            state_dict[key] = old[..., iu[0], iu[1]]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "_extra_state"  # state_dicts saved before it was recorded load as before
        if key in missing_keys:
            missing_keys.remove(key)

    @classmethod
    def from_state_dict(cls, state_dict: dict, *, backend: str = "auto", device=None) -> "GaussianMixture":
        """A module rebuilt from ``state_dict()`` alone (older state dicts without the recorded
        structure: the covariance type and sizes are read from the parameters' shapes)."""
        extra = state_dict.get("_extra_state")
        if extra is None:
            means, diag = state_dict["means"], state_dict["log_prec_diag"]
            full = state_dict.get("prec_offdiag") is not None
            extra = dict(covariance_type="full" if full else ("spherical" if diag.dim() < means.dim() else "diag"),
                         n_mixtures=means.shape[0] if means.dim() == 3 else None,
                         n_components=means.shape[-2], n_features=means.shape[-1])
        m = cls(extra["n_components"], extra["n_features"], extra["covariance_type"], extra["n_mixtures"],
                backend=backend, dtype=state_dict["means"].dtype, device=device)
        m.load_state_dict(state_dict)
        return m

    def extra_repr(self) -> str:
        g = "" if self.n_mixtures is None else f"n_mixtures={self.n_mixtures}, "
        return (f"{g}n_components={self.n_components}, n_features={self.n_features}, "
                f"covariance_type={self.covariance_type!r}, backend={self.backend!r}")

    # -- evaluation --------------------------------------------------------------------------
    def log_prob(self, x: Tensor, *, backend: str | None = None, validate: bool = False) -> Tensor:
        """log p(x): ``[N]`` or ``[G, N]`` (see :func:`fastgmmdiff.gmm_log_prob`)."""
        return gmm_log_prob(x, self.means, self.prec_chol, self.logits, self.covariance_type,
                            backend=backend or self.backend, validate=validate)

    forward = log_prob

    def ngmg_loss(self, z: Tensor, target: Tensor | None = None, *, normalize: bool = True,
                  reduction: str = "mean", backend: str | None = None,
                  validate: bool = False) -> Tensor:
        """NGMG loss of points z under this mixture (see :func:`fastgmmdiff.ngmg_loss`)."""
        return ngmg_loss(z, self.means, self.prec_chol, self.logits, self.covariance_type,
                         target=target, normalize=normalize, reduction=reduction,
                         backend=backend or self.backend, validate=validate)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None):
        """Draw n points per mixture.

        Returns ``(x, component)``, like scikit-learn's ``sample``: x ``[n, D]`` (or
        ``[G, n, D]``) and the component index of each draw ``[n]`` (or ``[G, n]``).
        A draw is μ_k + U_k⁻ᵀ ε with ε ~ N(0, I), whose covariance is (U_k U_kᵀ)⁻¹.

        Written here rather than with ``torch.distributions``: ``MixtureSameFamily.sample``
        draws from every component and keeps one (K× the work: 30-80× slower than this at
        n = 100,000, K = 64, D = 16 full on a 2-core CPU), and its ``sample`` takes no
        ``generator``, which reproducible sampling needs.
        """
        if n < 0:
            raise ValueError(f"n must be >= 0; got {n}")
        batched = self.n_mixtures is not None
        means = self.means if batched else self.means.unsqueeze(0)
        logits = self.logits if batched else self.logits.unsqueeze(0)
        U = self.prec_chol if batched else self.prec_chol.unsqueeze(0)
        G, K, D = means.shape
        if n == 0:
            comp = torch.zeros(G, 0, dtype=torch.long, device=means.device)
        else:
            comp = torch.multinomial(torch.softmax(logits.float(), -1), n, replacement=True,
                                     generator=generator)
        eps = torch.randn(G, n, D, generator=generator, dtype=means.dtype, device=means.device)
        mu = torch.gather(means, 1, comp[..., None].expand(G, n, D))
        if self.covariance_type == "full":
            Ut = torch.gather(U, 1, comp[..., None, None].expand(G, n, D, D))
            # Solve U_kᵀ v = ε (Uᵀ is lower triangular).
            v = torch.linalg.solve_triangular(Ut.transpose(-1, -2), eps[..., None], upper=False)[..., 0]
        else:
            s = torch.gather(U, 1, comp if self.covariance_type == "spherical" else comp[..., None].expand(G, n, D))
            v = eps / (s[..., None] if self.covariance_type == "spherical" else s)
        x = mu + v
        return (x, comp) if batched else (x[0], comp[0])

    # -- scikit-learn interchange ------------------------------------------------------------
    @classmethod
    def from_sklearn(cls, gmm, *, dtype: torch.dtype = torch.float32, device=None,
                     backend: str = "auto") -> "GaussianMixture":
        """Build from a fitted ``sklearn.mixture.GaussianMixture`` (any covariance type;
        ``"tied"`` becomes ``"full"`` with the shared factor copied to every component)."""
        for attr in ("means_", "precisions_cholesky_", "weights_"):
            if not hasattr(gmm, attr):
                raise ValueError(f"the scikit-learn model is not fitted (no {attr})")
        ct = gmm.covariance_type
        K, D = gmm.means_.shape
        U = np.asarray(gmm.precisions_cholesky_, dtype=np.float64)
        if ct == "tied":
            U = np.broadcast_to(U, (K, D, D)).copy()
            ct = "full"
        m = cls(K, D, ct, dtype=dtype, device=device, backend=backend)
        to = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64)).to(dtype=m.means.dtype, device=m.means.device)  # noqa: E731
        with torch.no_grad():
            m.means.copy_(to(gmm.means_))
            m.logits.copy_(to(np.log(gmm.weights_)))
            if ct == "full":
                m.log_prec_diag.copy_(to(np.log(np.diagonal(U, axis1=-2, axis2=-1))))
                iu = np.triu_indices(D, 1)
                m.prec_offdiag.copy_(to(U[:, iu[0], iu[1]]))
            else:
                m.log_prec_diag.copy_(to(np.log(U)))
        return m

    def to_sklearn(self, index: int | None = None):
        """A fitted ``sklearn.mixture.GaussianMixture`` equal to this mixture (mixture
        ``index`` of G when batched); its ``score_samples`` matches :meth:`log_prob`."""
        from sklearn.mixture import GaussianMixture as SkGMM

        if self.n_mixtures is not None and index is None:
            raise ValueError(f"this module holds {self.n_mixtures} mixtures: pass index=")
        if self.n_mixtures is None and index is not None:
            raise ValueError("this module holds one mixture: leave index=None")
        sel = (lambda t: t[index]) if index is not None else (lambda t: t)
        as_np = lambda t: sel(t).detach().to("cpu", torch.float64).numpy()  # noqa: E731
        U = as_np(self.prec_chol)
        sk = SkGMM(n_components=self.n_components, covariance_type=self.covariance_type)
        sk.weights_ = as_np(self.weights)
        sk.means_ = as_np(self.means)
        sk.precisions_cholesky_ = U
        if self.covariance_type == "full":
            sk.precisions_ = U @ np.swapaxes(U, -1, -2)
            sk.covariances_ = np.linalg.inv(sk.precisions_)
        else:
            sk.precisions_ = U**2
            sk.covariances_ = 1.0 / sk.precisions_
        sk.converged_, sk.n_iter_, sk.lower_bound_ = True, 0, -math.inf
        sk.n_features_in_ = self.n_features
        return sk
