"""A small UNet noise predictor: ε̂(x_t, t, c).

Sinusoidal timestep embedding → MLP; the condition vector c enters through its own MLP whose
output is *added* to the timestep embedding (SPEC §3), and that sum modulates every residual
block.  The image is first folded into ``patch × patch`` pixel blocks (pixel-unshuffle: 32×32×3
→ 16×16×12 for ``patch=2``) and unfolded at the end, which cuts the cost 4× on a CPU; levels
then halve the resolution (16 → 8 → 4 by default); skip connections concatenate.  Two
coordinate channels (x and y in [−1, 1]) join the input, so that absolute position — one of the
``shapes`` features — is as easy to read as local structure.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer (or real) timesteps, ``[B] → [B, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    a = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(a), torch.sin(a)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _groups(ch: int) -> int:
    for g in (8, 4, 2, 1):
        if ch % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class UNet(nn.Module):
    """``UNet(channels, base=32, mults=(1, 2, 2), cond_dim=None, patch=2)``; ``forward(x, t, cond=None)``."""

    def __init__(self, channels: int = 3, base: int = 32, mults=(1, 2, 2), cond_dim: int | None = None,
                 patch: int = 2):
        super().__init__()
        if patch < 1:
            raise ValueError(f"patch must be >= 1, got {patch}")
        self.patch = patch
        self.channels = channels
        emb_dim = 4 * base
        self.base = base
        self.time_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_mlp = (nn.Sequential(nn.Linear(cond_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                         if cond_dim else None)
        self.inp = nn.Conv2d(channels * patch * patch + 2, base, 3, padding=1)
        chs = [base * m for m in mults]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c = base
        skips = []
        for i, co in enumerate(chs):
            self.down.append(ResBlock(c, co, emb_dim))
            skips.append(co)
            c = co
            self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1) if i < len(chs) - 1 else nn.Identity())
        self.mid1 = ResBlock(c, c, emb_dim)
        self.mid2 = ResBlock(c, c, emb_dim)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, co in reversed(list(enumerate(chs))):
            self.up.append(ResBlock(c + skips[i], co, emb_dim))
            c = co
            self.upsample.append(nn.Conv2d(c, c, 3, padding=1) if i > 0 else nn.Identity())
        self.out_norm = nn.GroupNorm(_groups(c), c)
        self.out = nn.Conv2d(c, channels * patch * patch, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, t, cond=None):
        emb = self.time_mlp(timestep_embedding(t, self.base))
        if self.cond_mlp is not None:
            if cond is None:
                raise ValueError("this UNet is conditional: pass cond")
            emb = emb + self.cond_mlp(cond.to(emb.dtype))
        if x.shape[-1] % self.patch or x.shape[-2] % self.patch:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of patch={self.patch}")
        h = F.pixel_unshuffle(x, self.patch) if self.patch > 1 else x
        H, W = h.shape[-2:]
        ys = torch.linspace(-1, 1, H, device=x.device, dtype=h.dtype)[:, None].expand(H, W)
        xs = torch.linspace(-1, 1, W, device=x.device, dtype=h.dtype)[None, :].expand(H, W)
        h = self.inp(torch.cat([h, torch.stack([xs, ys]).expand(h.shape[0], -1, -1, -1)], dim=1))
        hs = []
        for block, down in zip(self.down, self.downsample):
            h = block(h, emb)
            hs.append(h)
            h = down(h)
        h = self.mid2(self.mid1(h, emb), emb)
        for block, up in zip(self.up, self.upsample):
            skip = hs.pop()
            if h.shape[-1] != skip.shape[-1]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), emb)
            if not isinstance(up, nn.Identity):
                h = up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.out(F.silu(self.out_norm(h)))
        return F.pixel_shuffle(h, self.patch) if self.patch > 1 else h


class AuxClassifier(nn.Module):
    """Image → R^{out_dim} (the GMM latent of SPEC §3): a small strided CNN."""

    def __init__(self, channels: int, out_dim: int, base: int = 32):
        super().__init__()
        c = base
        self.net = nn.Sequential(
            nn.Conv2d(channels, c, 3, padding=1), nn.GroupNorm(_groups(c), c), nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.GroupNorm(_groups(2 * c), 2 * c), nn.SiLU(),
            nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), nn.GroupNorm(_groups(2 * c), 2 * c), nn.SiLU(),
            nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, out_dim))

    def forward(self, x):
        return self.net(x)
