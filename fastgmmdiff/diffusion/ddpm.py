"""DDPM noise schedule, the ε-prediction loss and the ancestral and DDIM samplers.

``GaussianDiffusion`` owns its schedule as buffers (so ``.to(device)`` and checkpoints carry it)
and its ``loss`` returns the per-sample denoising loss together with the predicted clean image
x̂₀, which the auxiliary NGMG term reads.  The network predicts v = √ᾱ_t ε − √(1−ᾱ_t) x₀
(``prediction="v"``, the default: Salimans & Ho 2022; x̂₀ = √ᾱ_t x_t − √(1−ᾱ_t) v̂ stays well
conditioned at every t, which matters for a small model trained briefly) or ε
(``prediction="eps"``: x̂₀ = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t).  Every random draw takes an
explicit ``torch.Generator`` so training and sampling replay exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def cosine_betas(T: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule (β clipped at 0.999), float64."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


def linear_betas(T: int) -> torch.Tensor:
    scale = 1000.0 / T
    return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)


SCHEDULES = {"cosine": cosine_betas, "linear": linear_betas}


class GaussianDiffusion(nn.Module):
    """A DDPM around a denoiser ``model(x_t, t, cond)``: the noise schedule, the training loss
    and the samplers (module docstring).

    Args:
        model: the network; called as ``model(x_t, t, cond)`` with x_t ``[B, C, H, W]``, integer
            timesteps t ``[B]`` and the condition ``cond``; it predicts v or ε (``prediction``).
        timesteps: T, the number of diffusion steps (≥ 2).
        schedule: ``"cosine"`` (Nichol & Dhariwal) or ``"linear"`` (Ho et al., scaled to T).
        prediction: ``"v"`` (default) or ``"eps"``.

    ``loss(x0, cond, generator)`` returns ``(per-sample MSE [B], x̂₀, t)``; ``sample(cond, shape,
    steps=..., eta=..., generator=...)`` returns images in [−1, 1] (DDIM, or ancestral DDPM with
    ``steps=None``).  The schedule is kept as (non-persistent) buffers, so ``.to(device)``
    moves it.
    """

    def __init__(self, model: nn.Module, timesteps: int = 1000, schedule: str = "cosine",
                 prediction: str = "v"):
        super().__init__()
        if prediction not in ("v", "eps"):
            raise ValueError(f"prediction must be 'v' or 'eps', got {prediction!r}")
        self.prediction = prediction
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
        if timesteps < 2:
            raise ValueError(f"timesteps must be >= 2, got {timesteps}")
        self.model = model
        self.T = timesteps
        betas = SCHEDULES[schedule](timesteps)
        ab = torch.cumprod(1 - betas, 0)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        reg = lambda name, v: self.register_buffer(name, v.float(), persistent=False)  # noqa: E731
        reg("betas", betas)
        reg("alphas_cumprod", ab)
        reg("sqrt_ab", ab.sqrt())
        reg("sqrt_1m_ab", (1 - ab).sqrt())
        reg("post_var", betas * (1 - ab_prev) / (1 - ab))
        reg("post_c0", betas * ab_prev.sqrt() / (1 - ab))
        reg("post_ct", (1 - ab_prev) * (1 - betas).sqrt() / (1 - ab))

    @staticmethod
    def _at(buf, t):
        return buf[t][:, None, None, None]

    def q_sample(self, x0, t, noise):
        return self._at(self.sqrt_ab, t) * x0 + self._at(self.sqrt_1m_ab, t) * noise

    def predict_x0(self, x_t, t, eps):
        """x̂₀ from an ε prediction."""
        return (x_t - self._at(self.sqrt_1m_ab, t) * eps) / self._at(self.sqrt_ab, t)

    def x0_eps(self, x_t, t, out):
        """(x̂₀, ε̂) from the network's output."""
        if self.prediction == "eps":
            return self.predict_x0(x_t, t, out), out
        a, s = self._at(self.sqrt_ab, t), self._at(self.sqrt_1m_ab, t)
        return a * x_t - s * out, s * x_t + a * out

    def loss(self, x0, cond, generator: torch.Generator | None = None):
        """Draw t and ε, return ``(per-sample MSE [B], x̂₀, t)``."""
        B = x0.shape[0]
        t = torch.randint(0, self.T, (B,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.q_sample(x0, t, noise)
        out = self.model(x_t, t, cond).float()
        if self.prediction == "eps":
            target = noise.float()
        else:
            target = self._at(self.sqrt_ab, t) * noise.float() - self._at(self.sqrt_1m_ab, t) * x0.float()
        mse = (out - target).pow(2).flatten(1).mean(1)
        return mse, self.x0_eps(x_t, t, out)[0], t

    @torch.no_grad()
    def sample(self, cond, shape, *, steps: int | None = None, eta: float = 0.0,
               generator: torch.Generator | None = None, model: nn.Module | None = None):
        """DDIM with ``steps`` evenly spaced steps (``eta`` = 0: deterministic given x_T), or,
        with ``steps=None``, ancestral DDPM sampling through all T steps.  Returns x̂₀ in [−1, 1]."""
        model = model or self.model
        dev = self.betas.device
        x = torch.randn(shape, device=dev, generator=generator)
        if steps is None:
            for i in reversed(range(self.T)):
                t = torch.full((shape[0],), i, device=dev, dtype=torch.long)
                x0 = self.x0_eps(x, t, model(x, t, cond).float())[0].clamp(-1, 1)
                mean = self._at(self.post_c0, t) * x0 + self._at(self.post_ct, t) * x
                if i > 0:
                    noise = torch.randn(shape, device=dev, generator=generator)
                    x = mean + self._at(self.post_var, t).sqrt() * noise
                else:
                    x = mean
            return x.clamp(-1, 1)
        if not 1 <= steps <= self.T:
            raise ValueError(f"steps must be in [1, {self.T}], got {steps}")
        ts = torch.linspace(self.T - 1, 0, steps, dtype=torch.float64).round().long().tolist()
        for j, i in enumerate(ts):
            t = torch.full((shape[0],), i, device=dev, dtype=torch.long)
            x0 = self.x0_eps(x, t, model(x, t, cond).float())[0].clamp(-1, 1)
            eps = (x - self._at(self.sqrt_ab, t) * x0) / self._at(self.sqrt_1m_ab, t)
            ab_prev = self.alphas_cumprod[ts[j + 1]] if j + 1 < len(ts) else x.new_tensor(1.0)
            ab = self.alphas_cumprod[i]
            sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).clamp(min=0).sqrt()
            x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
            if eta > 0 and j + 1 < len(ts):
                x = x + sigma * torch.randn(shape, device=dev, generator=generator)
        return x.clamp(-1, 1)
