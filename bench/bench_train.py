"""One training step of the reference trainer with the fused NGMG backend against the
reference ("torch") backend, side by side in one run, and where the step's time goes.

    python -m pytest bench/bench_train.py --benchmark-only        # pytest-benchmark
    python bench/bench_train.py [--device cuda]                   # the breakdown table

The breakdown times, at the step's shapes: the whole step (aux = ngmg), the same step with
aux = none (so the difference is the auxiliary classifier and its losses), and the NGMG loss
forward+backward alone per backend — medians of repeated runs in one process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pytest
import torch

from fastgmmdiff import _dispatch
from fastgmmdiff.diffusion import trainer as T

QUICK = ["--base", "8", "--batch-size", "8", "--n-train", "64", "--timesteps", "50", "--latent-d", "2"]
FULL = ["--batch-size", "32", "--n-train", "1024"]


def _trainer(backend, aux="ngmg", device="cpu", out="/tmp/fastgmmdiff-bench-train"):
    quick = os.environ.get("FASTGMMDIFF_BENCH_QUICK") == "1"
    argv = (QUICK if quick else FULL) + ["--aux", aux, "--backend", backend, "--device", device,
                                         "--out", os.path.join(out, f"{aux}-{backend}"),
                                         "--no-progress", "--steps", "1"]
    tr = T.Trainer(T.parse_config(argv))
    tr.train_step()  # warm-up (allocations, kernel selection)
    return tr


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_train_step(benchmark, backend, tmp_path):
    tr = _trainer(backend, out=str(tmp_path))
    benchmark.extra_info["backend"] = _dispatch.resolve(backend, tr.device).name

    def step():
        out = tr.train_step()
        _sync(tr.device)
        return out

    out = benchmark(step)
    assert not out["skipped"] and out["loss"] == out["loss"]


def _median_time(fn, dev, reps=10):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(dev)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def breakdown(device="cpu", reps=10) -> str:
    rows = []
    tr_none = _trainer("auto", aux="none", device=device)
    t_none = _median_time(tr_none.train_step, tr_none.device, reps)
    for backend in ("torch", "auto"):
        tr = _trainer(backend, device=device)
        t_step = _median_time(tr.train_step, tr.device, reps)
        cond = tr.system.conditioner
        B = tr.cfg.batch_size
        z = torch.randn(B, cond.dim, device=tr.device, requires_grad=True)
        lab = tr.labels[:B]

        def ngmg():
            cond.aux_loss(z, lab, "ngmg").mean().backward()

        ngmg()
        t_ngmg = 2 * _median_time(ngmg, tr.device, reps)  # called on x0 and on x̂₀ each step
        rows.append((backend, t_step, t_none, t_ngmg))
    lines = [f"device {device}, batch {tr.cfg.batch_size}, UNet base {tr.cfg.base}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads",
             "| NGMG backend | step (aux=ngmg) | step (aux=none) | aux classifier + losses | NGMG fwd+bwd ×2 | NGMG share |",
             "|---|---|---|---|---|---|"]
    for b, s, n, g in rows:
        lines.append(f"| {b} | {s * 1e3:.1f} ms | {n * 1e3:.1f} ms | {(s - n) * 1e3:.1f} ms | "
                     f"{g * 1e3:.2f} ms | {g / s:.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    print(breakdown(a.device, a.reps))
    sys.exit(0)
