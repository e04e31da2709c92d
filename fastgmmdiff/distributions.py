"""``MixtureOfGaussians``: a ``torch.distributions.Distribution`` over the fused kernels.

Written for code that uses ``torch.distributions.MixtureSameFamily`` today (mixture-density
networks, mixture priors, policy heads)::

    # before
    mix = D.MixtureSameFamily(D.Categorical(logits=logits), D.Independent(D.Normal(loc, scale), 1))
    # after: the same numbers and gradients, on fastgmmdiff's kernels
    mix = MixtureOfGaussians(logits, loc, scale=scale)
    loss = -mix.log_prob(y).mean()

Shapes follow torch: ``logits [*batch, K]``, ``loc [*batch, K, D]``, the scale in one of five
forms (below), all broadcast against each other; ``batch_shape`` is ``*batch`` and
``event_shape`` is ``(D,)``.  ``log_prob(value)`` takes ``value [*sample, *batch, D]`` (the batch
part broadcasts, as in ``MixtureSameFamily``) and returns ``[*sample, *batch]``: an MDN's
``y [B, D]`` under mixtures ``[B, K, D]`` gives ``[B]``, one density per row.

Exactly one scale parameterisation:

================================  =============================================================
``scale``                         σ, broadcast against ``loc`` (``Normal``'s scale): ``[*, K, D]``
                                  is diagonal; ``[*, K, 1]`` (or a scalar) is one σ per component
                                  and runs the spherical kernels
``scale_tril``                    L, lower triangular, Σ = L Lᵀ (``MultivariateNormal``)
``covariance_matrix``             Σ
``precision_matrix``              Λ = Σ⁻¹
``precision_cholesky``            U, upper triangular, Λ = U Uᵀ (scikit-learn's
                                  ``precisions_cholesky_``: what the kernels take)
================================  =============================================================

The matrix forms are ``[*, K, D, D]``; ``[*, 1, D, D]`` or ``[D, D]`` is one matrix shared by the K
components (scikit-learn's ``tied``), run as such.  They are turned into U once, at
construction, differentiably (:mod:`fastgmmdiff.convert`), so gradients reach the parameter
you gave.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Categorical, Distribution, Independent, MultivariateNormal, Normal, constraints

from . import _dispatch, convert
from ._checks import prepare
from ._torch_ops import component_log_prob
from .functional import _log_prob

__all__ = ["MixtureOfGaussians"]

_SCALES = ("scale", "scale_tril", "covariance_matrix", "precision_matrix", "precision_cholesky")


class _UpperCholesky(constraints.Constraint):
    """Upper-triangular matrices with a positive diagonal (the transpose of torch's lower_cholesky)."""

    event_dim = 2

    def check(self, value):
        upper = (value.tril(-1) == 0).flatten(-2).all(-1)
        positive = (value.diagonal(dim1=-2, dim2=-1) > 0).all(-1)
        return upper & positive


upper_cholesky = _UpperCholesky()

_CONSTRAINTS = {
    "logits": constraints.real_vector,
    "loc": constraints.real_vector,
    "scale": constraints.positive,
    "scale_tril": constraints.lower_cholesky,
    "covariance_matrix": constraints.positive_definite,
    "precision_matrix": constraints.positive_definite,
    "precision_cholesky": upper_cholesky,
}


class _Reciprocal(torch.autograd.Function):
    """1/σ with a backward of one fused pass chain, −g·u² (autograd's `1.0 / σ` runs ~6 passes
    over [B, K, D] in its backward: at an MDN's sizes that cost more than the kernels)."""

    @staticmethod
    def forward(ctx, s):
        u = torch.reciprocal(s)
        ctx.save_for_backward(u)
        return u

    @staticmethod
    def backward(ctx, g):
        (u,) = ctx.saved_tensors
        return torch.mul(g, u).mul_(u).neg_()


def _reciprocal(s: Tensor) -> Tensor:
    return _Reciprocal.apply(s) if s.requires_grad else torch.reciprocal(s)


def _matrix_type(m: Tensor) -> str:
    return "tied" if m.dim() == 2 else "full"


def _as_g(t: Tensor, core: int, batch_shape: torch.Size) -> Tensor:
    """t (``[*b, *core dims]``, ``*b`` broadcastable to ``batch_shape``) in the functional API's
    layout: without the G axis when it does not vary over the batch, else ``[G, *core]``."""
    lead = t.shape[:t.dim() - core]
    if all(s == 1 for s in lead):
        return t.reshape(t.shape[t.dim() - core:])
    return t.expand(batch_shape + t.shape[t.dim() - core:]).reshape((-1,) + t.shape[t.dim() - core:])


class MixtureOfGaussians(Distribution):
    """A batch of Gaussian mixtures with K components in D dimensions (module docstring).

    Args:
        logits: ``[*batch, K]`` unnormalised log weights (π = softmax(logits)).
        loc: ``[*batch, K, D]`` component means.
        scale, scale_tril, covariance_matrix, precision_matrix, precision_cholesky: exactly
            one, as in the module docstring.
        validate_args: as in ``torch.distributions`` (checks the parameters' constraints at
            construction and each ``log_prob`` value's shape and support).
        backend: the fastgmmdiff backend of :meth:`log_prob` (``"auto"``: see
            :func:`fastgmmdiff.backend_for`).

    ``sample`` draws the component, then μ_k + L_k ε.  ``rsample`` is the same draw, differentiable
    in ``loc`` and the scale parameter *given* the drawn components: that is the pathwise
    gradient of an expectation with respect to the components' parameters, unbiased.  The choice
    of component is discrete and has no reparameterisation, so the weights get no gradient from
    it: ``rsample`` refuses (ValueError) when ``logits`` requires grad and K > 1, instead of
    returning a silently wrong (zero) gradient for them; use a score-function term
    (``log_prob``) for the weights, or detach them.
    """

    has_rsample = True
    support = constraints.real_vector

    def __init__(self, logits: Tensor, loc: Tensor, *, scale: Tensor | None = None,
                 scale_tril: Tensor | None = None, covariance_matrix: Tensor | None = None,
                 precision_matrix: Tensor | None = None, precision_cholesky: Tensor | None = None,
                 validate_args: bool | None = None, backend: str = "auto"):
        given = {n: v for n, v in zip(_SCALES, (scale, scale_tril, covariance_matrix, precision_matrix,
                                                precision_cholesky)) if v is not None}
        if len(given) != 1:
            raise ValueError("Exactly one of scale, scale_tril, covariance_matrix, precision_matrix or "
                             f"precision_cholesky may be specified; got {sorted(given) or 'none'}.")
        (name, p), = given.items()
        for n, t in (("logits", logits), ("loc", loc), (name, p)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{n} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{n} must have a floating dtype, got {t.dtype}")
        if logits.dim() < 1:
            raise ValueError("logits must be at least one-dimensional, [*batch, K]")
        if loc.dim() < 2:
            raise ValueError(f"loc must be at least two-dimensional, [*batch, K, D]; got shape {tuple(loc.shape)}")
        D = loc.shape[-1]
        matrix = name != "scale"
        if matrix:
            if p.dim() < 2 or p.shape[-2:] != (D, D):
                raise ValueError(f"{name} must be [*batch, K, D, D] or [D, D] with D = {D} (from loc); "
                                 f"got shape {tuple(p.shape)}")
            p_comp = p.shape[:-2] if p.dim() > 2 else (1,)  # [*, K] part
        else:
            if p.dim() == 0:
                p = p.reshape(1, 1)
            if p.shape[-1] not in (1, D):
                raise ValueError(f"scale must broadcast against loc {tuple(loc.shape)}: its last axis must be "
                                 f"D = {D} (diagonal) or 1 (one σ per component); got shape {tuple(p.shape)}")
            p_comp = p.shape[:-1] if p.dim() > 1 else (1,)
        try:
            if logits.shape == loc.shape[:-1] and tuple(p_comp) in (tuple(logits.shape), tuple(logits.shape[:-1]) + (1,)):
                comp = logits.shape  # the usual case, without broadcast_shapes' cost (~15 µs)
            else:
                comp = torch.broadcast_shapes(logits.shape, loc.shape[:-1], p_comp)
        except RuntimeError:
            raise ValueError(f"the shapes of logits {tuple(logits.shape)}, loc {tuple(loc.shape)} and {name} "
                             f"{tuple(p.shape)} do not broadcast to one [*batch, K]") from None
        batch_shape, K = comp[:-1], comp[-1]
        self._raw = (logits, loc, p)  # as given (a scalar scale as [1, 1]), for expand and the kernels
        self.backend = backend
        self.logits = logits.expand(comp)
        self.loc = loc.expand(comp + (D,))
        setattr(self, name, p.expand(comp + p.shape[-2:] if matrix else comp + (p.shape[-1],)))
        self._param_name = name
        self._K, self._D = K, D
        if not matrix:
            self.covariance_type = "spherical" if p.shape[-1] == 1 and D > 1 else "diag"
        else:
            self.covariance_type = "tied" if p.dim() == 2 or p.shape[-3] == 1 else "full"
        super().__init__(batch_shape, torch.Size((D,)), validate_args=validate_args)

        self._u_cache = None
        if matrix:  # converted once, here: a bad matrix fails at construction, as torch's do
            self._u_cache = self._make_u()

    @property
    def _u(self) -> Tensor:
        if self._u_cache is not None:
            return self._u_cache
        u = self._make_u()
        # not kept when built without autograd from a σ that requires grad (a first use under
        # torch.no_grad()): a later log_prob with gradients must reach σ
        if torch.is_grad_enabled() or not self._raw[2].requires_grad:
            self._u_cache = u
        return u

    def _make_u(self) -> Tensor:
        """U for the kernels, kept as compact as given (no batch axes a tensor does not have);
        built on first use for σ (the MDN path of log_prob takes σ itself)."""
        p, K, D, name = self._raw[2], self._K, self._D, self._param_name
        if self.covariance_type == "spherical":
            u = _reciprocal(p)[..., 0]
            u = u.expand(u.shape[:-1] + (K,)) if u.dim() >= 1 else u.expand(K)
        elif self.covariance_type == "diag":
            u = _reciprocal(p)
            u = u.expand(u.shape[:-2] + (K, D))
        else:
            to_u = {"scale_tril": convert.scale_tril_to_prec_chol,
                    "covariance_matrix": lambda m: convert.covariance_to_prec_chol(m, _matrix_type(m)),
                    "precision_matrix": lambda m: convert.precision_to_prec_chol(m, _matrix_type(m)),
                    "precision_cholesky": lambda m: m.triu()}[name]
            u = to_u(p)
            if self.covariance_type == "tied" and u.dim() > 2:
                u = u.squeeze(-3)
        return u

    # -- the parameters ----------------------------------------------------------------------
    @property
    def arg_constraints(self):
        return {k: _CONSTRAINTS[k] for k in ("logits", "loc", self._param_name)}

    @property
    def probs(self) -> Tensor:
        """π = softmax(logits), ``[*batch, K]``."""
        return torch.softmax(self.logits, -1)

    @property
    def precision_cholesky_(self) -> Tensor:
        """U, broadcast to ``[*batch, K, D]`` (diag), ``[*batch, K]`` (spherical) or ``[*batch, K, D, D]``."""
        u, K = self._u, self._K
        if self.covariance_type == "tied":
            u = u.unsqueeze(-3)
        core = {"diag": (K, self._D), "spherical": (K,)}.get(self.covariance_type, (K, self._D, self._D))
        return u.expand(self.batch_shape + core)

    def _kernel_args(self, batch_shape: torch.Size):
        logits, loc, _ = self._raw
        core = {"diag": 2, "spherical": 1, "full": 3, "tied": 2}[self.covariance_type]
        K, D = self._K, self._D
        return (_as_g(loc.expand(loc.shape[:-2] + (K, D)), 2, batch_shape), _as_g(self._u, core, batch_shape),
                _as_g(logits.expand(logits.shape[:-1] + (K,)), 1, batch_shape))

    @property
    def mixture_distribution(self) -> Categorical:
        """The component choice, ``Categorical(logits=logits)`` (as ``MixtureSameFamily``'s)."""
        return Categorical(logits=self.logits, validate_args=False)

    @property
    def component_distribution(self) -> Distribution:
        """The components as a torch distribution with batch shape ``[*batch, K]``:
        ``Independent(Normal(loc, σ), 1)`` (diag, spherical) or ``MultivariateNormal``."""
        if self.covariance_type in ("diag", "spherical"):
            return Independent(Normal(self.loc, self.stddev_components, validate_args=False), 1)
        return MultivariateNormal(self.loc, scale_tril=self.scale_tril_components, validate_args=False)

    @property
    def stddev_components(self) -> Tensor:
        """σ of each component and dimension, ``[*batch, K, D]`` (diag and spherical only)."""
        if self.covariance_type not in ("diag", "spherical"):
            raise ValueError("stddev_components is for diag and spherical mixtures; use scale_tril_components")
        return self.scale.expand(self.loc.shape)  # σ as given ([*, K, 1] broadcast for spherical)

    @property
    def scale_tril_components(self) -> Tensor:
        """L = U⁻ᵀ of each component, ``[*batch, K, D, D]`` (Σ_k = L_k L_kᵀ): torch's ``scale_tril``."""
        if self.covariance_type in ("diag", "spherical"):
            return torch.diag_embed(self.stddev_components)
        if self._param_name == "scale_tril":
            return self.scale_tril.tril()
        return convert.prec_chol_to_scale_tril(self.precision_cholesky_)

    # -- moments -----------------------------------------------------------------------------
    @property
    def mean(self) -> Tensor:
        return (self.probs.unsqueeze(-1) * self.loc).sum(-2)

    @property
    def variance(self) -> Tensor:
        """Σ_k π_k (σ²_kd + (μ_kd − mean_d)²): the law of total variance, per dimension."""
        if self.covariance_type in ("diag", "spherical"):
            var = self.stddev_components ** 2
        else:
            var = (self.scale_tril_components ** 2).sum(-1)
        dev = self.loc - self.mean.unsqueeze(-2)
        return (self.probs.unsqueeze(-1) * (var + dev * dev)).sum(-2)

    # -- shapes ------------------------------------------------------------------------------
    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        new = self._get_checked_instance(MixtureOfGaussians, _instance)
        logits, loc, p = self._raw
        name, K, D = self._param_name, self._K, self._D
        nd = 1 if name == "scale" else 2  # σ's last axis, or the matrix axes
        pk = p.shape[-nd - 1] if p.dim() > nd else 1  # the K axis as given (1: shared)
        core = p.shape[-nd:]
        MixtureOfGaussians.__init__(
            new, logits.expand(batch_shape + (K,)), loc.expand(batch_shape + (K, D)),
            **{name: p.expand(batch_shape + (pk,) + tuple(core))}, validate_args=False, backend=self.backend)
        new._validate_args = self._validate_args
        return new

    def _points(self, value: Tensor, validated: bool = False):
        """(x in the functional layout, batch shape of the result, sample shape)."""
        if self._validate_args and not validated:
            self._validate_sample(value)
        elif value.shape[-1:] != self.event_shape:
            raise ValueError(f"The right-most size of value must match event_shape: {tuple(value.shape)} "
                             f"vs {tuple(self.event_shape)}.")
        b = len(self.batch_shape)
        v = value
        if v.dim() < b + 1:
            v = v.reshape((1,) * (b + 1 - v.dim()) + tuple(v.shape))
        sample_shape = v.shape[:v.dim() - b - 1]
        vb = v.shape[v.dim() - b - 1:-1]
        out_batch = torch.broadcast_shapes(vb, self.batch_shape)
        S, D = math.prod(sample_shape), self._D
        if all(s == 1 for s in vb):  # the same points under every mixture: [S, D]
            x = v.reshape(S, D)
        else:  # [G, S, D]
            x = v.expand(sample_shape + out_batch + (D,)).reshape(S, -1, D).transpose(0, 1)
        return x, out_batch, sample_shape

    def _shape_result(self, out: Tensor, out_batch, sample_shape) -> Tensor:
        """[G, S] or [S] (from the functional API) to ``sample_shape + batch``."""
        if out.dim() == 2:
            out = out.transpose(0, 1)
        return out.reshape(sample_shape + out_batch)

    # -- densities ---------------------------------------------------------------------------
    def _one_point_args(self, value: Tensor):
        """(x, loc, σ, logits) as [G, 1, D], [G, K, D], [G, K, D] or [G, K], [G, K] views when
        ``value`` is one point per mixture (``[*batch, D]``, an MDN's y) of a diag or spherical
        mixture given by ``scale`` with every parameter at the full batch shape, on one device
        in one float32/float64 dtype, for a compiled backend; else None."""
        if self._param_name != "scale" or self.covariance_type == "tied":
            return None
        logits, loc, sigma = self._raw
        bs, K, D = self.batch_shape, self._K, self._D
        if (value.shape != bs + (D,) or len(bs) == 0 or logits.shape != bs + (K,) or loc.shape != bs + (K, D)
                or sigma.shape != bs + ((K, D) if self.covariance_type == "diag" else (K, 1))):
            return None
        dt, dev = loc.dtype, loc.device
        if (dt not in (torch.float32, torch.float64) or any(t.dtype != dt or t.device != dev
                                                            for t in (value, logits, sigma))):
            return None
        G = logits.numel() // K
        if G == 0:
            return None
        s = sigma.reshape(G, K, D) if self.covariance_type == "diag" else sigma.reshape(G, K)
        return value.reshape(G, 1, D), loc.reshape(G, K, D), s, logits.reshape(G, K)

    def log_prob(self, value: Tensor) -> Tensor:
        """log p(value): ``[*sample, *batch]``, on the fused kernels (autograd to every parameter
        and to value)."""
        if self._validate_args:
            self._validate_sample(value)
        one = self._one_point_args(value)
        if one is not None:
            c = prepare(*one, self.covariance_type)  # the usual errors (dtypes, shapes), σ shaped as U
            if _dispatch.resolve(self.backend, c.device, c).api_layout:
                # σ itself to the compiled op (1/σ and −∂U·U² inside its one autograd node, C++)
                return torch.ops.fastgmmdiff.log_prob_scale(*one, self.covariance_type).reshape(self.batch_shape)
        x, out_batch, sample_shape = self._points(value, validated=True)
        if out_batch != self.batch_shape:
            return self.expand(out_batch).log_prob(value)
        means, u, logits = self._kernel_args(out_batch)
        out = _log_prob(x, means, u, logits, self.covariance_type, backend=self.backend)
        return self._shape_result(out, out_batch, sample_shape)

    def posterior(self, value: Tensor) -> Tensor:
        """Responsibilities p(k | value), ``[*sample, *batch, K]`` (softmax over the components;
        computed in chunks of points, so memory is the result's plus a bounded work space)."""
        x, out_batch, sample_shape = self._points(value)
        if out_batch != self.batch_shape:
            return self.expand(out_batch).posterior(value)
        c = prepare(x, *self._kernel_args(out_batch), self.covariance_type)
        lp = component_log_prob(c.x, c.means, c.prec_chol, c.logits, c.covariance_type)  # [G, S, K]
        r = torch.softmax(lp, -1).to(c.dtype)
        if not c.batched:
            r = r[0]
        else:
            r = r.transpose(0, 1)
        return r.reshape(sample_shape + out_batch + (self._K,))

    # -- sampling ----------------------------------------------------------------------------
    def _draw(self, sample_shape, generator):
        shape = torch.Size(sample_shape)
        S, G, K, D = math.prod(shape), math.prod(self.batch_shape), self._K, self._D
        probs = self.probs.detach().reshape(G, K).float()
        if S == 0:
            comp = torch.zeros(G, 0, dtype=torch.long, device=probs.device)
        else:
            comp = torch.multinomial(probs, S, replacement=True, generator=generator)
        comp = comp.transpose(0, 1).reshape(shape + self.batch_shape)  # [*S, *batch]
        eps = torch.randn(shape + self.batch_shape + (D,), dtype=self.loc.dtype, device=self.loc.device,
                          generator=generator)
        full = shape + self.batch_shape + (K, D)
        pick = comp[..., None, None].expand(shape + self.batch_shape + (1, D))
        mu = self.loc.expand(full).gather(-2, pick).squeeze(-2)
        if self.covariance_type in ("diag", "spherical"):
            sd = self.stddev_components.expand(full).gather(-2, pick).squeeze(-2)
            return mu + sd * eps
        L = self.scale_tril_components
        pickm = comp[..., None, None, None].expand(shape + self.batch_shape + (1, D, D))
        Lk = L.expand(shape + L.shape).gather(-3, pickm).squeeze(-3)
        return mu + (Lk @ eps.unsqueeze(-1)).squeeze(-1)

    def sample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        """Draws ``[*sample_shape, *batch, D]`` (``generator`` for reproducible draws)."""
        with torch.no_grad():
            return self._draw(sample_shape, generator)

    def rsample(self, sample_shape=torch.Size(), generator: torch.Generator | None = None) -> Tensor:
        """Draws differentiable in ``loc`` and the scale parameter given the drawn components
        (class docstring); ValueError when ``logits`` requires grad and K > 1."""
        if self._K > 1 and self.logits.requires_grad:
            raise ValueError(
                "rsample: the component choice is discrete and has no reparameterisation, so the mixture "
                "weights would get no gradient from it (silently wrong); detach logits (gradients then reach "
                "loc and the scale parameter, unbiased), or add a score-function term for the weights "
                "(log_prob), or use sample()")
        return self._draw(sample_shape, generator)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(batch_shape={tuple(self.batch_shape)}, K={self._K}, D={self._D}, "
                f"covariance_type={self.covariance_type!r}, from {self._param_name})")
