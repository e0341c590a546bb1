r"""Debiased divergences built on OT solvers.

`lowrank_divergence` is the debiased low-rank OT divergence of Scetbon & Cuturi
(2022), "Low-rank optimal transport: approximation, statistics and debiasing":

$$\mathrm{DLOT}_r(\mu, \nu) = \mathrm{LOT}_r(\mu, \nu) - \tfrac12\big(\mathrm{LOT}_r(\mu,
\mu) + \mathrm{LOT}_r(\nu, \nu)\big),$$

with $\mathrm{LOT}_r$ the low-rank OT objective (`LowRankSolution.reg_cost`). The bias
it removes: a coupling of rank $r$ between a measure and itself cannot be the
identity when $r$ is below the number of points, so $\mathrm{LOT}_r(\mu, \mu) > 0$.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from monge import checks
from monge.costs import AbstractCost
from monge.geometry import LowRankCost
from monge.problems import LinearProblem
from monge.solution import LowRankSolution
from monge.solvers.linear.lowrank import LowRankSinkhorn

__all__ = ["lowrank_divergence", "LowRankDivergence"]


class LowRankDivergence(tuple):
    """`(value, solutions)`: the divergence and the three `LowRankSolution`s
    `(xy, xx, yy)` it was computed from (their `converged` flags say whether it is
    trustworthy)."""

    __slots__ = ()

    def __new__(cls, value, solutions):
        return super().__new__(cls, (value, solutions))

    @property
    def value(self) -> Array:
        return self[0]

    @property
    def solutions(self) -> tuple[LowRankSolution, LowRankSolution, LowRankSolution]:
        return self[1]

    @property
    def converged(self) -> Array:
        """Whether all three solves converged."""
        return jnp.all(jnp.stack([s.converged for s in self[1]]))


def lowrank_divergence(
    x: Float[ArrayLike, "n d"],
    y: Float[ArrayLike, "m d"],
    *,
    rank: int,
    a: Float[ArrayLike, " n"] | None = None,
    b: Float[ArrayLike, " m"] | None = None,
    cost: str | AbstractCost | Callable = "sqeuclidean",
    tau_a=1.0,
    tau_b=1.0,
    epsilon=None,
    solver: LowRankSinkhorn | None = None,
) -> LowRankDivergence:
    r"""The debiased low-rank OT divergence $\mathrm{DLOT}_r(\mu, \nu)$ (module
    docstring) between $\mu = \sum_i a_i\delta_{x_i}$ and $\nu = \sum_j b_j\delta_{y_j}$.

    Each term is a low-rank solve (`LowRankSinkhorn`, default configuration, or
    `solver`) on the factored cost (`LowRankCost.from_points`): time and memory are
    linear in $n$ and $m$. Gradients with respect to the points and weights are
    those of the three objectives (envelope theorem, `LowRankSolution`).

    Args:
        x, y: point clouds `(n, d)`, `(m, d)`.
        rank: the rank $r$ of the couplings, $1 \le r \le \min(n, m)$.
        a, b: weights (uniform if omitted); balanced needs equal masses.
        cost: as in `monge.solve` (squared Euclidean: exact factors).
        tau_a, tau_b: unbalancedness (`LinearProblem`); the self terms use `tau_a`
            for $\mu$ and `tau_b` for $\nu$ on both sides.
        epsilon: only with tau < 1: sets the marginal penalties $\rho =
            \varepsilon\tau/(1 - \tau)$ (default: the problem's default epsilon).
        solver: a configured `LowRankSinkhorn` whose `rank` equals `rank`.

    Returns:
        `LowRankDivergence(value, (sol_xy, sol_xx, sol_yy))`.

    Raises:
        ValueError: as `monge.solve(..., rank=...)`; a `solver` of another rank.

    Example:
        >>> import jax, monge
        >>> x = jax.random.normal(jax.random.key(0), (40, 2))
        >>> d_same = monge.tools.lowrank_divergence(x, x, rank=3).value
        >>> d_far = monge.tools.lowrank_divergence(x, x + 3.0, rank=3).value
        >>> abs(float(d_same)) < 1e-3, float(d_far) > 8.0
        (True, True)
    """
    x, y = checks.tool_clouds(x, y, "tools.lowrank_divergence")
    if solver is None:
        solver = LowRankSinkhorn(rank=rank)
    elif solver.rank != rank:
        raise ValueError(
            f"`solver.rank={solver.rank}` differs from `rank={rank}`; pass one rank "
            "(drop `rank` from the solver or set both alike)."
        )
    n, m = x.shape[0], y.shape[0]
    a = checks.tool_weights(a, n, "a", "x", "tools.lowrank_divergence", x.dtype)
    b = checks.tool_weights(b, m, "b", "y", "tools.lowrank_divergence", x.dtype)

    def lot(u, v, wu, wv, tu, tv):
        geom = LowRankCost.from_points(u, v, cost)
        return solver(LinearProblem(geom, wu, wv, epsilon=epsilon, tau_a=tu, tau_b=tv))

    sols = (lot(x, y, a, b, tau_a, tau_b), lot(x, x, a, a, tau_a, tau_a),
            lot(y, y, b, b, tau_b, tau_b))
    value = sols[0].reg_cost - 0.5 * (sols[1].reg_cost + sols[2].reg_cost)
    return LowRankDivergence(value, sols)
