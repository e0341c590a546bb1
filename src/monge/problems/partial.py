r"""Partial optimal transport: move a chosen amount of mass $m$ at least cost.

$$\min_{P \ge 0,\ P\mathbf 1 \le a,\ P^\top\mathbf 1 \le b,\ \mathbf 1^\top P
\mathbf 1 = m}\ \langle C, P\rangle\ (+\ \varepsilon \textstyle\sum_{ij} P_{ij}\log
P_{ij}),\qquad 0 < m \le \min(\textstyle\sum a, \sum b).$$

Solved by `monge.solvers.linear.partial` (`PartialExact`, `PartialSinkhorn`).
"""

from __future__ import annotations

import equinox as eqx
import numpy as np
from jaxtyping import Array, Float

from monge import checks
from monge.geometry import AbstractGeometry, as_float_array
from monge.problems.linear import checked_marginals, default_epsilon

__all__ = ["PartialProblem"]


class PartialProblem(eqx.Module):
    r"""A partial OT problem: transport mass `mass` between `a` and `b`.

    Args:
        geom: the geometry (cost between the two supports).
        a, b: non-negative weights (uniform $1/n$, $1/m$ if omitted); their totals may
            differ.
        mass: the mass $m$ to transport, $0 < m \le \min(\sum a, \sum b)$. Traced.
        epsilon: entropic regularisation for `PartialSinkhorn` (unused by
            `PartialExact`); default `monge.problems.default_epsilon`, as for
            `LinearProblem` ($0.05$ times the typical cost, gradient stopped). Traced.

    Forbidden pairs: $C_{ij} = +\infty$ (a `CostMatrix`) is never transported, by
    both solvers (the plan is exactly 0 there). If no plan of total `mass` avoids them,
    the problem is infeasible: a `ValueError` when the arrays are concrete
    (`checks.check_feasible`), `Status.INFEASIBLE` under `jit`.

    Raises:
        ValueError: weights of the wrong length, negative, NaN or with zero total;
            `mass` outside $(0, \min(\sum a, \sum b)]$; epsilon $< 0$; NaN or $-\infty$ costs;
            forbidden pairs that leave no plan of total `mass`.
    """

    geom: AbstractGeometry
    a: Float[Array, " n"]
    b: Float[Array, " m"]
    mass: Float[Array, ""]
    epsilon: Float[Array, ""] | None

    def __init__(self, geom, a=None, b=None, *, mass, epsilon=None):
        self.geom = geom
        self.a, self.b = checked_marginals(geom, a, b)
        self.mass = as_float_array(mass)
        self.epsilon = None if epsilon is None else as_float_array(epsilon)
        self._check()
        if geom.materialized:
            checks.check_feasible(geom.cost_matrix(), self.a, self.b, self.mass)

    def _check(self):
        for name in ("mass", "epsilon"):
            value = getattr(self, name)
            if value is not None and value.ndim != 0:
                raise ValueError(f"`{name}` must be a scalar; received shape {tuple(value.shape)}.")
        mc, ac, bc = (checks.concrete(z) for z in (self.mass, self.a, self.b))
        if mc is not None and ac is not None and bc is not None:
            top = min(float(ac.sum()), float(bc.sum()))
            if not (np.isfinite(mc) and 0 < mc <= top * (1 + 1e-6)):
                raise ValueError(
                    f"`mass` must lie in (0, min(sum(a), sum(b))] = (0, {top:.6g}]; received "
                    f"{float(mc):.6g}. Pass the mass to transport: a positive number no larger "
                    "than the smaller total weight."
                )
        ec = None if self.epsilon is None else checks.concrete(self.epsilon)
        if ec is not None and not (np.isfinite(ec) and ec >= 0):
            raise ValueError(
                f"`epsilon` must be non-negative and finite; received {ec!r}. Use 0 for "
                "exact partial OT (PartialExact), epsilon > 0 for PartialSinkhorn."
            )

    def resolved_epsilon(self) -> Float[Array, ""]:
        """The epsilon used by `PartialSinkhorn`: the given one, or the default."""
        if self.epsilon is not None:
            return self.epsilon
        return default_epsilon(self.geom, self.a, self.b)
