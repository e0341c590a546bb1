"""The front door: one call from data to a `Solution`.

These functions only build a geometry, a problem and a solver, and call the solver.
"""

from __future__ import annotations

from collections.abc import Callable

from monge.costs import AbstractCost
from monge.geometry import CostMatrix, PointCloud
from monge.problems import LinearProblem
from monge.solution import Solution
from monge.solvers import ImplicitAdjoint, Sinkhorn, UnrolledAdjoint

__all__ = ["solve", "solve_matrix"]


def _solver(threshold, max_iterations, implicit_diff, progress) -> Sinkhorn:
    adjoint = ImplicitAdjoint() if implicit_diff else UnrolledAdjoint()
    return Sinkhorn(
        threshold=threshold, max_iterations=max_iterations, adjoint=adjoint, progress=progress
    )


def solve(
    x,
    y,
    *,
    a=None,
    b=None,
    cost: str | AbstractCost | Callable = "sqeuclidean",
    epsilon=None,
    tau_a=1.0,
    tau_b=1.0,
    threshold=1e-3,
    max_iterations: int = 2000,
    online: bool | None = None,
    implicit_diff: bool = True,
    progress: bool = False,
    throw: bool = False,
) -> Solution:
    r"""Entropic optimal transport between two point clouds.

    Solves $\min_P \langle C, P\rangle + \varepsilon \mathrm{KL}(P\|ab^\top)$ (plus KL
    penalties on the marginals when `tau_a` or `tau_b` < 1) with $C_{ij} = c(x_i, y_j)$,
    by log-domain Sinkhorn.

    Args:
        x: source points, `(n, d)`. NumPy or JAX; integers are promoted to float.
        y: target points, `(m, d)`.
        a, b: non-negative weights (uniform if omitted). Balanced problems need
            `sum(a) == sum(b)`.
        cost: ``"sqeuclidean"`` ($\|x-y\|^2$, no ½), ``"euclidean"``, ``"cityblock"``,
            ``"cosine"``, a `monge.costs` object, or a function `c(x, y)` of one pair.
        epsilon: entropic regularisation; default $0.05 \times$ the mean cost
            $\sum a_i b_j |C_{ij}|$ (weights normalised), so results do not depend on
            the units of the data. Smaller is closer to exact OT but needs more
            iterations. A new value does not recompile.
        tau_a, tau_b: unbalancedness in (0, 1]; 1 is balanced.
            $\tau = \rho / (\rho + \varepsilon)$ for a KL marginal penalty of strength $\rho$.
        threshold: stop when the L1 marginal error is below it (default 1e-3).
        max_iterations: iteration budget (default 2000), rounded up to a multiple of
            10 (the solver checks convergence every 10 iterations).
        online: store the cost matrix (False) or recompute it in blocks (True, memory
            $O(n + m)$ per block row); default: online above $2^{25}$ entries.
        implicit_diff: gradients by implicit differentiation (default) or by unrolling
            the iterations (False).
        progress: print iterations and error to stderr while solving.
        throw: raise instead of returning a non-converged solution.

    Returns:
        A `Solution` with `f`, `g`, `plan`, `apply`, `cost`, `reg_cost`, `converged`,
        `n_iters`, `errors`, `status`, `transport`.

    Raises:
        ValueError: for inputs of the wrong shape, NaN/inf values, negative weights,
            unequal masses in a balanced problem, epsilon <= 0 or tau outside (0, 1].

    Example:
        >>> import numpy as np, monge
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(7, 2)), rng.normal(size=(11, 2)) + 1.0
        >>> sol = monge.solve(x, y, epsilon=0.1)
        >>> bool(sol.converged), sol.plan.shape
        (True, (7, 11))
    """
    geom = PointCloud(x, y, cost, online=online)
    problem = LinearProblem(geom, a, b, epsilon=epsilon, tau_a=tau_a, tau_b=tau_b)
    return _solver(threshold, max_iterations, implicit_diff, progress)(problem, throw=throw)


def solve_matrix(
    C,
    *,
    a=None,
    b=None,
    epsilon=None,
    tau_a=1.0,
    tau_b=1.0,
    threshold=1e-3,
    max_iterations: int = 2000,
    implicit_diff: bool = True,
    progress: bool = False,
    throw: bool = False,
) -> Solution:
    r"""Entropic optimal transport for a given `(n, m)` cost matrix `C`.

    Same problem, arguments and defaults as `solve` (epsilon defaults to 0.05 times the
    mean of $|C|$ under $a b^\top$).

    Example:
        >>> import numpy as np, monge
        >>> C = np.array([[0.0, 1.0], [1.0, 0.0]])
        >>> sol = monge.solve_matrix(C, epsilon=0.01)
        >>> np.round(np.asarray(sol.plan), 3).tolist()
        [[0.5, 0.0], [0.0, 0.5]]
    """
    problem = LinearProblem(CostMatrix(C), a, b, epsilon=epsilon, tau_a=tau_a, tau_b=tau_b)
    return _solver(threshold, max_iterations, implicit_diff, progress)(problem, throw=throw)
