"""Random problems, the float64 oracle and the error measure shared by tests and benchmarks,
so that the thing timed is the thing checked.

The error measure (one, everywhere): element by element,

    |out − ref| ≤ bar · (|ref| + rms(ref)) + tiny

(tiny: the output dtype's smallest normal number — a true value below it, such as an NGMG value
of 1e-100 far out, has nothing in float32 to meet but 0 or a subnormal; the NGMG gradient terms
−p̃ₙ ∇log pₙ of such a point go with it, even where the product would be a normal number: an
NGMG gradient element over its bound may be off by the sum of those points' |terms|)

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
implementation (plain PyTorch included) lands near 1e-3 there.  A parameter gradient is a
sum over points; where it cancels by chance (a random upstream: about one element in 2000 sums
to 1e-4 of its terms) float32 summation alone misses the bar, and such an element may be off by
2·N·u·Σₙ|tₙ| (the a-priori bound of a sum of N terms in unit roundoff u, from the reference's
per-point Jacobian; ``_summation_floor``), within the same cap.  What the loosening no longer
covers: far points with tied components (the backends compute r as the softmax of ℓ, and the
reference does too, ``reference.logsumexp``), and far points whose distance squared overflows
(scaled before the square: tests/test_extremes.py).
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


def _underflow(dtype: torch.dtype) -> float:
    """The absolute slack every bound carries: the smallest normal number of ``dtype``.  A true
    value below it (an NGMG value of 1e-100 far out) has no float32 representation to meet; 0
    or a subnormal is the dtype's answer."""
    return torch.finfo(dtype).tiny if dtype.is_floating_point else 0.0


def assert_close_per_element(out: torch.Tensor, ref: torch.Tensor, rtol: float, what: str = "") -> None:
    """Element by element: |out − ref| ≤ rtol·(|ref| + rms(ref)) + the dtype's smallest normal
    (``_underflow``), in float64.  The message names ``what``, how far over the bar the worst
    element is, and where it is."""
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    assert_within(out, ref, rtol * _scale(ref.detach().double().to(out.device)) + _underflow(out.dtype), what)


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
        bounds.append(plain_bounds(g, r, rtol, moved=dr, dtype=args[0].dtype))
    return bounds


def plain_bounds(plain: torch.Tensor, ref: torch.Tensor, rtol: float, moved=None, dtype=None) -> torch.Tensor:
    """The loosening rule (module docstring) per element: ``rtol``·(|ref| + rms(ref)) + the
    smallest normal of ``dtype`` (default: plain's), or where plain PyTorch's own result at the
    working dtype (``plain``: the reference's formulas run at that dtype) is further off — far
    points near a tie of components — twice plain PyTorch's error (or twice ``moved``, the
    reference's own movement, where larger: ``gradient_bounds``), capped at ``LOOSEN_CAP`` × the
    bar.  Also for sums over points that are no gradient of one output (the E-step's N_k, S1,
    S2).  ``check_gradient`` warns when an element needs the loosened part."""
    bar = rtol * _scale(ref.detach().double()) + _underflow(plain.dtype if dtype is None else dtype)
    loose = 2.0 * torch.nan_to_num(_errors(plain, ref), nan=float("inf"))
    if moved is not None:
        loose = torch.maximum(loose, 2.0 * moved)
    return torch.maximum(bar, torch.minimum(loose, LOOSEN_CAP * bar))


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
    bar = rtol * _scale(ref.detach().double().to(err.device)) + _underflow(out.dtype)
    n = int((err > bar).sum())
    if n:
        warnings.warn(ToleranceLoosened(
            f"{what}: {n} of {err.numel()} elements passed only by plain PyTorch's error (ill-conditioned "
            f"there); worst {float((err / bar.clamp_min(1e-300)).max()):.3g}× the bar {rtol:g}"), stacklevel=2)


ARGS = ("x", "means", "prec_chol", "logits")


def _check_gradients(ref_fn, args, upstream, grads, ref_grads, rtol: float, what: str,
                     underflow: bool = False) -> None:
    """Each of ``grads`` (named by ARGS) against its float64 ``ref_grads`` within
    ``gradient_bounds`` (``ref_fn``, ``args``, ``upstream`` as there); a ``None`` reference
    (an argument that does not enter) is the caller's to check.  ``underflow`` (NGMG): an
    element over its bound may also take the terms of the points whose value underflows
    (``_point_terms``)."""
    bounds = gradient_bounds(ref_fn, args, upstream, ref_grads, rtol)
    for i, (name, g, r, bound) in enumerate(zip(ARGS, grads, ref_grads, bounds)):
        if r is None:
            continue
        if bool((_errors(g, r) > bound).any()):
            if i > 0:
                floor = _summation_floor(ref_fn, args, upstream, i)
                if floor is not None:
                    bound = torch.maximum(bound, torch.minimum(floor, LOOSEN_CAP * rtol * _scale(r.detach().double())))
            if underflow:
                lost = _point_terms(ref_fn, args, upstream, i, lambda out: out.abs() < _underflow(args[0].dtype))
                if lost is not None:
                    bound = bound + lost
        check_gradient(g, r, bound, rtol, f"{what} d/d{name}")


def _point_terms(ref_fn, args, upstream, index: int, which=None, max_elems: int = 5e7):
    """Σ_n |t_n| per element of argument ``index``'s gradient, t_n = upstream_n·∂out_n/∂θ the
    per-point terms, from the float64 reference's Jacobian: over every output element, or over
    those where ``which(out)`` holds.  None when the Jacobian would be too large.

    Used for two floors, each computed only for an element over the other bounds:
    * ``_summation_floor``: a gradient summed over the points in the working precision (unit
      roundoff u), in any order, is off by at most (N − 1)·u·Σ_n |t_n|;
    * NGMG values below the dtype's smallest normal (module docstring: the value's own slack):
      such a point's term −p̃_n ∇log p_n has no p̃_n to be formed from in that dtype (0 or a
      subnormal with a few bits), though the product may be a normal number where the score is
      large (p̃ = 1e-45 far from a sharp component, ∂x ~ 1e-34); its terms are what is lost."""
    a64 = [a.detach().double() for a in args]
    out = ref_fn(*a64, form="broadcast")
    if out.numel() * a64[index].numel() > max_elems:
        return None

    def f(theta):
        return ref_fn(*(a64[:index] + [theta] + a64[index + 1:]), form="broadcast")

    jac = torch.autograd.functional.jacobian(f, a64[index], vectorize=True)  # out.shape + θ.shape
    mask = torch.ones_like(out) if which is None else which(out).to(out.dtype)
    up = (upstream.double() * mask).reshape(out.shape + (1,) * a64[index].dim())
    return (up * jac).abs().flatten(0, out.dim() - 1).sum(0)


def _summation_floor(ref_fn, args, upstream, index: int):
    """A parameter's gradient is a sum over the points of per-point terms t_n; summed in the
    working precision (unit roundoff u) in any order, its error is at most (N − 1)·u·Σ_n |t_n|.
    Where the sum cancels (a random-sign upstream makes Σ_n g_n (r_nk − π_k) ~1e-4 of its terms
    about once in 2000 elements) that, not the kernel, sets the attainable accuracy.  Returns
    2·N·u·Σ_n |t_n| per element (``_point_terms``), or None when the Jacobian would be too
    large."""
    terms = _point_terms(ref_fn, args, upstream, index)
    if terms is None:
        return None
    u = 2.0 ** -53 if args[0].dtype == torch.float64 else 2.0 ** -24
    return 2.0 * upstream.numel() * u * terms


def check_against_reference(p: dict, covariance_type: str, backend: str, op: str = "log_prob",
                            target=None, normalize: bool = True, upstream: str = "normal", scales=None):
    """Assert that ``backend`` matches the float64 reference on problem ``p`` (a
    :func:`random_problem` dict with ``requires_grad``): the value of ``gmm_log_prob``
    (``op="log_prob"``) or of ``ngmg_loss`` with ``reduction="none"`` (``op="ngmg"``), and every
    gradient for an upstream gradient (``"normal"``: random N(0, 1) per element; ``"ones"``: the
    gradient of the sum) element by element within the bars of the inputs' dtype (module
    docstring).  A random-sign upstream makes the parameter gradients sums that cancel by chance
    (1 in ~2000 elements to 1e-4 of their terms, where float32 summation alone misses the bar);
    ``"ones"`` keeps that for the fixed points of EM.  ``scales``: multi-scale NGMG (op="ngmg").
    Returns the output."""
    from . import functional

    cov = covariance_type
    if op == "log_prob":
        def ours(*a):
            return functional.gmm_log_prob(*a, cov, backend=backend)

        def ref_fn(*a, form):
            return reference.gmm_log_prob(*a, cov, form=form)
    elif op == "ngmg":
        kw = dict(target=target, normalize=normalize, reduction="none", scales=scales)

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
    if upstream not in ("normal", "ones"):
        raise ValueError(f"upstream must be 'normal' or 'ones', got {upstream!r}")
    up = (torch.randn if upstream == "normal" else torch.ones)(ref.shape, dtype=torch.float64, device=ref.device)
    up = up.to(out.dtype).double()
    ga = torch.autograd.grad(out, args, up.to(out.dtype), allow_unused=True)
    gb = torch.autograd.grad(ref, a64, up, allow_unused=True)
    for name, a, b in zip(ARGS, ga, gb):
        if b is None:  # only the logits, and only with a target, do not enter
            assert name == "logits" and target is not None and (a is None or torch.all(a == 0)), name
        else:
            assert a.shape == b.shape and a.dtype == p[name].dtype, name
    _check_gradients(ref_fn, args, up, ga, gb, bar.grad, f"{backend} {op} {cov}", underflow=op == "ngmg")
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


def far_point_cases(dtype: torch.dtype) -> list:
    """Far points from one component at 0 (K = 1) of precision s, so far that z² overflows
    ``dtype`` while (s z)² and log p do not (the extreme-values issue's reproducers B and C):
    a list of (name, covariance_type, x [N][D], s, upstream [N]).  :func:`far_point_problem`
    builds the inputs, :func:`check_far_point` judges a backend's results."""
    far = 1e155 if dtype == torch.float64 else 1e20  # float32 (1e20 is beyond float16)
    return [
        ("spherical, one far point", "spherical", [[far]], 1e-4, [1.0]),
        ("diag, one far point", "diag", [[far]], 1e-4, [1.0]),
        ("diag, ±far with upstream 1, -2", "diag", [[far], [-far]], 1e-4, [1.0, -2.0]),
        ("spherical, D = 3", "spherical", [[far, -far, 0.5 * far]], 1e-4, [1.0]),
    ]


def far_point_problem(covariance_type: str, x, s: float, dtype: torch.dtype) -> dict:
    D = len(x[0])
    shape = (1,) if covariance_type == "spherical" else (1, D)
    return dict(x=torch.tensor(x, dtype=dtype), means=torch.zeros(1, D, dtype=dtype),
                prec_chol=torch.full(shape, s, dtype=dtype), logits=torch.zeros(1, dtype=dtype))


def _far_point_exact(cov, x, s, up):
    """log p, ∂x, ∂μ, ∂s of one component at 0 in closed form (float64): y = s x,
    log p = D log s − D/2 log 2π − ½‖y‖², ∂x = −g s y, ∂μ = Σ g s y, ∂s = Σ g (n − ‖y‖²)/s
    (spherical: n = D; diag: per dimension, n = 1 and y_d² alone); ∂logits = 0 (K = 1)."""
    import math

    D = len(x[0])
    lp, gx, gmu = [], [], [0.0] * D
    gs = [0.0] * (1 if cov == "spherical" else D)
    for n, row in enumerate(x):
        y = [v * s for v in row]
        yy = sum(t * t for t in y)
        lp.append(D * math.log(s) - 0.5 * D * reference.LOG_2PI - 0.5 * yy)
        gx.append([-up[n] * s * t for t in y])
        for d in range(D):
            gmu[d] += up[n] * s * y[d]
            if cov == "diag":
                gs[d] += up[n] * (1 - y[d] * y[d]) / s
        if cov == "spherical":
            gs[0] += up[n] * (D - yy) / s
    return lp, gx, [gmu], gs, [0.0]


def check_far_point(lp: torch.Tensor, grads, covariance_type: str, x, s: float, up, what: str = "") -> None:
    """``lp`` and ``grads`` (x, means, prec_chol, logits) of a :func:`far_point_cases` case
    against the closed form, finite and element by element within the bars of lp's dtype."""
    exact = _far_point_exact(covariance_type, x, s, up)
    bar = bars(grads[0].dtype)
    f64 = dict(dtype=torch.float64)
    assert_close_per_element(lp.detach().double().cpu(), torch.tensor(exact[0], **f64), bar.value, f"{what} log p")
    for name, g, e in zip(ARGS, grads, exact[1:]):
        assert bool(torch.isfinite(g).all()), f"{what} d/d{name} is not finite: {g}"
        ref = torch.tensor(e, **f64).reshape(g.shape)
        assert_close_per_element(g.double().cpu(), ref, bar.grad, f"{what} d/d{name}")


def huge_density_problem(dtype: torch.dtype = torch.float32, s: float = 400.0):
    """One sharp spherical component (D = 17, precision s) and points at and near its mean.
    s = 400: p up to 3.3e37, representable in float32, so NGMG without normalisation (loss −p)
    is finite while D·Σ w (the spherical precision gradient's first term, weighted by p)
    overflows.  s = 3000: p = 2e52 at the mean, beyond float32 (loss −inf), plus a third point
    where ½(s z)² ≈ 120 brings p back to ~1.6 (finite loss and ∂x).  Returns (problem dict,
    closed-form (loss, ∂x, ∂μ, ∂s) in float64 for upstream gradient 1 per point)."""
    import math

    D = 17
    z = [[0.0] * D, [3e-6] * D] + ([[1.25e-3] * D] if s > 1000 else [])
    p = dict(x=torch.tensor(z, dtype=dtype), means=torch.zeros(1, D, dtype=dtype),
             prec_chol=torch.full((1,), s, dtype=dtype), logits=torch.zeros(1, dtype=dtype))
    loss, gx, gmu, gs = [], [], [0.0] * D, 0.0
    for row in z:
        zz = sum(t * t for t in row)
        dens = math.exp(D * math.log(s) - 0.5 * D * reference.LOG_2PI - 0.5 * s * s * zz)
        loss.append(-dens)
        gx.append([dens * s * s * t for t in row])  # ∂(−p)/∂x = p Λ z
        for d in range(D):
            gmu[d] -= dens * s * s * row[d]
        gs -= dens * (D / s - s * zz)
    f64 = dict(dtype=torch.float64)
    return p, (torch.tensor(loss, **f64), torch.tensor(gx, **f64), torch.tensor([gmu], **f64), torch.tensor([gs], **f64))


def check_overflowing_ngmg(p: dict, exact: tuple, backend, use_target: bool = False) -> None:
    """NGMG without normalisation on ``huge_density_problem(s=3000)`` (one component; with
    ``use_target`` through the target path, target 0): the loss and every gradient element equal
    the float64 closed form ``exact`` rounded to float32 where that is ±inf or 0 (never NaN, never
    a saturated finite number), and within the float32 bars elsewhere.  ``backend``: a backend
    name, or a callable (x, means, prec_chol, logits, target) → (loss, grads) (emulated CUDA)."""
    args = [p[k].requires_grad_() for k in ("x", "means", "prec_chol", "logits")]
    target = torch.zeros(args[0].shape[0], dtype=torch.int64) if use_target else None
    if callable(backend):
        loss, grads = backend(*args, target)
    else:
        from .functional import ngmg_loss

        loss = ngmg_loss(*args, "spherical", target=target, normalize=False, reduction="none", backend=backend)
        grads = torch.autograd.grad(loss.sum(), args, allow_unused=True, materialize_grads=True)
    bar = bars(torch.float32)
    expected = exact + (torch.zeros(1, dtype=torch.float64),)
    for name, out, e in zip(("loss", "d/dx", "d/dmeans", "d/dprec_chol", "d/dlogits"), (loss, *grads), expected):
        e32 = e.float().double()  # the exact value rounded to float32: ±inf past the range
        out = out.detach().double()
        assert not bool(torch.isnan(out).any()), f"{backend} {name}: NaN in {out}"
        edge = torch.isinf(e32) | (e32 == 0)
        assert bool((out[edge] == e32[edge]).all()), f"{backend} {name}: {out} where float32 of exact is {e32}"
        if bool((~edge).any()):
            assert_close_per_element(out[~edge], e[~edge], bar.value if name == "loss" else bar.grad,
                                     f"{backend} {name}")


def extreme_problem(covariance_type: str, N: int, K: int, D: int, *, seed: int = 0,
                    dtype: torch.dtype = torch.float32, y_max: float = 1e15) -> dict:
    """Random problems at the extremes (the extreme-values issue's randomised test): precisions
    log-uniform in [1e-4, 1e4] per component (diag: ×[0.5, 1.5] per dimension; full: that scale
    times I plus an upper triangle ~ N(0, 0.3²)), half the components exact copies of another
    (tied: same mean, precision and logit), and points at distances log-uniform in [1e3, 1e20]
    from a random component in a random direction — half of them instead within a few σ.  A
    far point is pulled in until ‖s z‖ ≤ ``y_max`` for the sharpest component (1e15: log p,
    the gradients and (W − Σ w y²)/s stay representable in float32, so every element has a true
    value to meet).  Components that are nearly but not exactly tied are left out on purpose:
    far out, float32 input rounding alone moves their responsibilities by O(1)."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    scale = 10.0 ** (8 * torch.rand(K, **f64) - 4)
    if covariance_type == "diag":
        prec = scale[:, None] * (0.5 + torch.rand(K, D, **f64))
    elif covariance_type == "spherical":
        prec = scale.clone()
    elif covariance_type == "full":
        prec = scale[:, None, None] * (torch.eye(D, dtype=torch.float64) + 0.3 * torch.randn(K, D, D, **f64).triu(1))
    else:
        raise ValueError(f"extreme_problem covers diag, spherical, full; got {covariance_type!r}")
    means = torch.randn(K, D, **f64) / scale[:, None]
    logits = torch.randn(K, **f64)
    for k in range(1, K):  # ties: half the components copy an earlier one exactly
        if torch.rand(1, generator=g).item() < 0.5:
            j = int(torch.randint(0, k, (1,), generator=g))
            means[k], prec[k], logits[k] = means[j], prec[j], logits[j]
    j = torch.randint(0, K, (N,), generator=g)
    u = torch.randn(N, D, **f64)
    u = u / u.norm(dim=-1, keepdim=True)
    dist = 10.0 ** (3 + 17 * torch.rand(N, 1, **f64))
    near = torch.rand(N, 1, generator=g) < 0.5
    dist = torch.where(near, 3.0 * torch.rand(N, 1, **f64) / scale[j][:, None], dist)
    # pulled in to a random fraction of the limit (one common limit would put points of D = 1 at
    # exactly ±the same distance: sums over them cancel by construction)
    dist = torch.minimum(dist, (0.2 + 0.8 * torch.rand(N, 1, **f64)) * y_max / (3.0 * scale.max().item()))
    x = means[j] + dist * u
    out = dict(x=x, means=means, prec_chol=prec, logits=logits)
    return {k: v.to(dtype) for k, v in out.items()}


def large_normalizer_problem(covariance_type: str, *, seed: int = 0, N: int = 8, K: int = 17,
                             D: int = 129, dtype: torch.dtype = torch.float32):
    """The extreme-values issue's item V: NGMG where c = log Σ_k π_k N(μ_k; μ_k, Σ_k) is in the
    hundreds (D = 129, 1/σ from 10 to 30 per component: c from 180 to 320) and the points lie
    within a fraction of a σ of a mean (log p ≈ c for the sharpest components).  log p − c
    cancels there: evaluated as such, float32 rounding of log p (|c|·u) was p̃'s relative
    error, 1e-5 to 7e-5.
    Returns (problem dict, target [N]: the component each point was drawn near)."""
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64, generator=g)
    s = 10 * 3 ** torch.rand(K, **f64)
    if covariance_type == "spherical":
        prec = s
    elif covariance_type == "diag":
        prec = s[:, None] * (0.8 + 0.4 * torch.rand(K, D, **f64))
    elif covariance_type == "full":
        prec = s[:, None, None] * (torch.eye(D, dtype=torch.float64) + 0.05 * torch.randn(K, D, D, **f64).triu(1))
    else:
        raise ValueError(f"large_normalizer_problem covers diag, spherical, full; got {covariance_type!r}")
    means = torch.randn(K, D, **f64)
    logits = torch.randn(K, **f64)
    j = torch.randint(0, K, (N,), generator=g)
    x = means[j] + 0.3 / s[j][:, None] * torch.randn(N, D, **f64) / D ** 0.5
    out = dict(x=x, means=means, prec_chol=prec, logits=logits)
    return {k: v.to(dtype) for k, v in out.items()}, j


FULL_FAR_KINDS = ("eye", "mixed signs", "both")


def full_far_rows_problem(dtype: torch.dtype, components: str):
    """Full covariance, D = 2 (the extreme-values issue's reproducer A): points whose Uᵀz is
    NaN in floating point — an infinite coordinate meeting a zero of U (inf · 0, U = I), infinite
    or finite-but-huge coordinates meeting U's mixed signs (inf − inf) — beside live points; one
    component of each kind (``components`` of :data:`FULL_FAR_KINDS`), or both.  Returns
    (problem dict, the dead rows: true log p = −inf or not representable)."""
    big, u = (1e35, 1e4) if dtype == torch.float32 else (1e300, 1e10)
    inf = float("inf")
    rows = [[inf, 0.0], [0.0, 0.0], [big, big], [0.3, -0.2]] + ([] if components == "eye" else [[inf, inf]])
    eye = torch.eye(2, dtype=dtype)
    mixed = torch.tensor([[u, -u], [0.0, u]], dtype=dtype)
    U = {"eye": eye[None], "mixed signs": mixed[None], "both": torch.stack([eye, mixed])}[components]
    K = U.shape[0]
    p = dict(x=torch.tensor(rows, dtype=dtype), means=torch.zeros(K, 2, dtype=dtype), prec_chol=U,
             logits=torch.zeros(K, dtype=dtype))
    return p, [0, 2] + ([] if components == "eye" else [4])


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
