"""Backend registry, the registered ops (opcheck) and torch.compile."""

import pytest
import torch

import fastgmmdiff as fg
from fastgmmdiff import _dispatch
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


@pytest.mark.parametrize("cov", ["diag", "spherical", "full"])
def test_opcheck_torch_ops(cov):
    p = random_problem(cov, 2, N=5, K=3, D=4, requires_grad=True)
    args = tuple(p[k] for k in ARGS) if cov != "full" else (p["x"], p["means"], p["prec_chol"].detach().triu().requires_grad_(), p["logits"])
    torch.library.opcheck(torch.ops.fastgmmdiff.log_prob_torch, (*args, cov))
    logp = torch.ops.fastgmmdiff.log_prob_torch(*args, cov)
    torch.library.opcheck(torch.ops.fastgmmdiff.log_prob_torch_backward,
                          (torch.randn_like(logp), *(a.detach() for a in args), logp.detach(), cov))


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
