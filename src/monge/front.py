"""The front door: one call from data to a `Solution`.

These functions only build a geometry, a problem and a solver, and call the solver:
`Sinkhorn` for entropic OT, `Exact` for `epsilon=0`, `PartialExact` /
`PartialSinkhorn` when a `mass` to transport is given.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from monge import checks
from monge.costs import AbstractCost, Euclidean, PNorm, SqEuclidean, as_cost
from monge.geometry import AbstractGeometry, CostMatrix, LowRankCost, PointCloud
from monge.problems import LinearProblem
from monge.solution import LowRankSolution, PlanSolution, Solution
from monge.solvers import ImplicitAdjoint, Sinkhorn, UnrolledAdjoint
from monge.solvers.linear.exact import Exact, check_balanced
from monge.problems import PartialProblem
from monge.solvers.linear.lowrank import LowRankSinkhorn
from monge.solvers.linear.partial import PartialExact, PartialSinkhorn

__all__ = ["solve", "solve_matrix"]


def _is_zero(epsilon) -> bool:
    """Whether `epsilon` is a concrete 0 (exact OT); a traced epsilon is entropic."""
    value = None if epsilon is None else checks.concrete(epsilon)
    return value is not None and value.ndim == 0 and float(value) == 0.0


def _low_rank(geom, a, b, epsilon, tau_a, tau_b, mass, threshold, max_iterations,
              implicit_diff, progress, throw, init, rank) -> LowRankSolution:
    checks.reject_unused(
        f"Low-rank OT (rank={rank!r})",
        {"mass": mass, "implicit_diff": None if implicit_diff else False},
        "has no effect: low-rank OT transports all the mass and differentiates by the "
        "envelope theorem (LowRankSolution)",
        "drop the option(s), or drop `rank` for partial OT or unrolled Sinkhorn.",
    )
    if _is_zero(epsilon):
        raise ValueError(
            f"`epsilon=0` with `rank={rank!r}`: low-rank OT has no entropy to switch off (the "
            "rank constraint is its regulariser); drop epsilon, or drop rank for exact OT."
        )
    problem = LinearProblem(geom, a, b, epsilon=epsilon, tau_a=tau_a, tau_b=tau_b)
    options = {k: v for k, v in (("threshold", threshold), ("max_iterations", max_iterations))
               if v is not None}
    solver = LowRankSinkhorn(rank=rank, progress=progress, **options)
    return solver(problem, init=init, throw=throw)


def _dispatch(geom: AbstractGeometry, a, b, epsilon, tau_a, tau_b, mass, threshold,
              max_iterations, implicit_diff, progress, throw, init=None) -> Solution | PlanSolution:
    exact = _is_zero(epsilon)
    if exact:
        kind = "exact OT (epsilon=0)" if mass is None else "exact partial OT (epsilon=0, mass=...)"
        checks.reject_unused(
            kind[0].upper() + kind[1:], {"threshold": threshold},
            "has no effect: the network simplex solves the linear programme exactly and "
            "has no stopping tolerance",
            "drop `threshold` (use max_iterations to bound the pivots), or pass epsilon > 0 "
            "for entropic OT.",
        )
    if threshold is None:
        threshold = DEFAULT_THRESHOLD
    if exact or mass is not None:
        online = getattr(geom, "online", None)
        ignored = [name for name, used in (("implicit_diff=False", not implicit_diff),
                                           ("progress=True", progress),
                                           ("online=True", online is True),
                                           ("init=...", init is not None and exact and mass is not None))
                   if used]
        if ignored:
            kind = "exact OT (epsilon=0)" if mass is None else "partial OT (mass=...)"
            raise ValueError(
                f"{', '.join(ignored)} has no effect on {kind}, which stores the cost "
                "matrix, reports no progress and differentiates through its duals (and, "
                "exact partial OT, takes no warm start); "
                "remove the option(s), or use epsilon > 0 without `mass`."
            )
    if mass is not None:
        if not (_is_one(tau_a) and _is_one(tau_b)):
            raise ValueError(
                f"Partial OT (mass=...) has hard inequality constraints on both marginals, "
                f"so it needs tau_a = tau_b = 1; received tau_a={tau_a!r}, tau_b={tau_b!r}. "
                "Drop `mass` for unbalanced OT, or drop tau_a/tau_b for partial OT."
            )
        problem = PartialProblem(geom, a, b, mass=mass, epsilon=None if exact else epsilon)
        if exact:
            return PartialExact(Exact(max_iterations=max_iterations))(problem, throw=throw)
        extra = {} if max_iterations is None else {"max_iterations": max_iterations}
        return PartialSinkhorn(threshold=threshold, **extra)(problem, init=init, throw=throw)
    if exact:
        check_balanced(tau_a, tau_b)
        problem = LinearProblem(geom, a, b, tau_a=tau_a, tau_b=tau_b)
        return Exact(max_iterations=max_iterations)(problem, init=init, throw=throw)
    problem = LinearProblem(geom, a, b, epsilon=epsilon, tau_a=tau_a, tau_b=tau_b)
    adjoint = ImplicitAdjoint() if implicit_diff else UnrolledAdjoint()
    solver = Sinkhorn(
        threshold=threshold,
        max_iterations=2000 if max_iterations is None else max_iterations,
        adjoint=adjoint,
        progress=progress,
    )
    return solver(problem, init=init, throw=throw)


#: Costs c(x, y) = h(x - y): centring both clouds changes no cost.
_TRANSLATION_INVARIANT = (SqEuclidean, Euclidean, PNorm)


def centred(x, y, cost):
    """`(x, y, origin)`: float64 NumPy points centred in float64, before JAX casts
    them to float32 (its default without `jax.enable_x64`), when the cost is
    translation invariant; else the inputs unchanged and `origin=None`.

    Cast first, points near $10^6$ with unit spread keep 2 digits (float32 resolves
    0.06 there) and the cost was 1% off. The origin is the float32-representable mean
    of `y`, subtracted exactly in float64, so `Solution.transport` can shift new points
    by the same amount. JAX arrays are left alone (already in their dtype; the
    squared Euclidean cost centres them itself)."""
    wide = [isinstance(z, np.ndarray) and z.dtype == np.float64 for z in (x, y)]
    if not all(wide) or jnp.asarray(np.zeros(0)).dtype == np.float64:  # x64 on: no cast
        return x, y, None
    if not isinstance(as_cost(cost), _TRANSLATION_INVARIANT) or x.ndim != 2 or y.ndim != 2:
        return x, y, None
    if y.shape[0] == 0 or x.shape[-1] != y.shape[-1] or not np.all(np.isfinite(y)):
        return x, y, None
    origin = np.mean(y, axis=0).astype(np.float32).astype(np.float64)
    return x - origin, y - origin, jnp.asarray(origin, jnp.float32)


#: `threshold` when not given: an L1 marginal error of 0.1 % of the mass, below what
#: is visible in a plan and well above float32 rounding (about 1e-6 per unit of mass).
DEFAULT_THRESHOLD = 1e-3


def _is_one(tau) -> bool:
    value = checks.concrete(tau)
    return value is None or bool(np.all(value == 1))


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
    mass=None,
    threshold=None,
    max_iterations: int | None = None,
    online: bool | None = None,
    implicit_diff: bool = True,
    progress: bool = False,
    throw: bool = False,
    init=None,
    rank: int | None = None,
) -> Solution | PlanSolution | LowRankSolution:
    r"""Optimal transport between two point clouds: entropic, exact, partial or low-rank.

    Solves $\min_P \langle C, P\rangle + \varepsilon \mathrm{KL}(P\|ab^\top)$ (plus KL
    penalties on the marginals when `tau_a` or `tau_b` < 1) with $C_{ij} = c(x_i, y_j)$,
    by log-domain Sinkhorn. With `epsilon=0`, solves the exact problem
    $\min_{P\mathbf 1 = a, P^\top\mathbf 1 = b} \langle C, P\rangle$ by the network
    simplex (`monge.solvers.linear.exact.Exact`, needs POT: ``pip install pot``).
    With `mass=m`, transports only the mass $m$ (partial OT, `monge.solvers.linear.partial`):
    exactly when `epsilon=0`, else with the entropy $\varepsilon\sum P\log P$.

    Args:
        x: source points, `(n, d)`. NumPy or JAX; integers are promoted to float,
            float16/bfloat16 to float32 (the precision monge computes in at least).
            float64 NumPy points that JAX casts to float32 (without
            `jax.enable_x64`) are first centred in float64 for translation-invariant
            costs (sqeuclidean, euclidean, cityblock), so far-away data keep their
            digits; `Solution.transport` still takes and returns the original frame.
        y: target points, `(m, d)`.
        a, b: non-negative weights (uniform if omitted). Balanced problems need
            `sum(a) == sum(b)`.
        cost: ``"sqeuclidean"`` ($\|x-y\|^2$, no ½), ``"euclidean"``, ``"cityblock"``,
            ``"cosine"``, a `monge.costs` object, or a function `c(x, y)` of one pair.
        epsilon: entropic regularisation; default $0.05 \times$ the typical cost:
            the mean $\sum a_i b_j |C_{ij}|$ (weights normalised), capped at 4
            medians of $|C|$ so that a few outlying costs do not set it
            (`monge.problems.default_epsilon`), so results do not depend on the units
            of the data. The default carries no gradient (derivatives are at fixed
            epsilon). Smaller is closer to exact OT but needs more
            iterations. A new value does not recompile. ``0`` (a concrete number)
            selects exact OT: a `PlanSolution` whose gradients are the plan (w.r.t.
            the cost) and the dual potentials (w.r.t. the weights).
        tau_a, tau_b: unbalancedness in (0, 1]; 1 is balanced.
            $\tau = \rho / (\rho + \varepsilon)$ for a KL marginal penalty of strength
            $\rho$. Exact and partial OT need 1.
        mass: if given, the mass $m \in (0, \min(\sum a, \sum b)]$ to transport
            (partial OT; the masses of `a` and `b` may then differ).
        threshold: stop when the L1 marginal error is below it (default None: 1e-3,
            `DEFAULT_THRESHOLD`); for unbalanced OT (tau < 1) the L1 optimality
            residual, for partial entropic OT its optimality residual relative to the
            mass. Exact OT (`epsilon=0`) has no tolerance: passing it there is an error.
        max_iterations: iteration budget: Sinkhorn iterations (default 2000, rounded
            up to a multiple of 10), network simplex pivots when `epsilon=0` (default
            $10^7$), partial entropic sweeps (default 10 000).
        online: store the cost matrix (False) or recompute it in blocks (True, memory
            $O(n + m)$ per block row); default: online above $2^{25}$ entries. Exact
            and partial OT always store the cost matrix (`online=True` is an error).
        implicit_diff: gradients by implicit differentiation (default) or by unrolling
            the iterations (False). Entropic OT only (False is an error otherwise).
        progress: print iterations and error to stderr while solving (entropic OT only;
            True is an error otherwise).
        throw: raise instead of returning a non-converged solution.
        init: a warm start: a previous solution of a problem of the same shape (e.g.
            the last iterate of an outer loop) or potentials `(f, g)`; same answer to
            the threshold, usually in fewer iterations (`Sinkhorn.__call__`,
            `PartialSinkhorn`). Exact OT's default network simplex takes none (a
            `ValueError`; `monge.Exact(method="auction")` does), nor does exact partial
            OT. Low-rank OT takes a previous `LowRankSolution` or factors `(q, r, g)`.
        rank: if given, low-rank OT (`monge.LowRankSinkhorn`, Scetbon, Cuturi & Peyré,
            2021): the coupling of rank at most `rank` that minimises $\langle C,
            P\rangle$, held by its factors, in time and memory linear in n and m
            (never an n×m array). The cost is factored first
            (`monge.geometry.LowRankCost.from_points`: exactly, rank d + 2, for
            ``"sqeuclidean"``; other costs by a sampled factorisation whose estimated
            error must be below 1 %, else a `ValueError`). `threshold` is then the
            relative decrease of the objective per block (default 1e-4), `epsilon`
            only sets the marginal penalties when tau < 1, and `epsilon=0`, `mass`
            and `implicit_diff=False` are errors. Returns a `LowRankSolution`.

    Returns:
        A `Solution` with `f`, `g`, `plan`, `apply`, `cost`, `reg_cost`, `converged`,
        `n_iters`, `errors`, `status`, `transport`; for exact or partial OT a
        `PlanSolution` (`plan`, `f`, `g`, `apply`, `cost`, `reg_cost`, `converged`,
        `n_iters`, `error`, `status`).

    Raises:
        ValueError: for inputs of the wrong shape, empty clouds, d = 0, complex or
            non-numeric arrays, NaN/inf values (when concrete; under `jit` the values
            cannot be read, and a solve on non-finite points or costs returns
            `status` DIVERGED instead), negative weights,
            unequal masses in a balanced problem, epsilon < 0, tau outside (0, 1], tau
            < 1 with epsilon=0 or with `mass`, `mass` outside $(0, \min(\sum a, \sum
            b)]$, and options the chosen solver would ignore (`threshold` with
            `epsilon=0`; `online`, `progress` or `implicit_diff=False` with `epsilon=0`
            or `mass`).
        ImportError: `epsilon=0` without POT installed.

    Example:
        >>> import numpy as np, monge
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(7, 2)), rng.normal(size=(11, 2)) + 1.0
        >>> sol = monge.solve(x, y, epsilon=0.1)
        >>> bool(sol.converged), sol.plan.shape
        (True, (7, 11))
        >>> exact = monge.solve(x, y, epsilon=0)
        >>> bool(exact.converged), bool(exact.cost <= sol.cost)
        (True, True)
    """
    x, y, origin = centred(x, y, cost)
    if rank is not None:
        checks.reject_unused(f"Low-rank OT (rank={rank!r})", {"online": online},
                             "has no effect: the cost is factored, never stored",
                             "drop `online`.")
        geom = LowRankCost.from_points(x, y, cost, origin=origin)
        return _low_rank(geom, a, b, epsilon, tau_a, tau_b, mass, threshold, max_iterations,
                         implicit_diff, progress, throw, init, rank)
    geom = PointCloud(x, y, cost, online=online, origin=origin)
    return _dispatch(geom, a, b, epsilon, tau_a, tau_b, mass, threshold, max_iterations,
                     implicit_diff, progress, throw, init)


def solve_matrix(
    C,
    *,
    a=None,
    b=None,
    epsilon=None,
    tau_a=1.0,
    tau_b=1.0,
    mass=None,
    threshold=None,
    max_iterations: int | None = None,
    implicit_diff: bool = True,
    progress: bool = False,
    throw: bool = False,
    init=None,
    rank: int | None = None,
) -> Solution | PlanSolution | LowRankSolution:
    r"""Optimal transport (entropic, exact, partial or low-rank) for a given `(n, m)` cost matrix.

    Same problems, arguments (`init` and `rank` included) and defaults as `solve` (epsilon
    defaults to 0.05 times the typical $|C|$, `monge.problems.default_epsilon`; `epsilon=0` is exact OT; `mass=m`
    partial OT). An entry `C[i, j] = inf` forbids the pair: the plan is exactly 0
    there, in every solver; a row or column of positive weight with no allowed pair is
    a `ValueError`, other infeasible patterns give `Status.INFEASIBLE` (exact and
    partial OT) or a non-converged status (Sinkhorn).

    Example:
        >>> import numpy as np, monge
        >>> C = np.array([[0.0, 1.0], [1.0, 0.0]])
        >>> sol = monge.solve_matrix(C, epsilon=0.01)
        >>> np.round(np.asarray(sol.plan), 3).tolist()
        [[0.5, 0.0], [0.0, 0.5]]
        >>> monge.solve_matrix(C, epsilon=0).plan.tolist()
        [[0.5, 0.0], [0.0, 0.5]]
        >>> partial = monge.solve_matrix(C, epsilon=0, mass=0.5)
        >>> round(float(partial.plan.sum()), 6), float(partial.cost)
        (0.5, 0.0)
    """
    if rank is not None:  # the stored matrix is applied by products: O(nmr) per step
        return _low_rank(CostMatrix(C), a, b, epsilon, tau_a, tau_b, mass, threshold,
                         max_iterations, implicit_diff, progress, throw, init, rank)
    return _dispatch(CostMatrix(C), a, b, epsilon, tau_a, tau_b, mass, threshold,
                     max_iterations, implicit_diff, progress, throw, init)
