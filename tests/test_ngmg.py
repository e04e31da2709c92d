"""ngmg_loss: values and gradients against the reference, target, normalize, reduction, and
the "parallel lines" behaviour of SPEC §2."""

import math
from pathlib import Path

import pytest
import torch

import fastgmmdiff as fg
from fastgmmdiff import reference
from fastgmmdiff.testing import assert_close_per_element, bars, check_against_reference, random_problem

COVS = ["diag", "spherical", "full"]
ARGS = ("x", "means", "prec_chol", "logits")


@pytest.mark.parametrize("cov", COVS)
@pytest.mark.parametrize("use_target", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("G", [None, 3])
def test_matches_reference(cov, use_target, normalize, G, seed, backend):
    p = random_problem(cov, G, N=29, K=4, D=5, seed=seed, requires_grad=True)
    target = torch.randint(0, 4, (29,) if G is None else (G, 29)) if use_target else None
    out = check_against_reference(p, cov, backend, "ngmg", target=target, normalize=normalize)
    assert out.shape == ((29,) if G is None else (G, 29))
    if normalize:
        assert torch.all(out <= 0) and torch.all(out >= -1)  # p̃ ∈ [0, 1] (far points underflow)


@pytest.mark.parametrize("cov", COVS + ["tied"])
@pytest.mark.parametrize("use_target", [False, True])
@pytest.mark.parametrize("G", [None, 3])
def test_multi_scale_matches_reference(cov, use_target, G, seed, backend):
    """scales=(1, 2, 4, 8): Σ_j s_j L_j / Σ s_j with L_j the normalised loss under U/s_j, value
    and gradients to every input against the float64 reference, element by element."""
    p = random_problem("full" if cov == "tied" else cov, G, N=29, K=4, D=5, seed=seed, requires_grad=True)
    if cov == "tied":
        p["prec_chol"] = p["prec_chol"].detach()[..., 0, :, :].requires_grad_()
    target = torch.randint(0, 4, (29,) if G is None else (G, 29)) if use_target else None
    out = check_against_reference(p, cov, backend, "ngmg", target=target, scales=(1, 2, 4, 8))
    assert torch.all(out <= 0) and torch.all(out >= -1)


def test_multi_scale_is_the_weighted_sum_and_checks_its_scales(seed):
    p = random_problem("diag", None, N=20, K=3, D=4, seed=seed)
    args = [p[k] for k in ARGS]
    one = [fg.ngmg_loss(*args[:2], args[2] / s, args[3], reduction="none") for s in (1.0, 3.0)]
    both = fg.ngmg_loss(*args, scales=torch.tensor([1.0, 3.0]), reduction="none")
    torch.testing.assert_close(both, (1 * one[0] + 3 * one[1]) / 4, rtol=1e-6, atol=0)
    assert torch.equal(fg.ngmg_loss(*args, scales=[1.0]), fg.ngmg_loss(*args))
    for bad, err in (([], "empty"), ([1.0, 0.0], "positive"), ([float("nan")], "positive"),
                     (torch.ones(2, 2), "1-D")):
        with pytest.raises(ValueError, match=err):
            fg.ngmg_loss(*args, scales=bad)
    with pytest.raises(TypeError, match="sequence"):
        fg.ngmg_loss(*args, scales=2.0)
    with pytest.raises(ValueError, match="normalize"):
        fg.ngmg_loss(*args, scales=(1, 2), normalize=False)


@pytest.mark.parametrize("cov", COVS)
def test_gradient_is_minus_ptilde_times_score(cov, seed, backend):
    """∂loss_n/∂z_n = −p̃_n ∇ log p(z_n) (SPEC §2): each backend's float32 gradient against p̃
    and the score of the float64 reference, element by element, on points near the means (where
    p̃ is not vanishingly small)."""
    p = random_problem(cov, None, N=40, K=3, D=4, seed=seed)
    pick = torch.randint(0, 3, (40,))
    z = (p["means"][pick] + 0.5 * torch.randn(40, 4)).requires_grad_()
    params = [p[k] for k in ARGS[1:]]
    loss = fg.ngmg_loss(z, *params, cov, reduction="none", backend=backend)
    (g,) = torch.autograd.grad(loss.sum(), z)
    z64 = z.detach().double().requires_grad_()
    p64 = [t.double() for t in params]
    ptilde = -reference.ngmg_loss(z64, *p64, cov, reduction="none").detach()
    (score,) = torch.autograd.grad(reference.gmm_log_prob(z64, *p64, cov).sum(), z64)
    assert ptilde.median() > 1e-3
    assert_close_per_element(g, -ptilde[:, None] * score, bars(torch.float32).grad, f"{backend} {cov} dloss/dz")


@pytest.mark.parametrize("use_target", [False, True])
def test_gradcheck(use_target, seed, backend):
    """normalize=False: every input.  normalize=True: c is a stop-gradient function of
    (prec_chol, logits), so finite differences see it there; check z and means only."""
    p = random_problem("full", 2, N=3, K=2, D=2, dtype=torch.float64, seed=seed)
    p["prec_chol"] = p["prec_chol"].triu()
    # Points near the means so p̃ is not vanishingly small.
    p["x"] = p["means"][:, :1] + 0.3 * torch.randn(2, 3, 2, dtype=torch.float64)
    args = [p[k].detach().requires_grad_() for k in ARGS]
    target = torch.tensor([[0, 1, 1], [1, 0, 0]]) if use_target else None

    def f(*a, normalize):
        return fg.ngmg_loss(*a, "full", target=target, normalize=normalize, reduction="none",
                            backend=backend)

    assert torch.autograd.gradcheck(lambda *a: f(*a, normalize=False), args)
    z, m = args[:2]
    assert torch.autograd.gradcheck(lambda z, m: f(z, m, *args[2:], normalize=True), (z, m))


def test_reductions(seed):
    p = random_problem("diag", 2, N=7, K=3, D=2, dtype=torch.float64, seed=seed)
    args = [p[k] for k in ARGS]
    none = fg.ngmg_loss(*args, reduction="none")
    torch.testing.assert_close(fg.ngmg_loss(*args, reduction="sum"), none.sum())
    torch.testing.assert_close(fg.ngmg_loss(*args), none.mean())  # mean over all G·N points
    empty = torch.zeros(2, 0, 2, dtype=torch.float64)
    assert fg.ngmg_loss(empty, *args[1:]).item() == 0.0
    assert fg.ngmg_loss(empty, *args[1:], reduction="none").shape == (2, 0)


def test_normalizer_keeps_high_dimensional_loss_representable():
    """D = 64: log p near −100 underflows float32's exp, p̃ does not."""
    torch.manual_seed(0)
    D, K = 64, 3
    means = torch.randn(K, D)
    prec = torch.full((K, D), 4.0)
    z = means[0] + 0.05 * torch.randn(5, D)
    logp = fg.gmm_log_prob(z, means, prec, torch.zeros(K))
    assert torch.all(logp > 20)  # tight components: density is large, not small
    wide = torch.full((K, D), 0.25)
    z = means[0] + 2.0 * torch.randn(5, D)
    assert torch.all(torch.exp(fg.gmm_log_prob(z, means, wide, torch.zeros(K))) == 0)  # p underflows
    loss = fg.ngmg_loss(z, means, wide, torch.zeros(K), reduction="none")
    assert torch.all(loss < 0)  # p̃ does not
    ref = reference.ngmg_loss(z.double(), means.double(), wide.double(), torch.zeros(K, dtype=torch.float64),
                              reduction="none")
    assert_close_per_element(loss, ref, 1e-5, "loss")  # and it is the right p̃, not just a negative number


def test_target_is_the_pull_toward_its_component(seed):
    p = random_problem("spherical", None, N=8, K=4, D=3, dtype=torch.float64, seed=seed)
    t = torch.randint(0, 4, (8,))
    loss = fg.ngmg_loss(p["x"], p["means"], p["prec_chol"], p["logits"], "spherical",
                        target=t, reduction="none")
    s = p["prec_chol"][t]
    expect = -torch.exp(-0.5 * s**2 * ((p["x"] - p["means"][t]) ** 2).sum(-1))
    torch.testing.assert_close(loss, expect)


# --- SPEC §2, "parallel lines" ---------------------------------------------------------------

def _parallel_lines(theta, n=64, K=11, sigma=0.1):
    """Target components along {0}×[0, 1]; model samples on {θ}×[0, 1]."""
    means = torch.stack([torch.zeros(K), torch.linspace(0, 1, K)], -1).double()
    prec = torch.full((K,), 1.0 / sigma, dtype=torch.float64)
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    th = torch.tensor(float(theta), dtype=torch.float64, requires_grad=True)
    z = torch.stack([th.expand(n), u], -1)
    return th, z, means, prec


def test_parallel_lines_ngmg_is_finite_continuous_and_points_home():
    thetas = [-50.0, -3.0, -0.5, -0.2, -0.05, 0.0, 0.05, 0.2, 0.5, 3.0, 50.0, 1e30]
    losses, grads = [], []
    for t in thetas:
        th, z, means, prec = _parallel_lines(t)
        loss = fg.ngmg_loss(z, means, prec, torch.zeros(11, dtype=torch.float64), "spherical")
        (g,) = torch.autograd.grad(loss, th)
        losses.append(loss.item())
        grads.append(g.item())
    assert all(math.isfinite(v) for v in losses + grads)
    # L(θ) increases with |θ| and is minimal at θ = 0.
    left, right = losses[:6], losses[5:]
    assert all(a >= b for a, b in zip(left, left[1:])) and all(a <= b for a, b in zip(right, right[1:]))
    # dL/dθ points toward θ = 0 (descent moves θ to 0) wherever it is not negligibly small.
    for t, g in zip(thetas, grads):
        assert g == 0 or math.copysign(1, g) == math.copysign(1, t) or t == 0
        assert abs(g) <= 10.0 * math.exp(-0.5) + 1e-12  # max ‖U‖₂ e^{−1/2}, per point, hence mean
    # Continuity: a small step in θ changes L by a small amount.
    th, z, means, prec = _parallel_lines(0.2)
    l1 = fg.ngmg_loss(z, means, prec, torch.zeros(11, dtype=torch.float64), "spherical").item()
    th, z, means, prec = _parallel_lines(0.2 + 1e-6)
    l2 = fg.ngmg_loss(z, means, prec, torch.zeros(11, dtype=torch.float64), "spherical").item()
    assert abs(l2 - l1) < 1e-5


def test_parallel_lines_log_likelihood_gradient_is_not_usable():
    """The NLL's θ-gradient grows without bound (∝ θ/σ²), and is lost once the distance
    overflows; the NGMG stays bounded (previous test)."""
    g_nll = []
    for t in [1.0, 10.0, 100.0]:
        th, z, means, prec = _parallel_lines(t)
        nll = -fg.gmm_log_prob(z, means, prec, torch.zeros(11, dtype=torch.float64), "spherical").mean()
        (g,) = torch.autograd.grad(nll, th)
        g_nll.append(g.item())
    assert g_nll[0] > 50 and g_nll[1] > 9 * g_nll[0] and g_nll[2] > 9 * g_nll[1]


def test_ngmg_per_point_gradient_bound(seed):
    """‖∂loss_n/∂z_n‖ ≤ max_k ‖U_k‖₂ e^{−1/2} everywhere (SPEC §2)."""
    for cov in COVS:
        p = random_problem(cov, None, N=400, K=3, D=2, dtype=torch.float64, seed=seed)
        z = (p["x"] * torch.rand(400, 1, dtype=torch.float64) * 2).requires_grad_()
        loss = fg.ngmg_loss(z, p["means"], p["prec_chol"], p["logits"], cov, reduction="sum")
        (g,) = torch.autograd.grad(loss, z)
        U = p["prec_chol"]
        if cov == "diag":
            bound = U.abs().max()
        elif cov == "spherical":
            bound = U.max()
        else:
            bound = torch.linalg.matrix_norm(U, ord=2).max()
        assert g.norm(dim=-1).max() <= bound * math.exp(-0.5) * (1 + 1e-9)


@pytest.mark.parametrize("cov", COVS)
@pytest.mark.parametrize("K", [16, 21])
@pytest.mark.parametrize("G", [None, 2])
def test_target_with_many_components(cov, K, G, seed, backend):
    """K ≤ 16: the compiled backend's tile kernels pick the target's lanes; K > 16: its
    gather kernels.  Both against the reference, with and without normalize."""
    p = random_problem(cov, G, N=37, K=K, D=3, seed=seed, requires_grad=True)
    target = torch.randint(0, K, (37,) if G is None else (G, 37))
    for normalize in (True, False):
        check_against_reference(p, cov, backend, "ngmg", target=target, normalize=normalize)


@pytest.mark.parametrize("use_target", [False, True])
def test_far_points_give_zero_loss_and_zero_gradients(use_target, backend):
    """A point at infinity (or so far that p̃ underflows) contributes 0 and no NaN."""
    p = random_problem("diag", None, N=6, K=3, D=2, seed=1)
    x = p["x"].clone()
    x[2, 0] = float("inf")
    x[4] = 1e4
    args = [x.requires_grad_(), *(p[k].detach().requires_grad_() for k in ARGS[1:])]
    target = torch.tensor([0, 1, 2, 0, 1, 2]) if use_target else None
    loss = fg.ngmg_loss(*args, target=target, reduction="none", backend=backend)
    assert loss[2] == 0 and loss[4] == 0 and torch.all(loss[[0, 1, 3, 5]] < 0)
    grads = torch.autograd.grad(loss.sum(), args, allow_unused=True)
    for g in grads:
        assert g is None or torch.isfinite(g).all()
    assert torch.all(grads[0][[2, 4]] == 0)
    # the live rows, and every parameter gradient, against the float64 reference without the far rows
    live = [0, 1, 3, 5]
    ref_args = [args[0].detach()[live].double().requires_grad_(),
                *(a.detach().double().requires_grad_() for a in args[1:])]
    ref = reference.ngmg_loss(*ref_args, target=None if target is None else target[live], reduction="none")
    assert_close_per_element(loss[live], ref, 1e-5, "loss")
    ref_grads = torch.autograd.grad(ref.sum(), ref_args, allow_unused=True)
    assert_close_per_element(grads[0][live], ref_grads[0], 1e-4, "d/dx")
    for name, g, r in zip(ARGS[1:], grads[1:], ref_grads[1:]):
        if r is None:  # the weights do not enter a targeted loss
            assert g is None or torch.all(g == 0), name
        else:
            assert_close_per_element(g, r, 1e-4, f"d/d{name}")


def _parallel_lines_reference(theta, n=64, K=11, sigma=0.1):
    """``examples.parallel_lines.evaluate`` in float64 through the reference (the oracle)."""
    th, z, means, prec = _parallel_lines(theta, n, K, sigma)
    logits = torch.zeros(K, dtype=torch.float64)
    loss = reference.ngmg_loss(z, means, prec, logits, "spherical")
    (g_loss,) = torch.autograd.grad(loss, th)
    th, z, means, prec = _parallel_lines(theta, n, K, sigma)
    nll = -reference.gmm_log_prob(z, means, prec, logits, "spherical").mean()
    (g_nll,) = torch.autograd.grad(nll, th)
    return loss.item(), g_loss.item(), nll.item(), g_nll.item()


def _readme_parallel_lines_table():
    """The README's float32 parallel-lines rows: [(θ, L, dL/dθ, NLL, dNLL/dθ)] as printed."""
    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    start = lines.index("| θ | NGMG L(θ) | dL/dθ | NLL(θ) | dNLL/dθ |") + 2
    rows = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        rows.append(tuple(float(c) for c in ln.strip("|").split("|")))
    return rows


def test_parallel_lines_readme_table_is_what_the_example_computes():
    """Every number of the README's float32 table is what ``examples.parallel_lines`` computes
    (to the 4 digits printed), and each float32 number is the float64 reference's within the
    float32 bars: θ = 0 included (L at its minimum, both derivatives exactly 0 by symmetry), and
    θ = 1e20, where the float32 distance overflows (the contract: L = 0, dL/dθ = 0, NLL = inf
    with a zero gradient) while float64 still has a finite NLL."""
    from fastgmmdiff.examples.parallel_lines import evaluate

    rows = _readme_parallel_lines_table()
    assert [r[0] for r in rows][:1] == [0.0] and rows[-1][0] == 1e20 and len(rows) >= 8
    for theta, *printed in rows:
        got = evaluate(theta)  # float32
        for name, g, p in zip(("L", "dL/dθ", "NLL", "dNLL/dθ"), got, printed):
            assert g == p or abs(g - p) <= 5e-4 * abs(p), (theta, name, g, p)  # 4 significant digits
        ref = _parallel_lines_reference(theta)
        if theta == 1e20:  # float32: the distance overflows (contract); float64: 5e41 and 1e22
            assert got == (0.0, 0.0, math.inf, 0.0)
            assert ref[:2] == (0.0, 0.0) and math.isfinite(ref[2]) and ref[3] > 0
            continue
        for name, g, r, bar in zip(("L", "dL/dθ", "NLL", "dNLL/dθ"), got, ref, (1e-5, 1e-4, 1e-5, 1e-4)):
            assert_close_per_element(torch.tensor([g]), torch.tensor([r], dtype=torch.float64), bar,
                                     f"θ={theta:g} {name}")
        if theta == 0:
            assert got[1] == 0 and got[3] == 0 and rows[0][1] == min(r[1] for r in rows)


def test_parallel_lines_multi_scale_keeps_pulling(tmp_path):
    """Multi-scale NGMG (scales 1…32, σ = 0.1): dL/dθ within a factor 3 of its maximum (over
    θ from 0.01 to 30) for every θ in [0.1, 2], still positive (toward 0) at θ = 10, where the
    single-scale pull is exactly 0 in float32; the README's table is what the example prints,
    and each value is the float64 reference's; the plot is drawn."""
    from fastgmmdiff.examples.parallel_lines import SCALES, evaluate, evaluate_multi_scale, plot

    grid = [10 ** (k / 20) for k in range(-40, 30)]
    g = {t: evaluate_multi_scale(t)[1] for t in grid}
    top = max(g.values())
    assert all(g[t] >= top / 3 for t in grid if 0.1 <= t <= 2), {t: g[t] / top for t in grid if 0.1 <= t <= 2}
    assert evaluate_multi_scale(10.0)[1] > 0 and evaluate(10.0)[1] == 0
    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    start = lines.index("| θ | L(θ) | dL/dθ | single-scale dL/dθ | W1 = θ |") + 2
    rows = [tuple(float(c) for c in ln.strip("|").split("|")) for ln in lines[start:start + 8]]
    assert len(rows) == 8 and rows[-1][0] == 10.0
    for theta, L, gL, g1, w in rows:
        got = evaluate_multi_scale(theta) + (evaluate(theta)[1], theta)
        for name, a, b in zip(("L", "dL/dθ", "single", "W1"), got, (L, gL, g1, w)):
            assert a == b or abs(a - b) <= 5e-4 * abs(b), (theta, name, a, b)
        th, z, means, prec = _parallel_lines(theta)
        ref = reference.ngmg_loss(z, means, prec, torch.zeros(11, dtype=torch.float64), "spherical", scales=SCALES)
        (g_ref,) = torch.autograd.grad(ref, th)
        assert abs(got[0] - ref.item()) <= 1e-5 * abs(ref.item()), (theta, got[0], ref.item())
        assert abs(got[1] - g_ref.item()) <= 1e-4 * abs(g_ref.item()), (theta, got[1], g_ref.item())
    plot(str(tmp_path / "pl.png"))
    assert (tmp_path / "pl.png").stat().st_size > 10_000
