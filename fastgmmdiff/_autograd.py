"""Fake (meta) implementations and autograd for every backend's log-density op pair.

Every backend provides two registered ops with the same schemas:

    <fwd>(Tensor x, Tensor means, Tensor prec_chol, Tensor logits, str covariance_type) -> Tensor
    <bwd>(Tensor grad, Tensor x, Tensor means, Tensor prec_chol, Tensor logits, Tensor logp,
          str covariance_type) -> (Tensor, Tensor, Tensor, Tensor)

on the canonical layout of ``_checks`` (x ``[Gx, N, D]``, parameters with a G axis).  The
forward returns log p ``[G, N]`` in the accumulation dtype (float64 for float64 inputs, float32
otherwise) so that backward recomputes the responsibilities from an unrounded log p; it is the
only tensor saved besides the inputs.  The backward returns the gradients with respect to
(x, means, prec_chol, logits) in their dtypes.  ``register_log_prob_op`` wires the pair into
autograd and gives both ops fake implementations, so ``torch.compile`` traces through them.
"""

from __future__ import annotations

import torch


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_fwd(x, means, prec_chol, logits, covariance_type):
    return x.new_empty((means.shape[0], x.shape[1]), dtype=_acc(x.dtype))


def _fake_bwd(grad, x, means, prec_chol, logits, logp, covariance_type):
    return tuple(torch.empty_like(t) for t in (x, means, prec_chol, logits))


def _op(qualname: str):
    ns, name = qualname.split("::")
    return getattr(getattr(torch.ops, ns), name).default


def register_log_prob_op(fwd_name: str, bwd_name: str) -> None:
    """Register fakes for the ops ``fwd_name``/``bwd_name`` ("ns::name") and fwd's autograd."""
    torch.library.register_fake(fwd_name)(_fake_fwd)
    torch.library.register_fake(bwd_name)(_fake_bwd)
    bwd = _op(bwd_name)

    def setup_context(ctx, inputs, output):
        x, means, prec_chol, logits, cov = inputs
        ctx.save_for_backward(x, means, prec_chol, logits, output)
        ctx.cov = cov

    def backward(ctx, grad):
        x, means, prec_chol, logits, logp = ctx.saved_tensors
        gx, gm, gp, gl = bwd(grad.contiguous(), x, means, prec_chol, logits, logp, ctx.cov)
        return gx, gm, gp, gl, None

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


# --- one component per point (NGMG with target) ----------------------------------------------
#
#     <fwd>(Tensor x, Tensor means, Tensor prec_chol, Tensor target, str covariance_type) -> Tensor
#     <bwd>(Tensor grad, Tensor x, Tensor means, Tensor prec_chol, Tensor target, Tensor logp,
#           str covariance_type) -> (Tensor, Tensor, Tensor)
#
# log N(x_n; μ_t, Σ_t) [G, N] with t = target [G, N] (int64); gradients w.r.t. x, means, prec_chol.


def _fake_target_fwd(x, means, prec_chol, target, covariance_type):
    return x.new_empty((means.shape[0], x.shape[1]), dtype=_acc(x.dtype))


def _fake_target_bwd(grad, x, means, prec_chol, target, logp, covariance_type):
    return tuple(torch.empty_like(t) for t in (x, means, prec_chol))


def register_target_op(fwd_name: str, bwd_name: str) -> None:
    """Like ``register_log_prob_op`` for the one-component-per-point op pair."""
    torch.library.register_fake(fwd_name)(_fake_target_fwd)
    torch.library.register_fake(bwd_name)(_fake_target_bwd)
    bwd = _op(bwd_name)

    def setup_context(ctx, inputs, output):
        x, means, prec_chol, target, cov = inputs
        ctx.save_for_backward(x, means, prec_chol, target, output)
        ctx.cov = cov

    def backward(ctx, grad):
        x, means, prec_chol, target, logp = ctx.saved_tensors
        gx, gm, gp = bwd(grad.contiguous(), x, means, prec_chol, target, logp, ctx.cov)
        return gx, gm, gp, None, None

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)
