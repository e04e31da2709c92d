"""The CUDA kernels (csrc/cuda/log_prob_cuda.cu) run on this CPU: the same source compiled as
C++ against the emulation of csrc/cuda/emulation.h (every CUDA thread a fiber, real barriers,
poisoned shared memory, the H100/H200 launch limits and CUDA's sticky launch error), registered
as the ``fastgmmdiff_emu`` ops (tests/cuda_emu/emulated_ops.cpp).  Each case is judged against
the float64 reference (log p: the bar of ``fastgmmdiff.testing``) and, element by element, against
the CPU kernels (rule at ``AGREE``); after each case no launch error may be left pending.

The first run builds the library into build/cuda-emu (about 30 s); later runs reuse it.
``FASTGMMDIFF_EMU_SANITIZE=address`` builds it under AddressSanitizer instead (run python with
libasan preloaded: csrc/README.md).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from fastgmmdiff import reference
from fastgmmdiff.testing import (FULL_FAR_KINDS, LOOSEN_CAP, _summation_floor, assert_close_per_element, bars,
                                 check_far_point, check_overflowing_ngmg, elementwise_error, far_point_cases,
                                 far_point_problem, far_rows_problem, full_far_rows_problem, huge_density_problem,
                                 large_normalizer_problem, random_problem)

ROOT = Path(__file__).resolve().parents[1]
COVS = ["diag", "spherical", "full"]
ARGS = ("x", "means", "prec_chol", "logits")
SMEM_OPTIN = 232448  # H100/H200 opt-in shared memory per block, as the emulation enforces
# Element by element, against the CPU kernels: the error of an element, |a − ref| / (|ref| +
# rms(ref)) against the float64 reference, may be at most 4× the CPU kernels' worst element, or
# this floor, and never more than LOOSEN_CAP × the floor (the two share csrc/gmm_math.h: a bug
# there is in both, and must not pass because the CPU kernels are as wrong).  Both accumulate
# in the same dtype in different orders, and at large D a float32
# responsibility carries the rounding of an exponent in the hundreds whichever kernel computes
# it (measured: the emulated CUDA kernels' worst element at up to 2.2× the CPU kernels' over 800
# gradient tensors of random problems with D up to 226).  A kernel bug (a wrong index, a
# missing barrier, NaN) is off by orders of magnitude more.  Without a reference (rows dead in
# float32 but not in float64): |a − b| ≤ floor · (|b| + rms(b)).
AGREE = {torch.float32: 1e-4, torch.float64: 1e-10}


@pytest.fixture(scope="module")
def emu():
    """The emulated CUDA ops (torch.ops.fastgmmdiff_emu), built once and reused."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler")
    from torch.utils import cpp_extension

    san = os.environ.get("FASTGMMDIFF_EMU_SANITIZE", "")
    flags = ["-O2", "-std=c++17"] + ([f"-fsanitize={san}", "-fno-omit-frame-pointer", "-g"] if san else [])
    # torch's JIT build hashes only the listed source, not what it includes: key the build
    # folder on the CUDA sources and the emulation, so an edited kernel is rebuilt.
    parts = sorted(p for d in (ROOT / "csrc", ROOT / "tests" / "cuda_emu") for p in d.rglob("*") if p.is_file())
    key = hashlib.sha1(b"".join(p.read_bytes() for p in parts)).hexdigest()[:12]
    build = ROOT / "build" / ("cuda-emu" + (f"-{san}" if san else "") + f"-{key}")
    build.mkdir(parents=True, exist_ok=True)
    path = cpp_extension.load(
        name="fastgmmdiff_cuda_emu" + (f"_{san}" if san else ""),
        sources=[str(ROOT / "tests" / "cuda_emu" / "emulated_ops.cpp")],
        extra_include_paths=[str(ROOT / "csrc")], extra_cflags=flags,
        extra_ldflags=[f"-fsanitize={san}"] if san else [], build_directory=str(build),
        is_python_module=False, verbose=False)
    torch.ops.load_library(path)
    return torch.ops.fastgmmdiff_emu


@pytest.fixture(autouse=True)
def _no_pending_error(request):
    """No test may leave a launch error behind (it would surface at an unrelated launch)."""
    yield
    if "emu" in request.fixturenames:
        assert torch.ops.fastgmmdiff_emu.emu_take_error() == 0, "a CUDA error was left pending"


def _cpu():
    from fastgmmdiff import _dispatch

    reason = _dispatch.unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(f"the CPU kernels (the comparison) are unavailable: {reason}")
    return torch.ops.fastgmmdiff


def agree(a, b, name, dtype, ref=None, floor=None):
    """Element-wise agreement of ``a`` (emulated CUDA) with ``b`` (CPU kernels): the same
    finiteness pattern and infinities, and the accuracy rule above (against ``ref``, float64).
    ``floor()``: for a parameter gradient, the package's summation floor per element
    (testing._summation_floor: a sum over points that cancels is off by up to 2·N·u·Σ|t_n| in any
    order), which an element over the rule may take instead."""
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (name, a.shape, b.shape)
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    assert torch.equal(fa, fb), f"{name}: non-finite elements differ"
    assert torch.equal(a[~fb].nan_to_num(), b[~fb].nan_to_num()), f"{name}: infinities differ"
    if not fb.any():
        return
    a, b = a[fb], b[fb]
    if ref is None:
        err, bar = elementwise_error(a, b), AGREE[dtype]
    else:
        r = ref.detach().double()[fb]
        err = elementwise_error(a, r)
        bar = min(max(AGREE[dtype], 4 * elementwise_error(b, r)), LOOSEN_CAP * AGREE[dtype])
        if err > bar and floor is not None:
            fl = floor()
            if fl is not None:
                scale = r.abs() + r.pow(2).mean().sqrt()
                assert bool(((a - r).abs() <= torch.maximum(bar * scale, fl.double()[fb])).all()), \
                    f"{name}: element-wise error {err:.3g} > {bar:.3g} and over the summation floor"
                return
    assert err <= bar, f"{name}: element-wise error {err:.3g} > {bar:.3g}"


def problem(cov, G, N, K, D, seed, x_batched=True, dtype=torch.float32, far=True):
    p = random_problem(cov, G, N=N, K=K, D=D, seed=seed, x_batched=x_batched, dtype=dtype, far=far)
    return [p[k] for k in ARGS]


def check_log_prob(E, C, cov, args, seed=0, with_reference=True):
    """Forward and backward of log_prob, emulated CUDA against the float64 reference (log p:
    the package's bar; every element of log p and of each gradient: the rule of ``agree``)
    and the CPU kernels.  ``with_reference=False`` for rows dead in float32 but not in float64:
    then element-wise agreement with the CPU kernels only."""
    acc = torch.float64 if args[0].dtype == torch.float64 else torch.float32
    lp = E.log_prob(*args, cov)
    assert lp.dtype == acc
    up = torch.randn(lp.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = E.log_prob_backward(up.to(acc), *args, lp, cov)
    for name, g, a in zip(ARGS, grads, args):
        assert g.shape == a.shape and g.dtype == a.dtype, name
    ref, ref_grads = None, [None] * 4
    if with_reference:
        a64 = [t.detach().double().requires_grad_() for t in args]
        ref = reference.gmm_log_prob(*a64, cov)
        ref_grads = torch.autograd.grad(ref, a64, up)
        assert_close_per_element(lp, ref, bars(lp.dtype).value, "log p")
    if C is not None:
        lc = C.log_prob(*args, cov)
        agree(lp, lc, "log p", acc, ref)
        for i, (name, g, c, r) in enumerate(zip(ARGS, grads, C.log_prob_backward(up.to(acc), *args, lc, cov),
                                                ref_grads)):
            floor = None
            if with_reference and i > 0:
                fn = functools.partial(reference.gmm_log_prob, covariance_type=cov)
                floor = functools.partial(_summation_floor, fn, args, up, i)
            agree(g, c, name, acc, r, floor)
    return lp, grads


LAYOUTS = {  # G, N, K, D, x_batched
    "one mixture": (None, 300, 7, 5, True),
    "G, own x": (3, 37, 4, 6, True),
    "G, shared x": (3, 37, 4, 6, False),
    "N=K=D=1": (None, 1, 1, 1, True),
    "D=59": (None, 5, 2, 59, True),
    "mdn": (200, 1, 8, 2, True),
    "two blocks": (None, 600, 9, 17, True),
    "shared x, two blocks": (4, 300, 3, 5, False),
}


@pytest.mark.parametrize("cov", COVS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_log_prob(emu, cov, layout, seed):
    G, N, K, D, xb = LAYOUTS[layout]
    check_log_prob(emu, _cpu(), cov, problem(cov, G, N, K, D, seed, xb), seed)


@pytest.mark.parametrize("cov", COVS)
def test_float64_and_half_inputs(emu, cov, seed):
    check_log_prob(emu, _cpu(), cov, problem(cov, 2, 40, 3, 4, seed, dtype=torch.float64), seed)
    half = [t.bfloat16().float() for t in problem(cov, None, 50, 3, 4, seed)]  # values exact in bf16
    lp_f = emu.log_prob(*half, cov)
    lp_b = emu.log_prob(*[t.bfloat16() for t in half], cov)  # upcast inside: the same numbers
    assert lp_b.dtype == torch.float32 and torch.equal(lp_b, lp_f)


@pytest.mark.parametrize("cov", COVS)
def test_parameters_without_g_axis(emu, cov, seed):
    x, m, p, lg = problem(cov, 3, 20, 4, 3, seed)
    check_log_prob(emu, _cpu(), cov, [x, m, p, lg[0]], seed)   # logits shared
    check_log_prob(emu, _cpu(), cov, [x, m[0], p[0], lg[0]], seed)  # only x has G


@pytest.mark.parametrize("cov", COVS)
def test_far_rows_r_is_the_softmax(emu, cov, seed):
    """At |log p| ~ 1600 the saved float32 log p is rounded by ~1e-4; the backward corrects
    r = exp(ℓ − log p) by δ (log_prob_cuda.cu), so ∂x (well conditioned here: the means sit
    close together) meets 1e-5 per element against float64."""
    x, mu, prec, lg = (far_rows_problem(cov, None, 300, seed=seed)[k] for k in ARGS)
    lp = emu.log_prob(x, mu, prec, lg, cov)
    up = torch.randn(lp.shape)
    gx = emu.log_prob_backward(up, x, mu, prec, lg, lp, cov)[0]
    x64 = x.double().requires_grad_()
    ref = reference.gmm_log_prob(x64, mu.double(), prec.double(), lg.double(), cov)
    assert ref.abs().median() > 500
    (rx,) = torch.autograd.grad(ref, x64, up.double())
    assert_close_per_element(gx, rx, 1e-5, "d/dx")


@pytest.mark.parametrize("cov", COVS)
@pytest.mark.parametrize("G", [None, 5])
@pytest.mark.parametrize("use_target", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_ngmg(emu, cov, G, use_target, normalize, seed):
    """The fused NGMG op and its backward (finding 1: with normalize and no target the saved
    log p was log p − c, every gradient off by e^c)."""
    C = _cpu()
    x, m, p, lg = problem(cov, G, 64, 3, 4, seed)
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 3, (64,) if G is None else (G, 64), generator=gen) if use_target else None
    loss, saved = emu.ngmg(x, m, p, lg, t, cov, normalize)
    up = torch.randn(loss.shape, generator=gen, dtype=torch.float64)
    grads = emu.ngmg_backward(up.float(), x, m, p, lg, t, loss, saved, cov, normalize)
    a64 = [a.detach().double().requires_grad_() for a in (x, m, p, lg)]
    ref = reference.ngmg_loss(*a64, cov, target=t, normalize=normalize, reduction="none")
    ref_grads = torch.autograd.grad(ref, a64, up, allow_unused=True)
    assert_close_per_element(loss, ref, bars(loss.dtype).value, "NGMG")
    if use_target:  # the weights do not enter
        assert ref_grads[3] is None and torch.all(grads[3] == 0)
    lc, sc = C.ngmg(x, m, p, lg, t, cov, normalize)
    agree(loss, lc, "loss", torch.float32, ref)
    agree(saved, sc, "saved log p", torch.float32)
    for name, g, c, r in zip(ARGS, grads, C.ngmg_backward(up.float(), x, m, p, lg, t, lc, sc, cov, normalize), ref_grads):
        agree(g, c, name, torch.float32, r)


@pytest.mark.parametrize("cov", COVS)
def test_target_with_shared_x(emu, cov, seed):
    """NGMG with a target and x shared by G = 4 mixtures (the gather kernels' atomics into ∂x):
    the saved log N(x; μ_t, Σ_t), the loss and the gradients, against the CPU kernels and float64."""
    C = _cpu()
    x, m, p, lg = problem(cov, 4, 70, 3, 5, seed, x_batched=False)
    t = torch.randint(0, 3, (4, 70), generator=torch.Generator().manual_seed(seed))
    a64 = [a.detach().double().requires_grad_() for a in (x, m, p)]
    ref = reference.ngmg_loss(*a64, lg.double(), cov, target=t, normalize=False, reduction="none")
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, a64, g)
    (le, se), (lc, sc) = emu.ngmg(x, m, p, lg, t, cov, False), C.ngmg(x, m, p, lg, t, cov, False)
    agree(le, lc, "loss", torch.float32, ref)
    # log N(x; μ_t, Σ_t) itself, not log(−loss): p underflows float64 below log N ≈ −745 (a far
    # point of this random problem had −793, and log 0 = −inf failed the comparison)
    log_n = reference.component_log_prob(*a64, torch.zeros(lg.shape, dtype=torch.float64), cov)
    agree(se, sc, "log N", torch.float32, log_n.detach().gather(-1, t[..., None])[..., 0] + math.log(lg.shape[-1]))
    for name, a, b, r in zip(ARGS, emu.ngmg_backward(g.float(), x, m, p, lg, t, le, se, cov, False),
                             C.ngmg_backward(g.float(), x, m, p, lg, t, lc, sc, cov, False), ref_grads):
        agree(a, b, name, torch.float32, r)


@pytest.mark.parametrize("cov", COVS)
@pytest.mark.parametrize("N", [255, 256, 257])
def test_block_boundary_and_inf_logit(emu, cov, N, seed):
    x, m, p, lg = problem(cov, None, N, 4, 3, seed)
    lg = lg.clone()
    lg[1] = -math.inf
    check_log_prob(emu, _cpu(), cov, [x, m, p, lg], seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", range(4))
def test_far_point_with_a_sharp_or_flat_component(emu, case, dtype):
    """tests/test_extremes.py's far points (z² overflows, (s z)² and log p do not): the value
    and every gradient against the closed form."""
    name, cov, x, s, up = far_point_cases(dtype)[case]
    p = far_point_problem(cov, x, s, dtype)
    args = [p[k] for k in ARGS]
    lp = emu.log_prob(*args, cov)
    grads = emu.log_prob_backward(torch.tensor(up, dtype=dtype), *args, lp, cov)
    check_far_point(lp, grads, cov, x, s, up, f"emulated CUDA {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("components", FULL_FAR_KINDS)
def test_full_infinite_or_overflowing_distance_is_a_dead_row(emu, components, dtype, seed):
    """tests/test_extremes.py's full-covariance far rows (inf · 0, inf − inf in Uᵀz): −inf and
    zero ∂x, never NaN; the live rows alone against float64 and the CPU kernels."""
    p, dead = full_far_rows_problem(dtype, components)
    args = [p[k] for k in ARGS]
    live = [n for n in range(args[0].shape[0]) if n not in dead]
    check_log_prob(emu, _cpu(), "full", [args[0][live]] + args[1:], seed)
    lp, grads = check_log_prob(emu, _cpu(), "full", args, seed, with_reference=False)
    assert bool((lp[dead] == -math.inf).all()) and bool(torch.isfinite(lp[live]).all()), lp
    assert all(bool(torch.isfinite(g).all()) for g in grads) and bool((grads[0][dead] == 0).all())


def test_ngmg_without_normalisation_at_a_huge_density(emu):
    """tests/test_extremes.py's p = 3.3e37 (float32): loss −p and every gradient finite and as
    the closed form (D·Σ w overflowed in ∂s; w s² before z made ∞ · 0 in ∂x)."""
    p, exact = huge_density_problem()
    args = [p[k] for k in ARGS]
    loss, saved = emu.ngmg(*args, None, "spherical", False)
    grads = emu.ngmg_backward(torch.ones_like(loss), *args, None, loss, saved, "spherical", False)
    bar = bars(torch.float32)
    assert_close_per_element(loss.double(), exact[0], bar.value, "loss")
    for name, g, e in zip(ARGS, grads, exact[1:] + (torch.zeros(1, dtype=torch.float64),)):
        assert bool(torch.isfinite(g).all()), (name, g)
        assert_close_per_element(g.double(), e, bar.grad, f"d/d{name}")


@pytest.mark.parametrize("use_target", [False, True], ids=["mixture", "target"])
def test_ngmg_without_normalisation_past_the_float32_range(emu, use_target):
    """tests/test_extremes.py's p = 2e52 (float32): loss −inf, gradients the exact values rounded
    to float32 (±inf, 0 at the mean), never NaN (ops.h overflow_split in ngmg_backward_cuda)."""
    def run(x, m, pr, lg, t):
        loss, saved = emu.ngmg(x, m, pr, lg, t, "spherical", False)
        return loss, emu.ngmg_backward(torch.ones_like(loss), x, m, pr, lg, t, loss, saved, "spherical", False)

    p, exact = huge_density_problem(s=3000.0)
    check_overflowing_ngmg({k: v.detach() for k, v in p.items()}, exact, run, use_target)


@pytest.mark.parametrize("cov", COVS)
@pytest.mark.parametrize("use_target", [False, True], ids=["mixture", "target"])
def test_ngmg_value_with_a_large_normaliser(emu, cov, use_target, seed):
    """tests/test_extremes.py's reproducer V (|c| in the hundreds, points near a mean): the
    normalised NGMG value within the float32 bar of float64 — the normaliser inside the
    logsumexp (ops.h ngmg_const), −½q_t with a target — and gradients as the CPU kernels'."""
    p, j = large_normalizer_problem(cov, seed=seed, N=48, D=40 if cov == "full" else 129)
    x, m, pr, lg = (p[k] for k in ARGS)
    t = j if use_target else None
    loss, saved = emu.ngmg(x, m, pr, lg, t, cov, True)
    a64 = [a.detach().double().requires_grad_() for a in (x, m, pr, lg)]
    ref = reference.ngmg_loss(*a64, cov, target=t, reduction="none")
    assert_close_per_element(loss, ref, bars(torch.float32).value, "NGMG")
    up = torch.ones_like(loss)
    ref_grads = torch.autograd.grad(ref, a64, up.double(), allow_unused=True)
    lc, sc = _cpu().ngmg(x, m, pr, lg, t, cov, True)
    grads = emu.ngmg_backward(up, x, m, pr, lg, t, loss, saved, cov, True)
    for name, g, c, r in zip(ARGS, grads, _cpu().ngmg_backward(up, x, m, pr, lg, t, lc, sc, cov, True), ref_grads):
        agree(g, c, name, torch.float32, r)


@pytest.mark.parametrize("cov", COVS)
def test_dead_rows_and_sharp_components(emu, cov, seed):
    """Finding 2: padding threads and dead rows computed w = 0 · exp(a_k − ½q), which overflows
    for sharp components near the origin (a_k − ½‖U_kᵀμ_k‖² > 88): NaN in every parameter
    gradient.  D = 64, 1/σ = 20, five points (27 padding threads) and a dead row."""
    D = 64
    m = torch.full((2, D), 0.05)
    m[1] += 3
    if cov == "diag":
        p = torch.full((2, D), 20.0)
    elif cov == "spherical":
        p = torch.full((2,), 20.0)
    else:
        p = torch.diag_embed(torch.full((2, D), 20.0))
    lg = torch.zeros(2)
    gen = torch.Generator().manual_seed(seed)
    # offsets of 0.02 (s‖z‖ ≈ 3): at 0.05 the precision gradient D W/s − s Σ w‖z‖² would cancel to
    # nothing by construction (s²‖z‖² ≈ D), leaving only rounding to compare
    x = torch.cat([m[0] + 0.02 * torch.randn(5, D, generator=gen), torch.full((1, D), 1e30)])
    a = (torch.log_softmax(lg, 0) + 64 * math.log(20) - 0.5 * D * math.log(2 * math.pi)
         - 0.5 * ((m * 20) ** 2).sum(-1))
    assert a.max() > 88  # the exponent a padding thread would see
    check_log_prob(emu, _cpu(), cov, [x[:5], m, p, lg], seed)
    lp, grads = check_log_prob(emu, _cpu(), cov, [x, m, p, lg], seed, with_reference=False)
    assert lp[-1] == -math.inf and torch.all(grads[0][-1] == 0)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("cov,dtype,D,block", [
    ("full", torch.float32, 112, 256), ("full", torch.float32, 113, 128),
    ("diag", torch.float32, 225, 256), ("diag", torch.float32, 226, 128),
    ("full", torch.float64, 56, 256), ("full", torch.float64, 57, 128),
    ("spherical", torch.float64, 113, 128)])
def test_shared_memory_boundary(emu, cov, dtype, D, block, seed):
    """Finding 3: the backward asked for more shared memory than the opt-in limit (fp32 full
    D ≥ 113 ...), and the refused cudaFuncSetAttribute left an error for the next launch.
    Now the block shrinks until it fits; the emulation enforces the H100/H200 limit.  Points
    near the components: at D ≈ 226 a far point (ℓ ~ −2500, float32 spacing 2.4e-4) has
    responsibilities no float32 summation order resolves to the bar, and which order lands
    closer is chance; far rows are judged by the layout tests (D = 59) and the CPU tests."""
    elem = 8 if dtype == torch.float64 else 4
    smem = lambda b: elem * (b * D * (2 if cov == "full" else 1) + b + 1)  # noqa: E731
    assert smem(block) <= SMEM_OPTIN and (block == 256 or smem(2 * block) > SMEM_OPTIN)
    before = emu.emu_stats()
    check_log_prob(emu, _cpu(), cov, problem(cov, None, 256, 2, D, seed, dtype=dtype, far=False), seed)
    after = emu.emu_stats()
    assert after[1] == before[1], "a launch failed"
    assert after[3] <= SMEM_OPTIN


@pytest.mark.parametrize("cov,dtype,D", [("full", torch.float32, 908), ("full", torch.float64, 454),
                                         ("diag", torch.float64, 908)])
def test_shared_memory_beyond_any_block_is_a_clear_error(emu, cov, dtype, D, seed):
    """Past what 32 threads fit: a clear error naming the limit and the way out, before any
    launch, and nothing left pending (the next, unrelated launch runs)."""
    x, m, p, lg = problem(cov, None, 4, 1, D, seed, dtype=dtype)
    lp = emu.log_prob(x, m, p, lg, cov)
    with pytest.raises(RuntimeError, match=r"shared memory.*backend='triton' or 'torch'"):
        emu.log_prob_backward(torch.ones_like(lp), x, m, p, lg, lp, cov)
    assert emu.emu_take_error() == 0
    small = problem("diag", None, 10, 2, 3, seed)
    assert torch.isfinite(emu.log_prob(*small, "diag")).all()


@pytest.mark.parametrize("cov", COVS)
def test_empty_mixture_batch(emu, cov, seed):
    """Finding 4: G = 0 with N > 0 launched a zero-block grid."""
    x, m, p, lg = problem(cov, 2, 10, 2, 3, seed)
    lp = emu.log_prob(x[:0], m[:0], p[:0], lg[:0], cov)
    assert lp.shape == (0, 10)
    grads = emu.log_prob_backward(lp, x[:0], m[:0], p[:0], lg[:0], lp, cov)
    assert [g.shape[0] for g in grads] == [0, 0, 0, 0]
    t = torch.zeros(0, 10, dtype=torch.long)
    loss, saved = emu.ngmg(x[:0], m[:0], p[:0], lg[:0], t, cov, True)
    assert loss.shape == (0, 10)
    emu.ngmg_backward(loss, x[:0], m[:0], p[:0], lg[:0], t, loss, saved, cov, True)


@pytest.mark.parametrize("cov", COVS)
def test_out_of_range_target_is_never_read(emu, cov, seed):
    """Finding 5: a target outside [0, K) reached the kernels unchecked (CUDA-graph capture,
    torch.compile, direct torch.ops calls) and read out of bounds.  Its point now gets NaN
    (loss, log p and ∂x) and nothing is read through it; the other points are unaffected."""
    x, m, p, lg = problem(cov, 2, 30, 3, 4, seed)
    t = torch.randint(0, 3, (2, 30), generator=torch.Generator().manual_seed(seed))
    bad = t.clone()
    bad[1, 4], bad[0, 7] = 3, -1  # past the end of the parameters, before their start
    loss, lp = emu.ngmg(x, m, p, lg, bad, cov, False)
    ok = torch.ones_like(lp, dtype=torch.bool)
    ok[1, 4] = ok[0, 7] = False
    assert lp[~ok].isnan().all() and loss[~ok].isnan().all()
    assert torch.equal(lp[ok], emu.ngmg(x, m, p, lg, t, cov, False)[1][ok])
    gx = emu.ngmg_backward(torch.ones_like(lp), x, m, p, lg, bad, loss, lp, cov, False)[0]
    assert gx[1, 4].isnan().all() and gx[0, 7].isnan().all() and torch.isfinite(gx[ok]).all()
    loss, saved = emu.ngmg(x, m, p, lg, bad, cov, True)
    assert loss[~ok].isnan().all() and torch.isfinite(loss[ok]).all()


def test_grid_limit_is_a_clear_error(emu):
    """Finding 6: the block count was cast to unsigned unchecked (past 2^31 the launch failed or
    covered part of the work)."""
    assert emu.emu_grid_blocks(2**31 - 1) == 2**31 - 1
    with pytest.raises(RuntimeError, match="more than a grid takes"):
        emu.emu_grid_blocks(2**31)


def test_nondeterministic_paths_tell_torch(emu, seed):
    """Finding 7: the atomics paths now raise under torch.use_deterministic_algorithms(True);
    the one-block backward (N ≤ 256, own x) does not."""
    x, m, p, lg = problem("diag", None, 300, 3, 4, seed)
    lp = emu.log_prob(x, m, p, lg, "diag")
    t = torch.zeros(300, dtype=torch.long)
    tloss, tlp = emu.ngmg(x, m, p, lg, t, "diag", False)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        emu.log_prob_backward(torch.ones_like(lp[:200]), x[:200], m, p, lg, lp[:200], "diag")
        with pytest.raises(RuntimeError, match="fastgmmdiff CUDA log_prob backward"):
            emu.log_prob_backward(torch.ones_like(lp), x, m, p, lg, lp, "diag")
        with pytest.raises(RuntimeError, match="fastgmmdiff CUDA NGMG-with-target backward"):
            emu.ngmg_backward(torch.ones_like(tlp), x, m, p, lg, t, tloss, tlp, "diag", False)
    finally:
        torch.use_deterministic_algorithms(was)


def test_one_block_backward_is_deterministic_in_any_thread_order(emu, seed, monkeypatch):
    """Threads run in ascending or descending order: a race-free block gives the same bits."""
    args = problem("full", None, 200, 5, 6, seed)
    lp = emu.log_prob(*args, "full")
    up = torch.randn(lp.shape, generator=torch.Generator().manual_seed(seed))
    fwd = emu.log_prob_backward(up, *args, lp, "full")
    monkeypatch.setenv("FASTGMMDIFF_EMU_ORDER", "reverse")
    rev = emu.log_prob_backward(up, *args, lp, "full")
    for a, b in zip(fwd, rev):
        assert torch.equal(a, b)


def test_emulation_enforces_the_launch_limits(emu):
    """A launch beyond the hardware's limits runs nothing and leaves the error CUDA leaves."""
    invalid_config, invalid_value = 9, 1
    assert emu.emu_launch_probe(1024, 1, 1, 0, 0) == 0
    assert emu.emu_launch_probe(1025, 1, 1, 0, 0) == invalid_config
    assert emu.emu_launch_probe(32, 0, 1, 0, 0) == invalid_config
    assert emu.emu_launch_probe(32, 1, 65536, 0, 0) == invalid_config
    assert emu.emu_launch_probe(32, 1, 1, 48 * 1024, 0) == 0
    assert emu.emu_launch_probe(32, 1, 1, 48 * 1024 + 1, 0) == invalid_value  # not raised first
    assert emu.emu_launch_probe(32, 1, 1, SMEM_OPTIN, SMEM_OPTIN) == 0
    assert emu.emu_launch_probe(32, 1, 1, 100, SMEM_OPTIN + 1) == invalid_value  # refused


def test_emulation_shows_a_missing_barrier(emu, monkeypatch):
    """The model the tests rely on: without __syncthreads() a thread reads another's unwritten
    (NaN-poisoned) shared memory, deterministically; with it, every value."""
    full = float(sum(range(64)))
    assert emu.emu_barrier_probe(64, True).tolist() == [full, full]
    assert math.isnan(emu.emu_barrier_probe(64, False)[0])  # thread 0 runs before the others
    monkeypatch.setenv("FASTGMMDIFF_EMU_ORDER", "reverse")
    assert math.isnan(emu.emu_barrier_probe(64, False)[1])  # thread 63 runs first


def test_cuda_source_uses_no_fast_math():
    """Finding 8: __expf contradicted the no-fast-math build (accuracy is the contract); the
    dynamic shared memory must be 16-byte aligned for float64."""
    src = (ROOT / "csrc" / "cuda" / "log_prob_cuda.cu").read_text()
    compat = (ROOT / "csrc" / "cuda" / "compat.h").read_text()
    intrinsics = re.findall(r"\b__(?:expf|logf|exp10f|powf|fdividef|sinf|cosf|fmul_r[nduz])\b", src + compat)
    assert not intrinsics, f"fast-math intrinsics in the CUDA source: {intrinsics}"
    assert "extern __shared__ __align__(16)" in compat
    assert "extern __shared__" not in src  # only through FGD_DYNAMIC_SMEM
