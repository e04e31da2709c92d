"""fastgmmdiff.distributions.MixtureOfGaussians against torch.distributions.MixtureSameFamily, and
the parameter converters of fastgmmdiff.convert against scikit-learn's own computation.

Bars, stated once: values and gradients agree with MixtureSameFamily, evaluated in float64 on
the same values, element-wise to 1e-5 × (|b| + rms(b)) in float32 (the issue's "1e-5 relative"; the rms term keeps an element
that cancels to ~0 from demanding more digits than float32 has) and 1e-10 × (…) in float64;
converters match scikit-learn to 1e-12 relative in float64.
"""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.distributions as tdist

import fastgmmdiff as fg
from fastgmmdiff import convert
from fastgmmdiff.distributions import MixtureOfGaussians
from fastgmmdiff.testing import assert_close_per_element

BAR = {torch.float32: 1e-5, torch.float64: 1e-10}
PARAMS = ("scale", "scale_spherical", "scale_tril", "covariance_matrix", "precision_matrix", "precision_cholesky")


def _spd(shape, D, gen, dtype):
    A = torch.randn(shape + (D, D), generator=gen, dtype=torch.float64)
    return (A @ A.mT / D + 0.3 * torch.eye(D, dtype=torch.float64)).to(dtype)


def make(param, batch, K, D, gen, dtype=torch.float32, tied=False):
    """(fastgmmdiff kwargs, torch's MixtureSameFamily as a function of the leaves, leaf tensors)."""
    logits = torch.randn(batch + (K,), generator=gen, dtype=dtype).requires_grad_()
    loc = torch.randn(batch + (K, D), generator=gen, dtype=dtype).requires_grad_()
    kk = (1,) if tied else (K,)
    if param == "scale":
        p = (0.4 + torch.rand(batch + (K, D), generator=gen, dtype=dtype)).requires_grad_()
        comp = lambda loc, p: tdist.Independent(tdist.Normal(loc, p), 1)  # noqa: E731
    elif param == "scale_spherical":
        p = (0.4 + torch.rand(batch + (K, 1), generator=gen, dtype=dtype)).requires_grad_()
        comp = lambda loc, p: tdist.Independent(tdist.Normal(loc, p.expand(loc.shape)), 1)  # noqa: E731
    else:
        cov = _spd(batch + kk, D, gen, dtype)
        L = torch.linalg.cholesky(cov)
        prec = torch.cholesky_inverse(L)
        p = {"scale_tril": L, "covariance_matrix": cov, "precision_matrix": prec,
             "precision_cholesky": convert.covariance_to_prec_chol(cov)}[param].detach().requires_grad_()
        if param == "precision_cholesky":
            comp = lambda loc, p: tdist.MultivariateNormal(loc, scale_tril=convert.prec_chol_to_scale_tril(p))  # noqa: E731
        else:
            comp = lambda loc, p: tdist.MultivariateNormal(loc, **{param: p})  # noqa: E731
    name = "scale" if param.startswith("scale_sph") else param
    msf = lambda logits, loc, p: tdist.MixtureSameFamily(tdist.Categorical(logits=logits), comp(loc, p))  # noqa: E731
    return dict(logits=logits, loc=loc, **{name: p}), msf, (logits, loc, p)


def reference(msf, leaves):
    """torch's MixtureSameFamily in float64 on exactly the values of ``leaves`` (float64 leaves
    of its own, for gradients): the bars are stated against it, not against torch's float32
    computation, which is itself off by up to ~1e-5 (its scale_tril solve and logsumexp)."""
    leaves64 = tuple(t.detach().double().requires_grad_() for t in leaves)
    return msf(*leaves64), leaves64


def ours(kw, **extra):
    kw = dict(kw)
    logits, loc = kw.pop("logits"), kw.pop("loc")
    return MixtureOfGaussians(logits, loc, **kw, **extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("batch", [(), (5,), (2, 3), (2, 1, 3)], ids=lambda b: f"batch{len(b)}")
def test_log_prob_matches_mixture_same_family(backend, param, batch, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    K, D = 4, 3
    kw, msf, leaves = make(param, batch, K, D, gen, dtype)
    (r, leaves64), d = reference(msf, leaves), ours(kw, backend=backend)
    assert d.batch_shape == r.batch_shape and d.event_shape == r.event_shape
    value = 2.0 * torch.randn((6,) + batch + (D,), generator=gen, dtype=dtype)
    _check_log_prob_and_gradients(d, r, value, leaves, leaves64, param, (6,) + batch, gen)


def _check_log_prob_and_gradients(d, r, value, leaves, leaves64, param, shape, gen):
    """d.log_prob(value) and its gradients to the leaves and value against r (float64), per
    element at BAR."""
    dtype = value.dtype
    value = value.requires_grad_()
    value64 = value.detach().double().requires_grad_()
    a, b = d.log_prob(value), r.log_prob(value64)
    assert a.shape == b.shape == shape and a.dtype == dtype
    assert_close_per_element(a, b, BAR[dtype], "log_prob")
    up = torch.randn(a.shape, generator=gen, dtype=dtype)
    ga = torch.autograd.grad((a * up).sum(), leaves + (value,))
    gb = torch.autograd.grad((b * up.double()).sum(), leaves64 + (value64,))
    for name, u, v in zip(("logits", "loc", param, "value"), ga, gb):
        assert_close_per_element(u, v, BAR[dtype], f"d/d{name}")


@pytest.mark.parametrize("param", ["scale", "scale_tril", "precision_matrix"])
def test_value_broadcasting_like_mixture_same_family(param, seed):
    gen = torch.Generator().manual_seed(seed)
    batch, K, D = (3, 2), 5, 2
    kw, msf, leaves = make(param, batch, K, D, gen)
    d, r = ours(kw), reference(msf, leaves)[0]
    for shape in [(D,), (1, D), (1, 1, D), (3, 1, D), (1, 2, D), (7, 1, 1, D), (4, 3, 2, D), (2, 7, 3, 2, D)]:
        v = torch.randn(shape, generator=gen)
        a, b = d.log_prob(v), r.log_prob(v.double())
        assert a.shape == b.shape, shape
        assert_close_per_element(a, b, 1e-5, f"value {shape}")
    # a value with more batch than the distribution: the distribution is expanded (as torch does)
    d1, r1 = ours(make(param, (1,), K, D, gen)[0]), None
    v = torch.randn(4, D, generator=gen)
    assert d1.log_prob(v).shape == (4,)
    r1 = d1.expand((4,))
    assert_close_per_element(d1.log_prob(v), r1.log_prob(v), 1e-6, "expanded")


def test_mdn_rows_are_one_point_per_mixture(seed):
    """The MDN call: y [B, D] under mixtures [B, K, D] is [B] (row i under mixture i)."""
    gen = torch.Generator().manual_seed(seed)
    B, K, D = 33, 5, 3
    kw, msf, leaves = make("scale", (B,), K, D, gen)
    y = torch.randn(B, D, generator=gen)
    a = ours(kw).log_prob(y)
    assert a.shape == (B,)
    assert_close_per_element(a, reference(msf, leaves)[0].log_prob(y.double()), 1e-5, "mdn")
    # the functional form of the same rows
    f = fg.gmm_log_prob(y.unsqueeze(1), kw["loc"], 1 / kw["scale"], kw["logits"])
    assert_close_per_element(a, f[:, 0], 1e-6, "functional rows")


# float32 at D = 16, 40: q ~ 4D puts float32's own rounding of ℓ (plain PyTorch's too) at ~1e-5 of
# the gradients; those paths in float32 are held to the conditioning-aware bars of
# tests/test_log_prob.py (one point per mixture, D = 8…72), σ's handling here in float64
@pytest.mark.parametrize("D,dtype", [(2, torch.float32), (2, torch.float64), (16, torch.float64),
                                     (40, torch.float64)], ids=["2-f32", "2-f64", "16-f64", "40-f64"])
@pytest.mark.parametrize("param", ["scale", "scale_spherical"])
@pytest.mark.parametrize("batch", [(37,), (3, 11)], ids=lambda b: f"batch{len(b)}")
@pytest.mark.interpreter_heavy
def test_mdn_rows_values_and_gradients(backend, param, D, batch, dtype, seed):
    """The MDN head's path (one point per mixture, σ given: the compiled backends take σ itself,
    fastgmmdiff::log_prob_scale): values and every gradient (logits, loc, σ, y) against
    MixtureSameFamily in float64, per element; D = 2 and 16 run the cpu kernels' rows-in-lanes
    blocks (37 rows: a partial last block), D = 40 (above 4× the vector width) the element
    lanes."""
    if D > 2 and backend != "cpu":
        pytest.skip("D > 2 is for the cpu kernels' layouts (rows in lanes, element lanes)")
    gen = torch.Generator().manual_seed(seed)
    K = 5
    kw, msf, leaves = make(param, batch, K, D, gen, dtype)
    (r, leaves64), d = reference(msf, leaves), ours(kw, backend=backend)
    y = 1.5 * torch.randn(batch + (D,), generator=gen, dtype=dtype)
    _check_log_prob_and_gradients(d, r, y, leaves, leaves64, param, batch, gen)


def test_scale_gradient_after_a_first_use_without_autograd(seed):
    """U = 1/σ is built on first use: a first use under torch.no_grad() (posterior) must not leave
    a U without autograd behind for a later log_prob with gradients (σ's gradient would be lost)."""
    gen = torch.Generator().manual_seed(seed)
    kw, msf, leaves = make("scale", (4,), 3, 2, gen)
    d = ours(kw)
    v = torch.randn(5, 4, 2, generator=gen)  # a sample axis: the general path, which uses U
    with torch.no_grad():
        d.posterior(v)
    (g,) = torch.autograd.grad(d.log_prob(v).sum(), [kw["scale"]])
    r, leaves64 = reference(msf, leaves)
    (gr,) = torch.autograd.grad(r.log_prob(v.double()).sum(), [leaves64[2]])
    assert_close_per_element(g, gr, BAR[torch.float32], "d/dscale")


@pytest.mark.parametrize("cov", ["diag", "spherical"])
@pytest.mark.parametrize("layout", ["one point per mixture", "points of one mixture", "rows of mixtures"])
def test_log_prob_scale_op(cov, layout, seed):
    """fastgmmdiff::log_prob_scale (σ = 1/U in place of U) equals log_prob of 1/σ with the σ
    gradient −∂U·U², in every layout (the one-point kernels take σ natively, the others through
    1/σ), float64 per element at 1e-12; other covariance types are refused."""
    if "cpu" not in fg.available_backends():
        pytest.skip("compiled CPU kernels unavailable")
    from fastgmmdiff import reference as ref
    from fastgmmdiff.testing import random_problem

    G, N = {"one point per mixture": (19, 1), "points of one mixture": (None, 30), "rows of mixtures": (7, 3)}[layout]
    for D in (2, 9, 40):
        p = random_problem(cov, G, N=N, K=4, D=D, dtype=torch.float64, seed=seed)
        args = [p["x"], p["means"], 1 / p["prec_chol"], p["logits"]]
        args = [t.clone().requires_grad_() for t in args]
        out = torch.ops.fastgmmdiff.log_prob_scale(*args, cov)
        up = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        grads = torch.autograd.grad(out, args, up)
        a64 = [t.detach().clone().requires_grad_() for t in args]
        want = ref.gmm_log_prob(a64[0], a64[1], 1 / a64[2], a64[3], cov)
        wgrads = torch.autograd.grad(want, a64, up)
        assert_close_per_element(out, want, 1e-12, f"{layout} D={D} log p")
        for name, g, w in zip(("x", "means", "scale", "logits"), grads, wgrads):
            assert_close_per_element(g, w, 1e-12, f"{layout} D={D} d/d{name}")
    with pytest.raises(RuntimeError, match="covariance_type must be 'diag' or 'spherical'"):
        torch.ops.fastgmmdiff.log_prob_scale(*(t.detach() for t in args), "full")


def test_spherical_and_tied_run_their_own_kernels(seed):
    gen = torch.Generator().manual_seed(seed)
    kw, msf, leaves = make("scale_spherical", (4,), 3, 5, gen)
    d = ours(kw)
    assert d.covariance_type == "spherical"
    v = torch.randn(2, 4, 5, generator=gen)
    assert_close_per_element(d.log_prob(v), reference(msf, leaves)[0].log_prob(v.double()), 1e-5, "spherical")
    scalar = MixtureOfGaussians(kw["logits"], kw["loc"], scale=torch.tensor(0.7))
    assert scalar.covariance_type == "spherical"
    ref = tdist.MixtureSameFamily(tdist.Categorical(logits=kw["logits"].double()),
                                  tdist.Independent(tdist.Normal(kw["loc"].double(), torch.full((4, 3, 5), 0.7, dtype=torch.float64)), 1))
    assert_close_per_element(scalar.log_prob(v), ref.log_prob(v.double()), 1e-5, "scalar scale")
    for param in ("scale_tril", "covariance_matrix", "precision_matrix", "precision_cholesky"):
        kw, msf, leaves = make(param, (4,), 3, 5, gen, tied=True)
        d = ours(kw)
        assert d.covariance_type == "tied", param
        assert_close_per_element(d.log_prob(v), reference(msf, leaves)[0].log_prob(v.double()), 1e-5, f"tied {param}")
    # one [D, D] matrix for every component of every mixture
    L = torch.linalg.cholesky(_spd((), 5, gen, torch.float32))
    d = MixtureOfGaussians(kw["logits"], kw["loc"], scale_tril=L)
    ref = tdist.MixtureSameFamily(tdist.Categorical(logits=kw["logits"].double()),
                                  tdist.MultivariateNormal(kw["loc"].double(), scale_tril=L.double()))
    assert d.covariance_type == "tied" and d.batch_shape == (4,)
    assert_close_per_element(d.log_prob(v), ref.log_prob(v.double()), 1e-5, "shared [D, D]")


@pytest.mark.parametrize("param", ["scale", "scale_spherical", "covariance_matrix"])
def test_posterior_mean_variance_and_parts(param, seed):
    gen = torch.Generator().manual_seed(seed)
    batch, K, D = (2, 3), 4, 3
    kw, msf, leaves = make(param, batch, K, D, gen, torch.float64)
    d, r = ours(kw), msf(*leaves)
    v = torch.randn(5, 1, 3, D, generator=gen, dtype=torch.float64)
    lc = r.component_distribution.log_prob(v.unsqueeze(-2)) + torch.log_softmax(kw["logits"], -1)
    post = d.posterior(v)
    assert post.shape == (5, 2, 3, K)
    assert_close_per_element(post, torch.softmax(lc, -1), 1e-10, "posterior")
    assert_close_per_element(d.mean, r.mean, 1e-10, "mean")
    assert_close_per_element(d.variance, r.variance, 1e-10, "variance")
    assert_close_per_element(d.mixture_distribution.probs, r.mixture_distribution.probs, 1e-12, "weights")
    c = d.component_distribution
    assert c.batch_shape == batch + (K,) and c.event_shape == (D,)
    assert_close_per_element(c.log_prob(v.unsqueeze(-2)), r.component_distribution.log_prob(v.unsqueeze(-2)),
                             1e-10, "components")


@pytest.mark.parametrize("param", ["scale", "scale_spherical", "scale_tril", "precision_cholesky"])
def test_sample_statistics_and_generator(param, seed):
    gen = torch.Generator().manual_seed(seed)
    kw, _, _ = make(param, (2,), 3, 2, gen, torch.float64)
    d = ours(kw)
    x = d.sample((100_000,), generator=torch.Generator().manual_seed(1))
    assert x.shape == (100_000, 2, 2) and not x.requires_grad
    y = d.sample((100_000,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, y)
    # 100,000 draws: the sample mean is within ~5 standard errors of the mean
    se = (d.variance / 100_000).sqrt()
    assert bool(((x.mean(0) - d.mean).abs() <= 5 * se).all())
    assert bool(((x.var(0) / d.variance - 1).abs() < 0.05).all())
    assert d.sample().shape == (2, 2) and d.sample((0,)).shape == (0, 2, 2)


def test_rsample_gradients_and_the_discrete_choice(seed):
    gen = torch.Generator().manual_seed(seed)
    kw, _, (logits, loc, scale) = make("scale", (), 3, 2, gen, torch.float64)
    with pytest.raises(ValueError, match="discrete"):
        ours(kw).rsample((5,))
    kw["logits"] = logits.detach()
    d = ours(kw)
    x = d.rsample((4000,), generator=torch.Generator().manual_seed(2))
    gl, gs = torch.autograd.grad(x.sum(), [loc, scale])
    # ∂Σx/∂μ_k = number of draws from k; ∂Σx/∂σ_k = Σ ε over those draws
    counts = gl[:, 0]
    assert torch.equal(gl[:, 0], gl[:, 1]) and abs(counts.sum().item() - 4000) < 1e-9
    assert_close_per_element(counts / 4000, d.probs, 0.1, "draw frequencies")
    x2 = d.sample((4000,), generator=torch.Generator().manual_seed(2))
    assert torch.equal(x.detach(), x2)
    assert gs.shape == scale.shape


def test_expand(seed):
    gen = torch.Generator().manual_seed(seed)
    for param in ("scale", "scale_spherical", "scale_tril"):
        kw, _, _ = make(param, (1,), 3, 2, gen)
        d = ours(kw)
        e = d.expand((2, 4))
        assert e.batch_shape == (2, 4) and e.covariance_type == d.covariance_type
        v = torch.randn(2, 4, 2, generator=gen)
        assert_close_per_element(e.log_prob(v), d.log_prob(v.reshape(8, 1, 2)).reshape(2, 4), 1e-6, "expand")
        s = ours(make(param, (), 3, 2, gen)[0]).expand((5,))
        assert s.batch_shape == (5,) and s.sample((2,)).shape == (2, 5, 2)


def test_validate_args_raise_torchs_errors():
    logits, loc = torch.zeros(2, 3), torch.zeros(2, 3, 2)
    with pytest.raises(ValueError, match="Expected parameter scale"):
        MixtureOfGaussians(logits, loc, scale=-torch.ones(2, 3, 2), validate_args=True)
    bad = torch.eye(2).expand(2, 3, 2, 2).clone()
    bad[..., 0, 1] = 0.5  # not lower triangular
    with pytest.raises(ValueError, match="Expected parameter scale_tril"):
        MixtureOfGaussians(logits, loc, scale_tril=bad, validate_args=True)
    with pytest.raises(ValueError, match="Expected parameter covariance_matrix"):
        MixtureOfGaussians(logits, loc, covariance_matrix=-torch.eye(2).expand(2, 3, 2, 2), validate_args=True)
    with pytest.raises(ValueError, match="Expected parameter precision_cholesky"):
        MixtureOfGaussians(logits, loc, precision_cholesky=bad.mT, validate_args=True)
    with pytest.raises(ValueError, match="Expected parameter loc"):
        MixtureOfGaussians(logits, loc + float("nan"), scale=torch.ones(2, 3, 2), validate_args=True)
    MixtureOfGaussians(logits, loc, scale=-torch.ones(2, 3, 2), validate_args=False)  # not checked
    d = MixtureOfGaussians(logits, loc, scale=torch.ones(2, 3, 2), validate_args=True)
    with pytest.raises(ValueError, match="event_shape"):
        d.log_prob(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="broadcastable"):
        d.log_prob(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="support"):
        d.log_prob(torch.full((2, 2), float("nan")))


def test_constructor_errors():
    logits, loc = torch.zeros(3), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="Exactly one"):
        MixtureOfGaussians(logits, loc)
    with pytest.raises(ValueError, match="Exactly one"):
        MixtureOfGaussians(logits, loc, scale=torch.ones(3, 2), scale_tril=torch.eye(2))
    with pytest.raises(ValueError, match="last axis"):
        MixtureOfGaussians(logits, loc, scale=torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"\[\*batch, K, D, D\]"):
        MixtureOfGaussians(logits, loc, scale_tril=torch.eye(3))
    with pytest.raises(ValueError, match="broadcast"):
        MixtureOfGaussians(torch.zeros(4), loc, scale=torch.ones(3, 2))
    with pytest.raises(TypeError, match="loc must be a torch.Tensor"):
        MixtureOfGaussians(logits, [[0.0, 0.0]] * 3, scale=torch.ones(3, 2))


# -- the functional API's outer form: warned where it looks like the MDN mistake -------------------
def test_mdn_mistake_warns_and_says_what_to_do():
    B, K, D = 6, 3, 2
    y, mu, s, lg = torch.randn(B, D), torch.randn(B, K, D), torch.ones(B, K, D), torch.zeros(B, K)
    with pytest.warns(fg.OuterEvaluationWarning, match=r"x.unsqueeze\(1\)") as rec:
        out = fg.gmm_log_prob(y, mu, s, lg)
    assert out.shape == (B, B) and rec[0].filename == __file__
    with pytest.warns(fg.OuterEvaluationWarning):
        fg.ngmg_loss(y, mu, s, lg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fg.gmm_log_prob(y.unsqueeze(1), mu, s, lg).shape == (B, 1)
        assert fg.gmm_log_prob(y[:4], mu, s, lg).shape == (B, 4)  # N ≠ G: the outer form, meant
        assert fg.gmm_log_prob(y.expand(B, B, D), mu, s, lg).shape == (B, B)
        assert fg.gmm_log_prob(y, mu[0], s[0], lg[0]).shape == (B,)


# -- converters -----------------------------------------------------------------------------------
def _sk():
    from sklearn.mixture import _gaussian_mixture as skg

    return skg


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("cov", ["full", "tied", "diag", "spherical"])
def test_converters_match_scikit_learn(cov, seed):
    rng = np.random.default_rng(seed)
    K, D = 5, 4
    if cov in ("full", "tied"):
        A = rng.standard_normal((K, D, D) if cov == "full" else (D, D))
        covs = A @ np.swapaxes(A, -1, -2) / D + 0.2 * np.eye(D)
    else:
        covs = rng.uniform(0.1, 3.0, (K, D) if cov == "diag" else (K,))
    U_sk = _sk()._compute_precision_cholesky(covs, cov)
    U = convert.covariance_to_prec_chol(covs, cov)
    assert isinstance(U, np.ndarray) and _rel(U, U_sk) <= 1e-12
    prec = convert.prec_chol_to_precision(U, cov)
    from sklearn.utils._array_api import get_namespace

    from_prec = _sk()._compute_precision_cholesky_from_precisions(prec, cov, xp=get_namespace(prec)[0])
    assert _rel(convert.precision_to_prec_chol(prec, cov), from_prec) <= 1e-12
    assert _rel(convert.precision_to_prec_chol(prec, cov), U_sk) <= 1e-12
    assert _rel(convert.prec_chol_to_covariance(U, cov), covs) <= 1e-12
    # tensors in, tensors out, same numbers
    Ut = convert.covariance_to_prec_chol(torch.from_numpy(covs), cov)
    assert isinstance(Ut, torch.Tensor) and _rel(Ut.numpy(), U_sk) <= 1e-12
    if cov in ("full", "tied"):
        L = np.linalg.cholesky(covs)
        assert _rel(convert.scale_tril_to_prec_chol(L), U_sk) <= 1e-12
        assert _rel(convert.prec_chol_to_scale_tril(U_sk), L) <= 1e-12
    else:
        sd = np.sqrt(covs)
        assert _rel(convert.scale_to_prec_chol(sd), U_sk) <= 1e-12
        assert _rel(convert.prec_chol_to_scale(U_sk), sd) <= 1e-12


@pytest.mark.parametrize("cov", ["full", "tied", "diag", "spherical"])
def test_converters_on_a_fitted_scikit_learn_model(cov):
    from sklearn.datasets import load_iris
    from sklearn.mixture import GaussianMixture as SkGMM

    sk = SkGMM(3, covariance_type=cov, random_state=0).fit(load_iris().data)
    assert _rel(convert.covariance_to_prec_chol(sk.covariances_, cov), sk.precisions_cholesky_) <= 1e-12
    assert _rel(convert.prec_chol_to_precision(sk.precisions_cholesky_, cov), sk.precisions_) <= 1e-12
    assert _rel(convert.precision_to_prec_chol(sk.precisions_, cov), sk.precisions_cholesky_) <= 1e-12


def test_float32_converters_factorise_in_float64(seed):
    """float32 matrices are factorised and inverted in float64 and rounded back: each converter's
    float32 result is its float64 result on the same values, rounded (so within half an ulp of
    it), and so are the gradients; done in float32, a matrix with condition number ~1e4 would be
    off by ~κ·eps (the flake this guards: float32 covariance_matrix gradients 3.55× the bar)."""
    gen = torch.Generator().manual_seed(seed)
    K, D = 6, 5
    Q = torch.linalg.qr(torch.randn(K, D, D, generator=gen, dtype=torch.float64))[0]
    cov = ((Q * torch.logspace(-2, 2, D, dtype=torch.float64)) @ Q.mT).float()  # κ = 1e4
    cov = 0.5 * (cov + cov.mT)
    L = torch.linalg.cholesky(cov.double()).float()
    U = convert.covariance_to_prec_chol(cov.double()).float()
    cases = [(convert.covariance_to_prec_chol, cov), (convert.precision_to_prec_chol, convert.prec_chol_to_precision(U)),
             (convert.prec_chol_to_covariance, U), (convert.prec_chol_to_precision, U),
             (convert.scale_tril_to_prec_chol, L), (convert.prec_chol_to_scale_tril, U)]
    for f, x in cases:
        x32 = x.detach().clone().requires_grad_()
        x64 = x.detach().double().requires_grad_()
        y32, y64 = f(x32), f(x64)
        assert y32.dtype == torch.float32
        assert torch.equal(y32, y64.float()), f.__name__
        up = torch.randn(y32.shape, generator=gen, dtype=torch.float64)
        g32, = torch.autograd.grad((y32 * up.float()).sum(), x32)
        g64, = torch.autograd.grad((y64 * up.float().double()).sum(), x64)
        assert torch.equal(g32, g64.float()), f.__name__
        # numpy float32 in, numpy float32 out, the same numbers
        yn = f(x.detach().numpy())
        assert yn.dtype == np.float32 and np.array_equal(yn, y32.detach().numpy()), f.__name__


def test_converters_are_differentiable_and_check_their_input():
    A = torch.randn(3, 3, 3, dtype=torch.float64)
    cov = (A @ A.mT + torch.eye(3, dtype=torch.float64)).requires_grad_()
    torch.autograd.gradcheck(lambda c: convert.covariance_to_prec_chol(0.5 * (c + c.mT)), (cov,))
    torch.autograd.gradcheck(lambda c: convert.precision_to_prec_chol(0.5 * (c + c.mT)), (cov,))
    L = torch.linalg.cholesky(cov.detach()).requires_grad_()
    torch.autograd.gradcheck(convert.scale_tril_to_prec_chol, (L,))
    bad = cov.detach().clone()
    bad[1] = -torch.eye(3)
    with pytest.raises(ValueError, match=r"covariances\[1\] is not positive definite"):
        convert.covariance_to_prec_chol(bad)
    with pytest.raises(ValueError, match=r"covariances\[0, 1\] is not positive"):
        convert.covariance_to_prec_chol(np.array([[1.0, 0.0], [2.0, 1.0]]), "diag")
    with pytest.raises(ValueError, match="must be"):
        convert.covariance_to_prec_chol(np.ones((3, 2)), "full")
    with pytest.raises(ValueError, match="covariance_type"):
        convert.covariance_to_prec_chol(np.ones((3, 2)), "diagonal")


def test_gaussian_mixture_stores_only_free_precision_entries(seed):
    K, D = 8, 64
    m = fg.GaussianMixture(K, D, "full")
    assert m.prec_offdiag.numel() == K * D * (D - 1) // 2
    free = K * D + K * D + K * D * (D - 1) // 2 + K  # means, diagonal, strict upper triangle, logits
    assert sum(p.numel() for p in m.parameters()) == free
    gen = torch.Generator().manual_seed(seed)
    m = fg.GaussianMixture(3, 4, "full", dtype=torch.float64)
    with torch.no_grad():
        m.prec_offdiag.copy_(torch.randn(m.prec_offdiag.shape, generator=gen, dtype=torch.float64))
        m.log_prec_diag.copy_(torch.randn(m.log_prec_diag.shape, generator=gen, dtype=torch.float64))
    U = m.prec_chol
    iu = torch.triu_indices(4, 4, 1)
    assert torch.equal(U[:, iu[0], iu[1]], m.prec_offdiag) and torch.equal(U.tril(-1), torch.zeros_like(U))
    assert torch.equal(torch.diagonal(U, dim1=-2, dim2=-1), m.log_prec_diag.exp())
    # a state_dict saved with the old [K, D, D] layout loads into the new one
    old = dict(m.state_dict())
    old["prec_offdiag"] = U.detach().triu(1) + 5.0 * torch.ones(4, 4, dtype=torch.float64).tril()  # junk below: ignored
    n = fg.GaussianMixture(3, 4, "full", dtype=torch.float64)
    n.load_state_dict(old)
    assert torch.equal(n.prec_chol, U)
    assert torch.equal(fg.GaussianMixture.from_state_dict(old).prec_chol, U)
    assert math.isfinite(n.log_prob(torch.zeros(2, 4, dtype=torch.float64)).sum().item())


def test_mdn_example_fits_the_true_conditional_density(tmp_path, capsys):
    from fastgmmdiff.examples import mdn

    model, history, true_nll = mdn.train(steps=300, batch=256, seed=0, log=lambda *a: None)
    first, last = history[0][1], history[-1][1]
    # the gap to the true density is KL(true ‖ fit) ≥ 0 averaged over u: 0.03-0.04 nats after
    # 300 steps (seeds 0-2), from 0.5-1.1 at step 30
    assert 0 <= last - true_nll < 0.1 and first - true_nll > 0.4
    mdn.main(["--steps", "10", "--out", str(tmp_path / "mdn.png")])
    assert (tmp_path / "mdn.png").stat().st_size > 10_000
    assert "against the true density" in capsys.readouterr().out
