"""Fake (meta) implementations and autograd for every backend's log-density op pair.

Every backend provides two registered ops with the same schemas:

    <fwd>(Tensor x, Tensor means, Tensor prec_chol, Tensor logits, str covariance_type
          [, bool normalize=False]) -> Tensor
    <bwd>(Tensor grad, Tensor x, Tensor means, Tensor prec_chol, Tensor logits, Tensor logp,
          str covariance_type [, bool normalize=False]) -> (Tensor, Tensor, Tensor, Tensor)

on the canonical layout of ``_checks`` (x ``[Gx, N, D]``, parameters with a G axis); the
compiled extension's ops also take the API layout (G axes as given, result ``[N]`` when no
input has one: csrc/ops.h), which the fakes follow too.  The forward returns log p in the
accumulation dtype (float64 for float64 inputs, float32 otherwise) so that backward recomputes
the responsibilities from an unrounded log p; it is the only tensor saved besides the inputs.
The Python backends' ops (torch, Triton) take ``normalize`` too: the forward then returns
NGMG's log p̃ = log p − c with c inside the logsumexp (``_math.ngmg_const``; ``ngmg_loss``
composes its loss from it), and the backward, told the same, recomputes the same constants.
The backward returns the gradients with respect to (x, means, prec_chol, logits) in their
shapes and dtypes.  ``register_log_prob_op`` gives both ops fake implementations, so
``torch.compile`` traces through them, and wires the pair into autograd (Python), except for
the compiled extension, whose autograd is C++ (csrc/autograd.cpp).
"""

from __future__ import annotations

import torch

from ._math import acc_dtype as _acc


_PREC_DIMS = {"diag": 2, "spherical": 1, "full": 3}


def _result_shape(x, means, prec_chol, last, covariance_type):
    """[G, N] when any input has the mixture axis G, else [N] (``last``: logits or target).
    Canonical-layout inputs (every tensor with G) give [G, N]; see csrc/ops.h for the API
    layout the compiled ops also take."""
    if covariance_type not in _PREC_DIMS:
        raise ValueError(f"covariance_type must be 'diag', 'spherical' or 'full', got {covariance_type!r}")
    for t, nd in ((x, 3), (means, 3), (prec_chol, _PREC_DIMS[covariance_type] + 1), (last, 2)):
        if t.dim() == nd:
            return (t.shape[0], x.shape[-2])
    return (x.shape[-2],)


def _fake_fwd(x, means, prec_chol, logits, covariance_type, normalize=False):
    return x.new_empty(_result_shape(x, means, prec_chol, logits, covariance_type), dtype=_acc(x.dtype))


def _fake_bwd(grad, x, means, prec_chol, logits, logp, covariance_type, normalize=False):
    return tuple(torch.empty_like(t) for t in (x, means, prec_chol, logits))


def _op(qualname: str):
    ns, name = qualname.split("::")
    return getattr(getattr(torch.ops, ns), name).default


def _register(fwd_name, bwd_name, fake_fwd, fake_bwd, n_grads, fakes=True, autograd=True):
    """Fakes for both ops (unless ``fakes=False``: a ``triton_op`` derives its own), and fwd's
    autograd: save the tensor inputs and the output (log p); backward calls
    ``bwd(grad, *tensor inputs, log p, covariance_type[, normalize])``, which returns the
    gradients of the first ``n_grads`` inputs.  ``autograd=False``: fakes only (the compiled extension registers
    the same autograd in C++, csrc/autograd.cpp, to keep Python off the latency path)."""
    if fakes:
        torch.library.register_fake(fwd_name)(fake_fwd)
        torch.library.register_fake(bwd_name)(fake_bwd)
    if not autograd:
        return
    bwd = _op(bwd_name)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4], output)
        ctx.flags = inputs[4:]  # covariance_type[, normalize]

    def backward(ctx, grad):
        *tensors, logp = ctx.saved_tensors
        grads = bwd(grad.contiguous(), *tensors, logp, *ctx.flags)
        return (*grads, *([None] * (len(tensors) + len(ctx.flags) - n_grads)))

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def register_log_prob_op(fwd_name: str, bwd_name: str, fakes: bool = True, autograd: bool = True) -> None:
    """Register fakes for the ops ``fwd_name``/``bwd_name`` ("ns::name") and fwd's autograd."""
    _register(fwd_name, bwd_name, _fake_fwd, _fake_bwd, 4, fakes, autograd)


# --- one component per point (NGMG with target; the torch and Triton backends) ---------------
#
#     <fwd>(Tensor x, Tensor means, Tensor prec_chol, Tensor target, str covariance_type,
#           bool normalize=False) -> Tensor
#     <bwd>(Tensor grad, Tensor x, Tensor means, Tensor prec_chol, Tensor target, Tensor logp,
#           str covariance_type, bool normalize=False) -> (Tensor, Tensor, Tensor)
#
# log N(x_n; μ_t, Σ_t) [G, N] with t = target [G, N] (int64), or −½q_t with ``normalize``
# (NGMG's log p̃: the log-normaliser is never added); gradients w.r.t. x, means, prec_chol.


def _fake_target_fwd(x, means, prec_chol, target, covariance_type, normalize=False):
    return x.new_empty(_result_shape(x, means, prec_chol, target, covariance_type), dtype=_acc(x.dtype))


def _fake_target_bwd(grad, x, means, prec_chol, target, logp, covariance_type, normalize=False):
    return tuple(torch.empty_like(t) for t in (x, means, prec_chol))


def register_target_op(fwd_name: str, bwd_name: str, fakes: bool = True, autograd: bool = True) -> None:
    """Like ``register_log_prob_op`` for the one-component-per-point op pair."""
    _register(fwd_name, bwd_name, _fake_target_fwd, _fake_target_bwd, 3, fakes, autograd)


# --- the fused NGMG of the compiled extension -------------------------------------------------
#
#     ngmg(Tensor x, Tensor means, Tensor prec_chol, Tensor logits, Tensor? target,
#          str covariance_type, bool normalize) -> (Tensor loss, Tensor logp)
#     ngmg_backward(Tensor grad, Tensor x, Tensor means, Tensor prec_chol, Tensor logits,
#                   Tensor? target, Tensor loss, Tensor logp, str covariance_type, bool normalize)
#         -> (Tensor, Tensor, Tensor, Tensor)
#
# loss = −p̃ per point and the saved logp (log p̃ when normalised, with c inside the logsumexp;
# log p otherwise), both result-shaped; autograd is C++ (csrc/autograd.cpp).


def _fake_ngmg(x, means, prec_chol, logits, target, covariance_type, normalize):
    out = x.new_empty(_result_shape(x, means, prec_chol, logits, covariance_type), dtype=_acc(x.dtype))
    return out, torch.empty_like(out)


def _fake_ngmg_bwd(grad, x, means, prec_chol, logits, target, loss, logp, covariance_type, normalize):
    return tuple(torch.empty_like(t) for t in (x, means, prec_chol, logits))


def register_ngmg_fakes(fwd_name: str, bwd_name: str) -> None:
    torch.library.register_fake(fwd_name)(_fake_ngmg)
    torch.library.register_fake(bwd_name)(_fake_ngmg_bwd)


# --- NGMG without normalisation on the Python backends: loss = −p, which can overflow --------


def overflow_split(loss, logp, look: bool, bwd):
    """The gradients ``bwd(scale)`` (the backward with upstream grad·scale per row) for loss =
    −exp(logp), safe where p passes the dtype's largest value (loss −inf, logp finite): the
    other rows in one pass, those rows in a second one scaled by exp(−M) (M their largest
    logp), added as sign·exp(log|·| + M): ±inf where the exact term is beyond the range, the
    term where it is not, 0 where it is 0 (one pass would give inf·0 = NaN there).  ``look``:
    skip the second pass when no row overflowed (a host read; CPU tensors); otherwise it always
    runs (no sync; its weights are then 0).  csrc/ops.h overflow_split is the same in C++."""
    over = torch.isinf(loss) & torch.isfinite(logp)
    if look and not bool(over.any()):
        return bwd(loss)
    fin = bwd(loss.masked_fill(over, 0))
    m = torch.where(over, logp, float("-inf")).amax()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    big = bwd(torch.where(over, -torch.exp(logp - m), torch.zeros_like(logp)))
    out = []
    for f, b in zip(fin, big):
        b = b.to(logp.dtype)
        add = torch.where(b == 0, torch.zeros_like(b), b.sign() * torch.exp(b.abs().log() + m))
        out.append((f.to(logp.dtype) + add).to(f.dtype))
    return tuple(out)


class NegExpOfOp(torch.autograd.Function):
    """loss = −exp(op(*tensors, *flags)) for a Python backend's op pair (``<op>`` and
    ``<op>_backward``, schemas above), with ``overflow_split``'s backward: NGMG without
    normalisation, whose −p can overflow where log p cannot.  The last tensor (logits, or an
    integer target) gets no gradient when the backward returns one fewer."""

    @staticmethod
    def forward(ctx, op, flags, *tensors):
        logp = op(*tensors, *flags)
        loss = -torch.exp(logp)
        ctx.op, ctx.flags = op, flags
        ctx.save_for_backward(*tensors, loss, logp)
        return loss

    @staticmethod
    def backward(ctx, grad):
        *tensors, loss, logp = ctx.saved_tensors
        ns, name = ctx.op._qualified_op_name.split("::")
        bwd = getattr(getattr(torch.ops, ns), name + "_backward")
        grads = overflow_split(loss, logp, loss.device.type == "cpu",
                               lambda s: bwd((grad * s).contiguous(), *tensors, logp, *ctx.flags))
        return (None, None, *grads, *([None] * (len(tensors) - len(grads))))
