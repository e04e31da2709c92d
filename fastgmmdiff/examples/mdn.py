"""A mixture-density network on fastgmmdiff: a small MLP maps an input u ∈ [−1, 1] to a Gaussian
mixture over y ∈ R² (``MixtureOfGaussians``), trained by maximum likelihood on generated data
whose conditional density p(y | u) has three modes that turn and spread with u.

The data's true conditional density is itself a mixture, so the example can say how close the
fit is: it prints the held-out negative log-likelihood of the network next to the true density's
(the gap is KL(p_true ‖ p_model) averaged over u, ≥ 0), and writes a figure of the true and the
fitted density at a few inputs (matplotlib: ``pip install fastgmmdiff[experiments]``).

    python -m fastgmmdiff.examples.mdn                      # 1500 steps, mdn.png
    python -m fastgmmdiff.examples.mdn --steps 300 --out -  # no figure

The loss line is the whole of the switch from ``torch.distributions``::

    mix = MixtureOfGaussians(logits, loc, scale=scale)   # was MixtureSameFamily(Categorical(...), Independent(Normal(...), 1))
    loss = -mix.log_prob(y).mean()                        # y [B, 2] under B mixtures: [B]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

from ..distributions import MixtureOfGaussians

MODES = 3
NOISE = 0.08


def true_mixture(u: torch.Tensor) -> MixtureOfGaussians:
    """p(y | u): three modes on a circle of radius 1 + u/2, turned by πu/2, with σ growing with
    |u| and weights tilted by u."""
    j = torch.arange(MODES, dtype=u.dtype, device=u.device)
    angle = 2 * math.pi * j / MODES + 0.5 * math.pi * u[:, None]
    radius = 1.0 + 0.5 * u[:, None]
    loc = torch.stack([radius * angle.cos(), radius * angle.sin()], -1)  # [B, 3, 2]
    scale = (NOISE * (1 + u.abs()))[:, None, None].expand(-1, MODES, 1)  # one σ per component
    logits = torch.stack([u, -u, torch.zeros_like(u)], -1)
    return MixtureOfGaussians(logits, loc, scale=scale, validate_args=False)


def make_data(n: int, generator: torch.Generator):
    u = 2 * torch.rand(n, generator=generator) - 1
    return u, true_mixture(u).sample(generator=generator)


class MDN(nn.Module):
    """u [B] → a K-component diagonal Gaussian mixture over R² per row."""

    def __init__(self, K: int = 8, hidden: int = 64, D: int = 2):
        super().__init__()
        self.K, self.D = K, D
        self.body = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, K * (1 + 2 * D))

    def forward(self, u: torch.Tensor, backend: str = "auto") -> MixtureOfGaussians:
        h = self.head(self.body(u[:, None]))
        logits, loc, log_scale = h.split([self.K, self.K * self.D, self.K * self.D], -1)
        B = u.shape[0]
        scale = nn.functional.softplus(log_scale).view(B, self.K, self.D) + 1e-3
        return MixtureOfGaussians(logits, loc.view(B, self.K, self.D), scale=scale, validate_args=False,
                                  backend=backend)


def train(steps: int = 1500, batch: int = 512, K: int = 8, lr: float = 3e-3, seed: int = 0,
          backend: str = "auto", log=print):
    """Fit an MDN; returns (model, history of (step, held-out NLL), true NLL on the held-out set)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    u_val, y_val = make_data(4096, gen)
    true_nll = -true_mixture(u_val).log_prob(y_val).mean().item()
    model = MDN(K)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    history = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        u, y = make_data(batch, gen)
        loss = -model(u, backend).log_prob(y).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, steps // 10) == 0 or step == steps:
            with torch.no_grad():
                val = -model(u_val, backend).log_prob(y_val).mean().item()
            history.append((step, val))
            log(f"step {step:5d}  train NLL {loss.item():7.4f}  held-out NLL {val:7.4f}  "
                f"(true density {true_nll:.4f})  {1e3 * (time.perf_counter() - t0) / step:.2f} ms/step")
    return model, history, true_nll


def plot(model: MDN, path: str, inputs=(-0.8, 0.0, 0.8), backend: str = "auto") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = 2.0
    g = torch.linspace(-lim, lim, 200)
    yy = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    fig, axes = plt.subplots(2, len(inputs), figsize=(3.2 * len(inputs), 6.4), squeeze=False)
    for col, u0 in enumerate(inputs):
        u = torch.tensor([u0])
        with torch.no_grad():
            # one mixture (batch [1]), the grid's points broadcast against it: [40000, 1]
            dens = {"true p(y | u)": true_mixture(u).log_prob(yy[:, None]).exp(),
                    "MDN fit": model(u, backend).log_prob(yy[:, None]).exp()}
        for row, (title, d) in enumerate(dens.items()):
            ax = axes[row, col]
            ax.imshow(d.reshape(200, 200).numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap="magma")
            ax.set_title(f"{title}, u = {u0:g}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=1500, help="training steps")
    ap.add_argument("--batch", type=int, default=512, help="rows per step")
    ap.add_argument("--components", type=int, default=8, help="mixture components of the network's output")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data and the network")
    ap.add_argument("--backend", default="auto", help="fastgmmdiff backend of log_prob")
    ap.add_argument("--out", default="mdn.png", help="figure path ('-': no figure)")
    args = ap.parse_args(argv)
    if args.out != "-":
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            ap.error("the figure needs matplotlib: pip install 'fastgmmdiff[experiments]', or pass --out -")
    model, history, true_nll = train(args.steps, args.batch, args.components, seed=args.seed, backend=args.backend)
    print(f"held-out NLL {history[-1][1]:.4f} against the true density's {true_nll:.4f} "
          f"(gap {history[-1][1] - true_nll:.4f} nats: KL(true ‖ fit) averaged over u)")
    if args.out != "-":
        plot(model, args.out, backend=args.backend)
        print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
