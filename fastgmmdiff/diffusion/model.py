"""The trained system: denoiser + diffusion schedule + conditioner (+ auxiliary classifier).

``DiffusionSystem.forward(x0, labels, generator)`` returns the training losses (the object DDP
wraps).  With an auxiliary classifier (``aux`` = ``"ngmg"`` or ``"bce"``):

    loss = denoise + aux(classifier(x0), labels) + λ · mean_b[ᾱ_{t_b} · aux(classifier(x̂₀_b), labels_b)]

The first aux term trains the classifier on real images.  The second — the NGMG (or CE) of the
predicted clean image under the requested values' components — trains only the denoiser: the
classifier is read with detached parameters there.  It is weighted by ᾱ_t so that the
near-pure-noise steps, whose x̂₀ is a blur, do not dominate it.
"""

from __future__ import annotations

import torch
from torch import nn

from .conditioning import AUX_KINDS
from .ddpm import GaussianDiffusion
from .data import SIZE
from .unet import AuxClassifier, UNet


class DiffusionSystem(nn.Module):
    def __init__(self, conditioner, channels: int, *, base: int = 32, mults=(1, 2, 2), patch: int = 2,
                 timesteps: int = 1000, schedule: str = "cosine", aux: str = "none",
                 aux_weight: float = 0.1, classifier_base: int = 16):
        super().__init__()
        if aux not in AUX_KINDS:
            raise ValueError(f"aux must be one of {AUX_KINDS}, got {aux!r}")
        if aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {aux_weight}")
        self.conditioner = conditioner
        self.diffusion = GaussianDiffusion(UNet(channels, base, mults, conditioner.dim, patch), timesteps, schedule)
        self.aux = aux
        self.aux_weight = aux_weight
        self.classifier = AuxClassifier(channels, conditioner.dim, classifier_base) if aux != "none" else None

    @property
    def denoiser(self) -> nn.Module:
        return self.diffusion.model

    def forward(self, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None):
        cond = self.conditioner.sample(labels, generator)
        mse, x0_hat, t = self.diffusion.loss(x0, cond, generator)
        out = {"denoise": mse.mean()}
        total = out["denoise"]
        if self.classifier is not None:
            out["aux_real"] = self.conditioner.aux_loss(self.classifier(x0).float(), labels, self.aux).mean()
            frozen = {n: p.detach() for n, p in self.classifier.named_parameters()}
            z_hat = torch.func.functional_call(self.classifier, frozen, (x0_hat.clamp(-1, 1).to(x0.dtype),))
            w = self.diffusion.alphas_cumprod[t]
            out["aux_guide"] = (w * self.conditioner.aux_loss(z_hat.float(), labels, self.aux)).mean()
            total = total + out["aux_real"] + self.aux_weight * out["aux_guide"]
        out["loss"] = total
        return out

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, *, steps: int | None = 50, generator=None, denoiser=None,
               allow_unseen: bool = False) -> torch.Tensor:
        """Images for requested ``labels [B, F]`` (−1 = unspecified), in [−1, 1]."""
        labels = labels.to(self.conditioner.means.device)
        if self.conditioner.kind == "class":
            cond = self.conditioner.sample(labels, generator, allow_unseen=allow_unseen)
        else:
            cond = self.conditioner.sample(labels, generator)
        ch = self.denoiser.channels
        return self.diffusion.sample(cond, (labels.shape[0], ch, SIZE, SIZE), steps=steps,
                                     generator=generator, model=denoiser)
