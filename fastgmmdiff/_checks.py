"""Input checks and the canonical layout every backend receives.

Host-side checks (shapes, covariance type, dtypes, devices) always run and never read tensor
values, so they cost no device synchronisation.  Value checks (finite parameters, positive
Cholesky diagonal, NaN-free points) read values and run only when asked for
(``validate=True`` or ``FASTGMMDIFF_VALIDATE=1``).

Canonical layout handed to the ops (G = number of mixtures, 1 when the caller gave no G axis):

====================  =====================================================
``x``                 ``[Gx, N, D]`` with ``Gx`` equal to 1 (shared points) or G
``means``             ``[G, K, D]``
``prec_chol``         diag ``[G, K, D]``, spherical ``[G, K]``, full ``[G, K, D, D]``
``logits``            ``[G, K]``
====================  =====================================================

Parameters given without a G axis are broadcast with ``expand`` (autograd sums their
gradient back).  ``"tied"`` is turned into ``"full"`` with one U shared by all components.
Half-precision (bf16/fp16) parameters that are expanded so are first upcast to float32, so that
their gradient is summed in float32 and rounded to the input dtype once.
"""

from __future__ import annotations

import os

import torch

COVARIANCE_TYPES = ("diag", "spherical", "full", "tied")
REDUCTIONS = ("mean", "sum", "none")
_HALF = (torch.float16, torch.bfloat16)

# Number of dimensions of prec_chol *without* the optional G axis.
_PREC_NDIM = {"diag": 2, "spherical": 1, "full": 3, "tied": 2}


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def validate_requested(validate: bool) -> bool:
    """True when value checks must run (argument or ``FASTGMMDIFF_VALIDATE=1``)."""
    return bool(validate) or os.environ.get("FASTGMMDIFF_VALIDATE", "") not in ("", "0")


class Canonical:
    """Checked inputs: ``api`` holds them in the API layout (promoted to one dtype, "tied"
    turned into "full" with one factor per component, G axes as the caller gave them), which
    the compiled ops take directly (they canonicalise in C++); ``x``, ``means``, ``prec_chol``
    and ``logits`` are the canonical views of the module docstring, made on first use."""

    __slots__ = ("api", "covariance_type", "out_shape", "dtype", "G", "N", "K", "D", "batched", "_views")

    def __init__(self, api, covariance_type, out_shape, dtype, G, N, K, D, batched):
        self.api = api  # (x, means, prec_chol, logits)
        self.covariance_type = covariance_type  # "diag" | "spherical" | "full"
        self.out_shape = out_shape  # (N,) or (G, N)
        self.dtype = dtype  # promoted dtype of the inputs (result dtype)
        self.G, self.N, self.K, self.D, self.batched = G, N, K, D, batched
        self._views = None

    def _canonical(self):
        if self._views is None:
            x, m, p, lg = self.api
            G, K, D = self.G, self.K, self.D
            pd = _PREC_NDIM[self.covariance_type]
            # A parameter shared by G > 1 mixtures gets the sum of G gradients (expand's backward):
            # bf16/fp16 ones are expanded in float32 so that the sum is formed there and rounded
            # once (the ops take mixed dtypes and return each gradient in its input's dtype).
            up = (lambda t: t.float()) if G > 1 and self.dtype in _HALF else (lambda t: t)
            x = x.unsqueeze(0) if x.dim() == 2 else x
            m = up(m).expand(G, K, D) if m.dim() == 2 else m
            p = up(p).expand((G,) + tuple(p.shape)) if p.dim() == pd else p
            lg = up(lg).expand(G, K) if lg.dim() == 1 else lg
            self._views = (x, m, p, lg)
        return self._views

    x = property(lambda self: self._canonical()[0])  # [Gx, N, D]
    means = property(lambda self: self._canonical()[1])  # [G, K, D]
    prec_chol = property(lambda self: self._canonical()[2])  # per covariance type, with G
    logits = property(lambda self: self._canonical()[3])  # [G, K]

    @property
    def device(self):
        return self.api[0].device


def check_covariance_type(covariance_type) -> str:
    if not isinstance(covariance_type, str):
        raise TypeError(f"covariance_type must be a string ({', '.join(map(repr, COVARIANCE_TYPES))}), "
                        f"got {type(covariance_type).__name__}")
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(
            f"covariance_type must be one of {', '.join(map(repr, COVARIANCE_TYPES))}; "
            f"got {covariance_type!r}"
        )
    return covariance_type


def prepare(x, means, prec_chol, logits, covariance_type) -> Canonical:
    """Check shapes, dtypes and devices (reads no values); see ``Canonical``.

    Written for the latency regime: no tensor op runs unless a dtype must change or "tied"
    must be expanded."""
    cov = check_covariance_type(covariance_type)
    named = (("x", x), ("means", means), ("prec_chol", prec_chol), ("logits", logits))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    dev = x.device
    if means.device != dev or prec_chol.device != dev or logits.device != dev:
        listing = ", ".join(f"{n} on {t.device}" for n, t in named)
        raise ValueError(f"all tensors must be on one device; got {listing}")

    md = means.dim()
    if md not in (2, 3):
        raise ValueError(f"means must be [K, D] or [G, K, D]; got shape {_shape(means)}")
    ms = means.shape
    K, D = ms[-2], ms[-1]
    if K == 0:
        raise ValueError("the mixture has no components: means has K = 0 " f"(shape {_shape(means)})")
    if D == 0:
        raise ValueError(f"points must have at least one dimension: means has D = 0 (shape {_shape(means)})")
    xd, xs = x.dim(), x.shape
    if xd not in (2, 3) or xs[-1] != D:
        raise ValueError(
            f"x must be [N, D] or [G, N, D] with D = {D} (from means {_shape(means)}); "
            f"got x of shape {_shape(x)}"
        )

    pd = _PREC_NDIM[cov]
    want = {"diag": (K, D), "spherical": (K,), "full": (K, D, D), "tied": (D, D)}[cov]
    pdim, ps = prec_chol.dim(), prec_chol.shape
    if pdim not in (pd, pd + 1) or tuple(ps[-pd:]) != want:
        expect = {
            "diag": f"[K, D] = [{K}, {D}]",
            "spherical": f"[K] = [{K}]",
            "full": f"[K, D, D] = [{K}, {D}, {D}]",
            "tied": f"[D, D] = [{D}, {D}]",
        }[cov]
        raise ValueError(
            f"prec_chol for covariance_type={cov!r} must be {expect}, with an optional "
            f"leading G axis; got shape {_shape(prec_chol)} (means {_shape(means)})"
        )
    ld = logits.dim()
    if ld not in (1, 2) or logits.shape[-1] != K:
        raise ValueError(
            f"logits must be [K] or [G, K] with K = {K} (from means {_shape(means)}); "
            f"got shape {_shape(logits)}"
        )

    # The mixture-batch axis: every tensor that carries one must agree.
    gs = {}
    if xd == 3:
        gs["x"] = xs[0]
    if md == 3:
        gs["means"] = ms[0]
    if pdim == pd + 1:
        gs["prec_chol"] = ps[0]
    if ld == 2:
        gs["logits"] = logits.shape[0]
    G = 1
    if gs:
        vals = list(gs.values())
        G = vals[0]
        if any(v != G for v in vals):
            listing = ", ".join(f"{n} {_shape(dict(named)[n])}" for n in gs)
            raise ValueError(f"the mixture-batch axis G differs between tensors: {listing}")
    N = xs[-2]

    dtype = x.dtype
    if not (means.dtype == dtype and prec_chol.dtype == dtype and logits.dtype == dtype):
        for t in (means, prec_chol, logits):
            dtype = torch.promote_types(dtype, t.dtype)
        x, means, prec_chol, logits = (t.to(dtype) for t in (x, means, prec_chol, logits))
    if cov == "tied":  # one full factor, shared by the K components
        if dtype in _HALF:  # its gradient sums K terms: in float32, rounded once (one dtype for the ops)
            x, means, prec_chol, logits = (t.float() for t in (x, means, prec_chol, logits))
        prec_chol = prec_chol.unsqueeze(-3).expand(tuple(ps[:-2]) + (K, D, D))
        cov = "full"
    out_shape = (G, N) if gs else (N,)
    return Canonical((x, means, prec_chol, logits), cov, out_shape, dtype, G, N, K, D, bool(gs))


def check_values(c: Canonical) -> None:
    """Raise ValueError naming the first bad component (reads values: syncs the device)."""
    G, K = c.logits.shape

    def where(mask_gk: torch.Tensor) -> str:
        g, k = (int(i) for i in mask_gk.nonzero()[0])
        return f"g={g}, k={k}" if G > 1 else f"k={k}"

    bad = ~torch.isfinite(c.means).all(-1)
    if bad.any():
        raise ValueError(f"means[{where(bad)}] has a non-finite entry")
    if c.covariance_type == "spherical":
        diag = c.prec_chol.unsqueeze(-1)
        full_ok = torch.isfinite(c.prec_chol)
    elif c.covariance_type == "diag":
        diag = c.prec_chol
        full_ok = torch.isfinite(c.prec_chol).all(-1)
    else:
        diag = torch.diagonal(c.prec_chol, dim1=-2, dim2=-1)
        full_ok = torch.isfinite(c.prec_chol.triu()).flatten(-2).all(-1)
    bad = ~full_ok
    if bad.any():
        raise ValueError(f"prec_chol[{where(bad)}] has a non-finite entry")
    bad = ~(diag > 0).all(-1)
    if bad.any():
        raise ValueError(
            f"prec_chol[{where(bad)}] has a non-positive diagonal entry; the precision "
            "Cholesky factor must have a positive diagonal (scikit-learn's precisions_cholesky_)"
        )
    bad = torch.isnan(c.logits) | (c.logits == float("inf"))
    if bad.any():
        raise ValueError(f"logits[{where(bad)}] is NaN or +inf")
    dead = (c.logits == float("-inf")).all(-1)
    if dead.any():
        g = int(dead.nonzero()[0, 0])
        raise ValueError(f"logits of mixture g={g} are all -inf: the mixture has no weight")
    if torch.isnan(c.x).any():
        idx = torch.isnan(c.x).any(-1).nonzero()[0]
        raise ValueError(f"x has a NaN coordinate at point n={int(idx[1])}")


def check_target(target, out_shape, K: int, device, check_range: bool = True) -> torch.Tensor:
    """Check an NGMG ``target`` (component index per point); return it as int64 ``out_shape``.
    ``check_range=False``: the backend's op checks the range itself (saves reading the values
    here, twice, on the latency path)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be an integer torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must have an integer dtype, got {target.dtype}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but the points are on {device}")
    N = out_shape[-1]
    if tuple(target.shape) != tuple(out_shape) and tuple(target.shape) != (N,):
        allowed = f"{tuple(out_shape)}" + (f" or ({N},)" if len(out_shape) == 2 else "")
        raise ValueError(f"target must have shape {allowed} (one index per point); got {_shape(target)}")
    t = target.long().expand(out_shape) if len(out_shape) == 2 else target.long()
    # Range check: reads values, but an out-of-range index would otherwise crash the device
    # (CUDA assert) or read out of bounds.  Skipped only while tracing/capturing, where a sync
    # is impossible.
    if check_range and t.numel() and not torch.compiler.is_compiling() and not (
            torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= K:
            bad = lo if lo < 0 else hi
            raise ValueError(f"target holds {bad}, outside the component range [0, {K})")
    return t


def check_scales(scales) -> tuple:
    """NGMG's bandwidth factors: a non-empty sequence (or 1-D tensor) of positive finite numbers,
    as a tuple of floats (they are constants: no gradient flows to them)."""
    if isinstance(scales, torch.Tensor):
        if scales.dim() != 1:
            raise ValueError(f"scales must be a 1-D sequence of positive numbers; got a tensor of shape "
                             f"{tuple(scales.shape)}")
        scales = scales.tolist()
    try:
        vals = tuple(float(s) for s in scales)
    except TypeError:
        raise TypeError(f"scales must be a sequence of positive numbers, e.g. (1, 2, 4); got "
                        f"{type(scales).__name__}") from None
    if not vals:
        raise ValueError("scales is empty: give at least one bandwidth factor (or scales=None)")
    bad = [s for s in vals if not (s > 0 and s < float("inf"))]
    if bad:
        raise ValueError(f"scales must be positive and finite; got {bad[0]!r}")
    return vals


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}; got {reduction!r}"
        )
    return reduction


def reduce(loss, reduction: str):
    """Apply a checked ``reduction``: ``"none"`` as is, ``"sum"``, or ``"mean"`` over every
    element (0 when there are none, not NaN)."""
    if reduction == "none":
        return loss
    if reduction == "sum" or loss.numel() == 0:
        return loss.sum()
    return loss.mean()
