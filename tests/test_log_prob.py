"""gmm_log_prob against the float64 reference: values, gradients, layouts, dtypes, −inf rows."""

import warnings

import pytest
import torch

import fastgmmdiff as fg
from fastgmmdiff import reference, testing
from fastgmmdiff.testing import (ToleranceLoosened, assert_close_per_element, bars, check_against_reference,
                                 check_dead_rows, check_gradient, elementwise_error, far_rows_problem, gradient_bounds,
                                 random_problem,
                                 reference_log_prob)

COVS = ["diag", "spherical", "full"]
ARGS = ("x", "means", "prec_chol", "logits")


def _grads(out, p, upstream):
    return torch.autograd.grad(out, [p[k] for k in ARGS], upstream)


def _check_against_reference(p, cov, backend="torch", shape_out=None):
    out = check_against_reference(p, cov, backend)
    if shape_out is not None:
        assert tuple(out.shape) == shape_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cov", COVS)
@pytest.mark.parametrize("G,x_batched", [(None, True), (3, True), (3, False)])
def test_matches_float64_reference(cov, dtype, G, x_batched, seed, backend):
    p = random_problem(cov, G, N=37, K=5, D=6, dtype=dtype, seed=seed, x_batched=x_batched,
                       requires_grad=True)
    _check_against_reference(p, cov, backend, shape_out=(37,) if G is None else (G, 37))


@pytest.mark.parametrize("cov", COVS)
@pytest.mark.parametrize("N,K,D", [(1, 1, 1), (1, 3, 5), (9, 1, 4), (5, 2, 59), (3, 2, 257), (300, 7, 3), (65, 33, 17)])
def test_odd_sizes(cov, N, K, D, seed, backend):
    p = random_problem(cov, None, N=N, K=K, D=D, seed=seed, requires_grad=True)
    _check_against_reference(p, cov, backend)


def test_ill_conditioned_gradient_judged_against_plain_float32(backend):
    """A problem from a CI run (seed 137054861): five points with log-densities near −600 whose
    logits gradient cancels to ±0.0137.  float32 rounding of the log-density gaps puts every
    float32 implementation near 1e-3 there (plain PyTorch included), so the bound is the
    conditioning-aware one of testing.gradient_bounds (capped at 10× the bar) — and it must
    still hold; the other gradients are held to the bar itself."""
    p = random_problem("diag", None, N=5, K=2, D=59, seed=137054861, requires_grad=True)
    ref = reference_log_prob(p, "diag")
    up = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(137054861))
    g_ref = _grads(ref, p, up)
    bar = bars(torch.float32).grad
    bounds = gradient_bounds(lambda *a, form: reference.gmm_log_prob(*a, "diag", form=form),
                             [p[k] for k in ARGS], up, g_ref, bar)
    scale = g_ref[3].abs() + g_ref[3].pow(2).mean().sqrt()
    assert bool((bounds[3] > bar * scale).any())  # the logits gradient is ill-conditioned in float32 here
    assert bool((bounds[3] <= 10 * bar * scale * (1 + 1e-12)).all())  # ... and the loosening is capped
    out = fg.gmm_log_prob(*(p[k] for k in ARGS), "diag", backend=backend)
    grads = _grads(out, p, up.float())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ToleranceLoosened)
        for name, a, b, bound in zip(ARGS, grads, g_ref, bounds):
            check_gradient(a, b, bound, bar, f"d/d{name}")
    # the loosening is reported, for the logits only, exactly when it was needed
    loosened = elementwise_error(grads[3], g_ref[3]) > bar
    assert [str(w.message).split(":")[0] for w in caught] == (["d/dlogits"] if loosened else [])


def test_reference_forms_agree(seed):
    for cov in COVS:
        p = random_problem(cov, 2, N=20, K=3, D=4, dtype=torch.float64, seed=seed)
        a = reference_log_prob(p, cov, "broadcast")
        b = reference_log_prob(p, cov, "matmul")
        assert_close_per_element(b, a, 1e-12, cov)


@pytest.mark.parametrize("cov", COVS)
def test_partially_batched_parameters_broadcast(cov, seed, backend):
    """Parameters without the G axis are shared by every mixture (and their gradient sums)."""
    p = random_problem(cov, 4, N=10, K=3, D=2, dtype=torch.float64, seed=seed)
    shared_logits = p["logits"][0].clone().requires_grad_()
    means = p["means"].clone().requires_grad_()
    out = fg.gmm_log_prob(p["x"], means, p["prec_chol"], shared_logits, cov, backend=backend)
    ref = reference.gmm_log_prob(p["x"], means, p["prec_chol"], shared_logits, cov)
    assert out.shape == (4, 10)
    assert_close_per_element(out, ref, bars(torch.float64).value, "log p")
    ga = torch.autograd.grad(out.sum(), shared_logits)[0]
    gb = torch.autograd.grad(ref.sum(), shared_logits)[0]
    assert ga.shape == (3,)
    assert_close_per_element(ga, gb, bars(torch.float64).grad, "d/dlogits")


def test_tied_is_full_with_one_factor(seed):
    p = random_problem("full", None, N=15, K=4, D=3, dtype=torch.float64, seed=seed)
    U = p["prec_chol"][0]
    tied = fg.gmm_log_prob(p["x"], p["means"], U, p["logits"], "tied")
    full = fg.gmm_log_prob(p["x"], p["means"], U.expand(4, 3, 3), p["logits"], "full")
    torch.testing.assert_close(tied, full, rtol=0, atol=1e-12)


def test_full_ignores_lower_triangle(seed):
    p = random_problem("full", None, N=8, K=2, D=4, dtype=torch.float64, seed=seed)
    U = p["prec_chol"].clone()
    noisy = (U + torch.randn_like(U).tril(-1)).requires_grad_()
    out = fg.gmm_log_prob(p["x"], p["means"], noisy, p["logits"], "full")
    torch.testing.assert_close(out, fg.gmm_log_prob(p["x"], p["means"], U, p["logits"], "full"))
    (g,) = torch.autograd.grad(out.sum(), noisy)
    assert torch.all(g.tril(-1) == 0)


@pytest.mark.parametrize("cov", COVS)
def test_gradcheck_float64(cov, seed, backend):
    p = random_problem(cov, 2, N=4, K=3, D=3, dtype=torch.float64, seed=seed, requires_grad=True)
    if cov == "full":
        # gradcheck perturbs every entry; the lower triangle must then have zero gradient.
        p["prec_chol"] = p["prec_chol"].detach().triu().requires_grad_()
    f = lambda *a: fg.gmm_log_prob(*a, cov, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, [p[k] for k in ARGS])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cov", COVS)
def test_half_inputs_upcast_inside(cov, dtype, seed, backend):
    """bf16/fp16 in, same dtype out, computed in float32 and rounded once: judged, element by
    element, against the float64 result on the same (rounded) inputs and upstream gradient,
    within the dtype's unit roundoff plus the float32 bar (testing.bars)."""
    p = random_problem(cov, None, N=64, K=4, D=8, dtype=dtype, seed=seed, requires_grad=True)
    check_against_reference(p, cov, backend)


@pytest.mark.filterwarnings("error::fastgmmdiff.testing.ToleranceLoosened")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cov", COVS + ["tied"])
def test_half_shared_and_tied_parameter_gradients_are_summed_in_float32(cov, dtype, seed, backend):
    """Parameters shared by G = 8 mixtures (no G axis) and a tied factor shared by K components:
    each gradient sums G (or K) terms, which must be summed in float32 and rounded once — the
    terms rounded to bf16 first gave 1–5% errors where the sum cancels (the torch backend,
    tied on every backend); within the bar, and without the plain-PyTorch loosening."""
    p = random_problem("full" if cov == "tied" else cov, 8, N=32, K=4, D=6, dtype=dtype, seed=seed)
    p["means"], p["logits"] = p["means"][0], p["logits"][0]
    p["prec_chol"] = p["prec_chol"][0, 0] if cov == "tied" else p["prec_chol"][0]
    check_against_reference({k: p[k].detach().requires_grad_() for k in ARGS}, cov, backend)


@pytest.mark.parametrize("cov", COVS)
def test_dead_rows_are_minus_inf_with_zero_gradients(cov, seed, backend):
    """A dead row (upstream gradient on it too) gives −inf and zero ∂x and adds nothing to the
    parameter gradients, which equal the float64 reference on the live rows alone."""
    p = random_problem(cov, None, N=6, K=3, D=4, seed=seed)
    p["x"][1] = 1e30  # ‖x − μ‖² overflows float32: every ℓ is −inf
    p["x"][4, 0] = float("inf")
    check_dead_rows(p, cov, backend, dead=[1, 4])


def test_empty_points_give_empty_result(backend):
    p = random_problem("diag", 2, N=3, K=2, D=3, requires_grad=True)
    x = torch.zeros(2, 0, 3, requires_grad=True)
    out = fg.gmm_log_prob(x, p["means"], p["prec_chol"], p["logits"], backend=backend)
    assert out.shape == (2, 0)
    out.sum().backward()
    assert torch.all(p["means"].grad == 0)


@pytest.mark.parametrize("cov", COVS)
@pytest.mark.parametrize("G,x_batched", [(None, True), (4, True), (4, False), (2000, True)])
def test_compiled_backward_is_deterministic(cov, G, x_batched, seed):
    """Two runs give bit-identical results (fixed chunking, ordered reduction)."""
    if "cpu" not in fg.available_backends():
        pytest.skip("compiled CPU kernels unavailable")
    N = 3 if G == 2000 else 700
    p = random_problem(cov, G, N=N, K=6, D=5, seed=seed, x_batched=x_batched, requires_grad=True)
    runs = []
    for _ in range(2):
        out = fg.gmm_log_prob(*(p[k] for k in ARGS), cov, backend="cpu")
        runs.append((out, *torch.autograd.grad(out.sum(), [p[k] for k in ARGS])))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cov", COVS)
@pytest.mark.parametrize("G,x_batched,N", [(None, True, 40000), (4, True, 10000), (4, False, 10000)])
def test_compiled_backward_does_not_depend_on_the_thread_count(cov, G, x_batched, N, seed):
    """Enough work for several chunks: 1 and 2 threads give bit-identical log p and gradients
    (the chunk count is fixed, not the thread count)."""
    p = random_problem(cov, G, N=N, K=6, D=5, seed=seed, x_batched=x_batched, requires_grad=True)
    _assert_same_for_1_and_2_threads(p, cov)


def _assert_same_for_1_and_2_threads(p, cov):
    """log p and every gradient on the cpu backend, bit for bit, with 1 and with 2 threads."""
    if "cpu" not in fg.available_backends():
        pytest.skip("compiled CPU kernels unavailable")
    args = [p[k] for k in ARGS]
    threads = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            out = fg.gmm_log_prob(*args, cov, backend="cpu")
            runs.append((out, *torch.autograd.grad(out.sum(), args)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("cov", COVS)
def test_every_cpu_instruction_set_build(isa, cov, seed, monkeypatch):
    """FASTGMMDIFF_CPU_ISA lowers the kernels' instruction set; each build meets the bar.  A
    level the processor lacks falls back to the highest it has, which this case would only
    test again: it is skipped, saying so (the build that ran is asserted)."""
    if "cpu" not in fg.available_backends():
        pytest.skip("compiled CPU kernels unavailable")
    from fastgmmdiff import _C

    monkeypatch.setenv("FASTGMMDIFF_CPU_ISA", isa)
    if _C.cpu_isa() != isa:
        pytest.skip(f"this processor has no {isa}: the kernels would run {_C.cpu_isa()}")
    assert _C.cpu_isa() == isa
    p = random_problem(cov, 3, N=70, K=9, D=19, seed=seed, requires_grad=True)
    _check_against_reference(p, cov, "cpu")
    if cov != "full":  # one point per mixture: rows in lanes on every build (D = 1, 2, 7), element lanes (40)
        for D in (1, 2, 7, 40):
            p = random_problem(cov, 37, N=1, K=9, D=D, seed=seed, requires_grad=True)
            _check_against_reference(p, cov, "cpu")


@pytest.mark.parametrize("D", [1, 2, 3, 5, 40])
@pytest.mark.parametrize("cov", ["diag", "spherical"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_point_per_mixture_edges(cov, dtype, D, seed, backend):
    """N = 1 (the MDN layout; the compiled backend's fused per-row kernels, rows in vector lanes
    for D up to 4× the vector width, one row's elements in the lanes above: D = 40): a dead row, a
    component with weight 0 (logit −inf), a row with zero upstream gradient and a far live row,
    43 rows (a partial last block of lanes), element by element against the float64 reference
    (bars: 1e-5 values / 1e-4 gradients in float32, 1e-12 / 1e-10 in float64; the rms term
    keeps a gradient that cancels to ~0 from demanding more than the dtype has)."""
    if D != 5 and backend != "cpu":
        pytest.skip("D matters to the cpu kernels only (rows in lanes up to 4× the vector width)")
    G, K = 43, 6
    p = random_problem(cov, G, N=1, K=K, D=D, dtype=dtype, seed=seed)
    big = 1e30 if dtype == torch.float32 else 1e200  # ‖z‖² overflows the dtype: a dead row
    with torch.no_grad():
        p["x"][3] = big
        p["logits"][5, 2] = float("-inf")
        p["x"][9] = p["means"][9, 0] + 30.0  # far, but every ℓ finite
    args = [p[k].clone().requires_grad_() for k in ARGS]
    up = torch.randn(G, 1, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    up[7] = 0.0
    lp = fg.gmm_log_prob(*args, cov, backend=backend)
    grads = torch.autograd.grad(lp, args, up)
    assert lp[3, 0] == float("-inf") and all(bool((g[3] == 0).all()) for g in grads)
    assert all(bool((g[7] == 0).all()) for g in grads)
    live = [g for g in range(G) if g != 3]
    ref_args = [a.detach()[live].double().requires_grad_() for a in args]
    ref = reference.gmm_log_prob(*ref_args, cov)
    ref_grads = torch.autograd.grad(ref, ref_args, up[live].double())
    vbar, gbar = bars(dtype)
    assert_close_per_element(lp[live], ref, vbar, "log p")
    # the bars, loosened only where plain PyTorch at this dtype misses them too (testing.gradient_bounds):
    # the far row's ℓ ~ −10³ carries float32's rounding (~6e-5) into its r, ~1e-4 of its gradients
    testing._check_gradients(lambda *a, form: reference.gmm_log_prob(*a, cov, form=form),
                             [a.detach()[live] for a in args], up[live].double(), [g[live] for g in grads],
                             ref_grads, gbar, f"{backend} one point per mixture")


@pytest.mark.parametrize("D", [1, 2, 3])
@pytest.mark.parametrize("cov", ["diag", "spherical"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_point_per_mixture_precision_zero_or_negative(cov, dtype, D, seed):
    """One point per mixture, small D (the cpu kernels' rows-in-lanes blocks): a precision entry
    of 0 in one row makes that component's density 0 (log 0 = −inf, as std::log: the row's log p
    is the mixture's without it), a negative one makes the row's log p NaN; the other rows of
    the same block of lanes keep their values and gradients (they take the log per entry then,
    not the mantissa product), against the float64 reference."""
    G, K = 37, 4
    p = random_problem(cov, G, N=1, K=K, D=D, dtype=dtype, seed=seed)
    with torch.no_grad():
        p["prec_chol"][2, 1] = 0.0
        p["prec_chol"][5, 0] = -1.0
    args = [p[k].clone().requires_grad_() for k in ARGS]
    up = torch.randn(G, 1, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    lp = fg.gmm_log_prob(*args, cov, backend="cpu")
    grads = torch.autograd.grad(lp, args, up)
    assert torch.isnan(lp[5, 0])
    vbar, gbar = bars(dtype)
    without = [t.detach().double()[2:3].clone() for t in args]
    pi1 = torch.softmax(without[3][0], 0)[1]
    without[3][0, 1] = float("-inf")  # component 1 of row 2 removed (then π renormalised: undone below)
    without[2][0, 1] = 1.0
    expect = reference.gmm_log_prob(*without, cov)[0] + torch.log1p(-pi1)
    assert_close_per_element(lp[2], expect, vbar, "log p, row 2")
    rest = [g for g in range(G) if g not in (2, 5)]
    ref_args = [a.detach()[rest].double().requires_grad_() for a in args]
    ref = reference.gmm_log_prob(*ref_args, cov)
    ref_grads = torch.autograd.grad(ref, ref_args, up[rest].double())
    assert_close_per_element(lp[rest], ref, vbar, "log p")
    for name, g, r in zip(ARGS, grads, ref_grads):
        assert_close_per_element(g[rest], r, gbar, f"d/d{name}")


@pytest.mark.parametrize("cov", COVS)
@pytest.mark.parametrize("layout", ["one point per mixture", "one mixture", "row tiles"])
@pytest.mark.interpreter_heavy
def test_far_rows_gradients_do_not_inherit_the_rounding_of_log_p(layout, cov, seed, backend):
    """Every backward takes r as the softmax of the point's ℓ, not exp(ℓ − log p): at
    |log p| ~ 1600 float32 log p is rounded by ~1e-4, which exp(ℓ − log p) passes on to every
    gradient (the torch backend and the cpu one-point kernels use the softmax; the cpu tile and
    row-tile kernels correct by δ, csrc/cpu exact_r).  Bar: 1e-5 per element."""
    G, N = {"one point per mixture": (300, 1), "one mixture": (None, 300), "row tiles": (60, 5)}[layout]
    p = far_rows_problem(cov, G, N, seed=seed)
    args = [p[k].clone().requires_grad_() for k in ARGS]
    ref_args = [t.detach().double().requires_grad_() for t in args]
    ref = reference.gmm_log_prob(*ref_args, cov)
    assert ref.abs().median() > 500
    # ∂x only: the parameter gradients are not well conditioned here (∂r/∂μ ~ x)
    up = torch.randn(ref.shape)
    (gx,) = torch.autograd.grad(fg.gmm_log_prob(*args, cov, backend=backend), args[0], up)
    (rx,) = torch.autograd.grad(ref, ref_args[0], up.double())
    assert_close_per_element(gx, rx, 1e-5, "d/dx")


@pytest.mark.parametrize("D", [8, 16, 64, 72])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.interpreter_heavy
def test_one_point_per_mixture_log_determinants(D, dtype, seed, backend):
    """One point per mixture (an MDN's loss), diag, D a multiple of the vector width: the CPU
    kernels take Σ_d log s_kd as one log of a product of mantissas per component (logdet_rows;
    D = 72 > 64 and entries that are not positive normal numbers take a log per entry): values
    and gradients against float64 within the bars, precisions from 1e-3 to 1e3."""
    p = random_problem("diag", 61, N=1, K=5, D=D, dtype=dtype, seed=seed, requires_grad=False)
    g = torch.Generator().manual_seed(seed)
    p["prec_chol"] = 10 ** (6 * torch.rand(p["prec_chol"].shape, generator=g, dtype=torch.float64) - 3)
    p["prec_chol"] = p["prec_chol"].to(dtype)
    p = {k: v.requires_grad_() for k, v in p.items()}
    _check_against_reference(p, "diag", backend, shape_out=(61, 1))


@pytest.mark.parametrize("N", [1, 3])
def test_many_tiny_mixtures_do_not_depend_on_the_thread_count(N, seed):
    """Row tiles split into chunks at mixture boundaries, each mixture summed in row order: the
    gradients are bit-identical for 1 and 2 threads (enough work here for two chunks)."""
    p = random_problem("diag", 20000, N=N, K=8, D=8, seed=seed, requires_grad=True)
    _assert_same_for_1_and_2_threads(p, "diag")


@pytest.mark.parametrize("cov", COVS)
@pytest.mark.parametrize("G,N", [(203, 1), (90, 3), (40, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.interpreter_heavy
def test_many_tiny_mixtures(cov, G, N, dtype, seed, backend):
    """The `mdn` layout (many mixtures of few points): the compiled backend's row tiles, whose
    lanes are rows of different mixtures (tiles straddling mixtures, a partial last tile),
    for both ops and a target."""
    p = random_problem(cov, G, N=N, K=6, D=3, dtype=dtype, seed=seed, requires_grad=True)
    _check_against_reference(p, cov, backend, shape_out=(G, N))
    target = torch.randint(0, 6, (G, N))
    check_against_reference(p, cov, backend, "ngmg")
    check_against_reference(p, cov, backend, "ngmg", target=target, normalize=False)
