"""monge: optimal transport in JAX.

Layers (see docs/architecture.md): `costs` -> `geometry` -> `problems` -> `solvers`
-> `solution`, and the front door `solve` / `solve_matrix` that builds them.
Importing monge never changes JAX's configuration.
"""

from monge import costs, datasets, geometry, plot, problems, solution, solvers, tools
from monge.front import solve, solve_matrix
from monge.geometry import CostMatrix, LowRankCost, PointCloud
from monge.problems import LinearProblem, PartialProblem
from monge.solution import LowRankSolution, Solution, Status
from monge.solvers import (
    Exact,
    ImplicitAdjoint,
    LowRankSinkhorn,
    PartialExact,
    PartialSinkhorn,
    Sinkhorn,
    SmoothOT,
    SparseOT,
    UnrolledAdjoint,
)
from monge.tools import (
    max_sliced_wasserstein,
    projection_robust_wasserstein,
    semidiscrete,
    sliced_wasserstein,
    wasserstein_1d,
)

__version__ = "0.1.0"

__all__ = [
    "costs",
    "datasets",
    "plot",
    "tools",
    "geometry",
    "problems",
    "solution",
    "solvers",
    "solve",
    "solve_matrix",
    "CostMatrix",
    "PointCloud",
    "LowRankCost",
    "LinearProblem",
    "Solution",
    "LowRankSolution",
    "Status",
    "LowRankSinkhorn",
    "Sinkhorn",
    "ImplicitAdjoint",
    "UnrolledAdjoint",
    "Exact",
    "PartialProblem",
    "PartialExact",
    "PartialSinkhorn",
    "SmoothOT",
    "SparseOT",
    "wasserstein_1d",
    "sliced_wasserstein",
    "max_sliced_wasserstein",
    "semidiscrete",
    "projection_robust_wasserstein",
]
