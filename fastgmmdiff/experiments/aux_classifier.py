"""What the auxiliary classifier's loss buys on its own: BCE against NGMG and multi-scale NGMG,
with mislabelled training examples and noisy inputs.

    python -m fastgmmdiff.experiments.aux_classifier --out runs/aux            # the full grid
    python -m fastgmmdiff.experiments.aux_classifier --datasets shapes --flip 0 0.4 --out runs/aux

The trainer's auxiliary classifier (``AuxClassifier``, the feature conditioner's mixture as its
target: SPEC §3) alone, trained for ``--steps`` Adam steps on ``shapes`` (5 binary features) and
``digits`` (one 10-valued feature) with the loss ``bce``, ``ngmg`` or ``ngmg-ms`` (multi-scale,
σ…8σ), on clean images or on the diffusion schedule's noisy x_t (t uniform in [0, 500] of the
cosine schedule's 1000 steps, as the classifier sees partly denoised images in training), with
a fraction ``--flip`` of the first feature's training labels replaced by another value at
random.  Held-out accuracy per feature (the component with the highest posterior) on clean
test images and on x_t at t = 100, 250, 500; the flipped feature and the others reported apart.

Each run is one JSON file in ``<out>/runs/`` (a finished run is reused: the grid resumes);
``<out>/aux_classifier.md`` (a markdown table: mean ± standard deviation over seeds, also
printed) and ``<out>/aux_classifier.png`` (accuracy against the flipped fraction) summarise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from ..diffusion import data as D
from ..diffusion.conditioning import FeatureConditioner
from ..diffusion.ddpm import GaussianDiffusion
from ..diffusion.unet import AuxClassifier

LOSSES = ("bce", "ngmg", "ngmg-ms")
EVAL_T = (100, 250, 500)
TRAIN_T_MAX = 500


def _split(name: str, seed: int):
    """(train, test) Datasets: shapes rendered afresh (every combination), digits split 80/20."""
    if name == "shapes":
        return D.shapes(n=4096, seed=seed, held_out=()), D.shapes(n=1024, seed=10_000 + seed, held_out=())
    full = D.digits(seed=seed)
    perm = torch.from_numpy(np.random.default_rng([seed, 7]).permutation(len(full.labels)))
    cut = int(0.8 * len(perm))

    def part(idx):
        return D.Dataset(full.name, full.features, full.images[idx], full.labels[idx], full.read, ())
    return part(perm[:cut]), part(perm[cut:])


def _flip(labels: torch.Tensor, vpf, frac: float, g: torch.Generator) -> torch.Tensor:
    """A copy with a fraction ``frac`` of feature 0 replaced by another value, uniformly."""
    out = labels.clone()
    if frac <= 0:
        return out
    pick = torch.rand(len(out), generator=g) < frac
    shift = torch.randint(1, vpf[0], (len(out),), generator=g)
    out[pick, 0] = (out[pick, 0] + shift[pick]) % vpf[0]
    return out


def _predict(cond: FeatureConditioner, z: torch.Tensor) -> torch.Tensor:
    """Per feature, the value whose component has the highest posterior: [B, F]."""
    zf = z.view(z.shape[0], cond.n_features, cond.d)
    sq = (zf.unsqueeze(2) - cond.means.unsqueeze(0)).pow(2).sum(-1)  # [B, F, Vmax]
    return (cond.logits.unsqueeze(0) - 0.5 * sq / cond.sigma ** 2).argmax(-1)


def run_one(dataset: str, loss: str, flip: float, inputs: str, seed: int, steps: int, batch: int) -> dict:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train, test = _split(dataset, seed)
    vpf = train.values_per_feature
    cond = FeatureConditioner(vpf, [f.tolist() for f in train.value_frequencies()], seed=seed)
    net = AuxClassifier(train.channels, cond.dim, base=16)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    diff = GaussianDiffusion(torch.nn.Identity(), 1000, "cosine")
    labels = _flip(train.labels, vpf, flip, g)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (batch,), generator=g)
        x = train.images[idx]
        if inputs == "noisy":
            t = torch.randint(0, TRAIN_T_MAX + 1, (batch,), generator=g)
            x = diff.q_sample(x, t, torch.randn(x.shape, generator=g))
        out = cond.aux_loss(net(x), labels[idx], loss).mean()
        opt.zero_grad()
        out.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    acc = {}
    net.eval()
    with torch.no_grad():
        gt = torch.Generator().manual_seed(99)
        for t in (0,) + EVAL_T:
            x = test.images
            if t:
                x = diff.q_sample(x, torch.full((len(x),), t), torch.randn(x.shape, generator=gt))
            pred = torch.cat([_predict(cond, net(x[i:i + 256])) for i in range(0, len(x), 256)])
            acc[str(t)] = (pred == test.labels).double().mean(0).tolist()
    return dict(dataset=dataset, loss=loss, flip=flip, inputs=inputs, seed=seed, steps=steps, batch=batch,
                accuracy=acc, features=[n for n, _ in train.features], train_s=train_s)


def _mean_sd(vals):
    a = np.asarray(vals, float)
    return f"{a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.3f}"


def summarise(results: list, out: str, hardware: str, command: str) -> str:
    """The markdown table (and the plot when matplotlib is there)."""
    lines = [f"Auxiliary-classifier experiment: `{command}`", "", f"Hardware: {hardware}", "",
             "Held-out accuracy, mean ± sd over seeds: the flipped feature (feature 0) and the mean of the others; "
             "clean test images and x_t at t = 250.", "",
             "| dataset | inputs | flipped | loss | seeds | feature 0, clean | others, clean | feature 0, t=250 "
             "| others, t=250 | t=500, all |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["dataset"], r["inputs"], r["flip"], r["loss"]) for r in results},
                  key=lambda k: (k[0], k[1], k[2], LOSSES.index(k[3])))
    for k in keys:
        rs = [r for r in results if (r["dataset"], r["inputs"], r["flip"], r["loss"]) == k]
        f0 = lambda t: [r["accuracy"][t][0] for r in rs]  # noqa: E731
        oth = lambda t: [np.mean(r["accuracy"][t][1:]) if len(r["accuracy"][t]) > 1 else np.nan  # noqa: E731
                         for r in rs]
        allf = [np.mean(r["accuracy"]["500"]) for r in rs]
        o0, o250 = oth("0"), oth("250")
        lines.append(f"| {k[0]} | {k[1]} | {k[2]:.0%} | {k[3]} | {len(rs)} | {_mean_sd(f0('0'))} | "
                     f"{_mean_sd(o0) if not np.isnan(o0).any() else '—'} | {_mean_sd(f0('250'))} | "
                     f"{_mean_sd(o250) if not np.isnan(o250).any() else '—'} | {_mean_sd(allf)} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "aux_classifier.md"), "w") as f:
        f.write(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return text
    combos = sorted({(r["dataset"], r["inputs"]) for r in results})
    fig, axes = plt.subplots(1, len(combos), figsize=(4.2 * len(combos), 3.6), squeeze=False)
    for ax, (ds, inp) in zip(axes[0], combos):
        for loss in LOSSES:
            rs = [r for r in results if (r["dataset"], r["inputs"], r["loss"]) == (ds, inp, loss)]
            flips = sorted({r["flip"] for r in rs})
            if not flips:
                continue
            m = [np.mean([r["accuracy"]["0"][0] for r in rs if r["flip"] == fl]) for fl in flips]
            s = [np.std([r["accuracy"]["0"][0] for r in rs if r["flip"] == fl]) for fl in flips]
            ax.errorbar(flips, m, yerr=s, marker="o", capsize=3, label=loss)
        ax.set_title(f"{ds}, {inp} training")
        ax.set_xlabel("fraction of feature 0's labels flipped")
        ax.set_ylabel("feature 0 accuracy (clean test)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "aux_classifier.png"), dpi=110)
    plt.close(fig)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["shapes", "digits"], choices=["shapes", "digits"])
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    ap.add_argument("--flip", nargs="+", type=float, default=[0.0, 0.2, 0.4])
    ap.add_argument("--inputs", nargs="+", default=["clean", "noisy"], choices=["clean", "noisy"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="runs/aux_classifier")
    args = ap.parse_args(argv)
    if any(not 0 <= f < 1 for f in args.flip):
        ap.error("--flip fractions must be in [0, 1)")
    if args.steps < 1 or args.batch_size < 1:
        ap.error("--steps and --batch-size must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    results = []
    grid = [(d, lo, fl, i, s) for d in args.datasets for i in args.inputs for fl in args.flip
            for lo in args.losses for s in args.seeds]
    for n, (d, lo, fl, i, s) in enumerate(grid, 1):
        path = os.path.join(args.out, "runs", f"{d}-{i}-flip{fl:g}-{lo}-seed{s}.json")
        rec = None
        if os.path.exists(path):
            with open(path) as f:
                rec = json.load(f)
            if rec.get("steps") != args.steps or rec.get("batch") != args.batch_size:
                rec = None
        if rec is None:
            rec = run_one(d, lo, fl, i, s, args.steps, args.batch_size)
            with open(path + ".tmp", "w") as f:
                json.dump(rec, f)
            os.replace(path + ".tmp", path)  # a run is recorded whole or not at all
            print(f"[{n}/{len(grid)}] {d} {i} flip {fl:g} {lo} seed {s}: feature-0 clean accuracy "
                  f"{rec['accuracy']['0'][0]:.3f} ({rec['train_s']:.0f} s)", flush=True)
        results.append(rec)
    hardware = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, " \
               f"torch {torch.__version__}"
    command = "python -m fastgmmdiff.experiments.aux_classifier " + " ".join(argv if argv is not None else
                                                                             __import__("sys").argv[1:])
    print(summarise(results, args.out, hardware, command))


if __name__ == "__main__":
    main()
