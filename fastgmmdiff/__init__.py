"""fastgmmdiff: Gaussian-mixture log-densities and the negative Gaussian mixture gradient (NGMG)
for PyTorch, with fused kernels and a thin autograd API.

Public API: :func:`gmm_log_prob`, :func:`ngmg_loss`, :class:`GaussianMixture`,
:class:`MixtureOfGaussians` (a ``torch.distributions`` front end, :mod:`fastgmmdiff.distributions`),
the parameter converters of :mod:`fastgmmdiff.convert`,
:func:`available_backends`, :func:`backend_for` (which backend ``"auto"`` picks, and why), and the plain-PyTorch oracle in :mod:`fastgmmdiff.reference`.
"""

from . import _ext, convert, reference
from ._dispatch import available_backends
from .functional import OuterEvaluationWarning, backend_for, gmm_log_prob, ngmg_loss
from .mixture import GaussianMixture
from . import distributions  # noqa: E402  (imports functional)
from .distributions import MixtureOfGaussians

__version__ = "0.1.0"

_ext.check()  # one warning if the compiled kernels are missing or built for another torch
__all__ = ["gmm_log_prob", "ngmg_loss", "GaussianMixture", "MixtureOfGaussians", "available_backends", "backend_for",
           "convert", "distributions", "reference", "OuterEvaluationWarning", "__version__"]
