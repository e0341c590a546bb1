r"""Exact (unregularised) optimal transport: the linear programme

$$\mathrm{OT}(a, b) = \min_{P \ge 0,\ P\mathbf 1 = a,\ P^\top \mathbf 1 = b}\ \langle C, P\rangle
= \max_{f_i + g_j \le C_{ij}}\ \langle f, a\rangle + \langle g, b\rangle.$$

Four backends, chosen by `Exact(method=...)`:

- ``"network_simplex"`` (default): POT's compiled network simplex (Bonneel et al.,
  2011) on the host, in float64, through `jax.pure_callback`. Exact; CPU host work
  (on an accelerator the matrix is copied to the host). Needs POT: ``pip install pot``
  (or ``pip install -e ".[exact]"`` in a clone of monge).
- ``"assignment"``: for $n = m$ and uniform weights, scipy's
  `linear_sum_assignment` (Crouse, 2016) on the host; the duals are the shortest-path
  distances of the residual graph (Bellman-Ford). Exact. Faster than the network
  simplex on unstructured costs (n = 2000, C uniform on [0, 1]: 0.75x POT's `emd`
  time against 1.12x), slower on geometric (point-cloud) costs
  (`benchmarks/bench_exact.py --random`).
- ``"sinkhorn_rounding"``: pure JAX, runs under `jit`/`vmap` on any device with no
  host callback. Log-domain Sinkhorn with $\varepsilon$-scaling, then the rounding of
  Altschuler, Weed & Rigollet (2017) onto the transport polytope (a feasible plan
  $\hat P$), and dual-feasible potentials by $c$-transforms. The gap
  $\langle C, \hat P\rangle - \langle f, a\rangle - \langle g, b\rangle \ge
  \langle C, \hat P\rangle - \mathrm{OT}(a, b)$ is a certificate of optimality;
  the solver stops once it falls below `threshold` (relative, see `error`).
- ``"auction"``: for $n = m$ and uniform weights, pure JAX (`jit`, `vmap`, any device):
  Bertsekas' auction with $\varepsilon$-scaling, all unassigned rows bidding at once
  (Bertsekas, 1988; Bertsekas & Castañon, 1989; `monge.solvers.linear.auction`). One bidding
  round costs $O(n^2)$ (less when few rows bid); its prices give dual-feasible
  potentials whose gap certifies the assignment, and it stops once that gap is below
  `threshold`. The default threshold is the larger of $10^{-12}$ and 100 machine
  epsilons: in float64 the assignment is optimal (the cost matches
  `linear_sum_assignment` to ~$10^{-12}$ of the mean cost); in float32 the certified
  gap is ~$10^{-5}$ of the mean cost, and the assignment is optimal for the float32
  costs unless the mean costs of two assignments differ by less than that. Prefer it
  on an accelerator, or where no host callback is allowed. On a CPU the network
  simplex is faster, for one problem (about 5x on point clouds of $n = 500$ to
  $2000$) and for vmapped batches (one host round trip per batch; see
  `benchmarks/bench_exact.py --batch`).

Gradients (all methods, a custom VJP; LP sensitivity): for `reg_cost` $=
\mathrm{OT}$, $\partial/\partial C = P$, $\partial/\partial a = f$, $\partial/\partial b
= g$, flowing to point clouds through $C$. Potentials are unique only up to
$(f + t, g - t)$; they are returned in the gauge $\langle f, a\rangle = \langle g,
b\rangle$, a valid dual pair. Masses (equal within tolerance) are solved with $b$
rescaled to $\sum a$, and the weight gradients include that rescaling, so they are
right along every direction (not only those keeping $\sum a = \sum b$). The plan
is piecewise constant in $C$ (zero gradient) and piecewise linear in $(a, b)$, where its
VJP solves $u_i + v_j = \bar P_{ij}$ on the support of $P$ (least squares weighted by
$P$, conjugate gradients): `cost` $= \langle C, P\rangle$ then has the gradient of
`reg_cost`. `f` and `g` are piecewise linear in $C$ and, through the gauge, in
$(a, b)$: at a non-degenerate vertex (the support a spanning tree of the points of
positive weight) they solve $f_i + g_j = C_{ij}$ on the support, and a zero-weight
point's potential is its $c$-transform ($f_i = \min_j C_{ij} - g_j$); their VJP
differentiates exactly that (`_potentials_vjp`). Where the support is not a spanning
tree (degenerate problems such as assignments with uniform weights, or
``"sinkhorn_rounding"``, whose plan is not a vertex) the potentials are not unique and
differentiating `f` or `g` raises an error instead of returning a wrong gradient.
Where the solution is not unique (ties, degenerate problems) $P$ is a supergradient
of the concave $C \mapsto \mathrm{OT}$ and $(f, g)$ a subgradient of the convex
$(a, b) \mapsto \mathrm{OT}$.
"""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jaxtyping import Array

from monge import checks
from monge.geometry import CostMatrix, as_float_array, safe_log
from monge.problems import LinearProblem
from monge.solution import PlanSolution, Status, fix_gauge
from monge.solvers import driver
from monge.solvers.linear.auction import auction

__all__ = ["Exact", "METHODS", "solve_arrays"]

#: The available backends.
METHODS = ("network_simplex", "assignment", "sinkhorn_rounding", "auction")
_HOST = ("network_simplex", "assignment")
_SQUARE = ("assignment", "auction")
_DEFAULT_ITERATIONS = {
    "network_simplex": 10_000_000,
    "assignment": 1,
    "sinkhorn_rounding": 10_000,
    "auction": 1_000_000,
}
#: How to install the host methods' libraries (monge is not on PyPI: no "monge[exact]").
_INSTALL = 'pip install pot scipy (or pip install -e ".[exact]" in a clone of monge)'


def _optional_float(z):
    return None if z is None else as_float_array(z)


def _import_pot():
    try:
        import ot
    except ImportError as err:  # pragma: no cover - exercised where POT is absent
        raise ImportError(
            "Exact(method='network_simplex') (and monge.solve(..., epsilon=0)) uses POT's "
            f"network simplex, which is not installed: {_INSTALL}, or use "
            "Exact(method='sinkhorn_rounding') (pure JAX, certified approximation)."
        ) from err
    return ot


def _import_lsa():
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as err:  # pragma: no cover
        raise ImportError(
            f"Exact(method='assignment') uses scipy, which is not installed: {_INSTALL}."
        ) from err
    return linear_sum_assignment


class Exact(eqx.Module):
    r"""Exact optimal transport solver for balanced `LinearProblem`s (epsilon = 0).

    Args:
        method: ``"network_simplex"`` (default, exact, POT on the host),
            ``"assignment"`` (exact, $n = m$ and uniform weights, scipy on the host),
            ``"sinkhorn_rounding"`` (pure JAX, certified approximation) or
            ``"auction"`` (pure JAX, $n = m$ and uniform weights, certified to the
            precision of the dtype). Static.
        max_iterations: network simplex pivots (default $10^7$), Sinkhorn iterations
            (default $10^4$) or auction bidding rounds (default $10^6$); an error
            with ``"assignment"``, which has no budget. Static.
        threshold: ``"sinkhorn_rounding"`` and ``"auction"``: stop once the certified
            relative duality gap `error` is below this. None (default) is $10^{-3}$
            for ``"sinkhorn_rounding"``, and for ``"auction"`` the larger of
            $10^{-12}$ and 100 machine epsilons of the cost's dtype ($10^{-12}$ in
            float64, $1.2 \times 10^{-5}$ in float32). Traced. An error with the host
            methods, which are exact and would ignore it.
        epsilon: ``"sinkhorn_rounding"`` only: the final entropic regularisation,
            relative to the mean cost $\bar c = a^\top |C| b / (\sum a \sum b)$
            (default $10^{-3}$; it starts at $\bar c$ and decays by `epsilon_decay`
            per iteration). Smaller is more accurate but needs more iterations; in
            float32 keep it above ~$10^{-4}$. Traced. An error with other methods.
        epsilon_decay: per-iteration factor of the $\varepsilon$ schedule, in (0, 1);
            None is 0.97 (``"sinkhorn_rounding"`` only, an error with other methods).

    `__call__(problem, throw=False)` returns a `PlanSolution`: `plan`, dual potentials
    `f`, `g` (dual feasible: $f_i + g_j \le C_{ij}$, with equality on the support of
    the plan when exact), `reg_cost` $= \langle C, P\rangle$, `n_iters` (Sinkhorn
    iterations or auction bidding rounds; -1 for the host methods, which do not report
    it), `error` (the certified duality gap $\langle C, P\rangle - \langle f,
    a\rangle - \langle g, b\rangle$, at least its float rounding, divided by $\sum a$
    times the typical allowed cost, `_unit`), `converged` and `status`. Forbidden
    pairs ($C_{ij} = +\infty$) get exactly 0 (`big_m`); a problem with no plan
    avoiding them is `Status.INFEASIBLE`; a host solution whose certificate the dtype
    cannot resolve is `Status.IMPRECISE`. The network simplex reports POT's own result:
    a pivot budget exhausted is `Status.MAX_ITERATIONS`, never a silent answer; the
    pure-JAX methods are converged exactly when `error <= threshold` (an auction that
    spends its budget, or whose $\varepsilon$ reaches the dtype's floor, first is
    `Status.MAX_ITERATIONS`).

    Raises:
        ValueError: an unknown method, tau < 1 (exact unbalanced OT is not supported),
            ``"assignment"`` or ``"auction"`` on a non-square problem or non-uniform
            weights.
        ImportError: POT (or scipy) missing for a host method.

    References: Bonneel, van de Panne, Paris & Heidrich (2011), "Displacement
    interpolation using Lagrangian mass transport"; Altschuler, Weed & Rigollet (2017),
    "Near-linear time approximation algorithms for optimal transport via Sinkhorn
    iteration"; Crouse (2016), "On implementing 2D rectangular assignment algorithms";
    Bertsekas (1988), "The auction algorithm: a distributed relaxation method for the
    assignment problem"; Bertsekas & Castañon (1989), "Parallel synchronous and
    asynchronous implementations of the auction algorithm".

    Example:
        >>> import jax.numpy as jnp, monge
        >>> from monge.solvers.linear.exact import Exact
        >>> C = jnp.array([[0.0, 2.0], [1.0, 0.0]])
        >>> sol = Exact()(monge.LinearProblem(monge.CostMatrix(C)))
        >>> sol.plan.tolist(), float(sol.cost), bool(sol.converged)
        ([[0.5, 0.0], [0.0, 0.5]], 0.0, True)
    """

    method: str = eqx.field(default="network_simplex", static=True)
    max_iterations: int | None = eqx.field(default=None, static=True)
    threshold: float | None = eqx.field(default=None, converter=_optional_float)
    epsilon: float = eqx.field(default=1e-3, converter=as_float_array)
    epsilon_decay: float = eqx.field(default=0.97, converter=as_float_array)

    def __init__(
        self,
        method: str = "network_simplex",
        max_iterations: int | None = None,
        threshold: float | None = None,
        epsilon: float | None = None,
        epsilon_decay: float | None = None,
    ):
        # Options a method would ignore are errors (a user would believe they took
        # effect): the host methods solve the LP exactly, only Sinkhorn rounding has an
        # epsilon schedule, and the assignment has no iteration budget.
        owner = f"Exact(method={method!r})"
        # an unknown method falls through to `__check_init__`, which lists the methods
        if method in _HOST:
            checks.reject_unused(
                owner, {"threshold": threshold},
                "has no effect: the method is exact and has no stopping tolerance (its "
                "`error` is reported, not compared with a threshold)",
                "drop it, or use method='sinkhorn_rounding' or 'auction' for a certified "
                "approximation that stops at `threshold`.",
            )
        if method in METHODS and method != "sinkhorn_rounding":
            checks.reject_unused(
                owner, {"epsilon": epsilon, "epsilon_decay": epsilon_decay},
                "has no effect: only method='sinkhorn_rounding' has an entropic schedule",
                "drop it, or use method='sinkhorn_rounding'.",
            )
        if method == "assignment":
            checks.reject_unused(
                owner, {"max_iterations": max_iterations},
                "has no effect: scipy's linear_sum_assignment has no iteration budget",
                "drop it.",
            )
        self.method = method
        self.max_iterations = max_iterations
        # None is the method's default; the auction's depends on the dtype, so it stays
        # None until the costs are seen (`tolerance`)
        if threshold is None and method != "auction":
            threshold = 1e-3
        self.threshold = threshold
        self.epsilon = 1e-3 if epsilon is None else epsilon
        self.epsilon_decay = 0.97 if epsilon_decay is None else epsilon_decay

    def __check_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {list(METHODS)}; received {self.method!r}.")
        if self.max_iterations is not None and not (
            isinstance(self.max_iterations, int) and self.max_iterations >= 1
        ):
            raise ValueError(
                f"`max_iterations` must be a positive integer or None; received "
                f"{self.max_iterations!r}."
            )
        if self.threshold is not None:
            checks.check_positive(
                "threshold", self.threshold, "Typical values: 1e-2 to 1e-6, or None."
            )
        checks.check_positive(
            "epsilon", self.epsilon, "It is relative to the mean cost; typical 1e-2 to 1e-4."
        )
        decay = checks.concrete(self.epsilon_decay)
        if decay is not None and not (0 < decay < 1):
            raise ValueError(f"`epsilon_decay` must lie in (0, 1); received {decay!r}.")

    @property
    def iterations(self) -> int:
        """The iteration budget used (the method's default when `max_iterations` is None)."""
        return self.max_iterations or _DEFAULT_ITERATIONS[self.method]

    def tolerance(self, dtype) -> Array:
        """The threshold used for costs of `dtype` (the method's default when None)."""
        if self.threshold is not None:
            return self.threshold
        return jnp.asarray(max(1e-12, 100 * float(jnp.finfo(dtype).eps)), dtype)

    def __call__(self, problem: LinearProblem, *, init=None, throw: bool = False) -> PlanSolution:
        """Solve `problem` (its `epsilon` is ignored).

        Args:
            problem: a balanced `LinearProblem`.
            init: a warm start for the pure-JAX methods: a previous solution (of a
                problem of the same shape) or potentials `(f, g)` of shapes `(n,)`,
                `(m,)`; no gradient flows into it. ``"sinkhorn_rounding"`` starts its
                Sinkhorn iterations from `(f, g)` at the final $\varepsilon$ (no
                $\varepsilon$-scaling); ``"auction"`` uses `g` as its starting prices
                (`f` is recomputed from them) and starts at the $\varepsilon$ of a
                single certifying phase. Either way the answer meets the same
                certificate (`threshold`) as a cold start. The host methods take no
                warm start: `init` with them is a `ValueError`.
            throw: raise an `EquinoxRuntimeError` carrying the status message instead of
                returning a run that did not converge.
        """
        if not isinstance(problem, LinearProblem):
            raise ValueError(
                f"`Exact` solves a monge.LinearProblem; received {type(problem).__name__}."
            )
        check_balanced(problem.tau_a, problem.tau_b)
        self.check_method(problem.a, problem.b)
        if init is not None and self.method in _HOST:
            raise ValueError(
                f"`init` (a warm start) was passed to Exact(method={self.method!r}), but the "
                "host methods ('network_simplex', 'assignment') take no warm start; drop "
                "`init`, or use method='sinkhorn_rounding' or 'auction'."
            )
        return _solve(self, problem, driver.warm_start(init, problem.geom.shape), throw)

    def check_method(self, a, b) -> None:
        """Backend requirements that can be checked before tracing."""
        if self.method == "network_simplex":
            _import_pot()
        elif self.method in _SQUARE:
            if self.method == "assignment":
                _import_lsa()
            n, m = a.shape[0], b.shape[0]
            if n != m:
                raise ValueError(
                    f"Exact(method={self.method!r}) needs as many sources as targets; "
                    f"received n={n}, m={m}. Use method='network_simplex' for general "
                    "problems."
                )
            for name, w in (("a", a), ("b", b)):
                wc = checks.concrete(w)
                if wc is not None and np.ptp(wc) > 1e-6 * np.max(np.abs(wc)):
                    raise ValueError(
                        f"Exact(method={self.method!r}) needs uniform weights, but "
                        f"`{name}` ranges from {wc.min():.6g} to {wc.max():.6g}. Use "
                        "method='network_simplex' for general weights."
                    )


def check_balanced(tau_a, tau_b) -> None:
    """Exact OT has hard marginal constraints: tau must be 1 (checked when concrete)."""
    ta, tb = checks.concrete(tau_a), checks.concrete(tau_b)
    if ta is not None and tb is not None and not (np.all(ta == 1) and np.all(tb == 1)):
        raise ValueError(
            f"Exact OT (epsilon=0) is only supported for balanced problems, tau_a = tau_b = "
            f"1; received tau_a={ta!r}, tau_b={tb!r}. Use epsilon > 0 for unbalanced OT, "
            "or mass=... (partial OT) to transport only part of the mass."
        )


@eqx.filter_jit
def _solve(solver: Exact, problem: LinearProblem, init, throw: bool) -> PlanSolution:
    C = problem.geom.cost_matrix()
    a, b = _traced_checks(problem)
    plan, f, g, reg_cost, n_iters, error, status = solve_arrays(solver, C, a, b, init)
    converged = status == Status.CONVERGED
    plan = driver.finish(plan, status, throw)
    return PlanSolution(problem, plan, f, g, reg_cost, n_iters, error, converged, status)


def _traced_checks(problem: LinearProblem):
    a, b = checks.traced_weights(problem.a, problem.b, True, " (exact OT is balanced).")
    a = eqx.error_if(
        a,
        (problem.tau_a != 1) | (problem.tau_b != 1),
        "Exact OT (epsilon=0) needs tau_a = tau_b = 1.",
    )
    return a, b


def solve_arrays(solver: Exact, C, a, b, init=None):
    """Exact OT on arrays: `(plan, f, g, reg_cost, n_iters, error, status)`.

    Differentiable (see the module docstring); the building block of `Exact` and of
    exact partial OT. Masses must be equal (b is rescaled to sum(a) internally).
    `init`: a warm start `(f, g)` for the pure-JAX methods (see `Exact.__call__`), or
    None.
    """
    dtype = jnp.result_type(C, a, b)
    C, a, b = C.astype(dtype), a.astype(dtype), b.astype(dtype)
    # NaN / -inf costs (NaN points under `jit`; concrete ones raised a ValueError at the
    # front door): as in every solver, failure is data. A harmless problem is solved in
    # their place (the host methods never see NaN) and the result is marked DIVERGED.
    broken = jnp.any(jnp.isnan(C) | (C == -jnp.inf))
    C = jnp.where(broken, jnp.zeros_like(C), C)
    if solver.method in _SQUARE:
        spread = lambda w: jnp.max(w) - jnp.min(w) > 1e-6 * jnp.max(jnp.abs(w))  # noqa: E731
        a = eqx.error_if(
            a,
            spread(a) | spread(b),
            f"Exact(method={solver.method!r}) needs uniform weights; use "
            "method='network_simplex'.",
        )
    # b is rescaled to sum(a) outside the custom VJP, so that gradients with respect to
    # the weights include the rescaling (right along every direction, not only sum-keeping)
    b = b * (jnp.sum(a) / jnp.sum(b))
    plan, f, g, reg_cost, (n_iters, error, status) = _core((C, a, b), solver, init)
    nan = jnp.asarray(jnp.nan, dtype)
    plan, f, g, reg_cost = (jnp.where(broken, nan, z) for z in (plan, f, g, reg_cost))
    error = jnp.where(broken, jnp.inf, error)
    status = jnp.where(broken, Status.DIVERGED, status).astype(jnp.int32)
    return plan, f, g, reg_cost, n_iters, error, status


# -- forward ---------------------------------------------------------------------------
def _forward(solver: Exact, C, a, b, init=None):
    b = b * (jnp.sum(a) / jnp.sum(b))
    forbidden = ~jnp.isfinite(C)
    unit = _unit(C, a, b)  # from the allowed costs
    C = big_m(C)  # forbidden pairs: a finite cost no optimal plan pays when feasible
    if init is not None:  # a start only: no gradient flows into it
        init = tuple(jax.lax.stop_gradient(jnp.asarray(z, C.dtype)) for z in init)
    if solver.method in _HOST:
        plan, f, g, status = _host_call(solver, C, a, b)
        n_iters = jnp.asarray(-1)
    elif solver.method == "auction":
        plan, f, g, n_iters = _auction(solver, C, a, unit, None if init is None else init[1])
        status = None
    else:
        plan, f, g, n_iters = _sinkhorn_rounding(solver, C, a, b, unit / jnp.sum(a), init)
        status = None
    f, g = _feasible_duals(C, f, g, a, b)
    f, g = fix_gauge(f, g, a, b)
    cost = jnp.sum(plan * C)
    dual = f @ a + g @ b
    # what the dtype resolves: each of the three sums is rounded at about u times the
    # sum of the magnitudes of its terms, so a smaller gap is rounding noise
    u = jnp.finfo(C.dtype).eps
    noise = 4 * u * (jnp.abs(f) @ a + jnp.abs(g) @ b + jnp.sum(plan * jnp.abs(C)))
    error = jnp.maximum(cost - dual, noise) / unit
    error = jnp.where(jnp.isnan(error), jnp.inf, error)
    tolerance = solver.tolerance(C.dtype)
    leaked = jnp.sum(jnp.where(forbidden, plan, 0.0))
    infeasible = leaked > (0.0 if solver.method in _HOST else tolerance * jnp.sum(a))
    if status is None:  # the pure-JAX methods: converged when the certified gap is small
        _, status = driver.status_from(error, tolerance)
    else:  # the host's own verdict, unless the dtype cannot certify it
        imprecise = (status == Status.CONVERGED) & (noise / unit > tolerance)
        status = jnp.where(imprecise, Status.IMPRECISE, status)
    status = jnp.where(infeasible, Status.INFEASIBLE, status)
    # forbidden pairs carry exactly nothing (a converged approximate plan leaks at most
    # error * unit / M there; an infeasible one keeps its leak, reported by the status)
    plan = jnp.where(forbidden & ~infeasible, 0.0, plan)
    cost = jnp.sum(jnp.where(forbidden, 0.0, plan * C)) + jnp.where(infeasible, jnp.inf, 0.0)
    return plan, f, g, cost, (n_iters, error, jnp.asarray(status, jnp.int32))


def _unit(C, a, b):
    r"""The scale of the certificate: $\sum a$ times the typical allowed cost
    (`AbstractGeometry.cost_scale`: the mean $|C|$ under $a b^\top$, capped at 4
    medians; forbidden pairs left out), 1 if that is 0.

    Relative to the mean alone, a few huge costs made any gap look small: with
    $C = [[0, 1, B], [1, 0, B], [B, B, 0]]$ and $B = 10^{8}$, Sinkhorn rounding's plan
    of cost 7308 (optimum 0) was certified with a relative gap of $1.6\cdot 10^{-4}$."""
    scale = jax.lax.stop_gradient(CostMatrix(C).cost_scale(a, b)) * jnp.sum(a)
    return jnp.where(scale > 0, scale, 1.0)


def big_m(C):
    r"""`C` with its forbidden pairs (`+inf`) replaced by
    $M = c_{\max} + 2(n + m)\,w$, $w = \max(c_{\max} - c_{\min}, |c_{\max}|, |c_{\min}|)$
    over the allowed costs (1 if all are 0).

    If a plan avoiding the forbidden pairs exists, every optimal plan of the problem
    with cost $M$ avoids them: optimal duals of the allowed problem can be chosen with
    $f_i + g_j \le c_{\max} + \min(n, m)(c_{\max} - c_{\min}) < M$ for every pair
    (alternating sums of costs along a spanning tree, one free constant per connected
    component), so they stay feasible with the same value (big-M, LP duality). If none
    exists, every plan pays $M$ somewhere, which the solvers report as
    `Status.INFEASIBLE`."""
    finite = jnp.isfinite(C)
    hi = jnp.max(jnp.where(finite, C, -jnp.inf))
    lo = jnp.min(jnp.where(finite, C, jnp.inf))
    hi, lo = jnp.where(jnp.isfinite(hi), hi, 0.0), jnp.where(jnp.isfinite(lo), lo, 0.0)
    width = jnp.maximum(jnp.maximum(hi - lo, jnp.abs(hi)), jnp.abs(lo))
    width = jnp.where(width > 0, width, 1.0)
    M = jax.lax.stop_gradient(hi + 2 * sum(C.shape) * width)
    return jnp.where(finite, C, M)


def _feasible_duals(C, f, g, a, b):
    r"""Dual-feasible potentials from approximate ones: the better (by dual value) of
    $(f^{c\bar c}, f^{c})$ and $(g^{\bar c}, g^{\bar c c})$, where $f^c_j = \min_i C_{ij}
    - f_i$ over rows of positive weight and $g^{\bar c}_i = \min_j C_{ij} - g_j$.
    Both satisfy $f_i + g_j \le C_{ij}$ for all $i, j$ and do not decrease the dual
    value of optimal potentials. A third candidate, the same transforms of $f = 0$,
    wins where the solver's potentials carry large offsets that the dtype cannot
    resolve (the auction's prices on costs spanning many orders of magnitude)."""
    big = jnp.asarray(jnp.finfo(C.dtype).max, C.dtype)

    def from_f(f):
        g1 = jnp.min(jnp.where(a[:, None] > 0, C - f[:, None], big), axis=0)
        return jnp.min(C - g1[None, :], axis=1), g1

    f1, g1 = from_f(f)
    f2 = jnp.min(jnp.where(b[None, :] > 0, C - g[None, :], big), axis=1)
    g2 = jnp.min(C - f2[:, None], axis=0)
    f3, g3 = from_f(jnp.zeros_like(f))
    # by dual value less its rounding error (a sum of large terms can round upwards)
    u = 4 * jnp.finfo(C.dtype).eps
    values = jnp.stack([
        f @ a + g @ b - u * (jnp.abs(f) @ a + jnp.abs(g) @ b)
        for f, g in ((f1, g1), (f2, g2), (f3, g3))
    ])
    best = jnp.argmax(jnp.where(jnp.isnan(values), -jnp.inf, values))
    return jnp.stack([f1, f2, f3])[best], jnp.stack([g1, g2, g3])[best]


def _host_call(solver: Exact, C, a, b):
    """Run the host method through `jax.pure_callback`. Under `vmap` the whole batch
    crosses to the host in one call (``vmap_method="broadcast_all"``) and is solved
    there problem by problem: one round trip instead of one per problem, which
    dominates for small problems (256 assignments of 32 points: 5.0x POT's time
    looped over the batch, one call per problem; see `benchmarks/bench_exact.py`)."""
    dtype = np.dtype(C.dtype)
    n, m = C.shape
    host = _network_simplex_host if solver.method == "network_simplex" else _assignment_host
    # 64-bit floats cross to the host and back as pairs of uint32: the callback runs on
    # another thread, where the caller's `jax.enable_x64` context does not apply and
    # JAX would round them to float32.
    wide = dtype.itemsize == 8
    to_host = (lambda z: jax.lax.bitcast_convert_type(z, jnp.uint32)) if wide else (lambda z: z)

    def from_device(z):
        z = np.asarray(z)
        return z.view(dtype).reshape(z.shape[:-1]) if wide else z

    def to_device(z):
        z = np.ascontiguousarray(z, dtype=dtype)
        return z.view(np.uint32).reshape(z.shape + (2,)) if wide else z

    def wrapped(C, a, b):
        *arrays, status = _host_batch(
            host, *(from_device(z) for z in (C, a, b)), max_iterations=solver.iterations
        )
        return (*(to_device(z) for z in arrays), status)

    tail, carrier = ((2,), np.dtype(np.uint32)) if wide else ((), dtype)
    shapes = tuple(jax.ShapeDtypeStruct(s + tail, carrier) for s in ((n, m), (n,), (m,)))
    shapes += (jax.ShapeDtypeStruct((), jnp.int32),)
    *out, status = jax.pure_callback(
        wrapped, shapes, to_host(C), to_host(a), to_host(b), vmap_method="broadcast_all"
    )
    if wide:
        out = [jax.lax.bitcast_convert_type(z, dtype) for z in out]
    return (*out, status)


def _host_batch(host, C, a, b, *, max_iterations):
    """`host` on each problem of a batch (leading axes of `C (..., n, m)`, `a (..., n)`,
    `b (..., m)`, all broadcast to the same batch shape); outputs stacked likewise."""
    (n, m), batch = C.shape[-2:], C.shape[:-2]
    outs = [
        host(*problem, max_iterations=max_iterations)
        for problem in zip(C.reshape(-1, n, m), a.reshape(-1, n), b.reshape(-1, m))
    ]
    stacked = [np.stack([np.asarray(z) for z in out]) for out in zip(*outs)]
    *arrays, status = (z.reshape(batch + z.shape[1:]) for z in stacked)
    return (*arrays, status.astype(np.int32))


def _network_simplex_host(C, a, b, *, max_iterations):
    ot = _import_pot()
    C, a, b = (np.asarray(z, np.float64) for z in (C, a, b))
    b = b * (a.sum() / b.sum())
    with warnings.catch_warnings():  # the result code is reported as the status
        warnings.simplefilter("ignore")
        plan, log = ot.emd(a, b, C, numItermax=max_iterations, log=True, check_marginals=False)
    code = int(log["result_code"])
    status = {1: Status.CONVERGED, 3: Status.MAX_ITERATIONS}.get(code, Status.DIVERGED)
    return plan, np.asarray(log["u"]), np.asarray(log["v"]), status


def _assignment_host(C, a, b, *, max_iterations):
    del max_iterations
    lsa = _import_lsa()
    C = np.asarray(C, np.float64)
    n = C.shape[0]
    rows, cols = lsa(C)
    plan = np.zeros_like(C)
    plan[rows, cols] = float(np.sum(a)) / n
    f, g = assignment_duals(C, cols)
    return plan, f, g, Status.CONVERGED


def assignment_duals(C: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""Optimal duals of the assignment $i \mapsto$ `cols[i]`, on the host.

    $g$ are the shortest-path distances from a virtual source in the graph with edges
    $\sigma(i) \to j$ of length $C_{ij} - C_{i\sigma(i)}$ (no negative cycle since
    $\sigma$ is optimal), by Bellman-Ford relaxing only the rows whose $g$ changed;
    $f_i = C_{i\sigma(i)} - g_{\sigma(i)}$. Then $f_i + g_j \le C_{ij}$ with equality
    on the assignment.
    """
    n = C.shape[0]
    diag = C[np.arange(n), cols]
    row_of = np.empty(n, dtype=np.intp)
    row_of[cols] = np.arange(n)
    g = np.zeros(n)
    rows = np.arange(n)
    for _ in range(n + 1):
        if rows.size == 0:
            break
        cand = np.min(g[cols[rows]][:, None] + C[rows] - diag[rows][:, None], axis=0)
        better = cand < g
        g = np.where(better, cand, g)
        rows = row_of[np.flatnonzero(better)]
    return diag - g[cols], g


# -- pure JAX: the auction for assignments ------------------------------------------------
def _auction(solver: Exact, C, a, unit, prices=None):
    r"""Plan $(\sum a / n)$ times the auction's permutation, its potentials and rounds
    (`prices`: the warm start `g`, or None).

    The auction's own gap is relative to the mean $|C|$; its threshold is rescaled so
    that it stops on the certificate of `Exact` (relative to `unit`, never larger)."""
    n = C.shape[0]
    mean = jnp.sum(jnp.abs(C)) / n * jnp.sum(a) / n
    ratio = jax.lax.stop_gradient(unit / jnp.where(mean > 0, mean, 1.0))
    out = auction(C, solver.tolerance(C.dtype) * jnp.minimum(ratio, 1.0), solver.iterations,
                  init=prices)
    plan = jnp.zeros_like(C).at[jnp.arange(n), out.cols].set(jnp.sum(a) / n)
    return plan, out.f, out.g, out.n_iters


# -- pure JAX: epsilon-scaling Sinkhorn, rounding and a certified gap ---------------------
def round_to_polytope(P, a, b):
    r"""Altschuler, Weed & Rigollet (2017, Alg. 2): a coupling with marginals exactly
    $(a, b)$ (equal masses) close to $P$: scale rows down to $\le a$, columns down to
    $\le b$, then add $e_r e_c^\top / \|e_r\|_1$ for the missing masses $e_r, e_c$."""
    r = jnp.sum(P, axis=1)
    P = P * jnp.where(r > 0, jnp.minimum(a / jnp.where(r > 0, r, 1.0), 1.0), 0.0)[:, None]
    c = jnp.sum(P, axis=0)
    P = P * jnp.where(c > 0, jnp.minimum(b / jnp.where(c > 0, c, 1.0), 1.0), 0.0)[None, :]
    e_r = jnp.maximum(a - jnp.sum(P, axis=1), 0.0)
    e_c = jnp.maximum(b - jnp.sum(P, axis=0), 0.0)
    total = jnp.sum(e_r)
    return P + e_r[:, None] * e_c[None, :] / jnp.where(total > 0, total, 1.0)


def _sinkhorn_rounding(solver: Exact, C, a, b, unit, init=None):
    """Plan (rounded), soft potentials and the number of iterations; `unit` is the
    typical cost (`_unit` per unit mass), the scale of the epsilon schedule; `init`: a
    warm start `(f, g)` (no annealing), or None."""
    rounding = _Rounding(solver.threshold, solver.iterations, epsilon=solver.epsilon,
                         epsilon_decay=solver.epsilon_decay)
    data = rounding.data(C, a, b, unit)
    state = rounding.init(data, init)
    (f, g, it, warm), _ = driver.fixed_point(rounding, data, state)
    plan = round_to_polytope(rounding.plan_of(data, f, g, rounding.eps_at(data, it - 1, warm)), a, b)
    return plan, f, g, it


class _Rounding(driver.AbstractIterativeSolver):
    r"""Log-domain Sinkhorn with $\varepsilon$-scaling for ``"sinkhorn_rounding"``, as
    the driver runs it: a block is `inner_iterations` (10) iterations, its error the
    certified relative gap of the rounded plan and the $c$-transformed potentials
    (valid at every $\varepsilon$, so every block is final).

    $\varepsilon$ at iteration $t$ is $\max(\varepsilon_{\rm final}, \bar c\,
    \text{decay}^t)$, $\bar c$ the typical cost (`AbstractGeometry.cost_scale`); a warm start runs at
    $\varepsilon_{\rm final}$ from the first iteration."""

    threshold: Array
    max_iterations: int = eqx.field(static=True)
    inner_iterations: int = eqx.field(default=10, static=True)
    progress: bool = eqx.field(default=False, static=True)
    epsilon: Array = 1e-3
    epsilon_decay: Array = 0.97

    @property
    def name(self) -> str:
        return "sinkhorn_rounding"

    @property
    def error_label(self) -> str:
        return "relative gap"

    def data(self, C, a, b, unit):
        """`(C, a, b, log a, log b, unit, final epsilon)`, `unit` the typical cost
        (robust to outlying costs: `Exact`'s certificate scale per unit mass)."""
        eps_final = (self.epsilon * unit).astype(C.dtype)
        return C, a, b, safe_log(a), safe_log(b), unit, eps_final

    def init(self, data, init):
        """`(f, g, it, warm)`: zero potentials, or the warm start `(f, g)` (then
        `warm`: no annealing)."""
        C, a, b, *_ = data
        if init is None:
            return jnp.zeros_like(a), jnp.zeros_like(b), jnp.asarray(0), jnp.asarray(False)
        f, g = init
        return f.astype(C.dtype), g.astype(C.dtype), jnp.asarray(0), jnp.asarray(True)

    def eps_at(self, data, it, warm):
        """$\varepsilon$ at iteration `it`: annealed from the mean cost (cold), or final."""
        C, *_, unit, eps_final = data
        decay = self.epsilon_decay.astype(C.dtype)
        return jnp.where(warm, eps_final, jnp.maximum(eps_final, unit * decay ** it.astype(C.dtype)))

    @staticmethod
    def plan_of(data, f, g, eps):
        C, _, _, log_a, log_b, *_ = data
        return jnp.exp(log_a[:, None] + log_b[None, :] + (f[:, None] + g[None, :] - C) / eps)

    def step(self, data, state, k):
        C, a, b, log_a, log_b, unit, _ = data

        warm = state[3]

        def one(carry, _):
            f, g, it = carry
            eps = self.eps_at(data, it, warm)
            f = -eps * jax.nn.logsumexp(log_b[None, :] + (g[None, :] - C) / eps, axis=1)
            g = -eps * jax.nn.logsumexp(log_a[:, None] + (f[:, None] - C) / eps, axis=0)
            return (f, g, it + 1), None

        (f, g, it), _ = jax.lax.scan(one, state[:3], None, self.inner_iterations)
        P = round_to_polytope(self.plan_of(data, f, g, self.eps_at(data, it - 1, warm)), a, b)
        ft, gt = _feasible_duals(C, f, g, a, b)
        gap = (jnp.sum(P * C) - ft @ a - gt @ b) / (unit * jnp.sum(a))
        return (f, g, it, warm), driver.Block(error=gap, n_run=jnp.asarray(self.inner_iterations))


# -- gradients -------------------------------------------------------------------------
@eqx.filter_custom_vjp
def _core(inputs, solver, init=None):
    return _forward(solver, *inputs, init=init)


@_core.def_fwd
def _core_fwd(perturbed, inputs, solver, init=None):
    out = _forward(solver, *inputs, init=init)
    return out, (out[0], out[1], out[2])


@_core.def_bwd
def _core_bwd(residuals, grad_obj, perturbed, inputs, solver, init=None):
    plan, f, g = residuals
    C, a, b = inputs
    plan_bar, reg_bar = grad_obj[0], grad_obj[3]
    reg_bar = jnp.zeros((), plan.dtype) if reg_bar is None else reg_bar
    C_bar, a_bar, b_bar = reg_bar * plan, reg_bar * f, reg_bar * g
    _, a_perturbed, b_perturbed = perturbed
    if plan_bar is not None and (a_perturbed or b_perturbed):
        u, v = support_potentials(plan, plan_bar, a, b)
        a_bar, b_bar = a_bar + u, b_bar + v
    if grad_obj[1] is not None or grad_obj[2] is not None:
        bars = _potentials_vjp(plan, f, g, C, a, b, grad_obj[1], grad_obj[2])
        C_bar, a_bar, b_bar = (s + t for s, t in zip((C_bar, a_bar, b_bar), bars))
    return tuple(t if p else None for t, p in zip((C_bar, a_bar, b_bar), perturbed))


_NOT_A_TREE = (
    "The potentials f, g of exact OT are not differentiable at this problem: the support "
    "of the optimal plan is not a spanning tree of the rows and columns of positive weight "
    "(a degenerate linear programme, e.g. an assignment with uniform weights, whose dual "
    "solutions are not unique; or Exact(method='sinkhorn_rounding'), whose plan is not a "
    "vertex). Differentiate `cost` or `reg_cost` instead (their gradients are the plan and "
    "the potentials), use method='network_simplex' on weights in general position, or "
    "epsilon > 0."
)


def _potentials_vjp(plan, f, g, C, a, b, f_bar, g_bar):
    r"""VJP of the returned potentials $(f, g)$ with respect to $(C, a, b)$.

    At a non-degenerate vertex the support $T$ of the plan is a spanning tree of the
    rows and columns of positive weight, locally constant, and the tree potentials
    $(f^0, g^0)$, $f^0_i + g^0_j = C_{ij}$ on $T$, are linear in $C$ (unique up to
    $(f^0 + t, g^0 - t)$): they solve the consistent normal equations $M (f^0, g^0) =
    ((P \odot C)\mathbf 1, (P\odot C)^\top\mathbf 1)$ of `support_potentials`. The
    returned pair is $(f, g) = \mathrm{gauge}(\mathrm{feasible}(C, f^0, g^0), a, b)$
    (`_feasible_duals` sets the potentials of zero-weight points to their
    $c$-transforms, `fix_gauge` the gauge), differentiated by autodiff; the cotangent
    $(\bar f^0, \bar g^0)$ it leaves is orthogonal to the null vector $(1, -1)$ (the
    composition is gauge invariant), so $M y = (\bar f^0, \bar g^0)$ is consistent and
    $\bar C_{ij} \mathrel{+}= y_i + y_j$ on $T$, with $M$ built from unit weights on $T$
    (the tree equations do not depend on the weights; unit weights keep the system's
    conditioning independent of the flows). Where $T$ is not a spanning tree the
    potentials are not unique (not differentiable): a nonzero cotangent raises.
    """
    f_bar = jnp.zeros_like(f) if f_bar is None else f_bar
    g_bar = jnp.zeros_like(g) if g_bar is None else g_bar

    def returned(C, a, b, f0, g0):  # as in `_forward`
        b = b * (jnp.sum(a) / jnp.sum(b))
        f1, g1 = _feasible_duals(C, f0, g0, a, b)
        return fix_gauge(f1, g1, a, b)

    _, vjp = jax.vjp(returned, C, a, b, f, g)
    C_bar, a_bar, b_bar, f0_bar, g0_bar = vjp((f_bar, g_bar))
    support = (plan > 0) & (a[:, None] > 0) & (b[None, :] > 0)
    tree = jnp.sum(support) == jnp.sum(a > 0) + jnp.sum(b > 0) - 1
    wanted = jnp.any(f_bar != 0) | jnp.any(g_bar != 0)
    # unit weights on the tree: its equations do not depend on them, and the system's
    # conditioning then does not degrade with small flows (P's weights: 1e3 at n = 7)
    S = support.astype(plan.dtype)
    y_f, y_g = _support_solve(S, f0_bar, g0_bar)
    C_bar = C_bar + S * (y_f[:, None] + y_g[None, :])
    C_bar = eqx.error_if(C_bar, wanted & ~tree, _NOT_A_TREE)
    return C_bar, a_bar, b_bar


def support_potentials(P, R, a, b):
    r"""$(u, v)$ minimising $\sum_{ij} P_{ij} (u_i + v_j - R_{ij})^2$, in the gauge
    $\langle u, a\rangle = \langle v, b\rangle$.

    On a support that is a forest (a vertex of the transport polytope) the residual is
    zero: $u_i + v_j = R_{ij}$ where $P_{ij} > 0$, which is $(\partial P / \partial
    (a, b))^\top R$. The normal equations $[\mathrm{diag}(r), P; P^\top,
    \mathrm{diag}(c)] (u, v) = ((P \odot R)\mathbf 1, (P\odot R)^\top \mathbf 1)$ are
    consistent; they are solved by conjugate gradients after the symmetric scaling of
    `ImplicitAdjoint` (eigenvalues in $[0, 2]$).
    """
    PR = P * R
    u, v = _support_solve(P, jnp.sum(PR, axis=1), jnp.sum(PR, axis=0))
    return fix_gauge(u, v, a, b)


def _support_solve(P, rhs_f, rhs_g):
    r"""A solution $(u, v)$ of $[\mathrm{diag}(r), P; P^\top, \mathrm{diag}(c)] (u, v)
    = (\text{rhs}_f, \text{rhs}_g)$ ($r, c$ the marginals of $P$), for a consistent
    right-hand side; zero on empty rows and columns. Conjugate gradients after the
    symmetric scaling of `ImplicitAdjoint` (eigenvalues in $[0, 2]$). The scaled
    right-hand side is projected off the null vector $(\sqrt r, -\sqrt c)$: a rounding
    residue along it would make the iterates grow along it (to ~1e8 in float32),
    destroying the precision of $u_i + v_j$."""
    r, c = jnp.sum(P, axis=1), jnp.sum(P, axis=0)
    inv_r = jnp.where(r > 0, jax.lax.rsqrt(jnp.where(r > 0, r, 1.0)), 0.0)
    inv_c = jnp.where(c > 0, jax.lax.rsqrt(jnp.where(c > 0, c, 1.0)), 0.0)
    A = inv_r[:, None] * P * inv_c[None, :]
    rhs = (inv_r * rhs_f, inv_c * rhs_g)
    null = (jnp.sqrt(r), -jnp.sqrt(c))
    norm2 = jnp.sum(r) + jnp.sum(c)
    along = (rhs[0] @ null[0] + rhs[1] @ null[1]) / jnp.where(norm2 > 0, norm2, 1.0)
    rhs = (rhs[0] - along * null[0], rhs[1] - along * null[1])

    def matvec(w):
        return (w[0] + A @ w[1], A.T @ w[0] + w[1])

    structure = jax.eval_shape(lambda: rhs)
    operator = lx.FunctionLinearOperator(matvec, structure, tags=lx.positive_semidefinite_tag)
    rtol = 1e-12 if P.dtype == jnp.float64 else 1e-6
    cg = lx.CG(rtol=rtol, atol=rtol * 1e-3, max_steps=4 * sum(P.shape) + 100)
    w = lx.linear_solve(operator, rhs, cg, throw=False).value
    return inv_r * w[0], inv_c * w[1]
