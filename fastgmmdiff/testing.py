"""Random problems, the float64 oracle and the error measure shared by tests and benchmarks,
so that the thing timed is the thing checked.

The error measure (one, everywhere): element by element,

    |out − ref| ≤ bar · (|ref| + rms(ref))

against the float64 reference evaluated on exactly the inputs' values (``elementwise_error``
is the worst ratio |out − ref| / (|ref| + rms(ref)); elements equal in both, −inf rows
included, count as exact; a reference zero everywhere is judged in absolute terms).  The rms
term keeps an element that cancels to ~0 from demanding more digits than the dtype has; an error confined to one element, one row or one mixture of a
large batch is judged on its own, not diluted by the rest.

The bars (stated once here; tests and benchmarks import them, nobody widens them), ``bars(dtype)``:

* float32: 1e-5 for log p and NGMG values, 1e-4 for gradients (PERF.md's accuracy bar).
* float64: 1e-12 for values, 1e-10 for gradients: a float64 path must be a float64 path (a
  float32 accumulation of float64 inputs is ~1e-7 off and fails).
* bfloat16 / float16 (computed in float32 inside, rounded once at the end): the dtype's unit
  roundoff (2⁻⁹ for bf16, 2⁻¹¹ for fp16) plus the float32 bar.

Where the problem itself is ill-conditioned at the inputs' dtype, a gradient element may be
off by up to twice what plain PyTorch makes computing the same math (the reference's broadcast
form) at that dtype, or twice how far the float64 reference moves when the inputs move by √D
unit roundoffs of the working precision (a one-run sample of plain PyTorch can be lucky) — never
more than ``LOOSEN_CAP`` × the bar, and each time it is used a
``ToleranceLoosened`` warning says where and by how much (``gradient_bounds``).  Example: the
logits gradient Σₙ uₙ(rₙₖ − πₖ) of a few points with log-densities near −600 cancels to ~1e-2
while each rₙₖ carries float32 rounding of the log-density gaps, so every float32
implementation (plain PyTorch included) lands near 1e-3 there.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from . import reference


class Bars(NamedTuple):
    value: float
    grad: float


RTOL_VALUE = 1e-5
RTOL_GRAD = 1e-4
LOOSEN_CAP = 10.0
_BARS = {torch.float32: Bars(RTOL_VALUE, RTOL_GRAD), torch.float64: Bars(1e-12, 1e-10)}


def bars(dtype: torch.dtype) -> Bars:
    """The value and gradient bars for outputs of ``dtype`` (module docstring)."""
    if dtype in _BARS:
        return _BARS[dtype]
    if dtype in (torch.bfloat16, torch.float16):
        u = torch.finfo(dtype).eps / 2
        return Bars(u + RTOL_VALUE, u + RTOL_GRAD)
    raise ValueError(f"no accuracy bar for {dtype}")


class ToleranceLoosened(UserWarning):
    """A gradient element was judged by plain PyTorch's error on an ill-conditioned problem
    (``gradient_bounds``) instead of the bar."""


def _scale(ref: torch.Tensor) -> torch.Tensor:
    """|ref| + rms(ref), the rms over the finite elements (float64).  A reference that is zero
    everywhere (the logits gradient of a one-component mixture) has no scale of its own: it is
    judged in absolute terms (scale 1)."""
    fin = ref[torch.isfinite(ref)]
    rms = fin.pow(2).mean().sqrt() if fin.numel() else ref.new_zeros(())
    return ref.abs() + (rms if rms > 0 else 1.0)


def _errors(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|out − ref| in float64, 0 where they are equal (−inf rows included), NaN where either is."""
    a, b = out.detach().double(), ref.detach().double().to(out.device)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs()
    return torch.where(a == b, torch.zeros_like(err), err)


def elementwise_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The worst |out − ref| / (|ref| + rms(ref)) over the elements, in float64 (0 for empty
    tensors, NaN where ``out`` is NaN or unequal infinities meet)."""
    err = _errors(out, ref)
    if err.numel() == 0:
        return 0.0
    scale = _scale(ref.detach().double().to(err.device))
    ratio = torch.where(err == 0, torch.zeros_like(err), err / scale)
    if torch.isnan(ratio).any():
        return float("nan")
    return float(ratio.max())


def assert_close_per_element(out: torch.Tensor, ref: torch.Tensor, rtol: float, what: str = "") -> None:
    """Element by element: |out − ref| ≤ rtol·(|ref| + rms(ref)), in float64.  The message
    names ``what``, how far over the bar the worst element is, and where it is."""
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    assert_within(out, ref, rtol * _scale(ref.detach().double().to(out.device)), what)


def assert_within(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str = "") -> None:
    """|out − ref| ≤ ``bound`` element by element (float64; NaN never passes)."""
    err = _errors(out, ref)
    if err.numel() == 0:
        return
    ok = err <= bound
    if not bool(ok.all()):
        over = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err / bound.clamp_min(1e-300))
        i = int(over.flatten().argmax())
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), err.shape))
        raise AssertionError(f"{what}: {int((~ok).sum())} of {err.numel()} elements over the bar; worst at "
                             f"{idx}: got {out.detach().flatten()[i].item():.9g}, reference "
                             f"{ref.detach().flatten()[i].item():.9g} ({over.flatten()[i].item():.3g}× the bound)")


def gradient_bounds(fn, args, upstream, ref_grads, rtol: float) -> list:
    """The per-element bound for each gradient of ``fn(*args)``: ``rtol``·(|ref| + rms(ref)), or
    where the element is ill-conditioned at the working precision, twice the larger of plain
    PyTorch's error at the inputs' dtype and the reference's own movement under a √D-ulp change
    of the inputs (``_sensitivity``), capped at ``LOOSEN_CAP`` × the bar.  The loosened bound is only
    computed here; ``check_gradient`` warns when an element actually needs it.

    ``fn(*args, form=...)`` is the reference computation (``reference.gmm_log_prob`` or
    ``reference.ngmg_loss`` with its other arguments bound); ``ref_grads`` are the float64
    gradients for ``upstream`` (``None`` for an argument that does not enter).
    """
    plain = [a.detach().clone().requires_grad_() for a in args]
    out = fn(*plain, form="broadcast")
    grads = torch.autograd.grad(out, plain, upstream.to(out.dtype), allow_unused=True)
    sens = _sensitivity(fn, args, upstream, ref_grads)
    bounds = []
    for g, r, dr in zip(grads, ref_grads, sens):
        if r is None:
            bounds.append(None)
            continue
        g = torch.zeros_like(r) if g is None else g
        bar = rtol * _scale(r.detach().double())
        plain_err = torch.nan_to_num(_errors(g, r), nan=float("inf"))
        loose = torch.maximum(2.0 * plain_err, 2.0 * dr)
        bounds.append(torch.maximum(bar, torch.minimum(loose, LOOSEN_CAP * bar)))
    return bounds


def _sensitivity(fn, args, upstream, ref_grads, tries: int = 2) -> list:
    """Per element, how far the float64 reference gradient moves when every input moves by
    √D unit roundoffs of the working precision (float32 for every dtype but float64; random
    signs, the worst of ``tries``): about the rounding any implementation at that precision
    makes in a distance summed over D terms, whatever its summation order happens to be (plain
    PyTorch's one run is a single sample of it)."""
    D = args[1].shape[-1]
    u = (2.0 ** -53 if args[0].dtype == torch.float64 else 2.0 ** -24) * max(1.0, D ** 0.5)
    gen = torch.Generator().manual_seed(0x5EED)
    worst = [None if r is None else torch.zeros_like(r.detach().double()) for r in ref_grads]
    for _ in range(tries):
        moved = []
        for a in args:
            a64 = a.detach().double()
            if a64.is_floating_point():
                sign = torch.randint(0, 2, a64.shape, generator=gen).to(a64) * 2 - 1
                a64 = a64 * (1 + u * sign)
            moved.append(a64.requires_grad_())
        out = fn(*moved, form="broadcast")
        gs = torch.autograd.grad(out, moved, upstream.double().to(out.device), allow_unused=True)
        for i, (g, r) in enumerate(zip(gs, ref_grads)):
            if r is not None and g is not None:
                worst[i] = torch.maximum(worst[i], torch.nan_to_num(_errors(g, r), nan=0.0))
    return worst


def check_gradient(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, rtol: float, what: str = "") -> None:
    """Assert ``out`` within ``bound`` (``gradient_bounds``); warn ``ToleranceLoosened`` when an
    element passes only by the loosened part of it."""
    assert_within(out, ref, bound, what)
    err = _errors(out, ref)
    bar = rtol * _scale(ref.detach().double().to(err.device))
    n = int((err > bar).sum())
    if n:
        warnings.warn(ToleranceLoosened(
            f"{what}: {n} of {err.numel()} elements passed only by plain PyTorch's error (ill-conditioned "
            f"there); worst {float((err / bar.clamp_min(1e-300)).max()):.3g}× the bar {rtol:g}"), stacklevel=2)


ARGS = ("x", "means", "prec_chol", "logits")


def _check_gradients(ref_fn, args, upstream, grads, ref_grads, rtol: float, what: str) -> None:
    """Each of ``grads`` (named by ARGS) against its float64 ``ref_grads`` within
    ``gradient_bounds`` (``ref_fn``, ``args``, ``upstream`` as there); a ``None`` reference
    (an argument that does not enter) is the caller's to check."""
    bounds = gradient_bounds(ref_fn, args, upstream, ref_grads, rtol)
    for name, g, r, bound in zip(ARGS, grads, ref_grads, bounds):
        if r is not None:
            check_gradient(g, r, bound, rtol, f"{what} d/d{name}")


def check_against_reference(p: dict, covariance_type: str, backend: str, op: str = "log_prob",
                            target=None, normalize: bool = True):
    """Assert that ``backend`` matches the float64 reference on problem ``p`` (a
    :func:`random_problem` dict with ``requires_grad``): the value of ``gmm_log_prob``
    (``op="log_prob"``) or of ``ngmg_loss`` with ``reduction="none"`` (``op="ngmg"``), and every
    gradient for a random upstream, element by element within the bars of the inputs' dtype
    (module docstring).  Returns the output."""
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
    bar = bars(args[0].dtype)
    a64 = [t.detach().double().requires_grad_() for t in args]
    out = ours(*args)
    ref = ref_fn(*a64, form="broadcast")
    assert out.shape == ref.shape and out.dtype == args[0].dtype
    assert_close_per_element(out, ref, bar.value, f"{backend} {op} {cov} value")
    # the upstream gradient in the output's dtype, and exactly those values for the reference
    up = torch.randn(ref.shape, dtype=torch.float64, device=ref.device).to(out.dtype).double()
    ga = torch.autograd.grad(out, args, up.to(out.dtype), allow_unused=True)
    gb = torch.autograd.grad(ref, a64, up, allow_unused=True)
    for name, a, b in zip(ARGS, ga, gb):
        if b is None:  # only the logits, and only with a target, do not enter
            assert name == "logits" and target is not None and (a is None or torch.all(a == 0)), name
        else:
            assert a.shape == b.shape and a.dtype == p[name].dtype, name
    _check_gradients(ref_fn, args, up, ga, gb, bar.grad, f"{backend} {op} {cov}")
    return out


def check_dead_rows(p: dict, covariance_type: str, backend: str, dead) -> None:
    """Rows ``dead`` of ``p["x"]`` ([N, D], made dead by the caller: an infinite coordinate, a
    distance that overflows) must get log p = −inf and exactly zero ∂x; every other row's log p,
    its ∂x, and every parameter gradient (to which dead rows contribute nothing) must equal the
    float64 reference on the live rows alone, element by element within the bars, for a random
    upstream gradient."""
    from . import functional

    cov = covariance_type
    args = [p[k].detach().clone().requires_grad_() for k in ARGS]
    out = functional.gmm_log_prob(*args, cov, backend=backend)
    live = [n for n in range(out.shape[-1]) if n not in set(dead)]
    assert bool((out[..., list(dead)] == float("-inf")).all()), "dead rows must be −inf"
    up = torch.randn(out.shape, dtype=torch.float64, device=out.device).to(out.dtype)
    grads = torch.autograd.grad(out, args, up)
    assert all(bool(torch.isfinite(g).all()) for g in grads), "a dead row made a gradient non-finite"
    assert bool((grads[0][..., list(dead), :] == 0).all()), "dead rows must have zero ∂x"
    live_args = [args[0].detach()[..., live, :]] + [t.detach() for t in args[1:]]
    a64 = [t.double().requires_grad_() for t in live_args]
    ref = reference.gmm_log_prob(*a64, cov)
    bar = bars(out.dtype)
    assert_close_per_element(out[..., live], ref, bar.value, f"{backend} {cov} live rows")
    up_live = up[..., live].double()
    ref_grads = torch.autograd.grad(ref, a64, up_live)
    _check_gradients(lambda *a, form: reference.gmm_log_prob(*a, cov, form=form), live_args, up_live,
                     [grads[0][..., live, :]] + list(grads[1:]), ref_grads, bar.grad, f"{backend} {cov} live rows")


def far_rows_problem(covariance_type: str, G=None, N: int = 300, *, seed: int = 0) -> dict:
    """Points about 40σ out from two components near the origin (K = D = 2, identity
    precisions, equal weights), float32: |log p| ~ 1600, where float32 rounds log p by ~1e-4,
    while ∂x = −Σ_k r_k Λ_k z_k stays well conditioned (the means sit close together), so an
    error shared by a point's responsibilities shows in ∂x in full.  A dict of gmm_log_prob's
    arguments; ``G=None``: no mixture-batch axis."""
    g = torch.Generator().manual_seed(seed)
    gs = () if G is None else (G,)
    K, D = 2, 2
    prec = {"diag": torch.ones(gs + (K, D)), "spherical": torch.ones(gs + (K,)),
            "full": torch.eye(D).expand(gs + (K, D, D)).clone()}[covariance_type]
    return dict(x=40 * torch.randn(gs + (N, D), generator=g), means=0.1 * torch.randn(gs + (K, D), generator=g),
                prec_chol=prec, logits=torch.zeros(gs + (K,)))


def random_problem(covariance_type="diag", G=None, N=64, K=4, D=3, *, dtype=torch.float32,
                   device="cpu", seed=0, x_batched=True, requires_grad=False, far=True):
    """A mixture batch and points near it, as a dict of gmm_log_prob's arguments.

    Means ~ N(0, 2²); 1/σ in [0.5, 2]; full factors are upper triangular with a diagonal in
    [0.5, 2] and off-diagonal entries ~ N(0, 0.3²); logits ~ N(0, 1).  Half the points are
    drawn from the components, half from N(0, 3²), so both near and far points are covered.
    ``far=False``: every point drawn from the components (the draws are the same otherwise).
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
    wide = 3.0 * torch.randn(xs, **f64)
    kidx = torch.randint(0, K, (N,), generator=g)
    anchor = means[0, kidx] if (gs and not x_batched) else means[..., kidx, :]
    near = anchor + torch.randn(xs, **f64) / 1.5
    pick = (torch.rand(xs[:-1] + (1,), generator=g) < 0.5) | (not far)
    x = torch.where(pick, near, wide)
    out = dict(x=x, means=means, prec_chol=prec, logits=logits)
    return {k: v.to(dtype=dtype, device=device).requires_grad_(requires_grad) for k, v in out.items()}


def reference_log_prob(p: dict, covariance_type: str, form: str = "broadcast"):
    """The float64 oracle for a problem dict (inputs cast to float64, graph kept)."""
    args = [p[k].to(torch.float64) for k in ("x", "means", "prec_chol", "logits")]
    return reference.gmm_log_prob(*args, covariance_type, form=form)
