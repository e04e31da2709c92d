"""The Triton backend against the float64 reference.  Without a GPU the kernels run under
Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before anything imports
triton), on small sizes: every covariance type, odd sizes (N, K, D not multiples of the
blocks; D past one block), G batching with per-mixture and shared x, −inf rows, float64 and
half inputs, NGMG with and without target, determinism.  The tests shared by every backend
(tests/conftest.py's ``backend`` fixture: test_log_prob, test_ngmg, test_distributions,
test_backends' opcheck) run it too."""

import pytest
import torch

import fastgmmdiff as fg
from fastgmmdiff import _dispatch, reference
from fastgmmdiff.testing import (assert_close_per_element, bars, check_against_reference, check_dead_rows,
                                 far_rows_problem, random_problem)

COVS = ["diag", "spherical", "full"]
ARGS = ("x", "means", "prec_chol", "logits")


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _need_triton():
    reason = _dispatch.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    if _device() == "cpu" and not _dispatch._triton_interpreted():
        pytest.skip("no GPU and not under TRITON_INTERPRET=1")


def _check(p, cov, op="log_prob", target=None, normalize=True):
    return check_against_reference(p, cov, "triton", op, target=target, normalize=normalize)


@pytest.mark.parametrize("cov", COVS)
@pytest.mark.parametrize("G,N,K,D,x_batched", [
    (None, 1, 1, 1, True), (None, 37, 5, 6, True), (None, 33, 17, 19, True),   # D > BLOCK_D
    (3, 29, 4, 5, True), (3, 29, 4, 5, False), (2, 65, 33, 3, True),
    (2, 40, 3, 37, False)])  # shared x past one block (full: 2×2 blocks of the D×D product)
def test_log_prob_matches_reference(cov, G, N, K, D, x_batched, seed):
    p = random_problem(cov, G, N=N, K=K, D=D, seed=seed, device=_device(), x_batched=x_batched,
                       requires_grad=True)
    _check(p, cov)


@pytest.mark.parametrize("cov", COVS)
def test_float64_inputs(cov, seed):
    p = random_problem(cov, 2, N=21, K=3, D=7, dtype=torch.float64, seed=seed, device=_device(),
                       requires_grad=True)
    _check(p, cov)


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_full_past_one_tile_and_large_d(cov, seed):
    """D = 40 (not a power of two; full: 2×2 blocks of the D×D product, the lower one skipped)
    and, for full, D = 130 (five blocks per side, the last one partial)."""
    for D in (40,) + ((130,) if cov == "full" else ()):
        p = random_problem(cov, None, N=17, K=2, D=D, seed=seed, device=_device(), requires_grad=True)
        _check(p, cov)


@pytest.mark.parametrize("cov", COVS)
@pytest.mark.parametrize("use_target", [False, True])
def test_ngmg(cov, use_target, seed):
    p = random_problem(cov, 2, N=25, K=4, D=5, seed=seed, device=_device(), requires_grad=True)
    target = torch.randint(0, 4, (2, 25), device=_device()) if use_target else None
    out = _check(p, cov, op="ngmg", target=target)
    assert torch.all(out <= 0) and torch.all(out >= -1)


@pytest.mark.parametrize("cov", COVS)
@pytest.mark.parametrize("x_batched", [True, False])
def test_ngmg_target_gathers_odd_sizes(cov, x_batched, seed):
    """The targeted kernels (gather each point's component; per-component sums in a fixed order
    by sorting on target) with D past one block, K with empty components, shared x."""
    p = random_problem(cov, 3, N=70, K=9, D=19 if cov != "full" else 6, seed=seed, device=_device(),
                       x_batched=x_batched, requires_grad=True)
    target = torch.randint(0, 7, (3, 70), device=_device())  # components 7, 8 get no point
    _check(p, cov, op="ngmg", target=target)
    _check(p, cov, op="ngmg", target=target, normalize=False)


@pytest.mark.parametrize("D", [6, 40])
@pytest.mark.parametrize("x_batched", [True, False])
def test_full_target_walks_each_components_points(D, x_batched, seed):
    """Full covariance with target (kernels/gmm.py: one program per component over its points,
    sorted by target): D = 6 in one block, D = 40 in 32×32 blocks (∂x, Σ w y and Σ w z yᵀ
    accumulated in place), components 7 and 8 with no point, shared x."""
    p = random_problem("full", 3, N=45, K=9, D=D, seed=seed, device=_device(), x_batched=x_batched,
                       requires_grad=True, far=False)  # far out at D = 40, p̃ underflows float32
    target = torch.randint(0, 7, (3, 45), device=_device())
    _check(p, "full", op="ngmg", target=target)
    _check(p, "full", op="ngmg", target=target, normalize=False)


@pytest.mark.parametrize("D", [4, 40])
def test_full_target_dead_rows(D, seed):
    """A point with an infinite coordinate: log N = −inf, loss 0, zero ∂x, and nothing of it in
    the parameter gradients: they equal those of the same problem without that point."""
    p = random_problem("full", None, N=20, K=3, D=D, seed=seed, device=_device())
    t = torch.randint(0, 3, (20,), device=_device())
    p["x"][5, 2] = float("inf")
    args = [p[k].detach().clone().requires_grad_() for k in ARGS]
    loss = fg.ngmg_loss(*args, "full", target=t, reduction="none", normalize=False, backend="triton")
    assert loss[5] == 0 and torch.isfinite(loss).all()
    up = torch.randn(20, device=_device())
    g = torch.autograd.grad(loss, args[:3], up)
    assert (g[0][5] == 0).all() and all(torch.isfinite(t_).all() for t_ in g)
    keep = [n for n in range(20) if n != 5]
    a64 = [args[0].detach()[keep].double().requires_grad_()] + [a.detach().double().requires_grad_() for a in args[1:3]]
    ref = reference.ngmg_loss(*a64, args[3].detach().double(), "full", target=t[keep], reduction="none",
                              normalize=False)
    bar = bars(torch.float32)
    assert_close_per_element(loss[keep].cpu(), ref, bar.value, "loss")
    rg = torch.autograd.grad(ref, a64, up[keep].double())
    for name, ours, theirs in zip(("x", "means", "prec_chol"), (g[0][keep], g[1], g[2]), rg):
        assert_close_per_element(ours.cpu(), theirs, bar.grad, f"d/d{name}")


def test_target_backward_is_deterministic(seed):
    p = random_problem("diag", 2, N=90, K=5, D=7, seed=seed, device=_device(), requires_grad=True)
    args = [p[k] for k in ARGS]
    t = torch.randint(0, 5, (2, 90), device=_device())
    runs = [torch.autograd.grad(fg.ngmg_loss(*args, "diag", target=t, backend="triton"), args[:3]) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_read_as_such(dtype, seed):
    """Half inputs go into the kernels as half (no host upcast) with float32 math: values and
    every gradient judged like the other backends (testing.bars: the dtype's unit roundoff
    plus the float32 bar, element by element)."""
    p = random_problem("diag", None, N=40, K=4, D=8, dtype=dtype, seed=seed, device=_device(),
                       requires_grad=True)
    out = _check(p, "diag")
    assert out.dtype == dtype


@pytest.mark.parametrize("cov,D", [("diag", 4), ("spherical", 4), ("full", 4), ("diag", 40), ("full", 40)])
def test_dead_rows_and_empty(cov, D, seed):
    """−inf rows: an infinite coordinate, and a distance that overflows; D = 40 takes the
    chunked paths (diag: D past one BLOCK_D; full: the D×D product in 32×32 blocks)."""
    p = random_problem(cov, None, N=10, K=3, D=D, seed=seed, device=_device())
    p["x"][3, 1] = float("inf")
    p["x"][7] = 1e30  # distance overflows for every component
    check_dead_rows(p, cov, "triton", dead=[3, 7])  # live rows and every gradient vs float64
    empty = fg.gmm_log_prob(p["x"][:0], p["means"], p["prec_chol"], p["logits"], cov, backend="triton")
    assert empty.shape == (0,)


def test_backward_is_deterministic(seed):
    p = random_problem("diag", 2, N=70, K=9, D=18, seed=seed, device=_device(), requires_grad=True)
    args = [p[k] for k in ARGS]
    up = torch.randn(2, 70, device=_device())
    g1 = torch.autograd.grad(fg.gmm_log_prob(*args, "diag", backend="triton"), args, up)
    g2 = torch.autograd.grad(fg.gmm_log_prob(*args, "diag", backend="triton"), args, up)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cov", COVS)
def test_split_parameter_sums_match_one_split(cov, seed, monkeypatch):
    """The parameter-gradient kernel's point splits (S partial sums added in a fixed order):
    S = 1 and S = 3 each agree with the float64 reference (the two float32 sums differ in their
    rounding, so each is held to the reference, not to the other), and repeat bit for bit."""
    from fastgmmdiff.kernels import gmm

    p = random_problem(cov, 2, N=150, K=5, D=6, seed=seed, device=_device(), requires_grad=True)
    if cov == "full":
        p["prec_chol"] = p["prec_chol"].detach().triu().requires_grad_()
    args = [p[k] for k in ARGS]
    up = torch.randn(2, 150, device=_device())
    for S in (1, 3):
        monkeypatch.setattr(gmm, "FORCE_SPLITS", S)
        assert gmm._splits(150, 5, 6, 2, cov, 32, 8, 4) == S
        g1, g2 = (torch.autograd.grad(fg.gmm_log_prob(*args, cov, backend="triton"), args, up) for _ in range(2))
        assert all(torch.equal(a, b) for a, b in zip(g1, g2))
        _check(p, cov)


def test_auto_never_picks_triton_for_cpu_tensors():
    assert _dispatch.resolve("auto", torch.device("cpu")).name != "triton"


@pytest.mark.parametrize("cov", COVS)
def test_far_rows_r_is_the_softmax_of_the_recomputed_l(cov, seed):
    """At |log p| ~ 1600 float32 log p is rounded by ~1e-4; r = exp(ℓ − log p) passed that on to
    every gradient (1.8e-4 on ∂x, diag).  The backward's δ pass (kernels/gmm.py _lse_residual)
    makes r the softmax of ℓ: 1e-5 per element against float64, as the cpu and torch backends."""
    p = far_rows_problem(cov, 64, 1, seed=seed)
    args = [p[k].to(_device()).requires_grad_() for k in ARGS]
    ref_args = [t.detach().cpu().double().requires_grad_() for t in args]
    ref = reference.gmm_log_prob(*ref_args, cov)
    assert ref.abs().median() > 500
    (gx,) = torch.autograd.grad(fg.gmm_log_prob(*args, cov, backend="triton").sum(), args[0])
    (rx,) = torch.autograd.grad(ref.sum(), ref_args[0])
    assert_close_per_element(gx.cpu(), rx, 1e-5, "d/dx")
