"""SPEC §2's "parallel lines": why the NGMG behaves like a Wasserstein cost.

Target: K Gaussian components (σ = 0.1) spread along the segment {0}×[0, 1] in R².
Model: samples on {θ}×[0, 1].  For each θ this prints the NGMG loss L(θ) = −mean p̃(z) and
dL/dθ next to the negative log-likelihood and its derivative:

* L(θ) is finite and continuous, grows with |θ|, and dL/dθ points toward θ = 0 and stays
  below the bound max_k ‖U_k‖₂ e^{−1/2} = e^{−1/2}/σ for every θ;
* the NLL's derivative grows like θ/σ² (a far sample pulls hardest), and once the distance
  overflows (θ = 1e20 in float32) it is −inf with no gradient at all; the NGMG there is 0
  with a zero gradient.

    python -m fastgmmdiff.examples.parallel_lines
"""

from __future__ import annotations

import math

import torch

from .. import gmm_log_prob, ngmg_loss


def evaluate(theta: float, n: int = 64, K: int = 11, sigma: float = 0.1, dtype=torch.float32):
    means = torch.stack([torch.zeros(K), torch.linspace(0, 1, K)], -1).to(dtype)
    prec = torch.full((K,), 1.0 / sigma, dtype=dtype)
    logits = torch.zeros(K, dtype=dtype)
    th = torch.tensor(theta, dtype=dtype, requires_grad=True)
    z = torch.stack([th.expand(n), torch.linspace(0, 1, n, dtype=dtype)], -1)
    loss = ngmg_loss(z, means, prec, logits, "spherical")
    (g_loss,) = torch.autograd.grad(loss, th)
    nll = -gmm_log_prob(z, means, prec, logits, "spherical").mean()
    (g_nll,) = torch.autograd.grad(nll, th)
    return loss.item(), g_loss.item(), nll.item(), g_nll.item()


def main():
    sigma = 0.1
    print(f"bound on |dL/dθ|: e^(-1/2)/σ = {math.exp(-0.5) / sigma:.3f}")
    print("| θ | NGMG L(θ) | dL/dθ | NLL(θ) | dNLL/dθ |")
    print("|---|---|---|---|---|")
    for t in (0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 3.0, 10.0, 100.0, 1e20):
        L, gL, nll, gn = evaluate(t, sigma=sigma)
        print(f"| {t:g} | {L:.4g} | {gL:.4g} | {nll:.4g} | {gn:.4g} |")


if __name__ == "__main__":
    main()
