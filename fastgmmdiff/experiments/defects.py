"""Does feature conditioning make fewer defective samples than class conditioning?

    python -m fastgmmdiff.experiments.defects --seeds 0 1 2 --steps 1500 --out runs/defects

Trains, on ``shapes`` with combinations held out, one model per (conditioning ∈ {feature,
class}) × (aux ∈ {none, bce, ngmg, ngmg-ms}) × seed; samples ``--per-combination`` images of every
combination (class conditioning reaches a held-out combination only through a fresh, untrained
component — SPEC §3); and reports defect rates on the seen and the held-out combinations, the
mean over seeds with its 95% confidence interval and the differences between configurations
with theirs (Welch), as ``defects.md`` (markdown tables, also printed) and ``defects.png``.
Each run lives in ``<out>/<conditioning>-<aux>-seed<k>``; a finished run is reused (its
``defects.json``), an unfinished one resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time

import numpy as np
import torch

from ..diffusion import trainer as T

CONDITIONINGS = ("feature", "class")
AUX = ("none", "bce", "ngmg", "ngmg-ms")


def run_one(out, conditioning, aux, seed, args) -> dict:
    folder = os.path.join(out, f"{conditioning}-{aux}-seed{seed}")
    done = os.path.join(folder, "defects.json")
    if os.path.exists(done):
        with open(done) as f:
            rep = json.load(f)
        if rep.get("steps") == args.steps and rep.get("n_per_combination") == args.per_combination:
            return rep
    argv = ["--dataset", "shapes", "--conditioning", conditioning, "--aux", aux, "--seed", str(seed),
            "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--out", folder,
            "--aux-weight", str(args.aux_weight), "--eval-per-combination", "0", "--device", args.device,
            "--ckpt-every", str(max(args.steps // 4, 1)), "--log-every", "50"]
    if args.held_out is not None:
        argv += ["--held-out", args.held_out]
    if not args.progress:
        argv.append("--no-progress")
    if os.path.exists(os.path.join(folder, "checkpoint.pt")):
        argv.append("--resume")
    elif T._run_files(folder):  # stopped before its first checkpoint: start that run afresh
        argv.append("--overwrite")
    cfg = T.parse_config(argv)
    t0 = time.perf_counter()
    tr = T.Trainer(cfg)
    if tr.train() != "done":
        raise SystemExit(f"interrupted: rerun the same command to resume ({folder})")
    train_s = time.perf_counter() - t0
    tr.write_samples()
    from ..diffusion.evaluate import defect_report

    t0 = time.perf_counter()
    rep = defect_report(tr, args.per_combination)
    rep.pop("markdown")
    rep.update(steps=args.steps, train_seconds=train_s, eval_seconds=time.perf_counter() - t0,
               conditioning=conditioning, aux=aux, seed=seed)
    with open(done, "w") as f:
        json.dump(rep, f, indent=1)
    return rep


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mean_ci(v) -> str:
    """Mean and its 95% confidence interval over seeds (Student's t: few seeds), the interval
    clipped to [0, 1]: every column is a rate."""
    if len(v) < 2:
        return f"{v.mean():.3f}"
    from scipy.stats import t

    half = t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return f"{v.mean():.3f} [{max(v.mean() - half, 0.0):.3f}, {min(v.mean() + half, 1.0):.3f}]"


def _diff_ci(a, b) -> str:
    """mean(a) − mean(b) with its 95% Welch interval (unequal variances, few seeds); a ``*``
    where the interval excludes 0."""
    from scipy.stats import t

    d = a.mean() - b.mean()
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = np.sqrt(va + vb)
    if se == 0:
        return f"{d:+.3f}" + ("*" if d != 0 else "")
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = t.ppf(0.975, dof) * se
    return f"{d:+.3f} [{d - half:+.3f}, {d + half:+.3f}]" + ("*" if abs(d) > half else "")


def _values(reports, c, a, key):
    return np.array([r[key] for r in reports if r["conditioning"] == c and r["aux"] == a])


KEYS = ("seen", "held_out", "feature_error_seen", "feature_error_held_out")


def summarize(reports: list) -> str:
    rows = ["| conditioning | aux | seeds | defects, seen | defects, held out | feature error, seen "
            "| feature error, held out |", "|---|---|---|---|---|---|---|"]
    for c in CONDITIONINGS:
        for a in AUX:
            rs = [r for r in reports if r["conditioning"] == c and r["aux"] == a]
            if not rs:
                continue
            fmt = lambda key: _mean_ci(_values(reports, c, a, key))  # noqa: E731
            rows.append(f"| {c} | {a} | {len(rs)} | {fmt('seen')} | {fmt('held_out')} | "
                        f"{fmt('feature_error_seen')} | {fmt('feature_error_held_out')} |")
    return "\n".join(rows)


def contrasts(reports: list) -> str:
    """The differences the claims are about, each with its 95% Welch interval (``*``: excludes
    0): feature − class conditioning per aux loss, and every aux loss against each earlier one
    (bce − none, …, ngmg-ms − bce, …) per conditioning.  Empty when no pair has ≥ 2 seeds on
    both sides."""
    pairs = [(f"feature − class, aux {a}", ("feature", a), ("class", a)) for a in AUX]
    pairs += [(f"{c}: aux {a} − {b}", (c, a), (c, b)) for c in CONDITIONINGS
              for i, a in enumerate(AUX) for b in AUX[:i]]
    rows = []
    for name, (c1, a1), (c2, a2) in pairs:
        va = [_values(reports, c1, a1, k) for k in KEYS]
        vb = [_values(reports, c2, a2, k) for k in KEYS]
        if len(va[0]) < 2 or len(vb[0]) < 2:
            continue
        rows.append(f"| {name} | " + " | ".join(_diff_ci(x, y) for x, y in zip(va, vb)) + " |")
    if not rows:
        return ""
    return "\n".join(["| difference | defects, seen | defects, held out | feature error, seen "
                      "| feature error, held out |", "|---|---|---|---|---|"] + rows)


def plot(reports: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4), sharey=True)
    panels = (("seen", "defects, seen"), ("held_out", "defects, held out"),
              ("feature_error_seen", "feature error, seen"), ("feature_error_held_out", "feature error, held out"))
    auxes = [a for a in AUX if any(r["aux"] == a for r in reports)]  # no empty slots for aux not run
    for ax, (key, title) in zip(axes, panels):
        for j, c in enumerate(CONDITIONINGS):
            for i, a in enumerate(auxes):
                vals = [r[key] for r in reports if r["conditioning"] == c and r["aux"] == a]
                if not vals:
                    continue
                x = i + (j - 0.5) * 0.35
                ax.bar(x, np.mean(vals), width=0.33, color=("tab:blue", "tab:orange")[j],
                       label=c if i == 0 else None)
                ax.scatter([x] * len(vals), vals, color="k", s=8, zorder=3)
        ax.set_xticks(range(len(auxes)), [f"aux={a}" for a in auxes])
        ax.set_title(title)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("rate")
    axes[0].legend(title="conditioning")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastgmmdiff.experiments.defects", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--aux-weight", type=float, default=0.1)
    p.add_argument("--per-combination", type=int, default=16)
    p.add_argument("--held-out", default=None, help="as fastgmmdiff-train --held-out")
    p.add_argument("--conditioning", nargs="+", choices=CONDITIONINGS, default=list(CONDITIONINGS))
    p.add_argument("--aux", nargs="+", choices=AUX, default=list(AUX))
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/defects")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    if args.steps < 1 or args.per_combination < 1:
        p.error("--steps and --per-combination must be >= 1")
    if importlib.util.find_spec("matplotlib") is None:  # checked before hours of training, not after
        p.error("the plot (defects.png) needs matplotlib: pip install matplotlib")
    try:
        T.check_requirements(T.TrainConfig(progress=args.progress))
    except ModuleNotFoundError as e:
        p.error(str(e))
    os.makedirs(args.out, exist_ok=True)
    reports = []
    for seed in args.seeds:
        for c in args.conditioning:
            for a in args.aux:
                rep = run_one(args.out, c, a, seed, args)
                reports.append(rep)
                print(f"[defects] {c:7s} aux={a:7s} seed={seed}: seen {rep['seen']:.3f}, held out "
                      f"{rep['held_out']:.3f} (train {rep['train_seconds']:.0f} s)", file=sys.stderr)
    table = ("Mean over seeds and its 95% confidence interval (Student's t, clipped to [0, 1]).\n\n"
             if len(args.seeds) > 1 else "") + summarize(reports)
    diffs = contrasts(reports)
    if diffs:
        table += ("\n\nDifferences of the means with their 95% Welch intervals (* where the interval "
                  "excludes 0; negative = fewer defects / errors for the first):\n\n" + diffs)
    cpu = _cpu_name()
    command = "python -m fastgmmdiff.experiments.defects " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (f"Defects experiment: `{command.strip()}`\n\n"
              f"shapes, {args.steps} steps × batch {args.batch_size}, {args.per_combination} samples per "
              f"combination, seeds {args.seeds}, torch {torch.__version__}, {cpu}, "
              f"{torch.get_num_threads()} threads\n\n")
    with open(os.path.join(args.out, "defects.md"), "w") as f:
        f.write(header + table + "\n")
    plot(reports, os.path.join(args.out, "defects.png"))
    print(header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
