"""The README's quick example runs and shows what its comments say."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _example(heading: str = "## Quick example") -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _quick_example() -> str:
    return _example()


def test_quick_example_shows_the_pull_working():
    ns: dict = {}
    exec(compile(_quick_example(), "README.md (quick example)", "exec"), ns)
    loss, z, means, labels, sigma = (ns[k] for k in ("loss", "z", "means", "labels", "sigma"))
    assert abs(loss.item() / 256 - (-0.40)) < 0.02  # "−0.40: mean p̃ ≈ 0.4"
    toward = torch.cosine_similarity(-z.grad, means[labels] - z.detach())
    assert toward.min() > 0.9999  # "1.0: every point pulled toward its centre"
    norms = z.grad.norm(dim=1)
    assert abs(norms.median().item() - 0.26) < 0.01  # "0.26"
    assert norms.max() <= math.exp(-0.5) / sigma * (1 + 1e-6)  # "within the bound e^{−1/2}/σ"
    assert ns["logp"].shape == (256,)


def test_distributions_example_matches_mixture_same_family():
    ns: dict = {}
    exec(compile(_example("## From torch.distributions"), "README.md (torch.distributions)", "exec"), ns)
    D, mix, y = ns["D"], ns["mix"], ns["y"]
    ref = D.MixtureSameFamily(D.Categorical(logits=ns["logits"]), D.Independent(D.Normal(ns["loc"], ns["scale"]), 1))
    assert mix.log_prob(y).shape == (512,)
    torch.testing.assert_close(mix.log_prob(y), ref.log_prob(y), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(ns["loss"])


def test_env_sh_rebuilds_on_every_switch_setup_py_reads():
    """scripts/env.sh reuses the built extension unless its build key changes: the key must
    hold every FASTGMMDIFF_* switch setup.py reads, and no run-time one (FASTGMMDIFF_TEST_PACKAGING
    is set by .ci/run only, so keying on it rebuilt the extension between CI and the trainer)."""
    setup_vars = set(re.findall(r"FASTGMMDIFF_[A-Z_]+", (ROOT / "setup.py").read_text()))
    env = (ROOT / "scripts" / "env.sh").read_text()
    block = env[env.index("build_key="):env.index("print(h.hexdigest())")]
    keyed = set(re.findall(r'"(FASTGMMDIFF_[A-Z_]+)"', block))
    assert setup_vars and keyed == setup_vars
