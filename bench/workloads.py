"""The named workloads of PERF.md and the implementations timed on them.

Each case is (workload, op, pass, impl):

* op: ``log_prob`` (gmm_log_prob) or ``ngmg`` (ngmg_loss, with ``target`` where the workload
  says so);
* pass: ``fwd`` or ``fwdbwd`` (forward plus gradients w.r.t. x, means, prec_chol, logits);
* impl: a fastgmmdiff backend (``fgd-<backend>``) or a peer: ``naive`` (reference broadcast
  form), ``matmul`` (reference matmul expansion, scikit-learn's formula), ``compile``
  (torch.compile of the broadcast form), ``distributions`` (torch.distributions
  MixtureSameFamily), ``sklearn`` (score_samples, float64, forward of log_prob only),
  ``pykeops`` (when installed).

Inputs come from ``fastgmmdiff.testing.random_problem`` and every case is checked once against
the float64 reference before it is timed (``check``), with the tolerances of
``fastgmmdiff.testing``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

import fastgmmdiff as fg
from fastgmmdiff import reference
from fastgmmdiff.testing import bars, elementwise_error, random_problem

ARGS = ("x", "means", "prec_chol", "logits")


@dataclass(frozen=True)
class Workload:
    name: str
    G: int | None
    N: int
    K: int
    D: int
    cov: str
    target: bool  # NGMG with target
    device: str  # "cpu", "cuda" or "any"


WORKLOADS = {w.name: w for w in [
    Workload("paper", 40, 256, 2, 4, "spherical", True, "any"),
    Workload("small", None, 256, 8, 40, "diag", False, "any"),
    Workload("mdn", 16384, 1, 8, 2, "diag", False, "any"),
    Workload("diag-large", None, 65536, 1024, 64, "diag", False, "cuda"),
    Workload("diag-cpu", None, 16384, 256, 16, "diag", False, "cpu"),
    Workload("full", None, 16384, 128, 32, "full", False, "cuda"),
    Workload("full-cpu", None, 4096, 32, 16, "full", False, "cpu"),
    Workload("full-xl", None, 1048576, 1024, 128, "full", False, "cuda"),
]}

# Ops timed per workload: paper is an NGMG-with-target workload; the rest time both ops.
OPS = {"paper": ("ngmg",)}


def quick() -> bool:
    """Quick mode (CI): tiny sizes, so that the benchmark code runs but nothing is timed."""
    return os.environ.get("FASTGMMDIFF_BENCH_QUICK", "") not in ("", "0")


def shape(w: Workload):
    if not quick():
        return w.G, w.N, w.K, w.D
    G = None if w.G is None else min(w.G, 3)
    return G, min(w.N, 33), min(w.K, 5), min(w.D, 7)


def make_inputs(w: Workload, device: str, seed: int = 0, requires_grad: bool = True):
    G, N, K, D = shape(w)
    p = random_problem(w.cov, G, N=N, K=K, D=D, seed=seed, device=device, requires_grad=requires_grad)
    if w.cov == "full":
        p["prec_chol"] = p["prec_chol"].detach().triu().requires_grad_(requires_grad)
    if w.target:
        g = torch.Generator().manual_seed(seed + 1)
        p["target"] = torch.randint(0, K, (N,) if G is None else (G, N), generator=g).to(device)
    return p


# --- implementations -------------------------------------------------------------------------

def _fgd(backend):
    def log_prob(p, cov):
        return fg.gmm_log_prob(*(p[k] for k in ARGS), cov, backend=backend)

    def ngmg(p, cov):
        return fg.ngmg_loss(*(p[k] for k in ARGS), cov, target=p.get("target"), backend=backend)

    return {"log_prob": log_prob, "ngmg": ngmg}


def _ref(form):
    def log_prob(p, cov):
        return reference.gmm_log_prob(*(p[k] for k in ARGS), cov, form=form)

    def ngmg(p, cov):
        return reference.ngmg_loss(*(p[k] for k in ARGS), cov, target=p.get("target"), form=form)

    return {"log_prob": log_prob, "ngmg": ngmg}


_COMPILED = {}


def _compiled():
    # Quick mode compiles with aot_eager (tracing only, seconds instead of minutes on a CPU).
    mode = "aot_eager" if quick() else "inductor"

    def get(op):
        key = (op, mode)
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(_ref("broadcast")[op], backend=mode, dynamic=False)
        return _COMPILED[key]

    return {"log_prob": lambda p, cov: get("log_prob")(p, cov), "ngmg": lambda p, cov: get("ngmg")(p, cov)}


def _distribution(p, cov):
    D = torch.distributions
    means, prec, logits = p["means"], p["prec_chol"], p["logits"]
    if cov == "diag":
        comp = D.Independent(D.Normal(means, 1.0 / prec), 1)
    elif cov == "spherical":
        comp = D.Independent(D.Normal(means, (1.0 / prec)[..., None].expand(means.shape)), 1)
    else:
        U = prec.triu()
        comp = D.MultivariateNormal(means, precision_matrix=U @ U.transpose(-1, -2))
    mix = D.MixtureSameFamily(D.Categorical(logits=logits), comp)
    x = p["x"]
    if x.dim() == 2 and means.dim() == 3:
        x = x[:, None]  # [N, 1, D] against batch [G]
        return mix.log_prob(x).transpose(0, 1)
    if x.dim() == 3:
        return mix.log_prob(x.transpose(0, 1)).transpose(0, 1)
    return mix.log_prob(x)


def _distributions():
    def ngmg(p, cov):
        if p.get("target") is not None:
            raise NotImplementedError("torch.distributions has no per-point component selection")
        lp = _distribution(p, cov)
        c = reference.ngmg_log_normalizer(p["prec_chol"], p["logits"], cov, p["means"].shape[-1]).detach()
        return -torch.exp(lp - c[..., None] if c.dim() else lp - c).mean()

    return {"log_prob": _distribution, "ngmg": ngmg}


def _sklearn():
    from sklearn.mixture import GaussianMixture as SkGMM

    def log_prob(p, cov):
        if p["means"].dim() == 3:
            raise NotImplementedError("scikit-learn evaluates one mixture")
        K, D = p["means"].shape
        sk = SkGMM(n_components=K, covariance_type=cov)
        as_np = lambda t: t.detach().to("cpu", torch.float64).numpy()  # noqa: E731
        sk.means_ = as_np(p["means"])
        U = as_np(p["prec_chol"].triu() if cov == "full" else p["prec_chol"])
        sk.precisions_cholesky_ = U
        sk.weights_ = as_np(torch.softmax(p["logits"].double(), -1))
        x = as_np(p["x"])
        return lambda: torch.from_numpy(sk.score_samples(x))

    return {"log_prob": log_prob}


def _pykeops():
    """log p with pykeops LazyTensors (one mixture; diag and spherical): the symbolic
    (N, K) matrix of ℓ_nk reduced by its logsumexp, never materialised."""
    from pykeops.torch import LazyTensor

    def log_prob(p, cov):
        if p["means"].dim() == 3 or cov == "full":
            raise NotImplementedError("pykeops peer: one diag/spherical mixture")
        x, means, prec, logits = (p[k] for k in ARGS)
        D = means.shape[-1]
        s = prec if cov == "diag" else prec[:, None].expand_as(means)
        a = torch.log_softmax(logits, -1) + reference.log_det(prec, cov, D) - 0.5 * D * reference.LOG_2PI
        x_i = LazyTensor(x[:, None, :].contiguous())
        m_j = LazyTensor(means[None].contiguous())
        s_j = LazyTensor(s[None].contiguous())
        a_j = LazyTensor(a[None, :, None].contiguous())
        ell = a_j - 0.5 * (((x_i - m_j) * s_j) ** 2).sum(-1)
        return ell.logsumexp(dim=1).squeeze(-1)

    def ngmg(p, cov):
        c = reference.ngmg_log_normalizer(p["prec_chol"], p["logits"], cov, p["means"].shape[-1]).detach()
        if p.get("target") is not None:
            raise NotImplementedError("pykeops peer: no target")
        return -torch.exp(log_prob(p, cov) - c).mean()

    return {"log_prob": log_prob, "ngmg": ngmg}


def implementations(device: str) -> dict:
    """impl name → factory returning {op: fn(p, cov)}; only those that can run on ``device``."""
    out = {}
    for b in fg.available_backends():
        from fastgmmdiff import _dispatch

        dt = _dispatch._REGISTRY[b].device_types
        if b == "triton" and device == "cpu" and not quick():
            continue  # Triton on CPU tensors is the test interpreter: quick mode only, not a contender
        if dt is None or device in dt:
            out[f"fgd-{b}"] = lambda b=b: _fgd(b)
    out["naive"] = lambda: _ref("broadcast")
    out["matmul"] = lambda: _ref("matmul")
    out["compile"] = _compiled
    out["distributions"] = _distributions
    if device == "cpu":
        out["sklearn"] = _sklearn
    out["pykeops"] = _pykeops
    return out


def peak_elems_naive(w: Workload) -> int:
    G, N, K, D = shape(w)
    return (G or 1) * N * K * (D if w.cov != "full" else D * D // 4 + D)


# --- accuracy check before timing ------------------------------------------------------------

def reference_value(w: Workload, op: str, p: dict):
    p64 = {k: (v.detach().double().requires_grad_() if v.is_floating_point() else v) for k, v in p.items()}
    if op == "log_prob":
        out = reference.gmm_log_prob(*(p64[k] for k in ARGS), w.cov)
    else:
        out = reference.ngmg_loss(*(p64[k] for k in ARGS), w.cov, target=p64.get("target"))
    return out, p64


def check(w: Workload, op: str, fn, p: dict, pass_: str) -> dict:
    """Element-wise errors (testing.elementwise_error) of value (and the worst gradient for
    fwdbwd) against float64."""
    ref, p64 = reference_value(w, op, p)
    out = fn(p, w.cov)
    errs = {"value": elementwise_error(out, ref)}
    if pass_ == "fwdbwd":
        keys = [k for k in ARGS if not (op == "ngmg" and k == "logits" and p.get("target") is not None)]
        up = torch.ones_like(ref) if ref.dim() == 0 else torch.randn_like(ref)
        ga = torch.autograd.grad(out, [p[k] for k in keys], up.to(out.dtype), allow_unused=True)
        gb = torch.autograd.grad(ref, [p64[k] for k in keys], up, allow_unused=True)
        errs["grad"] = max(elementwise_error(a if a is not None else torch.zeros_like(b), b) for a, b in zip(ga, gb))
    return errs


def within_tolerance(errs: dict, dtype: torch.dtype = torch.float32) -> bool:
    bar = bars(dtype)
    return errs["value"] <= bar.value and errs.get("grad", 0.0) <= bar.grad and not any(
        math.isnan(v) for v in errs.values())
