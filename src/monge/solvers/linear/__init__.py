"""Solvers of linear problems (`LinearProblem`, `PartialProblem`): entropic
(`sinkhorn`, with `initializers`), exact (`exact`: network simplex, assignment,
`auction`, Sinkhorn rounding), partial (`partial`), quadratically regularised
(`smooth`) and sparsity-constrained (`sparse`). Every iterative one runs on
`monge.solvers.driver`."""

from monge.solvers.linear.exact import Exact
from monge.solvers.linear.lowrank import LowRankSinkhorn
from monge.solvers.linear.partial import PartialExact, PartialSinkhorn
from monge.solvers.linear.sinkhorn import Sinkhorn
from monge.solvers.linear.smooth import SmoothOT
from monge.solvers.linear.sparse import SparseOT

__all__ = ["Sinkhorn", "LowRankSinkhorn", "Exact", "PartialExact", "PartialSinkhorn", "SmoothOT", "SparseOT"]
