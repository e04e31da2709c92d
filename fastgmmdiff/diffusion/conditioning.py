"""GMM conditioners (SPEC §3): what the denoiser is conditioned on, and what the auxiliary
classifier is trained towards.

Both map requested feature values ``labels [B, F]`` (−1 = unspecified) to a condition vector
``c ∈ R^{F·d}`` drawn *fresh at every call* — the condition is a distribution, not a point —
and both own the mixture that ``aux_loss`` scores the classifier's outputs against.

* :class:`FeatureConditioner` — feature f, value v owns N(μ_{f,v}, σ² I_d) in slot f; feature
  f's mixture weights are the value frequencies in the training data.  c = concat_f c_f.  A
  combination never seen in training still lands where every slot was trained.
* :class:`ClassConditioner` — the baseline: each combination seen in training is a class with
  its own N(μ_class, σ² I_{F·d}).  An unseen combination has no component: asking for one is
  an error unless ``allow_unseen=True`` (a fresh component, deterministic per combination,
  that the model never trained on).

Geometry: both conditioners put the same energy in the condition vector.  A feature slot's
means have norm ``scale`` (default 1.5; antipodal for a binary feature, orthonormal directions
otherwise when V ≤ d), so a full feature condition has norm scale·√F; a class mean is a random
orthonormal direction of R^{F·d} with that same norm scale·√F (so classes are at least as far
apart as two combinations differing in one feature).  The spread is σ = 0.5 in every
dimension.  Consequence for NGMG: an untrained classifier (outputs near 0) starts at
p̃ = exp(−½·scale²/σ²) = e^{−4.5} per feature slot, but at exp(−½·F·scale²/σ²) = e^{−22.5}
under one joint class component — NGMG's bounded, redescending gradient is tiny there (Adam's
normalisation still moves it); this is part of what the experiment compares.

Aux losses (``aux_loss(z, labels, kind)``, per-sample ``[B]``):

* ``"ngmg"`` — ``fastgmmdiff.ngmg_loss`` with ``target`` = the true value's component (spherical
  covariance), averaged over features; its gradient is the NGMG.  ``"ngmg-ms"``: the same,
  multi-scale (``scales=MULTI_SCALE``: σ to 8σ).
* ``"bce"`` — cross-entropy of the component posterior ∝ π_v N(z; μ_v, σ²I) against the true
  value (binary cross-entropy for a binary feature), averaged over features.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.nn import functional as F

from .. import functional as fgf

AUX_KINDS = ("none", "bce", "ngmg", "ngmg-ms")
MULTI_SCALE = (1, 2, 4, 8)  # "ngmg-ms": bandwidths σ…8σ (a feature slot's means are 3 = 6σ apart)


def _directions(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """n unit vectors in R^d: antipodal for n = 2, orthonormal for n ≤ d, else random."""
    if n == 2:
        u = torch.randn(d, generator=g, dtype=torch.float64)
        u = u / u.norm()
        return torch.stack([u, -u])
    a = torch.randn(d, max(n, 1), generator=g, dtype=torch.float64)
    if n <= d:
        q, _ = torch.linalg.qr(a)
        return q[:, :n].T.contiguous()
    return (a / a.norm(dim=0, keepdim=True)).T.contiguous()


class _Conditioner(nn.Module):
    """Shared: per-sample aux loss from component means/precisions/logits of G mixtures."""

    def __init__(self, values_per_feature, d: int, scale: float, sigma: float, backend: str):
        super().__init__()
        vpf = [int(v) for v in values_per_feature]
        if not vpf or min(vpf) < 1:
            raise ValueError(f"values_per_feature must be positive counts, got {values_per_feature}")
        if d < 1 or sigma <= 0 or scale < 0:
            raise ValueError(f"need d >= 1, sigma > 0, scale >= 0; got d={d}, sigma={sigma}, scale={scale}")
        self.values_per_feature = vpf
        self.n_features = len(vpf)
        self.d = d
        self.dim = self.n_features * d
        self.scale = scale
        self.sigma = sigma
        self.backend = backend

    def check_labels(self, labels: torch.Tensor, allow_unspecified: bool = True) -> torch.Tensor:
        if labels.dim() != 2 or labels.shape[1] != self.n_features:
            raise ValueError(f"labels must be [B, {self.n_features}] (one value per feature), got "
                             f"{tuple(labels.shape)}")
        vmax = torch.tensor(self.values_per_feature, device=labels.device)
        low = -1 if allow_unspecified else 0
        if bool(((labels < low) | (labels >= vmax)).any()):
            raise ValueError(f"labels out of range: feature values must be in [{low}, V_f) with "
                             f"V = {self.values_per_feature}")
        return labels.long()

    def _mixture_loss(self, z, means, logits, target, kind):
        """z [G, B, D'] against G mixtures (means [G, K, D'], logits [G, K]); target [G, B]."""
        if kind in ("ngmg", "ngmg-ms"):
            prec = torch.full(means.shape[:-1], 1.0 / self.sigma, dtype=z.dtype, device=z.device)
            loss = fgf.ngmg_loss(z, means.to(z.dtype), prec, logits.to(z.dtype), "spherical",
                                 target=target, reduction="none", backend=self.backend,
                                 scales=MULTI_SCALE if kind == "ngmg-ms" else None)
            return loss.mean(0)
        if kind == "bce":
            sq = (z.unsqueeze(-2) - means.to(z.dtype).unsqueeze(-3)).pow(2).sum(-1)  # [G, B, K]
            post = logits.to(z.dtype).unsqueeze(-2) - 0.5 * sq / self.sigma**2
            ce = F.cross_entropy(post.flatten(0, 1), target.flatten(), reduction="none")
            return ce.view(target.shape).mean(0)
        raise ValueError(f"aux loss must be one of {AUX_KINDS[1:]}, got {kind!r}")


class FeatureConditioner(_Conditioner):
    """Feature-GMM conditioning (SPEC §3).  ``frequencies``: per feature, value weights."""

    kind = "feature"

    def __init__(self, values_per_feature, frequencies=None, *, d: int = 8, scale: float = 1.5,
                 sigma: float = 0.5, seed: int = 0, backend: str = "auto"):
        super().__init__(values_per_feature, d, scale, sigma, backend)
        vpf, Fn, vmax = self.values_per_feature, self.n_features, max(self.values_per_feature)
        g = torch.Generator().manual_seed(seed)
        means = torch.zeros(Fn, vmax, d, dtype=torch.float64)
        logits = torch.full((Fn, vmax), float("-inf"), dtype=torch.float64)
        for f, v in enumerate(vpf):
            means[f, :v] = scale * _directions(v, d, g)
            w = (torch.ones(v, dtype=torch.float64) if frequencies is None
                 else torch.as_tensor(frequencies[f], dtype=torch.float64))
            if w.shape != (v,) or bool((w < 0).any()) or float(w.sum()) <= 0:
                raise ValueError(f"frequencies[{f}] must be {v} non-negative weights, got {w.tolist()}")
            logits[f, :v] = (w / w.sum()).log()
        self.register_buffer("means", means.float())      # [F, Vmax, d]
        self.register_buffer("logits", logits.float())    # [F, Vmax]; −inf pads

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """c ~ ⊗_f N(μ_{f,v_f}, σ²I); an unspecified feature (−1) draws v_f from its weights."""
        labels = self.check_labels(labels)
        B = labels.shape[0]
        u = torch.rand(B, self.n_features, device=self.means.device, generator=generator)
        cdf = self.logits.softmax(-1).cumsum(-1)                               # [F, Vmax]
        drawn = (u.unsqueeze(-1) > cdf).sum(-1).clamp(max=cdf.shape[-1] - 1)  # [B, F]
        v = torch.where(labels < 0, drawn, labels)
        eps = torch.randn(B, self.n_features, self.d, device=self.means.device, generator=generator)
        mu = self.means[torch.arange(self.n_features, device=v.device), v]    # [B, F, d]
        return (mu + self.sigma * eps).flatten(1)

    def aux_loss(self, z: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
        labels = self.check_labels(labels, allow_unspecified=False)
        zf = z.view(z.shape[0], self.n_features, self.d).transpose(0, 1)      # [F, B, d]
        return self._mixture_loss(zf, self.means, self.logits, labels.T.contiguous(), kind)


class ClassConditioner(_Conditioner):
    """Class-GMM conditioning (the baseline): one component per combination seen in training."""

    kind = "class"

    def __init__(self, values_per_feature, seen_combinations, class_frequencies=None, *, d: int = 8,
                 scale: float = 1.5, sigma: float = 0.5, seed: int = 0, backend: str = "auto",
                 allow_unseen: bool = False):
        super().__init__(values_per_feature, d, scale, sigma, backend)
        combos = [tuple(int(v) for v in c) for c in seen_combinations]
        if not combos or len(set(combos)) != len(combos):
            raise ValueError("seen_combinations must be a non-empty list of distinct combinations")
        self.seed = seed
        self.allow_unseen = allow_unseen
        self.class_scale = scale * self.n_features ** 0.5  # the norm of a feature condition
        radix = torch.tensor([1] + self.values_per_feature[:0:-1]).cumprod(0).flip(0)
        self.register_buffer("radix", radix, persistent=False)
        table = torch.full((int(torch.tensor(self.values_per_feature).prod()),), -1, dtype=torch.long)
        for i, c in enumerate(combos):
            self.check_labels(torch.tensor([c]), allow_unspecified=False)
            table[int((torch.tensor(c) * radix).sum())] = i
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("combos", torch.tensor(combos, dtype=torch.long), persistent=False)
        g = torch.Generator().manual_seed(seed)
        C = len(combos)
        w = (torch.ones(C, dtype=torch.float64) if class_frequencies is None
             else torch.as_tensor(class_frequencies, dtype=torch.float64))
        if w.shape != (C,) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"class_frequencies must be {C} non-negative weights")
        self.register_buffer("means", (self.class_scale * _directions(C, self.dim, g)).float())  # [C, F·d]
        self.register_buffer("logits", (w / w.sum()).log().float())                   # [C]

    def class_index(self, labels: torch.Tensor) -> torch.Tensor:
        """Class of each fully specified row; −1 for a combination never seen in training."""
        return self.table[(labels * self.radix).sum(-1)]

    def _fresh_mean(self, combo) -> torch.Tensor:
        key = f"{self.seed}:" + "".join(map(str, combo))
        s = int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "little")
        u = torch.randn(self.dim, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        return (self.class_scale * u / u.norm()).float()

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None,
               allow_unseen: bool | None = None) -> torch.Tensor:
        """c ~ N(μ_class, σ²I).  Unspecified features: a seen class consistent with the
        specified ones, drawn by class frequency.  Unseen combination: error unless allowed."""
        labels = self.check_labels(labels)
        allow = self.allow_unseen if allow_unseen is None else allow_unseen
        dev = self.means.device
        B = labels.shape[0]
        u = torch.rand(B, device=dev, generator=generator)
        eps = torch.randn(B, self.dim, device=dev, generator=generator)
        unspec = labels < 0
        idx = self.class_index(labels.clamp(min=0))
        if bool(unspec.any()):
            match = ((self.combos.unsqueeze(0) == labels.unsqueeze(1)) | unspec.unsqueeze(1)).all(-1)  # [B, C]
            w = self.logits.exp().unsqueeze(0) * match
            has = w.sum(-1) > 0
            cdf = (w / w.sum(-1, keepdim=True).clamp(min=1e-30)).cumsum(-1)
            drawn = (u.unsqueeze(-1) > cdf).sum(-1).clamp(max=len(self.combos) - 1)
            rows = unspec.any(-1)
            idx = torch.where(rows, torch.where(has, drawn, torch.full_like(drawn, -1)), idx)
        mu = self.means[idx.clamp(min=0)]
        missing = idx < 0
        if bool(missing.any()):
            bad = sorted({"".join(str(v) if v >= 0 else "*" for v in r) for r in labels[missing].tolist()})
            if not allow:
                raise ValueError(f"class conditioning has no component for combination(s) {bad} "
                                 f"(never seen in training); pass allow_unseen=True for a fresh, "
                                 f"untrained component")
            if bool(unspec[missing].any()):
                raise ValueError(f"no seen class matches the specified features of {bad}")
            fresh = torch.stack([self._fresh_mean(r) for r in labels[missing].tolist()]).to(dev)
            mu = mu.clone()
            mu[missing] = fresh
        return mu + self.sigma * eps

    def aux_loss(self, z: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
        labels = self.check_labels(labels, allow_unspecified=False)
        idx = self.class_index(labels)
        if bool((idx < 0).any()):
            raise ValueError("aux_loss: a label combination has no class (unseen in training)")
        return self._mixture_loss(z.unsqueeze(0), self.means.unsqueeze(0), self.logits.unsqueeze(0),
                                  idx.unsqueeze(0), kind)


def make_conditioner(kind: str, dataset, *, d: int = 8, seed: int = 0, backend: str = "auto",
                     sigma: float = 0.5, scale: float = 1.5):
    """The conditioner for a :class:`~fastgmmdiff.diffusion.data.Dataset`'s training labels."""
    vpf = dataset.values_per_feature
    if kind == "feature":
        freqs = [f.tolist() for f in dataset.value_frequencies()]
        return FeatureConditioner(vpf, freqs, d=d, seed=seed, backend=backend, sigma=sigma, scale=scale)
    if kind == "class":
        combos, counts = torch.unique(dataset.labels, dim=0, return_counts=True)
        return ClassConditioner(vpf, combos.tolist(), counts.double().tolist(), d=d, seed=seed,
                                backend=backend, sigma=sigma, scale=scale)
    raise ValueError(f"conditioning must be 'feature' or 'class', got {kind!r}")
