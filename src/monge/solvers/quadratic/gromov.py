r"""Entropic Gromov-Wasserstein by mirror descent (Peyré, Cuturi & Solomon 2016).

Each outer iteration linearises the (fused) GW objective at the current coupling and
solves the linear entropic problem on that cost with `Sinkhorn`, warm-started from the
previous potentials:

$$P_{t+1} = \arg\min_{P \in \Pi(a, b)} \langle \nabla \mathcal E(P_t), P\rangle +
\varepsilon\,\mathrm{KL}(P\,\|\,ab^\top),\qquad \nabla\mathcal E(P) = 2\alpha\,L\otimes
P + (1 - \alpha) M,$$

($\mathcal E = (1-\alpha)\langle M, P\rangle + \alpha\,\mathrm{GW}(P)$,
`QuadraticProblem.gradient`), i.e. mirror descent with step $1/\varepsilon$ in the KL
geometry. A fixed point is a stationary point of $\mathcal E(P) +
\varepsilon\,\mathrm{KL}(P\|ab^\top)$ on $\Pi(a, b)$ (the problem is not convex: a
local one, which depends on the start). This is the iteration of POT's
`entropic_gromov_wasserstein` and gives its objective.

**Unbalanced** ($\tau < 1$; Séjourné, Vialard & Peyré 2021): the coupling is scored by

$$\mathcal E(\pi) + \tfrac{\rho_a}{2}\mathrm{KL}^\otimes(\pi_1\otimes\pi_1\|a\otimes a)
+ \tfrac{\rho_b}{2}\mathrm{KL}^\otimes(\pi_2\otimes\pi_2\|b\otimes b) +
\tfrac{\varepsilon}{2}\mathrm{KL}^\otimes(\pi\otimes\pi\|(ab^\top)^{\otimes 2}),$$

$\mathrm{KL}^\otimes(\mu\otimes\mu\|\nu\otimes\nu) = 2m(\mu)\int\log\frac{d\mu}{d\nu}
d\mu - m(\mu)^2 + m(\nu)^2$, $\rho = \varepsilon\tau/(1-\tau)$ (the halves make it
equal the balanced objective at unit mass). Each iteration solves the unbalanced
linear problem with cost $\nabla\mathcal E(\pi) + \rho_a\langle\log\frac{\pi_1}{a},
\pi_1\rangle + \rho_b\langle\log\frac{\pi_2}{b}, \pi_2\rangle + \varepsilon\langle
\log\frac{\pi}{ab^\top}, \pi\rangle$ and $\varepsilon m(\pi)$, $\rho m(\pi)$ (so the
same $\tau$), then rescales the result $\gamma$ by $\sqrt{m(\pi)/m(\gamma)}$ (their
Algorithm 1, with our halves).

**Stopping**: the error of an iteration is the relative change of the coupling,
$\|P_{t+1} - P_t\|_1/\|P_{t+1}\|_1$; it counts only when the inner Sinkhorn converged.

References: Peyré, Cuturi & Solomon, ICML 2016; Solomon et al., "Entropic metric
alignment for correspondence problems", SIGGRAPH 2016; Séjourné, Vialard & Peyré, "The
unbalanced Gromov-Wasserstein distance", NeurIPS 2021.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from monge import checks
from monge.geometry import CostMatrix, as_float_array, safe_log
from monge.problems.linear import DEFAULT_RELATIVE_EPSILON, LinearProblem
from monge.problems.quadratic import QuadraticProblem
from monge.solution import GromovSolution, Status
from monge.solvers import driver
from monge.solvers.linear.sinkhorn import Sinkhorn

__all__ = ["GromovWasserstein", "default_epsilon", "INNER_THRESHOLD_RATIO"]

#: The inner Sinkhorn's marginal threshold, relative to the outer `threshold`: the
#: coupling's change can only be measured to the inner solver's accuracy.
INNER_THRESHOLD_RATIO = 0.1


def default_epsilon(problem: QuadraticProblem) -> Array:
    r"""$0.05\,s$ with $s$ = `problem.scale()`, twice the objective under the
    independent coupling (the typical size of the linearised cost's spread); gradient
    stopped, as for linear problems."""
    s = jax.lax.stop_gradient(problem.scale())
    ok = jnp.isfinite(s) & (s > 0)
    return jnp.where(ok, DEFAULT_RELATIVE_EPSILON * jnp.where(ok, s, 1.0), 1.0)


def _rho(eps, tau):
    r"""$\rho = \varepsilon\tau/(1 - \tau)$; $\infty$ at $\tau = 1$."""
    return jnp.where(tau < 1, eps * tau / jnp.where(tau < 1, 1 - tau, 1.0), jnp.inf)


class GromovWasserstein(driver.AbstractIterativeSolver):
    r"""Entropic (fused, unbalanced) Gromov-Wasserstein by mirror descent.

    Args:
        threshold: stop when the coupling's relative L1 change over one iteration,
            $\|P_{t+1} - P_t\|_1 / \|P_{t+1}\|_1$, is at most this (and the inner
            Sinkhorn converged). Default 1e-4. Traced.
        max_iterations: outer iterations at most (each one Sinkhorn solve). Default 500.
        linear_solver: the inner `Sinkhorn`; default `Sinkhorn(threshold=
            INNER_THRESHOLD_RATIO * threshold)` (a change of the coupling cannot be
            measured below the inner marginal error).
        progress: print one line per outer iteration.

    `epsilon` is the problem's (`QuadraticProblem.epsilon`); if `None`, 0.05 times
    twice the objective under the independent coupling (`default_epsilon`), in the
    objective's units (cost$^2$ for the squared loss).

    Warm start: `init=` a previous `GromovSolution` of the same shape, or a coupling
    `(n, m)` (non-negative); the default start is $ab^\top/\sqrt{m(a)m(b)}$.

    Gradients: the outer loop is not differentiated. `GromovSolution.reg_cost` and
    `cost` carry the envelope gradient (see there); `plan` carries none.
    """

    threshold: Array = eqx.field(default=1e-4, converter=as_float_array)
    max_iterations: int = eqx.field(default=500, static=True)
    linear_solver: Sinkhorn | None = None
    progress: bool = eqx.field(default=False, static=True)
    inner_iterations: int = eqx.field(default=1, static=True)

    def __check_init__(self):
        if self.inner_iterations != 1:
            raise ValueError("`inner_iterations` of GromovWasserstein is 1 (one Sinkhorn "
                             f"solve per block); received {self.inner_iterations}.")
        if self.max_iterations < 1:
            raise ValueError(f"`max_iterations` must be >= 1; received {self.max_iterations}.")
        if self.linear_solver is not None and not isinstance(self.linear_solver, Sinkhorn):
            raise ValueError("`linear_solver` must be a monge.Sinkhorn; received "
                             f"{type(self.linear_solver).__name__}.")
        checks.check_positive("threshold", self.threshold, "Pass a threshold > 0, e.g. 1e-4.")

    @property
    def error_label(self) -> str:
        return "coupling change"

    def inner(self) -> Sinkhorn:
        if self.linear_solver is not None:
            return self.linear_solver
        return Sinkhorn(threshold=INNER_THRESHOLD_RATIO * self.threshold)

    def __call__(self, problem: QuadraticProblem, *, init=None, throw: bool = False) -> GromovSolution:
        """Solve `problem` (a `QuadraticProblem`); `init`: see the class docstring."""
        if not isinstance(problem, QuadraticProblem):
            raise ValueError("`GromovWasserstein` solves a monge.QuadraticProblem; received "
                             f"{type(problem).__name__}.")
        return _solve(self, problem, _warm_start(init, problem), throw)

    # -- iterations ---------------------------------------------------------------------
    def init(self, data, init):
        problem, eps, rho_a, rho_b = data
        a, b = problem.a, problem.b
        if init is None:
            P = a[:, None] * b[None, :] / jnp.sqrt(jnp.sum(a) * jnp.sum(b))
        else:
            P = jax.lax.stop_gradient(init.astype(a.dtype))
        # the first solve starts cold (Sinkhorn's own start and annealing); the loop
        # then warm-starts each solve from the previous potentials
        return self._update(data, P, None)[0]

    def linearization(self, data, P) -> tuple[Array, Array]:
        """The inner problem's cost matrix and epsilon at the coupling `P`."""
        problem, eps, rho_a, rho_b = data
        a, b = problem.a, problem.b
        C = problem.gradient(P)
        mass = jnp.sum(P)
        p, q = jnp.sum(P, 1), jnp.sum(P, 0)

        def mean_log(z, w):  # <log(z / w), z>, 0 where z = 0
            return jnp.sum(jnp.where(z > 0, z * (safe_log(z) - safe_log(w)), 0.0))

        def penalty(rho, z, w):
            return jnp.where(jnp.isfinite(rho), jnp.where(jnp.isfinite(rho), rho, 0.0) * mean_log(z, w), 0.0)

        balanced = problem.is_balanced
        shift = (penalty(rho_a, p, a) + penalty(rho_b, q, b)
                 + eps * mean_log(P, a[:, None] * b[None, :]))
        C = C + jnp.where(balanced, 0.0, shift)
        return C, eps * jnp.where(balanced, 1.0, mass)

    def step(self, data, state, k):
        P, f, g, _, _ = state
        return self._update(data, P, (f, g))

    def _update(self, data, P, potentials):
        """One mirror-descent iteration from `P`: `(state, Block)`."""
        problem = data[0]
        C, eps = self.linearization(data, P)
        linear = LinearProblem(CostMatrix(C), problem.a, problem.b, epsilon=eps,
                               tau_a=problem.tau_a, tau_b=problem.tau_b)
        sol = self.inner()(linear, init=potentials)
        new = sol.plan
        mass = jnp.sum(P)
        new = jnp.where(problem.is_balanced, new, new * jnp.sqrt(mass / jnp.sum(new)))
        change = jnp.sum(jnp.abs(new - P)) / jnp.sum(new)
        error = jnp.where(sol.converged, change, jnp.maximum(change, 1.0))
        error = jnp.where(jnp.all(jnp.isfinite(new)), error, jnp.inf)
        return (new, sol.f, sol.g, sol.converged, sol.status), driver.Block(error, jnp.asarray(1))


def _warm_start(init, problem: QuadraticProblem):
    if init is None:
        return None
    P = init.plan if isinstance(init, GromovSolution) else init
    P = as_float_array(P)
    if P.shape != problem.shape:
        raise ValueError(
            f"`init` must be a previous GromovSolution or a coupling of shape {problem.shape}; "
            f"received shape {tuple(P.shape)}.")
    value = checks.concrete(P)
    if value is not None and (not (value >= 0).all() or not value.sum() > 0):
        raise ValueError("`init` must be a non-negative coupling with positive mass.")
    return P


@eqx.filter_jit
def _solve(solver: GromovWasserstein, problem: QuadraticProblem, init, throw: bool) -> GromovSolution:
    live = problem
    problem = jax.lax.stop_gradient(problem)
    eps = problem.epsilon if problem.epsilon is not None else default_epsilon(problem)
    eps = eps.astype(problem.dtype)
    rho_a, rho_b = _rho(eps, problem.tau_a), _rho(eps, problem.tau_b)
    data = (problem, eps, rho_a, rho_b)
    state = solver.init(data, init)
    state, trace = driver.fixed_point(solver, data, state)
    P, f, g, inner_ok, inner_status = state
    converged, status = driver.status_of(trace, solver.threshold)
    finite = jnp.all(jnp.isfinite(P)) & jnp.all(jnp.isfinite(f)) & jnp.all(jnp.isfinite(g))
    status = jnp.where(finite, status, Status.DIVERGED).astype(jnp.int32)
    P = driver.finish(P, status, throw)
    return GromovSolution(live, P, f, g, eps, rho_a, rho_b, trace.n_iters, trace.error,
                          trace.errors, status == Status.CONVERGED, status)
