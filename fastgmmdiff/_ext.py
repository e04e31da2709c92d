"""Loads the optional compiled extension ``fastgmmdiff._C`` once.

A failed load (not built, built against another torch, missing CUDA runtime...) is logged once
and leaves the package importable: the "cpu"/"cuda" backends then report the reason through
``available_backends()`` and the error raised when one is asked for by name.
"""

from __future__ import annotations

import logging

_log = logging.getLogger("fastgmmdiff")
_state: dict = {}


def load():
    """The ``_C`` module, or None (then ``load_error()`` says why)."""
    if "module" not in _state:
        try:
            from . import _C  # noqa: F401  (registers the fastgmmdiff::log_prob ops)
            from ._autograd import register_log_prob_op, register_ngmg_fakes, register_target_op

            # Fakes only: the autograd of these ops is C++ (csrc/autograd.cpp).
            register_log_prob_op("fastgmmdiff::log_prob", "fastgmmdiff::log_prob_backward", autograd=False)
            register_target_op("fastgmmdiff::log_prob_target", "fastgmmdiff::log_prob_target_backward",
                               autograd=False)
            register_ngmg_fakes("fastgmmdiff::ngmg", "fastgmmdiff::ngmg_backward")
            _state["module"], _state["error"] = _C, None
        except Exception as e:  # ImportError, OSError (undefined symbols), RuntimeError
            _state["module"], _state["error"] = None, f"{type(e).__name__}: {e}"
            _log.warning("fastgmmdiff: compiled kernels unavailable (%s); using the torch backend",
                         _state["error"])
    return _state["module"]


def load_error():
    load()
    return _state["error"]
