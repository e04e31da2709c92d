"""The reference trainer: ``fastgmmdiff-train`` / ``python -m fastgmmdiff.diffusion``.

    fastgmmdiff-train --dataset shapes --conditioning feature --aux ngmg --steps 2000 --out runs/a

Writes into ``--out``: ``config.json``; ``metrics.jsonl`` (one JSON object per logged step);
``checkpoint.pt`` (atomically: temp file + rename, every ``--ckpt-every`` steps, at the end
and on SIGTERM/SIGINT); ``samples_<step>.png`` (one image per feature combination, EMA
weights, DDIM); at the end ``defects.md`` / ``defects.json`` (defect rates on seen and held-out
combinations, :mod:`fastgmmdiff.diffusion.evaluate`).

``--resume`` continues from ``<out>/checkpoint.pt`` exactly: model, EMA, optimizer, step and
every random stream are restored, so a resumed run logs the same losses as an uninterrupted
one.  A folder that already holds a run is never written over silently: without ``--resume``
it is an error, unless ``--overwrite`` (which removes the earlier run's files first).  A non-finite loss or gradient skips the step with a warning; ``--max-bad-steps`` in a row
stop the run with :class:`TrainingDiverged`, leaving the last good checkpoint in place.

Multi-process data parallel: ``torchrun --nproc_per_node 2 -m fastgmmdiff.diffusion ...``
(PyTorch DDP; gloo on CPU, nccl on CUDA).  Each rank draws its own batches; rank 0 writes.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel

from . import data as data_mod
from .conditioning import AUX_KINDS, make_conditioner
from .model import DiffusionSystem

CHECKPOINT_VERSION = 2  # 2: EMA as torch.optim.swa_utils.AveragedModel, warm-up as an LR scheduler


class TrainingDiverged(RuntimeError):
    """Raised after ``max_bad_steps`` consecutive non-finite steps."""


@dataclass
class TrainConfig:
    """Every setting of a training run, with its default.

    Each field is the command-line flag of the same name (``aux_weight`` is ``--aux-weight``;
    ``progress=False`` is ``--no-progress``); ``fastgmmdiff-train --help`` describes them all, and
    :func:`parse_config` builds a checked ``TrainConfig`` from a command line.  Built directly
    (``TrainConfig(steps=200, out="runs/x")``) it is not checked: pass it to :class:`Trainer`.

    The main ones: ``dataset`` (``shapes`` or ``digits``), ``conditioning`` (``feature``: a
    Gaussian per feature value in its own slot of the condition vector; ``class``: a Gaussian per
    feature combination, the baseline), ``aux`` / ``aux_weight`` (the auxiliary classifier's loss
    on x̂₀ — ``ngmg``, ``bce`` or ``none`` — and its weight λ), ``held_out`` (feature
    combinations kept out of training, as strings like ``"00111"``), ``steps``, ``batch_size``
    (per process), ``device`` and ``backend`` (``auto`` or a name), ``amp`` (``auto``: bf16
    autocast on CUDA only), ``out`` (the run folder), ``resume`` / ``overwrite``.
    ``IDENTITY`` names the fields a ``resume`` may not change (they define the model, its data
    and its optimisation).
    """

    dataset: str = "shapes"
    conditioning: str = "feature"
    aux: str = "ngmg"
    aux_weight: float = 0.1
    held_out: list = field(default_factory=lambda: list(data_mod.SHAPES_DEFAULT_HELD_OUT))
    n_train: int = 8192
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    base: int = 32
    timesteps: int = 1000
    latent_d: int = 8
    seed: int = 0
    device: str = "auto"
    backend: str = "auto"
    amp: str = "auto"
    out: str = "runs/shapes"
    ckpt_every: int = 500
    sample_every: int = 0
    sample_steps: int = 50
    log_every: int = 10
    eval_per_combination: int = 16
    max_bad_steps: int = 5
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    # fields that define the model and its data: a resumed run must not change them
    IDENTITY = ("dataset", "conditioning", "aux", "aux_weight", "held_out", "n_train", "batch_size",
                "lr", "warmup", "grad_clip", "ema_decay", "base", "timesteps", "latent_d", "seed")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="fastgmmdiff-train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a diffusion model conditioned on Gaussian mixtures over image features "
                    "(or, as the baseline, over feature combinations), with an auxiliary classifier "
                    "trained with the negative Gaussian mixture gradient (NGMG) or BCE, and report how "
                    "many of its samples are defective, on combinations seen in training and held out.")
    a = p.add_argument
    a("--dataset", choices=sorted(data_mod.DATASETS), default=d.dataset)
    a("--conditioning", choices=("feature", "class"), default=d.conditioning,
      help="feature: each feature value owns a Gaussian in its own slot of the condition vector, so an "
           "unseen combination of values still lands where every slot was trained; class (the "
           "baseline): one Gaussian per feature combination seen in training")
    a("--aux", choices=AUX_KINDS, default=d.aux, help="auxiliary classifier loss")
    a("--aux-weight", type=float, default=d.aux_weight, help="λ: weight of the aux loss on x̂₀")
    a("--held-out", default=None,
      help="comma-separated combinations held out of training, e.g. 00111,11010 "
           "('none' for none; default: the dataset's default set)")
    a("--n-train", type=int, default=d.n_train, help="training images to render (shapes)")
    a("--steps", type=int, default=d.steps, help="total optimizer steps")
    a("--batch-size", type=int, default=d.batch_size, help="per process")
    a("--lr", type=float, default=d.lr)
    a("--warmup", type=int, default=d.warmup, help="linear learning-rate warm-up steps")
    a("--grad-clip", type=float, default=d.grad_clip)
    a("--ema-decay", type=float, default=d.ema_decay)
    a("--base", type=int, default=d.base, help="UNet base channels")
    a("--timesteps", type=int, default=d.timesteps)
    a("--latent-d", type=int, default=d.latent_d, help="GMM slot size d per feature")
    a("--seed", type=int, default=d.seed)
    a("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    a("--backend", default=d.backend, help="fastgmmdiff backend for the NGMG loss")
    a("--amp", choices=("auto", "bf16", "off"), default=d.amp,
      help="bf16 autocast (auto: on for CUDA, off on CPU)")
    a("--out", default=d.out, help="output folder")
    a("--ckpt-every", type=int, default=d.ckpt_every)
    a("--sample-every", type=int, default=d.sample_every, help="0: only at the end")
    a("--sample-steps", type=int, default=d.sample_steps, help="DDIM steps (0: ancestral DDPM)")
    a("--log-every", type=int, default=d.log_every)
    a("--eval-per-combination", type=int, default=d.eval_per_combination,
      help="samples per combination for the final defect table (0: skip)")
    a("--max-bad-steps", type=int, default=d.max_bad_steps)
    a("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    a("--overwrite", action="store_true",
      help="start afresh in an --out that holds an earlier run, deleting that run's files")
    a("--no-progress", dest="progress", action="store_false")
    return p


def parse_config(argv=None) -> TrainConfig:
    p = build_parser()
    ns = p.parse_args(argv)
    for name in ("steps", "batch_size", "timesteps", "base", "latent_d", "n_train", "log_every",
                 "max_bad_steps"):
        if getattr(ns, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(ns, name)}")
    for name in ("ckpt_every", "sample_every", "sample_steps", "warmup", "eval_per_combination"):
        if getattr(ns, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(ns, name)}")
    if not (ns.lr > 0 and math.isfinite(ns.lr)):
        p.error(f"--lr must be a positive number, got {ns.lr}")
    if not (ns.aux_weight >= 0 and math.isfinite(ns.aux_weight)):
        p.error(f"--aux-weight must be >= 0, got {ns.aux_weight}")
    if not 0 <= ns.ema_decay < 1:
        p.error(f"--ema-decay must be in [0, 1), got {ns.ema_decay}")
    if ns.grad_clip <= 0:
        p.error(f"--grad-clip must be > 0, got {ns.grad_clip}")
    if ns.sample_steps > ns.timesteps:
        p.error(f"--sample-steps ({ns.sample_steps}) cannot exceed --timesteps ({ns.timesteps})")
    if ns.held_out is None:
        held = list(data_mod.DEFAULT_HELD_OUT[ns.dataset])
    elif ns.held_out.strip().lower() in ("", "none"):
        held = []
    else:
        held = [h.strip() for h in ns.held_out.split(",") if h.strip()]
    try:
        data_mod.parse_held_out(held, data_mod.values_per_feature(ns.dataset))
    except ValueError as e:
        p.error(f"--held-out: {e}")
    ns.held_out = held
    if ns.resume and ns.overwrite:
        p.error("--resume and --overwrite exclude each other")
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 owns the folder (torchrun)
        try:
            check_out_folder(ns.out, ns.resume, ns.overwrite)
        except (FileExistsError, FileNotFoundError) as e:
            p.error(str(e))
    try:
        _resolve_device(ns.device)
    except (ValueError, RuntimeError) as e:
        p.error(f"--device: {e}")
    from .. import _dispatch

    if ns.backend != "auto":
        if ns.backend not in _dispatch._REGISTRY:
            p.error(f"--backend must be 'auto' or one of {sorted(_dispatch._REGISTRY)}, got {ns.backend!r}")
        why = _dispatch.unavailable_reason(ns.backend)
        if why is not None:
            p.error(f"--backend {ns.backend!r} is not available here: {why}")
    return TrainConfig(**vars(ns))


RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "config.json", "defects.md", "defects.json", "samples_*.png")


def _run_files(out: str) -> list:
    return sorted(f for pat in RUN_FILES for f in glob.glob(os.path.join(out, pat)))


def check_out_folder(out: str, resume: bool, overwrite: bool) -> None:
    """A run writes into ``out``: refuse to write over an earlier run unless told how (resume
    it, or overwrite it); ``--resume`` needs the earlier run's checkpoint."""
    if resume:
        if not os.path.exists(os.path.join(out, "checkpoint.pt")):
            raise FileNotFoundError(f"--resume: no checkpoint in {out!r} to continue from")
        return
    found = _run_files(out)
    if found and not overwrite:
        raise FileExistsError(
            f"{out!r} already holds a run ({', '.join(os.path.basename(f) for f in found[:4])}"
            f"{', ...' if len(found) > 4 else ''}): pass --resume to continue it, --overwrite to start "
            f"afresh and delete it, or choose another --out")


def check_requirements(cfg: "TrainConfig") -> None:
    """Every optional module the run will need, checked before any work (a run must not fail
    after training): tqdm for the progress bar, Pillow for the sample grids, SciPy for the
    shapes checker, scikit-learn for the digits data and judge."""
    need = [("PIL", "pillow"), ("scipy", "scipy")]
    if cfg.progress:
        need.append(("tqdm", "tqdm"))
    if cfg.dataset == "digits":
        need.append(("sklearn", "scikit-learn"))
    missing = [pip for mod, pip in need if importlib.util.find_spec(mod) is None]
    if missing:
        raise ModuleNotFoundError(f"fastgmmdiff-train needs {', '.join(missing)}: pip install {' '.join(missing)}"
                                  + (" (or run with --no-progress)" if missing == ["tqdm"] else ""))


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name!r} requested but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {name!r}")
    return dev


# --- checkpoints ------------------------------------------------------------------------------

def save_checkpoint(obj: dict, path: str) -> None:
    """Write ``obj`` to ``path`` atomically: a temp file in the same folder, fsync, rename.  A
    crash at any point leaves either the old or the new checkpoint, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a trainer checkpoint written by :func:`save_checkpoint` (``Trainer.state()``): a dict
    with ``version``, ``step``, ``config`` (the run's :class:`TrainConfig` as a dict), ``model``
    (the ``DiffusionSystem`` state dict), ``ema`` (the EMA denoiser, an ``AveragedModel`` state
    dict: sample from it), ``optimizer``, ``scheduler``, ``generators`` (one per process),
    ``torch_rng`` and ``bad_in_row``.  Tensors are mapped to ``map_location``.  A version-1
    checkpoint (EMA as a plain module copy) is converted on reading.

    Raises ``FileNotFoundError`` when there is no file and ``ValueError`` when it is not a
    fastgmmdiff trainer checkpoint of a known version.  The file is unpickled in full
    (``weights_only=False``): load only checkpoints you trust.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("version") not in (1, CHECKPOINT_VERSION):
        raise ValueError(f"{path} is not a fastgmmdiff trainer checkpoint (version {CHECKPOINT_VERSION})")
    if ckpt["version"] == 1 and "ema" in ckpt:  # EMA was a plain module copy, the warm-up a formula
        step, cfg = int(ckpt["step"]), ckpt.get("config", {})
        w, lr = int(cfg.get("warmup", 0)), float(cfg.get("lr", 0.0))
        ckpt["ema"] = {**{f"module.{k}": v for k, v in ckpt["ema"].items()},
                       "n_averaged": torch.tensor(step, dtype=torch.long)}
        ckpt["scheduler"] = {"last_epoch": step, "_step_count": step + 1, "lr_lambdas": [None],
                             "_last_lr": [lr * _warmup_factor(step, w)]}
        ckpt["version"] = CHECKPOINT_VERSION
    return ckpt


def _warmup_factor(step: int, warmup: int) -> float:
    """The learning rate's factor at ``step`` (counted from 0): linear over ``warmup`` steps."""
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


def _ema_warmup(decay: float):
    """``multi_avg_fn`` for AveragedModel: EMA with decay min(decay, (1 + n) / (10 + n)) after n
    averaged steps (AveragedModel copies the weights at the first)."""
    @torch.no_grad()
    def update(ema_params, params, n_averaged):
        d = min(decay, (1.0 + float(n_averaged)) / (10.0 + float(n_averaged)))
        for e, p in zip(ema_params, params):
            e.lerp_(p, 1.0 - d)

    return update


def build_system(cfg: TrainConfig, dataset, device) -> DiffusionSystem:
    cond = make_conditioner(cfg.conditioning, dataset, d=cfg.latent_d, seed=cfg.seed, backend=cfg.backend)
    return DiffusionSystem(cond, dataset.channels, base=cfg.base, timesteps=cfg.timesteps,
                           aux=cfg.aux, aux_weight=cfg.aux_weight).to(device)


def load_dataset(cfg: TrainConfig):
    return data_mod.load(cfg.dataset, seed=cfg.seed, held_out=cfg.held_out,
                         n=cfg.n_train if cfg.dataset == "shapes" else None)


# --- the trainer ----------------------------------------------------------------------------

class Trainer:
    """Trains ``cfg``'s model (module docstring) and keeps its run folder ``cfg.out``.

    ``Trainer(cfg)`` renders or loads the dataset, builds the :class:`DiffusionSystem` (denoiser,
    conditioner, auxiliary classifier), its EMA copy, AdamW with a linear warm-up, and, with
    ``cfg.resume``, restores all of it and every random stream from ``<out>/checkpoint.pt``.
    It refuses an ``out`` that holds an earlier run unless ``cfg.resume`` or ``cfg.overwrite``.

    - ``train()`` runs to ``cfg.steps`` and returns ``"done"``, or ``"interrupted"`` after
      SIGTERM/SIGINT (the checkpoint saved first); it raises :class:`TrainingDiverged` after
      ``cfg.max_bad_steps`` non-finite steps in a row, leaving the last good checkpoint.
    - ``train_step()`` is one optimizer step; it returns the losses, the gradient norm and
      whether the step was skipped.
    - ``sample(labels)`` draws images for feature combinations with the EMA weights;
      ``write_samples()`` writes one grid of every combination to ``out``.
    - ``save()`` / ``state()``: the checkpoint (see :func:`load_checkpoint`).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DDP; rank 0 writes.
    Example::

        t = Trainer(TrainConfig(steps=200, out="runs/demo", progress=False))
        t.train()
        images = t.sample(torch.tensor([[0, 1, 1, 0, 1]]))
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.rank == 0:  # before any work; rank 0 owns the folder
            check_out_folder(cfg.out, cfg.resume, cfg.overwrite)
        self.device = _resolve_device(cfg.device)
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = self.rank == 0
        self.dataset = load_dataset(cfg)
        self.images = self.dataset.images.to(self.device)
        self.labels = self.dataset.labels.to(self.device)
        torch.manual_seed(cfg.seed)  # parameter initialisation: identical on every rank
        self.system = build_system(cfg, self.dataset, self.device)
        # EMA of the denoiser's weights (sampled from): torch's AveragedModel with an EMA whose
        # decay warms up as min(ema_decay, (1 + n) / (10 + n)), so that a short run's EMA is not
        # dominated by its first weights (get_ema_multi_avg_fn's decay is constant).
        self.ema = AveragedModel(self.system.denoiser, multi_avg_fn=_ema_warmup(cfg.ema_decay), use_buffers=True)
        self.opt = torch.optim.AdamW([p for p in self.system.parameters() if p.requires_grad],
                                     lr=cfg.lr, weight_decay=0.0)
        w = cfg.warmup  # linear learning-rate warm-up over w steps, stepped once per train_step
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _warmup_factor(s, w))
        self.model = self.system
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.system, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.gen = torch.Generator(self.device).manual_seed(cfg.seed * 1_000_003 + self.rank)
        self.step = 0
        self.bad_in_row = 0
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and self.device.type == "cuda")
        self._stop_signal = None
        self.ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
        self.metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        if self.is_main:
            os.makedirs(cfg.out, exist_ok=True)
        if cfg.resume:
            self._resume()
        elif self.is_main:
            for f in _run_files(cfg.out):  # --overwrite (check_out_folder refused otherwise)
                os.unlink(f)
            with open(os.path.join(cfg.out, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(cfg), f, indent=1)
            open(self.metrics_path, "w").close()

    # -- state --
    def state(self) -> dict:
        """The checkpoint's contents (:func:`load_checkpoint`); collective under DDP."""
        gens = [self.gen.get_state()]
        if self.world > 1:
            gens = [None] * self.world
            dist.all_gather_object(gens, self.gen.get_state().cpu())
        return {"version": CHECKPOINT_VERSION, "step": self.step, "config": dataclasses.asdict(self.cfg),
                "model": self.system.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "generators": gens,
                "torch_rng": torch.get_rng_state(), "bad_in_row": self.bad_in_row}

    def save(self) -> None:
        st = self.state()  # collective under DDP: every rank takes part
        if self.is_main:
            save_checkpoint(st, self.ckpt_path)

    def _resume(self) -> None:
        ckpt = load_checkpoint(self.ckpt_path)
        old = ckpt["config"]
        diff = [k for k in TrainConfig.IDENTITY if old.get(k) != getattr(self.cfg, k)]
        if diff:
            raise ValueError("--resume with settings that differ from the checkpoint's: " + ", ".join(
                f"{k}={getattr(self.cfg, k)!r} (checkpoint: {old.get(k)!r})" for k in diff))
        if len(ckpt["generators"]) != self.world:
            raise ValueError(f"checkpoint was written by {len(ckpt['generators'])} process(es); "
                             f"resume with the same number (got {self.world})")
        self.system.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.gen.set_state(ckpt["generators"][self.rank].to(self.gen.get_state().device))
        torch.set_rng_state(ckpt["torch_rng"])
        self.step = int(ckpt["step"])
        self.bad_in_row = int(ckpt.get("bad_in_row", 0))
        if self.is_main and os.path.exists(self.metrics_path):
            # drop lines logged after the checkpoint: the resumed run writes them again
            with open(self.metrics_path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            with open(self.metrics_path, "w") as f:
                f.writelines(keep)

    # -- one step --
    def _lr(self) -> float:
        """The learning rate of the next step (the scheduler's)."""
        return self.sched.get_last_lr()[0]

    def train_step(self) -> dict:
        """One optimizer step on a batch drawn with the run's generator.  Returns the losses
        (``loss`` and its terms), ``grad_norm`` and ``skipped`` (True when the loss or the
        gradient was not finite: no update, counted in ``bad_in_row``)."""
        idx = torch.randint(0, len(self.images), (self.cfg.batch_size,), device=self.device, generator=self.gen)
        x0, labels = self.images[idx], self.labels[idx]
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            losses = self.model(x0, labels, self.gen)
        losses["loss"].backward()
        gnorm = torch.nn.utils.clip_grad_norm_(self.system.parameters(), self.cfg.grad_clip)
        ok = torch.isfinite(losses["loss"].detach()) & torch.isfinite(gnorm)
        if self.world > 1:
            flag = ok.float()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = flag > 0
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["grad_norm"] = float(gnorm)
        if bool(ok):
            self.opt.step()
            self.ema.update_parameters(self.system.denoiser)
            self.bad_in_row = 0
            out["skipped"] = False
        else:
            self.opt.zero_grad(set_to_none=True)
            self.bad_in_row += 1
            out["skipped"] = True
        self.step += 1
        self.sched.step()  # every step, skipped or not: the schedule follows the step count
        return out

    # -- loop --
    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def train(self) -> str:
        """Run to ``cfg.steps``; returns ``"done"`` or ``"interrupted"`` (after a signal; the
        checkpoint is saved first)."""
        cfg = self.cfg
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                handlers[s] = signal.signal(s, self._on_signal)
        bar = None
        if self.is_main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.conditioning}/{cfg.aux}",
                       dynamic_ncols=True)
        try:
            t0 = time.perf_counter()
            while self.step < cfg.steps:
                out = self.train_step()
                if out["skipped"]:
                    msg = (f"step {self.step}: non-finite loss or gradient (loss={out['loss']}, "
                           f"grad_norm={out['grad_norm']}); step skipped "
                           f"({self.bad_in_row}/{cfg.max_bad_steps} in a row)")
                    warnings.warn(msg, RuntimeWarning, stacklevel=2)
                    if self.bad_in_row >= cfg.max_bad_steps:
                        where = (f"the last good checkpoint is {self.ckpt_path}"
                                 if os.path.exists(self.ckpt_path) else "no checkpoint was written yet")
                        raise TrainingDiverged(f"{cfg.max_bad_steps} non-finite steps in a row (at step "
                                               f"{self.step}); stopping. {where}. Try a lower --lr.")
                if self.is_main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    now = time.perf_counter()
                    out["step"] = self.step
                    out["lr"] = self._lr()
                    out["sec_per_step"] = (now - t0) / cfg.log_every if self.step % cfg.log_every == 0 else None
                    t0 = now
                    with open(self.metrics_path, "a") as f:
                        f.write(json.dumps(out) + "\n")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{out['loss']:.4f}")
                # never replace the last good checkpoint with one taken inside a bad streak
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and not self.bad_in_row:
                    self.save()
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.write_samples()
                if self._stop_signal is not None:
                    self.save()
                    if self.is_main:
                        print(f"[fastgmmdiff-train] signal {self._stop_signal}: checkpoint saved at "
                              f"step {self.step} ({self.ckpt_path}); continue with --resume",
                              file=sys.stderr)
                    return "interrupted"
            self.save()
            return "done"
        finally:
            if bar is not None:
                bar.close()
            for s, h in handlers.items():
                signal.signal(s, h)

    # -- outputs --
    def sample(self, labels, *, steps=None, seed=0, allow_unseen=True):
        """Images in [−1, 1] for ``labels`` ([B, F] value indices per feature, −1: unspecified),
        drawn with the EMA denoiser: DDIM with ``steps`` steps (default ``cfg.sample_steps``; 0:
        ancestral DDPM through all T), reproducible from ``seed``.  ``allow_unseen``: whether
        the class-conditioned baseline may be asked for a combination it never trained on (a
        fresh component; otherwise an error); feature conditioning takes any combination."""
        g = torch.Generator(self.device).manual_seed(seed)
        steps = self.cfg.sample_steps if steps is None else steps
        return self.system.sample(labels, steps=steps or None, generator=g, denoiser=self.ema,
                                  allow_unseen=allow_unseen)

    def write_samples(self):
        """Write ``samples_<step>.png`` into ``out``: one captioned image per feature combination,
        held-out combinations marked.  Returns its path (None on ranks other than 0)."""
        if not self.is_main:
            return None
        from .evaluate import save_grid

        from .data import format_combination

        combos = self.dataset.combinations()
        imgs = self.sample(torch.tensor(combos, device=self.device))
        held = set(self.dataset.held_out)
        names = "digits: " + ", ".join(n for n, _ in self.dataset.features)
        path = os.path.join(self.cfg.out, f"samples_{self.step:06d}.png")
        save_grid(imgs, path, nrow=8, captions=[format_combination(c) for c in combos],
                  marked=[c in held for c in combos],
                  legend=f"{names}" + ("; red: held out" if held else ""))
        return path


def main(argv=None) -> int:
    cfg = parse_config(argv)
    try:
        check_requirements(cfg)
    except ModuleNotFoundError as e:
        print(f"[fastgmmdiff-train] error: {e}", file=sys.stderr)
        return 2
    trainer = Trainer(cfg)
    try:
        status = trainer.train()
    except TrainingDiverged as e:
        print(f"[fastgmmdiff-train] error: {e}", file=sys.stderr)
        return 1
    if status == "interrupted":
        return 128 + int(trainer._stop_signal)
    if trainer.is_main:
        path = trainer.write_samples()
        print(f"[fastgmmdiff-train] {trainer.step} steps; samples: {path}")
        if cfg.eval_per_combination:
            from .evaluate import defect_report

            rep = defect_report(trainer, cfg.eval_per_combination)
            print(rep["markdown"])
    if trainer.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def cli():  # console script entry point
    sys.exit(main())
