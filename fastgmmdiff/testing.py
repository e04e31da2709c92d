"""Random problems, the float64 oracle and the error measure shared by tests and benchmarks,
so that the thing timed is the thing checked.

Tolerances (stated once here; tests and benchmarks import them, nobody widens them):

* float32 (and float64 inputs, which must do at least as well):
  ‖out − ref‖ / ‖ref‖ ≤ 1e-5 for log p and NGMG values, ≤ 1e-4 for gradients, against the
  float64 reference on the same inputs (PERF.md's accuracy bar).
  Where the problem itself is ill-conditioned at that dtype, a gradient may instead be off by
  at most twice the error of plain PyTorch computing the same math at the inputs' dtype (the
  worse of the reference's broadcast and matmul forms): ``grad_tolerances``.  Example: the
  logits gradient Σₙ uₙ(rₙₖ − πₖ) of a few points with log-densities near −600 cancels to
  ~1e-2 while each rₙₖ carries float32 rounding of the log-density gaps, so every float32
  implementation (plain PyTorch included) lands near 1e-3 there.
* bf16 / fp16 inputs: at most twice the error of the same reference computed by plain PyTorch
  at that dtype (STYLE.md) — the package upcasts inside, so it is usually far better.
"""

from __future__ import annotations

import torch

from . import reference

RTOL_VALUE = 1e-5
RTOL_GRAD = 1e-4


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (0 when both are all-zero)."""
    out = out.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    num = torch.linalg.vector_norm(out - ref)
    den = torch.linalg.vector_norm(ref)
    if den == 0:
        return float(num)
    return float(num / den)


def assert_close_per_element(out: torch.Tensor, ref: torch.Tensor, rtol: float, what: str = "") -> None:
    """Element by element: |out − ref| ≤ rtol·(|ref| + rms(ref)), in float64 (the rms term keeps
    an element that cancels to ~0 from demanding more digits than the dtype has).  The message
    names ``what`` and how far over the bar the worst element is."""
    a, b = out.detach().double(), ref.detach().double()
    assert a.shape == b.shape, (what, a.shape, b.shape)
    if b.numel() == 0:
        return
    err, bound = (a - b).abs(), rtol * (b.abs() + b.pow(2).mean().sqrt())
    worst = (err / bound.clamp_min(1e-300)).max().item()
    assert bool((err <= bound).all()), f"{what}: worst element {worst:.3g}× the bar ({rtol:g})"


def grad_tolerances(fn, args, upstream, ref_grads) -> list:
    """The bound for each gradient of ``fn(*args)`` (module docstring): ``RTOL_GRAD``, or twice
    the error plain PyTorch makes at the inputs' dtype where that is larger.

    ``fn(*args, form=...)`` is the reference computation (``reference.gmm_log_prob`` or
    ``reference.ngmg_loss`` with its other arguments bound); ``ref_grads`` are the float64
    gradients for ``upstream`` (``None`` for an argument that does not enter).
    """
    worst = [0.0] * len(args)
    for form in ("broadcast", "matmul"):
        plain = [a.detach().clone().requires_grad_() for a in args]
        out = fn(*plain, form=form)
        grads = torch.autograd.grad(out, plain, upstream.to(out.dtype), allow_unused=True)
        for i, (g, r) in enumerate(zip(grads, ref_grads)):
            if r is not None:
                g = torch.zeros_like(r) if g is None else g
                worst[i] = max(worst[i], rel_err(g, r))
    return [max(RTOL_GRAD, 2.0 * w) for w in worst]


ARGS = ("x", "means", "prec_chol", "logits")


def check_against_reference(p: dict, covariance_type: str, backend: str, op: str = "log_prob",
                            target=None, normalize: bool = True):
    """Assert that ``backend`` matches the float64 reference on problem ``p`` (a
    :func:`random_problem` dict with ``requires_grad``): the value of ``gmm_log_prob``
    (``op="log_prob"``) or of ``ngmg_loss`` with ``reduction="none"`` (``op="ngmg"``), and every
    gradient for a random upstream, within the module's tolerances.  Returns the output."""
    from . import functional

    cov = covariance_type
    if op == "log_prob":
        def ours(*a):
            return functional.gmm_log_prob(*a, cov, backend=backend)

        def ref_fn(*a, form):
            return reference.gmm_log_prob(*a, cov, form=form)
    elif op == "ngmg":
        kw = dict(target=target, normalize=normalize, reduction="none")

        def ours(*a):
            return functional.ngmg_loss(*a, cov, backend=backend, **kw)

        def ref_fn(*a, form):
            return reference.ngmg_loss(*a, cov, form=form, **kw)
    else:
        raise ValueError(f"op must be 'log_prob' or 'ngmg', got {op!r}")
    args = [p[k] for k in ARGS]
    a64 = [t.detach().double().requires_grad_() for t in args]
    out = ours(*args)
    ref = ref_fn(*a64, form="broadcast")
    assert out.shape == ref.shape and out.dtype == args[0].dtype
    assert rel_err(out, ref) <= RTOL_VALUE
    up = torch.randn(ref.shape, dtype=torch.float64, device=ref.device)
    ga = torch.autograd.grad(out, args, up.to(out.dtype), allow_unused=True)
    gb = torch.autograd.grad(ref, a64, up, allow_unused=True)
    for name, a, b, tol in zip(ARGS, ga, gb, grad_tolerances(ref_fn, args, up, gb)):
        if b is None:  # only the logits, and only with a target, do not enter
            assert name == "logits" and target is not None and (a is None or torch.all(a == 0)), name
            continue
        assert a.shape == b.shape and a.dtype == p[name].dtype, name
        assert rel_err(a, b) <= tol, name
    return out


def random_problem(covariance_type="diag", G=None, N=64, K=4, D=3, *, dtype=torch.float32,
                   device="cpu", seed=0, x_batched=True, requires_grad=False):
    """A mixture batch and points near it, as a dict of gmm_log_prob's arguments.

    Means ~ N(0, 2²); 1/σ in [0.5, 2]; full factors are upper triangular with a diagonal in
    [0.5, 2] and off-diagonal entries ~ N(0, 0.3²); logits ~ N(0, 1).  Half the points are
    drawn from the components, half from N(0, 3²), so both near and far points are covered.
    ``G=None``: no mixture-batch axis.  ``x_batched=False`` with G: x is ``[N, D]``, shared.
    """
    g = torch.Generator().manual_seed(seed)
    gs = () if G is None else (G,)
    f64 = dict(dtype=torch.float64, generator=g)
    means = 2.0 * torch.randn(gs + (K, D), **f64)
    if covariance_type == "diag":
        prec = 0.5 + 1.5 * torch.rand(gs + (K, D), **f64)
    elif covariance_type == "spherical":
        prec = 0.5 + 1.5 * torch.rand(gs + (K,), **f64)
    elif covariance_type == "full":
        off = 0.3 * torch.randn(gs + (K, D, D), **f64)
        prec = off.triu(1) + torch.diag_embed(0.5 + 1.5 * torch.rand(gs + (K, D), **f64))
    else:
        raise ValueError(f"random_problem covers diag, spherical, full; got {covariance_type!r}")
    logits = torch.randn(gs + (K,), **f64)
    xs = (gs if x_batched else ()) + (N, D)
    far = 3.0 * torch.randn(xs, **f64)
    kidx = torch.randint(0, K, (N,), generator=g)
    anchor = means[0, kidx] if (gs and not x_batched) else means[..., kidx, :]
    near = anchor + torch.randn(xs, **f64) / 1.5
    pick = torch.rand(xs[:-1] + (1,), generator=g) < 0.5
    x = torch.where(pick, near, far)
    out = dict(x=x, means=means, prec_chol=prec, logits=logits)
    return {k: v.to(dtype=dtype, device=device).requires_grad_(requires_grad) for k, v in out.items()}


def reference_log_prob(p: dict, covariance_type: str, form: str = "broadcast"):
    """The float64 oracle for a problem dict (inputs cast to float64, graph kept)."""
    args = [p[k].to(torch.float64) for k in ("x", "means", "prec_chol", "logits")]
    return reference.gmm_log_prob(*args, covariance_type, form=form)
