"""One training step of the reference trainer with the fused NGMG backend against the
reference ("torch") backend, side by side in one run, and where the step's time goes.

    python -m pytest bench/bench_train.py --benchmark-only        # pytest-benchmark
    python bench/bench_train.py [--device cuda]                   # the breakdown table

The breakdown times, at the step's shapes and round-robin in one process: the whole step
(aux = ngmg) per NGMG backend, the same step with aux = none (the UNet alone), and the NGMG
loss forward+backward alone per backend (it runs twice per step: on x0 and on x̂₀).
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


def _interleaved_medians(fns: dict, dev, reps: int) -> dict:
    """Median seconds of each callable, run round-robin so that drift hits all alike."""
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            _sync(dev)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def breakdown(device="cpu", reps=15) -> str:
    trainers = {"none": _trainer("auto", aux="none", device=device),
                "torch": _trainer("torch", device=device), "auto": _trainer("auto", device=device)}
    dev = trainers["none"].device
    fns = {f"step/{k}": tr.train_step for k, tr in trainers.items()}
    for b in ("torch", "auto"):
        tr = trainers[b]
        cond = tr.system.conditioner
        z = torch.randn(tr.cfg.batch_size, cond.dim, device=dev, requires_grad=True)
        lab = tr.labels[:tr.cfg.batch_size]
        fns[f"ngmg/{b}"] = lambda cond=cond, z=z, lab=lab: cond.aux_loss(z, lab, "ngmg").mean().backward()
    t = _interleaved_medians(fns, dev, reps)
    cfg = trainers["none"].cfg
    names = {b: _dispatch.resolve(b, dev).name for b in ("torch", "auto")}
    lines = [f"device {device}, batch {cfg.batch_size}, UNet base {cfg.base}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, medians of {reps} interleaved steps",
             "| NGMG backend | step, aux=ngmg | step, aux=none (same run) | NGMG fwd+bwd (×2 per step) | NGMG share of the step |",
             "|---|---|---|---|---|"]
    for b in ("torch", "auto"):
        s, g = t[f"step/{b}"], 2 * t[f"ngmg/{b}"]
        lines.append(f"| {b} ({names[b]}) | {s * 1e3:.1f} ms | {t['step/none'] * 1e3:.1f} ms | {g * 1e3:.2f} ms | {g / s:.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    print(breakdown(a.device, a.reps))
    sys.exit(0)
