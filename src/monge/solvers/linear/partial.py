r"""Partial optimal transport: move a chosen amount of mass $m$, at least cost.

$$\mathrm{POT}_m(a, b) = \min_{P \ge 0,\ P\mathbf 1 \le a,\ P^\top\mathbf 1 \le b,\
\mathbf 1^\top P \mathbf 1 = m}\ \langle C, P\rangle \;(+\ \varepsilon \textstyle\sum_{ij}
P_{ij}\log P_{ij}),\qquad 0 < m \le \min(\textstyle\sum a, \sum b).$$

- `PartialExact` ($\varepsilon = 0$): the dummy-point reduction of Chapel, Alaya &
  Gasso (2020): add a dummy source of mass $\sum b - m$ and a dummy target of mass
  $\sum a - m$, at cost 0 to every real point and cost $A > \max |C| \ge -\min C$
  between themselves, so no mass flows dummy-to-dummy and exactly $m$ flows between
  real points; the balanced problem is solved by `Exact` (any of its methods).
- `PartialSinkhorn` ($\varepsilon > 0$): block coordinate ascent on the dual
  (Benamou, Carlier, Cuturi, Nenna & Peyré, 2015, iterative Bregman projections;
  Dykstra's corrections are the capped potentials below), in the log domain, stable in
  float32. With $P_{ij} = e^{(f_i + g_j + c - C_{ij})/\varepsilon}$:

  $$f_i \leftarrow \min\bigl(0,\ \varepsilon\log a_i - \varepsilon\log\textstyle\sum_j
  e^{(g_j + c - C_{ij})/\varepsilon}\bigr),\quad g \text{ alike},\quad c \leftarrow
  \varepsilon \log m - \varepsilon \log \textstyle\sum_{ij} e^{(f_i + g_j - C_{ij})/
  \varepsilon}.$$

  The objective is POT's (`ot.partial.entropic_partial_wasserstein`): the entropy is
  $\sum P \log P$, not relative to $a b^\top$.

Both return a `PlanSolution`. The entropic problem's returned `f`, `g` include half
of the mass multiplier $c$ each, so that $P_{ij} = e^{(f_i + g_j - C_{ij})/
\varepsilon}$.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx

from monge import checks
from monge.geometry import as_float_array, safe_log
from monge.problems import PartialProblem
from monge.solution import PlanSolution, Status
from monge.solvers import driver
from monge.solvers.linear.exact import Exact, solve_arrays

__all__ = ["PartialExact", "PartialSinkhorn"]


def _check_problem(solver_name: str, problem) -> None:
    if not isinstance(problem, PartialProblem):
        raise ValueError(
            f"`{solver_name}` solves a monge.solvers.linear.partial.PartialProblem; received "
            f"{type(problem).__name__}."
        )


def _traced_checks(problem: PartialProblem):
    a, b = checks.traced_weights(problem.a, problem.b, False)
    mass = problem.mass
    top = jnp.minimum(jnp.sum(a), jnp.sum(b))
    mass = eqx.error_if(
        mass,
        ~((mass > 0) & (mass <= top * (1 + 1e-6))),
        "`mass` must lie in (0, min(sum(a), sum(b))].",
    )
    return a, b, jnp.minimum(mass, top)


def _finish(problem, plan, f, g, reg_cost, n_iters, error, status, throw):
    converged = status == Status.CONVERGED
    plan = driver.finish(plan, status, throw)
    return PlanSolution(problem, plan, f, g, reg_cost, n_iters, error, converged, status)


class PartialExact(eqx.Module):
    r"""Exact partial OT by the dummy-point reduction (Chapel et al., 2020).

    Args:
        exact: the `Exact` solver of the augmented balanced problem (default: network
            simplex; ``Exact(method="sinkhorn_rounding")`` runs in pure JAX).

    Returns (from `__call__(problem, throw=False)`) a `PlanSolution` whose `plan` moves
    exactly `problem.mass`, `f`, `g` the augmented problem's potentials restricted to the
    real points, `reg_cost` $= \langle C, P\rangle$ (gradients as in `Exact`; with
    respect to the mass, minus the two dummies' potentials), `error`/`status` of the
    augmented solve.

    Reference: Chapel, Alaya & Gasso (2020), "Partial optimal transport with applications
    on positive-unlabeled learning", NeurIPS.

    Example:
        >>> import jax.numpy as jnp, monge
        >>> from monge.problems import PartialProblem
        >>> from monge.solvers.linear.partial import PartialExact
        >>> C = jnp.array([[0.0, 1.0], [1.0, 5.0]])
        >>> sol = PartialExact()(PartialProblem(monge.CostMatrix(C), mass=0.5))
        >>> sol.plan.tolist(), float(sol.cost)
        ([[0.5, 0.0], [0.0, 0.0]], 0.0)
    """

    exact: Exact = eqx.field(default_factory=Exact)

    def __check_init__(self):
        if not isinstance(self.exact, Exact) or self.exact.method in ("assignment", "auction"):
            raise ValueError(
                "`exact` must be an Exact solver with method 'network_simplex' or "
                f"'sinkhorn_rounding' (the augmented problem is not an assignment); "
                f"received {self.exact!r}."
            )

    def __call__(self, problem: PartialProblem, *, throw: bool = False) -> PlanSolution:
        _check_problem("PartialExact", problem)
        self.exact.check_method(problem.a, problem.b)
        return _solve_exact(self, problem, throw)


@eqx.filter_jit
def _solve_exact(solver: PartialExact, problem: PartialProblem, throw: bool) -> PlanSolution:
    C = problem.geom.cost_matrix()
    a, b, mass = _traced_checks(problem)
    n, m = C.shape
    top = jax.lax.stop_gradient(jnp.max(jnp.where(jnp.isfinite(C), jnp.abs(C), 0.0)))
    dummy = jnp.where(top > 0, 2 * top, 1.0)  # > -min C: dummy-to-dummy never pays
    C_ext = jnp.pad(C, ((0, 1), (0, 1))).at[n, m].set(dummy)
    a_ext = jnp.concatenate([a, (jnp.sum(b) - mass)[None]]).astype(C.dtype)
    b_ext = jnp.concatenate([b, (jnp.sum(a) - mass)[None]]).astype(C.dtype)
    a_ext, b_ext = jnp.maximum(a_ext, 0.0), jnp.maximum(b_ext, 0.0)
    plan, f, g, reg_cost, n_iters, error, status = solve_arrays(solver.exact, C_ext, a_ext, b_ext)
    return _finish(problem, plan[:n, :m], f[:n], g[:m], reg_cost, n_iters, error, status, throw)


class PartialSinkhorn(driver.AbstractIterativeSolver):
    r"""Entropic partial OT, log-domain block coordinate ascent (Benamou et al., 2015).

    Args:
        threshold: stop when the optimality residual, relative to the mass, is below
            this (default $10^{-4}$): $\sum_i \rho_i + \sum_j \sigma_j$ with $\rho_i =
            |a_i - (P\mathbf 1)_i|$ where the row constraint is active ($f_i < 0$) and
            its violation $((P\mathbf 1)_i - a_i)_+$ elsewhere; $\sigma$ alike. Traced.
        max_iterations: at most this many sweeps (rounded up to a multiple of
            `inner_iterations`, default 10 000). Static.
        inner_iterations: sweeps between two convergence checks. Static.

    `__call__(problem, throw=False)` returns a `PlanSolution`; `reg_cost` is
    $\langle C, P\rangle + \varepsilon \sum P\log P$ and is differentiable (envelope
    theorem: $\partial/\partial C = P$, $\partial/\partial a = f$, $\partial/\partial
    m = c + \varepsilon$, $\partial/\partial\varepsilon = \sum P\log P$). `plan`, `f`,
    `g` (and so `cost`) are differentiated with respect to $C$, $a$, $b$, $m$ and
    $\varepsilon$ implicitly, through the optimality conditions of the dual at the
    returned optimum (`_dual_optimum_bwd`: one conjugate-gradient solve of size
    $n + m + 1$); they are exact for the converged solution, so converge tightly when
    gradients matter. At $m = \min(\sum a, \sum b)$ (to 1000 machine epsilons) the
    potentials are not unique and differentiating `f` or `g` raises (`plan`, `cost`
    and `reg_cost` stay differentiable). Zero-weight rows and columns are frozen: their
    potential and plan entries are 0 with zero gradient, and the gradient with respect
    to a zero weight is returned as 0 although the one-sided derivative of `reg_cost`
    there is $-\infty$ (the slope of $P \log P$ at 0); keep weights positive where
    they are differentiated.

    Reference: Benamou, Carlier, Cuturi, Nenna & Peyré (2015), "Iterative Bregman
    projections for regularized transportation problems", SIAM J. Sci. Comput.

    Example:
        >>> import jax.numpy as jnp, monge
        >>> from monge.problems import PartialProblem
        >>> from monge.solvers.linear.partial import PartialSinkhorn
        >>> C = jnp.array([[0.0, 1.0], [1.0, 5.0]])
        >>> sol = PartialSinkhorn()(PartialProblem(monge.CostMatrix(C), mass=0.5, epsilon=0.05))
        >>> bool(sol.converged), round(float(sol.plan.sum()), 4)
        (True, 0.5)
    """

    threshold: float = eqx.field(default=1e-4, converter=as_float_array)
    max_iterations: int = eqx.field(default=10_000, static=True)
    inner_iterations: int = eqx.field(default=10, static=True)
    progress: bool = eqx.field(default=False, static=True)

    @property
    def error_label(self) -> str:
        return "optimality residual"

    def init(self, theta, init):
        """`(f, g, c)`: zeros, or a warm start. Each sweep recomputes `f` from `(g, c)`,
        so a warm start gives `g`: from a previous solution (whose `g` includes half the
        mass multiplier, which the first sweeps move back into `c`) or a pair `(f, g)`
        of potentials (`f` is then only checked for its shape)."""
        C, a, b, mass, eps = theta
        zero = jnp.zeros((), C.dtype)
        g = jnp.zeros_like(b) if init is None else jax.lax.stop_gradient(init[1].astype(b.dtype))
        return (jnp.zeros_like(a), jnp.minimum(g, 0.0), zero)

    def step(self, theta, state, k):
        """`inner_iterations` sweeps (rows, columns, mass); error: the residual below."""
        C, a, b, mass, eps = theta
        log_a, log_b = safe_log(a), safe_log(b)  # -inf at zero weights, masked below
        lse = jax.nn.logsumexp

        def sweep(carry, _):
            f, g, c = carry
            rows = lse(_log_plan(jnp.zeros_like(f), g, c, C, a, b, eps), axis=1)
            f = jnp.where(a > 0, jnp.minimum(0.0, eps * (log_a - rows)), 0.0)
            cols = lse(_log_plan(f, jnp.zeros_like(g), c, C, a, b, eps), axis=0)
            g = jnp.where(b > 0, jnp.minimum(0.0, eps * (log_b - cols)), 0.0)
            c = eps * (jnp.log(mass) - lse(_log_plan(f, g, 0.0, C, a, b, eps)))
            return (f, g, c), None

        (f, g, c), _ = jax.lax.scan(sweep, state, None, self.inner_iterations)
        P = jnp.exp(_log_plan(f, g, c, C, a, b, eps))
        r, col = jnp.sum(P, axis=1), jnp.sum(P, axis=0)
        rows = jnp.where(f < 0, jnp.abs(a - r), jnp.maximum(r - a, 0.0))
        cols = jnp.where(g < 0, jnp.abs(b - col), jnp.maximum(col - b, 0.0))
        err = (jnp.sum(rows) + jnp.sum(cols) + jnp.abs(jnp.sum(P) - mass)) / mass
        return (f, g, c), driver.Block(error=err, n_run=jnp.asarray(self.inner_iterations))

    def __check_init__(self):
        for name in ("max_iterations", "inner_iterations"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"`{name}` must be a positive integer; received {value!r}.")
        checks.check_positive("threshold", self.threshold, "Typical values: 1e-2 to 1e-8.")

    def __call__(self, problem: PartialProblem, *, init=None, throw: bool = False) -> PlanSolution:
        """Solve `problem`; `init`: a warm start (a previous solution or potentials
        `(f, g)`, see `init`); `throw`: raise instead of returning a run that did not
        converge."""
        _check_problem("PartialSinkhorn", problem)
        ec = None if problem.epsilon is None else checks.concrete(problem.epsilon)
        if ec is not None and not ec > 0:
            raise ValueError(
                f"`PartialSinkhorn` needs epsilon > 0; received {float(ec)!r}. Use "
                "PartialExact for epsilon = 0."
            )
        return _solve_entropic(self, problem, driver.warm_start(init, problem.geom.shape), throw)


@eqx.filter_jit
def _solve_entropic(solver: PartialSinkhorn, problem: PartialProblem, init, throw: bool):
    C = problem.geom.cost_matrix()
    a, b, mass = _traced_checks(problem)
    eps = problem.resolved_epsilon().astype(C.dtype)
    eps = eqx.error_if(eps, ~(eps > 0) | ~jnp.isfinite(eps), "`epsilon` must be positive.")
    theta = (C, a, b, mass, eps)
    f, g, c, n_iters, error = _dual_optimum(theta, solver, init)
    _, status = driver.status_from(error, solver.threshold)
    # the plan (and so `cost`, `f`, `g`) carries the implicit gradient of (f, g, c);
    # `reg_cost` that of the envelope theorem (its partial derivatives at fixed f, g, c)
    plan = jnp.exp(_log_plan(f, g, c, C, a, b, eps))
    fs, gs, cs = jax.lax.stop_gradient((f, g, c))
    log_plan = _log_plan(fs, gs, cs, *jax.lax.stop_gradient((C, a, b, eps)))
    plan_s = jnp.exp(log_plan)
    entropy = jnp.sum(jnp.where(plan_s > 0, plan_s * log_plan, 0.0))
    C_s = jax.lax.stop_gradient(C)  # forbidden pairs: C = inf where the plan is 0
    primal = jnp.sum(jnp.where(plan_s > 0, plan_s * C_s, 0.0)) + jax.lax.stop_gradient(eps) * entropy

    def dual(C, a, b, mass, eps):  # + eps * mass: equals the primal at the optimum
        total = jnp.sum(jnp.exp(_log_plan(fs, gs, cs, C, a, b, eps)))
        return fs @ a + gs @ b + cs * mass - eps * total + eps * mass

    value = dual(C, a, b, mass, eps)
    reg_cost = primal + value - jax.lax.stop_gradient(value)
    return _finish(problem, plan, f + c / 2, g + c / 2, reg_cost, n_iters, error, status, throw)


# -- gradients: implicit differentiation of the dual optimality conditions ----------------
_NOT_UNIQUE = (
    "The potentials f, g of entropic partial OT are not differentiable when `mass` equals "
    "min(sum(a), sum(b)): the mass multiplier and the potentials of the side whose mass "
    "is transported in full are then defined only up to a shift. Differentiate `plan`, "
    "`cost` or `reg_cost` (which are unique), or use a mass below min(sum(a), sum(b))."
)


@eqx.filter_custom_vjp
def _dual_optimum(theta, solver, init):
    """`(f, g, c, n_iters, error)`: the dual optimum of the entropic partial problem,
    `theta = (C, a, b, mass, eps)`, from the warm start `init` (or zeros). Its VJP is
    `_dual_optimum_bwd`."""
    (f, g, c), n_iters, error = _ascent(solver, *theta, init)
    return f, g, c, n_iters, error


@_dual_optimum.def_fwd
def _dual_optimum_fwd(perturbed, theta, solver, init):
    (f, g, c), n_iters, error = _ascent(solver, *theta, init)
    return (f, g, c, n_iters, error), (f, g, c)


@_dual_optimum.def_bwd
def _dual_optimum_bwd(residuals, grad_obj, perturbed, theta, solver, init):
    r"""Implicit differentiation of the optimality conditions (Blondel et al., 2022).

    The dual $D(f, g, c) = \langle f, a\rangle + \langle g, b\rangle + c m -
    \varepsilon \sum_{ij} P_{ij} + \varepsilon m$ is maximised over $f \le 0$,
    $g \le 0$, $c$ free. At the optimum, with the active sets $I = \{i : f_i < 0\}$,
    $J = \{j : g_j < 0\}$ (rows and columns whose capacity is used up; generically
    strictly complementary, so locally constant), $F(z; \theta) = (a_I - (P\mathbf
    1)_I,\ b_J - (P^\top \mathbf 1)_J,\ m - \sum P) = 0$ for $z = (f_I, g_J, c)$,
    and $f_i = 0$ ($g_j = 0$) off the active sets. $-\partial_z F = H / \varepsilon$,

    $$H = \begin{pmatrix} \mathrm{diag}(r_I) & P_{IJ} & r_I \\ P_{IJ}^\top &
    \mathrm{diag}(c_J) & c_J \\ r_I^\top & c_J^\top & \sum P\end{pmatrix},$$

    the Hessian of $\sum P$ restricted to $z$: positive definite as long as one row
    and one column are inactive (always when $m < \min(\sum a, \sum b)$ and the plan
    is positive). For a cotangent $\bar z$, solve $H u = \varepsilon \bar z$ (conjugate
    gradients on the Jacobi-scaled $D^{-1/2} H D^{-1/2}$, $D = \mathrm{diag}(H)$, unit
    diagonal) and return $\bar\theta = (\partial_\theta F)^\top u$.
    """
    f, g, c = residuals
    C, a, b, mass, eps = theta
    zero = lambda z, ref: jnp.zeros_like(ref) if z is None else z  # noqa: E731
    f_bar, g_bar, c_bar = zero(grad_obj[0], f), zero(grad_obj[1], g), zero(grad_obj[2], c)
    act_f = ((f < 0) & (a > 0)).astype(f.dtype)
    act_g = ((g < 0) & (b > 0)).astype(g.dtype)
    P = jnp.exp(_log_plan(f, g, c, C, a, b, eps))
    r, col, tot = jnp.sum(P, axis=1), jnp.sum(P, axis=0), jnp.sum(P)
    # Jacobi scaling on the active set; identity on the frozen (inactive) entries
    sr = jnp.where(act_f > 0, jax.lax.rsqrt(jnp.where(act_f > 0, r, 1.0)), 1.0)
    sc = jnp.where(act_g > 0, jax.lax.rsqrt(jnp.where(act_g > 0, col, 1.0)), 1.0)
    st = jax.lax.rsqrt(jnp.where(tot > 0, tot, 1.0))
    Ps = P * (act_f * sr)[:, None] * (act_g * sc)[None, :]
    rs, cs = act_f * r * sr * st, act_g * col * sc * st

    def matvec(w):
        wf, wg, wc = w
        return (
            wf + Ps @ wg + rs * wc,
            wg + Ps.T @ wf + cs * wc,
            rs @ wf + cs @ wg + wc,
        )

    # mass = sum a (within 1000 machine epsilons): every row of positive weight is full,
    # c and f are defined only up to (f - t, c + t) (the solver's f has an exact 0 where
    # it stopped; the gradient would be that of this arbitrary gauge). Cotangents through
    # the plan, a function of f + c, are orthogonal to (-1 on those rows, 0, 1); one that
    # is not comes from differentiating the potentials themselves. Columns alike.
    tol = 1000 * jnp.finfo(f.dtype).eps
    full = lambda w: mass >= jnp.sum(w) * (1 - tol)  # noqa: E731
    along = lambda w, z: jnp.abs(c_bar - jnp.sum(jnp.where(w > 0, z, 0.0))) > tol * (  # noqa: E731
        jnp.abs(c_bar) + jnp.sum(jnp.abs(z))
    )
    not_unique = (full(a) & along(a, f_bar)) | (full(b) & along(b, g_bar))
    c_bar = eqx.error_if(c_bar, not_unique, _NOT_UNIQUE)
    rhs = (eps * act_f * sr * f_bar, eps * act_g * sc * g_bar, eps * st * c_bar)
    structure = jax.eval_shape(lambda: rhs)
    operator = lx.FunctionLinearOperator(matvec, structure, tags=lx.positive_semidefinite_tag)
    rtol = 1e-12 if P.dtype == jnp.float64 else 1e-6
    cg = lx.CG(rtol=rtol, atol=rtol * 1e-3, max_steps=4 * sum(P.shape) + 100)
    w = lx.linear_solve(operator, rhs, cg, throw=False).value
    u = (act_f * sr * w[0], act_g * sc * w[1], st * w[2])

    def optimality(theta):
        C, a, b, mass, eps = theta
        P = jnp.exp(_log_plan(f, g, c, C, a, b, eps))
        return (
            act_f * (a - jnp.sum(P, axis=1)),
            act_g * (b - jnp.sum(P, axis=0)),
            mass - jnp.sum(P),
        )

    _, vjp = jax.vjp(optimality, theta)
    (theta_bar,) = vjp(u)
    return theta_bar


def _log_plan(f, g, c, C, a, b, eps):
    """$\\log P$, $-\\infty$ on rows and columns of zero weight."""
    s = (f[:, None] + g[None, :] + c - C) / eps
    return jnp.where((a[:, None] > 0) & (b[None, :] > 0), s, -jnp.inf)


def _ascent(solver: PartialSinkhorn, C, a, b, mass, eps, init=None):
    """Returns `((f, g, c), n_iters, error)`, from the shared driver."""
    theta = (C, a, b, mass, eps)
    (f, g, c), trace = driver.fixed_point(solver, theta, solver.init(theta, init))
    return (f, g, c), trace.n_iters, trace.error
