"""Solvers: how to solve a problem. Small immutable configuration objects."""

from monge.solvers.adjoint import AbstractAdjoint, ImplicitAdjoint, UnrolledAdjoint
from monge.solvers.exact import Exact
from monge.solvers.partial import PartialExact, PartialProblem, PartialSinkhorn
from monge.solvers.sinkhorn import Sinkhorn
from monge.solvers.smooth import SmoothOT
from monge.solvers.sparse import SparseOT

__all__ = [
    "AbstractAdjoint",
    "ImplicitAdjoint",
    "UnrolledAdjoint",
    "Sinkhorn",
    "Exact",
    "PartialProblem",
    "PartialExact",
    "PartialSinkhorn",
    "SmoothOT",
    "SparseOT",
]
