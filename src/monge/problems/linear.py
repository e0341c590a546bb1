r"""Problems: what to solve, independently of how.

A `LinearProblem` is the entropic, possibly unbalanced, optimal transport problem

$$\min_{P \ge 0}\ \langle C, P\rangle + \varepsilon\,\mathrm{KL}(P \,\|\, a b^\top)
  + \rho_a \mathrm{KL}(P\mathbf 1 \,\|\, a) + \rho_b \mathrm{KL}(P^\top \mathbf 1 \,\|\, b),$$

with $\mathrm{KL}(p\|q) = \sum p \log(p/q) - p + q$. Unbalancedness is given by
$\tau = \rho / (\rho + \varepsilon) \in (0, 1]$: $\tau = 1$ ($\rho = \infty$) is a hard
marginal constraint (balanced OT); smaller $\tau$ lets mass be created or destroyed.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from monge import checks
from monge.geometry import AbstractGeometry, as_float_array

__all__ = ["LinearProblem", "DEFAULT_RELATIVE_EPSILON", "default_epsilon"]

#: Default epsilon, relative to the typical cost (`AbstractGeometry.cost_scale`).
DEFAULT_RELATIVE_EPSILON = 0.05


def _optional_array(v):
    return None if v is None else as_float_array(v)


class LinearProblem(eqx.Module):
    r"""A linear (entropic, optionally unbalanced) OT problem on a geometry.

    Args:
        geom: the geometry (cost between the two supports).
        a: source weights, shape `(n,)`, non-negative; uniform $1/n$ if omitted.
        b: target weights, shape `(m,)`; uniform $1/m$ if omitted.
        epsilon: entropic regularisation $\varepsilon > 0$. If omitted,
            $\varepsilon = 0.05\,s$ (`default_epsilon`) with $s$ the typical cost
            (`AbstractGeometry.cost_scale`): the mean $\bar c = \sum_{ij} a_i b_j
            |C_{ij}| / (\sum a \sum b)$ under the independent coupling, unless a few
            outlying costs make it exceed 4 medians of $|C|$ (then 4 medians). The plan
            is then invariant to rescaling the cost (units of the data), and 5% of the
            typical cost blurs the coupling over a few neighbours without losing its
            structure. The default is a constant of the problem, not a parameter: its
            gradient is stopped (as in OTT-JAX), so derivatives are those at fixed
            $\varepsilon$, e.g. $\nabla_x \text{reg\_cost} = 2(\mathrm{diag}(P\mathbf 1)
            x - P y)$ for the squared Euclidean cost (pass `epsilon` explicitly, as a
            traced value, to differentiate through it). Traced: a new value does not
            recompile.
        tau_a, tau_b: unbalancedness in $(0, 1]$, $\tau = \rho/(\rho + \varepsilon)$;
            1 (default) is balanced. Traced.

    Forbidden pairs: a cost $C_{ij} = +\infty$ (in a `CostMatrix`) means "never
    transport from $i$ to $j$": the plan is exactly 0 there, and `cost` and gradients
    stay finite. Every row of positive weight needs an allowed column of positive
    weight and vice versa, and a balanced problem needs a coupling that avoids every
    forbidden pair (`checks.check_feasible`, a maximum flow): both are `ValueError`s
    when the arrays are concrete. Under `jit` an infeasible problem is reported by the
    solver's status (`INFEASIBLE` for exact OT; Sinkhorn cannot tell it from slow
    convergence and stops at `max_iterations`).

    A balanced problem whose masses differ by at most `MASS_RTOL` (relative) is
    accepted, and `b` is rescaled to the total of `a` (stored so), so that a coupling
    exists and Sinkhorn converges.

    Raises:
        ValueError: weights of the wrong length, negative, NaN or with zero total;
            unequal masses when balanced; epsilon $\le 0$; tau outside $(0, 1]$;
            non-finite points, NaN or $-\infty$ costs, a row or column of positive
            weight whose pairs are all forbidden, a balanced problem that no coupling
            avoiding the forbidden pairs solves (value checks need concrete arrays;
            under `jit` the solver checks them instead).
    """

    geom: AbstractGeometry
    a: Float[Array, " n"]
    b: Float[Array, " m"]
    epsilon: Float[Array, ""] | None
    tau_a: Float[Array, ""]
    tau_b: Float[Array, ""]

    def __init__(self, geom, a=None, b=None, *, epsilon=None, tau_a=1.0, tau_b=1.0):
        self.geom = geom
        self.a, self.b = checked_marginals(geom, a, b)
        self.epsilon = _optional_array(epsilon)
        self.tau_a = as_float_array(tau_a)
        self.tau_b = as_float_array(tau_b)
        self._check()
        self.b = _rescaled(self.a, self.b, self.tau_a, self.tau_b)
        balanced = checks.concrete(self.is_balanced)
        if geom.materialized and balanced is not None and bool(balanced):
            checks.check_feasible(geom.cost_matrix(), self.a, self.b)

    def _check(self):
        if self.epsilon is not None:
            if self.epsilon.ndim != 0:
                raise ValueError(
                    f"`epsilon` must be a scalar; received shape {tuple(self.epsilon.shape)}."
                )
            checks.check_positive(
                "epsilon", self.epsilon, "Pass epsilon > 0, or leave it out for the default "
                "0.05 * mean cost (exact OT, epsilon = 0, is a different solver)."
            )
        for name in ("tau_a", "tau_b"):
            tau = getattr(self, name)
            if tau.ndim != 0:
                raise ValueError(f"`{name}` must be a scalar; received shape {tuple(tau.shape)}.")
            checks.check_tau(name, tau)
        checks.check_masses(self.a, self.b, self.tau_a, self.tau_b)

    @property
    def is_balanced(self) -> Array:
        """Whether both marginal constraints are hard ($\\tau_a = \\tau_b = 1$)."""
        return (self.tau_a == 1) & (self.tau_b == 1)

    def resolved_epsilon(self, geom: AbstractGeometry | None = None) -> Float[Array, ""]:
        """The epsilon used: the given one, or the default scaled to the data."""
        if self.epsilon is not None:
            return self.epsilon
        return default_epsilon(self.geom if geom is None else geom, self.a, self.b)


def _rescaled(a, b, tau_a, tau_b):
    r"""`b` scaled to the total of `a` when the problem is balanced and the totals
    differ (by at most `checks.MASS_RTOL`, else `_check` raised): a balanced
    problem has no coupling for unequal masses, and Sinkhorn would chase the
    difference until `max_iterations` (masses 5e-5 apart ran 2000 iterations). Equal
    totals leave `b` (and its gradient) untouched."""
    balanced = (tau_a == 1) & (tau_b == 1)
    sa, sb = jnp.sum(a), jnp.sum(b)
    # only within the tolerance: under `jit` larger differences reach `traced_checks`
    within = jnp.abs(sa - sb) <= checks.MASS_RTOL * jnp.maximum(sa, sb)
    differ = balanced & (sa != sb) & (sb > 0) & within
    return jnp.where(differ, b * (sa / jnp.where(sb > 0, sb, 1.0)), b)


def default_epsilon(geom: AbstractGeometry, a: Array, b: Array) -> Float[Array, ""]:
    r"""$0.05\,s$ with $s$ = `geom.cost_scale(a, b)`: the mean $|C|$ under $a b^\top$
    (one pass over the cost, or a closed form), capped at 4 medians of $|C|$ so that a
    few huge or forbidden costs do not set it. The one default of every entropic
    solver (`Sinkhorn`, its annealing start, `PartialSinkhorn`). Its gradient is
    stopped: derivatives are taken at fixed epsilon."""
    scale = jax.lax.stop_gradient(geom.cost_scale(a, b))
    # All-zero costs: every coupling is optimal; any positive epsilon will do.
    ok = (scale > 0) & jnp.isfinite(scale)
    return jnp.where(ok, DEFAULT_RELATIVE_EPSILON * jnp.where(ok, scale, 1.0), 1.0)


def checked_marginals(geom: AbstractGeometry, a, b) -> tuple[Array, Array]:
    """The weights `(a, b)` (uniform where omitted), after checking them and the
    geometry's points or costs (`ValueError`s that say how to fix the input)."""
    n, m = geom.shape
    geom.check_values()
    a = jnp.full((n,), 1.0 / n, geom.dtype) if a is None else checks.as_real_array("a", a)
    b = jnp.full((m,), 1.0 / m, geom.dtype) if b is None else checks.as_real_array("b", b)
    checks.check_weights("a", a, n, "the source (rows)")
    checks.check_weights("b", b, m, "the target (columns)")
    if geom.materialized:  # forbidden pairs (C = inf) must leave every line a partner
        checks.check_allowed(geom.cost_matrix(), a, b)
    return a, b
