"""pytest-benchmark: ``fastgmmdiff.GaussianMixture.fit`` against ``sklearn.mixture.GaussianMixture``
(PERF.md "EM fit (CPU)"): a fit of a fixed number of EM iterations (``tol=0``, ``max_iter=3``)
from the same initial parameters, N = 200,000, D = 16, K = 64, diag and full, in the data's
dtype (float64 and float32: scikit-learn keeps float32 data in float32), same thread count.

    python -m pytest bench/bench_em.py --benchmark-only      # pytest-benchmark table
    python bench/bench_em.py                                  # side by side, ratios (README)
    python bench/bench_em.py --device cuda                    # one EM iteration at Flash-GMM's shapes
    python bench/bench_em.py --floor                          # the E-step against this CPU's FMA floor

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
    """Data drawn around k centres, in random order (not grouped by centre: a tile of the
    kernels' 64 points then mixes clusters, as real data does), and initial parameters from two
    scikit-learn EM steps on a tenth of it (the same for both fits)."""
    from sklearn.mixture import GaussianMixture as SkGMM

    rng = np.random.RandomState(0)
    X = rng.randn(n, d) + np.repeat(rng.uniform(-5, 5, (k, d)), -(-n // k), 0)[:n]
    X = X[rng.permutation(n)]
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


def side_by_side(reps: int = 5):
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


# --- one EM iteration on a device (PERF.md "EM iteration (GPU)": Flash-GMM's shapes) -----------

GPU_SHAPES = (("diag", 65_536, 1024, 64), ("full", 131_072, 1024, 128))  # full: Flash-GMM's N is 1,048,576


def em_iteration(device: str, cov: str, n: int, k: int, d: int, reps: int = 5) -> dict:
    """One EM iteration (``_em.e_step`` + ``_em.m_step``: forward, backward, statistics, M-step)
    on float32 data on ``device``, timed over ``reps`` after a warm-up, and the worst relative
    error of its statistics (N_k, Σ r z, S2/M: relative to each one's largest element) against
    the same E-step in float64."""
    import torch

    from fastgmmdiff import _em

    g = torch.Generator().manual_seed(0)
    X = (torch.randn(n, d, generator=g) + 3 * torch.randn(k, d, generator=g)[torch.randint(0, k, (n,), generator=g)])
    X = X.to(device)
    means = X[torch.randperm(n, generator=g)[:k].to(device)].double()
    if cov == "diag":
        U = torch.full((k, d), 0.7, dtype=torch.float64, device=device)
    else:
        U = (0.7 * torch.eye(d, dtype=torch.float64, device=device)).expand(k, d, d).contiguous()
        U = U + 0.02 * torch.triu(torch.randn(k, d, d, generator=g, dtype=torch.float64), 1).to(device)
    logits = torch.zeros(k, dtype=torch.float64, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step():
        st = _em.e_step(X, means, U, logits, cov)
        return st, _em.m_step(st, means, cov, 1e-6, torch.finfo(torch.float32).eps)

    st, _ = step()
    ts = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        ts.append(time.perf_counter() - t0)
    ref = _em.e_step(X.double(), means, U, logits, cov)
    err = max(float((a - b).abs().max() / b.abs().max()) for a, b in ((st.Nk, ref.Nk), (st.S1, ref.S1),
                                                                     (st.S2, ref.S2)))
    return dict(cov=cov, N=n, K=k, D=d, ms=1e3 * min(ts), error=err)


def test_em_iteration_runs():
    """The device EM iteration's code on tiny CPU sizes (the GPU check runs it on the card)."""
    r = em_iteration("cpu", "diag", 512, 8, 4, reps=1)
    assert r["error"] < 1e-4 and r["ms"] > 0
    r = em_iteration("cpu", "full", 512, 8, 4, reps=1)
    assert r["error"] < 1e-4


def device_table(device: str = "cuda", shapes=GPU_SHAPES):
    import torch

    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"one EM iteration (float32 kernels, statistics vs float64), {name}, torch {torch.__version__}")
    print("| covariance | N | K | D | ms | max rel. error of the statistics |")
    print("|---|---|---|---|---|---|")
    for cov, n, k, d in shapes:
        r = em_iteration(device, cov, n, k, d)
        print(f"| {cov} | {n} | {k} | {d} | {r['ms']:.2f} | {r['error']:.1e} |")


# --- the E-step against this CPU's FMA floor ---------------------------------------------------------

def fma_ops(cov: str, d: int = D, live: float = 1.0) -> float:
    """Multiplies and FMAs (the work of the CPU's FMA pipes) per point and component of the
    float64 E-step (kernels.inc em64_impl): ℓ for every pair (diag: (x − μ)·s and its square, per
    entry; full: U_kᵀz and the squares), and for the fraction ``live`` of the pairs above the
    responsibility floor the softmax's exp (vexp_nonpos: 8 per 4-lane vector) and the sums (diag:
    r·z and r·z², per entry; full: r·z and r z zᵀ's upper triangle); ``live=1`` counts every
    pair (the dense E-step)."""
    exp = 8 / 4
    if cov == "diag":
        return 2 * d + live * (exp + 2 * d)
    tri = d * (d + 1) // 2
    return (tri + d) + live * (exp + d + tri)


def live_pairs(X, kw, cov: str):
    """[N, K] booleans: whether a (point, component) pair's ℓ is within the responsibility floor
    (100) of the point's largest (those the E-step must sum)."""
    import torch

    from fastgmmdiff import convert, reference

    U = convert.precision_to_prec_chol(torch.from_numpy(np.asarray(kw["precisions_init"])), cov)
    means, logits = torch.from_numpy(kw["means_init"]), torch.from_numpy(np.log(kw["weights_init"]))
    live = []
    for xc in torch.from_numpy(X).split(4096):  # full's reference forms [n, K, D, D]
        lp = reference.component_log_prob(xc, means, U, logits, cov)
        live.append(lp >= lp.amax(-1, keepdim=True) - 100)
    return torch.cat(live)


def tiles_run(live, order=None) -> float:
    """The fraction of (tile of 64 points, component) pairs with at least one live pair (``live``:
    live_pairs'), the tiles taking the rows in ``order`` (None: as they are): those whose softmax
    and sums the kernel runs."""
    if order is not None:
        live = live[order]
    return sum(t.any(0).sum().item() for t in live.split(64)) / (-(-live.shape[0] // 64) * live.shape[1])


def fma_peak(threads: int, runs: int = 3) -> float | None:
    """Lane-FMAs per second of ``threads`` threads, from bench/fma_peak.c (gcc, AVX2), the best
    of ``runs`` (this machine's neighbours only ever slow it down, and a slower peak would
    lower the floor's bar); None where it cannot be built or run."""
    import os
    import subprocess
    import tempfile

    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fma_peak.c")
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "fma_peak")
        try:
            subprocess.run(["gcc", "-O2", "-mavx2", "-mfma", "-fopenmp", src, "-o", exe], check=True,
                           capture_output=True)
            outs = [subprocess.run([exe], check=True, capture_output=True, text=True,
                                   env=dict(os.environ, OMP_NUM_THREADS=str(threads))).stdout
                    for _ in range(runs)]
        except (OSError, subprocess.CalledProcessError):
            return None
    return max(float(out.split()[0]) for out in outs)


def floor_table(reps: int = 7):
    """One fused E-step (``fastgmmdiff::em_stats``, float64, N = 200,000, D = 16, K = 64) against
    its FMA floor: the counted multiplies and FMAs (``fma_ops``: ℓ for every pair, exp and sums for
    the pairs above the responsibility floor: the work any E-step with this floor must do) at the
    FMA rate measured in the same run by bench/fma_peak.c (the issue rate of the FMA pipes), and
    at the rate of a float64 matrix product (2048³, what BLAS attains).  Timed with the rows as
    they are (random order) and grouped by component (the estimator's E-steps after its first:
    the kernel's regroup), best of ``reps``; the dense column counts every pair's exp and sums."""
    import torch

    threads = torch.get_num_threads()
    peak = fma_peak(threads)
    a = torch.randn(2048, 2048, dtype=torch.float64)
    a @ a
    t0 = time.perf_counter()
    for _ in range(3):
        a @ a
    gemm = 3 * 2048 ** 3 / (time.perf_counter() - t0)  # lane-FMAs per second
    print(f"threads {threads}; FMA issue rate {peak / 1e9 if peak else float('nan'):.1f} G lane-FMA/s "
          f"(bench/fma_peak.c); float64 matmul {gemm / 1e9:.1f} G FMA/s")
    print("| covariance | rows | E-step ms | pairs above the floor | (tile, component) pairs run "
          "| floor ms (issue rate) | × floor | floor ms (matmul rate) | × floor | × dense floor (issue rate) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    from fastgmmdiff import convert

    for cov in ("diag", "full"):
        X, kw = problem(cov, np.float64)
        x = torch.from_numpy(X)
        means = torch.from_numpy(kw["means_init"])
        U = convert.precision_to_prec_chol(torch.from_numpy(np.asarray(kw["precisions_init"])), cov)
        logits = torch.from_numpy(np.log(kw["weights_init"]))
        op = torch.ops.fastgmmdiff.em_stats
        grouped = op(x, means, U, logits, cov, None, True)[4]
        live_mask = live_pairs(X, kw, cov)
        live = live_mask.double().mean().item()
        for rows, order in (("random", None), ("grouped", grouped)):
            op(x, means, U, logits, cov, order)
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                op(x, means, U, logits, cov, order)
                ts.append(time.perf_counter() - t0)
            t = min(ts)
            run = tiles_run(live_mask, order)
            work = N * K * fma_ops(cov, live=live)
            f_peak = work / peak if peak else float("nan")
            f_gemm = work / gemm
            f_dense = N * K * fma_ops(cov) / peak if peak else float("nan")
            print(f"| {cov} | {rows} | {1e3 * t:.1f} | {live:.3f} | {run:.3f} | {1e3 * f_peak:.1f} | "
                  f"{t / f_peak:.2f}× | {1e3 * f_gemm:.1f} | {t / f_gemm:.2f}× | {t / f_dense:.2f}× |")


if __name__ == "__main__":
    import sys

    if "--device" in sys.argv:
        device_table(sys.argv[sys.argv.index("--device") + 1])
    elif "--floor" in sys.argv:
        floor_table()
    else:
        side_by_side()
