"""Bad input gets a clear error that names the problem; odd-but-valid input works."""

import pytest
import torch

import fastgmmdiff as fg
from fastgmmdiff.testing import random_problem


def _p(cov="diag", G=None):
    p = random_problem(cov, G, N=5, K=3, D=2)
    return p["x"], p["means"], p["prec_chol"], p["logits"]


@pytest.mark.parametrize("fn", [fg.gmm_log_prob, fg.ngmg_loss])
@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: (a[0][:, :1], *a[1:]), ValueError, r"x must be \[N, D\] or \[G, N, D\] with D = 2.*\(5, 1\)"),
    (lambda a: (a[0][None, None], *a[1:]), ValueError, r"x must be"),
    (lambda a: (a[0], a[1][0], *a[2:]), ValueError, r"means must be \[K, D\]"),
    (lambda a: (a[0], a[1][:0], a[2][:0], a[3][:0]), ValueError, r"K = 0"),
    (lambda a: (a[0], a[1], a[2][:, :1], a[3]), ValueError, r"prec_chol for covariance_type='diag' must be \[K, D\] = \[3, 2\].*\(3, 1\)"),
    (lambda a: (a[0], a[1], a[2], a[3][:2]), ValueError, r"logits must be \[K\] or \[G, K\] with K = 3.*\(2,\)"),
    (lambda a: (a[0].long(), *a[1:]), TypeError, r"x must have a floating dtype, got torch.int64"),
    (lambda a: (a[0], a[1], a[2], a[3].to(torch.complex64)), TypeError, r"logits must have a floating dtype"),
    (lambda a: (a[0].numpy(), *a[1:]), TypeError, r"x must be a torch.Tensor, got ndarray"),
    (lambda a: (a[0].expand(2, 5, 2), a[1].expand(3, 3, 2), *a[2:]), ValueError, r"mixture-batch axis G differs.*x \(2, 5, 2\), means \(3, 3, 2\)"),
    (lambda a: (a[0].to("meta"), *a[1:]), ValueError, r"one device.*x on meta, means on cpu"),
])
def test_shape_dtype_device_errors(fn, mutate, exc, match):
    with pytest.raises(exc, match=match):
        fn(*mutate(_p()))


def test_covariance_type_and_reduction_and_backend_errors():
    a = _p()
    with pytest.raises(ValueError, match=r"covariance_type must be one of 'diag', 'spherical', 'full', 'tied'; got 'diagonal'"):
        fg.gmm_log_prob(*a, "diagonal")
    with pytest.raises(ValueError, match=r"prec_chol for covariance_type='full' must be \[K, D, D\]"):
        fg.gmm_log_prob(*a, "full")
    with pytest.raises(ValueError, match=r"reduction must be one of 'mean', 'sum', 'none'; got 'avg'"):
        fg.ngmg_loss(*a, reduction="avg")
    with pytest.raises(ValueError, match=r"unknown backend 'fast'"):
        fg.gmm_log_prob(*a, backend="fast")


def test_target_errors():
    a = _p()
    with pytest.raises(ValueError, match=r"target holds 3, outside the component range \[0, 3\)"):
        fg.ngmg_loss(*a, target=torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match=r"target holds -1"):
        fg.ngmg_loss(*a, target=torch.tensor([0, -1, 2, 1, 0]))
    with pytest.raises(TypeError, match=r"target must have an integer dtype, got torch.float32"):
        fg.ngmg_loss(*a, target=torch.zeros(5))
    with pytest.raises(ValueError, match=r"target must have shape \(5,\)"):
        fg.ngmg_loss(*a, target=torch.zeros(4, dtype=torch.long))


def test_mixed_dtypes_upcast_to_widest():
    x, m, p, l = _p()
    out = fg.gmm_log_prob(x.half(), m.double(), p, l.bfloat16())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, fg.gmm_log_prob(x.half().double(), m.double(), p.double(), l.bfloat16().double()))


@pytest.mark.parametrize("cov,bad,match", [
    ("diag", lambda a: a[2].index_put_((torch.tensor([1]), torch.tensor([0])), torch.tensor(-0.5)), r"prec_chol\[k=1\] has a non-positive diagonal"),
    ("spherical", lambda a: a[2].index_put_((torch.tensor([2]),), torch.tensor(0.0)), r"prec_chol\[k=2\] has a non-positive diagonal"),
    ("full", lambda a: a[2].index_put_((torch.tensor([0]), torch.tensor([1]), torch.tensor([1])), torch.tensor(-1.0)), r"prec_chol\[k=0\] has a non-positive diagonal"),
    ("full", lambda a: a[2].index_put_((torch.tensor([2]), torch.tensor([0]), torch.tensor([1])), torch.tensor(float("nan"))), r"prec_chol\[k=2\] has a non-finite entry"),
    ("diag", lambda a: a[1].index_put_((torch.tensor([2]), torch.tensor([0])), torch.tensor(float("inf"))), r"means\[k=2\] has a non-finite entry"),
    ("diag", lambda a: a[3].index_put_((torch.tensor([1]),), torch.tensor(float("nan"))), r"logits\[k=1\] is NaN or \+inf"),
    ("diag", lambda a: a[3].fill_(float("-inf")), r"logits of mixture g=0 are all -inf"),
    ("diag", lambda a: a[0].index_put_((torch.tensor([3]), torch.tensor([1])), torch.tensor(float("nan"))), r"x has a NaN coordinate at point n=3"),
])
def test_value_checks_name_the_bad_component(cov, bad, match, monkeypatch):
    a = _p(cov)
    bad(a)
    with pytest.raises(ValueError, match=match):
        fg.gmm_log_prob(*a, cov, validate=True)
    with pytest.raises(ValueError, match=match):
        fg.ngmg_loss(*a, cov, validate=True)
    monkeypatch.setenv("FASTGMMDIFF_VALIDATE", "1")
    with pytest.raises(ValueError, match=match):
        fg.gmm_log_prob(*a, cov)


def test_value_check_names_the_mixture_when_batched():
    x, m, p, l = _p("diag", G=4)
    p[2, 1, 0] = 0.0
    with pytest.raises(ValueError, match=r"prec_chol\[g=2, k=1\]"):
        fg.gmm_log_prob(x, m, p, l, validate=True)


def test_validation_passes_on_good_input_and_allows_disabled_components():
    x, m, p, l = _p()
    l[0] = float("-inf")  # a component with zero weight is legitimate
    out = fg.gmm_log_prob(x, m, p, l, validate=True)
    assert torch.isfinite(out).all()
    from fastgmmdiff import reference

    ref = reference.gmm_log_prob(x.double(), m.double(), p.double(), l.double(), "diag")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)  # and right, not just finite


def test_a_positional_target_gets_a_hint():
    x, m, p, lg = torch.randn(5, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2)
    with pytest.raises(TypeError, match=r"did you mean target=\.\.\.\?"):
        fg.ngmg_loss(x, m, p, lg, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="covariance_type must be a string"):
        fg.gmm_log_prob(x, m, p, lg, torch.zeros(5))
