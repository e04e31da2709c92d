"""Backend registry, the registered ops (opcheck) and torch.compile."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastgmmdiff as fg
from fastgmmdiff import _dispatch, _ext
from fastgmmdiff.testing import random_problem

ARGS = ("x", "means", "prec_chol", "logits")


def test_available_backends_tell_the_truth():
    names = fg.available_backends()
    assert "torch" in names
    for name in names:  # every listed backend runs a CPU-or-its-device problem
        b = _dispatch._REGISTRY[name]
        if b.device_types is None or "cpu" in b.device_types:
            p = random_problem("diag", None, N=4, K=2, D=3)
            assert torch.isfinite(fg.gmm_log_prob(*(p[k] for k in ARGS), backend=name)).all()
    for name in set(_dispatch._REGISTRY) - set(names):
        with pytest.raises(RuntimeError, match=f"backend '{name}' is not available"):
            fg.gmm_log_prob(*(random_problem("diag")[k] for k in ARGS), backend=name)


def test_auto_is_torch_for_unknown_device_types():
    assert _dispatch.resolve("auto", torch.device("meta")).name == "torch"


def test_auto_passes_over_problems_the_cuda_kernels_cannot_take(monkeypatch):
    """The routing of backend="auto" for CUDA tensors (the decision only: no GPU here).  The
    limits come from csrc/cuda/plan.h through _C.cuda_limits, stubbed here with the numbers an
    H100 gives for float32 full covariance (D = 113 needs more shared memory than 256 threads
    fit, D = 908 more than 32 threads fit)."""
    from fastgmmdiff import _checks

    monkeypatch.setitem(_dispatch._PROBED, "cuda", None)
    monkeypatch.setitem(_dispatch._PROBED, "triton", None)
    monkeypatch.setenv("FASTGMMDIFF_AUTO_UNVALIDATED", "1")  # the intended order (none validated yet)

    def plan(cov, D, K, elem, device):
        if D > 907:
            return f"the CUDA backward needs {4 * (32 * D * 2 + 33)} bytes of shared memory per block", 0
        return "", 256 if D <= 112 else 128

    monkeypatch.setattr(_dispatch, "_cuda_plan", plan)
    cuda = torch.device("cuda", 0)

    def prob(N, D, G=None, x_batched=True):
        p = random_problem("full", G, N=N, K=2, D=D, x_batched=x_batched)
        return _checks.prepare(*(p[k] for k in ARGS), "full")

    assert _dispatch.resolve("auto", cuda, prob(300, 113)).name == "cuda"
    assert _dispatch.resolve("auto", cuda, prob(8, 908)).name == "triton"
    with pytest.raises(ValueError, match="backend 'cuda' cannot run this problem: the CUDA backward needs"):
        _dispatch.resolve("cuda", cuda, prob(8, 908))
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:  # atomics only where several blocks share a mixture, x is shared, or with a target
        assert _dispatch.resolve("auto", cuda, prob(256, 8)).name == "cuda"
        assert _dispatch.resolve("auto", cuda, prob(257, 8)).name == "triton"
        assert _dispatch.resolve("auto", cuda, prob(200, 113)).name == "triton"  # 128 threads per block
        assert _dispatch.resolve("auto", cuda, prob(10, 8, G=3, x_batched=False)).name == "triton"
        assert _dispatch.resolve("auto", cuda, prob(10, 8), has_target=True).name == "triton"
        assert _dispatch.resolve("cuda", cuda, prob(257, 8)).name == "cuda"  # by name: torch's alert decides
    finally:
        torch.use_deterministic_algorithms(was)


def test_auto_on_cuda_uses_only_validated_gpu_backends(monkeypatch):
    """No GPU run has validated the CUDA or Triton kernels: auto on CUDA tensors is torch, and
    says why; a backend entered in VALIDATED (with its measurement) is picked again."""
    from fastgmmdiff import _checks

    monkeypatch.setitem(_dispatch._PROBED, "cuda", None)
    monkeypatch.setitem(_dispatch._PROBED, "triton", None)
    monkeypatch.delenv("FASTGMMDIFF_AUTO_UNVALIDATED", raising=False)
    monkeypatch.setattr(_dispatch, "_cuda_plan", lambda cov, D, K, elem, device: ("", 256))
    cuda = torch.device("cuda", 0)
    p = random_problem("diag", None, N=8, K=2, D=3)
    c = _checks.prepare(*(p[k] for k in ARGS), "diag")
    assert _dispatch.resolve("auto", cuda, c).name == "torch"
    choice = _dispatch.explain(cuda, c)
    assert choice.name == "torch" and "not validated on a GPU" in dict(choice.considered)["cuda"]
    assert _dispatch.resolve("cuda", cuda, c).name == "cuda"  # by name: as asked
    monkeypatch.setitem(_dispatch.VALIDATED["cuda"], "triton", "bench/RESULTS.md (a test entry)")
    assert _dispatch.resolve("auto", cuda, c).name == "triton"
    monkeypatch.setenv("FASTGMMDIFF_AUTO_UNVALIDATED", "1")
    assert _dispatch.resolve("auto", cuda, c).name == "cuda"


def test_backend_for_says_what_auto_picks_and_why(monkeypatch):
    p = random_problem("full", None, N=8, K=2, D=908)
    args = [p[k] for k in ARGS]
    choice = fg.backend_for(*args, "full")
    assert choice.name == _dispatch.resolve("auto", torch.device("cpu")).name
    assert str(choice).startswith(f"backend='auto' on cpu tensors picks {choice.name!r}")
    # CUDA tensors (the decision only): the kernels' limit is the reason given for passing over them
    monkeypatch.setitem(_dispatch._PROBED, "cuda", None)
    monkeypatch.setitem(_dispatch._PROBED, "triton", None)
    monkeypatch.setenv("FASTGMMDIFF_AUTO_UNVALIDATED", "1")
    monkeypatch.setattr(_dispatch, "_cuda_plan", lambda *a: ("the CUDA backward needs 232516 bytes", 0))
    from fastgmmdiff import _checks

    c = _checks.prepare(*args, "full")
    choice = _dispatch.explain(torch.device("cuda", 0), c)
    assert choice.name == "triton" and dict(choice.considered)["cuda"] == "the CUDA backward needs 232516 bytes"
    assert "cuda: the CUDA backward needs" in str(choice) and "triton: picked" in str(choice)


OP_NAMES = {"torch": ("log_prob_torch", "log_prob_target_torch"), "cpu": ("log_prob", None),
            "triton": ("log_prob_triton", "log_prob_target_triton")}


@pytest.mark.parametrize("cov", ["diag", "spherical", "full"])
def test_opcheck(cov, backend):
    """torch.library.opcheck on every op pair: schema, fake (meta) kernel, autograd
    registration and the backward op (the compiled backend's target path is inside its fused
    ngmg op: test_opcheck_api_layout_and_fused_ngmg)."""
    fwd_name, tgt_name = OP_NAMES[backend]
    ops = torch.ops.fastgmmdiff
    p = random_problem(cov, 2, N=5, K=3, D=4, requires_grad=True)
    if cov == "full":
        p["prec_chol"] = p["prec_chol"].detach().triu().requires_grad_()
    args = tuple(p[k] for k in ARGS)
    fwd, bwd = getattr(ops, fwd_name), getattr(ops, fwd_name + "_backward")
    # Under Triton's CPU interpreter a launch is a plain call (kernels/gmm.py _launch: wrap_triton
    # takes no CPU tensors), which AOTDispatcher's functional tensors do not see written: the
    # test_aot_dispatch_* checks need wrap_triton, i.e. a GPU (tests/test_gpu.py test_torch_compile).
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")  # opcheck's default
    if backend == "triton":
        utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(fwd, (*args, cov), test_utils=utils)
    logp = fwd(*args, cov)
    torch.library.opcheck(bwd, (torch.randn_like(logp), *(a.detach() for a in args), logp.detach(), cov),
                          test_utils=utils)
    if backend == "cpu" and cov != "full":  # log_prob_scale: σ in place of U (MixtureOfGaussians)
        sargs = (args[0], args[1], (1 / args[2]).detach().requires_grad_(), args[3])
        for N in (5, 1):  # the tile kernels, and the one-point kernels on σ itself
            sa = tuple(a[:, :N] if i == 0 else a for i, a in enumerate(sargs))
            torch.library.opcheck(ops.log_prob_scale, (*sa, cov), test_utils=utils)
            lps = ops.log_prob_scale(*sa, cov)
            torch.library.opcheck(ops.log_prob_scale_backward,
                                  (torch.randn_like(lps), *(a.detach() for a in sa), lps.detach(), cov),
                                  test_utils=utils)
    if tgt_name is None:
        return
    target = torch.randint(0, 3, (2, 5))
    tfwd, tbwd = getattr(ops, tgt_name), getattr(ops, tgt_name + "_backward")
    torch.library.opcheck(tfwd, (*args[:3], target, cov), test_utils=utils)
    lt = tfwd(*args[:3], target, cov)
    torch.library.opcheck(tbwd, (torch.randn_like(lt), *(a.detach() for a in args[:3]), target, lt.detach(), cov),
                          test_utils=utils)


def test_compiled_ops_reject_bad_layouts_without_crashing():
    if "cpu" not in fg.available_backends():
        pytest.skip("compiled CPU kernels unavailable")
    ops = torch.ops.fastgmmdiff
    x, m, s, l = torch.randn(1, 4, 3), torch.randn(1, 2, 3), torch.rand(1, 2, 3) + 0.5, torch.zeros(1, 2)
    with pytest.raises(RuntimeError, match="x must be"):
        ops.log_prob(x[..., :2], m, s, l, "diag")
    with pytest.raises(RuntimeError, match="diag prec_chol must be"):
        ops.log_prob(x, m, s[..., :2], l, "diag")
    with pytest.raises(RuntimeError, match="covariance_type must be"):
        ops.log_prob(x, m, s, l, "tied")
    with pytest.raises(RuntimeError, match="logits must be"):
        ops.log_prob(x, m, s, l[:, :1], "diag")
    for K in (2, 20):  # the tile kernels (K ≤ 16) and the gather kernels
        mk, sk, lk = torch.randn(1, K, 3), torch.rand(1, K, 3) + 0.5, torch.zeros(1, K)
        with pytest.raises(ValueError, match="target holds"):  # a bad value: ValueError, as the API
            ops.ngmg(x, mk, sk, lk, torch.tensor([[0, 1, K + 5, 0]]), "diag", True)
        with pytest.raises(RuntimeError, match="target must be int64"):
            ops.ngmg(x, mk, sk, lk, torch.zeros(1, 4, dtype=torch.int32), "diag", True)
    with pytest.raises(RuntimeError, match="grad and logp must be"):
        ops.log_prob_backward(torch.ones(1, 3), x, m, s, l, torch.ones(1, 4), "diag")


def test_compiled_backend_is_built_where_required():
    """CI sets FASTGMMDIFF_REQUIRE_CPU_KERNELS=1: a broken extension build must fail the run
    rather than skip every compiled-backend test."""
    if os.environ.get("FASTGMMDIFF_REQUIRE_CPU_KERNELS", "") in ("", "0"):
        pytest.skip("FASTGMMDIFF_REQUIRE_CPU_KERNELS not set")
    assert "cpu" in fg.available_backends(), _dispatch.unavailable_reason("cpu")


def _run(code, **env):
    e = {k: v for k, v in os.environ.items()}
    e.update(env)
    return subprocess.run([sys.executable, "-W", "always", "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env=e)


def test_failed_extension_load_leaves_package_importable():
    r = _run("""
        import sys
        sys.modules["fastgmmdiff._C"] = None  # import of the extension now fails
        import torch, fastgmmdiff as fg
        avail = fg.available_backends()
        assert "torch" in avail and not {"cpu", "cuda"} & set(avail), avail
        x = torch.randn(4, 2)
        out = fg.gmm_log_prob(x, torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1))
        assert out.shape == (4,)
        try:
            fg.gmm_log_prob(x, torch.zeros(1, 2), torch.ones(1, 2), torch.zeros(1), backend="cpu")
        except RuntimeError as e:
            assert "did not load" in str(e) and "pip install --no-build-isolation" in str(e), e
        else:
            raise AssertionError("backend='cpu' should have failed")
        print("OK")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("OK")
    if _ext.build_info()[0] not in (None, "none"):  # a build with kernels: one warning at import
        assert r.stderr.count("CompiledKernelsWarning") == 1, r.stderr
        assert "did not load" in r.stderr and "pip install --no-build-isolation" in r.stderr


def test_kernels_built_for_another_torch_warn_once_at_import():
    """torch upgraded after the build: one warning at import naming the rebuild command."""
    if _ext.build_info()[0] in (None, "none"):
        pytest.skip("no build info (a source tree that was never built, or a pure-Python install)")
    r = _run(f"""
        import sys, types
        sys.modules["fastgmmdiff._build_info"] = types.SimpleNamespace(EXTENSION={_ext.build_info()[0]!r},
                                                                       TORCH_VERSION="1.0.0")
        import fastgmmdiff
    """)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("CompiledKernelsWarning") == 1, r.stderr
    assert "built against torch 1.0.0" in r.stderr and "--no-build-isolation" in r.stderr
    quiet = _run("import fastgmmdiff")  # the build as it is: no warning
    assert "CompiledKernelsWarning" not in quiet.stderr, quiet.stderr


def test_pure_python_install_warns_nothing():
    r = _run("""
        import sys, types
        sys.modules["fastgmmdiff._C"] = None
        sys.modules["fastgmmdiff._build_info"] = types.SimpleNamespace(EXTENSION="none", TORCH_VERSION=None)
        import fastgmmdiff as fg
        assert fg.available_backends() == ["torch"] or "cpu" not in fg.available_backends()
    """)
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr, r.stderr


def test_torch_compile_keeps_ops_in_one_graph():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gmm = fg.GaussianMixture(4, 3, "diag")

        def forward(self, z, t):
            return self.gmm.log_prob(z).mean() + self.gmm.ngmg_loss(z) + fg.ngmg_loss(
                z, self.gmm.means, self.gmm.prec_chol, self.gmm.logits, target=t)

    torch._dynamo.reset()
    m = Head()
    z = torch.randn(16, 3, requires_grad=True)
    t = torch.randint(0, 4, (16,))
    eager = m(z, t)
    # The target range check reads values and is skipped while tracing; everything else
    # must trace into a single graph.
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    out = compiled(z, t)
    torch.testing.assert_close(out, eager)
    g1 = torch.autograd.grad(out, z)[0]
    g2 = torch.autograd.grad(eager, z)[0]
    torch.testing.assert_close(g1, g2)


def _cpu_ops():
    if "cpu" not in fg.available_backends():
        pytest.skip("compiled CPU kernels unavailable")
    return torch.ops.fastgmmdiff


@pytest.mark.parametrize("cov", ["diag", "spherical", "full"])
@pytest.mark.parametrize("G", [None, 2])
def test_opcheck_api_layout_and_fused_ngmg(cov, G):
    """The compiled ops take the API layout (G axes as given, csrc/ops.h): opcheck on
    unbatched and batched inputs, and on the fused NGMG op with and without a target."""
    ops = _cpu_ops()
    p = random_problem(cov, G, N=5, K=3, D=4, requires_grad=True)
    if cov == "full":
        p["prec_chol"] = p["prec_chol"].detach().triu().requires_grad_()
    args = tuple(p[k] for k in ARGS)
    torch.library.opcheck(ops.log_prob, (*args, cov))
    assert ops.log_prob(*args, cov).shape == ((5,) if G is None else (G, 5))
    target = torch.randint(0, 3, (5,) if G is None else (G, 5))
    for t in (None, target):
        for normalize in (True, False):
            torch.library.opcheck(ops.ngmg, (*args, t, cov, normalize))
        for normalize in (True, False):
            loss, lp = ops.ngmg(*args, t, cov, normalize)
            torch.library.opcheck(ops.ngmg_backward, (torch.randn_like(loss), *(a.detach() for a in args), t,
                                                      loss.detach(), lp, cov, normalize))


def test_shared_parameters_get_gradients_summed_over_mixtures():
    """means [K, D] under x [G, N, D]: the op broadcasts in C++ and sums the gradient over G."""
    ops = _cpu_ops()
    p = random_problem("diag", 3, N=6, K=2, D=3, seed=5)
    m = p["means"][0].detach().requires_grad_()
    out = ops.log_prob(p["x"], m, p["prec_chol"], p["logits"], "diag")
    (g,) = torch.autograd.grad(out.sum(), m)
    m3 = m.detach().expand(3, 2, 3).clone().requires_grad_()
    (g3,) = torch.autograd.grad(ops.log_prob(p["x"], m3, p["prec_chol"], p["logits"], "diag").sum(), m3)
    torch.testing.assert_close(g, g3.sum(0))


def test_second_derivative_is_a_clear_error():
    """The compiled ops' backward is not differentiable: asking for a second derivative
    raises instead of returning a silently wrong (constant) gradient."""
    _cpu_ops()
    p = random_problem("diag", None, N=6, K=2, D=3, requires_grad=True)
    for loss in (fg.gmm_log_prob(*(p[k] for k in ARGS), backend="cpu").sum(),
                 fg.ngmg_loss(*(p[k] for k in ARGS), backend="cpu")):
        (gx,) = torch.autograd.grad(loss, p["x"], create_graph=True)
        with pytest.raises(RuntimeError, match="second derivatives"):
            torch.autograd.grad(gx.sum(), p["means"])


def test_fused_ngmg_rejects_a_target_without_the_mixture_axis():
    ops = _cpu_ops()
    x, m, s, lg = torch.randn(4, 3), torch.randn(2, 3), torch.rand(2, 3) + 0.5, torch.zeros(2)
    with pytest.raises(RuntimeError, match="target must have the mixture axis G"):
        ops.ngmg(x, m, s, lg, torch.zeros(2, 4, dtype=torch.long), "diag", True)
    with pytest.raises(ValueError, match="target holds 5"):
        ops.ngmg(x, m, s, lg, torch.tensor([0, 1, 5, 0]), "diag", True)
    with pytest.raises(RuntimeError, match="loss and logp must have one shape"):
        ops.ngmg_backward(torch.ones(4), x, m, s, lg, None, torch.ones(4), torch.ones(3), "diag", True)
