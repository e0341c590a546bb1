"""Solvers: how to solve a problem. Small immutable configuration objects."""

from monge.solvers.adjoint import AbstractAdjoint, ImplicitAdjoint, UnrolledAdjoint
from monge.solvers.sinkhorn import Sinkhorn

__all__ = ["AbstractAdjoint", "ImplicitAdjoint", "UnrolledAdjoint", "Sinkhorn"]
