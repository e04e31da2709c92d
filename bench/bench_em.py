"""pytest-benchmark: ``fastgmmdiff.GaussianMixture.fit`` against ``sklearn.mixture.GaussianMixture``
(PERF.md "EM fit (CPU)"): a fit of a fixed number of EM iterations (``tol=0``, ``max_iter=3``)
from the same initial parameters, N = 200,000, D = 16, K = 64, diag and full, in the data's
dtype (float64 and float32: scikit-learn keeps float32 data in float32), same thread count.

    python -m pytest bench/bench_em.py --benchmark-only      # pytest-benchmark table
    python bench/bench_em.py                                  # side by side, ratios (README)

Each case first checks the fit against scikit-learn's (every fitted attribute and the lower
bound, relative to the attribute's largest element: 1e-8 in float64, 1e-4 in float32); under
``--benchmark-disable`` (the test suite) the sizes are tiny.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from workloads import quick

N, D, K, ITERS = 200_000, 16, 64, 3
ATTRS = ("weights_", "means_", "covariances_", "precisions_cholesky_")


def problem(cov: str, dtype, n: int = N, k: int = K, d: int = D):
    """Data drawn around k centres, and initial parameters from two scikit-learn EM steps on a
    tenth of it (the same for both fits)."""
    from sklearn.mixture import GaussianMixture as SkGMM

    rng = np.random.RandomState(0)
    X = rng.randn(n, d) + np.repeat(rng.uniform(-5, 5, (k, d)), -(-n // k), 0)[:n]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = SkGMM(k, covariance_type=cov, random_state=0, max_iter=2).fit(X[::10])
    kw = dict(n_components=k, covariance_type=cov, weights_init=start.weights_, means_init=start.means_,
              precisions_init=start.precisions_, tol=0, max_iter=ITERS)
    return X.astype(dtype), kw


def fitter(impl: str):
    if impl == "sklearn":
        from sklearn.mixture import GaussianMixture as cls
    else:
        from fastgmmdiff import GaussianMixture as cls

    def fit(X, kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(**kw).fit(X)
    return fit


def check(ours, sk, dtype) -> float:
    """The worst relative difference of the fitted attributes and lower bound."""
    errs = [np.abs(np.asarray(getattr(ours, a), np.float64) - getattr(sk, a)).max() / np.abs(getattr(sk, a)).max()
            for a in ATTRS]
    errs.append(abs(ours.lower_bound_ - sk.lower_bound_) / abs(sk.lower_bound_))
    return max(errs)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("cov", ["diag", "full"])
@pytest.mark.parametrize("impl", ["fastgmmdiff", "sklearn"])
def test_em_fit(benchmark, impl, cov, dtype):
    benchmark.name = f"em-cpu-{cov}-{np.dtype(dtype).name}-{impl}"
    n, k = (2000, 4) if quick() else (N, K)
    X, kw = problem(cov, dtype, n, k)
    if impl == "fastgmmdiff":
        err = check(fitter(impl)(X, kw), fitter("sklearn")(X, kw), dtype)
        benchmark.extra_info["error"] = err
        assert err <= (1e-8 if dtype == np.float64 else 1e-4), err
    benchmark.extra_info.update(N=n, D=D, K=k, iterations=ITERS)
    benchmark.pedantic(fitter(impl), args=(X, kw), rounds=1 if quick() else 3, iterations=1)


def side_by_side(reps: int = 3):
    """Both fits alternated (order flipped each round), the best of ``reps`` each, ratios."""
    import torch

    rows = []
    for cov in ("diag", "full"):
        for dtype in (np.float64, np.float32):
            X, kw = problem(cov, dtype)
            ts = {"fastgmmdiff": [], "sklearn": []}
            for r in range(reps):
                for impl in (list(ts) if r % 2 == 0 else list(ts)[::-1]):
                    t0 = time.perf_counter()
                    fitter(impl)(X, kw)
                    ts[impl].append(time.perf_counter() - t0)
            err = check(fitter("fastgmmdiff")(X, kw), fitter("sklearn")(X, kw), dtype)
            a, b = min(ts["fastgmmdiff"]), min(ts["sklearn"])
            rows.append((cov, np.dtype(dtype).name, a, b, b / a, err))
    print(f"N = {N}, D = {D}, K = {K}, {ITERS} EM iterations, torch threads {torch.get_num_threads()}")
    print("| covariance | dtype | fastgmmdiff s | scikit-learn s | ratio | max rel. difference |")
    print("|---|---|---|---|---|---|")
    for cov, dt, a, b, r, e in rows:
        print(f"| {cov} | {dt} | {a:.3f} | {b:.3f} | {r:.1f}× | {e:.1e} |")
    return rows


if __name__ == "__main__":
    side_by_side()
