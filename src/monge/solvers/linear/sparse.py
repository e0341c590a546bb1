r"""Sparsity-constrained optimal transport (Liu, Puigcerver & Blondel, 2023).

The quadratically regularised problem of `monge.solvers.linear.smooth` with at most $k$
non-zeros per column of the plan,

$$\min_{P \in \Pi(a, b),\ \|P_{:j}\|_0 \le k}\ \langle C, P\rangle
  + \frac{\gamma}{2}\|P\|_F^2,$$

is non-convex, but its semi-dual is a convex problem whose inner maximisation is a
$k$-sparse simplex projection (Kyrillidis et al., 2013: project the $k$ largest
entries onto the simplex, zero the rest):

$$\max_f\ \langle f, a\rangle - \sum_j \max_{t \ge 0,\ \sum_i t_i = b_j,\ \|t\|_0 \le k}
  \Big(\langle f - C_{:j}, t\rangle - \frac{\gamma}{2}\|t\|^2\Big).$$

The dual replaces $\frac{1}{2\gamma}\|[x]_+\|^2$ by its top-$k$ version
$\delta_k(x) = \frac{1}{2\gamma}\sum_{i \in \text{top-}k(x)} [x_i]_+^2$, with plan
$P_{ij} = [f_i + g_j - C_{ij}]_+/\gamma$ on each column's top $k$. Both plans have at
most $k$ non-zeros per column by construction. $k = 1$ recovers unregularised OT's
assignment when $n = m$ with uniform weights (the semi-dual is then the c-transform
dual, up to a constant); $k \ge n$ is `SmoothOT`.

Reference: T. Liu, J. Puigcerver, M. Blondel, "Sparsity-constrained optimal transport",
ICLR 2023 (arXiv:2209.15466, 2022); sparse simplex projection: A. Kyrillidis,
S. Becker, V. Cevher, C. Koch, "Sparse projections onto the simplex", ICML 2013.
"""

from __future__ import annotations

import equinox as eqx
from jaxtyping import Array, Float

from monge.geometry import as_float_array
from monge.problems import LinearProblem
from monge.solution import PlanSolution
from monge.solvers import driver
from monge.solvers.linear.smooth import check_options, check_problem, solve_quadratic

__all__ = ["SparseOT"]


class SparseOT(eqx.Module):
    r"""Optimal transport with at most `k` non-zeros per plan column (Liu et al., 2023).

    Solves the semi-dual (default) or dual of
    $\min_{P \in \Pi(a, b),\, \|P_{:j}\|_0 \le k} \langle C, P\rangle +
    \frac{\gamma}{2}\|P\|_F^2$ by L-BFGS (see the module docstring), using
    `jax.lax.top_k` for the $k$-sparse projections, started from the `SmoothOT`
    optimum (semismooth Newton, see `monge.solvers.linear.smooth`): where no column of that
    plan has more than $k$ non-zeros it is the answer already (no L-BFGS step), and
    otherwise a warm start whose large-scale structure is right. POT's
    `ot.smooth.smooth_ot_semi_dual(a, b, C, reg, reg_type="sparsity_constrained",
    max_nz=k)` solves the same semi-dual with `gamma = reg`.

    **When k binds.** For $k$ below the number of non-zeros the `SmoothOT` plan would
    have in a column, the dual objective is only piecewise smooth and, the primal
    being non-convex, the plan read off the dual optimum meets the row marginals
    only approximately (POT's solver behaves the same): `error` reports the
    violation and `converged` is then usually False; `reg_cost` is the dual value,
    a lower bound on the constrained optimum and at least `SmoothOT`'s value. The
    constraint can also leave no feasible plan (e.g. $k = 1$ when some $a_i$ is not
    a sum of $b_j$'s); the dual is then unbounded and the run does not converge.

    Args:
        k: the largest number of non-zeros per column, a positive integer; static
            (a new `k` recompiles). Values above $n$ act as $n$ (no constraint).
        gamma: regularisation $\gamma > 0$, in the same units as in `SmoothOT`;
            traced.
        formulation: `"semi_dual"` (default) or `"dual"`; static.
        threshold: stop when the L1 marginal error $\|P\mathbf 1 - a\|_1 +
            \|P^\top\mathbf 1 - b\|_1$ is at most this; traced.
        max_iterations: at most this many Newton steps for the start, and as many
            L-BFGS steps after it; static.
        memory_size: number of L-BFGS correction pairs; static.
        progress: print one line per iteration (Newton, then L-BFGS) through the shared
            driver; static.

    Returns (when called on a balanced `LinearProblem`, optionally `throw=True`): a
    `monge.solution.PlanSolution`, as `SmoothOT`; its plan has at most `k`
    non-zeros per column.

    Raises:
        ValueError: `k` not a positive integer, plus the errors of `SmoothOT`.

    Example:
        >>> import jax.numpy as jnp
        >>> from monge import CostMatrix, LinearProblem
        >>> from monge.solvers.linear.sparse import SparseOT
        >>> C = jnp.array([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 0.0]])
        >>> sol = SparseOT(k=1, gamma=1.0)(LinearProblem(CostMatrix(C)))
        >>> (sol.plan > 0).astype(int).tolist()
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    """

    k: int = eqx.field(static=True)
    gamma: Float[Array, ""] = eqx.field(converter=as_float_array)
    formulation: str = eqx.field(default="semi_dual", static=True)
    threshold: Float[Array, ""] = eqx.field(default=1e-4, converter=as_float_array)
    max_iterations: int = eqx.field(default=500, static=True)
    memory_size: int = eqx.field(default=10, static=True)
    progress: bool = eqx.field(default=False, static=True)

    def __check_init__(self):
        if not (isinstance(self.k, int) and not isinstance(self.k, bool) and self.k >= 1):
            raise ValueError(
                f"`SparseOT(k=...)` must be a positive integer (the most non-zeros per plan "
                f"column); received {self.k!r}. Use k=1 for an assignment-like plan."
            )
        check_options(
            "SparseOT", self.gamma, self.formulation, self.threshold, self.max_iterations,
            self.memory_size,
        )

    def __call__(self, problem: LinearProblem, *, init=None, throw: bool = False) -> PlanSolution:
        """Solve `problem`.

        Args:
            problem: a balanced `LinearProblem`.
            init: a warm start: a previous solution (of a problem of the same shape) or
                dual potentials `(f, g)` of shapes `(n,)`, `(m,)`; no gradient flows into
                it. With `formulation="dual"` both start the iteration; with
                `"semi_dual"` only `f` does (the semi-dual's variable: `g` is recomputed
                from `f` as the column thresholds, so a given `g` is not used). Newton
                then starts at `gamma` itself, without continuation (SparseOT: L-BFGS on the k-sparse dual
                starts from it directly, without the Newton start). The optimum, hence
                the result to `threshold` and the gradients, is the same as from a cold
                start; a start that already meets `threshold` runs no iteration.
            throw: raise an `EquinoxRuntimeError` carrying the status message instead of
                returning a run that did not converge.

        Raises:
            ValueError: `init` is not a solution or a pair `(f, g)` of those shapes.
        """
        check_problem("SparseOT", problem)
        return solve_quadratic(
            problem, self.gamma, self.threshold, formulation=self.formulation,
            k=min(self.k, problem.geom.shape[0]), method="newton",
            max_iterations=self.max_iterations,
            memory_size=self.memory_size, throw=throw, name="SparseOT",
            init=driver.warm_start(init, problem.geom.shape), progress=self.progress,
        )
