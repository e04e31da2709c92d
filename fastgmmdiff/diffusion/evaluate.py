"""Sample grids and defect rates.

A sample is **defective** when the dataset's checker says so (:mod:`.data`: for ``shapes``,
not one clean object or any of the five features differs from the request; for ``digits``, the
classifier reads another digit).  :func:`defect_rates` samples ``n`` images per requested
combination and reports, over the combinations seen in training and over those held out (class
conditioning samples a held-out combination from a fresh, untrained component): the defect
rate, the rate of unclean images, and the feature error — the fraction of requested features
read back wrong (a graded measure that still moves while nearly every sample is defective).
"""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import torch

from .data import format_combination


def save_grid(images: torch.Tensor, path: str, nrow: int = 8, pad: int = 2, scale: int = 2,
              captions=None, marked=None, legend: str | None = None) -> None:
    """Images ``[B, C, H, W]`` in [−1, 1] → one PNG grid (Pillow), each tile ``scale``× larger.

    ``captions``: a text under each tile (e.g. the requested feature combination); ``marked``:
    tiles framed and captioned in red (e.g. combinations held out of training), explained by
    ``legend`` under the grid."""
    from PIL import Image, ImageDraw

    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    B, C, H, W = x.shape
    ncol = min(nrow, B)
    nr = (B + ncol - 1) // ncol
    th, tw = H * scale, W * scale
    cap = 12 if captions is not None else 0
    foot = 14 if legend else 0
    img = Image.new("RGB", (ncol * (tw + pad) + pad, nr * (th + pad + cap) + pad + foot), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    red = (200, 0, 0)
    for i in range(B):
        r, c = divmod(i, ncol)
        left, top = pad + c * (tw + pad), pad + r * (th + pad + cap)
        tile = Image.fromarray(x[i].permute(1, 2, 0).numpy()).resize((tw, th), Image.NEAREST)
        img.paste(tile, (left, top))
        hot = marked is not None and bool(marked[i])
        if hot:
            draw.rectangle([left - 1, top - 1, left + tw, top + th], outline=red, width=2)
        if captions is not None:
            draw.text((left + 1, top + th + 1), str(captions[i]), fill=red if hot else (0, 0, 0))
    if legend:
        draw.text((pad, img.height - foot + 1), legend, fill=red if marked is not None else (0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)


@torch.no_grad()
def defect_rates(sample_fn, dataset, n_per_combination: int, batch: int = 256) -> dict:
    """``sample_fn(labels) -> images``; returns per-combination and pooled defect rates."""
    combos = dataset.combinations()
    held = set(dataset.held_out)
    labels = torch.tensor([c for c in combos for _ in range(n_per_combination)], dtype=torch.long)
    feats, clean = [], []
    for i in range(0, len(labels), batch):
        lab = labels[i:i + batch]
        f, c = dataset.read(sample_fn(lab).cpu())
        feats.append(np.asarray(f))
        clean.append(np.asarray(c))
    shape = (len(combos), n_per_combination)
    wrong = (np.concatenate(feats) != labels.numpy()).reshape(*shape, -1)
    unclean = ~np.concatenate(clean).reshape(shape)
    d = unclean | wrong.any(-1)
    per = {format_combination(c): float(d[j].mean()) for j, c in enumerate(combos)}
    seen = [j for j, c in enumerate(combos) if tuple(c) not in held]
    unseen = [j for j, c in enumerate(combos) if tuple(c) in held]
    pool = lambda a, js: float(a[js].mean()) if js else float("nan")  # noqa: E731
    return {"seen": pool(d, seen), "held_out": pool(d, unseen),
            "unclean_seen": pool(unclean, seen), "unclean_held_out": pool(unclean, unseen),
            "feature_error_seen": pool(wrong, seen), "feature_error_held_out": pool(wrong, unseen),
            "feature_error_by_feature_held_out": (wrong[unseen].mean((0, 1)).tolist() if unseen else []),
            "per_combination": per, "n_per_combination": n_per_combination,
            "n_seen": len(seen), "n_held_out": len(unseen)}


def defect_report(trainer, n_per_combination: int, seed: int = 1) -> dict:
    """Defect rates of a trained :class:`~.trainer.Trainer` (EMA weights), written to
    ``defects.json`` and ``defects.md`` in its output folder."""
    batch = itertools.count()  # a fresh sampling seed per batch, fixed per run
    rates = defect_rates(lambda lab: trainer.sample(lab.to(trainer.device), seed=seed * 7919 + next(batch)),
                         trainer.dataset, n_per_combination)
    cfg = trainer.cfg
    lines = [f"| conditioning | aux | steps | defects, seen ({rates['n_seen']} comb.) | "
             f"defects, held out ({rates['n_held_out']} comb.) | feature error, seen | feature error, held out |",
             "|---|---|---|---|---|---|---|",
             f"| {cfg.conditioning} | {cfg.aux} | {trainer.step} | {rates['seen']:.3f} | {rates['held_out']:.3f} "
             f"| {rates['feature_error_seen']:.3f} | {rates['feature_error_held_out']:.3f} |"]
    rates["markdown"] = "\n".join(lines)
    with open(os.path.join(cfg.out, "defects.json"), "w") as f:
        json.dump({k: v for k, v in rates.items() if k != "markdown"}, f, indent=1)
    with open(os.path.join(cfg.out, "defects.md"), "w") as f:
        f.write(rates["markdown"] + "\n")
    return rates
