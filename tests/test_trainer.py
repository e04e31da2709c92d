"""The trainer: learning, exact resume, atomic checkpoints, the NaN guard, signals, DDP, CLI."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from fastgmmdiff.diffusion import trainer as T

TINY = ["--base", "8", "--batch-size", "8", "--n-train", "64", "--timesteps", "50",
        "--sample-steps", "4", "--latent-d", "2", "--eval-per-combination", "1", "--no-progress",
        "--warmup", "0"]


def _cfg(tmp_path, *extra, name="run"):
    return T.parse_config(TINY + ["--out", str(tmp_path / name)] + list(extra))


def _metrics(path):
    with open(path) as f:
        rows = [json.loads(ln) for ln in f if ln.strip()]
    for r in rows:
        r.pop("sec_per_step", None)
    return rows


def _fixed_loss(tr, seed=123):
    tr.system.eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        vals = [float(tr.system(tr.images, tr.labels, g)["denoise"]) for _ in range(4)]
    tr.system.train()
    return sum(vals) / len(vals)


def test_a_few_steps_reduce_the_loss(tmp_path):
    tr = T.Trainer(_cfg(tmp_path, "--steps", "60", "--lr", "2e-3", "--aux", "ngmg", "--seed", "3"))
    before = _fixed_loss(tr)
    assert tr.train() == "done"
    after = _fixed_loss(tr)
    assert after < 0.9 * before, (before, after)
    rows = _metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["step"] == 60 and all(math_finite(r["loss"]) for r in rows)
    assert {"denoise", "aux_real", "aux_guide", "loss", "grad_norm", "lr"} <= set(rows[0])


def math_finite(v):
    return v == v and abs(v) != float("inf")


def test_resume_continues_exactly(tmp_path):
    base = ["--steps", "6", "--log-every", "1", "--ckpt-every", "3", "--aux", "bce"]
    full = T.Trainer(_cfg(tmp_path, *base, name="full"))
    full.train()
    part = T.Trainer(_cfg(tmp_path, *base[:-2], "--aux", "bce", name="part"))
    part.cfg.steps = 3
    part.train()
    resumed = T.Trainer(_cfg(tmp_path, *base, "--resume", name="part"))
    assert resumed.step == 3
    resumed.train()
    assert _metrics(tmp_path / "full" / "metrics.jsonl") == _metrics(tmp_path / "part" / "metrics.jsonl")
    for mine, theirs in ((full.system.state_dict(), resumed.system.state_dict()),
                         (full.ema.state_dict(), resumed.ema.state_dict())):
        assert list(mine) == list(theirs)  # the same entries (zip would stop at the shorter)
        for k in mine:
            assert torch.equal(mine[k], theirs[k]), k


def test_resume_refuses_changed_settings(tmp_path):
    T.Trainer(_cfg(tmp_path, "--steps", "1")).train()
    with pytest.raises(ValueError, match="lr=0.5"):
        T.Trainer(_cfg(tmp_path, "--steps", "2", "--lr", "0.5", "--resume"))
    with pytest.raises(SystemExit):  # the CLI says so before any work
        _cfg(tmp_path, "--resume", name="elsewhere")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        T.Trainer(dataclasses.replace(_cfg(tmp_path, name="elsewhere"), resume=True))


def test_an_earlier_run_is_never_overwritten_silently(tmp_path, capsys):
    first = T.Trainer(_cfg(tmp_path, "--steps", "2", "--log-every", "1"))
    first.train()
    out = tmp_path / "run"
    before = {f: (out / f).read_bytes() for f in ("checkpoint.pt", "metrics.jsonl", "config.json")}
    with pytest.raises(SystemExit):  # the CLI
        _cfg(tmp_path, "--steps", "3")
    assert "pass --resume to continue it, --overwrite to start afresh" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="--overwrite"):  # the API
        T.Trainer(dataclasses.replace(first.cfg, steps=3))
    assert {f: (out / f).read_bytes() for f in before} == before  # untouched
    with pytest.raises(SystemExit):
        _cfg(tmp_path, "--resume", "--overwrite")
    again = T.Trainer(_cfg(tmp_path, "--steps", "1", "--log-every", "1", "--overwrite"))
    assert not (out / "checkpoint.pt").exists() and (out / "metrics.jsonl").read_text() == ""
    again.train()
    assert [r["step"] for r in _metrics(out / "metrics.jsonl")] == [1]


def test_help_shows_defaults_in_words():
    text = T.build_parser().format_help()
    assert "(default: 1500)" in text and "(default: feature)" in text
    assert "SPEC" not in text


def test_checkpoint_survives_a_kill_during_save(tmp_path):
    """A process killed (SIGKILL) half-way through writing a checkpoint leaves the previous one
    loadable."""
    path = tmp_path / "ckpt.pt"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from fastgmmdiff.diffusion import trainer as T
        T.save_checkpoint({{"version": T.CHECKPOINT_VERSION, "step": 1, "w": torch.ones(1000)}}, {str(path)!r})
        real = torch.save
        def dying_save(obj, f, *a, **k):
            f.write(b"x" * 4096)   # a torn, partial file ...
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)   # ... and the process dies
        torch.save = dying_save
        T.save_checkpoint({{"version": T.CHECKPOINT_VERSION, "step": 2, "w": torch.zeros(1000)}}, {str(path)!r})
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    ck = T.load_checkpoint(str(path))
    assert ck["step"] == 1 and torch.equal(ck["w"], torch.ones(1000))
    torn = len(list(tmp_path.glob(".checkpoint-*.tmp")))
    assert torn == 1
    # an exception during save (disk full, ...) leaves no temp file behind
    def failing(obj, f, *a, **k):
        raise OSError("disk full")
    orig = torch.save
    torch.save = failing
    try:
        with pytest.raises(OSError, match="disk full"):
            T.save_checkpoint({"version": T.CHECKPOINT_VERSION, "step": 3}, str(path))
    finally:
        torch.save = orig
    assert T.load_checkpoint(str(path))["step"] == 1
    # the killed process left its torn temp file (never read); the failed save cleaned up its own
    assert len(list(tmp_path.glob(".checkpoint-*.tmp"))) == torn


def test_nan_guard_skips_then_stops_keeping_the_checkpoint(tmp_path):
    tr = T.Trainer(_cfg(tmp_path, "--steps", "20", "--ckpt-every", "2", "--max-bad-steps", "3", "--aux", "none"))
    tr.cfg.steps = 4
    tr.train()
    good = T.load_checkpoint(tr.ckpt_path)
    assert good["step"] == 4
    before = {k: v.clone() for k, v in tr.system.state_dict().items()}
    real_forward = tr.system.forward

    def poisoned(*a, **k):
        out = real_forward(*a, **k)
        out["loss"] = out["loss"] * float("nan")
        return out

    tr.system.forward = poisoned
    tr.model = tr.system
    tr.cfg.steps = 20
    with pytest.warns(RuntimeWarning, match="non-finite"):
        with pytest.raises(T.TrainingDiverged, match="3 non-finite steps in a row"):
            tr.train()
    for k, v in tr.system.state_dict().items():  # skipped steps change nothing
        assert torch.equal(v, before[k]), k
    ck = T.load_checkpoint(tr.ckpt_path)
    assert ck["step"] == 4
    for k, v in ck["model"].items():
        assert torch.equal(v, good["model"][k])


def test_one_bad_step_is_skipped_and_training_goes_on(tmp_path):
    tr = T.Trainer(_cfg(tmp_path, "--steps", "5", "--aux", "none", "--log-every", "1"))
    real_forward = tr.system.forward
    calls = {"n": 0}

    def once(*a, **k):
        calls["n"] += 1
        out = real_forward(*a, **k)
        if calls["n"] == 2:
            out["loss"] = out["loss"] + float("inf")
        return out

    tr.system.forward = once
    tr.model = tr.system
    with pytest.warns(RuntimeWarning, match="step skipped"):
        assert tr.train() == "done"
    rows = _metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["skipped"] for r in rows] == [False, True, False, False, False]
    assert tr.step == 5 and tr.bad_in_row == 0


def test_sigterm_saves_and_resume_finishes(tmp_path):
    out = tmp_path / "sig"
    cmd = [sys.executable, "-m", "fastgmmdiff.diffusion", *TINY, "--out", str(out), "--steps", "100000",
           "--log-every", "1", "--ckpt-every", "0"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "checkpoint saved" in err
    ck = T.load_checkpoint(str(out / "checkpoint.pt"))
    assert ck["step"] >= 3
    r = subprocess.run(cmd[:-6] + ["--out", str(out), "--steps", str(ck["step"] + 2), "--log-every", "1", "--resume"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    final = T.load_checkpoint(str(out / "checkpoint.pt"))
    assert final["step"] == ck["step"] + 2
    assert (out / "defects.md").exists() and list(out.glob("samples_*.png"))
    # Interrupted at a step of the signal's choosing and resumed in a new process, the run (NGMG
    # auxiliary loss, the default) logs and ends exactly as one that was never interrupted.
    assert T.TrainConfig().aux == "ngmg"
    straight = T.Trainer(_cfg(tmp_path, "--steps", str(ck["step"] + 2), "--log-every", "1", "--ckpt-every", "0",
                              name="straight"))
    assert straight.train() == "done"
    assert _metrics(out / "metrics.jsonl") == _metrics(tmp_path / "straight" / "metrics.jsonl")
    for mine, theirs in ((straight.system.state_dict(), final["model"]), (straight.ema.state_dict(), final["ema"])):
        assert list(mine) == list(theirs)
        for k in mine:
            assert torch.equal(mine[k], theirs[k]), k


def test_ddp_two_processes_agree(tmp_path):
    """torchrun with two CPU processes (gloo): both ranks end with identical parameters, and the
    checkpoint holds both ranks' random streams."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, torch
        from fastgmmdiff.diffusion import trainer as T
        cfg = T.parse_config({TINY!r} + ["--out", {str(tmp_path / "ddp")!r}, "--steps", "3", "--aux", "ngmg"])
        tr = T.Trainer(cfg)
        tr.train()
        flat = torch.cat([p.detach().flatten() for p in tr.system.parameters()])
        torch.save(flat, os.path.join(cfg.out, f"params_rank{{tr.rank}}.pt"))
        torch.distributed.destroy_process_group()
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a = torch.load(tmp_path / "ddp" / "params_rank0.pt")
    b = torch.load(tmp_path / "ddp" / "params_rank1.pt")
    assert torch.equal(a, b)
    ck = T.load_checkpoint(str(tmp_path / "ddp" / "checkpoint.pt"))
    assert len(ck["generators"]) == 2 and not torch.equal(ck["generators"][0], ck["generators"][1])
    # the parameters moved, identically, from their initialisation
    torch.manual_seed(0)
    cfg = T.parse_config(TINY + ["--out", str(tmp_path / "x"), "--aux", "ngmg"])
    fresh = T.Trainer(cfg)
    assert not torch.equal(a, torch.cat([p.detach().flatten() for p in fresh.system.parameters()]))


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--held-out", "0012"], "--held-out: a combination is 5 digits"),
    (["--held-out", "00211"], "feature 2 has 2 values"),
    (["--aux", "mse"], "invalid choice: 'mse'"),
    (["--conditioning", "pixel"], "invalid choice: 'pixel'"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--ema-decay", "1.0"], "--ema-decay must be in [0, 1)"),
    (["--sample-steps", "80", "--timesteps", "50"], "cannot exceed --timesteps"),
    (["--backend", "nope"], "--backend must be 'auto' or one of"),
    (["--device", "tpu"], "--device"),
])
def test_cli_rejects_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        T.parse_config(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_cuda_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        T.parse_config(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_missing_modules_are_named_before_any_work(tmp_path, monkeypatch, capsys):
    """tqdm (progress bar), Pillow (sample grids), SciPy (the checker): a run must not fail
    after training for want of one."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("PIL", "tqdm") else real(name, *a))
    rc = T.main([a for a in TINY if a != "--no-progress"] + ["--out", str(tmp_path / "m"), "--steps", "1"])  # with the progress bar
    assert rc == 2
    assert "needs pillow, tqdm: pip install pillow tqdm" in capsys.readouterr().err
    assert not (tmp_path / "m" / "config.json").exists()  # nothing was started


def test_a_version_1_checkpoint_still_resumes(tmp_path):
    """Checkpoints from before the EMA became an AveragedModel and the warm-up a scheduler."""
    base = ["--steps", "4", "--warmup", "10", "--ckpt-every", "2", "--aux", "none"]
    tr = T.Trainer(_cfg(tmp_path, *base))
    tr.cfg.steps = 2
    tr.train()
    ck = T.load_checkpoint(tr.ckpt_path)
    old = dict(ck, version=1, ema={k[len("module."):]: v for k, v in ck["ema"].items() if k.startswith("module.")})
    del old["scheduler"]
    T.save_checkpoint(old, tr.ckpt_path)
    resumed = T.Trainer(_cfg(tmp_path, *base, "--resume"))
    assert resumed.step == 2 and resumed._lr() == pytest.approx(1e-3 * 3 / 10)
    for k, v in resumed.ema.module.state_dict().items():
        assert torch.equal(v, ck["ema"]["module." + k]), k
    assert resumed.train() == "done" and resumed.step == 4


def test_sample_grid_marks_held_out_tiles(tmp_path):
    import numpy as np
    from PIL import Image

    from fastgmmdiff.diffusion.evaluate import save_grid

    path = tmp_path / "g.png"
    save_grid(torch.zeros(3, 3, 4, 4), str(path), nrow=3, pad=2, scale=2, captions=["00", "01", "10"],
              marked=[False, True, False], legend="digits: a, b; red: held out")
    im = np.asarray(Image.open(path).convert("RGB"))
    tile_left = lambda c: 2 + c * (8 + 2)  # noqa: E731  (pad + c · (scaled width + pad))
    assert tuple(im[5, tile_left(1) - 1]) == (200, 0, 0)  # the held-out tile's frame
    assert tuple(im[5, tile_left(0) - 1]) == (255, 255, 255)  # none around the others
    assert tuple(im[5, tile_left(1) + 2]) == (128, 128, 128)  # the image itself
    assert im.shape[0] == 2 + (8 + 2 + 12) + 14  # one row of tiles, its captions, the legend
