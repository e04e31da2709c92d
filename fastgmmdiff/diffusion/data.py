"""Embedded datasets for the reference trainer, each with the checker that flags defects.

``shapes``: a procedural 32×32 RGB dataset with five binary features —

    shape (disk, square) · colour (warm, cool) · size (small, large) ·
    position (left, right) · background (dark, light)

Every image is a single anti-aliased object (disk and square of one size class have the same
area) on a flat grey background with a little pixel noise, rendered deterministically from
``(seed, index)``.  A feature combination is a string of five digits, e.g. ``"01101"`` (a disk,
cool, large, left, light background); ``held_out`` combinations never appear in training.

:func:`read_shapes` reads the five features back from an image and says whether the image is
*clean* (one object on a uniform background and nothing else); an image is **defective** when
it is not clean or any feature differs from the one requested.

``digits``: scikit-learn's bundled 8×8 handwritten digits (1797 images, no download), scaled to
32×32 greyscale; one feature with ten values.  Its checker is a scikit-learn logistic
regression trained on the real 8×8 digits, applied to images pooled back to 8×8.

Images are float32 tensors in [−1, 1], ``[n, C, 32, 32]``; labels are ``[n, F]`` int64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from itertools import product
from typing import Callable

import numpy as np
import torch

SIZE = 32
SHAPES_FEATURES = (("shape", ("disk", "square")), ("colour", ("warm", "cool")),
                   ("size", ("small", "large")), ("position", ("left", "right")),
                   ("background", ("dark", "light")))
# Held out of training by default: four of the 32 combinations, no two alike in more than
# three features, so every (feature, value) pair is still seen in training.
SHAPES_DEFAULT_HELD_OUT = ("00111", "11010", "10001", "01100")
DIGITS_FEATURES = (("digit", tuple(str(i) for i in range(10))),)

_RADIUS = {0: (4.5, 5.5), 1: (8.0, 9.0)}           # disk radius by size class (pixels)
_CX = {0: (10.0, 12.0), 1: (20.0, 22.0)}            # object centre x by position
_BG = {0: (0.08, 0.20), 1: (0.80, 0.92)}            # background grey by background class
_COLOUR = {0: ((0.85, 0.95), (0.15, 0.45), (0.05, 0.20)),   # warm: R, G, B ranges
           1: ((0.05, 0.20), (0.30, 0.60), (0.85, 0.95))}   # cool
_NOISE = 0.02


@dataclass
class Dataset:
    """Images, labels and what they mean.  ``read(images) -> (features [n, F], clean [n])`` is
    the dataset's checker; ``check(images, labels) -> defective [n]``."""

    name: str
    features: tuple                     # ((name, (value names...)), ...)
    images: torch.Tensor                # [n, C, H, W] in [-1, 1]
    labels: torch.Tensor                # [n, F] int64
    read: Callable = field(repr=False)
    held_out: tuple = ()                # combinations absent from training

    def check(self, images, labels) -> np.ndarray:
        """True where an image is not clean or any feature differs from ``labels``."""
        return defective(self.read, images, labels)

    @property
    def values_per_feature(self) -> list:
        return [len(v) for _, v in self.features]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def combinations(self) -> list:
        """Every feature combination as a tuple of value indices."""
        return list(product(*(range(v) for v in self.values_per_feature)))

    def seen_combinations(self) -> list:
        return sorted({tuple(r) for r in self.labels.tolist()})

    def value_frequencies(self) -> list:
        """Per feature, the frequency of each value in the training labels."""
        return [torch.bincount(self.labels[:, f], minlength=v).double() / len(self.labels)
                for f, v in enumerate(self.values_per_feature)]


def parse_combination(s: str, values_per_feature) -> tuple:
    """``"01101"`` → (0, 1, 1, 0, 1); a clear error for a wrong length or value."""
    s = s.strip()
    if len(s) != len(values_per_feature) or not s.isdigit():
        raise ValueError(f"a combination is {len(values_per_feature)} digits (one value per "
                         f"feature), got {s!r}")
    c = tuple(int(ch) for ch in s)
    for f, (v, n) in enumerate(zip(c, values_per_feature)):
        if v >= n:
            raise ValueError(f"combination {s!r}: feature {f} has {n} values, got {v}")
    return c


def parse_held_out(held_out, values_per_feature) -> tuple:
    """Held-out combinations (strings like ``"00111"`` or tuples) → sorted tuple of tuples."""
    return tuple(sorted({parse_combination(h, values_per_feature) if isinstance(h, str) else tuple(h)
                         for h in held_out}))


def defective(read, images, labels) -> np.ndarray:
    """True where the checker ``read`` finds an image unclean or a feature differing from
    ``labels`` ``[n, F]``."""
    feats, clean = read(images)
    want = labels.cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    return ~clean | np.any(feats != want, axis=1)


def format_combination(c) -> str:
    return "".join(str(int(v)) for v in c)


# --- shapes ----------------------------------------------------------------------------------

def render_shapes(labels: np.ndarray, seed: int, start: int = 0) -> np.ndarray:
    """Render ``labels`` ``[n, 5]`` to ``[n, 32, 32, 3]`` float32 in [0, 1]; image i uses the
    random stream ``(seed, start + i)``, so any slice of a dataset can be re-rendered."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.empty((len(labels), SIZE, SIZE, 3), np.float32)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    for i, (shp, col, siz, pos, bgc) in enumerate(labels):
        rng = np.random.default_rng([seed, start + i])
        r = rng.uniform(*_RADIUS[siz])
        cx = rng.uniform(*_CX[pos])
        cy = rng.uniform(r + 2.0, SIZE - r - 2.0)
        bg = rng.uniform(*_BG[bgc])
        colour = np.array([rng.uniform(*rg) for rg in _COLOUR[col]], np.float32)
        if shp == 0:
            cover = np.clip(r - np.hypot(xx - cx, yy - cy) + 0.5, 0.0, 1.0)
        else:
            h = 0.5 * r * np.sqrt(np.pi)  # half side: same area as the disk
            cover = (np.clip(h - np.abs(xx - cx) + 0.5, 0.0, 1.0)
                     * np.clip(h - np.abs(yy - cy) + 0.5, 0.0, 1.0))
        img = bg + cover[..., None] * (colour - bg)
        img += _NOISE * rng.standard_normal(img.shape).astype(np.float32)
        out[i] = np.clip(img, 0.0, 1.0)
    return out


def read_shapes(images) -> tuple:
    """Read the five features back from images ``[n, 3, 32, 32]`` in [−1, 1] (tensor or array).

    Returns ``(features [n, 5] int64, clean [n] bool)``; a feature that cannot be read is −1.
    The background is the median of the border pixels; the object is every pixel farther than
    0.3 (RGB distance) from it; the image is clean when the border is uniform, the largest
    8-connected component has a plausible area and stray pixels are few.  Shape is read from
    the soft coverage (area / (row extent × column extent): 1 for a square, π/4 for a disk),
    colour from the object's core, size from its area, position from its centroid.
    """
    from scipy import ndimage

    x = images.detach().float().cpu().numpy() if torch.is_tensor(images) else np.asarray(images, np.float32)
    x = np.clip((x + 1.0) / 2.0, 0.0, 1.0).transpose(0, 2, 3, 1)  # [n, H, W, 3] in [0, 1]
    n = len(x)
    feats = np.full((n, 5), -1, np.int64)
    clean = np.zeros(n, bool)
    border = np.zeros((SIZE, SIZE), bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    for i in range(n):
        img = x[i]
        bg = np.median(img[border], axis=0)
        dist = np.linalg.norm(img - bg, axis=-1)
        mask = dist > 0.3
        feats[i, 4] = int(bg.mean() > 0.5)
        lab, m = ndimage.label(mask, structure=np.ones((3, 3)))
        if m == 0:
            continue
        areas = np.bincount(lab.ravel())[1:]
        main = int(np.argmax(areas)) + 1
        area = int(areas[main - 1])
        stray = int(mask.sum()) - area
        border_bad = int(mask[border].sum())
        obj = lab == main
        ys, xs = np.nonzero(obj)
        core = obj & (dist > 0.6 * dist[obj].max())
        mean = img[core].mean(axis=0)
        # Shape from soft coverage (robust to pixelisation): area over the product of the
        # widths of its row and column profiles is 1 for a square and π/4 for a disk.
        alpha = np.clip(dist / np.median(dist[core]), 0.0, 1.0)
        alpha *= ndimage.binary_dilation(obj, np.ones((3, 3))) & (alpha >= 0.15)
        fill = alpha.sum() / max(alpha.max(0).sum() * alpha.max(1).sum(), 1e-6)
        feats[i, 0] = int(fill > 0.88)
        feats[i, 1] = int(mean[2] > mean[0])
        feats[i, 2] = int(area > 150)
        feats[i, 3] = int(xs.mean() > SIZE / 2)
        clean[i] = (40 <= area <= 400) and stray <= max(4, area // 20) and border_bad == 0
    return feats, clean


def shapes_defective(images, labels) -> np.ndarray:
    """True where an image is not clean or any feature differs from ``labels`` ``[n, 5]``."""
    return defective(read_shapes, images, labels)


def shapes(n: int = 8192, seed: int = 0, held_out=SHAPES_DEFAULT_HELD_OUT) -> Dataset:
    """``n`` images with feature combinations drawn uniformly from those not held out."""
    held = parse_held_out(held_out, values_per_feature("shapes"))
    allowed = [c for c in product(range(2), repeat=5) if c not in held]
    if not allowed:
        raise ValueError("every combination is held out: nothing left to train on")
    rng = np.random.default_rng([seed, 2**31])
    labels = np.asarray(allowed, np.int64)[rng.integers(0, len(allowed), n)]
    imgs = render_shapes(labels, seed)
    images = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0
    return Dataset("shapes", SHAPES_FEATURES, images, torch.from_numpy(labels), read_shapes, held)


# --- digits ----------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _digits_raw():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


@lru_cache(maxsize=1)
def digits_classifier():
    """Logistic regression on the real 8×8 digits (features in [0, 1]); fitted once."""
    from sklearn.linear_model import LogisticRegression

    imgs, y = _digits_raw()
    return LogisticRegression(max_iter=2000).fit(imgs.reshape(len(imgs), -1), y)


def digits_to_8x8(images) -> np.ndarray:
    """``[n, 1, 32, 32]`` in [−1, 1] → ``[n, 64]`` in [0, 1] (4×4 average pooling)."""
    x = images.detach().float().cpu() if torch.is_tensor(images) else torch.as_tensor(images)
    x = torch.nn.functional.avg_pool2d((x.clamp(-1, 1) + 1) / 2, SIZE // 8)
    return x.reshape(len(x), -1).numpy()


def read_digits(images) -> tuple:
    """``(features [n, 1], clean [n])``: the digit the classifier reads (every image counts as
    clean: the classifier is the whole check)."""
    pred = digits_classifier().predict(digits_to_8x8(images)).astype(np.int64)
    return pred[:, None], np.ones(len(pred), bool)


def digits_defective(images, labels) -> np.ndarray:
    """True where the classifier does not read the requested digit."""
    return defective(read_digits, images, labels)


def digits(n: int | None = None, seed: int = 0, held_out=()) -> Dataset:
    """The 1797 digits (or ``n`` of them, drawn with replacement), upsampled to 32×32."""
    imgs, y = _digits_raw()
    held = parse_held_out(held_out, values_per_feature("digits"))
    keep = np.array([(int(t),) not in held for t in y])
    imgs, y = imgs[keep], y[keep]
    if n is not None:
        idx = np.random.default_rng([seed, 2**31]).integers(0, len(y), n)
        imgs, y = imgs[idx], y[idx]
    x = torch.from_numpy(imgs)[:, None]
    x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return Dataset("digits", DIGITS_FEATURES, x * 2.0 - 1.0, torch.from_numpy(y)[:, None], read_digits, held)


DATASETS = {"shapes": shapes, "digits": digits}
FEATURES = {"shapes": SHAPES_FEATURES, "digits": DIGITS_FEATURES}
DEFAULT_HELD_OUT = {"shapes": SHAPES_DEFAULT_HELD_OUT, "digits": ()}


def values_per_feature(name: str) -> list:
    """Values per feature of dataset ``name`` (known without building it)."""
    return [len(v) for _, v in FEATURES[name]]


def load(name: str, seed: int = 0, held_out=None, n: int | None = None) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    kw = {} if held_out is None else {"held_out": held_out}
    if n is not None or name == "shapes":
        kw["n"] = n if n is not None else 8192
    return DATASETS[name](seed=seed, **kw)
