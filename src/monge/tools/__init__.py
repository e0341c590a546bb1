"""Tools built on the solvers: exact 1-D OT, sliced Wasserstein."""

from monge.tools.sliced import max_sliced_wasserstein, sliced_wasserstein
from monge.tools.univariate import wasserstein_1d

__all__ = ["wasserstein_1d", "sliced_wasserstein", "max_sliced_wasserstein"]
