"""Demo: fit scikit-learn mixtures on the bundled digits and check every available backend.

    python -m fastgmmdiff.demo [--components 10] [--pca 16]

For each covariance type it fits ``sklearn.mixture.GaussianMixture`` on the digits reduced with
PCA, then evaluates log p and the NGMG (loss and its gradient w.r.t. the points) in float32
with every backend available here, against scikit-learn's ``score_samples`` and the float64
reference, and prints a table of relative errors and median times.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from . import available_backends, gmm_log_prob, ngmg_loss, reference
from .testing import bars, elementwise_error


def _median_ms(fn, reps=5):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def run(components=10, pca=16, seed=0, out=print):
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture as SkGMM

    X = PCA(n_components=pca, random_state=seed).fit_transform(load_digits().data)
    rows = []
    for cov in ("diag", "spherical", "full", "tied"):
        sk = SkGMM(n_components=components, covariance_type=cov, random_state=seed).fit(X)
        sk_logp = torch.from_numpy(sk.score_samples(X))
        params64 = [torch.from_numpy(a) for a in (sk.means_, sk.precisions_cholesky_, np.log(sk.weights_))]
        x64 = torch.from_numpy(X)
        z64 = x64.clone().requires_grad_()
        ref_loss = reference.ngmg_loss(z64, *params64, cov, reduction="sum")
        (ref_grad,) = torch.autograd.grad(ref_loss, z64)
        for name in available_backends():
            if name in ("cuda", "triton") and not torch.cuda.is_available():
                continue
            dev = "cuda" if name in ("cuda", "triton") else "cpu"
            x = x64.float().to(dev)
            params = [p.float().to(dev) for p in params64]
            logp = gmm_log_prob(x, *params, cov, backend=name)
            z = x.clone().requires_grad_()
            loss = ngmg_loss(z, *params, cov, reduction="sum", backend=name)
            (grad,) = torch.autograd.grad(loss, z)

            def step():
                zz = x.clone().requires_grad_()
                torch.autograd.grad(ngmg_loss(zz, *params, cov, reduction="sum", backend=name), zz)
                if dev == "cuda":
                    torch.cuda.synchronize()

            rows.append(dict(
                cov=cov, backend=name,
                logp_vs_sklearn=elementwise_error(logp.cpu(), sk_logp),
                ngmg_vs_ref=elementwise_error(loss.cpu(), ref_loss),
                grad_vs_ref=elementwise_error(grad.cpu(), ref_grad),
                ms=_median_ms(step)))
    N, D = X.shape
    out(f"digits: N={N} points, D={pca} (PCA), K={components} components; float32 vs float64; "
        f"NGMG fwd+bwd time is the median of 5")
    head = "| covariance | backend | log p vs sklearn | NGMG vs ref | NGMG grad vs ref | NGMG fwd+bwd ms | ok |"
    out(head)
    out("|" + "---|" * (head.count("|") - 1))
    ok_all, bar = True, bars(torch.float32)
    for r in rows:
        ok = r["logp_vs_sklearn"] <= bar.value and r["ngmg_vs_ref"] <= bar.value and r["grad_vs_ref"] <= bar.grad
        ok_all &= ok
        out(f"| {r['cov']} | {r['backend']} | {r['logp_vs_sklearn']:.1e} | {r['ngmg_vs_ref']:.1e} | "
            f"{r['grad_vs_ref']:.1e} | {r['ms']:.2f} | {'yes' if ok else 'NO'} |")
    out(f"tolerances: {bar.value:g} (values), {bar.grad:g} (gradients), element-wise: "
        f"|a − b| ≤ tol·(|b| + rms(b))")
    return ok_all


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastgmmdiff.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--components", type=int, default=10, help="mixture components K (default 10)")
    ap.add_argument("--pca", type=int, default=16, help="PCA dimensions D (default 16)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.components < 1 or not 1 <= a.pca <= 64:
        ap.error("need --components >= 1 and 1 <= --pca <= 64")
    return 0 if run(a.components, a.pca, a.seed) else 1


if __name__ == "__main__":
    raise SystemExit(main())
