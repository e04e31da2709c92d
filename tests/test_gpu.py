"""GPU tests (run by bench/gpu_check.sh on a GPU machine): the "cuda", "triton" and "torch"
backends on CUDA tensors against the float64 reference, dead rows, targets, determinism of the
one-block backward, CUDA-graph capture and torch.compile.

Without a GPU the cases that do not need one still run, on CPU tensors at the same sizes:
"triton" under Triton's CPU interpreter (TRITON_INTERPRET=1, tests/conftest.py) and "torch";
"cuda" is skipped here (its kernels run emulated in tests/test_cuda_emulation.py), and so are
CUDA graphs and the CUDA-only checks."""

import pytest
import torch

import fastgmmdiff as fg
from fastgmmdiff.testing import check_against_reference, check_dead_rows, random_problem

COVS = ["diag", "spherical", "full"]
ARGS = ("x", "means", "prec_chol", "logits")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["cuda", "triton", "torch"])
def gpu_backend(request, triton_on_cpu_reason):
    if request.param not in fg.available_backends():
        pytest.skip(f"backend {request.param!r} unavailable")
    if DEV == "cpu":
        if request.param == "cuda":
            pytest.skip("no CUDA device (tests/test_cuda_emulation.py runs these kernels emulated)")
        if request.param == "triton" and triton_on_cpu_reason is not None:
            pytest.skip(f"no CUDA device, and Triton on CPU tensors: {triton_on_cpu_reason}")
    return request.param


def _need_gpu():
    if DEV != "cuda":
        pytest.skip("needs a CUDA device")


def _problem(cov, G, N, K, D, seed, x_batched=True):
    p = random_problem(cov, G, N=N, K=K, D=D, seed=seed, device=DEV, x_batched=x_batched,
                       requires_grad=True)
    if cov == "full":
        p["prec_chol"] = p["prec_chol"].detach().triu().requires_grad_()
    return p


def _check(p, cov, backend, op="log_prob", target=None):
    check_against_reference(p, cov, backend, op, target=target)


@pytest.mark.parametrize("cov", COVS)
@pytest.mark.parametrize("G,N,K,D,xb", [(None, 300, 7, 5, True), (3, 37, 4, 6, True), (3, 37, 4, 6, False),
                                        (None, 1, 1, 1, True), (None, 5, 2, 59, True),
                                        pytest.param(2000, 1, 8, 2, True, marks=pytest.mark.interpreter_heavy),
                                        pytest.param(None, 2049, 33, 17, True, marks=pytest.mark.interpreter_heavy)])
def test_log_prob_matches_reference(cov, G, N, K, D, xb, gpu_backend):
    _check(_problem(cov, G, N, K, D, seed=N + K, x_batched=xb), cov, gpu_backend)


@pytest.mark.parametrize("cov", COVS)
@pytest.mark.parametrize("use_target", [pytest.param(False, marks=pytest.mark.interpreter_heavy), True])
def test_ngmg_matches_reference(cov, use_target, gpu_backend):
    p = _problem(cov, 40, 256, 2, 4, seed=3)
    t = torch.randint(0, 2, (40, 256), device=DEV) if use_target else None
    _check(p, cov, gpu_backend, op="ngmg", target=t)


@pytest.mark.parametrize("cov", COVS)
def test_dead_rows(cov, gpu_backend, seed):
    """An infinite coordinate and an overflowing distance: −inf and zero ∂x; the live rows and
    every parameter gradient against float64 (testing.check_dead_rows)."""
    p = _problem(cov, None, 6, 3, 4, seed=seed)
    p = {k: v.detach().clone() for k, v in p.items()}
    p["x"][1] = 1e30
    p["x"][4, 0] = float("inf")
    check_dead_rows(p, cov, gpu_backend, dead=[1, 4])


def test_one_block_backward_is_deterministic():
    if not torch.cuda.is_available() or "cuda" not in fg.available_backends():
        pytest.skip("no CUDA backend")
    p = _problem("diag", None, 256, 8, 40, seed=2)
    runs = []
    for _ in range(2):
        out = fg.gmm_log_prob(*(p[k] for k in ARGS), backend="cuda")
        runs.append(torch.autograd.grad(out.sum(), [p[k] for k in ARGS]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_cuda_graph_capture_of_forward_and_backward(gpu_backend):
    _need_gpu()
    p = _problem("diag", None, 256, 8, 40, seed=4)
    args = [p[k] for k in ARGS]

    def step():
        out = fg.gmm_log_prob(*args, backend=gpu_backend)
        return torch.autograd.grad(out.sum(), args)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            eager = step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        torch.testing.assert_close(a, b)


def test_torch_compile(gpu_backend):
    _need_gpu()  # on CPU tensors: tests/test_backends.py (opcheck, every backend)
    torch._dynamo.reset()
    p = _problem("full", None, 64, 4, 3, seed=5)
    args = [p[k] for k in ARGS]
    f = torch.compile(lambda *a: fg.ngmg_loss(*a, "full", backend=gpu_backend), fullgraph=True)
    torch.testing.assert_close(f(*args), fg.ngmg_loss(*args, "full", backend=gpu_backend))


def _need_cuda_backend():
    if not torch.cuda.is_available() or "cuda" not in fg.available_backends():
        pytest.skip("no CUDA backend")


@pytest.mark.parametrize("cov,D", [("full", 113), ("diag", 226)])
def test_cuda_backward_with_a_block_shrunk_to_fit_shared_memory(cov, D):
    """float32 full D = 113 / diag D = 226 at N = 256: 256 threads need more than the opt-in
    shared memory of an H100/H200, so the backward runs 128-thread blocks (csrc/cuda/plan.h)."""
    _need_cuda_backend()
    _check(_problem(cov, None, 256, 2, D, seed=7), cov, "cuda")


def test_auto_passes_what_the_cuda_kernels_cannot_take_to_triton(monkeypatch):
    _need_cuda_backend()
    monkeypatch.setenv("FASTGMMDIFF_AUTO_UNVALIDATED", "1")  # the intended order, not yet validated
    from fastgmmdiff import _checks

    p = _problem("full", None, 8, 1, 908, seed=8)
    c = _checks.prepare(*(p[k] for k in ARGS), "full")
    why, _ = _dispatch_plan(c)
    if not why:
        pytest.skip("this GPU's shared memory takes D = 908")
    assert fg._dispatch.resolve("auto", c.device, c).name != "cuda"
    with pytest.raises(ValueError, match="cannot run this problem"):
        fg.gmm_log_prob(*(p[k] for k in ARGS), "full", backend="cuda")


def _dispatch_plan(c):
    from fastgmmdiff import _dispatch

    return _dispatch._cuda_plan(c.covariance_type, c.D, c.K, 4, c.device.index or 0)


def test_cuda_out_of_range_target_is_nan_not_a_crash():
    """A direct op call skips the API's range check: the kernels give NaN for that point."""
    _need_cuda_backend()
    from fastgmmdiff import _ext

    _ext.load()
    p = random_problem("diag", 2, N=30, K=3, D=4, seed=9, device="cuda")
    t = torch.randint(0, 3, (2, 30), device="cuda")
    t[1, 4] = 3
    loss, lp = torch.ops.fastgmmdiff.ngmg(p["x"], p["means"], p["prec_chol"], p["logits"], t, "diag", False)
    torch.cuda.synchronize()
    assert lp[1, 4].isnan() and loss[1, 4].isnan() and torch.isfinite(lp[0]).all()


@pytest.mark.parametrize("cov", ["diag", "spherical"])
@pytest.mark.interpreter_heavy
def test_mdn_head_on_the_device(cov, gpu_backend, seed):
    """MixtureOfGaussians.log_prob of an MDN's y [B, D] with scale=σ: on the compiled backends it
    runs fastgmmdiff::log_prob_scale (on CUDA its composite form: 1/σ, the log_prob pair,
    −∂U·U²).  Values and the gradients to logits, loc, σ and y against MixtureSameFamily in
    float64, per element at the float32 bars."""
    import torch.distributions as tdist

    from fastgmmdiff.distributions import MixtureOfGaussians
    from fastgmmdiff.testing import assert_close_per_element, bars

    gen = torch.Generator().manual_seed(seed)
    B, K, D = 257, 5, 3
    logits, loc, y = torch.randn(B, K, generator=gen), torch.randn(B, K, D, generator=gen), torch.randn(B, D, generator=gen)
    sigma = 0.4 + torch.rand(B, K, D if cov == "diag" else 1, generator=gen)
    leaves = [t.to(DEV).requires_grad_() for t in (logits, loc, sigma, y)]
    out = MixtureOfGaussians(*leaves[:2], scale=leaves[2], backend=gpu_backend).log_prob(leaves[3])
    l64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    comp = tdist.Independent(tdist.Normal(l64[1], l64[2].expand(B, K, D)), 1)
    ref = tdist.MixtureSameFamily(tdist.Categorical(logits=l64[0]), comp).log_prob(l64[3])
    bar = bars(torch.float32)
    assert out.shape == (B,) and out.device.type == DEV
    assert_close_per_element(out.cpu(), ref, bar.value, "log p")
    up = torch.randn(B, generator=gen)
    g = torch.autograd.grad(out, leaves, up.to(DEV))
    r = torch.autograd.grad(ref, l64, up.double())
    for name, a, b in zip(("logits", "loc", "scale", "y"), g, r):
        assert_close_per_element(a.cpu(), b, bar.grad, f"d/d{name}")
