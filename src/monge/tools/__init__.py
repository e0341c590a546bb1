"""Tools built on the solvers: exact 1-D OT, sliced Wasserstein, semi-discrete OT,
projection-robust Wasserstein, the debiased low-rank divergence."""

from monge.tools.divergence import LowRankDivergence, lowrank_divergence
from monge.tools.prw import PRWResult, projection_robust_wasserstein
from monge.tools.semidiscrete import SemidiscreteSolution, semidiscrete
from monge.tools.sliced import max_sliced_wasserstein, sliced_wasserstein
from monge.tools.univariate import wasserstein_1d

__all__ = [
    "wasserstein_1d",
    "sliced_wasserstein",
    "max_sliced_wasserstein",
    "semidiscrete",
    "SemidiscreteSolution",
    "projection_robust_wasserstein",
    "PRWResult",
    "lowrank_divergence",
    "LowRankDivergence",
]
