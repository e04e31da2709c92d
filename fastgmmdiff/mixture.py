"""``GaussianMixture``: scikit-learn's estimator fitted by EM on the fused kernels, and a trainable
batch of G Gaussian mixtures with K components in D dims."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor, nn

from . import _em, convert, functional
from .functional import gmm_log_prob, ngmg_loss

_TYPES = ("full", "tied", "diag", "spherical")


def _upper_flat_index(D: int, device) -> Tensor:
    """Flat indices into a D×D matrix: the strict upper triangle row by row, then the diagonal."""
    iu = torch.triu_indices(D, D, 1, device=device)
    diag = torch.arange(D, device=device)
    return torch.cat([iu[0] * D + iu[1], diag * (D + 1)])


class GaussianMixture(nn.Module):
    """A Gaussian mixture: scikit-learn's estimator, fitted by EM on the fused kernels, and a
    trainable ``nn.Module`` (G mixtures at once for torch users).

    As an estimator it takes ``sklearn.mixture.GaussianMixture``'s keywords, defaults and
    methods — ``fit``, ``fit_predict``, ``predict``, ``predict_proba``, ``score_samples``,
    ``score``, ``sample``, ``bic``, ``aic`` — and sets its fitted attributes (``weights_``,
    ``means_``, ``covariances_``, ``precisions_``, ``precisions_cholesky_``, ``converged_``,
    ``n_iter_``, ``lower_bound_``, ``lower_bounds_``, ``n_features_in_``): code written for
    scikit-learn runs after changing the import, with the same numbers (README, "Fitting").
    Methods take numpy arrays (numpy out, in X's dtype) or tensors (tensors out); fitted
    array attributes are numpy after a fit on numpy, tensors after a fit on tensors.  One EM
    iteration is one forward and one backward of the fused log-density over the data, whose
    parameter gradients are the E-step's statistics (``fastgmmdiff._em``), never an N×K array;
    the M-step is scikit-learn's.  Under ``torch.distributed`` (each process holding its shard
    of X) ``fit`` all-reduces the statistics, so every process ends with the same model.

    As a module, parameters are stored so that plain gradient descent keeps them valid:
    ``logits`` (π = softmax(logits)), ``means``, and the precision Cholesky factor U through
    ``log_prec_diag`` (log of its positive diagonal: 1/σ for diag/spherical) and, for
    ``"full"``/``"tied"``, ``prec_offdiag`` (its strict upper triangle, the free entries only: an
    optimiser's state and weight decay touch nothing else).  ``prec_chol`` rebuilds U in
    scikit-learn's ``precisions_cholesky_`` convention.

    Args:
        n_components: K.
        n_features: D; None (the default) creates the parameters at the first ``fit``.
        covariance_type: ``"full"`` (default, as scikit-learn), ``"tied"`` (one factor shared
            by the K components), ``"diag"`` or ``"spherical"``.
        n_mixtures: G, or None for a single mixture without the G axis (``fit`` needs None).
        tol, reg_covar, max_iter, n_init, init_params, weights_init, means_init,
            precisions_init, random_state, warm_start, verbose, verbose_interval: as
            scikit-learn's.  ``init_params``: ``"kmeans"`` (k-means++ seeds, then Lloyd's
            k-means), ``"k-means++"``, ``"random"`` or ``"random_from_data"`` (these two draw
            exactly scikit-learn's numbers for an integer ``random_state``).  ``verbose``: a
            tqdm bar with the lower bound (2: a line every ``verbose_interval`` iterations too).
        backend: backend of the log-density (``"auto"``).
        dtype, device: of the parameters.  ``fit`` uses the data's floating dtype (float64
            stays float64: scikit-learn's precision) and ``device`` (default: the data's) for
            the parameters and the computation; data elsewhere is moved in chunks.
        chunk_size: rows per chunk of the data (None: all at once where the data already lie
            on ``device``, 262,144 rows otherwise).

    Attributes:
        logits: ``[(G,) K]`` parameter, unnormalised log weights (π = softmax(logits)).
        means: ``[(G,) K, D]`` parameter, the component means μ_k.
        log_prec_diag: parameter, log of the diagonal of U (log 1/σ): ``[(G,) K, D]``
            (diag, full), ``[(G,) K]`` (spherical) or ``[(G,) D]`` (tied).
        prec_offdiag: ``[(G,) K, D(D-1)/2]`` (full) or ``[(G,) D(D-1)/2]`` (tied) parameter,
            else None: U's strict upper triangle, row by row (``torch.triu_indices(D, D, 1)``).
        covariance_type, backend: as given.

    ``state_dict()`` records the covariance type and the sizes (G, K, D) beside the parameters:
    :meth:`from_state_dict` rebuilds the module from it alone, and loading it into a module of
    another covariance type or size is an error that says which.
    """

    def __init__(self, n_components: int = 1, n_features: int | None = None, covariance_type: str = "full",
                 n_mixtures: int | None = None, *, tol: float = 1e-3, reg_covar: float = 1e-6,
                 max_iter: int = 100, n_init: int = 1, init_params: str = "kmeans", weights_init=None,
                 means_init=None, precisions_init=None, random_state=None, warm_start: bool = False,
                 verbose: int = 0, verbose_interval: int = 10, backend: str = "auto",
                 dtype: torch.dtype | None = None, device=None, chunk_size: int | None = None):
        super().__init__()
        if covariance_type not in _TYPES:
            raise ValueError(f"covariance_type must be one of {_TYPES}; got {covariance_type!r}")
        if not isinstance(n_components, int) or n_components < 1:
            raise ValueError(f"n_components must be an integer >= 1; got {n_components!r}")
        if n_features is not None and n_features < 1:
            raise ValueError(f"n_features must be None or >= 1; got {n_features}")
        if n_mixtures is not None and n_mixtures < 1:
            raise ValueError(f"n_mixtures must be None or >= 1; got {n_mixtures}")
        self.covariance_type = covariance_type
        self.backend = backend
        self._n_components = n_components  # K before the parameters exist
        self._G = n_mixtures
        self.tol, self.reg_covar, self.max_iter, self.n_init = tol, reg_covar, max_iter, n_init
        self.init_params, self.weights_init, self.means_init = init_params, weights_init, means_init
        self.precisions_init, self.random_state, self.warm_start = precisions_init, random_state, warm_start
        self.verbose, self.verbose_interval, self.chunk_size = verbose, verbose_interval, chunk_size
        self._dtype, self._device = dtype, device
        self._fitted = False
        self._numpy = False
        for name in ("logits", "means", "log_prec_diag", "prec_offdiag"):
            self.register_parameter(name, None)
        if n_features is not None:
            self._build(n_features, dtype, device)

    def _build(self, D: int, dtype, device) -> None:
        """Fresh parameters: logits 0, means ~ N(0, 1), U = I."""
        G = () if self._G is None else (self._G,)
        K = self._n_components
        kw = dict(dtype=dtype, device=device)
        tied = self.covariance_type == "tied"
        self.logits = nn.Parameter(torch.zeros(G + (K,), **kw))
        self.means = nn.Parameter(torch.randn(G + (K, D), **kw))
        diag_shape = G + {"spherical": (K,), "tied": (D,)}.get(self.covariance_type, (K, D))
        self.log_prec_diag = nn.Parameter(torch.zeros(diag_shape, **kw))
        if self.covariance_type in ("full", "tied"):
            self.prec_offdiag = nn.Parameter(torch.zeros(G + (() if tied else (K,)) + (D * (D - 1) // 2,), **kw))
        else:
            self.prec_offdiag = None

    def _built(self) -> None:
        if self.means is None:
            raise RuntimeError("this GaussianMixture has no parameters yet: pass n_features= or call fit(X)")

    # -- shape facts -------------------------------------------------------------------------
    @property
    def n_mixtures(self):
        """G, the number of mixtures, or None for a single mixture held without the G axis."""
        return self._G

    @property
    def n_components(self) -> int:
        """K, the number of components of each mixture."""
        return self._n_components

    @property
    def n_features(self) -> int | None:
        """D, the dimension of the points (None before the first ``fit`` when not given)."""
        return None if self.means is None else self.means.shape[-1]

    @property
    def prec_chol(self) -> Tensor:
        """U in scikit-learn's convention: 1/σ for diag/spherical, upper triangular ``[(G,) K,
        D, D]`` for full and ``[(G,) D, D]`` for tied."""
        self._built()
        s = self.log_prec_diag.exp()
        if self.covariance_type not in ("full", "tied"):
            return s
        D = self.n_features
        lead = s.shape[:-1]
        idx = _upper_flat_index(D, s.device)  # strict upper triangle, then the diagonal
        vals = torch.cat([self.prec_offdiag, s], -1)
        return vals.new_zeros(lead + (D * D,)).scatter(-1, idx.expand(lead + idx.shape), vals).view(lead + (D, D))

    @property
    def weights(self) -> Tensor:
        """π = softmax(logits), ``[(G,) K]`` (scikit-learn's ``weights_``); differentiable."""
        self._built()
        return torch.softmax(self.logits, -1)

    def _component_factors(self) -> Tensor:
        """U per component: ``[(G,) K, D, D]`` (tied: the shared factor expanded)."""
        U = self.prec_chol
        if self.covariance_type == "tied":
            lead = U.shape[:-2]
            U = U.unsqueeze(-3).expand(lead + (self.n_components,) + U.shape[-2:])
        return U

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
                  validate: bool = False, scales=None) -> Tensor:
        """NGMG loss of points z under this mixture (see :func:`fastgmmdiff.ngmg_loss`;
        ``scales``: multi-scale NGMG)."""
        return ngmg_loss(z, self.means, self.prec_chol, self.logits, self.covariance_type,
                         target=target, normalize=normalize, reduction=reduction,
                         backend=backend or self.backend, validate=validate, scales=scales)

    @torch.no_grad()
    def sample(self, n_samples: int = 1, generator: torch.Generator | None = None):
        """Draw n_samples points per mixture.

        Returns ``(x, component)``, like scikit-learn's ``sample``: x ``[n, D]`` (or
        ``[G, n, D]``) and the component index of each draw ``[n]`` (or ``[G, n]``).  After a
        fit on numpy data, numpy arrays ordered by component as scikit-learn's, drawn with a
        generator seeded by an integer ``random_state`` unless one is given.
        A draw is μ_k + U_k⁻ᵀ ε with ε ~ N(0, I), whose covariance is (U_k U_kᵀ)⁻¹.

        Written here rather than with ``torch.distributions``: ``MixtureSameFamily.sample``
        draws from every component and keeps one (K× the work: 30-80× slower than this at
        n = 100,000, K = 64, D = 16 full on a 2-core CPU), and its ``sample`` takes no
        ``generator``, which reproducible sampling needs.
        """
        n = n_samples
        if n < 0:
            raise ValueError(f"n_samples must be >= 0; got {n}")
        self._built()
        if generator is None and isinstance(self.random_state, int) and self._fitted:
            generator = torch.Generator(self.means.device).manual_seed(self.random_state)
        batched = self.n_mixtures is not None
        means = self.means if batched else self.means.unsqueeze(0)
        logits = self.logits if batched else self.logits.unsqueeze(0)
        U = self._component_factors() if self.covariance_type == "tied" else self.prec_chol
        U = U if batched else U.unsqueeze(0)
        G, K, D = means.shape
        if n == 0:
            comp = torch.zeros(G, 0, dtype=torch.long, device=means.device)
        else:
            comp = torch.multinomial(torch.softmax(logits.float(), -1), n, replacement=True,
                                     generator=generator)
        eps = torch.randn(G, n, D, generator=generator, dtype=means.dtype, device=means.device)
        mu = torch.gather(means, 1, comp[..., None].expand(G, n, D))
        if self.covariance_type in ("full", "tied"):
            Ut = torch.gather(U, 1, comp[..., None, None].expand(G, n, D, D))
            # Solve U_kᵀ v = ε (Uᵀ is lower triangular).
            v = torch.linalg.solve_triangular(Ut.transpose(-1, -2), eps[..., None], upper=False)[..., 0]
        else:
            s = torch.gather(U, 1, comp if self.covariance_type == "spherical" else comp[..., None].expand(G, n, D))
            v = eps / (s[..., None] if self.covariance_type == "spherical" else s)
        x = mu + v
        if self._numpy and not batched:
            order = torch.argsort(comp[0], stable=True)
            return x[0][order].cpu().numpy(), comp[0][order].cpu().numpy()
        return (x, comp) if batched else (x[0], comp[0])

    # -- scikit-learn interchange ------------------------------------------------------------
    @classmethod
    def from_sklearn(cls, gmm, *, dtype: torch.dtype = torch.float32, device=None,
                     backend: str = "auto") -> "GaussianMixture":
        """Build from a fitted ``sklearn.mixture.GaussianMixture`` (any covariance type, kept)."""
        for attr in ("means_", "precisions_cholesky_", "weights_"):
            if not hasattr(gmm, attr):
                raise ValueError(f"the scikit-learn model is not fitted (no {attr})")
        ct = gmm.covariance_type
        K, D = gmm.means_.shape
        U = np.asarray(gmm.precisions_cholesky_, dtype=np.float64)
        m = cls(K, D, ct, dtype=dtype, device=device, backend=backend)
        to = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64)).to(dtype=m.means.dtype, device=m.means.device)  # noqa: E731
        with torch.no_grad():
            m.means.copy_(to(gmm.means_))
            m.logits.copy_(to(np.log(gmm.weights_)))
            if ct in ("full", "tied"):
                m.log_prec_diag.copy_(to(np.log(np.diagonal(U, axis1=-2, axis2=-1))))
                iu = np.triu_indices(D, 1)
                m.prec_offdiag.copy_(to(U[..., iu[0], iu[1]]))
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
        if self.covariance_type in ("full", "tied"):
            sk.precisions_ = U @ np.swapaxes(U, -1, -2)
            sk.covariances_ = np.linalg.inv(sk.precisions_)
        else:
            sk.precisions_ = U**2
            sk.covariances_ = 1.0 / sk.precisions_
        sk.converged_, sk.n_iter_, sk.lower_bound_ = True, 0, -math.inf
        sk.n_features_in_ = self.n_features
        return sk

    # -- scikit-learn's estimator ----------------------------------------------------------------
    _FITTED = ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_")
    _INITS = ("kmeans", "k-means++", "random", "random_from_data")

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's arguments (scikit-learn's ``get_params``: ``clone`` and the model
        selection tools use it)."""
        return dict(n_components=self._n_components, n_features=self.n_features, covariance_type=self.covariance_type,
                    n_mixtures=self._G, tol=self.tol, reg_covar=self.reg_covar, max_iter=self.max_iter,
                    n_init=self.n_init, init_params=self.init_params, weights_init=self.weights_init,
                    means_init=self.means_init, precisions_init=self.precisions_init,
                    random_state=self.random_state, warm_start=self.warm_start, verbose=self.verbose,
                    verbose_interval=self.verbose_interval, backend=self.backend, dtype=self._dtype,
                    device=self._device, chunk_size=self.chunk_size)

    def set_params(self, **params) -> "GaussianMixture":
        """Set estimator keywords (scikit-learn's ``set_params``); the structure (n_components,
        n_features, covariance_type, n_mixtures) is fixed once built: make a new one."""
        fixed = {"n_components", "n_features", "covariance_type", "n_mixtures"}
        for k, v in params.items():
            if k in fixed:
                if v != self.get_params()[k]:
                    raise ValueError(f"set_params: {k} is fixed once the module is built; make a new "
                                     f"GaussianMixture({k}={v!r}, ...)")
            elif k in ("dtype", "device"):
                setattr(self, "_" + k, v)
            elif k in self.get_params():
                setattr(self, k, v)
            else:
                raise ValueError(f"set_params: GaussianMixture has no parameter {k!r}")
        return self

    def __getattr__(self, name):
        if name in GaussianMixture._FITTED or name in ("converged_", "n_iter_", "lower_bound_", "lower_bounds_",
                                                        "n_features_in_"):
            if not self.__dict__.get("_fitted", False):
                from sklearn.exceptions import NotFittedError

                raise NotFittedError(f"This GaussianMixture instance is not fitted yet. Call 'fit' with "
                                     f"appropriate arguments before using {name}.")
        return super().__getattr__(name)

    # fitted attributes, from the current parameters (numpy after a fit on numpy)
    def _out(self, t: Tensor):
        t = t.detach()
        return t.cpu().numpy() if self._numpy else t

    def _fitted_check(self, what: str) -> None:
        if not self._fitted and self.means is None:
            from sklearn.exceptions import NotFittedError

            raise NotFittedError(f"This GaussianMixture instance is not fitted yet. Call 'fit' with appropriate "
                                 f"arguments before using {what}.")

    @property
    def weights_(self):
        self._fitted_check("weights_")
        return self._out(self.weights)

    @property
    def means_(self):
        self._fitted_check("means_")
        return self._out(self.means)

    @property
    def precisions_cholesky_(self):
        self._fitted_check("precisions_cholesky_")
        return self._out(self.prec_chol)

    @property
    def precisions_(self):
        self._fitted_check("precisions_")
        return self._out(convert.prec_chol_to_precision(self.prec_chol.detach(), self.covariance_type))

    @property
    def covariances_(self):
        self._fitted_check("covariances_")
        return self._out(convert.prec_chol_to_covariance(self.prec_chol.detach(), self.covariance_type))

    # -- input ---------------------------------------------------------------------------------
    def _as_data(self, X, what: str, *, fit: bool = False):
        """X as a 2-D floating tensor (numpy, lists and tensors), checked as scikit-learn's
        ``validate_data``; returns (X, came_from_numpy)."""
        is_np = not isinstance(X, Tensor)
        if is_np:
            X = np.asarray(X)
            if X.dtype.kind not in "fiub":
                raise ValueError(f"{what}: X must be numeric; got an array of dtype {X.dtype}")
            X = np.ascontiguousarray(X if X.dtype in (np.float32, np.float64) else X.astype(np.float64))
            X = torch.from_numpy(X)
        elif not X.is_floating_point():
            X = X.double()
        elif X.dtype in (torch.float16, torch.bfloat16):
            X = X.float()
        if X.dim() != 2:
            raise ValueError(f"{what}: expected a 2D array of shape (n_samples, n_features), got shape "
                             f"{tuple(X.shape)}" + (" (reshape a single feature with X.reshape(-1, 1))"
                                                    if X.dim() == 1 else ""))
        if fit and X.shape[0] < 2 and not _em.dist_active():
            raise ValueError(f"Found array with {X.shape[0]} sample(s) (shape={tuple(X.shape)}) while a minimum of 2 "
                             "is required by GaussianMixture.")
        # a NaN or ±inf anywhere makes the sum non-finite: one reduction without a [N, D] mask
        # (the mask took 6.7 ms at N = 200,000, D = 16, the sum 0.4); the exact test only then
        if X.numel() and not bool(torch.isfinite(X.sum())) and not bool(torch.isfinite(X).all()):
            kind = "NaN" if bool(torch.isnan(X).any()) else "infinity or a value too large for its dtype"
            raise ValueError(f"Input X contains {kind}.")
        if not fit:
            self._fitted_check(what)
            if X.shape[1] != self.n_features:
                raise ValueError(f"X has {X.shape[1]} features, but GaussianMixture is expecting "
                                 f"{self.n_features} features as input.")
        return X, is_np

    def _work_device(self, X: Tensor):
        if self._device is not None:
            return torch.device(self._device)
        return self.means.device if self.means is not None else X.device

    def _chunk(self, X: Tensor, device) -> int | None:
        if self.chunk_size:
            return int(self.chunk_size)
        return None if X.device == torch.device(device) else 1 << 18

    def _check_estimator_params(self, D: int, dtype, device) -> None:
        """scikit-learn's ``_check_parameters`` and the initial values' checks."""
        K = self.n_components
        if not (isinstance(self.n_init, int) and self.n_init >= 1):
            raise ValueError(f"n_init must be an integer >= 1; got {self.n_init!r}")
        if not (isinstance(self.max_iter, int) and self.max_iter >= 0):
            raise ValueError(f"max_iter must be an integer >= 0; got {self.max_iter!r}")
        if not self.tol >= 0:
            raise ValueError(f"tol must be >= 0; got {self.tol!r}")
        if not self.reg_covar >= 0:
            raise ValueError(f"reg_covar must be >= 0; got {self.reg_covar!r}")
        if self.init_params not in self._INITS:
            raise ValueError(f"init_params must be one of {self._INITS}; got {self.init_params!r}")
        if self._G is not None:
            raise ValueError(f"fit fits one mixture: this module holds n_mixtures={self._G} (build it with "
                             "n_mixtures=None)")
        if self.weights_init is not None:
            w = np.asarray(self.weights_init, dtype=np.float64)
            if w.shape != (K,):
                raise ValueError(f"weights_init must have shape ({K},); got {w.shape}")
            if (w < 0).any() or (w > 1).any():
                raise ValueError(f"weights_init must be in [0, 1]; got min {w.min()}, max {w.max()}")
            if not np.allclose(np.abs(1.0 - w.sum()), 0.0):
                raise ValueError(f"weights_init must sum to 1; got sum {w.sum():.5f}")
        if self.means_init is not None:
            m = np.asarray(self.means_init)
            if m.shape != (K, D):
                raise ValueError(f"means_init must have shape ({K}, {D}); got {m.shape}")
        if self.precisions_init is not None:
            want = {"full": (K, D, D), "tied": (D, D), "diag": (K, D), "spherical": (K,)}[self.covariance_type]
            p = np.asarray(self.precisions_init, dtype=np.float64)
            if p.shape != want:
                raise ValueError(f"precisions_init for covariance_type={self.covariance_type!r} must have shape "
                                 f"{want}; got {p.shape}")
            if self.covariance_type in ("diag", "spherical"):
                if (p <= 0).any():
                    raise ValueError("precisions_init must be positive")
            else:
                mats = p.reshape(-1, D, D)
                if not np.allclose(mats, np.swapaxes(mats, -1, -2)) or (np.linalg.eigvalsh(mats) <= 0).any():
                    raise ValueError("precisions_init must be symmetric, positive-definite matrices")

    # -- fitting -----------------------------------------------------------------------------
    def _set_from(self, P: _em.Params) -> None:
        """The module's parameters from EM's (weights, means, prec_chol), in place where the
        parameters exist in that shape, dtype and device (an optimiser holding them keeps them)."""
        D = P.means.shape[-1]
        if (self.means is None or self.means.shape[-1] != D or self.means.dtype != P.means.dtype
                or self.means.device != P.means.device):
            self._build(D, P.means.dtype, P.means.device)
        with torch.no_grad():
            self.logits.copy_(P.weights.log())
            self.means.copy_(P.means)
            if self.covariance_type in ("full", "tied"):
                self.log_prec_diag.copy_(torch.diagonal(P.prec_chol, dim1=-2, dim2=-1).log())
                iu = torch.triu_indices(D, D, 1, device=P.means.device)
                self.prec_offdiag.copy_(P.prec_chol[..., iu[0], iu[1]])
            else:
                self.log_prec_diag.copy_(P.prec_chol.log())

    def _current(self) -> _em.Params:
        d = self.prec_chol.detach()
        return _em.Params(self.weights.detach(), self.means.detach(), None, d)

    def _initialize(self, X: Tensor, rng, chunk, device, dtype) -> _em.Params:
        """scikit-learn's ``_initialize_parameters`` + ``_initialize``: responsibilities from the
        chosen method, their Gaussian parameters, then the ``*_init`` overrides."""
        K, cov = self.n_components, self.covariance_type
        n_local = X.shape[0]
        start, counts = _em._offsets(n_local, device)
        n = sum(counts)
        if n < K:
            raise ValueError(f"Expected n_samples >= n_components but got n_components = {K}, n_samples = {n}")
        need = self.weights_init is None or self.means_init is None or self.precisions_init is None
        P = None
        if need:
            if self.init_params == "kmeans":
                centres = _em.kmeans(X, K, rng, chunk_size=chunk, device=device)
                resp = lambda i0, xc: _em.one_hot(_em.assign(xc, centres), K, dtype)  # noqa: E731
            elif self.init_params == "random":
                state = rng.get_state()

                def resp(i0, xc):
                    if i0 == 0:  # each pass draws the same numbers; the other processes' rows skipped
                        rng.set_state(state)
                        _skip_uniform(rng, start * K)
                    r = torch.from_numpy(rng.uniform(size=(xc.shape[0], K))).to(device, dtype)
                    if i0 + xc.shape[0] == n_local:
                        _skip_uniform(rng, (n - start - n_local) * K)
                    return r / r.sum(1, keepdim=True)
                if n_local == 0:
                    rng.set_state(state)
                    _skip_uniform(rng, n * K)
            else:
                if self.init_params == "random_from_data":
                    idx = [int(i) for i in rng.choice(n, size=K, replace=False)]
                else:
                    _, idx = _em.kmeans_plusplus(X, K, rng, chunk_size=chunk, device=device)

                def resp(i0, xc):
                    r = torch.zeros(xc.shape[0], K, dtype=dtype, device=device)
                    for col, g in enumerate(idx):
                        if start + i0 <= g < start + i0 + xc.shape[0]:
                            r[g - start - i0, col] = 1
                    return r
            P = _em.params_from_resp(X, resp, K, cov, self.reg_covar, chunk_size=chunk, device=device)
        as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64)).to(device, dtype)  # noqa: E731
        weights = as_t(self.weights_init) if self.weights_init is not None else P.weights / n
        means = as_t(self.means_init) if self.means_init is not None else P.means
        if self.precisions_init is not None:
            U = convert.precision_to_prec_chol(as_t(self.precisions_init), cov)
        else:
            U = P.prec_chol
        return _em.Params(weights, means, None, U)

    def fit(self, X, y=None) -> "GaussianMixture":
        """Estimate the parameters with EM (scikit-learn's ``fit``: ``n_init`` initialisations,
        the one with the largest lower bound kept, ``ConvergenceWarning`` when it did not
        converge); returns self."""
        self._fit(X)
        return self

    def fit_predict(self, X, y=None):
        """``fit``, then the labels of X under the fitted model (scikit-learn's ``fit_predict``)."""
        X, is_np = self._fit(X)
        labels = torch.cat([lr.argmax(1) for lr in self._log_resp(X)]) if X.shape[0] else \
            torch.zeros(0, dtype=torch.int64)
        return labels.cpu().numpy() if is_np else labels

    def _fit(self, X):
        """EM (scikit-learn's ``fit_predict`` without the labels); returns (X as a tensor, whether
        it came as numpy)."""
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.utils import check_random_state

        X, is_np = self._as_data(X, "fit", fit=True)
        device = self._work_device(X)
        dtype = torch.float64  # EM's state and M-step; the kernels run in X's dtype (_em.e_step)
        chunk = self._chunk(X, device)
        D = X.shape[1]
        if self.means is not None and self.n_features != D:
            raise ValueError(f"X has {D} features, but this GaussianMixture was built for {self.n_features}")
        self._check_estimator_params(D, dtype, device)
        do_init = not (self.warm_start and self._fitted)
        n_init = self.n_init if do_init else 1
        rng = check_random_state(self.random_state)
        best, best_lb, best_iter, best_lbs, converged_best = None, -math.inf, 0, [], False
        for init in range(n_init):
            if do_init:
                P = self._initialize(X, rng, chunk, device, dtype)
            else:
                P = self._current()
                P = _em.Params(*(None if t is None else t.to(device, dtype) for t in P))
            lower_bound = -math.inf if do_init else self.lower_bound_
            lbs, converged, n_iter = [], False, 0
            groups = {}  # the E-steps' row order (_em.e_step)
            bar = _progress(self.verbose, self.max_iter, init, n_init)
            for n_iter in range(1, self.max_iter + 1):
                prev = lower_bound
                st = _em.e_step(X, P.means, P.prec_chol, P.weights.log(), self.covariance_type,
                                backend=self.backend, chunk_size=chunk, groups=groups)
                # scikit-learn's E-step takes log weights as they are: the one-hot initialisations'
                # weights n_k/n sum to K/n, which shifts the first lower bound by log Σ w
                lower_bound = float(st.sum_logp) / st.n + float(P.weights.sum().log())
                P = _em.m_step(st, P.means, self.covariance_type, self.reg_covar, torch.finfo(X.dtype).eps)
                lbs.append(lower_bound)
                change = lower_bound - prev
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(lower_bound=f"{lower_bound:.6g}", change=f"{change:.3g}")
                    if self.verbose >= 2 and n_iter % self.verbose_interval == 0:
                        bar.write(f"  Iteration {n_iter}\t lower bound {lower_bound:.6g}\t change {change:.3g}")
                if abs(change) < self.tol:
                    converged = True
                    break
            if bar is not None:
                bar.close()
            if lower_bound > best_lb or best_lb == -math.inf:
                best, best_lb, best_iter, best_lbs, converged_best = P, lower_bound, n_iter, lbs, converged
        if not converged_best and self.max_iter > 0:
            warnings.warn("Best performing initialization did not converge. Try different init parameters, or "
                          "increase max_iter, tol, or check for degenerate data.", ConvergenceWarning, stacklevel=3)
        self._set_from(_em.Params(*(t if t is None else t.to(X.dtype) for t in best)))
        self.converged_, self.n_iter_, self.lower_bound_, self.lower_bounds_ = (
            converged_best, best_iter, best_lb, best_lbs)
        self.n_features_in_ = D
        self._fitted, self._numpy = True, is_np
        self._warn_collapsed()
        return X, is_np

    def _warn_collapsed(self) -> None:
        """Warn about components whose empirical variance in some direction is below reg_covar
        (collapsed onto a point or a subspace): reg_covar alone keeps them valid."""
        if self.reg_covar <= 0:
            return
        c = torch.as_tensor(self.covariances_)
        if self.covariance_type in ("full", "tied"):
            low = torch.linalg.eigvalsh(c.reshape(-1, *c.shape[-2:])).amin(-1)
        else:
            low = c.reshape(c.shape[0], -1).amin(-1) if self.covariance_type == "diag" else c
        bad = (low < 2 * self.reg_covar).nonzero().flatten().tolist()
        if bad:
            which = "the tied covariance" if self.covariance_type == "tied" else f"component(s) {bad}"
            warnings.warn(f"GaussianMixture: {which} collapsed (an empirical variance below reg_covar = "
                          f"{self.reg_covar:g}, e.g. all its weight on one point); reg_covar alone keeps the "
                          "covariance positive definite. Increase reg_covar, decrease n_components or rescale "
                          "the data if this is not intended.", CollapsedComponentWarning, stacklevel=4)

    # -- prediction ----------------------------------------------------------------------------
    def _log_resp(self, X: Tensor):
        device = self.means.device
        return _em.log_resp_chunks(X, self.means.detach(), self.prec_chol.detach(), self.logits.detach(),
                                   self.covariance_type, self._chunk(X, device), device)

    def _ret(self, t: Tensor, is_np: bool, dtype):
        t = t.detach()
        if is_np:
            a = t.cpu().numpy()
            return a.astype(dtype, copy=False) if a.dtype.kind == "f" else a
        return t

    def score_samples(self, X):
        """log p(x) per sample (scikit-learn's ``score_samples``), on the fused kernels."""
        X, is_np = self._as_data(X, "score_samples")
        device = self.means.device
        with torch.no_grad():
            parts = [functional._log_prob(xc.to(self.means.dtype), self.means, self.prec_chol, self.logits,
                                          self.covariance_type, backend=self.backend)
                     for xc in _em.chunks(X, self._chunk(X, device), device)]
        out = torch.cat(parts) if parts else torch.zeros(0, dtype=self.means.dtype, device=device)
        return self._ret(out, is_np, _np_dtype(X))

    def score(self, X, y=None) -> float:
        """The mean log-likelihood of X (scikit-learn's ``score``)."""
        lp = self.score_samples(X)
        return float(lp.mean())

    def predict(self, X):
        """The most probable component of each sample (scikit-learn's ``predict``)."""
        X, is_np = self._as_data(X, "predict")
        with torch.no_grad():
            lab = [lr.argmax(1) for lr in self._log_resp(X)]
        out = torch.cat(lab) if lab else torch.zeros(0, dtype=torch.int64)
        return self._ret(out, is_np, None)

    def predict_proba(self, X):
        """Responsibilities [N, K] (scikit-learn's ``predict_proba``): the one N×K result."""
        X, is_np = self._as_data(X, "predict_proba")
        with torch.no_grad():
            parts = [lr.exp() for lr in self._log_resp(X)]
        out = torch.cat(parts) if parts else torch.zeros(0, self.n_components, dtype=self.means.dtype)
        return self._ret(out, is_np, _np_dtype(X))

    def _n_parameters(self) -> int:
        return _em.n_parameters(self.covariance_type, self.n_components, self.n_features)

    def bic(self, X) -> float:
        """Bayesian information criterion on X (scikit-learn's ``bic``; tied counts one factor)."""
        n = X.shape[0]
        return -2 * self.score(X) * n + self._n_parameters() * math.log(n)

    def aic(self, X) -> float:
        """Akaike information criterion on X (scikit-learn's ``aic``)."""
        return -2 * self.score(X) * X.shape[0] + 2 * self._n_parameters()


class CollapsedComponentWarning(UserWarning):
    """A fitted component's empirical variance fell below ``reg_covar`` (see ``GaussianMixture``)."""


def _np_dtype(X: Tensor):
    return np.float32 if X.dtype == torch.float32 else np.float64


def _skip_uniform(rng, count: int) -> None:
    """Advance a numpy RandomState by ``count`` uniform draws (in bounded pieces)."""
    while count > 0:
        step = min(count, 1 << 20)
        rng.uniform(size=step)
        count -= step


def _progress(verbose: int, total: int, init: int, n_init: int):
    if not verbose:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"EM (init {init + 1}/{n_init})", leave=verbose >= 2)
