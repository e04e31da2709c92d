"""Numerics at the extremes (the reproducers of the extreme-values issue), on every backend that
runs CPU tensors (tests/conftest.py's ``backend`` fixture); tests/test_cuda_emulation.py runs
the same cases through the emulated CUDA kernels.

A far point whose log-density is representable gets that value and finite gradients: the
distance is scaled by the precision before it is squared ((s z)² ~ 2|log p|, where z² alone
overflows), and the precision gradient is (W − Σ w (s z)²)/s, not W/s − s Σ w z²."""

import functools

import pytest
import torch

import fastgmmdiff as fg
from fastgmmdiff.testing import (FULL_FAR_KINDS, assert_close_per_element, bars, check_against_reference,
                                 check_dead_rows, check_far_point, check_overflowing_ngmg, extreme_problem,
                                 far_point_cases, far_point_problem, full_far_rows_problem, huge_density_problem,
                                 large_normalizer_problem, random_problem)

ARGS = ("x", "means", "prec_chol", "logits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", range(4))
def test_far_point_with_a_sharp_or_flat_component(case, dtype, backend):
    """Reproducers B (spherical: −inf where log p = −5e31) and C (diag/spherical: ∂s = −inf or
    NaN where the exact value is ∓1e36), and their float64 counterparts at 1e155."""
    name, cov, x, s, up = far_point_cases(dtype)[case]
    p = far_point_problem(cov, x, s, dtype)
    args = [p[k].requires_grad_() for k in ARGS]
    lp = fg.gmm_log_prob(*args, cov, backend=backend)
    grads = torch.autograd.grad(lp, args, torch.tensor(up, dtype=dtype))
    check_far_point(lp, grads, cov, x, s, up, f"{backend} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("components", FULL_FAR_KINDS)
def test_full_covariance_infinite_or_overflowing_distance_is_a_dead_row(components, dtype, backend):
    """−inf and zero ∂x for those rows, never NaN; live rows and every parameter gradient as
    float64 on the live rows alone (testing.check_dead_rows)."""
    p, dead = full_far_rows_problem(dtype, components)
    check_dead_rows(p, "full", backend, dead=dead)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("components", FULL_FAR_KINDS)
def test_ngmg_of_a_dead_row_is_exactly_zero(components, dtype, normalize, backend):
    """NGMG's loss of a row at infinite distance is −p̃ = 0 exactly (it was −1.2e-38 in float32
    and NaN in float64 on the cpu backend), with zero ∂x and finite parameter gradients."""
    p, _ = full_far_rows_problem(dtype, components)
    args = [p[k].requires_grad_() for k in ARGS]
    loss = fg.ngmg_loss(*args, "full", normalize=normalize, reduction="none", backend=backend)
    assert loss[0] == 0 and loss[2] == 0 and bool(torch.isfinite(loss).all()), loss
    grads = torch.autograd.grad(loss.sum(), args)
    assert all(bool(torch.isfinite(g).all()) for g in grads), grads
    assert bool((grads[0][[0, 2]] == 0).all())


def test_ngmg_without_normalisation_at_a_huge_density(backend):
    """Reproducer D (the representable half): p = 3.3e37 in float32 — loss −p is finite, and so
    is ∂/∂s = −p D/s = −1.4e36, where D·Σ w overflowed to −inf."""
    p, (e_loss, e_gx, e_gmu, e_gs) = huge_density_problem()
    args = [p[k].requires_grad_() for k in ARGS]
    loss = fg.ngmg_loss(*args, "spherical", normalize=False, reduction="none", backend=backend)
    grads = torch.autograd.grad(loss.sum(), args)
    bar = bars(torch.float32)
    assert_close_per_element(loss.double(), e_loss, bar.value, f"{backend} loss")
    for name, g, e in zip(ARGS, grads, (e_gx, e_gmu, e_gs, torch.zeros(1, dtype=torch.float64))):
        assert bool(torch.isfinite(g).all()), f"{backend} d/d{name}: {g}"
        assert_close_per_element(g.double(), e, bar.grad, f"{backend} d/d{name}")


@pytest.mark.parametrize("use_target", [False, True], ids=["mixture", "target"])
def test_ngmg_without_normalisation_past_the_float32_range(use_target, backend):
    """Reproducer D (the overflowing half): p = 2e52 > float32's largest at the mean — loss
    −inf, never the saturated −3.3e38 nor NaN gradients: each gradient element is the exact
    value rounded to float32 (±inf where that is beyond the range, 0 where a term is 0: ∂x at
    the mean, ∂logits of one component), the row with p ~ 1.6 as float64 (testing.check_overflowing_ngmg)."""
    p, exact = huge_density_problem(s=3000.0)
    check_overflowing_ngmg(p, exact, backend, use_target)


@pytest.mark.parametrize("cov", ["diag", "spherical", "full"])
@pytest.mark.parametrize("use_target", [False, True], ids=["mixture", "target"])
def test_ngmg_value_with_a_large_normaliser(cov, use_target, seed, backend):
    """Reproducer V: |c| in the hundreds, points near a mean.  The NGMG value (and its
    gradients) within the float32 bars: the normaliser is inside the logsumexp (a_k − c formed
    from ratios, _math.ngmg_const), and with a target the log-normaliser is never added (−½q_t).
    As log p − c the values were 1e-5 to 7e-5 off (cpu, torch, triton; 6.8× the bar)."""
    D = 40 if cov == "full" else 129
    p, j = large_normalizer_problem(cov, seed=seed, N=48, D=D)
    check_against_reference({k: v.requires_grad_() for k, v in p.items()}, cov, backend, op="ngmg",
                            target=j if use_target else None, upstream="ones")


@pytest.mark.parametrize("cov", ["diag", "spherical", "full"])
@pytest.mark.parametrize("D", [1, 3, 17, 129])
@pytest.mark.parametrize("op", ["log_prob", "ngmg"])
def test_random_extremes_against_float64(cov, D, op, seed, backend):
    """testing.extreme_problem (far points 1e3–1e20, precisions 1e-4–1e4, tied components; a
    fresh problem each run): log p, the (normalised) NGMG loss and every gradient against
    float64 within the bars.  (Its first run showed the float64 oracle itself wrong far out:
    torch.logsumexp's backward took the rounding of log p, K× too steep for K tied components;
    reference.logsumexp fixed it.  NGMG values missed the 1e-5 bar by up to 3.4× at D = 129
    until the normaliser went inside the logsumexp, item V; and the CPU's flushed w·z of a
    p̃ = 4e-37 point lost a normal ∂x of 1e-34 until gmm_math.h weighted_lz; rows of
    p̃ ≈ 1e-36 still lost normal terms of ~1e-37 to flushed w·y, w·y² and g·r, in about one run
    in a hundred, until the CPU backward carried such weights scaled: TINY_WEIGHT_CASES.)  The upstream is all ones: with a
    random-sign one, the logits gradient Σ g (r − π), formed as Σ g r − π Σ g by every
    implementation (plain PyTorch's log_softmax backward included), cancels by chance to 1e-6
    of its terms where far points give tied components r ≈ π — float32 summation, not the
    kernels (1 failure in ~2000 elements); with ones it is 0 in 13,200 problems."""
    if backend == "triton" and D == 129:
        pytest.skip("too slow under Triton's CPU interpreter (D = 17 covers its chunked paths)")
    p = extreme_problem(cov, N=12, K=4, D=D, seed=seed)
    check_against_reference({k: v.requires_grad_() for k, v in p.items()}, cov, backend, op=op, upstream="ones")


# extreme_problem seeds whose NGMG gradients the CPU kernels (denormals flushed) got wrong: a
# point with p̃ ≈ 1e-36 whose gradient terms are normal numbers although w·y, w·y² or w = g·r
# are not (∂x = 0 where float64 has 2e-37; a diag ∂s of −1.02284e-34 against −1.02169e-34 with
# Σ w (s z)² ≈ 1e-38 flushed).  Found by 7,200 random problems per build; each failed before
# the fix (csrc/cpu/kernels.inc TinyW and pow2_split, gmm_math.h weighted_uz).
TINY_WEIGHT_CASES = [("full", 17, 162 * 7919 + 13), ("full", 129, 165 * 7919 + 13), ("full", 17, 142452523),
                     ("diag", 129, 73 * 7919 + 13), ("diag", 17, 193 * 7919 + 5), ("diag", 17, 352 * 7919 + 5),
                     ("spherical", 17, 85 * 7919 + 13)]


@pytest.mark.parametrize("cov,D,problem_seed", TINY_WEIGHT_CASES, ids=lambda v: str(v))
def test_tiny_ngmg_weights_keep_their_normal_gradient_terms(cov, D, problem_seed, backend):
    """NGMG gradients of far points whose p̃ is a tiny normal number, against float64 within
    the bars (elements of ~1e-37 included): the weights of such rows are carried scaled by a
    power of two through the CPU backward and scaled back once per lane or per sum."""
    if backend == "triton" and D == 129:
        pytest.skip("too slow under Triton's CPU interpreter")
    p = extreme_problem(cov, N=12, K=4, D=D, seed=problem_seed)
    check_against_reference({k: v.requires_grad_() for k, v in p.items()}, cov, backend, op="ngmg", upstream="ones")


@pytest.mark.parametrize("cov", ["diag", "spherical", "full"])
@pytest.mark.parametrize("op", ["log_prob", "ngmg"])
def test_a_nan_coordinate_poisons_its_own_row_only(cov, op, seed, backend):
    """The rule for NaN in x (without ``validate``), the same on every backend: that row's
    value is NaN; it contributes nothing to any gradient (its ∂x is 0, the parameter gradients
    are those of the other rows), so one bad point does not poison a batch's update."""
    p = random_problem(cov, None, N=7, K=3, D=4, seed=seed, far=False)
    p["x"][2, 1] = float("nan")
    args = [p[k].requires_grad_() for k in ARGS]
    f = fg.gmm_log_prob if op == "log_prob" else functools.partial(fg.ngmg_loss, reduction="none")
    out = f(*args, cov, backend=backend)
    assert out[2].isnan() and bool(torch.isfinite(out[[0, 1, 3, 4, 5, 6]]).all()), out
    grads = torch.autograd.grad(out, args, torch.ones_like(out))  # the NaN row's upstream is 1 too
    assert all(bool(torch.isfinite(g).all()) for g in grads) and bool((grads[0][2] == 0).all())
    keep = [0, 1, 3, 4, 5, 6]
    clean = [args[0].detach()[keep].requires_grad_()] + [a.detach().requires_grad_() for a in args[1:]]
    ref = torch.autograd.grad(f(*clean, cov, backend=backend).sum(), clean)
    for name, g, r in zip(ARGS[1:], grads[1:], ref[1:]):  # the same sums, maybe in another order
        assert_close_per_element(g, r, bars(torch.float32).grad, f"{backend} d/d{name}")
