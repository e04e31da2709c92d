"""The reference trainer's parts: data and checkers, conditioners, aux losses, UNet, samplers."""

import numpy as np
import pytest
import torch

from fastgmmdiff.diffusion import conditioning as C
from fastgmmdiff.diffusion import data
from fastgmmdiff.diffusion.ddpm import GaussianDiffusion
from fastgmmdiff.diffusion.unet import AuxClassifier, UNet


# --- data and checkers --------------------------------------------------------------------

def test_shapes_checker_reads_the_dataset_back(seed):
    """The checker must be right on ≥ 99.5% of the dataset's own images (every feature right
    and the image judged clean), on a fresh seed each run."""
    ds = data.shapes(2000, seed=seed, held_out=())
    feats, clean = data.read_shapes(ds.images)
    right = clean & np.all(feats == ds.labels.numpy(), axis=1)
    assert right.mean() >= 0.995, (right.mean(), np.nonzero(~right)[0][:10])
    # shapes_defective is exactly "not clean or some feature wrong", image by image
    assert np.array_equal(data.shapes_defective(ds.images, ds.labels), ~right)
    assert set(map(tuple, ds.labels.tolist())) == set(ds.combinations())


def test_shapes_checker_flags_defects(seed):
    ds = data.shapes(64, seed=seed, held_out=())
    blank = ds.images.clone()
    blank[:] = ds.images[:, :, :1, :1]                      # background only
    assert data.shapes_defective(blank, ds.labels).all()
    noise = torch.rand(64, 3, 32, 32) * 2 - 1               # no object, no background
    assert data.shapes_defective(noise, ds.labels).all()
    flipped = ds.labels.clone()
    flipped[:, 1] = 1 - flipped[:, 1]                       # wrong colour requested
    assert data.shapes_defective(ds.images, flipped).all()
    two = ds.images.clone()                                 # a second object far from the first
    right = ds.labels[:, 3] == 1
    patch = torch.tensor([0.8, -0.6, -0.8])[:, None, None]
    two[right, :, 3:9, 2:8] = patch
    two[~right, :, 3:9, 24:30] = patch
    assert data.shapes_defective(two, ds.labels).mean() >= 0.9


def test_shapes_deterministic_and_held_out(seed):
    a = data.shapes(50, seed=seed, held_out=("00111", "11010"))
    b = data.shapes(50, seed=seed, held_out=("00111", "11010"))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    seen = set(map(tuple, a.labels.tolist()))
    assert (0, 0, 1, 1, 1) not in seen and (1, 1, 0, 1, 0) not in seen
    assert a.held_out == ((0, 0, 1, 1, 1), (1, 1, 0, 1, 0))
    assert a.images.shape == (50, 3, 32, 32) and a.images.min() >= -1 and a.images.max() <= 1
    with pytest.raises(ValueError, match="5 digits"):
        data.shapes(10, held_out=("0011",))
    with pytest.raises(ValueError, match="feature 2 has 2 values"):
        data.shapes(10, held_out=("00211",))


def test_digits_evaluator():
    ds = data.digits()
    assert ds.images.shape == (1797, 1, 32, 32) and ds.values_per_feature == [10]
    assert data.digits_defective(ds.images, ds.labels).mean() <= 0.05
    wrong = (ds.labels + 1) % 10
    assert data.digits_defective(ds.images, wrong).mean() >= 0.9


# --- conditioners ------------------------------------------------------------------------

def _shapes_conditioner(kind, seed=0, d=4):
    ds = data.shapes(256, seed=seed)
    return C.make_conditioner(kind, ds, d=d, seed=seed, backend="torch"), ds


def test_feature_conditioner_samples_its_components(seed):
    cond, ds = _shapes_conditioner("feature", seed)
    lab = torch.tensor([[0, 1, 0, 1, 1]]).expand(4000, -1)
    c = cond.sample(lab, torch.Generator().manual_seed(seed)).view(4000, 5, 4)
    mu = cond.means[torch.arange(5), lab[0]]
    assert torch.allclose(c.mean(0), mu, atol=0.05)
    assert torch.allclose(c.std(0), torch.full_like(mu, cond.sigma), rtol=0.08)
    assert torch.allclose(cond.means.norm(dim=-1), torch.full((5, 2), 1.5))
    assert torch.allclose(cond.means[:, 0], -cond.means[:, 1])  # binary: antipodal
    # unspecified feature: value drawn by training frequency
    un = lab.clone()
    un[:, 2] = -1
    c = cond.sample(un, torch.Generator().manual_seed(seed)).view(4000, 5, 4)
    near1 = ((c[:, 2] - cond.means[2, 1]).norm(dim=-1) < (c[:, 2] - cond.means[2, 0]).norm(dim=-1)).float().mean()
    freq1 = float(ds.value_frequencies()[2][1])
    assert abs(float(near1) - freq1) < 0.04
    with pytest.raises(ValueError, match="labels must be"):
        cond.sample(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        cond.sample(torch.full((3, 5), 2))


def test_class_conditioner_unseen_combination(seed):
    cond, ds = _shapes_conditioner("class", seed)
    seen = ds.seen_combinations()
    assert len(cond.combos) == len(seen) <= 28
    unseen = torch.tensor([[0, 0, 1, 1, 1]])
    with pytest.raises(ValueError, match="never seen in training"):
        cond.sample(unseen)
    a = cond.sample(unseen.expand(8000, -1), torch.Generator().manual_seed(1), allow_unseen=True)
    b = cond.sample(unseen.expand(8000, -1), torch.Generator().manual_seed(2), allow_unseen=True)
    assert torch.allclose(a.mean(0), b.mean(0), atol=0.06)  # one fixed fresh component
    assert abs(float(a.mean(0).norm()) - 1.5 * 5 ** 0.5) < 0.1       # the norm of a feature condition
    assert torch.allclose(cond.means.norm(dim=-1), torch.full((len(seen),), 1.5 * 5 ** 0.5))
    i = cond.class_index(torch.tensor([seen[0]]))
    c = cond.sample(torch.tensor([seen[0]]).expand(2000, -1), torch.Generator().manual_seed(0))
    assert torch.allclose(c.mean(0), cond.means[i[0]], atol=0.06)
    # unspecified features: a seen class that agrees with the specified ones, by frequency
    sharp = C.make_conditioner("class", ds, d=4, seed=seed, sigma=0.01)
    part = torch.tensor([[seen[0][0], -1, -1, -1, -1]]).expand(2000, -1)
    nearest = torch.cdist(sharp.sample(part, torch.Generator().manual_seed(0)), sharp.means).argmin(-1)
    assert bool((sharp.combos[nearest, 0] == seen[0][0]).all())
    counts = torch.bincount(nearest, minlength=len(seen)).double()
    w = sharp.logits.exp() * (sharp.combos[:, 0] == seen[0][0])
    assert float((counts / 2000 - w / w.sum()).abs().max()) < 0.04


@pytest.mark.parametrize("kind", ["feature", "class"])
def test_aux_losses_match_their_definitions(kind, seed):
    cond, ds = _shapes_conditioner(kind, seed, d=3)
    lab = ds.labels[:40]
    z = (1.5 * torch.randn(40, cond.dim, dtype=torch.float64)).requires_grad_()
    ngmg = cond.aux_loss(z, lab, "ngmg")
    bce = cond.aux_loss(z, lab, "bce")
    sig = cond.sigma
    if kind == "feature":
        zf = z.view(40, 5, 3)
        mu = cond.means.double()[torch.arange(5), lab]                    # [40, 5, 3]
        expect = -torch.exp(-0.5 * ((zf - mu) ** 2).sum(-1) / sig**2).mean(1)
        # binary cross-entropy with the posterior log-odds of value 1
        sq = ((zf.unsqueeze(2) - cond.means.double()) ** 2).sum(-1)         # [40, 5, 2]
        lo = (cond.logits[:, 1] - cond.logits[:, 0]).double() - 0.5 * (sq[..., 1] - sq[..., 0]) / sig**2
        expect_bce = torch.nn.functional.binary_cross_entropy_with_logits(
            lo, lab.double(), reduction="none").mean(1)
    else:
        mu = cond.means.double()[cond.class_index(lab)]
        expect = -torch.exp(-0.5 * ((z - mu) ** 2).sum(-1) / sig**2)
        logits = cond.logits.double() - 0.5 * torch.cdist(z, cond.means.double()) ** 2 / sig**2
        expect_bce = torch.nn.functional.cross_entropy(logits, cond.class_index(lab), reduction="none")
    torch.testing.assert_close(ngmg, expect)
    torch.testing.assert_close(bce, expect_bce)
    g, = torch.autograd.grad(ngmg.sum(), z)
    g_ref, = torch.autograd.grad(expect.sum(), z)
    torch.testing.assert_close(g, g_ref)
    # multi-scale: Σ_s s·(the same with σ·s) / Σ s
    ms = cond.aux_loss(z, lab, "ngmg-ms")
    expect_ms = 0
    for s in C.MULTI_SCALE:
        ss = sig * s
        if kind == "feature":
            expect_ms = expect_ms - s * torch.exp(-0.5 * ((zf - mu) ** 2).sum(-1) / ss**2).mean(1)
        else:
            expect_ms = expect_ms - s * torch.exp(-0.5 * ((z - mu) ** 2).sum(-1) / ss**2)
    torch.testing.assert_close(ms, expect_ms / sum(C.MULTI_SCALE))
    with pytest.raises(ValueError, match="aux loss"):
        cond.aux_loss(z, lab, "mse")


def test_aux_classifier_experiment_runs_resumes_and_reports(tmp_path):
    """A tiny grid (2 steps per run): one JSON per run, reused on a rerun, and the table."""
    from fastgmmdiff.experiments import aux_classifier as A

    argv = ["--datasets", "shapes", "--losses", "bce", "ngmg-ms", "--flip", "0", "0.4", "--inputs", "noisy",
            "--seeds", "0", "--steps", "2", "--out", str(tmp_path)]
    A.main(argv)
    runs = sorted((tmp_path / "runs").glob("*.json"))
    assert len(runs) == 4
    stamp = [r.stat().st_mtime_ns for r in runs]
    A.main(argv)
    assert [r.stat().st_mtime_ns for r in runs] == stamp  # reused, not rerun
    table = (tmp_path / "aux_classifier.md").read_text()
    assert table.count("| shapes | noisy |") == 4 and "ngmg-ms" in table
    rec = __import__("json").loads(runs[0].read_text())
    assert set(rec["accuracy"]) == {"0", "100", "250", "500"} and len(rec["accuracy"]["0"]) == 5
    flipped = A._flip(torch.zeros(10000, 2, dtype=torch.long), [10, 2], 0.4, torch.Generator().manual_seed(0))
    assert abs(float((flipped[:, 0] != 0).double().mean()) - 0.4) < 0.03 and bool((flipped[:, 1] == 0).all())


# --- networks and samplers ------------------------------------------------------------------

def test_unet_and_classifier_shapes():
    net = UNet(3, 8, (1, 2), cond_dim=10)
    x = torch.randn(2, 3, 32, 32)
    out = net(x, torch.tensor([0, 999]), torch.randn(2, 10))
    assert out.shape == x.shape and torch.all(out == 0)  # zero-initialised output layer
    with pytest.raises(ValueError, match="pass cond"):
        net(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="multiple of patch"):
        net(torch.randn(1, 3, 31, 31), torch.tensor([1]), torch.randn(1, 10))
    assert AuxClassifier(1, 7, base=8)(torch.randn(3, 1, 32, 32)).shape == (3, 7)


class _Oracle(torch.nn.Module):
    """The exact ε (or v) prediction for a data distribution that is a single image x*."""

    def __init__(self, diffusion_ref, target):
        super().__init__()
        self.d, self.target = diffusion_ref, target

    def forward(self, x, t, cond):
        d = self.d[0]
        a, s = d._at(d.sqrt_ab, t), d._at(d.sqrt_1m_ab, t)
        eps = (x - a * self.target) / s
        return eps if d.prediction == "eps" else a * eps - s * self.target


@pytest.mark.parametrize("prediction", ["v", "eps"])
@pytest.mark.parametrize("steps", [None, 20])
def test_samplers_recover_a_point_mass(steps, prediction, seed):
    """With the exact ε (v) for a one-image data distribution, ancestral DDPM and DDIM both end
    at that image (up to the clamp of x̂₀ and the last step's noise-free mean)."""
    target = torch.rand(1, 3, 32, 32) * 1.6 - 0.8
    diff = GaussianDiffusion(torch.nn.Identity(), timesteps=100, prediction=prediction)
    oracle = _Oracle([diff], target)
    x = diff.sample(None, (2, 3, 32, 32), steps=steps, generator=torch.Generator().manual_seed(seed), model=oracle)
    torch.testing.assert_close(x, target.expand(2, -1, -1, -1), atol=1e-4, rtol=0)


def test_schedule_and_x0_prediction(seed):
    diff = GaussianDiffusion(torch.nn.Identity(), timesteps=1000)
    ab = diff.alphas_cumprod
    assert ab[0] > 0.999 and ab[-1] < 1e-4 and bool((ab[1:] < ab[:-1]).all())
    x0 = torch.randn(5, 3, 32, 32)
    t = torch.randint(0, 1000, (5,))
    eps = torch.randn_like(x0)
    # x̂₀ = (x_t − √(1−ᾱ) ε)/√ᾱ cancels in float32: its rounding, u·(|x_t| + √(1−ᾱ)|ε|)/√ᾱ, reaches
    # 2e-3 at the last steps (ᾱ ~ 1e-8), so the bound is that per element, not a fixed atol
    x_t = diff.q_sample(x0, t, eps)
    a, s = diff.sqrt_ab[t][:, None, None, None], diff.sqrt_1m_ab[t][:, None, None, None]
    bound = 1e-5 * x0.abs() + 4 * torch.finfo(torch.float32).eps * (x_t.abs() + s * eps.abs()) / a + 1e-6
    assert bool(((diff.predict_x0(x_t, t, eps) - x0).abs() <= bound).all())
    v = diff.sqrt_ab[t][:, None, None, None] * eps - diff.sqrt_1m_ab[t][:, None, None, None] * x0
    x0_v, eps_v = diff.x0_eps(diff.q_sample(x0, t, eps), t, v)
    torch.testing.assert_close(x0_v, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eps_v, eps, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="schedule"):
        GaussianDiffusion(torch.nn.Identity(), schedule="sqrt")
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(torch.nn.Identity(), prediction="x0")


def test_defects_table_gives_the_mean_and_its_confidence_interval():
    """Student's t over seeds: mean 0.75, sd 0.05, n = 3 → ± t(0.975, 2)·0.05/√3 = ± 0.124."""
    import numpy as np

    from fastgmmdiff.experiments.defects import _mean_ci, summarize

    assert _mean_ci(np.array([0.7, 0.8, 0.75])) == "0.750 [0.626, 0.874]"
    assert _mean_ci(np.array([0.4])) == "0.400"
    reps = [dict(conditioning="feature", aux="ngmg-ms", seen=0.5, held_out=0.6, feature_error_seen=0.1,
                 feature_error_held_out=0.2, seed=s) for s in range(3)]
    assert "| feature | ngmg-ms | 3 | 0.500 [0.500, 0.500] |" in summarize(reps)
    # rates: the interval is clipped to [0, 1] (0.9 ± 0.248 → [0.652, 1.000])
    assert _mean_ci(np.array([0.8, 1.0, 0.9])) == "0.900 [0.652, 1.000]"


def test_defects_contrasts_give_welch_intervals():
    """feature − class: means 0.75 and 0.95, sds 0.05 and 0.1, n = 3 each: se = √(0.05²/3 +
    0.1²/3) = 0.06455, Welch dof = 2.941, t(0.975, 2.941) = 3.2188 → −0.200 ± 0.2078."""
    import numpy as np

    from fastgmmdiff.experiments.defects import _diff_ci, contrasts

    a, b = np.array([0.7, 0.8, 0.75]), np.array([0.85, 1.05, 0.95])
    assert _diff_ci(a, b) == "-0.200 [-0.408, +0.008]"
    assert _diff_ci(a, b - 0.1) == "-0.100 [-0.308, +0.108]"
    assert _diff_ci(np.array([0.2, 0.3, 0.25]), b) == "-0.700 [-0.908, -0.492]*"
    assert _diff_ci(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == "+0.000"
    reps = [dict(conditioning=c, aux="none", seen=v, held_out=v, feature_error_seen=v, feature_error_held_out=v)
            for c, vals in (("feature", a), ("class", b)) for v in vals]
    table = contrasts(reps)
    assert "| feature − class, aux none | -0.200 [-0.408, +0.008] |" in table
    assert contrasts(reps[:1] + reps[3:]) == ""  # one feature seed: no interval, no row
