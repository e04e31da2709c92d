"""GaussianMixture as scikit-learn's estimator: EM on the fused kernels against
sklearn.mixture.GaussianMixture on the datasets bundled with scikit-learn.

Parity: from the same initial parameters (the ``random`` and ``random_from_data`` initialisations
draw scikit-learn's own numbers for an integer random_state, and ``*_init`` pass them in), with
``tol=0`` and ``max_iter=m``, every fitted attribute, ``lower_bound_``, ``predict_proba``,
``score_samples``, ``bic`` and ``aic`` as scikit-learn's: float64 to 1e-8 relative (to the
attribute's largest element), float32 data to 1e-4 against scikit-learn in float64 on the same
(float32-rounded) values after 5 iterations from ``init_params="random"``.  From such a
start the difference between two EM runs roughly doubles each iteration (iris, diag: 1e-7 after
one, 1e-4 after eight; scikit-learn's own float32 run is 16× further, 1.6e-3), and from one-hot
starts (random_from_data) scikit-learn's own float32 run ends 0.1 away from its float64 run on
the digits (full): the bar holds where float32 can hold it, not after any number of steps."""

import datetime
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.mixture import GaussianMixture as SkGMM
from sklearn.preprocessing import StandardScaler

import fastgmmdiff as fg
from fastgmmdiff.mixture import CollapsedComponentWarning

COVS = ["full", "tied", "diag", "spherical"]
ATTRS = ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_")


def _collapse_set():
    """100 points of N(0, I₃) and 30 copies of (1, 1, 1): a component collapses onto the copies
    (its covariance is reg_covar·I).  The copies sit near the origin on purpose: scikit-learn's
    diag/spherical variance E[x²] − μ² cancels to ~|x|²·1e-16, which at |x| = 5 is 1e-8 of
    reg_covar — scikit-learn's own error, not ours."""
    rng = np.random.RandomState(0)
    return np.vstack([rng.randn(100, 3), np.tile([[1.0, 1.0, 1.0]], (30, 1))])


DATA = {
    "iris": lambda: load_iris().data,
    "wine": lambda: StandardScaler().fit_transform(load_wine().data),
    "breast_cancer": lambda: StandardScaler().fit_transform(load_breast_cancer().data),
    "digits_pca": lambda: PCA(n_components=12, random_state=0).fit_transform(load_digits().data),
    "collapse": _collapse_set,
}


@pytest.fixture(scope="module")
def datasets():
    return {k: f() for k, f in DATA.items()}


def assert_rel(out, ref, rtol, what):
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    err = np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-300)
    assert err <= rtol, f"{what}: {err:.3g} relative (bar {rtol:g})"


def check_same_fit(ours, sk, X, rtol):
    for a in ATTRS:
        assert_rel(getattr(ours, a), getattr(sk, a), rtol, a)
    assert abs(ours.lower_bound_ - sk.lower_bound_) <= rtol * abs(sk.lower_bound_), (ours.lower_bound_,
                                                                                      sk.lower_bound_)
    assert ours.n_iter_ == sk.n_iter_ and ours.converged_ == sk.converged_
    assert_rel(ours.lower_bounds_, sk.lower_bounds_, rtol, "lower_bounds_")
    Xq = X.astype(np.float64)
    assert_rel(ours.predict_proba(X), sk.predict_proba(Xq), rtol, "predict_proba")
    assert_rel(ours.score_samples(X), sk.score_samples(Xq), rtol, "score_samples")
    for f in ("bic", "aic"):
        assert abs(getattr(ours, f)(X) - getattr(sk, f)(Xq)) <= rtol * abs(getattr(sk, f)(Xq)), f


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.filterwarnings("ignore::fastgmmdiff.mixture.CollapsedComponentWarning")
@pytest.mark.parametrize("init", ["random_from_data", "random"])
@pytest.mark.parametrize("cov", COVS)
@pytest.mark.parametrize("name", list(DATA))
def test_float64_fit_matches_sklearn(datasets, name, cov, init):
    X = datasets[name]
    kw = dict(n_components=3, covariance_type=cov, init_params=init, random_state=1, tol=0, max_iter=8)
    sk = SkGMM(**kw).fit(X)
    ours = fg.GaussianMixture(**kw).fit(X)
    assert ours.backend == "auto" and isinstance(ours.means_, np.ndarray) and ours.means_.dtype == np.float64
    check_same_fit(ours, sk, X, 1e-8)
    labels = ours.predict(X)
    assert labels.dtype.kind == "i" and labels.shape == (X.shape[0],)
    np.testing.assert_array_equal(labels, sk.predict(X))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("cov", COVS)
@pytest.mark.parametrize("name", ["iris", "wine", "breast_cancer", "digits_pca"])
def test_float32_fit_matches_sklearn_float64(datasets, name, cov):
    X32 = datasets[name].astype(np.float32)
    kw = dict(n_components=3, covariance_type=cov, init_params="random", random_state=1, tol=0, max_iter=5)
    sk = SkGMM(**kw).fit(X32.astype(np.float64))
    ours = fg.GaussianMixture(**kw).fit(X32)
    assert ours.means_.dtype == np.float32 and ours.score_samples(X32).dtype == np.float32
    check_same_fit(ours, sk, X32, 1e-4)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("cov", COVS)
def test_given_initial_parameters_and_the_torch_backend(datasets, cov):
    """weights_init / means_init / precisions_init (taken from a one-step fit) as scikit-learn's,
    through the plain-PyTorch backend too; tensors in, tensors out."""
    X = datasets["wine"]
    start = SkGMM(4, covariance_type=cov, random_state=0, max_iter=1).fit(X)
    kw = dict(n_components=4, covariance_type=cov, weights_init=start.weights_, means_init=start.means_,
              precisions_init=start.precisions_, tol=0, max_iter=6)
    sk = SkGMM(**kw).fit(X)
    for backend in ("cpu", "torch"):
        if backend not in fg.available_backends():
            continue
        check_same_fit(fg.GaussianMixture(backend=backend, **kw).fit(X), sk, X, 1e-8)
    t = fg.GaussianMixture(**kw).fit(torch.from_numpy(X))
    assert isinstance(t.means_, torch.Tensor) and isinstance(t.predict(torch.from_numpy(X)), torch.Tensor)
    assert_rel(t.means_.numpy(), sk.means_, 1e-8, "means_ (tensor fit)")


def test_collapsing_component_warns_and_matches_sklearn(datasets):
    X = datasets["collapse"]
    kw = dict(n_components=3, covariance_type="diag", init_params="random_from_data", random_state=2, tol=0,
              max_iter=8)
    with pytest.warns(CollapsedComponentWarning, match=r"component\(s\) \[\d\] collapsed"):
        ours = fg.GaussianMixture(**kw).fit(X)
    sk = SkGMM(**kw).fit(X)
    assert np.isclose(ours.covariances_.min(), 1e-6)
    check_same_fit(ours, sk, X, 1e-8)


def test_kmeans_initialisation_finds_the_clusters():
    """Default init (k-means++ seeds, Lloyd's k-means): on well-separated blobs with data at
    scale 1e3 the fit converges to scikit-learn's optimum (same lower bound to 1e-8, the same
    partition up to the labels' order)."""
    rng = np.random.RandomState(0)
    centres = rng.uniform(-1e3, 1e3, size=(5, 4))
    X = np.vstack([c + 10 * rng.randn(200, 4) for c in centres])
    ours = fg.GaussianMixture(5, random_state=0, tol=1e-10, max_iter=200).fit(X)
    sk = SkGMM(5, random_state=0, tol=1e-10, max_iter=200).fit(X)
    assert ours.converged_
    assert abs(ours.lower_bound_ - sk.lower_bound_) <= 1e-8 * abs(sk.lower_bound_)
    a, b = ours.predict(X), sk.predict(X)
    assert len({(i, j) for i, j in zip(a, b)}) == 5  # one-to-one
    assert fg.GaussianMixture(5, init_params="k-means++", random_state=0, max_iter=200).fit(X).converged_


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_chunked_data_and_n_init_and_warm_start(datasets):
    X = datasets["digits_pca"]
    kw = dict(n_components=4, covariance_type="full", init_params="random", random_state=3, tol=0, max_iter=4)
    whole = fg.GaussianMixture(**kw).fit(X)
    chunked = fg.GaussianMixture(chunk_size=257, **kw).fit(X)
    for a in ATTRS:
        assert_rel(getattr(chunked, a), getattr(whole, a), 1e-12, a)
    # n_init: the best of several, as scikit-learn's choice
    sk = SkGMM(**dict(kw, n_init=3)).fit(X)
    check_same_fit(fg.GaussianMixture(**dict(kw, n_init=3)).fit(X), sk, X, 1e-8)
    # warm_start continues from the fitted parameters
    skw = SkGMM(**dict(kw, warm_start=True))
    ow = fg.GaussianMixture(**dict(kw, warm_start=True))
    for _ in range(2):
        skw.fit(X)
        ow.fit(X)
    check_same_fit(ow, skw, X, 1e-8)


def test_estimator_protocol_and_module(datasets):
    X = datasets["iris"]
    m = fg.GaussianMixture(3, covariance_type="diag", random_state=0)
    c = clone(m)
    assert c.get_params() == m.get_params() and c is not m
    assert not hasattr(m, "means_") and not hasattr(m, "converged_")
    with pytest.raises(NotFittedError, match="not fitted"):
        m.predict(X)
    labels = m.fit_predict(X)
    np.testing.assert_array_equal(labels, m.predict(X))
    assert m.n_features_in_ == 4 and m.n_features == 4
    xs, ys = m.sample(500)
    assert xs.shape == (500, 4) and ys.shape == (500,) and isinstance(xs, np.ndarray)
    assert (np.diff(ys) >= 0).all()  # ordered by component, as scikit-learn's
    np.testing.assert_array_equal(m.sample(50)[0], m.sample(50)[0])  # random_state=0: the same draws
    # still a trainable module: gradient steps on the fitted parameters
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    loss = -m.log_prob(torch.from_numpy(X)).mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        assert float(-m.log_prob(torch.from_numpy(X)).mean()) < float(loss)
    # the structure is fixed once built
    with pytest.raises(ValueError, match="fixed"):
        m.set_params(covariance_type="full")
    m.set_params(tol=1e-5, max_iter=3)
    assert m.tol == 1e-5


def test_errors_like_sklearn(datasets):
    X = datasets["iris"]
    with pytest.raises(ValueError, match="NaN"):
        fg.GaussianMixture(2).fit(np.where(np.arange(X.size).reshape(X.shape) == 5, np.nan, X))
    with pytest.raises(ValueError, match="infinity"):
        fg.GaussianMixture(2).fit(np.where(np.arange(X.size).reshape(X.shape) == 5, np.inf, X))
    with pytest.raises(ValueError, match="n_samples >= n_components"):
        fg.GaussianMixture(5).fit(X[:3])
    with pytest.raises(ValueError, match="2D"):
        fg.GaussianMixture(2).fit(X[:, 0])
    with pytest.raises(ValueError, match="init_params"):
        fg.GaussianMixture(2, init_params="bogus").fit(X)
    with pytest.raises(ValueError, match="sum to 1"):
        fg.GaussianMixture(2, weights_init=[0.2, 0.2]).fit(X)
    with pytest.raises(ValueError, match="positive-definite"):
        fg.GaussianMixture(2, precisions_init=-np.stack([np.eye(4)] * 2)).fit(X)
    with pytest.raises(ValueError, match="n_mixtures"):
        fg.GaussianMixture(2, 4, n_mixtures=3).fit(X)
    with pytest.warns(ConvergenceWarning):
        fg.GaussianMixture(3, max_iter=1, random_state=0).fit(X)
    m = fg.GaussianMixture(2, random_state=0).fit(X)
    with pytest.raises(ValueError, match="X has 3 features, but GaussianMixture is expecting 4"):
        m.predict(X[:, :3])


def test_ill_defined_covariance_is_sklearns_error():
    X = np.vstack([np.zeros((5, 2)), np.ones((5, 2))])
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        fg.GaussianMixture(2, covariance_type="full", reg_covar=0, random_state=0).fit(X)


# --- distributed EM (two CPU processes, gloo) ---------------------------------------------------


def _worker(rank, world, init_file, X, kw, out):
    import torch.distributed as dist

    # a timeout: a collective one process skips fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        shard = np.array_split(X, [70])[rank]  # uneven shards: 70 and the rest
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            m = fg.GaussianMixture(**kw).fit(shard)
        np.savez(f"{out}.{rank}.npz", lb=m.lower_bound_, n_iter=m.n_iter_,
                 **{a: getattr(m, a) for a in ATTRS})
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.filterwarnings("ignore::fastgmmdiff.mixture.CollapsedComponentWarning")
@pytest.mark.parametrize("init", ["kmeans", "random_from_data", "random"])
def test_two_processes_fit_the_concatenated_data(tmp_path, datasets, init):
    """Each process holds a shard; fit all-reduces the statistics (and the initialisation's):
    both end with the parameters of one process fitting the whole data (float64, 1e-10)."""
    import torch.multiprocessing as mp

    X = datasets["wine"][:150]
    kw = dict(n_components=3, covariance_type="full", init_params=init, random_state=2, tol=0, max_iter=5)
    out = str(tmp_path / "res")
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), X, kw, out), nprocs=2, join=True,
                       start_method="spawn")
    one = fg.GaussianMixture(**kw).fit(X)
    for rank in range(2):
        r = np.load(f"{out}.{rank}.npz")
        for a in ATTRS:
            assert_rel(r[a], getattr(one, a), 1e-10, f"rank {rank} {a}")
        assert abs(float(r["lb"]) - one.lower_bound_) <= 1e-10 * abs(one.lower_bound_)



@pytest.mark.parametrize("cov", COVS)
def test_sample_statistics(datasets, cov):
    """Per component, the sample mean and covariance of 40,000 draws as the fitted ones, within
    five standard errors (mean) and 10% (covariance entries, relative to the largest)."""
    X = datasets["iris"]
    m = fg.GaussianMixture(3, covariance_type=cov, random_state=0).fit(X)
    xs, ys = m.sample(40000)
    cov_k = {"full": lambda k: m.covariances_[k], "tied": lambda k: m.covariances_,
             "diag": lambda k: np.diag(m.covariances_[k]), "spherical": lambda k: np.eye(4) * m.covariances_[k]}[cov]
    for k in range(3):
        pts = xs[ys == k]
        assert abs(len(pts) / 40000 - m.weights_[k]) < 5 * np.sqrt(m.weights_[k] / 40000)
        C = cov_k(k)
        se = np.sqrt(np.diag(C) / len(pts))
        assert (np.abs(pts.mean(0) - m.means_[k]) < 5 * se).all()
        assert np.abs(np.cov(pts.T) - C).max() < 0.1 * np.abs(C).max()


# --- the CPU kernels' fused E-step (fastgmmdiff::em_stats) ----------------------------------------


def _stats_reference(X, means, U, logits, cov, dtype=torch.float64):
    """The E-step's statistics in float64 (or ``dtype``: plain PyTorch at the working precision)
    by plain PyTorch: r = softmax of every component's log-density (fastgmmdiff.reference), sums
    about the given means."""
    from fastgmmdiff import reference

    X, means, U, logits = (t.to(dtype) for t in (X, means, U, logits))
    lp = reference.component_log_prob(X, means, U, logits, cov)  # [N, K]
    r = torch.softmax(lp, -1)
    z = X[:, None, :] - means  # [N, K, D]
    Nk = r.sum(0)
    S1 = (r[..., None] * z).sum(0)
    if cov == "diag":
        S2 = (r[..., None] * z * z).sum(0)
    elif cov == "spherical":
        S2 = (r * (z * z).sum(-1)).sum(0)
    else:
        S2 = torch.einsum("nk,nkd,nke->kde", r, z, z)
        if cov == "tied":
            S2 = S2.sum(0)
    return torch.logsumexp(lp, -1).sum(), Nk, S1, S2


def _stats_problem(cov, N, K, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(K, D, generator=g, dtype=torch.float64)
    X = centres[torch.randint(K, (N,), generator=g)] + torch.randn(N, D, generator=g, dtype=torch.float64)
    X[: N // 7] *= 30  # far points: responsibilities near 0 and 1
    means = centres + 0.5 * torch.randn(K, D, generator=g, dtype=torch.float64)
    if cov == "diag":
        U = 0.3 + torch.rand(K, D, generator=g, dtype=torch.float64)
    elif cov == "spherical":
        U = 0.3 + torch.rand(K, generator=g, dtype=torch.float64)
    else:
        A = torch.randn(K if cov == "full" else 1, D, D, generator=g, dtype=torch.float64)
        U = torch.linalg.cholesky(torch.linalg.inv(A @ A.mT / D + 0.5 * torch.eye(D, dtype=torch.float64))).mT
        U = U.contiguous() if cov == "full" else U[0].contiguous()
    logits = torch.randn(K, generator=g, dtype=torch.float64)
    return X.to(dtype), means, U, logits


@pytest.mark.skipif("cpu" not in fg.available_backends(), reason="the CPU kernels are not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("cov", COVS)
@pytest.mark.parametrize("N", [1, 63, 64, 200])
@pytest.mark.parametrize("D", [7, 18])
def test_fused_e_step_against_float64(cov, dtype, N, D, seed):
    """GaussianMixture.fit on CPU runs each E-step as one fused pass of the CPU kernels (no
    gradients, no N×K array): every statistic element by element against plain PyTorch in
    float64 on the same (dtype-rounded) values, within the gradient bar of the data's dtype;
    N around the 64-point tile (padding lanes must add nothing); chunked data gives the same
    sums; one and two threads give the same bits.  D = 7 and 18: rows of one and of several
    vectors with a remainder (the sums over the points above the floor take the tile's rows
    with lanes over the entries).  The statistics are gradient sums (_em's docstring) and are
    judged by the gradient rule (``plain_bounds``): the bar, or where plain PyTorch at the data's
    dtype misses it too (float32: far points near a tie of components, about one run in 30 of
    this test), twice plain PyTorch's error."""
    from fastgmmdiff import _em
    from fastgmmdiff.testing import assert_close_per_element, bars, check_gradient, plain_bounds

    K = 5
    X, means, U, logits = _stats_problem(cov, N, K, D, dtype, seed)
    assert _em._fused("auto", torch.device("cpu"), dtype)
    st = _em.e_step(X, means, U, logits, cov)
    ref = _stats_reference(X, means, U, logits, cov)
    bar = bars(dtype).grad
    bounds = [plain_bounds(p, r, bar) for p, r in zip(_stats_reference(X, means, U, logits, cov, dtype)[1:], ref[1:])]

    def check_stats(st, what):
        for name, out, r, b in zip(("N_k", "S1", "S2"), (st.Nk, st.S1, st.S2), ref[1:], bounds):
            assert out.shape == r.shape, (name, out.shape, r.shape)
            check_gradient(out, r, b, bar, f"{what} {cov} {dtype} {name}")

    assert st.n == N
    assert_close_per_element(st.sum_logp, ref[0], bar, "Σ log p")
    check_stats(st, "one pass")
    check_stats(_em.e_step(X, means, U, logits, cov, chunk_size=max(1, N // 3)), "chunked")
    # the kernel's own sums (before _em's float64 algebra, whose matrix products need not give
    # the same bits on one and two threads)
    Uk = U.expand(K, D, D) if cov == "tied" else U
    args = [t.to(dtype).contiguous() for t in (means, Uk, logits)]
    raw = lambda: torch.ops.fastgmmdiff.em_stats(X.contiguous(), *args, "full" if cov == "tied" else cov)
    two = raw()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = raw()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    # the estimator's later E-steps take the rows grouped by component (the first one's order;
    # float64 data only, _em._e_step_fused)
    groups = {}
    for step in ("regrouping", "grouped"):
        st = _em.e_step(X, means, U, logits, cov, chunk_size=max(1, N // 3), groups=groups)
        assert len(groups) == (len(range(0, N, max(1, N // 3))) if dtype == torch.float64 else 0)
        assert_close_per_element(st.sum_logp, ref[0], bar, f"{step} Σ log p")
        check_stats(st, step)


@pytest.mark.skipif("cpu" not in fg.available_backends(), reason="the CPU kernels are not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("cov", ["diag", "spherical", "full"])
def test_fused_e_step_row_order(cov, dtype, seed):
    """em_stats' order and regroup: regroup returns the rows grouped by their most likely
    component (a stable counting sort of the float64 reference's argmax ℓ; N here is within one
    window, the next test crosses them) and the same bits as without it; with an order, the
    kernel's sums are those of x with its rows in that order, bit for bit (the same tiles); a
    bad order is a clear error."""
    from fastgmmdiff import reference

    N, K, D = 300, 9, 7
    X, means, U, logits = _stats_problem(cov, N, K, D, dtype, seed)
    args = [t.to(dtype).contiguous() for t in (means, U, logits)]
    op = torch.ops.fastgmmdiff.em_stats
    *plain, none = op(X, *args, cov)
    assert none.numel() == 0
    *same, order = op(X, *args, cov, None, True)
    for a, b in zip(same, plain):
        assert torch.equal(a, b)
    assert order.dtype == torch.int64 and torch.equal(order.sort().values, torch.arange(N))
    if dtype == torch.float64:  # float32's ℓ may swap a near tie
        lab = reference.component_log_prob(X, *(t.double() for t in args), cov).argmax(-1)
        assert torch.equal(order, torch.argsort(lab, stable=True))
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    *_, again = op(X, *args, cov, perm, True)  # the labels go to x's rows, whatever the order
    assert torch.equal(again, order)
    for o in (order, perm):
        *got, _ = op(X, *args, cov, o, False)
        *want, _ = op(X[o].contiguous(), *args, cov)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    for bad, what in ((perm.int(), "int64"), (perm[:-1], r"\[N\] = \[300\]"), (perm - 1, r"in \[0, 300\)"),
                      (perm + 1, r"in \[0, 300\)")):
        with pytest.raises(RuntimeError, match=what):
            op(X, *args, cov, bad, False)


@pytest.mark.skipif("cpu" not in fg.available_backends(), reason="the CPU kernels are not built")
def test_fused_e_step_regroups_within_windows(seed):
    """regroup groups the rows within windows of about 2 MB of x (whole tiles; log_prob_cpu.cpp
    group_by_label): at D = 4096 in float64 a row is 32 KB and a window the minimum, one tile of
    64 rows, so N = 300 crosses four windows and ends in a part of one."""
    from fastgmmdiff import reference

    N, K, D = 300, 3, 4096
    X, means, U, logits = _stats_problem("diag", N, K, D, torch.float64, seed)
    W = max(64, (2 << 20) // (D * 8) // 64 * 64)
    assert W == 64
    *_, order = torch.ops.fastgmmdiff.em_stats(X, means, U, logits, "diag", None, True)
    lab = reference.component_log_prob(X, means, U, logits, "diag").argmax(-1)
    want = torch.cat([w0 + torch.argsort(lab[w0:w0 + W], stable=True) for w0 in range(0, N, W)])
    assert torch.equal(order, want)


@pytest.mark.skipif("cpu" not in fg.available_backends(), reason="the CPU kernels are not built")
@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
@pytest.mark.parametrize("cov", COVS)
def test_fused_e_step_every_instruction_set(isa, cov, seed, monkeypatch):
    """The float64 fused E-step (kernels.inc em64_impl) on each build of the CPU kernels (SSE2,
    AVX2, AVX-512: vector widths 2, 4, 8) at D = 1, 2, 3, 4, 5, 9 and 16 (its blocks: 4 entries
    of diag's sums, 3 × 4 of full's, two outputs of full's ℓ, and every remainder), against
    plain PyTorch in float64 element by element.  (float32, em_impl: the test above; its
    far points' ℓ ~ 10⁴ make float32's S1 as far off as plain float32 PyTorch's at some seeds,
    which this fixed bar would not allow.)  A level the processor lacks is skipped, saying so."""
    from fastgmmdiff import _C, _em
    from fastgmmdiff.testing import assert_close_per_element, bars

    monkeypatch.setenv("FASTGMMDIFF_CPU_ISA", isa)
    if _C.cpu_isa() != isa:
        pytest.skip(f"this processor has no {isa}: the kernels would run {_C.cpu_isa()}")
    for dtype in (torch.float64,):
        for D in (1, 2, 3, 4, 5, 9, 16):
            X, means, U, logits = _stats_problem(cov, 131, 6, D, dtype, seed + D)
            st = _em.e_step(X, means, U, logits, cov)
            ref = _stats_reference(X, means, U, logits, cov)
            bar = bars(dtype).grad
            assert_close_per_element(st.sum_logp, ref[0], bar, f"{isa} D={D} {dtype} Σ log p")
            for name, out, r in zip(("N_k", "S1", "S2"), (st.Nk, st.S1, st.S2), ref[1:]):
                assert out.shape == r.shape, (name, out.shape, r.shape)
                assert_close_per_element(out, r, bar, f"{isa} D={D} {cov} {dtype} {name}")


@pytest.mark.skipif("cpu" not in fg.available_backends(), reason="the CPU kernels are not built")
@pytest.mark.parametrize("cov", ["diag", "full"])
def test_fused_e_step_responsibilities_to_a_few_ulps(cov, seed):
    """One point at a time N_k is the point's responsibilities r_k themselves: every r_k of the
    float64 E-step is as close to plain PyTorch's softmax as the rounding of ℓ allows (bar: 16
    eps + 4 eps (|ℓ_k| + |log p|), ~1e-14 here), the kernels' own exp included (the gradient
    bar of the tests above does not hold it to that: a misplaced r⁸ term in its polynomial,
    1e-11 relative at the reduced argument's ends, passed them; this test failed on it).
    Below the responsibility floor (ℓ_k more than 100 below the point's largest: r < 3.7e-44,
    kernels.inc kEmFloor) r is exactly 0; within the rounding of ℓ of it, either."""
    g = torch.Generator().manual_seed(seed)
    K, D, N = 7, 5, 150
    centres = 3 * torch.randn(K, D, generator=g, dtype=torch.float64)
    X = centres[torch.randint(K, (N,), generator=g)] + torch.randn(N, D, generator=g, dtype=torch.float64)
    means = centres + 0.3 * torch.randn(K, D, generator=g, dtype=torch.float64)
    if cov == "diag":
        U = 0.7 + 0.3 * torch.rand(K, D, generator=g, dtype=torch.float64)
    else:
        U = (0.8 * torch.eye(D, dtype=torch.float64) + 0.1 * torch.randn(K, D, D, generator=g, dtype=torch.float64)).triu()
    logits = torch.randn(K, generator=g, dtype=torch.float64)
    from fastgmmdiff import reference

    r = torch.stack([torch.ops.fastgmmdiff.em_stats(X[i:i + 1], means, U, logits, cov)[1] for i in range(N)])
    lp = reference.component_log_prob(X, means, U, logits, cov)
    r_ref = torch.softmax(lp, -1)
    # r = exp(ℓ − log p): each side's rounding of ℓ and log p (~eps·|ℓ|) moves r by as much,
    # relative; exp, the sum and the division a few eps more
    eps = torch.finfo(torch.float64).eps
    bar = 16 * eps + 4 * eps * (lp.abs() + torch.logsumexp(lp, -1, keepdim=True).abs())
    gap = lp - lp.amax(-1, keepdim=True)
    below, edge = gap < -100 - 1e-9, (gap + 100).abs() <= 1e-9
    ratio = ((r - r_ref).abs() / r_ref / bar)[~below & ~(edge & (r == 0))].max().item()
    assert ratio <= 1, f"responsibilities {ratio:.3g}× their bar"
    assert (r[below] == 0).all(), "responsibilities below the floor"


@pytest.mark.skipif("cpu" not in fg.available_backends(), reason="the CPU kernels are not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("cov", ["diag", "full"])
def test_fused_e_step_floor_is_exact(cov, dtype):
    """The responsibility floor sits exactly where kernels.inc says (float64: ℓ_k 100 below the
    point's largest, kEmFloor; float32: 87.3, where its exp flushes), whether the kernel drops a
    term in the exp or a component for the whole tile (live_components): one point per call, the
    second of two components at gaps just either side of it, r_2 = 0 below and to the rounding
    of ℓ above (the responsibilities test's bar)."""
    floor = 100.0 if dtype == torch.float64 else 87.3
    c = 20.0  # means 0 and c in D = 1, U = 1, equal weights: gap ℓ_2 − ℓ_1 = x c − c²/2
    means = torch.tensor([[0.0], [c]], dtype=dtype)
    U = torch.ones(2, 1, dtype=dtype) if cov == "diag" else torch.ones(2, 1, 1, dtype=dtype)
    logits = torch.zeros(2, dtype=dtype)
    eps = torch.finfo(dtype).eps
    for delta in (-1.5, -0.5, -0.01, 0.01, 0.5, 1.5):
        x = torch.tensor([[(-floor + delta + c * c / 2) / c]], dtype=dtype)
        ell = -0.5 * (x.double() - means.double()[:, 0]) ** 2  # [1, 2], from the rounded x
        gap = float(ell[0, 1] - ell[0, 0])
        r2 = float(torch.ops.fastgmmdiff.em_stats(x, means, U, logits, cov)[1][1])
        if gap < -floor:
            assert r2 == 0, (dtype, cov, gap, r2)
        else:
            ref = float(torch.softmax(ell, -1)[0, 1])
            bar = 16 * eps + 4 * eps * (float(ell.abs().max()) + float(torch.logsumexp(ell, -1).abs()))
            assert abs(r2 - ref) <= bar * ref, (dtype, cov, gap, r2, ref)


@pytest.mark.skipif("cpu" not in fg.available_backends(), reason="the CPU kernels are not built")
def test_fused_e_step_takes_only_its_layouts():
    """em_stats is the estimator's internal op: one mixture, diag/spherical/full; anything else
    is a clear error."""
    x, m, u, lg = torch.randn(10, 3), torch.randn(2, 3), torch.rand(2, 3) + 0.5, torch.zeros(2)
    with pytest.raises(RuntimeError, match="one mixture"):
        torch.ops.fastgmmdiff.em_stats(x[None], m, u, lg, "diag")
    with pytest.raises(RuntimeError, match="covariance_type"):
        torch.ops.fastgmmdiff.em_stats(x, m, u, lg, "tied")
