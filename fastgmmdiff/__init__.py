"""fastgmmdiff: Gaussian-mixture log-densities and the negative Gaussian mixture gradient (NGMG)
for PyTorch, with fused kernels and a thin autograd API.

Public API: :func:`gmm_log_prob`, :func:`ngmg_loss`, :class:`GaussianMixture`,
:func:`available_backends`, and the plain-PyTorch oracle in :mod:`fastgmmdiff.reference`.
"""

from . import reference
from ._dispatch import available_backends
from .functional import gmm_log_prob, ngmg_loss
from .mixture import GaussianMixture

__version__ = "0.1.0"
__all__ = ["gmm_log_prob", "ngmg_loss", "GaussianMixture", "available_backends", "reference",
           "__version__"]
