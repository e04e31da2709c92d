"""GaussianMixture, and agreement with scikit-learn on real data (the bundled digits)."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture as SkGMM

import fastgmmdiff as fg
from fastgmmdiff.testing import assert_close_per_element, bars


@pytest.fixture(scope="module")
def digits_pca():
    X = load_digits().data
    return PCA(n_components=12, random_state=0).fit_transform(X)


@pytest.mark.parametrize("cov", ["diag", "spherical", "full", "tied"])
def test_matches_sklearn_score_samples(digits_pca, cov):
    sk = SkGMM(n_components=6, covariance_type=cov, random_state=0, max_iter=50).fit(digits_pca)
    expect = sk.score_samples(digits_pca)
    x64 = torch.from_numpy(digits_pca)
    # The functional API on scikit-learn's own arrays (tied passed as such).
    out = fg.gmm_log_prob(x64, torch.from_numpy(sk.means_), torch.from_numpy(sk.precisions_cholesky_),
                          torch.from_numpy(np.log(sk.weights_)), cov)
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-10, atol=1e-9)
    # The module, float32 (tied stays tied).
    m = fg.GaussianMixture.from_sklearn(sk)
    assert m.covariance_type == cov
    with torch.no_grad():
        out32 = m.log_prob(x64.float())
    assert out32.dtype == torch.float32
    assert_close_per_element(out32, torch.from_numpy(expect), bars(torch.float32).value, "log p")
    # And back.
    np.testing.assert_allclose(m.to_sklearn().score_samples(digits_pca), expect, rtol=1e-5, atol=1e-4)


def test_from_sklearn_float64_roundtrip_is_exact(digits_pca):
    sk = SkGMM(n_components=4, covariance_type="full", random_state=0, max_iter=20).fit(digits_pca)
    m = fg.GaussianMixture.from_sklearn(sk, dtype=torch.float64)
    np.testing.assert_allclose(m.prec_chol.detach().numpy(), sk.precisions_cholesky_, rtol=1e-12)
    np.testing.assert_allclose(m.to_sklearn().score_samples(digits_pca), sk.score_samples(digits_pca), rtol=1e-10)


def test_unfitted_sklearn_model_is_an_error():
    with pytest.raises(ValueError, match="not fitted"):
        fg.GaussianMixture.from_sklearn(SkGMM(3))


@pytest.mark.parametrize("cov", ["diag", "spherical", "full"])
def test_sample_has_the_mixture_statistics(cov):
    torch.manual_seed(0)
    m = fg.GaussianMixture(1, 2, cov, dtype=torch.float64)
    with torch.no_grad():
        m.means.copy_(torch.tensor([[1.0, -2.0]]))
        if cov == "full":
            m.log_prec_diag.copy_(torch.log(torch.tensor([[2.0, 0.5]])))
            m.prec_offdiag.copy_(torch.tensor([[0.7]]))
        else:
            m.log_prec_diag.fill_(np.log(2.0))
    g = torch.Generator().manual_seed(1)
    x, comp = m.sample(200_000, generator=g)
    assert x.shape == (200_000, 2) and torch.all(comp == 0)
    U = m.prec_chol.detach()
    if cov == "full":
        cov_true = torch.linalg.inv(U[0] @ U[0].T)
    else:
        s = U[0] if cov == "diag" else U[0].expand(2)
        cov_true = torch.diag(1 / s**2)
    torch.testing.assert_close(x.mean(0), m.means[0].detach(), atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov_true, atol=0.02, rtol=0.02)


def test_sample_weights_and_generator_reproducibility():
    m = fg.GaussianMixture(3, 2, "diag", n_mixtures=2)
    with torch.no_grad():
        m.logits.copy_(torch.log(torch.tensor([[0.2, 0.3, 0.5], [1.0, 1e-9, 1e-9]])))
    x1, c1 = m.sample(30_000, generator=torch.Generator().manual_seed(3))
    x2, c2 = m.sample(30_000, generator=torch.Generator().manual_seed(3))
    assert x1.shape == (2, 30_000, 2) and c1.shape == (2, 30_000)
    assert torch.equal(x1, x2) and torch.equal(c1, c2)
    freq = torch.bincount(c1[0], minlength=3).double() / 30_000
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), atol=0.01, rtol=0)
    assert torch.all(c1[1] == 0)


@pytest.mark.parametrize("cov", ["diag", "spherical", "full"])
def test_training_by_gradient_descent_fits_data_and_keeps_parameters_valid(cov):
    torch.manual_seed(0)
    data = torch.cat([torch.randn(500, 2) * 0.3 + torch.tensor([2.0, 0.0]),
                      torch.randn(500, 2) * 0.3 - torch.tensor([2.0, 0.0])])
    m = fg.GaussianMixture(2, 2, cov)
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    first = None
    for _ in range(300):
        nll = -m.log_prob(data).mean()
        first = nll.item() if first is None else first
        opt.zero_grad()
        nll.backward()
        opt.step()
    assert nll.item() < first - 1.0
    U = m.prec_chol.detach()
    diag = torch.diagonal(U, dim1=-2, dim2=-1) if cov == "full" else U
    assert torch.all(diag > 0)
    centres = m.means.detach()[:, 0].sort().values
    torch.testing.assert_close(centres, torch.tensor([-2.0, 2.0]), atol=0.15, rtol=0)


def test_module_ngmg_and_repr():
    """The module's log_prob, forward and ngmg_loss are the functional ops on its parameters
    (values against float64, per element), and to_sklearn(index=) is that mixture."""
    from fastgmmdiff import reference

    m = fg.GaussianMixture(3, 4, "full", n_mixtures=2)
    z = torch.randn(2, 5, 4)
    params64 = [t.detach().double() for t in (m.means, m.prec_chol, m.logits)]
    bar = bars(torch.float32).value
    ngmg = m.ngmg_loss(z, reduction="none")
    assert ngmg.shape == (2, 5)
    assert_close_per_element(ngmg, reference.ngmg_loss(z.double(), *params64, "full", reduction="none"), bar, "ngmg")
    lp = m(z)
    assert lp.shape == (2, 5)
    assert_close_per_element(lp, reference.gmm_log_prob(z.double(), *params64, "full"), bar, "log p")
    assert torch.equal(lp, m.log_prob(z))
    assert "n_mixtures=2" in repr(m) and "covariance_type='full'" in repr(m)
    with pytest.raises(ValueError, match="pass index="):
        m.to_sklearn()
    sk = m.to_sklearn(index=1)
    assert sk.means_.shape == (3, 4)
    assert_close_per_element(torch.from_numpy(sk.score_samples(z[1].double().numpy())), lp[1], bar, "sklearn")
    with pytest.raises(ValueError, match="covariance_type"):
        fg.GaussianMixture(2, 2, "banded")


@pytest.mark.parametrize("cov", ["diag", "spherical", "full"])
@pytest.mark.parametrize("G", [None, 3])
def test_state_dict_carries_the_structure(cov, G):
    g = fg.GaussianMixture(4, 3, cov, n_mixtures=G)
    with torch.no_grad():
        g.means.normal_()
    sd = g.state_dict()
    h = fg.GaussianMixture.from_state_dict(sd)
    assert (h.covariance_type, h.n_mixtures, h.n_components, h.n_features) == (cov, G, 4, 3)
    x = torch.randn(3, 5, 3) if G else torch.randn(5, 3)
    assert torch.equal(h.log_prob(x), g.log_prob(x))
    old = {k: v for k, v in sd.items() if k != "_extra_state"}  # saved before the structure was
    assert fg.GaussianMixture.from_state_dict(old).covariance_type == cov
    fg.GaussianMixture(4, 3, cov, n_mixtures=G).load_state_dict(old)
    other = "diag" if cov != "diag" else "full"
    with pytest.raises(ValueError, match=f"covariance_type='{cov}' \\(this module: '{other}'\\)"):
        fg.GaussianMixture(4, 3, other, n_mixtures=G).load_state_dict(sd)
