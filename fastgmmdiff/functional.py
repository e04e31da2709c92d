"""The public functional API: ``gmm_log_prob`` and ``ngmg_loss``.

Both check their inputs (``_checks``), put them in the canonical layout, pick a backend for the
tensors' device (``_dispatch``) and call that backend's registered op, whose autograd is
registered in ``_autograd``.  The math is SPEC §1 and §2; the docstrings below restate it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _autograd, _checks, _dispatch
from ._math import acc_dtype


def _empty_like_result(c: _checks.Canonical, shape) -> Tensor:
    # Keeps the result attached to the graph (zero gradients) when N = 0.
    x, means, prec, logits = c.api
    tie = x.sum() + means.sum() + prec.sum() + logits.sum()
    return x.new_zeros(shape, dtype=acc_dtype(c.dtype)) + 0 * tie


def _run_log_prob(c: _checks.Canonical, b: _dispatch.Backend) -> Tensor:
    """log p shaped like the result (``c.out_shape``) in the accumulation dtype, through backend
    ``b``'s op.  Ops that take the API layout get the tensors as they are (no view ops, no
    view nodes in the graph); the others get the canonical views."""
    if b.api_layout:
        return b.op()(*c.api, c.covariance_type)
    lp = b.op()(c.x.contiguous(), c.means.contiguous(), c.prec_chol.contiguous(),
                c.logits.contiguous(), c.covariance_type)
    return lp if c.batched else lp.reshape(c.out_shape)


def _setup(x, means, prec_chol, logits, covariance_type, backend, validate, has_target=False):
    c = _checks.prepare(x, means, prec_chol, logits, covariance_type)
    if _checks.validate_requested(validate):
        _checks.check_values(c)
    return c, _dispatch.resolve(backend, c.device, c, has_target)


def gmm_log_prob(x: Tensor, means: Tensor, prec_chol: Tensor, logits: Tensor,
                 covariance_type: str = "diag", *, backend: str = "auto",
                 validate: bool = False) -> Tensor:
    r"""Log-density of a batch of Gaussian mixtures.

    .. math::
        \log p(x_n) = \operatorname{logsumexp}_k\Big[\log\pi_k + \sum_d \log U_k[d,d]
        - \tfrac D2 \log 2\pi - \tfrac12 \lVert U_k^\top (x_n - \mu_k)\rVert^2\Big],
        \qquad \pi = \operatorname{softmax}(\text{logits})

    Args:
        x: points, ``[N, D]`` or ``[G, N, D]``. A ``[N, D]`` x under G mixtures is evaluated
            under every mixture (the *outer* form: ``[G, N]`` results, G·N work); ``[G, N, D]``
            pairs the points of row g with mixture g. A mixture-density network's one point per
            mixture is ``x.unsqueeze(1)``: ``[G, 1, D]`` → ``[G, 1]`` (or use
            :class:`fastgmmdiff.distributions.MixtureOfGaussians`, which takes torch's
            broadcasting). ``[N, D]`` with N = G > 1 warns (:class:`OuterEvaluationWarning`).
        means: ``[K, D]`` or ``[G, K, D]``.
        prec_chol: Cholesky factor U of the precision Λ = U Uᵀ (scikit-learn's
            ``precisions_cholesky_``): diag ``[K, D]`` and spherical ``[K]`` hold 1/σ; full
            ``[K, D, D]`` is upper triangular with a positive diagonal (entries below the
            diagonal are ignored); tied ``[D, D]`` is one full factor for all components.
            Each with an optional leading G axis.
        logits: ``[K]`` or ``[G, K]``, unnormalised log weights.
        covariance_type: ``"diag"`` (default), ``"spherical"``, ``"full"`` or ``"tied"``.
        backend: ``"auto"`` or one of :func:`fastgmmdiff.available_backends`.
        validate: also check values (finite parameters, positive Cholesky diagonal, no NaN
            in x); syncs the device. ``FASTGMMDIFF_VALIDATE=1`` turns it on everywhere.

    Returns:
        ``[N]``, or ``[G, N]`` when any input has the G axis, in the promoted input dtype
        (computed in float32, or float64 for float64 inputs). A point whose every component
        density underflows or whose distance overflows gets −inf and zero gradients.
    """
    c, b = _setup(x, means, prec_chol, logits, covariance_type, backend, validate)
    _warn_outer(c, x, "gmm_log_prob")
    return _log_prob_of(c, b)


def _log_prob_of(c: _checks.Canonical, b) -> Tensor:
    if c.N == 0:
        return _empty_like_result(c, c.out_shape).to(c.dtype)
    logp = _run_log_prob(c, b)
    return logp if logp.dtype == c.dtype else logp.to(c.dtype)


def _log_prob(x, means, prec_chol, logits, covariance_type, *, backend="auto") -> Tensor:
    """:func:`gmm_log_prob` without the outer-evaluation warning (for callers that mean it)."""
    return _log_prob_of(*_setup(x, means, prec_chol, logits, covariance_type, backend, False))


class OuterEvaluationWarning(UserWarning):
    """A ``[N, D]`` x under N mixtures: every point under every mixture (``[N, N]``), which is
    what a mixture-density network's loss does *not* want."""


def _warn_outer(c: _checks.Canonical, x: Tensor, fn: str) -> None:
    if x.dim() == 2 and c.batched and c.G == c.N and c.G > 1:
        import warnings

        warnings.warn(
            f"{fn}: x is [N, D] = {list(x.shape)} and the parameters hold G = {c.G} mixtures: every point is "
            f"evaluated under every mixture, giving [G, N] = [{c.G}, {c.N}] (G·N work). For one point per "
            "mixture (a mixture-density network: row i under mixture i) pass x.unsqueeze(1) ([G, 1, D] -> "
            "[G, 1]) or use fastgmmdiff.distributions.MixtureOfGaussians. If you mean every point under "
            "every mixture, pass x.expand(G, N, D) or filter fastgmmdiff.OuterEvaluationWarning.",
            OuterEvaluationWarning, stacklevel=3)


def _python_ngmg(c: _checks.Canonical, b, t: Tensor | None, normalize: bool) -> Tensor:
    """NGMG's per-point loss through a Python backend's op pair, shaped like the result
    (``c.out_shape``), accumulation dtype: −p̃ with ``normalize`` (the op returns log p̃, the
    normaliser inside the logsumexp; with a target −½‖U_tᵀ(z − μ_t)‖², the log-normaliser never
    added, so never cancelled), else −p, which can overflow where log p cannot
    (``_autograd.NegExpOfOp`` keeps NaN out of its gradients).  With a target the backend's
    target op reads only the target's component for each point.  The compiled backends run the
    fused ``fastgmmdiff::ngmg`` op instead."""
    op, last = (b.op(), c.logits) if t is None else (b.target_op(), t.reshape(c.G, c.N))
    args = (c.x.contiguous(), c.means.contiguous(), c.prec_chol.contiguous(), last.contiguous())
    if normalize:
        loss = -torch.exp(op(*args, c.covariance_type, True))
    else:
        loss = _autograd.NegExpOfOp.apply(op, (c.covariance_type, False), *args)
    return loss.reshape(c.out_shape)


def backend_for(x: Tensor, means: Tensor, prec_chol: Tensor, logits: Tensor, covariance_type: str = "diag", *,
                target: Tensor | None = None) -> _dispatch.BackendChoice:
    """Which backend ``backend="auto"`` runs for these tensors, and why the ones before it in
    the device's order were passed over (not available here, or a limit of theirs: e.g. the CUDA
    kernels' shared memory at this D).  ``print()`` it for a readable account::

        >>> print(fastgmmdiff.backend_for(x, means, prec_chol, logits))
        backend='auto' on cpu tensors picks 'cpu'
          cpu: picked
          torch: not reached

    ``target``: as in :func:`ngmg_loss` (the NGMG-with-target path has limits of its own).
    """
    c = _checks.prepare(x, means, prec_chol, logits, covariance_type)
    return _dispatch.explain(c.device, c, target is not None)


def ngmg_loss(z: Tensor, means: Tensor, prec_chol: Tensor, logits: Tensor,
              covariance_type: str = "diag", *, target: Tensor | None = None,
              normalize: bool = True, reduction: str = "mean", backend: str = "auto",
              validate: bool = False, scales=None) -> Tensor:
    r"""Negative Gaussian-mixture density loss; its gradient is the NGMG (SPEC §2).

    .. math::
        \text{loss}_n = -\tilde p(z_n), \qquad \log\tilde p(z) = \log p(z) - c,\qquad
        c = \operatorname{sg}\Big(\operatorname{logsumexp}_k(\log\pi_k + \log|U_k|)
        - \tfrac D2\log 2\pi\Big)

    c is the log of Σ_k π_k N(μ_k; μ_k, Σ_k) ≥ p, so p̃ ∈ (0, 1] and does not underflow where p
    does. ∂loss_n/∂z_n = p̃_n Σ_k r_nk Λ_k (z_n − μ_k) = −p̃_n ∇ log p(z_n): bounded, and small
    for far outliers.

    Args:
        z: points, ``[N, D]`` or ``[G, N, D]`` (e.g. an auxiliary classifier's outputs).
        means, prec_chol, logits, covariance_type: the mixture, as in :func:`gmm_log_prob`.
        target: optional integer tensor ``[N]`` or ``[G, N]``: restricts p to one component
            per point, p̃ = exp(−½‖U_tᵀ(z − μ_t)‖²) (normalize) or N(z; μ_t, Σ_t).
        normalize: divide by exp(c) (default). ``False`` gives loss = −p.
        reduction: ``"mean"`` (over every point of every mixture; 0 for no points),
            ``"sum"`` or ``"none"`` (shape ``[N]`` or ``[G, N]``).
        backend, validate: as in :func:`gmm_log_prob`.
        scales: multi-scale NGMG: bandwidth factors s_j, e.g. ``(1, 2, 4, 8, 16, 32)``; the
            loss is Σ_j s_j L_j / Σ_j s_j with L_j the normalised NGMG of the mixture whose
            covariances are all scaled by s_j² (U/s_j), target or not.  A scale-s term's pull
            peaks at e^{−1/2}/(sσ) at distance sσ, so the weights s_j keep each scale's peak
            equal and the gradient's magnitude roughly flat from σ to s_max·σ, where one scale's
            vanishes beyond a few σ (README, "Choose σ").  One pass of the fused op per scale;
            needs ``normalize=True``.
    """
    if isinstance(covariance_type, Tensor):
        raise TypeError("ngmg_loss: covariance_type (the fifth argument) got a tensor; did you mean "
                        "target=...? (target is keyword-only: ngmg_loss(z, means, prec_chol, logits, "
                        "target=labels))")
    _checks.check_reduction(reduction)
    if scales is not None:
        sc = _checks.check_scales(scales)
        if not normalize:
            raise ValueError("scales: multi-scale NGMG is defined on the normalised loss; drop normalize=False")
        if not isinstance(prec_chol, Tensor):
            raise TypeError(f"prec_chol must be a torch.Tensor, got {type(prec_chol).__name__}")
        total = sum(sc)
        parts = [ngmg_loss(z, means, prec_chol / s, logits, covariance_type, target=target, reduction="none",
                           backend=backend, validate=validate) * (s / total) for s in sc]
        return _checks.reduce(sum(parts[1:], parts[0]), reduction)
    c, b = _setup(z, means, prec_chol, logits, covariance_type, backend, validate, target is not None)
    _warn_outer(c, z, "ngmg_loss")
    if target is None:
        t = None
    else:
        t = _checks.check_target(target, c.out_shape, c.K, c.device, check_range=not b.checks_target_range)
    if c.N == 0:
        loss = _empty_like_result(c, c.out_shape)
    elif b.api_layout:  # the compiled extension's fused NGMG (loss and its epilogue in the kernel)
        loss = torch.ops.fastgmmdiff.ngmg(*c.api, t, c.covariance_type, normalize)[0]
    else:
        loss = _python_ngmg(c, b, t, normalize)
    loss = _checks.reduce(loss, reduction)
    return loss if loss.dtype == c.dtype else loss.to(c.dtype)
