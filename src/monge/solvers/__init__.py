"""Solvers: how to solve a problem. Small immutable configuration objects.

- `driver`: the shared fixed-point loop every iterative solver runs on
  (`AbstractIterativeSolver`, `fixed_point`, `status_of`, `finish`).
- `adjoint`: how gradients flow through entropic solvers (implicit, unrolled).
- `batching`: the vmap rule that solves a batch problem by problem.
- `linear/`: solvers of linear problems (Sinkhorn, exact, partial, smooth, sparse).
"""

from monge.solvers.adjoint import AbstractAdjoint, ImplicitAdjoint, UnrolledAdjoint
from monge.solvers.linear import (
    Exact,
    LowRankSinkhorn,
    PartialExact,
    PartialSinkhorn,
    Sinkhorn,
    SmoothOT,
    SparseOT,
)

__all__ = [
    "AbstractAdjoint",
    "ImplicitAdjoint",
    "UnrolledAdjoint",
    "Sinkhorn",
    "LowRankSinkhorn",
    "Exact",
    "PartialExact",
    "PartialSinkhorn",
    "SmoothOT",
    "SparseOT",
]
