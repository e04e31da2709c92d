"""fastgmmdiff: Gaussian-mixture log-densities and the negative Gaussian mixture gradient (NGMG)
for PyTorch, with fused kernels and a thin autograd API.

Public API: :func:`gmm_log_prob`, :func:`ngmg_loss`, :class:`GaussianMixture`,
:func:`available_backends`, :func:`backend_for` (which backend ``"auto"`` picks, and why), and the plain-PyTorch oracle in :mod:`fastgmmdiff.reference`.
"""

from . import _ext, reference
from ._dispatch import available_backends
from .functional import backend_for, gmm_log_prob, ngmg_loss
from .mixture import GaussianMixture

__version__ = "0.1.0"

_ext.check()  # one warning if the compiled kernels are missing or built for another torch
__all__ = ["gmm_log_prob", "ngmg_loss", "GaussianMixture", "available_backends", "backend_for", "reference",
           "__version__"]
