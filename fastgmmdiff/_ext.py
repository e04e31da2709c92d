"""Loads the optional compiled extension ``fastgmmdiff._C`` once.

The package imports without it: a failed load (not built, built against another torch, a
missing CUDA runtime...) leaves the "cpu"/"cuda" backends unavailable, ``available_backends()``
says so, and asking for one by name is an error that says why.  At import (``check()``), a
build that was meant to have kernels but whose kernels do not load, or were built against
another torch, is one :class:`CompiledKernelsWarning` naming the command that rebuilds them.
What was built, and against which torch, is in ``fastgmmdiff/_build_info.py`` (written by
setup.py); a pure-Python install (``FASTGMMDIFF_SKIP_BUILD=1``) warns nothing.
"""

from __future__ import annotations

import warnings

_state: dict = {}

REBUILD = ("rebuild them against the installed torch: `pip install --no-build-isolation .` in the "
           "source tree (`-e .` for an editable install), or `pip install --no-build-isolation "
           "--force-reinstall --no-deps fastgmmdiff`")


class CompiledKernelsWarning(UserWarning):
    """The compiled kernels are missing or were built for another torch."""


def build_info():
    """(extension, torch_version) of the build: extension 'cpu', 'cpu+cuda' or 'none'; (None,
    None) when unknown (a source tree that was never built)."""
    try:
        from . import _build_info
    except ImportError:
        return None, None
    return getattr(_build_info, "EXTENSION", None), getattr(_build_info, "TORCH_VERSION", None)


def load():
    """The ``_C`` module, or None (then ``load_error()`` says why)."""
    if "module" not in _state:
        try:
            from . import _C  # noqa: F401  (registers the fastgmmdiff::log_prob ops)
            from ._autograd import register_log_prob_op, register_ngmg_fakes

            # Fakes only: the autograd of these ops is C++ (csrc/autograd.cpp).
            register_log_prob_op("fastgmmdiff::log_prob", "fastgmmdiff::log_prob_backward", autograd=False)
            register_log_prob_op("fastgmmdiff::log_prob_scale", "fastgmmdiff::log_prob_scale_backward",
                                 autograd=False)
            register_ngmg_fakes("fastgmmdiff::ngmg", "fastgmmdiff::ngmg_backward")
            _state["module"], _state["error"] = _C, None
        except Exception as e:  # ImportError, OSError (undefined symbols), RuntimeError
            _state["module"], _state["error"] = None, f"{type(e).__name__}: {e}"
    return _state["module"]


def load_error():
    load()
    return _state["error"]


def check() -> None:
    """At import: one warning when a build with kernels cannot load them, or built them against
    another torch (module docstring)."""
    import torch

    extension, built_for = build_info()
    if extension == "none":
        return
    if load() is None:
        if extension is None and "No module named" in (load_error() or ""):
            return  # an unbuilt source tree: available_backends() says so when asked
        warnings.warn(f"fastgmmdiff: the compiled kernels did not load ({load_error()}); the slower "
                      f"'torch' backend runs instead. To get them, {REBUILD}.", CompiledKernelsWarning,
                      stacklevel=3)
    elif built_for is not None and built_for != torch.__version__:
        warnings.warn(f"fastgmmdiff: the compiled kernels were built against torch {built_for}, and torch "
                      f"{torch.__version__} is running; {REBUILD}.", CompiledKernelsWarning, stacklevel=3)
