"""Backend registry and per-call dispatch.

A backend is a pair of registered ops (see ``_autograd``) plus the device types it serves and
a probe that says whether it can run here (and if not, why).  Nothing is swapped at import:
``resolve`` picks per call from the tensors' device.

``backend="auto"`` takes the first available backend of ``AUTO_ORDER[device type]`` that can
run the problem (a backend with limits — the CUDA kernels' shared memory per block, their D —
says why not through ``Backend.limits``); other device types get ``"torch"``.  On CUDA
tensors ``auto`` takes only the GPU backends a GPU run has validated (``VALIDATED``; none yet),
so until then it is ``"torch"``.  Asked for by
name, a backend that cannot run the problem is an error saying why.  The order is the measured
one: see the README's "Backends" section, which states the rule and the measurements behind it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import os

import torch


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: Optional[tuple]  # None: any device
    probe: Callable[[], Optional[str]]  # returns None when available, else the reason
    op: Callable[[], Callable]  # returns the forward op (called only when available)
    # returns the one-component-per-point forward op (NGMG with a target); None for the
    # api_layout backends, whose fused ``ngmg`` op does the target itself
    target_op: Optional[Callable[[], Callable]]
    how_to_get: str
    # True: the ops take the API layout (G axes as given; see csrc/ops.h) and return [N] or
    # [G, N], and ngmg_loss runs the compiled fused ``ngmg`` op (loss, normaliser and target
    # inside); False: the canonical layout of _checks, returning [G, N], and ngmg_loss composes
    # ``op`` / ``target_op`` with the exp and the normaliser in PyTorch.
    api_layout: bool = False
    # True: the ops check NGMG targets' range themselves (ValueError), so the API need not
    # read the values first (the CUDA kernels cannot without a sync: they give NaN instead).
    checks_target_range: bool = False
    # limits(problem, has_target, auto) -> why this backend cannot (auto: should not) run the
    # problem, a ``_checks.Canonical``; None when it can.  None: no limits.
    limits: Optional[Callable] = None


_REGISTRY: dict = {}

# Preference for backend="auto" per device type (see module docstring).
AUTO_ORDER = {
    "cpu": ("cpu", "torch"),
    "cuda": ("cuda", "triton", "torch"),
}

# Backends whose kernels a GPU run has validated (the GPU tests passed on the device and the
# benchmarks measured them against the peers), per device type, each with where that
# measurement is recorded.  ``"auto"`` passes over a backend of AUTO_ORDER that is not listed
# here (the plain-PyTorch ``torch`` backend needs no GPU run), so kernels that have never run on
# a GPU are used only when asked for by name, or when FASTGMMDIFF_AUTO_UNVALIDATED=1 (the GPU
# check sets it to measure the intended order).
VALIDATED = {
    "cuda": {},  # e.g. "cuda": "bench/RESULTS.md, <card>, <date>: every GPU test passed; <ratio> on mdn"
}


def _not_validated(name: str, device_type: str) -> Optional[str]:
    """Why ``auto`` should not pick backend ``name`` on ``device_type`` tensors yet, or None."""
    if device_type not in VALIDATED or name == "torch" or name in VALIDATED[device_type]:
        return None
    if os.environ.get("FASTGMMDIFF_AUTO_UNVALIDATED", "") not in ("", "0"):
        return None
    return ("not validated on a GPU yet (no GPU run has tested and measured its kernels: bench/RESULTS.md); "
            "ask for it by name, or set FASTGMMDIFF_AUTO_UNVALIDATED=1 to let 'auto' use it")


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


_PROBED: dict = {}


@torch.compiler.assume_constant_result
def unavailable_reason(name: str) -> Optional[str]:
    """None when backend ``name`` can run here, else why not (probed once, then cached)."""
    if name not in _PROBED:
        _PROBED[name] = _REGISTRY[name].probe()
    return _PROBED[name]


def available_backends() -> list:
    """Names of the backends that can run in this process, in registration order (not a
    preference: ``backend="auto"`` follows ``AUTO_ORDER`` per device type, and
    :func:`fastgmmdiff.backend_for` says which one it picks for given tensors, and why)."""
    return [n for n in _REGISTRY if unavailable_reason(n) is None]


@dataclass(frozen=True)
class BackendChoice:
    """What ``backend="auto"`` picks for a problem: ``name``, and for every backend of the
    device's order the reason it was passed over (``None``: the one picked, or not reached)."""

    name: str
    device_type: str
    considered: tuple  # ((backend, reason or None), ...) in AUTO_ORDER

    def __str__(self):
        lines = [f"backend='auto' on {self.device_type} tensors picks {self.name!r}"]
        for name, why in self.considered:
            lines.append(f"  {name}: {'picked' if name == self.name else why or 'not reached'}")
        return "\n".join(lines)


def _passed_over(name: str, device_type: str, problem, has_target: bool) -> Optional[str]:
    """Why ``auto`` does not take backend ``name`` of the device's order for this problem (not
    registered, unavailable here, not validated on a GPU yet, or a limit of its own), or None."""
    if name not in _REGISTRY:
        return "not registered"
    why = unavailable_reason(name) or _not_validated(name, device_type)
    if why is None and problem is not None and _REGISTRY[name].limits is not None:
        why = _REGISTRY[name].limits(problem, has_target, True)
    return why


def explain(device: torch.device, problem=None, has_target: bool = False) -> BackendChoice:
    """The reasoning of ``resolve("auto", ...)``, spelled out (see :class:`BackendChoice`)."""
    order = AUTO_ORDER.get(device.type, ("torch",))
    picked = resolve("auto", device, problem, has_target).name
    considered, reached = [], True
    for name in order:
        if not reached:
            considered.append((name, None))
            continue
        if name == picked:
            considered.append((name, None))
            reached = False
            continue
        considered.append((name, _passed_over(name, device.type, problem, has_target)))
    if picked not in order:
        considered.append((picked, None))
    return BackendChoice(picked, device.type, tuple(considered))


def resolve(backend: str, device: torch.device, problem=None, has_target: bool = False) -> Backend:
    """The backend for a call on ``device``'s tensors.

    ``backend="auto"``: the first backend of ``AUTO_ORDER[device.type]`` (``("torch",)`` for
    other device types) that is available here, validated on a GPU for CUDA tensors
    (``VALIDATED``), and without a limit against ``problem`` (a ``_checks.Canonical``;
    ``has_target``: NGMG with a target); ``"torch"`` when none is.  :func:`explain` spells the
    choice out.

    By name: that backend, or an error that says why not — ``TypeError`` (not a string),
    ``ValueError`` (an unknown name; tensors on a device it does not serve; a limit of its
    against this problem), ``RuntimeError`` (not available in this process, with how to get it).
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            if _passed_over(name, device.type, problem, has_target) is None:
                return _REGISTRY[name]
        return _REGISTRY["torch"]
    if backend not in _REGISTRY:
        raise ValueError(f"unknown backend {backend!r}; known: 'auto', " + ", ".join(map(repr, _REGISTRY)))
    b = _REGISTRY[backend]
    reason = unavailable_reason(backend)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available: {reason}. {b.how_to_get}")
    if b.device_types is not None and device.type not in b.device_types:
        raise ValueError(
            f"backend {backend!r} runs on {', '.join(b.device_types)} tensors; these are on {device}"
        )
    if problem is not None and b.limits is not None:
        why = b.limits(problem, has_target, False)
        if why is not None:
            raise ValueError(f"backend {backend!r} cannot run this problem: {why}. backend='auto' takes "
                             "the next backend that can")
    return b


def _torch_ops_loaded():
    from . import _torch_ops  # noqa: F401  (registers the ops)

    return torch.ops.fastgmmdiff


register(Backend("torch", None, lambda: None, lambda: _torch_ops_loaded().log_prob_torch,
                 lambda: _torch_ops_loaded().log_prob_target_torch, ""))


_BUILD_HINT = ("Build it with `pip install --no-build-isolation .` in a checkout (needs a C++ "
               "compiler, and nvcc plus a CUDA build of torch for the CUDA kernels)")


def _probe_compiled(cuda: bool):
    from . import _ext

    mod = _ext.load()
    if mod is None:
        return f"the compiled extension fastgmmdiff._C did not load ({_ext.load_error()})"
    if cuda:
        if not mod.has_cuda():
            return "fastgmmdiff._C was built without CUDA kernels"
        if not torch.cuda.is_available():
            return "no CUDA device is available to torch"
    return None


def _compiled(name):
    return lambda: getattr(torch.ops.fastgmmdiff, name)


register(Backend("cpu", ("cpu",), lambda: _probe_compiled(False), _compiled("log_prob"),
                 None, _BUILD_HINT, api_layout=True,
                 checks_target_range=True))
@torch.compiler.assume_constant_result
def _cuda_plan(cov: str, D: int, K: int, elem: int, device: int) -> tuple:
    """(why the CUDA kernels cannot take such problems on this device or "", the most points per
    mixture their backward takes in one block), from csrc/cuda/plan.h; cached."""
    key = (cov, D, K, elem, device)
    if key not in _CUDA_PLANS:
        from . import _ext

        _CUDA_PLANS[key] = tuple(_ext.load().cuda_limits(cov, D, K, elem, device))
    return _CUDA_PLANS[key]


_CUDA_PLANS: dict = {}


def _cuda_limits(c, has_target: bool, auto: bool) -> Optional[str]:
    """The "cuda" backend's limits (``Backend.limits``): shared memory per block of the backward
    and D; under ``torch.use_deterministic_algorithms(True)``, ``auto`` also passes over it where
    its backward would use atomics (a target; x shared by several mixtures; more points per
    mixture than one block takes)."""
    device = c.device.index if c.device.index is not None else (
        torch.cuda.current_device() if c.device.type == "cuda" else 0)
    why, max_block = _cuda_plan(c.covariance_type, c.D, c.K, 8 if c.dtype == torch.float64 else 4, device)
    if why:
        return why
    if auto and torch.are_deterministic_algorithms_enabled():
        x = c.api[0]
        if has_target or (c.G > 1 and (x.dim() == 2 or x.shape[0] == 1)) or c.N > max_block:
            return "torch.use_deterministic_algorithms(True), and the CUDA backward would use atomics here"
    return None


register(Backend("cuda", ("cuda",), lambda: _probe_compiled(True), _compiled("log_prob"),
                 None, _BUILD_HINT, api_layout=True, limits=_cuda_limits))


# --- Triton (kernels/, installed as fastgmmdiff.kernels) ---------------------------------------

def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe_triton():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    if not (torch.cuda.is_available() or _triton_interpreted()):
        return "no CUDA device is available to torch (TRITON_INTERPRET=1 runs the kernels on the CPU, for tests)"
    try:
        from .kernels import gmm  # noqa: F401  (registers the ops)
    except Exception as e:  # a broken Triton install must not break the package
        return f"the Triton kernels failed to load ({type(e).__name__}: {e})"
    return None


def _triton_op(name):
    def get():
        from .kernels import gmm  # noqa: F401

        return getattr(torch.ops.fastgmmdiff, name)

    return get


# Under Triton's CPU interpreter (TRITON_INTERPRET=1, a test mode) the backend also takes CPU
# tensors when asked for by name; "auto" never picks it for CPU tensors.
register(Backend("triton", ("cuda", "cpu") if _triton_interpreted() else ("cuda",), _probe_triton,
                 _triton_op("log_prob_triton"), _triton_op("log_prob_target_triton"),
                 "pip install triton (a CUDA build of torch and an NVIDIA GPU)"))
